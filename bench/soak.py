"""Soak: the service at 4x its sustainable load, then a graceful shutdown under load.

`python -m bench.soak` (`make soak`) starts `python -m service` on 127.0.0.1 as its own
process and drives it from this one with asyncio (httpx for the probes). Only loopback; every
phase is bounded in time (about 85 s in all with the defaults):

1. calibrate  closed loop, --users single-image /encode requests at a time: the sustainable
              rate R (successful requests per second).
2. overload   open loop at --factor x R for --overload-s seconds: the bounded queue must
              answer 429/503 with Retry-After, accepted requests must complete, p99 of the
              accepted stays bounded, server RSS is sampled throughout.
3. recovery   once the load stops: sequential requests all succeed, the queue is empty,
              /readyz is 200 (nothing deadlocked).
4. shutdown   closed-loop load, then SIGTERM: requests in flight must complete (those
              not yet in their handler may be refused 503 not_ready), new ones are
              refused, /readyz turns 503 (seen by a poller on a kept-alive connection until
              uvicorn closes it), and the process exits cleanly.

Prints a summary (and --json FILE writes it); exits 1 when a check fails: no 429/503 under
overload, a rejection without Retry-After, any 5xx other than 503, a failed request after
the load stops, an in-flight request dropped at shutdown, no 503 from /readyz after SIGTERM,
an unclean exit, or RSS growing more than --max-rss-growth-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from aecore.machine import machine
from tests.live import REPO, LiveServer, live_server

KEEP_ALIVE_S = 4.0  # reuse an idle connection only this long (uvicorn closes them after 5 s)
IMAGE = sorted((REPO / "tests" / "fixtures" / "scenes").glob("*/*.jpg"))[0]


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no HTTP response (refused, reset, timed out)
    error: str = ""
    retry_after: str | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started


def encode_request(host: str, image: bytes) -> bytes:
    """One pre-built `POST /encode` (multipart, one image), sent as is on every request."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /encode HTTP/1.1\r\nHost: {host}\r\nUser-Agent: soak\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


class Load:
    """HTTP/1.1 keep-alive connections on asyncio streams, one request at a time on each.

    Not httpx: on this 2-core machine its per-request CPU (about 3 ms) kept the generator
    below the server's own rate, so the "overload" never reached the server. Pre-built request
    bytes and a minimal response parser cost a fraction of that. A connection the server closed
    while idle is retried once on a fresh one, as HTTP clients do.
    """

    def __init__(self, base: str, max_connections: int, timeout_s: float) -> None:
        self.host, port = base.removeprefix("http://").split(":")
        self.port = int(port)
        self.request = encode_request(f"{self.host}:{port}", IMAGE.read_bytes())
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.open = 0

    def take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection, closing those the server will have
        closed already (uvicorn's keep-alive timeout is 5 s)."""
        while self.idle:
            reader, writer, last_used = self.idle.pop()
            if time.perf_counter() - last_used < KEEP_ALIVE_S:
                return reader, writer
            self.open -= 1
            writer.close()
        return None

    def has_room(self) -> bool:
        return bool(self.idle) or self.open < self.max_connections

    async def one(self) -> Outcome:
        started = time.perf_counter()
        for attempt in range(2):
            conn = self.take_idle()
            reused = conn is not None
            if not reused:
                self.open += 1
                try:
                    conn = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout_s
                    )
                except (OSError, asyncio.TimeoutError) as exc:
                    self.open -= 1
                    return Outcome(started, time.perf_counter(), None, type(exc).__name__)
            reader, writer = conn
            try:
                writer.write(self.request)
                status, headers, body = await asyncio.wait_for(
                    read_response(reader), self.timeout_s
                )
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                self.open -= 1
                writer.close()
                nothing_read = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                if (
                    reused
                    and attempt == 0
                    and nothing_read
                    and not isinstance(exc, asyncio.TimeoutError)
                ):
                    continue  # the server had closed this idle connection: once more, fresh
                return Outcome(started, time.perf_counter(), None, type(exc).__name__)
            ended = time.perf_counter()
            if headers.get("connection", "").lower() == "close":
                self.open -= 1
                writer.close()
            else:
                self.idle.append((reader, writer, ended))
            if status == 200:
                error = "" if len(orjson.loads(body)["latents"]) == 1 else "wrong reply"
            else:
                error = orjson.loads(body).get("error", {}).get("code", "?")
            return Outcome(started, ended, status, error, headers.get("retry-after"))
        raise AssertionError("unreachable")

    async def closed_loop(self, users: int, seconds: float, stop: asyncio.Event | None = None):
        outcomes: list[Outcome] = []
        end = time.perf_counter() + seconds

        async def user() -> None:
            while time.perf_counter() < end and not (stop and stop.is_set()):
                outcome = await self.one()
                outcomes.append(outcome)
                if outcome.status is None and stop is not None:
                    return  # the server is going away: this user stops

        await asyncio.gather(*(user() for _ in range(users)))
        return outcomes

    async def open_loop(self, rate: float, seconds: float) -> tuple[list[Outcome], int]:
        """`rate` requests per second, whatever the replies. A request due while every one of
        `max_connections` connections is busy is not sent, and counted (the generator's bound)."""
        outcomes: list[Outcome] = []
        pending: set[asyncio.Task] = set()
        skipped = sent = 0
        start = time.perf_counter()

        def done(task: asyncio.Task) -> None:
            pending.discard(task)
            outcomes.append(task.result())

        while (now := time.perf_counter()) - start < seconds:
            for _ in range(int((now - start) * rate) - sent):
                sent += 1
                if not self.has_room():
                    skipped += 1
                    continue
                task = asyncio.create_task(self.one())
                pending.add(task)
                task.add_done_callback(done)
            await asyncio.sleep(0.001)
        if pending:
            await asyncio.wait(pending)
        return outcomes, skipped

    async def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def sample_rss(server: LiveServer, into: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        into.append(server.rss_mb())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status in (429, 503)]
    latencies = [o.latency for o in ok]
    return {
        "sent": len(outcomes),
        "accepted": len(ok),
        "rejected_429_503": len(rejected),
        "rejected_without_retry_after": sum(o.retry_after is None for o in rejected),
        "rejection_codes": sorted({o.error for o in rejected}),
        "other_5xx": sum(1 for o in outcomes if o.status and o.status >= 500 and o.status != 503),
        "other_4xx": sum(
            1 for o in outcomes if o.status and 400 <= o.status < 500 and o.status != 429
        ),
        "no_response": sum(o.status is None for o in outcomes),
        "no_response_errors": sorted({o.error for o in outcomes if o.status is None}),
        "wrong_replies": sum(o.error == "wrong reply" for o in ok),
        "accepted_p50_s": round(percentile(latencies, 50), 3),
        "accepted_p99_s": round(percentile(latencies, 99), 3),
        "accepted_max_s": round(max(latencies, default=float("nan")), 3),
    }


async def run(args: argparse.Namespace) -> dict:
    env = {
        "AE_MAX_QUEUE_SIZE": str(args.queue_size),
        "AE_QUEUE_TIMEOUT_S": str(args.queue_timeout_s),
        "AE_MAX_BATCH_SIZE": str(args.batch_size),
    }
    result: dict = {
        "machine": machine(),
        "server_env": env,
        "users": args.users,
        "connections": args.connections,
        "overload_s": args.overload_s,
        "checks": {},
    }
    result["phases_s"] = phases = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 1)
        mark = now

    with live_server({"AE_LOG_LEVEL": "warning", **env}) as server:
        lap("start")
        return await _phases(server, args, result, lap)


async def _phases(server: LiveServer, args: argparse.Namespace, result: dict, lap) -> dict:
    samples: list[float] = []
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server, samples, stop_sampling))
    load = Load(server.base, args.connections, args.client_timeout_s)
    try:
        # 1. calibrate
        await load.closed_loop(args.users, 2.0)  # warm-up: arenas, pools, connections
        rss_start = server.rss_mb()
        t0 = time.perf_counter()
        calib = await load.closed_loop(args.users, args.calibrate_s)
        elapsed = time.perf_counter() - t0
        rate = sum(o.status == 200 for o in calib) / elapsed
        result["calibrate"] = {**summarise(calib), "sustainable_rps": round(rate, 1)}
        print(f"calibrate: {rate:.1f} req/s sustained with {args.users} users", flush=True)

        lap("calibrate")
        # 2. overload
        offered = args.factor * rate
        print(f"overload: {offered:.1f} req/s for {args.overload_s:g} s", flush=True)
        overload, skipped = await load.open_loop(offered, args.overload_s)
        rss_after_load = server.rss_mb()
        result["overload"] = {
            **summarise(overload),
            "offered_rps": round(offered, 1),
            "generator_skipped": skipped,
        }

        lap("overload")
        # 3. recovery: nothing stuck once the load stops
        await asyncio.sleep(1.0)
        recovery = [await load.one() for _ in range(20)]
        async with httpx.AsyncClient(base_url=server.base, timeout=10) as probe:
            metrics = (await probe.get("/metrics")).text
            ready = (await probe.get("/readyz")).status_code
        depth = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("ae_queue_depth{")
        )
        result["recovery"] = {
            "requests": len(recovery),
            "ok": sum(o.status == 200 for o in recovery),
            "failures": sorted({f"{o.status} {o.error}" for o in recovery if o.status != 200}),
            "queue_depth": depth,
            "readyz": ready,
        }
        await load.close()

        # 4. shutdown under load
        lap("recovery")
        result["shutdown"] = await shutdown(server, args)
        lap("shutdown")
    finally:
        stop_sampling.set()
        await sampler
    result["rss_mb"] = {
        "after_warm_up": round(rss_start, 1),
        "after_overload": round(rss_after_load, 1),
        "peak": round(max(samples), 1),
    }
    over, rec, down = result["overload"], result["recovery"], result["shutdown"]
    result["checks"] = {
        "overload_rejected_with_429_503": over["rejected_429_503"] > 0,
        "every_rejection_has_retry_after": over["rejected_without_retry_after"] == 0,
        "no_5xx_besides_overload_503": all(
            p["other_5xx"] == 0 for p in (result["calibrate"], over, down["load"])
        ),
        "accepted_requests_are_correct": over["wrong_replies"] == 0 and over["accepted"] > 0,
        "no_request_without_a_response_under_overload": over["no_response"] == 0,
        "recovers_after_the_load": rec["ok"] == rec["requests"] and rec["queue_depth"] == 0
        and rec["readyz"] == 200,
        "rss_bounded": max(samples) - rss_start < args.max_rss_growth_mb,
        "in_flight_answered_at_shutdown": down["in_flight_dropped"] == 0
        and down["in_flight_ok"] + down["in_flight_503_not_ready"] == down["in_flight_at_sigterm"]
        and down["in_flight_ok"] > 0,
        "new_requests_refused_after_sigterm": down["refused_after_sigterm"] > 0,
        "readiness_503_after_sigterm": "503" in down["readyz_after_sigterm"],
        "clean_exit": down["exit_code"] in (0, -signal.SIGTERM) and not down["traceback"],
    }  # fmt: skip
    return result


async def shutdown(server: LiveServer, args: argparse.Namespace) -> dict:
    """Closed-loop load and a /readyz poller, SIGTERM mid-way, then watch them end."""
    load = Load(server.base, args.users, args.client_timeout_s)
    probe = httpx.AsyncClient(base_url=server.base, timeout=2)
    stop = asyncio.Event()
    readiness: list[tuple[float, int | None]] = []

    async def poll_readiness() -> None:
        while not stop.is_set():
            try:
                status = (await probe.get("/readyz")).status_code
            except httpx.HTTPError:
                status = None
            readiness.append((time.perf_counter(), status))
            if status is None:
                return
            await asyncio.sleep(0.005)

    users = asyncio.create_task(load.closed_loop(args.users, args.shutdown_s, stop))
    poller = asyncio.create_task(poll_readiness())
    await asyncio.sleep(args.shutdown_s / 3)
    sigterm_at = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    outcomes = await users
    stop.set()
    await poller
    await asyncio.gather(load.close(), probe.aclose())
    exit_code = await asyncio.to_thread(server.proc.wait, 60)
    exited_after = time.perf_counter() - sigterm_at
    log = server.output()
    in_flight = [o for o in outcomes if o.started < sigterm_at < o.ended]
    after = [o for o in outcomes if o.started >= sigterm_at]
    after_readiness = [s for t, s in readiness if t >= sigterm_at]
    return {
        "load": summarise(outcomes),
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_ok": sum(o.status == 200 for o in in_flight),
        "in_flight_503_not_ready": sum(o.status == 503 for o in in_flight),
        "in_flight_dropped": sum(o.status is None for o in in_flight),
        "in_flight_dropped_errors": sorted({o.error for o in in_flight if o.status is None}),
        "started_after_sigterm": len(after),
        "refused_after_sigterm": sum(o.status is None or o.status == 503 for o in after),
        "readyz_after_sigterm": sorted({str(s) for s in after_readiness}),
        "exit_code": exit_code,
        "exit_after_sigterm_s": round(exited_after, 2),
        "traceback": "Traceback" in log,
    }


def report(result: dict) -> str:
    m, c, o, r, d = (
        result[k] for k in ("machine", "calibrate", "overload", "recovery", "shutdown")
    )
    rss = result["rss_mb"]
    phases = (c, o, d["load"])
    lines = [
        f"machine: {m['cpu']} x{m['cpu_count']}, python {m['python']}, "
        f"load average at start {m['loadavg_at_start']}",
        f"server: {' '.join(f'{k}={v}' for k, v in result['server_env'].items())}",
        f"calibrate: {c['sustainable_rps']} req/s sustainable with {result['users']} users "
        f"(p99 {c['accepted_p99_s']} s)",
        f"overload: {o['offered_rps']} req/s offered for {result['overload_s']:g} s: "
        f"sent {o['sent']}, accepted {o['accepted']}, "
        f"rejected 429/503 {o['rejected_429_503']} ({', '.join(o['rejection_codes'])}), "
        f"other 5xx {o['other_5xx']}, no response {o['no_response']}, "
        f"not sent (all {result['connections']} connections busy) {o['generator_skipped']}",
        f"  accepted latency: p50 {o['accepted_p50_s']} s, p99 {o['accepted_p99_s']} s, "
        f"max {o['accepted_max_s']} s",
        f"recovery: {r['ok']}/{r['requests']} ok {r['failures'] or ''}, "
        f"queue depth {r['queue_depth']:g}, /readyz {r['readyz']}",
        f"shutdown: {d['in_flight_at_sigterm']} sent before SIGTERM, unanswered at it -> "
        f"{d['in_flight_ok']} completed 200, {d['in_flight_503_not_ready']} refused before "
        f"their handler started (503 not_ready), {d['in_flight_dropped']} dropped "
        f"{d['in_flight_dropped_errors']}; {d['started_after_sigterm']} sent after -> "
        f"{d['refused_after_sigterm']} refused; /readyz after SIGTERM "
        f"{d['readyz_after_sigterm']}; exit {d['exit_code']} after {d['exit_after_sigterm_s']} s",
        f"server RSS: {rss['after_warm_up']} MB after warm-up, {rss['after_overload']} MB after "
        f"the overload, peak {rss['peak']} MB",
        "",
        f"TOTAL sent {sum(p['sent'] for p in phases)}, "
        f"accepted {sum(p['accepted'] for p in phases)}, "
        f"rejected 429/503 {sum(p['rejected_429_503'] for p in phases)}, "
        f"5xx other than 503 {sum(p['other_5xx'] for p in phases)}, "
        f"no response {c['no_response'] + o['no_response'] + d['in_flight_dropped']} "
        "(connections refused after SIGTERM aside), "
        f"peak RSS {rss['peak']} MB, overload p99 {o['accepted_p99_s']} s",
        "checks: "
        + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in result["checks"].items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16, help="closed-loop concurrency")
    parser.add_argument("--factor", type=float, default=4.0, help="overload x sustainable")
    parser.add_argument("--calibrate-s", type=float, default=8.0)
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--shutdown-s", type=float, default=6.0)
    parser.add_argument("--queue-size", type=int, default=64, help="AE_MAX_QUEUE_SIZE")
    parser.add_argument("--queue-timeout-s", type=float, default=10.0, help="AE_QUEUE_TIMEOUT_S")
    parser.add_argument("--batch-size", type=int, default=32, help="AE_MAX_BATCH_SIZE")
    parser.add_argument("--connections", type=int, default=512, help="client connections")
    parser.add_argument("--client-timeout-s", type=float, default=30.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=1024.0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    started = time.perf_counter()
    result = asyncio.run(run(args))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(report(result))
    print(f"wall time: {result['wall_s']} s (phases: {result.get('phases_s')})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not all(result["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
