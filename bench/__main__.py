"""`python -m bench` (`make bench`): every section in one run, one JSON, the target ratios.

Sections run one after another, each in its own process so that nothing of one (onnxruntime
sessions, TensorFlow's thread pools) runs beside the next:

- raw:        onnxruntime alone on the served model files; image decode + preprocess
- load:       the service (a real uvicorn process) under load, batching on and off
- keras_onnx: Keras vs onnxruntime for the same weights; seed vs default architecture

Writes bench/results/<date>-<host>.json.  `python -m bench --markdown FILE` prints the
tables of an earlier result as Markdown (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import keras_onnx, load, raw
from bench.common import REPO, RESULTS, machine
from bench.load import ENDPOINTS

SECTIONS = {"raw": (raw, 4.0), "load": (load, 8.0), "keras_onnx": (keras_onnx, 3.0)}

TARGETS = {
    "encode_c32_vs_raw_encoder": (">=", 0.75),
    "encode_c32_workers_vs_raw_encoder": (">=", 0.75),
    "encode_npy32_best_vs_raw_encoder": (">=", 0.9),
    "encode_c1_p50_vs_naive_c1_p50": ("<=", 1.0),
    "encode_c32_frontend_cpu_ms_per_request": ("<=", 0.6),
    "reconstruct_c32_vs_raw_encoder_decoder": (">=", 0.9),
    "encode_c32_batching_on_vs_off": (">=", 2.0),
    "encode_c1_p99_vs_raw_single": ("<=", 1.2),
}


def run_section(name: str, seconds: float, workdir: Path) -> dict:
    module, _ = SECTIONS[name]
    out, log = workdir / f"{name}.json", workdir / f"{name}.log"
    started = time.perf_counter()
    print(f"\n== {name}: {module.__doc__.strip().splitlines()[0]}", flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as stderr:
        code = subprocess.call(
            [sys.executable, "-m", f"bench.{name}", "--json", str(out), "--seconds", str(seconds)],
            cwd=REPO, env=env, stderr=stderr,
        )  # fmt: skip
    if code != 0 or not out.exists():
        tail = log.read_text()[-3000:]
        print(f"!! section {name} failed (exit {code}):\n{tail}", flush=True)
        return {"failed": f"exit {code}", "stderr_tail": tail[-1000:]}
    result = json.loads(out.read_text())
    result.pop("machine", None)  # recorded once, at the top
    result["section_s"] = round(time.perf_counter() - started, 1)
    return result


def find(
    runs: list[dict], batching: str, endpoint: str, concurrency: int, body: str = "multipart"
) -> dict | None:
    for r in runs:
        key = (r["batching"], r["endpoint"], r["concurrency"], r.get("body", "multipart"))
        if key == (batching, endpoint, concurrency, body):
            return r
    return None


def ratios(raw_result: dict, load_result: dict) -> dict:
    """The three targets (p99 for reconstruct too, as information), with what they compare."""
    if "ceilings" not in raw_result or "runs" not in load_result:
        return {}
    ceil, runs = raw_result["ceilings"], load_result["runs"]
    out = {}

    def add(name: str, numerator: float | None, denominator: float | None, what: str) -> None:
        if numerator is None or not denominator:
            return
        op, target = TARGETS.get(name, (None, None))
        value = numerator / denominator
        met = None if op is None else (value >= target if op == ">=" else value <= target)
        out[name] = {
            "value": round(value, 3),
            "target": None if op is None else f"{op} {target:g}",
            "met": met,
            "numerator": numerator,
            "denominator": denominator,
            "what": what,
        }

    enc32, rec32 = find(runs, "on", "encode", 32), find(runs, "on", "reconstruct", 32)
    off32 = find(runs, "off", "encode", 32)
    enc1, rec1 = find(runs, "on", "encode", 1), find(runs, "on", "reconstruct", 1)
    add(
        "encode_c32_vs_raw_encoder",
        enc32 and enc32["img_per_s"],
        ceil["encoder_best_img_per_s"],
        f"service encode img/s at concurrency 32 / raw encoder img/s at batch "
        f"{ceil['encoder_best_batch']}",
    )
    workers32 = find(runs, "workers", "encode", 32)
    add(
        "encode_c32_workers_vs_raw_encoder",
        workers32 and workers32["img_per_s"],
        ceil["encoder_best_img_per_s"],
        "the same with one worker process per core, one onnxruntime thread each "
        "(AE_WORKERS=cores, AE_INTRA_OP_THREADS=1)",
    )
    npy = [r for r in runs if r.get("body") == "npy32" and r["batching"] == "on"]
    best_npy = max(npy, key=lambda r: r["img_per_s"]) if npy else None
    add(
        "encode_npy32_best_vs_raw_encoder",
        best_npy and best_npy["img_per_s"],
        ceil["encoder_best_img_per_s"],
        f"service encode img/s with .npy bodies of 32 preprocessed images (best concurrency: "
        f"{best_npy and best_npy['concurrency']}) / raw encoder img/s at its best batch",
    )
    naive1 = find(runs, "naive", "encode", 1)
    add(
        "encode_c1_p50_vs_naive_c1_p50",
        enc1 and enc1["p50_ms"],
        naive1 and naive1["p50_ms"],
        "service encode p50 ms at concurrency 1 / the naive FastAPI app's (bench/naive.py)",
    )
    add(
        "encode_c32_frontend_cpu_ms_per_request",
        enc32 and enc32.get("frontend_cpu_ms_per_img"),
        1.0,
        "server CPU ms per single-JPEG request outside onnxruntime's threads, encode c=32",
    )
    add(
        "reconstruct_c32_vs_raw_encoder_decoder",
        rec32 and rec32["img_per_s"],
        ceil["reconstruct_best_img_per_s"],
        f"service reconstruct img/s at concurrency 32 / raw encoder+decoder img/s at batch "
        f"{ceil['reconstruct_best_batch']}",
    )
    add(
        "encode_c32_batching_on_vs_off",
        enc32 and enc32["img_per_s"],
        off32 and off32["img_per_s"],
        "service encode img/s at concurrency 32, AE_MAX_BATCH_SIZE default / 1",
    )
    add(
        "encode_c1_p99_vs_raw_single",
        enc1 and enc1["p99_ms"],
        ceil["encode_single_ms"],
        "service encode p99 ms at concurrency 1 / (raw encoder ms at batch 1 + JPEG decode "
        "and preprocess ms of the request image)",
    )
    add(
        "reconstruct_c1_p99_vs_raw_single",
        rec1 and rec1["p99_ms"],
        ceil["reconstruct_single_ms"],
        "service reconstruct p99 ms at concurrency 1 / (raw encoder + decoder ms at batch 1 + "
        "JPEG preprocess + PNG encode ms) (information, no target)",
    )
    return out


def cpu_budget(raw_result: dict, load_result: dict, cores: int) -> dict:
    """Where the CPU of one image goes at concurrency 32, against onnxruntime's own cost.

    On a machine where the server and the load generator share the cores, their CPU per image
    bounds the service: `cores * 1000 / (server + load generator ms)` img/s at best.
    """
    if "graphs" not in raw_result or "runs" not in load_result:
        return {}
    best = max(raw_result["graphs"], key=lambda r: r["encoder_img_per_s"])
    out = {}
    for endpoint in ENDPOINTS:
        r = find(load_result["runs"], "on", endpoint, 32)
        if not r or not r.get("server_cpu_ms_per_img"):
            continue
        ort_ms = best["encoder_cpu_ms_per_img"]
        if endpoint == "reconstruct":
            ort_ms += best["decoder_cpu_ms_per_img"]
        server, gen = r["server_cpu_ms_per_img"], r["loadgen_cpu_ms_per_img"]
        out[endpoint] = {
            "onnxruntime_cpu_ms_per_img": round(ort_ms, 2),
            "server_cpu_ms_per_img": server,
            "server_other_cpu_ms_per_img": round(server - ort_ms, 2),
            "loadgen_cpu_ms_per_img": gen,
            "cpu_bound_img_per_s": round(cores * 1000 / (server + gen), 1),
            "raw_cpu_bound_img_per_s": round(cores * 1000 / ort_ms, 1),
        }
    return out


def ratio_report(result: dict) -> str:
    lines = ["Targets (one run, same machine):"]
    for name, r in result.get("ratios", {}).items():
        verdict = {True: "met", False: "MISSED", None: "info"}[r["met"]]
        lines.append(
            f"  {name:40} {r['value']:6.2f}  target {r['target'] or '-':7} {verdict:6}  "
            f"({r['numerator']:g} / {r['denominator']:g})"
        )
    for endpoint, b in result.get("cpu_budget_c32", {}).items():
        lines.append(
            f"CPU per image, {endpoint} at concurrency 32: server {b['server_cpu_ms_per_img']:.2f} ms "
            f"(onnxruntime alone {b['onnxruntime_cpu_ms_per_img']:.2f}, the rest "
            f"{b['server_other_cpu_ms_per_img']:.2f}), load generator "
            f"{b['loadgen_cpu_ms_per_img']:.2f} ms -> at most {b['cpu_bound_img_per_s']:.0f} img/s "
            f"on these cores (onnxruntime alone: {b['raw_cpu_bound_img_per_s']:.0f})"
        )
    return "\n".join(lines)


def host_slug(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", host).strip("-") or "host"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every timing duration (0.2 for a quick smoke run; default 1)",
    )
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these")
    parser.add_argument(
        "--out", type=Path, help="result file (default bench/results/<date>-<host>.json)"
    )
    parser.add_argument(
        "--markdown", type=Path, help="print an earlier result as Markdown, run nothing"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        from bench.markdown import render

        print(render(json.loads(args.markdown.read_text())))
        return

    started = time.perf_counter()
    now = dt.datetime.now(dt.timezone.utc)
    info = machine()
    print(
        f"{info['cpu']}, {info['usable_cores']} usable cores ({info['cpu_count']} online), "
        f"onnxruntime {info['onnxruntime']} {info['onnxruntime_providers']}, "
        f"load average {info['loadavg_at_start']}",
        flush=True,
    )
    result: dict = {"date": now.isoformat(timespec="seconds"), "machine": info, "scale": args.scale}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name, (_, seconds) in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            section = run_section(name, seconds * args.scale, Path(tmp))
            if name == "keras_onnx":  # two parts, reported at the top level
                result["keras_vs_onnxruntime"] = section.get("keras_vs_onnxruntime", section)
                result["architectures"] = section.get("architectures", section)
            else:
                result["service" if name == "load" else name] = section
    result["ratios"] = ratios(result.get("raw", {}), result.get("service", {}))
    result["cpu_budget_c32"] = cpu_budget(
        result.get("raw", {}), result.get("service", {}), info["usable_cores"]
    )
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - started, 1)

    out = args.out or RESULTS / f"{now:%Y-%m-%d}-{host_slug(info['host'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{ratio_report(result)}\n\nwrote {out} ({result['total_s']:.0f} s in all)")
    failed = [k for k, v in result.items() if isinstance(v, dict) and "failed" in v]
    if failed:
        sys.exit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
