"""The raw limit: onnxruntime alone on the served model files, and image decode + preprocess.

Encoder and decoder img/s at batch 1, 8, 32 and 64 on arrays already in memory, with the
service's own session options (aecore.runner.Autoencoder). Image decode + preprocess
(aecore.preprocessing.load_image) on the fixture JPEGs, and PNG encoding of outputs. These are
the ceilings the service is measured against.

    python -m bench.raw [--seconds 4] [--json out.json]
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from aecore import manifest
from aecore.graphs import default_threads
from aecore.preprocessing import ImageSpec, encode_png, load_image
from aecore.runner import Autoencoder
from bench.common import (
    REPO,
    arguments,
    machine,
    model_folder,
    model_record,
    repeat,
    request_jpeg,
    scene_jpegs,
    table,
    write_json,
)

BATCHES = (1, 8, 32, 64)


def graphs(folder, seconds: float) -> list[dict]:
    model = Autoencoder(folder)
    spec = model.spec
    # Real images, preprocessed once, tiled up to the largest batch.
    images = np.stack([load_image(p.read_bytes(), spec) for p in scene_jpegs()])
    images = np.resize(images, (max(BATCHES), *images.shape[1:]))
    latents = model.encode(images)
    rows = []
    for n in BATCHES:
        x, z = np.ascontiguousarray(images[:n]), np.ascontiguousarray(latents[:n])
        enc = repeat(lambda x=x: model.encode(x), seconds).stats(n)
        dec = repeat(lambda z=z: model.decode(z), seconds).stats(n)
        # Reconstruct = encoder then decoder on the same rows: its rate follows from the two.
        both = 1.0 / (1.0 / enc["img_per_s"] + 1.0 / dec["img_per_s"])
        rows.append(
            {
                "batch": n,
                "encoder_img_per_s": enc["img_per_s"],
                "encoder_ms_p50": enc["ms_per_call_p50"],
                "encoder_cpu_ms_per_img": enc["cpu_ms_per_img"],
                "decoder_img_per_s": dec["img_per_s"],
                "decoder_ms_p50": dec["ms_per_call_p50"],
                "decoder_cpu_ms_per_img": dec["cpu_ms_per_img"],
                "reconstruct_img_per_s": round(both, 2),
            }
        )
    return rows


def images(folder, seconds: float) -> dict:
    """JPEG decode + preprocess, one thread and the service's pool size; PNG encode of outputs."""
    spec = ImageSpec.from_manifest(manifest.read(folder, verify=False)["input"])
    blobs = [p.read_bytes() for p in scene_jpegs()]
    one = request_jpeg().read_bytes()
    single = repeat(lambda: [load_image(b, spec) for b in blobs], seconds)
    threads = default_threads()  # the decode pool of one service process (service.engine.threads)
    with ThreadPoolExecutor(threads) as pool:
        pooled = repeat(lambda: list(pool.map(lambda b: load_image(b, spec), blobs)), seconds)
    request_image = repeat(lambda: load_image(one, spec), seconds / 2, min_calls=50)
    output = np.random.default_rng(0).random((*spec.shape,), dtype=np.float32)
    png = repeat(lambda: encode_png(output), seconds / 2, min_calls=50)
    return {
        "jpegs": len(blobs),
        "preprocess_img_per_s_1_thread": single.stats(len(blobs))["img_per_s"],
        "preprocess_cpu_ms_per_img": single.stats(len(blobs))["cpu_ms_per_img"],
        "preprocess_threads": threads,
        "preprocess_img_per_s_pool": pooled.stats(len(blobs))["img_per_s"],
        "request_jpeg": str(request_jpeg().relative_to(REPO)),
        "request_jpeg_bytes": len(one),
        "request_jpeg_preprocess_ms_p50": round(float(np.median(request_image.times)) * 1000, 3),
        "png_encode_ms_p50": round(float(np.median(png.times)) * 1000, 3),
    }


def ceilings(rows: list[dict], image: dict) -> dict:
    """The figures the service's targets are set against."""
    best_enc = max(rows, key=lambda r: r["encoder_img_per_s"])
    best_rec = max(rows, key=lambda r: r["reconstruct_img_per_s"])
    one = next(r for r in rows if r["batch"] == 1)
    prep_ms = image["request_jpeg_preprocess_ms_p50"]
    return {
        "encoder_best_img_per_s": best_enc["encoder_img_per_s"],
        "encoder_best_batch": best_enc["batch"],
        "reconstruct_best_img_per_s": best_rec["reconstruct_img_per_s"],
        "reconstruct_best_batch": best_rec["batch"],
        # One image, nothing else running: JPEG -> array -> graph(s) (-> PNG).
        "encode_single_ms": round(one["encoder_ms_p50"] + prep_ms, 3),
        "reconstruct_single_ms": round(
            one["encoder_ms_p50"] + one["decoder_ms_p50"] + prep_ms + image["png_encode_ms_p50"], 3
        ),
    }


def run(seconds: float) -> dict:
    folder = model_folder()
    rows = graphs(folder, seconds)
    image = images(folder, seconds)
    return {
        "model": model_record(folder),
        "session": {"intra_op_threads": default_threads(), "allow_spinning": False},
        "graphs": rows,
        "images": image,
        "ceilings": ceilings(rows, image),
    }


def report(result: dict) -> str:
    columns = [
        ("batch", "batch"),
        ("encoder_img_per_s", "encoder img/s"),
        ("encoder_ms_p50", "enc ms/call"),
        ("decoder_img_per_s", "decoder img/s"),
        ("decoder_ms_p50", "dec ms/call"),
        ("reconstruct_img_per_s", "enc+dec img/s"),
        ("encoder_cpu_ms_per_img", "enc CPU ms/img"),
        ("decoder_cpu_ms_per_img", "dec CPU ms/img"),
    ]
    threads = result["session"]["intra_op_threads"]
    lines = [table(result["graphs"], columns, f"Raw onnxruntime ({threads} intra-op threads)")]
    im, ce = result["images"], result["ceilings"]
    lines.append(
        f"JPEG decode + preprocess: {im['preprocess_img_per_s_1_thread']:.0f} img/s on 1 thread, "
        f"{im['preprocess_img_per_s_pool']:.0f} img/s on {im['preprocess_threads']}; request JPEG "
        f"{im['request_jpeg_preprocess_ms_p50']:.2f} ms; PNG encode {im['png_encode_ms_p50']:.2f} ms"
    )
    lines.append(
        f"Ceilings: encoder {ce['encoder_best_img_per_s']:.1f} img/s (batch "
        f"{ce['encoder_best_batch']}), encoder+decoder {ce['reconstruct_best_img_per_s']:.1f} img/s "
        f"(batch {ce['reconstruct_best_batch']}); one image end to end: encode "
        f"{ce['encode_single_ms']:.2f} ms, reconstruct {ce['reconstruct_single_ms']:.2f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], default_seconds=4.0)
    result = {"machine": machine(), **run(args.seconds)}
    print(report(result), flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
