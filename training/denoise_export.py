"""A denoiser's training run -> ONNX with a parity check -> evaluated, reported, published folder.

The folder serves the `denoise` task only: `files` lists `denoiser.onnx` (image -> cleaned, both
float32 [N, H, W, 3] in [0, 1], dynamic batch) and the evaluation is written before publishing,
because a published version never changes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path

import keras
import numpy as np

from aecore import manifest
from aecore.preprocessing import ImageSpec, to_float
from training import data as data_mod
from training import denoise_eval, noise
from training.denoise import DenoiseConfig
from training.export import data_name, split_digest
from training.onnx_export import OPSET, PARITY_LIMIT, ParityError, parity, to_onnx
from training.train import load_split, read_history

log = logging.getLogger(__name__)

TASKS = ["denoise"]
SWEEP_IMAGES = 8  # training images the NLM parameters are chosen on


def export_denoiser(
    run_dir: Path,
    model_dir: Path,
    name: str = "intel-scenes-denoise",
    version: int | None = None,
    bm3d_images: int = 30,
    autoencoder: Path | None = None,
) -> Path:
    """Export, evaluate and publish `run_dir`'s best checkpoint as `model_dir/name/version`."""
    run_dir = Path(run_dir)
    config = DenoiseConfig(**json.loads((run_dir / "config.json").read_text()))
    model = keras.models.load_model(run_dir / "best.keras")
    train_set, val_set = load_split(config.split_config(), run_dir)
    spec = ImageSpec(config.height, config.width_px)

    model_root = Path(model_dir) / name
    version, staging = manifest.new_version(model_root, version)
    try:
        graph = to_onnx(_fixed_size(model, spec), "image", "cleaned", staging / "denoiser.onnx")
        check = noise.gaussian(val_set.images[:16], 25, np.random.default_rng(0))
        parity_max = parity(model, graph, to_float(check))
        if parity_max > PARITY_LIMIT:
            raise ParityError(f"ONNX differs from Keras by {parity_max:.2e} > {PARITY_LIMIT:.0e}")
    except ParityError:
        shutil.rmtree(staging)
        raise
    log.info("ONNX parity: max abs difference %.2e", parity_max)
    base = {
        "name": name,
        "version": version,
        "tasks": TASKS,
        "architecture": config.arch,
        "input": spec.manifest_block(),
        "files": manifest.file_entries(staging, {"denoiser": "denoiser.onnx"}),
        "onnx": {"opset": OPSET, "denoiser": ["image", "cleaned"]},
    }
    manifest.write(staging, base)  # loadable now, so the evaluation runs it like a server would

    evaluation, examples = denoise_eval.evaluate(
        staging, val_set, sweep_images(train_set), bm3d_images, autoencoder, config.seed
    )
    history = read_history(run_dir)
    seconds = [row["epoch_seconds"] for row in history if "epoch_seconds" in row]
    body = {
        **base,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {
            "data": data_name(config.data),
            "data_sha256": split_digest(train_set, val_set),
            "classes": train_set.classes,
            "train_images": len(train_set),
            "val_images": len(val_set),
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "width": config.width,
            "patch": config.patch,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "augmentation": ["random_crop", "horizontal_flip"],
            "noise": noise.describe(),
            "target": "the clean image",
            "loss": "mse",
            "epochs": len(history),
            "wall_seconds": round(sum(seconds), 1),
            "best_val_loss": min((r["val_loss"] for r in history if "val_loss" in r), default=None),
            "final_learning_rate": history[-1].get("learning_rate") if history else None,
        },
        "metrics": {"onnx_parity_max_abs": parity_max},
        "evaluation": evaluation,
    }
    denoise_eval.picture_grid(examples, staging / "report" / "grid.jpg")
    (staging / "report" / "report.md").write_text(denoise_eval.report_markdown(body))
    manifest.write(staging, body)
    return manifest.publish(staging, model_root, version)


def _fixed_size(model: keras.Model, spec: ImageSpec) -> keras.Model:
    """The same layers and weights with the model's H x W: the graph declares what it takes."""
    inputs = keras.Input(spec.shape, name="image")
    return keras.Model(inputs, model(inputs), name=model.name)


def sweep_images(train: data_mod.ImageSet) -> np.ndarray:
    """A few training images spread over the classes, for choosing NLM's parameters."""
    pick = np.linspace(0, len(train) - 1, num=min(SWEEP_IMAGES, len(train))).astype(int)
    return train.images[pick]


def heldout_split(folder: Path, data: Path) -> tuple[data_mod.ImageSet, data_mod.ImageSet]:
    """(train, held-out) of `data` split as the model's manifest records; checked by digest."""
    body = manifest.read(folder)
    t = body["training"]
    everything = data_mod.load(data, ImageSpec.from_manifest(body["input"]))
    train_idx, val_idx = data_mod.stratified_split(everything.labels, t["val_fraction"], t["seed"])
    train, val = everything.subset(train_idx), everything.subset(val_idx)
    if t.get("data_sha256") and split_digest(train, val) != t["data_sha256"]:
        raise data_mod.DataError(
            f"{data} split as {folder} records does not give the images it trained beside "
            "(different folder or changed files); its held-out figures would not be comparable"
        )
    return train, val
