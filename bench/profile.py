"""Profile the service under load: py-spy record against the uvicorn process while the load runs.

    python -m bench.profile [--endpoint encode] [--concurrency 32] [--seconds 10]
                            [--env AE_MAX_BATCH_SIZE=1 ...] [--native] [--out DIR]

Starts `python -m service` as bench.load does, drives it with the same closed-loop load, and
samples it with py-spy (`pip install py-spy`, in the dev extra). Writes the collapsed stacks
(`profile.txt`, for flamegraph.pl or speedscope) into --out, and prints where the samples went: by thread, and the hottest functions of each.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO
from bench.load import measure, run_loop, server, thread_names
from tests.live import LiveServer

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy (it is in the dev extra)")
    return exe


async def record(pid: int, seconds: float, out: Path, native: bool, rate: int) -> None:
    common = ["--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate)]
    common += ["--threads", "--nonblocking", *(["--native"] if native else [])]
    proc = await asyncio.create_subprocess_exec(
        py_spy(), "record", *common, "--format", "raw", "-o", str(out / "profile.txt"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")


async def cpu_by_thread(srv: LiveServer, seconds: float, into: dict, names: dict) -> None:
    """CPU of each server thread over `seconds`, grouped by Python thread name (`names`, from
    `thread_names`); threads that run no Python (onnxruntime's intra-op pool) are `native`."""
    before, t0 = srv.thread_cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    after, elapsed = srv.thread_cpu_seconds(), time.perf_counter() - t0
    groups: collections.Counter = collections.Counter()
    for tid, cpu in after.items():
        name = re.sub(r"_\d+$", "_*", names.get(tid, "native (onnxruntime intra-op pool)"))
        groups[name] += cpu - before.get(tid, 0.0)
    into.update({name: cpu / elapsed for name, cpu in groups.items()})


def summarise(collapsed: Path, top: int = 12) -> str:
    """Samples by thread, then each busy thread's hottest functions (self and inclusive)."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread, frames, n = frames[0], frames[1:], int(count)
        totals[thread] += n
        if frames:
            threads[thread][_short(frames[-1])] += n
            for name in {_short(f) for f in frames}:
                inclusive[thread][name] += n
    grand = sum(totals.values()) or 1
    lines = [f"{grand} samples (on-CPU; py-spy without --idle)"]
    for thread, n in totals.most_common():
        if n / grand < 0.02:
            continue
        lines.append(f"\n{thread}: {100 * n / grand:.1f}% of samples")
        lines.append("  self:")
        lines += [
            f"    {100 * c / n:5.1f}%  {name}" for name, c in threads[thread].most_common(top)
        ]
        lines.append("  inclusive:")
        lines += [
            f"    {100 * c / n:5.1f}%  {name}" for name, c in inclusive[thread].most_common(top)
        ]
    return "\n".join(lines)


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    where = match.group("where")
    for marker in ("site-packages/", f"{REPO}/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{match.group('func')} ({where.rsplit(':', 1)[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", default="encode", choices=("encode", "reconstruct"))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--env", nargs="*", default=[], help="AE_ settings for the server")
    parser.add_argument("--native", action="store_true", help="include native (C/C++) frames")
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "convae-bench-profile"
    )
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    args.out.mkdir(parents=True, exist_ok=True)
    cores: dict[str, float] = {}
    with server(env) as srv:

        async def during() -> None:
            names = await thread_names(srv.proc.pid)  # first: py-spy cannot attach twice
            await asyncio.gather(
                record(srv.proc.pid, args.seconds, args.out, args.native, args.rate),
                cpu_by_thread(srv, args.seconds, cores, names),
            )

        result = run_loop(
            measure(srv, args.endpoint, args.concurrency, args.seconds, during=during)
        )
    ips = result["img_per_s"]
    print(
        f"{args.endpoint} c={args.concurrency} {env or ''}: {ips} img/s, "
        f"p99 {result['p99_ms']} ms, encoder batch {result.get('encoder', {}).get('mean_batch')}, "
        f"server {result['server_cores']} cores, load generator ({result['client']}) "
        f"{result['loadgen_cores']} cores"
    )
    print("\nserver CPU by thread (cores; CPU ms per image):")
    for name, c in sorted(cores.items(), key=lambda kv: -kv[1]):
        if c > 0.005:
            print(f"  {c:5.2f}  {1000 * c / ips if ips else 0:6.2f} ms  {name}")
    print()
    print(summarise(args.out / "profile.txt"))
    print(f"\ncollapsed stacks: {args.out / 'profile.txt'}")


if __name__ == "__main__":
    main()
