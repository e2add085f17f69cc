"""Keras checkpoint -> ONNX graphs with a parity check -> a self-describing model folder."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path

import keras
import numpy as np
import onnx
import tensorflow as tf

from aecore import anomaly, manifest
from aecore.graphs import open_session, run_batched
from aecore.preprocessing import ImageSpec, to_float
from training import probe, report
from training.anomaly import calibrate_and_evaluate
from training.compare import compare
from training.data import ImageSet
from training.train import TrainConfig, load_autoencoder, load_split, read_history

log = logging.getLogger(__name__)

OPSET = 17
PARITY_LIMIT = 1e-4


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the Keras model closely enough."""


def to_onnx(model: keras.Model, input_name: str, output_name: str, path: Path) -> Path:
    """Convert one Keras model with a dynamic batch dimension and the contract's tensor names."""
    import tf2onnx

    # from_keras breaks on Keras 3 (KeyError 'keras_tensor_...'); a traced function does not.
    signature = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=input_name)]
    function = tf.function(lambda x: model(x, training=False))
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=OPSET)
    _rename(proto.graph, proto.graph.input[0].name, input_name)
    _rename(proto.graph, proto.graph.output[0].name, output_name)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new


def parity(model: keras.Model, graph: Path, batch: np.ndarray) -> float:
    """Max absolute difference between Keras and onnxruntime on the same batch."""
    expected = model(batch, training=False).numpy()
    actual = run_batched(open_session(graph), batch, batch_size=len(batch))
    return float(np.max(np.abs(expected - actual)))


def run_graphs(folder: Path, images: np.ndarray, batch_size: int = 32):
    """(latents, reconstructions) for uint8 images, through the exported ONNX graphs."""
    encoder, decoder = open_session(folder / "encoder.onnx"), open_session(folder / "decoder.onnx")
    latents, outputs = [], []
    for i in range(0, len(images), batch_size):
        z = run_batched(encoder, to_float(images[i : i + batch_size]), batch_size)
        latents.append(z)
        outputs.append(run_batched(decoder, z, batch_size))
    return np.concatenate(latents), np.concatenate(outputs)


def mse_metrics(images: np.ndarray, outputs: np.ndarray, data: ImageSet) -> dict:
    """Mean and per-class reconstruction MSE."""
    per_image = np.concatenate(
        [
            anomaly.per_image_mse(to_float(images[i : i + 64]), outputs[i : i + 64])
            for i in range(0, len(images), 64)
        ]
    )
    result = {"val_mse": float(per_image.mean())}
    if data.has_classes:
        result["val_mse_per_class"] = {
            name: float(per_image[data.labels == k].mean())
            for k, name in enumerate(data.classes)
            if np.any(data.labels == k)
        }
    return result


def pca_val_mse(train: np.ndarray, val: np.ndarray, components: int, seed: int = 42):
    """The baseline: PCA with `components` components fitted on the train split."""
    from sklearn.decomposition import PCA

    x_train = to_float(train).reshape(len(train), -1)
    components = min(components, *x_train.shape)
    pca = PCA(components, random_state=seed).fit(x_train)
    del x_train
    x_val = to_float(val).reshape(len(val), -1)
    recon = pca.inverse_transform(pca.transform(x_val))
    return float(np.mean((x_val - recon) ** 2)), components


def next_version(model_root: Path) -> int:
    existing = manifest.versions(model_root)
    return existing[-1] + 1 if existing else 1


def export(
    run_dir: Path,
    model_dir: Path,
    name: str,
    version: int | None = None,
    target_fpr: float = 0.01,
    compare_seed: bool = True,
    baseline_run: Path | None = None,
) -> Path:
    """Export a training run into `model_dir/name/version` and return that folder.

    With `compare_seed`, the report also measures throughput against the seed architecture
    (and reads the seed's training run, `baseline_run`, when given).
    """
    run_dir = Path(run_dir)
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    spec = config.spec
    encoder, decoder = load_autoencoder(run_dir)
    train_set, val_set = load_split(config)

    version = version or next_version(Path(model_dir) / name)
    folder = Path(model_dir) / name / str(version)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; choose another --version")
    staging = folder.with_name(f".{version}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    to_onnx(encoder, "image", "latent", staging / "encoder.onnx")
    to_onnx(decoder, "latent", "image", staging / "decoder.onnx")
    batch = to_float(val_set.images[:16])
    parity_max = max(
        parity(encoder, staging / "encoder.onnx", batch),
        parity(decoder, staging / "decoder.onnx", encoder(batch, training=False).numpy()),
    )
    log.info("ONNX parity: max abs difference %.2e", parity_max)
    if parity_max > PARITY_LIMIT:
        shutil.rmtree(staging)
        raise ParityError(f"ONNX differs from Keras by {parity_max:.2e} > {PARITY_LIMIT:.0e}")

    latents, outputs = run_graphs(staging, val_set.images)
    scored = mse_metrics(val_set.images, outputs, val_set)
    pca_mse, pca_components = pca_val_mse(train_set.images, val_set.images, config.latent_dim)
    history = read_history(run_dir)
    seconds = [row["epoch_seconds"] for row in history if "epoch_seconds" in row]
    last = history[-1] if history else {}
    body = {
        "name": name,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": config.arch,
        "input": spec.manifest_block(),
        "latent_dim": config.latent_dim,
        "files": manifest.file_entries(staging),
        "onnx": {"opset": OPSET, "encoder": ["image", "latent"], "decoder": ["latent", "image"]},
        "training": {
            "data": config.data,
            "val_dir": config.val_dir,
            "classes": train_set.classes,
            "images": len(train_set) + len(val_set),
            "skipped_files": len(train_set.skipped),
            "train_images": len(train_set),
            "val_images": len(val_set),
            "val_fraction": None if config.val_dir else config.val_fraction,
            "seed": config.seed,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "augmentation": ["horizontal_flip"] if config.flip else [],
            "loss": "mse",
            "epochs": len(history),
            "wall_seconds": round(sum(seconds), 1),
            "seconds_per_epoch": round(float(np.mean(seconds)), 1) if seconds else None,
            "final_train_loss": last.get("loss"),
            "final_val_loss": last.get("val_loss"),
            "best_val_loss": min((r["val_loss"] for r in history if "val_loss" in r), default=None),
        },
        "metrics": {
            "split": "validation",
            "val_mse": scored["val_mse"],
            "val_mse_per_class": scored.get("val_mse_per_class", {}),
            "pca_val_mse": pca_mse,
            "pca_components": pca_components,
            "onnx_parity_max_abs": parity_max,
        },
        "anomaly": calibrate_and_evaluate(staging, train_set, val_set, target_fpr, config.seed),
    }
    train_latents = run_graphs(staging, train_set.images)[0]
    body["metrics"]["linear_probe"] = probe.linear_probe(train_set, val_set, train_latents, latents)
    if compare_seed:
        body["metrics"]["comparison"] = compare(staging, run_dir, baseline_run)
    write_report(staging / "report", body, val_set, outputs, latents, history)
    manifest.write(staging, body)
    staging.rename(folder)
    return folder


def write_report(
    report_dir: Path,
    body: dict,
    data: ImageSet,
    outputs: np.ndarray,
    latents: np.ndarray,
    history: list[dict[str, float]] | None = None,
) -> Path:
    """Figures and report.md for one model on one image set."""
    pick = np.linspace(0, len(data) - 1, num=min(8, len(data))).astype(int)  # spread over classes
    figures = {
        "Reconstructions": report.reconstruction_grid(
            to_float(data.images[pick]), outputs[pick], report_dir / "reconstructions.png"
        ),
        "Training curve": report.loss_curve(history or [], report_dir / "loss.png"),
        "Latent map": report.latent_map(
            latents, data.labels, data.classes, report_dir / "latent_map.png"
        ),
    }
    linear_probe = body.get("metrics", {}).get("linear_probe")
    (report_dir / "report.md").write_text(
        report.markdown(body, figures) + probe.markdown(linear_probe)
    )
    return report_dir


def spec_of(folder: Path) -> ImageSpec:
    return ImageSpec.from_manifest(manifest.read(folder)["input"])
