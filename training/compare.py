"""The exported model against the reference (`seed`) architecture, measured in one run.

Throughput does not depend on the weights, so the seed graphs are built untrained and exported
to a temporary folder; its validation MSE comes from a seed training run on the same split.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from aecore.machine import machine
from aecore.preprocessing import ImageSpec
from aecore.runner import Autoencoder
from training.onnx_export import export_graphs
from training.train import TrainConfig, read_history


def reconstruct_img_s(folder: Path, batch: int = 8, seconds: float = 5.0) -> float:
    """Encoder + decoder images per second at `batch`, onnxruntime on the CPU."""
    model = Autoencoder(folder)
    x = np.random.default_rng(0).random((batch, *model.spec.shape), dtype=np.float32)
    model.decode(model.encode(x))  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.decode(model.encode(x))
        done += batch
    return done / (time.perf_counter() - start)


def _seed_graphs(folder: Path, spec: ImageSpec, latent_dim: int) -> Path:
    from training.architectures import build

    encoder, decoder = build("seed", spec.shape, latent_dim)
    export_graphs(encoder, decoder, folder, spec, "seed", 1, "seed")
    return folder


def _run_summary(run_dir: Path) -> dict:
    history = read_history(run_dir)
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    seconds = [row["epoch_seconds"] for row in history if "epoch_seconds" in row]
    return {
        "run": Path(run_dir).name,
        "epochs": len(history),
        "val_mse_by_epoch": [row["val_loss"] for row in history if "val_loss" in row],
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
        "data": Path(config.data).name,
        "limit": config.limit,
    }


def compare(folder: Path, run_dir: Path, baseline_run: Path | None, batch: int = 8) -> dict:
    """Throughput of both architectures (same process, same machine), and their training runs."""
    config = TrainConfig(**json.loads((Path(run_dir) / "config.json").read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        seed_folder = _seed_graphs(Path(tmp), config.spec, config.latent_dim)
        ours = reconstruct_img_s(folder, batch)
        seed = reconstruct_img_s(seed_folder, batch)
    result = {
        "machine": machine(),
        "batch": batch,
        "reconstruct_img_s": {config.arch: round(ours, 1), "seed": round(seed, 1)},
        # the ratio of the figures as reported: on a slow or busy machine the seed's few img/s
        # lose up to 2% to rounding, and the report must not disagree with its own table
        "speedup_vs_seed": round(round(ours, 1) / max(round(seed, 1), 0.1), 2),
        "runs": {config.arch: _run_summary(Path(run_dir))},
    }
    if baseline_run is not None:
        result["runs"]["seed"] = _run_summary(Path(baseline_run))
    return result
