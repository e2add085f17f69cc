"""Keras checkpoint -> ONNX graphs with a parity check -> a self-describing model folder."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from aecore import anomaly, manifest
from aecore.preprocessing import ImageSpec, to_float
from aecore.runner import Autoencoder
from training import generation, probe, report
from training.anomaly import calibrate_and_evaluate, scorer_files
from training.compare import compare
from training.data import ImageSet
from training.onnx_export import ParityError, check_parity, export_graphs
from training.precision import write_fp16
from training.train import TrainConfig, load_split, read_history
from training.warmstart import load_autoencoder

log = logging.getLogger(__name__)

GRAPH_FILES = {
    "encoder": "encoder.onnx",
    "decoder": "decoder.onnx",
    "encoder_fp16": "encoder.fp16.onnx",
    "decoder_fp16": "decoder.fp16.onnx",
}


def reconstruct(folder: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latents, reconstructions) of uint8 images through a folder's exported ONNX graphs."""
    return Autoencoder(folder, verify=False).reconstruct_all(images)


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
    train_set, val_set = load_split(config, run_dir)

    model_root = Path(model_dir) / name
    version, staging = manifest.new_version(model_root, version)
    try:
        base = export_graphs(encoder, decoder, staging, spec, name, version, config.arch)
        parity_max = check_parity(encoder, decoder, staging, to_float(val_set.images[:16]))
    except ParityError:
        shutil.rmtree(staging)
        raise
    log.info("ONNX parity: max abs difference %.2e", parity_max)
    fp16 = write_fp16(staging, to_float(val_set.images[:16]))
    log.info("fp16 graphs: max abs difference to fp32 %s", fp16["parity_max_abs"])
    base["files"] = manifest.file_entries(staging, GRAPH_FILES)
    base["precisions"] = {"fp32": {"encoder": "encoder", "decoder": "decoder"}, "fp16": fp16}

    latents, outputs = reconstruct(staging, val_set.images)
    scored = mse_metrics(val_set.images, outputs, val_set)
    pca_mse, pca_components = pca_val_mse(train_set.images, val_set.images, config.latent_dim)
    history = read_history(run_dir)
    seconds = [row["epoch_seconds"] for row in history if "epoch_seconds" in row]
    last = history[-1] if history else {}
    objective = config.objective()
    body = {
        **base,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {
            "data": data_name(config.data),
            "data_sha256": split_digest(train_set, val_set),
            "val_dir": data_name(config.val_dir) if config.val_dir else None,
            "classes": train_set.classes,
            "images": len(train_set) + len(val_set),
            "skipped_files": len(train_set.skipped),
            "train_images": len(train_set),
            "val_images": len(val_set),
            "val_fraction": None if config.val_dir else config.val_fraction,
            "seed": config.seed,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "augmentation": objective["augmentation"],
            # "mse" as before when no other term was trained; else each term and its weight
            "loss": "mse" if objective["loss"] == {"mse": 1.0} else objective["loss"],
            "schedule": objective["schedule"],
            "epochs": len(history),
            "wall_seconds": round(sum(seconds), 1),
            "seconds_per_epoch": round(float(np.mean(seconds)), 1) if seconds else None,
            "final_train_loss": last.get("loss"),
            "final_val_loss": last.get("val_loss"),
            "best_val_loss": min((r["val_loss"] for r in history if "val_loss" in r), default=None),
            **initial_weights(run_dir),
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
    for key in ("invariance_decay", "trained"):
        if key in objective:
            body["training"][key] = objective[key]
    runner = Autoencoder(staging, verify=False)
    train_latents = runner.encode_all(train_set.images)
    body["metrics"]["linear_probe"] = probe.linear_probe(train_set, val_set, train_latents, latents)
    if train_set.has_classes:  # the density is one Gaussian per class
        body["generation"] = generation.fit_generator(
            runner, staging, train_set, train_latents, val_set, latents
        )
    if compare_seed:
        body["metrics"]["comparison"] = compare(staging, run_dir, baseline_run)
    write_report(staging / "report", body, val_set, outputs, latents, history)
    # The manifest's hashes cover every file the service reads: the scorers' files too.
    parts = {**GRAPH_FILES, **scorer_files(body["anomaly"])}
    if "generation" in body:
        parts["generator"] = body["generation"]["file"]
    body["files"] = manifest.file_entries(staging, parts)
    manifest.write(staging, body)
    return manifest.publish(staging, model_root, version)


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
        report.markdown(body, figures)
        + probe.markdown(linear_probe)
        + generation.markdown(body.get("generation"))
    )
    return report_dir


def initial_weights(run_dir: Path) -> dict:
    """`init_from` for a run started from a published version or a run (training.warmstart)."""
    path = Path(run_dir) / "init.json"
    return {"init_from": json.loads(path.read_text())} if path.is_file() else {}


def spec_of(folder: Path) -> ImageSpec:
    return ImageSpec.from_manifest(manifest.read(folder)["input"])


def data_name(path: str) -> str:
    """A data folder as the manifest records it: its own name, never this machine's path."""
    return Path(path).name


def split_digest(train: ImageSet, val: ImageSet) -> str:
    """sha256 over the split's file lists and pixels: names the exact data a model saw."""
    digest = hashlib.sha256()
    for part in (train, val):
        digest.update("\n".join(part.paths).encode())
        digest.update(part.images.tobytes())
    return digest.hexdigest()
