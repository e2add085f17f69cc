"""The GPU benchmark, one prepared run (`bench/gpu.sh`): on a machine with a GPU and no network.

1. The providers: what this onnxruntime build has, and what a session actually uses.
2. Raw onnxruntime: encoder img/s at batch 1 to 512, fp32 and fp16 (the model's fp16 graphs,
   or fp16 copies made here when the model predates them and onnxconverter-common is present).
3. The CPU-side limit: JPEG decode + preprocess img/s over every core (what JPEG bodies can
   feed at most, whatever the GPU does).
4. The service (a real uvicorn, `AE_WORKERS` processes) under load, with JPEG bodies and with
   .npy bodies of 32 preprocessed images, as fractions of 3. and of the raw GPU figure.

Writes gpu.json and gpu.md into --out ($OUT on the device machine). Never a GPU figure unless
the printed providers show CUDA or TensorRT in use: on a CPU-only machine the same script runs
its CPU path (how it is tested) and says so.

    python -m bench.gpu [--out DIR] [--seconds 3] [--workers 1 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from aecore import manifest
from aecore.graphs import default_threads
from aecore.preprocessing import load_image
from aecore.runner import Autoencoder
from bench.common import machine, model_folder, repeat, scene_jpegs, table
from bench.load import measure, run_loop, server

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers() -> dict:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    in_use = Autoencoder(model_folder(), wanted).providers
    return {"available": available, "in_use": in_use, "gpu": any(p in GPU for p in in_use)}


def fp16_folder(folder: Path, scratch: Path) -> tuple[Path | None, str]:
    """A folder with fp16 graphs: the model's own, or copies made here; else a reason."""
    if "fp16" in manifest.read(folder, verify=False).get("precisions", {}):
        return folder, "the model's fp16 graphs"
    try:
        from training.precision import write_fp16
    except ImportError as exc:
        return None, f"no fp16 graphs in the model and no converter here ({exc})"
    import shutil

    copy = scratch / folder.name
    shutil.copytree(folder, copy)
    body = manifest.read(copy, verify=False)
    images = np.stack([load_image(p.read_bytes(), Autoencoder(folder).spec) for p in scene_jpegs()])
    fp16 = write_fp16(copy, images[:8])
    body["precisions"] = {"fp32": {"encoder": "encoder", "decoder": "decoder"}, "fp16": fp16}
    parts = {**manifest.graph_files(body), "encoder_fp16": "encoder.fp16.onnx",
             "decoder_fp16": "decoder.fp16.onnx"}  # fmt: skip
    body["files"] = manifest.file_entries(copy, parts)
    manifest.write(copy, body)
    return copy, "fp16 copies made by this run (training/precision.py)"


def raw(folder: Path, precision: str, wanted: list[str], seconds: float) -> list[dict]:
    model = Autoencoder(folder, wanted, precision=precision)
    images = np.stack([load_image(p.read_bytes(), model.spec) for p in scene_jpegs()])
    rows = []
    for n in BATCHES:
        x = np.ascontiguousarray(np.resize(images, (n, *images.shape[1:])))
        stats = repeat(lambda x=x: model.encode(x), seconds, min_calls=3).stats(n)
        rows.append({"precision": precision, "batch": n, **stats})
    return rows


def decode_limit(seconds: float) -> dict:
    """JPEG decode + preprocess over every core: the most JPEG bodies can ever feed."""
    spec = Autoencoder(model_folder(), verify=False).spec
    blobs = [p.read_bytes() for p in scene_jpegs()]
    threads = default_threads()
    with ThreadPoolExecutor(threads) as pool:
        timing = repeat(lambda: list(pool.map(lambda b: load_image(b, spec), blobs)), seconds)
    return {"threads": threads, **timing.stats(len(blobs))}


def service(workers: int, seconds: float, on_gpu: bool) -> list[dict]:
    env = {"AE_WORKERS": str(workers), "AE_LOG_LEVEL": "warning"}
    if on_gpu:
        env["AE_REQUIRE_GPU"] = "true"
    rows = []
    with server(env) as srv:
        time.sleep(2 * workers)  # every worker loaded and warmed up, not only the first
        for body, concurrency in (("jpeg", 32), ("jpeg", 128), ("npy32", 4), ("npy32", 12)):
            result = run_loop(measure(srv, "encode", concurrency, seconds, body_kind=body))
            rows.append({"workers": workers, **result})
            print(f"  workers {workers} {body:5} c={concurrency:<3} {result['img_per_s']:8.1f} "
                  f"img/s  p50 {result['p50_ms']} ms  errors {result['errors']}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict = {"machine": machine(), "providers": providers()}
    on_gpu = result["providers"]["gpu"]
    print(f"providers: {result['providers']}", flush=True)
    if not on_gpu:
        print("NO GPU PROVIDER IN USE: this is the CPU path; no figure below is a GPU figure")
    wanted = result["providers"]["in_use"]
    folder = model_folder()
    rows = raw(folder, "fp32", wanted, args.seconds)
    with tempfile.TemporaryDirectory() as scratch:
        half, why = fp16_folder(folder, Path(scratch))
        result["fp16_source"] = why
        if half is not None:
            rows += raw(half, "fp16", wanted, args.seconds)
    result["raw"] = rows
    print(table(rows, [("precision", "prec"), ("batch", "batch"), ("img_per_s", "img/s"),
                       ("ms_per_call_p50", "ms/call")], "raw onnxruntime encoder"), flush=True)  # fmt: skip
    result["decode_limit"] = decode_limit(args.seconds)
    print(f"CPU decode limit: {result['decode_limit']['img_per_s']} img/s", flush=True)
    result["service"] = [r for w in args.workers for r in service(w, args.seconds, on_gpu)]
    best_raw = max(r["img_per_s"] for r in rows if r["precision"] == "fp32")
    for r in result["service"]:
        r["of_decode_limit"] = round(r["img_per_s"] / result["decode_limit"]["img_per_s"], 3)
        r["of_raw_fp32"] = round(r["img_per_s"] / best_raw, 3)
    result["total_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    from bench.markdown import md_table

    p = result["providers"]
    lines = [
        f"Providers available {p['available']}, in use {p['in_use']}"
        + ("" if p["gpu"] else " (**CPU path: not GPU figures**)"),
        f"; fp16: {result.get('fp16_source')}; whole run {result.get('total_s')} s.",
        "",
        md_table(result["raw"], [("precision", "precision"), ("batch", "batch"),
                                 ("img_per_s", "encoder img/s"), ("ms_per_call_p50", "ms/call")]),
        "",
        f"CPU-side JPEG decode + preprocess limit: {result['decode_limit']['img_per_s']} img/s "
        f"({result['decode_limit']['threads']} threads).",
        "",
        md_table(result["service"], [("workers", "workers"), ("body", "body"),
                                     ("concurrency", "conc"), ("img_per_s", "img/s"),
                                     ("p50_ms", "p50 ms"), ("of_decode_limit", "of decode limit"),
                                     ("of_raw_fp32", "of raw fp32"), ("errors", "errors")]),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
