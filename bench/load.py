"""The service under load: a real uvicorn process and this process as the load generator.

`python -m service --host 127.0.0.1 --port P` runs with the model the service would serve
(AE_ settings from the environment, plus AE_MAX_BATCH_SIZE=1 for "batching off"). Closed-loop
clients (httpx + asyncio) each keep one single-image multipart request in flight: encode and
reconstruct at concurrency 1, 8, 32 and 64, batching on and off. Reported per run: img/s,
p50/p95/p99 latency, errors, the mean encoder batch size (from /metrics deltas over the
measured window), and the CPU the server and the load generator used.

    python -m bench.load [--seconds 8] [--json out.json]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import numpy as np

from bench.common import (
    REPO,
    arguments,
    machine,
    model_folder,
    model_record,
    request_jpeg,
    table,
    write_json,
)
from tests.live import LiveServer, live_server

CONCURRENCY = (1, 8, 32, 64)
ENDPOINTS = ("encode", "reconstruct")
MODES = {"on": {}, "off": {"AE_MAX_BATCH_SIZE": "1"}}  # batching on = the service's defaults
WARMUP_S = 1.5


# -- the server --------------------------------------------------------------------------------
@contextlib.contextmanager
def server(env: dict[str, str], argv: list[str] | None = None) -> Iterator[LiveServer]:
    """The service as bench measures it: the model it would serve, this environment's `AE_*`
    settings, then `env`; `argv` replaces `python -m service` (e.g. a patched service)."""
    folder = model_folder()
    settings = {
        **{k: v for k, v in os.environ.items() if k.startswith("AE_")},
        "AE_MODEL_DIR": str(folder.parent.parent),
        "AE_MODEL_NAME": folder.parent.name,
        "AE_MODEL_VERSION": folder.name,
        **env,
    }
    with live_server(settings, argv) as srv:
        yield srv


# -- /metrics ----------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels exactly as the server wrote them)."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def metric_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return after.get(key, 0.0) - before.get(key, 0.0)


def window_metrics(before: dict, after: dict, endpoint: str, seconds: float) -> dict:
    """What the server saw during the measured window, from counter deltas."""
    out = {}
    for part in ("encoder", "decoder"):
        count = metric_delta(before, after, "ae_batch_size_count", part=part)
        if count <= 0:
            continue
        rows = metric_delta(before, after, "ae_batch_size_sum", part=part)
        busy = metric_delta(before, after, "ae_inference_duration_seconds_sum", part=part)
        wait = metric_delta(before, after, "ae_queue_wait_seconds_sum", part=part)
        waits = metric_delta(before, after, "ae_queue_wait_seconds_count", part=part)
        out[part] = {
            "batches": int(count),
            "mean_batch": round(rows / count, 2),
            "mean_inference_ms": round(1000 * busy / count, 2),
            "busy_fraction": round(busy / seconds, 3),  # share of the window ORT was running
            "mean_queue_wait_ms": round(1000 * wait / waits, 2) if waits else None,
        }
    path = f"/{endpoint}"
    n = metric_delta(before, after, "ae_request_duration_seconds_count", endpoint=path)
    total = metric_delta(before, after, "ae_request_duration_seconds_sum", endpoint=path)
    out["server_mean_ms"] = round(1000 * total / n, 2) if n else None
    return out


# -- the load generator ------------------------------------------------------------------------
def request_body(url: str, jpeg: bytes) -> tuple[bytes, dict[str, str]]:
    """One multipart body with a real JPEG as the `images` file field, built once."""
    request = httpx.Request("POST", url, files={"images": ("scene.jpg", jpeg, "image/jpeg")})
    return request.read(), {"content-type": request.headers["content-type"]}


def check_reply(endpoint: str, reply: httpx.Response) -> None:
    """The service answers the benchmark's request properly before it is timed."""
    reply.raise_for_status()
    body = reply.json()
    if endpoint == "encode":
        assert len(body["latents"]) == 1 and len(body["latents"][0]) > 0, body.keys()
    else:
        assert len(body["images"]) == 1 and len(body["mse"]) == 1, body.keys()


async def measure(
    srv: LiveServer,
    endpoint: str,
    concurrency: int,
    seconds: float,
    warmup: float = WARMUP_S,
    during: Callable[[], Awaitable[object]] | None = None,
) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when one returns.

    `during`, when given, runs over the measured window (a profiler, say), which lasts at
    least `seconds` and until it returns.
    """
    url = f"{srv.base}/{endpoint}"
    body, headers = request_body(url, request_jpeg().read_bytes())
    done: list[tuple[float, float, int]] = []  # (sent, answered, status or -1 for a failure)
    failures: dict[str, int] = {}
    stop = asyncio.Event()
    # One client (one keep-alive connection) per virtual user, as independent callers would
    # be: a single shared httpx pool costs the load generator 4-8 ms of CPU per request at
    # concurrency 32-64 (its pool is scanned under a lock), against under 1 ms this way.
    async with contextlib.AsyncExitStack() as stack:
        users = [
            await stack.enter_async_context(httpx.AsyncClient(timeout=120.0))
            for _ in range(concurrency)
        ]
        control = await stack.enter_async_context(httpx.AsyncClient(timeout=30.0))
        check_reply(endpoint, await control.post(url, content=body, headers=headers))

        async def one_user(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                sent = time.perf_counter()
                try:
                    reply = await client.post(url, content=body, headers=headers)
                    status = reply.status_code
                except httpx.HTTPError as exc:
                    status = -1
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                done.append((sent, time.perf_counter(), status))

        tasks = [asyncio.create_task(one_user(client)) for client in users]
        await asyncio.sleep(warmup)
        before = parse_metrics((await control.get(f"{srv.base}/metrics")).text)
        cpu0, own0, t0 = srv.cpu_seconds(), time.process_time(), time.perf_counter()
        await asyncio.gather(asyncio.sleep(seconds), *([during()] if during else []))
        t1, cpu1, own1 = time.perf_counter(), srv.cpu_seconds(), time.process_time()
        after = parse_metrics((await control.get(f"{srv.base}/metrics")).text)
        stop.set()
        await asyncio.gather(*tasks)

    window = [d for d in done if t0 <= d[1] < t1]
    ok = np.asarray([end - sent for sent, end, status in window if status == 200]) * 1000
    errors = [status for _, _, status in window if status != 200]
    elapsed = t1 - t0
    pct = np.percentile(ok, [50, 95, 99]) if len(ok) else [None] * 3
    return {
        "endpoint": endpoint,
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": len(window),
        "img_per_s": round(len(ok) / elapsed, 2),
        "p50_ms": None if pct[0] is None else round(float(pct[0]), 2),
        "p95_ms": None if pct[1] is None else round(float(pct[1]), 2),
        "p99_ms": None if pct[2] is None else round(float(pct[2]), 2),
        "errors": len(errors),
        "error_statuses": {str(s): errors.count(s) for s in sorted(set(errors))} or None,
        "failures": failures or None,
        # Cores in use over the window: 1.0 is one core busy the whole time.
        "server_cores": round((cpu1 - cpu0) / elapsed, 2),
        "loadgen_cores": round((own1 - own0) / elapsed, 2),
        # CPU per answered image: what one image costs the machine, whatever else runs on it.
        "server_cpu_ms_per_img": round(1000 * (cpu1 - cpu0) / len(ok), 2) if len(ok) else None,
        "loadgen_cpu_ms_per_img": round(1000 * (own1 - own0) / len(ok), 2) if len(ok) else None,
        **window_metrics(before, after, endpoint, elapsed),
    }


def run_loop(coro):
    """asyncio.run, on uvloop when it is installed (it is with uvicorn[standard]): a cheaper
    load generator leaves more of the shared cores to the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(
    seconds: float,
    modes: dict[str, dict[str, str]] = MODES,
    endpoints: tuple[str, ...] = ENDPOINTS,
    concurrency: tuple[int, ...] = CONCURRENCY,
    echo=print,
) -> dict:
    runs = []
    settings = {}
    for mode, env in modes.items():
        with server(env) as srv:
            card = httpx.get(f"{srv.base}/model", timeout=10).json()
            settings[mode] = {
                "env": env,
                "batching": card.get("batching"),
                "providers": card.get("providers"),
                "intra_op_threads": card.get("intra_op_threads"),
            }
            for endpoint in endpoints:
                for c in concurrency:
                    result = {"batching": mode, **run_loop(measure(srv, endpoint, c, seconds))}
                    runs.append(result)
                    echo(
                        f"  batching {mode:3} {endpoint:11} c={c:<3} {result['img_per_s']:7.1f} "
                        f"img/s  p99 {result['p99_ms'] or 0:8.1f} ms  batch "
                        f"{result.get('encoder', {}).get('mean_batch', '-')}  errors "
                        f"{result['errors']}",
                        flush=True,
                    )
    return {
        "model": model_record(model_folder()),
        "request_jpeg": str(request_jpeg().relative_to(REPO)),
        "warmup_s": WARMUP_S,
        "settings": settings,
        "runs": runs,
    }


def report(result: dict) -> str:
    rows = [
        {
            **r,
            "mean_batch": r.get("encoder", {}).get("mean_batch"),
            "enc_busy": r.get("encoder", {}).get("busy_fraction"),
        }
        for r in result["runs"]
    ]
    columns = [
        ("batching", "batching"),
        ("endpoint", "endpoint"),
        ("concurrency", "conc"),
        ("img_per_s", "img/s"),
        ("p50_ms", "p50 ms"),
        ("p95_ms", "p95 ms"),
        ("p99_ms", "p99 ms"),
        ("errors", "errors"),
        ("mean_batch", "enc batch"),
        ("enc_busy", "enc busy"),
        ("server_cores", "srv cores"),
        ("loadgen_cores", "gen cores"),
        ("server_cpu_ms_per_img", "srv CPU ms/img"),
        ("loadgen_cpu_ms_per_img", "gen CPU ms/img"),
    ]
    return table(rows, columns, "Service under load (single-image multipart requests, loopback)")


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], default_seconds=8.0)
    result = {"machine": machine(), **run(args.seconds)}
    print(report(result), flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
