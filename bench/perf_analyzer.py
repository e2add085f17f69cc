"""Triton's own load tool, perf_analyzer, against the service's Open Inference Protocol.

PyPI's `perf-analyzer` is an empty placeholder; the binary ships inside the `tritonclient[all]`
2.34.0 wheel (later wheels dropped it), and it loads libcudart 12 (from PyPI's
`nvidia-cuda-runtime-cu12`) and libb64 (Debian's `libb64-0d`) even on a CPU. This script
downloads both wheels with pip into a cache folder, starts the service (tests/live.py), feeds
perf_analyzer a real preprocessed image, and measures `<name>-encoder` at concurrency 1, 8 and
32 (binary tensors, its HTTP default).

    apt-get install libb64-0d && python -m bench.perf_analyzer [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from aecore.preprocessing import load_image
from aecore.runner import Autoencoder
from bench.common import arguments, machine, model_folder, request_jpeg, table, write_json
from tests.live import live_server

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convae-bench"
WHEELS = {
    "perf_analyzer": "tritonclient[all]==2.34.0",
    "libcudart.so.12": "nvidia-cuda-runtime-cu12",
}
CONCURRENCY = (1, 8, 32)


def tool() -> Path:
    """perf_analyzer and libcudart, extracted once from their PyPI wheels into CACHE."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, requirement in WHEELS.items():
        if (CACHE / name).exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64",
                 "-d", tmp, requirement], check=True,
            )  # fmt: skip
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                member = next(m for m in archive.namelist() if m.endswith("/" + name))
                (CACHE / name).write_bytes(archive.read(member))
        (CACHE / name).chmod(0o755)
    return CACHE / "perf_analyzer"


def run(seconds: float) -> dict:
    exe = tool()
    folder = model_folder()
    model = Autoencoder(folder, verify=False)
    image = load_image(request_jpeg().read_bytes(), model.spec)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, live_server() as server:
        data = Path(tmp) / "input.json"
        data.write_text(json.dumps({"data": [{"image": {"content": image.ravel().tolist(),
                                                         "shape": list(image.shape)}}]}))  # fmt: skip
        for concurrency in CONCURRENCY:  # this perf_analyzer sends binary tensors over HTTP
            report = Path(tmp) / f"c{concurrency}.csv"
            done = subprocess.run(
                [str(exe), "-m", f"{model.name}-encoder", "-u", server.base.removeprefix("http://"),
                 "-i", "http", "--input-data", str(data),
                 "--concurrency-range", f"{concurrency}:{concurrency}",
                 "-p", str(int(seconds * 1000)), "--max-trials", "6",
                 "--stability-percentage", "25", "-f", str(report)],
                check=False, capture_output=True, text=True,
                env={**os.environ, "LD_LIBRARY_PATH": str(CACHE)},
            )  # fmt: skip
            if not report.exists():  # it writes what it measured, even when a level is unstable
                raise RuntimeError(f"perf_analyzer failed:\n{done.stdout[-3000:]}{done.stderr}")
            for row in csv.DictReader(report.read_text().splitlines()):
                rows.append({
                    "tensors": "binary",
                    "concurrency": int(row["Concurrency"]),
                    "infer_per_s": round(float(row["Inferences/Second"]), 1),
                    "p50_ms": round(float(row["p50 latency"]) / 1000, 2),
                    "p99_ms": round(float(row["p99 latency"]) / 1000, 2),
                })  # fmt: skip
    return {"model": f"{model.name} v{model.version}", "tool": "perf_analyzer (tritonclient 2.34.0)",
            "runs": rows}  # fmt: skip


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], default_seconds=3.0)
    result = {"machine": machine(), **run(args.seconds)}
    columns = [("tensors", "tensors"), ("concurrency", "conc"), ("infer_per_s", "infer/s"),
               ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")]  # fmt: skip
    print(table(result["runs"], columns, f"perf_analyzer on {result['model']}'s encoder, batch 1"))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
