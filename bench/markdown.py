"""A result file of `python -m bench` as Markdown tables (what docs/benchmarks.md quotes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.common import cell


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |"]
    lines.append("|" + "|".join("---:" if i else "---" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def render(result: dict) -> str:
    m = result["machine"]
    out = [
        f"Measured {result['date']} on `{m['host']}`: {m['cpu']}, {m['usable_cores']} usable "
        f"cores, {m.get('memory_gib')} GiB; {m['os']}; Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']} (providers {', '.join(m['onnxruntime_providers'])}), numpy "
        f"{m['numpy']}, OpenCV {m['opencv']}. Load average at start {m.get('loadavg_at_start')}, "
        f"at end {m.get('loadavg_at_end')}. Whole run {result.get('total_s')} s.",
    ]
    if result.get("ratios"):
        rows = [
            {"name": k, **v, "met": {True: "yes", False: "**no**", None: "-"}[v["met"]]}
            for k, v in result["ratios"].items()
        ]
        out += [
            "### Targets",
            md_table(
                rows,
                [
                    ("name", "ratio"),
                    ("value", "value"),
                    ("target", "target"),
                    ("met", "met"),
                    ("numerator", "numerator"),
                    ("denominator", "denominator"),
                ],
            ),
            "\n".join(f"- `{k}`: {v['what']}" for k, v in result["ratios"].items()),
        ]
    raw = result.get("raw", {})
    if "graphs" in raw:
        im, ce = raw["images"], raw["ceilings"]
        out += [
            f"### Raw onnxruntime ({raw['session']['intra_op_threads']} intra-op threads, "
            f"model {raw['model']['name']} v{raw['model']['version']}, "
            f"{raw['model']['architecture']})",
            md_table(
                raw["graphs"],
                [
                    ("batch", "batch"),
                    ("encoder_img_per_s", "encoder img/s"),
                    ("encoder_ms_p50", "encoder ms/batch"),
                    ("decoder_img_per_s", "decoder img/s"),
                    ("decoder_ms_p50", "decoder ms/batch"),
                    ("reconstruct_img_per_s", "encoder+decoder img/s"),
                    ("encoder_cpu_ms_per_img", "encoder CPU ms/img"),
                    ("decoder_cpu_ms_per_img", "decoder CPU ms/img"),
                ],
            ),
            f"JPEG decode + preprocess ({im['jpegs']} fixture JPEGs): "
            f"{im['preprocess_img_per_s_1_thread']:.0f} img/s on one thread, "
            f"{im['preprocess_img_per_s_pool']:.0f} img/s on {im['preprocess_threads']} threads; "
            f"the request JPEG ({im['request_jpeg_bytes']} bytes) "
            f"{im['request_jpeg_preprocess_ms_p50']:.2f} ms; PNG encode of an output "
            f"{im['png_encode_ms_p50']:.2f} ms. One image end to end without HTTP: encode "
            f"{ce['encode_single_ms']:.2f} ms, reconstruct {ce['reconstruct_single_ms']:.2f} ms.",
        ]
    service = result.get("service", {})
    if "runs" in service:
        rows = [
            {
                **r,
                "mean_batch": r.get("encoder", {}).get("mean_batch"),
                "busy": r.get("encoder", {}).get("busy_fraction"),
            }
            for r in service["runs"]
        ]
        clients = sorted({r["client"] for r in service["runs"] if r.get("client")})
        by = f" (load generator: {', '.join(clients)})" if clients else ""
        out += [
            f"### Service under load{by}",
            md_table(
                rows,
                [
                    ("server", "server"),
                    ("endpoint", "endpoint"),
                    ("body", "body"),
                    ("concurrency", "concurrency"),
                    ("img_per_s", "img/s"),
                    ("p50_ms", "p50 ms"),
                    ("p95_ms", "p95 ms"),
                    ("p99_ms", "p99 ms"),
                    ("errors", "errors"),
                    ("mean_batch", "mean encoder batch"),
                    ("busy", "encoder busy"),
                    ("server_cores", "server cores"),
                    ("loadgen_cores", "load-gen cores"),
                    ("server_cpu_ms_per_img", "server CPU ms/img"),
                    ("frontend_cpu_ms_per_img", "front-end CPU ms/img"),
                    ("loadgen_cpu_ms_per_img", "load-gen CPU ms/img"),
                ],
            ),
        ]
    kv = result.get("keras_vs_onnxruntime", {})
    if "rows" in kv:
        out += [
            f"### Keras vs onnxruntime ({kv['architecture']}, encoder+decoder; weights "
            f"{kv['weights']}; max abs difference {kv['max_abs_difference']:.1e})",
            md_table(
                kv["rows"],
                [
                    ("batch", "batch"),
                    ("keras_img_per_s", "Keras img/s"),
                    ("onnxruntime_img_per_s", "onnxruntime img/s"),
                    ("speedup", "onnxruntime / Keras"),
                ],
            ),
        ]
    elif kv:
        out.append(f"Keras vs onnxruntime: skipped ({kv.get('skipped') or kv.get('failed')}).")
    arch = result.get("architectures", {})
    if "rows" in arch:
        out += [
            f"### Reference (seed) vs default architecture, onnxruntime, batch {arch['batch']}",
            md_table(
                arch["rows"],
                [
                    ("model", "model"),
                    ("reconstruct_img_per_s", "reconstruct img/s"),
                    ("ms_per_batch_p50", "ms per batch"),
                    ("onnx_mb", "ONNX MB"),
                ],
            ),
        ]
    return "\n\n".join(out)
