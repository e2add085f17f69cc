"""Keras against onnxruntime for the same weights, and the reference vs the default architecture.

Needs the `train` extra (TensorFlow, tf2onnx); without it both parts are skipped with a note.

1. Keras vs onnxruntime: `build("spatial", (128, 128, 3), 1024)`, exported with
   training.onnx_export.export_graphs into a temporary folder; the autoencoder (encoder then decoder) timed
   at batch 8 and 32 in Keras (a compiled tf.function, training=False) and in onnxruntime
   (aecore.runner.Autoencoder, the service's runner). The weights are the freshly
   initialised ones, the same in both: the speed of these graphs does not depend on the values.
2. Reference vs default: the `seed` architecture built and exported the same way, its
   reconstruct (encoder + decoder) img/s at batch 8 against the served model's ONNX files.

    python -m bench.keras_onnx [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from aecore import manifest
from aecore.graphs import default_threads
from aecore.preprocessing import ImageSpec, load_image
from aecore.runner import Autoencoder
from bench.common import (
    arguments,
    machine,
    model_folder,
    model_record,
    repeat,
    scene_jpegs,
    table,
    write_json,
)

KERAS_BATCHES = (8, 32)
ARCH_BATCH = 8


def tensorflow_missing() -> str | None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
    try:
        import tensorflow  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        return f"the `train` extra is not installed ({exc.name} is missing)"
    return None


def real_images(spec: ImageSpec, n: int) -> np.ndarray:
    images = np.stack([load_image(p.read_bytes(), spec) for p in scene_jpegs()])
    return np.ascontiguousarray(np.resize(images, (n, *images.shape[1:])))


def export(arch: str, spec: ImageSpec, latent_dim: int, tmp: Path):
    """Build `arch`, export it as a graph folder with the training code's exporter."""
    from training.architectures import build
    from training.onnx_export import export_graphs

    started = time.perf_counter()
    encoder, decoder = build(arch, spec.shape, latent_dim)
    folder = tmp / arch
    folder.mkdir()
    export_graphs(encoder, decoder, folder, spec, arch, 1, arch)
    params = int(encoder.count_params() + decoder.count_params())
    return encoder, decoder, folder, params, time.perf_counter() - started


def ort_reconstruct(folder: Path):
    """A function running images through both ONNX graphs, as the service's runner does."""
    model = Autoencoder(folder)
    return lambda x: model.decode(model.encode(x))


def keras_vs_onnxruntime(spec, latent_dim, tmp: Path, seconds: float) -> dict:
    import tensorflow as tf

    encoder, decoder, folder, params, export_s = export("spatial", spec, latent_dim, tmp)
    keras_fn = tf.function(lambda x: decoder(encoder(x, training=False), training=False))
    ort_fn = ort_reconstruct(folder)
    images = real_images(spec, max(KERAS_BATCHES))
    check = images[:4]
    max_abs = float(np.max(np.abs(keras_fn(tf.constant(check)).numpy() - ort_fn(check))))
    rows = []
    for n in KERAS_BATCHES:
        x = images[:n]
        tensor = tf.constant(x)
        k = repeat(lambda tensor=tensor: keras_fn(tensor).numpy(), seconds).stats(n)
        o = repeat(lambda x=x: ort_fn(x), seconds).stats(n)
        rows.append(
            {
                "batch": n,
                "keras_img_per_s": k["img_per_s"],
                "keras_ms_p50": k["ms_per_call_p50"],
                "onnxruntime_img_per_s": o["img_per_s"],
                "onnxruntime_ms_p50": o["ms_per_call_p50"],
                "speedup": round(o["img_per_s"] / k["img_per_s"], 2),
            }
        )
    return {
        "architecture": "spatial",
        "weights": "freshly initialised (not the trained ones); identical in Keras and ONNX",
        "what": "encoder + decoder per batch; Keras as a tf.function with training=False",
        "params": params,
        "export_s": round(export_s, 1),
        "max_abs_difference": max_abs,
        "tensorflow": tf.__version__,
        "tf_threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads() or "default",
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads() or "default",
        },
        "onnxruntime_intra_op_threads": default_threads(),
        "rows": rows,
    }


def architectures(spec, latent_dim, tmp: Path, seconds: float) -> dict:
    served = model_folder()
    card = manifest.read(served, verify=False)
    _, _, seed_folder, seed_params, export_s = export("seed", spec, latent_dim, tmp)
    contenders = {
        f"{card.get('architecture', '?')} (served: {card['name']} v{card['version']})": served,
        "seed (reference, fresh weights)": seed_folder,
    }
    x = real_images(spec, ARCH_BATCH)
    rows = []
    for name, folder in contenders.items():
        reconstruct = ort_reconstruct(folder)
        enc, dec = (folder / f"{part}.onnx" for part in ("encoder", "decoder"))
        stats = repeat(lambda fn=reconstruct: fn(x), seconds).stats(ARCH_BATCH)
        rows.append(
            {
                "model": name,
                "batch": ARCH_BATCH,
                "reconstruct_img_per_s": stats["img_per_s"],
                "ms_per_batch_p50": stats["ms_per_call_p50"],
                "onnx_mb": round((enc.stat().st_size + dec.stat().st_size) / 2**20, 1),
            }
        )
    default, seed = rows
    return {
        "batch": ARCH_BATCH,
        "seed_params": seed_params,
        "seed_export_s": round(export_s, 1),
        "rows": rows,
        "default_over_seed": round(
            default["reconstruct_img_per_s"] / seed["reconstruct_img_per_s"], 2
        ),
    }


def run(seconds: float) -> dict:
    missing = tensorflow_missing()
    if missing:
        note = {"skipped": missing}
        return {"keras_vs_onnxruntime": note, "architectures": note}
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    folder = model_folder()
    card = manifest.read(folder, verify=False)
    spec, latent_dim = ImageSpec.from_manifest(card["input"]), int(card["latent_dim"])
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        return {
            "model": model_record(folder),
            "keras_vs_onnxruntime": keras_vs_onnxruntime(spec, latent_dim, Path(tmp), seconds),
            "architectures": architectures(spec, latent_dim, Path(tmp), seconds),
        }


def report(result: dict) -> str:
    kv, arch = result["keras_vs_onnxruntime"], result["architectures"]
    if "skipped" in kv:
        return f"Keras vs onnxruntime, seed vs default: skipped ({kv['skipped']})"
    lines = [
        table(
            kv["rows"],
            [
                ("batch", "batch"),
                ("keras_img_per_s", "Keras img/s"),
                ("keras_ms_p50", "Keras ms"),
                ("onnxruntime_img_per_s", "ORT img/s"),
                ("onnxruntime_ms_p50", "ORT ms"),
                ("speedup", "ORT/Keras"),
            ],
            f"Keras vs onnxruntime, {kv['architecture']} encoder+decoder, {kv['weights']} "
            f"(max |diff| {kv['max_abs_difference']:.1e})",
        ),
        table(
            arch["rows"],
            [
                ("model", "model"),
                ("batch", "batch"),
                ("reconstruct_img_per_s", "reconstruct img/s"),
                ("ms_per_batch_p50", "ms/batch"),
                ("onnx_mb", "ONNX MB"),
            ],
            f"Reference vs default architecture (onnxruntime, batch {arch['batch']}): default is "
            f"{arch['default_over_seed']:.2f}x the seed",
        ),
    ]
    return "\n\n".join(lines)


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], default_seconds=3.0)
    result = {"machine": machine(), **run(args.seconds)}
    print(report(result), flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
