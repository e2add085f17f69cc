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

from aecore.graphs import open_session
from aecore.machine import machine
from training.train import TrainConfig, read_history


def reconstruct_img_s(
    folder: Path, shape: tuple[int, ...], batch: int = 8, seconds: float = 5.0
) -> float:
    """Encoder + decoder images per second at `batch`, onnxruntime on the CPU."""
    encoder = open_session(folder / "encoder.onnx")
    decoder = open_session(folder / "decoder.onnx")
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)

    def once() -> None:
        latent = encoder.run(None, {"image": x})[0]
        decoder.run(None, {"latent": latent})

    once()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        once()
        done += batch
    return done / (time.perf_counter() - start)


def _seed_graphs(folder: Path, shape: tuple[int, int, int], latent_dim: int) -> Path:
    from training.architectures import build
    from training.export import to_onnx

    encoder, decoder = build("seed", shape, latent_dim)
    to_onnx(encoder, "image", "latent", folder / "encoder.onnx")
    to_onnx(decoder, "latent", "image", folder / "decoder.onnx")
    return folder


def _run_summary(run_dir: Path) -> dict:
    history = read_history(run_dir)
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    seconds = [row["epoch_seconds"] for row in history if "epoch_seconds" in row]
    return {
        "run": str(run_dir),
        "epochs": len(history),
        "val_mse_by_epoch": [row["val_loss"] for row in history if "val_loss" in row],
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
        "data": config.data,
        "limit": config.limit,
    }


def compare(folder: Path, run_dir: Path, baseline_run: Path | None, batch: int = 8) -> dict:
    """Throughput of both architectures (same process, same machine), and their training runs."""
    config = TrainConfig(**json.loads((Path(run_dir) / "config.json").read_text()))
    shape = config.spec.shape
    with tempfile.TemporaryDirectory() as tmp:
        seed_folder = _seed_graphs(Path(tmp), shape, config.latent_dim)
        ours = reconstruct_img_s(folder, shape, batch)
        seed = reconstruct_img_s(seed_folder, shape, batch)
    result = {
        "machine": machine(),
        "batch": batch,
        "reconstruct_img_s": {config.arch: round(ours, 1), "seed": round(seed, 1)},
        "speedup_vs_seed": round(ours / seed, 2),
        "runs": {config.arch: _run_summary(Path(run_dir))},
    }
    if baseline_run is not None:
        result["runs"]["seed"] = _run_summary(Path(baseline_run))
    return result
