"""Throughput over one image set, in one run: (a) the batch job on local Ray, (b) a
single-process loop over the same aecore code, (c) the running service over HTTP with
concurrent clients; plus per-core figures for decode and inference alone (for scaling on paper).

    python -m bench.batch --data ../shared/data/intel-scenes/train [--limit N] [--verb encode]
        [--clients 16] [--json bench/results/batch.json]

All three encode (or score) the same files, read from disk. Cores used: CPU seconds of the
work's processes (the Ray cluster's process tree, this process, or the server) over wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np

from aecore.anomaly import AnomalyScorers, Evidence
from aecore.runner import Autoencoder
from bench.common import machine, model_folder, model_record, table, write_json
from training.data import discover

CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")
IDLE_S = 10.0


class TreeCpu:
    """CPU seconds of this process's descendants (Ray's raylet, workers...), sampled so that
    processes which exit meanwhile still count up to their last sample."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def sample(self) -> None:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        mine = {os.getpid()}
        changed = True
        while changed:
            grown = {p for p, parent in parents.items() if parent in mine} | mine
            changed, mine = grown != mine, grown
        for pid in mine - {os.getpid()}:
            self.seen[pid] = max(self.seen.get(pid, 0.0), cpu[pid])

    def total(self) -> float:
        return sum(self.seen.values())


async def sampling(tree: TreeCpu, stop: asyncio.Event) -> None:
    while not stop.is_set():
        tree.sample()
        await asyncio.sleep(0.5)


def files(data: Path, limit: int | None) -> list[Path]:
    paths, _, _ = discover(data)
    if limit and limit < len(paths):  # every k-th file: all classes, spread out
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit)]
    return paths


def loop(paths: list[Path], verb: str, batch_size: int, threads: int | None) -> dict:
    """(b) one process: read, preprocess, encode (and decode + score) in batches."""
    model = Autoencoder(model_folder(), intra_op_threads=threads)
    scorers = AnomalyScorers(model.manifest["anomaly"], model.folder)
    cpu0, started = time.process_time(), time.perf_counter()
    for start in range(0, len(paths), batch_size):
        x = np.stack([model.preprocess(p.read_bytes()) for p in paths[start : start + batch_size]])
        z = model.encode(x)
        if verb == "score":
            scorers.score(scorers.default, Evidence(x, model.decode(z), z))
    wall = time.perf_counter() - started
    return result(f"(b) one process, {model.intra_op_threads} threads", len(paths), wall,
                  time.process_time() - cpu0)  # fmt: skip


def batch_job(paths: list[Path], verb: str, batch_size: int, workdir: Path) -> dict:
    """(a) `python -m batch` on local Ray with every core; Ray's start-up is timed apart."""
    from batch.job import Options, run, start_ray

    listing = workdir / "files.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in paths))  # a list is read from its folder
    tree = TreeCpu()
    started = time.perf_counter()
    start_ray()
    ray_start = time.perf_counter() - started
    tree.sample()
    idle0 = tree.total()
    time.sleep(IDLE_S)  # what Ray's own processes cost with nothing to do
    tree.sample()
    idle = (tree.total() - idle0) / IDLE_S
    before, driver0 = tree.total(), time.process_time()
    stop = asyncio.Event()

    async def go():
        sampler = asyncio.create_task(sampling(tree, stop))
        options = Options(verb, str(listing), str(workdir / "out"), model_folder(),
                          batch_size=batch_size, progress=False)  # fmt: skip
        summary = await asyncio.to_thread(run, options)
        stop.set()
        await sampler
        return summary

    summary = asyncio.run(go())
    tree.sample()
    cpu = tree.total() - before + time.process_time() - driver0  # workers, raylet, driver
    out = result("(a) batch job, Ray Data", summary.images_run, summary.seconds, cpu)
    out["ray_start_s"] = round(ray_start, 1)
    out["ray_idle_cores"] = round(idle, 3)
    out["failed"] = summary.failed
    return out


def service(paths: list[Path], verb: str, clients: int) -> dict:
    """(c) the service (tests/live.py's real `python -m service`), one image per request."""
    from tests.live import live_server

    endpoint = "/encode" if verb == "encode" else "/anomaly-score"
    headers = {"Accept": "application/x-npy"} if verb == "encode" else {}
    with live_server() as server:
        base, server_cpu = server.base, server.cpu_seconds

        async def go() -> tuple[float, float, float]:
            queue = iter(paths)
            limits = httpx.Limits(max_connections=clients)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:

                async def worker() -> None:
                    for path in queue:
                        files = {"images": (path.name, path.read_bytes(), "image/jpeg")}
                        reply = await client.post(endpoint, files=files, headers=headers)
                        reply.raise_for_status()

                await client.post(endpoint, files={"images": paths[0].read_bytes()})  # warm
                cpu0, client0, started = server_cpu(), time.process_time(), time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(clients)))
                wall = time.perf_counter() - started
                return wall, server_cpu() - cpu0, time.process_time() - client0

        wall, server_s, client_s = asyncio.run(go())
    out = result(f"(c) service over HTTP, {clients} clients", len(paths), wall, server_s + client_s)
    out["server_cpu_s"], out["client_cpu_s"] = round(server_s, 1), round(client_s, 1)
    return out


def per_core(paths: list[Path], batch_size: int) -> list[dict]:
    """Decode + preprocess alone, and the encoder and decoder alone, on one thread: CPU time,
    so the figure is a core's capacity whatever else runs on the machine."""
    model = Autoencoder(model_folder(), intra_op_threads=1)  # runs on the calling thread
    blobs = [p.read_bytes() for p in paths]
    x, decode = timed(lambda: np.stack([model.preprocess(b) for b in blobs]))
    z, encode = timed(lambda: model.encode_all(x, batch_size))
    _, decoder = timed(lambda: model.decode_all(z, batch_size))
    return [
        result("JPEG decode + preprocess, 1 thread", len(blobs), *decode),
        result(f"encoder, batch {batch_size}, 1 thread", len(blobs), *encode),
        result(f"decoder, batch {batch_size}, 1 thread", len(blobs), *decoder),
    ]


def timed(step: Callable[[], T]) -> tuple[T, tuple[float, float]]:
    """The step's value and its (wall, CPU) seconds."""
    cpu0, started = time.process_time(), time.perf_counter()
    value = step()
    return value, (time.perf_counter() - started, time.process_time() - cpu0)


def result(name: str, images: int, wall: float, cpu: float) -> dict:
    return {
        "what": name,
        "images": images,
        "seconds": round(wall, 2),
        "img_per_s": images / wall,
        "cores_used": round(cpu / wall, 2),
        "img_per_cpu_s": images / cpu,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="image folder (class folders)")
    parser.add_argument("--limit", type=int, help="use this many images, spread over the set")
    parser.add_argument("--verb", choices=("encode", "score"), default="encode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-core-images", type=int, default=600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = files(args.data, args.limit)
    record = {"machine": machine(), "model": model_record(model_folder()), "verb": args.verb,
              "data": args.data.name, "images": len(paths)}  # fmt: skip
    print(record["machine"], flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as workdir:
        rows.append(batch_job(paths, args.verb, args.batch_size, Path(workdir)))
        print(rows[-1], flush=True)
    rows.append(loop(paths, args.verb, args.batch_size, None))
    print(rows[-1], flush=True)
    rows.append(service(paths, args.verb, args.clients))
    print(rows[-1], flush=True)
    rows += per_core(paths[: args.per_core_images], args.batch_size)
    record["results"] = rows
    record["load_after"] = [round(x, 2) for x in os.getloadavg()]
    columns = [("what", "what"), ("images", "images"), ("seconds", "s"),
               ("img_per_s", "img/s"), ("cores_used", "cores used"),
               ("img_per_cpu_s", "img per CPU-s"), ("load_before", "load")]  # fmt: skip
    print(table(rows, columns, f"{args.verb}, {len(paths)} images of {args.data.name}"), flush=True)
    write_json(args.json, record)


if __name__ == "__main__":
    main()
