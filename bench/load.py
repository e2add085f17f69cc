"""The service under load: a real uvicorn process, and wrk (or this process) as load generator.

`python -m service --host 127.0.0.1 --port P` runs with the model the service would serve
(AE_ settings from the environment, plus AE_MAX_BATCH_SIZE=1 for "batching off"). Closed-loop
clients each keep one single-image multipart request in flight: encode and reconstruct at
concurrency 1, 8, 32 and 64, batching on and off. Reported per run: img/s, p50/p95/p99
latency, errors, the mean encoder batch size (from /metrics deltas over the measured window),
and the CPU the server and the load generator used.

The load generator is wrk when it is on PATH (C; one thread and one keep-alive connection per
virtual user; bench/wrk_post.lua logs each request): about 0.1 ms of CPU per request, where the
fallback, httpx + asyncio in this process (the GPU machine has no wrk), costs about 1 ms, and on
a 2-core machine the load generator's CPU is taken from the server under test. Either way the
load runs without a break from its warm-up through the measured window, and the window counts
the replies that came in within it. `--client` chooses; each result records which ran.

    python -m bench.load [--seconds 8] [--json out.json] [--client auto|wrk|httpx]
    python -m bench.load --scaling     # AE_WORKERS x AE_INTRA_OP_THREADS, encode c=32
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np

from aecore.graphs import default_threads
from aecore.preprocessing import load_rgb8
from aecore.runner import Autoencoder
from bench.common import (
    REPO,
    arguments,
    machine,
    model_folder,
    model_record,
    request_jpeg,
    scene_jpegs,
    table,
    write_json,
)
from tests.live import LiveServer, live_server, metric

CONCURRENCY = (1, 8, 32, 64)
ENDPOINTS = ("encode", "reconstruct")
CORES = default_threads()
# batching on = the service's defaults; "workers": one worker process per core, each with one
# onnxruntime thread (AE_WORKERS, as the Kubernetes manifest runs), for throughput on a CPU.
MODES = {
    "on": {},
    "off": {"AE_MAX_BATCH_SIZE": "1"},
    "workers": {"AE_WORKERS": str(CORES), "AE_INTRA_OP_THREADS": "1"},
}
SERVERS = {"on": "batching on", "off": "batching off", "workers": f"{CORES} workers x 1"}
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


# -- /metrics ---------------------------------------------------------------------------------
def metric_delta(before: str, after: str, name: str, **labels: str) -> float:
    """How much a metric grew between two /metrics texts (summed over other labels, such as
    the model and version of every batcher)."""
    return metric(after, name, **labels) - metric(before, name, **labels)


def window_metrics(before: str, after: str, endpoint: str, seconds: float) -> dict:
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
# How a request carries its images: (images per request, how to build the body once).
BODIES = ("multipart", "jpeg", "npy32")
NPY_IMAGES = 32


def request_body(url: str, kind: str = "multipart") -> tuple[bytes, dict[str, str], int]:
    """One request body, built once: (bytes, headers, images in it).

    multipart: the real JPEG as the `images` file field; jpeg: the same file as the whole body
    (`Content-Type: image/jpeg`); npy32: 32 preprocessed uint8 images in one .npy, as a client
    that decodes video frames itself would send them.
    """
    jpeg = request_jpeg().read_bytes()
    if kind == "jpeg":
        return jpeg, {"content-type": "image/jpeg"}, 1
    if kind == "npy32":
        spec = Autoencoder(model_folder(), verify=False).spec
        frames = np.stack([load_rgb8(p.read_bytes(), spec) for p in scene_jpegs()])
        buf = io.BytesIO()
        np.save(buf, np.resize(frames, (NPY_IMAGES, *frames.shape[1:])))
        return buf.getvalue(), {"content-type": "application/x-npy"}, NPY_IMAGES
    request = httpx.Request("POST", url, files={"images": ("scene.jpg", jpeg, "image/jpeg")})
    return request.read(), {"content-type": request.headers["content-type"]}, 1


def check_reply(endpoint: str, reply: httpx.Response, images: int) -> None:
    """The service answers the benchmark's request properly before it is timed."""
    reply.raise_for_status()
    body = reply.json()
    if endpoint == "encode":
        assert len(body["latents"]) == images and len(body["latents"][0]) > 0, body.keys()
    else:
        assert len(body["images"]) == images and len(body["mse"]) == images, body.keys()


async def onnxruntime_threads(srv: LiveServer) -> set[int]:
    """The server's threads that run onnxruntime: each batcher's inference thread (`ort-*`)
    and the native threads no Python runs in (onnxruntime's intra-op pools), per `py-spy dump`.
    Empty when py-spy cannot attach (then no front-end figure is given)."""
    found: set[int] = set()
    for pid in srv.pids():
        names = await thread_names(pid)
        if not names:
            return set()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                tid = int(task.name)
                if tid not in names or names[tid].startswith("ort-"):
                    found.add(tid)
    return found


async def thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from `py-spy dump` (empty if it fails)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return {}
    proc = await asyncio.create_subprocess_exec(
        exe, "dump", "--pid", str(pid), "--nonblocking",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    text, _ = await proc.communicate()
    names = {}
    for match in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', text.decode(), re.M):
        names[int(match.group(1))] = match.group(2)
    return names


async def measure(
    srv: LiveServer,
    endpoint: str,
    concurrency: int,
    seconds: float,
    warmup: float = WARMUP_S,
    during: Callable[[], Awaitable[object]] | None = None,
    body_kind: str = "multipart",
    client: str | None = None,
) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when one returns.

    `during`, when given, runs over the measured window (a profiler, say), which lasts at
    least `seconds` and until it returns. `client` is the load generator: "wrk", "httpx", or
    None (or "auto") for wrk when it is on PATH, else httpx.
    """
    if load_client(client) == "wrk":
        return await measure_wrk(srv, endpoint, concurrency, seconds, warmup, during, body_kind)
    url = f"{srv.base}/{endpoint}"
    body, headers, per_request = request_body(url, body_kind)
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
        check_reply(endpoint, await control.post(url, content=body, headers=headers), per_request)

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
        ort_threads = await onnxruntime_threads(srv)
        before = (await control.get(f"{srv.base}/metrics")).text
        threads0, own0, t0 = srv.thread_cpu_seconds(), time.process_time(), time.perf_counter()
        await asyncio.gather(asyncio.sleep(seconds), *([during()] if during else []))
        t1, threads1, own1 = time.perf_counter(), srv.thread_cpu_seconds(), time.process_time()
        after = (await control.get(f"{srv.base}/metrics")).text
        stop.set()
        await asyncio.gather(*tasks)

    return summarise(
        "httpx", endpoint, body_kind, concurrency, per_request, done, (t0, t1),
        failures=failures,
        server_cpu=(threads0, threads1, ort_threads),
        loadgen_cpu=own1 - own0,
        metrics=(before, after),
    )  # fmt: skip


def summarise(
    client: str,
    endpoint: str,
    body_kind: str,
    concurrency: int,
    per_request: int,
    done: list[tuple[float, float, int]],
    window: tuple[float, float],
    *,
    failures: dict[str, int],
    server_cpu: tuple[dict[int, float], dict[int, float], set[int]],
    loadgen_cpu: float | None,
    metrics: tuple[str, str],
) -> dict:
    """One measured run as every caller reads it, whichever client generated the load: the
    requests `done` (sent, answered, status or -1 for a failure) answered in `window`
    (t0, t1 on the clock `done` uses), `server_cpu` (thread CPU at t0, at t1, onnxruntime's
    threads), the load generator's CPU over the window (None: unknown) and the /metrics texts
    at t0 and t1."""
    t0, t1 = window
    window_done = [d for d in done if t0 <= d[1] < t1]
    ok = np.asarray([end - sent for sent, end, status in window_done if status == 200]) * 1000
    errors = [status for _, _, status in window_done if status != 200]
    elapsed = t1 - t0
    images = len(ok) * per_request
    pct = np.percentile(ok, [50, 95, 99]) if len(ok) else [None] * 3
    threads0, threads1, ort_threads = server_cpu
    used = {tid: cpu - threads0.get(tid, 0.0) for tid, cpu in threads1.items()}
    server, ort = sum(used.values()), sum(used.get(t, 0.0) for t in ort_threads)

    def per_image(cpu: float | None) -> float | None:
        return round(1000 * cpu / images, 3) if images and cpu is not None else None

    return {
        "endpoint": endpoint,
        "body": body_kind,
        "concurrency": concurrency,
        "client": client,
        "seconds": round(elapsed, 2),
        "requests": len(window_done),
        "img_per_s": round(images / elapsed, 2),
        "p50_ms": None if pct[0] is None else round(float(pct[0]), 2),
        "p95_ms": None if pct[1] is None else round(float(pct[1]), 2),
        "p99_ms": None if pct[2] is None else round(float(pct[2]), 2),
        "errors": len(errors),
        "error_statuses": {str(s): errors.count(s) for s in sorted(set(errors))} or None,
        "failures": failures or None,
        # Cores in use over the window: 1.0 is one core busy the whole time.
        "server_cores": round(server / elapsed, 2),
        "loadgen_cores": None if loadgen_cpu is None else round(loadgen_cpu / elapsed, 2),
        # CPU per answered image: what one image costs the machine, whatever else runs on it;
        # the front end is everything the server spends outside onnxruntime's threads.
        "server_cpu_ms_per_img": per_image(server),
        "frontend_cpu_ms_per_img": per_image(server - ort) if ort_threads else None,
        "loadgen_cpu_ms_per_img": per_image(loadgen_cpu),
        **window_metrics(*metrics, endpoint, elapsed),
    }


# -- wrk as the load generator -----------------------------------------------------------------
WRK_SCRIPT = Path(__file__).resolve().with_name("wrk_post.lua")
WRK_TIMEOUT_S = 60  # an .npy body of 32 images takes ~0.6 s at c=8 on 2 cores; never cut short
WRK_MIN_S = 0.2  # wrk takes SIGINT as "stop and report" only once it has started its threads
CLIENTS = ("auto", "wrk", "httpx")


def load_client(client: str | None = None) -> str:
    """The load generator `measure` uses: wrk when asked for or, by default, when it is on PATH
    (it is not on the GPU machine); httpx otherwise."""
    if client in (None, "auto"):
        return "wrk" if shutil.which("wrk") else "httpx"
    if client not in CLIENTS:
        raise ValueError(f"unknown load generator {client!r}: one of {', '.join(CLIENTS)}")
    if client == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("wrk is not on PATH (apt-get install wrk), use --client httpx")
    return client


def process_cpu_seconds(pid: int) -> float | None:
    """CPU a running process has used, all its threads: the scheduler's nanosecond count per
    thread, else /proc/PID/stat in clock ticks; None once it is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def measure_wrk(
    srv: LiveServer,
    endpoint: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    during: Callable[[], Awaitable[object]] | None,
    body_kind: str,
) -> dict:
    """`measure` with wrk generating the load: the same body, checked the same way, and one
    continuous wrk run (one thread per connection, bench/wrk_post.lua) that logs every request;
    after `warmup` seconds the window is measured exactly as on the httpx path (server thread
    CPU and /metrics at its ends, `during` over it, the replies that came in within it), and
    the load generator's CPU is wrk's own over the window."""
    url = f"{srv.base}/{endpoint}"
    body, headers, per_request = request_body(url, body_kind)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as scratch:
        body_file = Path(scratch) / "body"
        body_file.write_bytes(body)
        async with httpx.AsyncClient(timeout=30.0) as control:
            check_reply(
                endpoint, await control.post(url, content=body, headers=headers), per_request
            )
            proc = await asyncio.create_subprocess_exec(
                shutil.which("wrk") or "wrk", f"-t{concurrency}", f"-c{concurrency}", "-d3600s",
                "--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(WRK_SCRIPT),
                url, str(body_file), headers["content-type"],
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            started = time.monotonic()
            try:
                await asyncio.sleep(warmup)
                ort_threads = await onnxruntime_threads(srv)
                before = (await control.get(f"{srv.base}/metrics")).text
                threads0, own0 = srv.thread_cpu_seconds(), process_cpu_seconds(proc.pid)
                t0 = time.monotonic()
                await asyncio.gather(asyncio.sleep(seconds), *([during()] if during else []))
                t1, threads1 = time.monotonic(), srv.thread_cpu_seconds()
                own1 = process_cpu_seconds(proc.pid)
                after = (await control.get(f"{srv.base}/metrics")).text
                await asyncio.sleep(max(0.0, started + WRK_MIN_S - time.monotonic()))
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)  # wrk stops, and its done() reports
                out, err = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    summary, done = None, []
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("wrk-request "):
            sent, answered, status = line.split()[1:]
            done.append((float(sent), float(answered), int(status)))
        elif line.startswith("wrk-summary "):
            summary = json.loads(line.removeprefix("wrk-summary "))
    if summary is None:
        tail = (out[-1000:] + err[-1000:]).decode(errors="replace")
        raise RuntimeError(f"wrk gave no report (exit {proc.returncode}): {tail}")
    # Socket errors over the whole run, by wrk's kinds (as the httpx path counts exceptions).
    failures = {k: summary[k] for k in ("connect", "read", "write", "timeout") if summary[k]}
    return summarise(
        "wrk", endpoint, body_kind, concurrency, per_request, done, (t0, t1),
        failures=failures,
        server_cpu=(threads0, threads1, ort_threads),
        loadgen_cpu=None if own0 is None or own1 is None else own1 - own0,
        metrics=(before, after),
    )  # fmt: skip


def run_loop(coro):
    """asyncio.run, on uvloop when it is installed (it is with uvicorn[standard]): a cheaper
    load generator leaves more of the shared cores to the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# (batching mode, endpoint, body) measured at every concurrency: every body on the main path,
# the rest with single-image multipart requests.
PLAN = (
    ("on", "encode", "multipart"),
    ("on", "encode", "jpeg"),
    ("on", "encode", "npy32"),
    ("on", "reconstruct", "multipart"),
    ("off", "encode", "multipart"),
    ("off", "reconstruct", "multipart"),
    *((("workers", "encode", "multipart"), ("workers", "encode", "jpeg")) if CORES > 1 else ()),
)
NAIVE = [sys.executable, "-m", "bench.naive"]


def run(
    seconds: float,
    modes: dict[str, dict[str, str]] = MODES,
    plan: tuple[tuple[str, str, str], ...] = PLAN,
    concurrency: tuple[int, ...] = CONCURRENCY,
    naive: tuple[int, ...] = (1, 32),
    echo=print,
    client: str | None = None,
) -> dict:
    """Every (mode, endpoint, body) of `plan` at every concurrency, then the naive app
    (bench/naive.py: one onnxruntime call per request, no batching) at `naive` concurrencies;
    `client` is the load generator (see `measure`)."""
    runs, settings, client = [], {}, load_client(client)

    def record(result: dict) -> None:
        runs.append(result)
        echo(
            f"  {result['client']:5} {result['server']:13} {result['endpoint']:11} "
            f"{result['body']:9} c={result['concurrency']:<3} {result['img_per_s']:7.1f} img/s  "
            f"p50 {result['p50_ms'] or 0:7.1f} ms  p99 {result['p99_ms'] or 0:8.1f} ms  "
            f"front end {result['frontend_cpu_ms_per_img']} ms/img  errors {result['errors']}",
            flush=True,
        )

    for mode, env in modes.items():
        todo = [(endpoint, body) for m, endpoint, body in plan if m == mode]
        if not todo:
            continue
        with server(env) as srv:
            card = httpx.get(f"{srv.base}/model", timeout=10).json()
            settings[mode] = {
                "env": env,
                "batching": card.get("batching"),
                "providers": card.get("providers"),
                "intra_op_threads": card.get("intra_op_threads"),
            }
            queue = (card.get("batching") or {}).get("max_queue_size", 512)
            for endpoint, body in todo:
                for c in concurrency:
                    if body == "npy32" and c * NPY_IMAGES > queue:
                        continue  # more images in flight than the queue holds: only 429s
                    result = run_loop(
                        measure(srv, endpoint, c, seconds, body_kind=body, client=client)
                    )
                    server_name = SERVERS.get(mode, f"batching {mode}")
                    record({"server": server_name, "batching": mode, **result})
    if naive:
        with server({}, argv=NAIVE) as srv:
            for c in naive:
                result = run_loop(measure(srv, "encode", c, seconds, client=client))
                record({"server": "naive FastAPI", "batching": "naive", **result})
    return {
        "model": model_record(model_folder()),
        "request_jpeg": str(request_jpeg().relative_to(REPO)),
        "warmup_s": WARMUP_S,
        "client": client,
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
        ("server", "server"),
        ("endpoint", "endpoint"),
        ("body", "body"),
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
        ("frontend_cpu_ms_per_img", "front end ms/img"),
        ("loadgen_cpu_ms_per_img", "gen CPU ms/img"),
    ]
    client = result.get("client", "httpx")  # a result from before wrk: httpx
    title = f"Service under load (loopback, load generator {client}; body: how images are sent)"
    return table(rows, columns, title)


def scaling(seconds: float, cores: int, client: str | None = None) -> dict:
    """Worker processes x onnxruntime threads per worker, up to the cores this machine has:
    /encode with one JPEG per request at concurrency 32."""
    grid = [(w, t) for w in (1, 2, 4) for t in (1, 2, 4) if w * t <= max(cores, 2)]
    modes = {f"{w}x{t}": {"AE_WORKERS": str(w), "AE_INTRA_OP_THREADS": str(t)} for w, t in grid}
    plan = tuple((mode, "encode", "jpeg") for mode in modes)
    return run(seconds, modes=modes, plan=plan, concurrency=(32,), naive=(), client=client)


def main() -> None:
    args = arguments(
        __doc__.split("\n\n")[0],
        default_seconds=8.0,
        flags=("--scaling",),
        choices={"--client": CLIENTS},
    )
    if args.scaling:
        result = {"machine": machine(), **scaling(args.seconds, os.cpu_count() or 1, args.client)}
    else:
        result = {"machine": machine(), **run(args.seconds, client=args.client)}
    print(report(result), flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
