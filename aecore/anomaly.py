"""Anomaly scorers and their calibration; the threshold travels with the model in model.json.

A scorer maps (inputs, reconstructions) [N, H, W, 3] in [0, 1] to one score per image,
higher meaning more anomalous.
"""

from __future__ import annotations

import numpy as np


def per_image_mse(inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Mean squared error per image, both in [0, 1]."""
    diff = inputs.astype(np.float32) - outputs.astype(np.float32)
    return np.mean(np.square(diff), axis=tuple(range(1, diff.ndim)), dtype=np.float64)


def calibrate(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The threshold that flags `target_fpr` of held-out normal images: their (1 - fpr) quantile."""
    if not 0 < target_fpr < 1:
        raise ValueError("target_fpr must be in (0, 1)")
    scores = np.asarray(normal_scores, np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    return float(np.quantile(scores, 1.0 - target_fpr, method="higher"))


def mse_block(normal_scores: np.ndarray, target_fpr: float = 0.01) -> dict:
    """The manifest's `anomaly` block for the plain reconstruction-MSE scorer."""
    return {
        "scorer": "mse",
        "threshold": calibrate(normal_scores, target_fpr),
        "target_fpr": target_fpr,
        "calibration_images": len(normal_scores),
        "calibration_split": "validation",
    }


def error_heatmap(inputs: np.ndarray, output: np.ndarray, scale: float) -> np.ndarray:
    """Per-pixel squared error, colour-mapped (JET) and laid over the input: RGB uint8.

    `scale` is the squared error shown as the hottest colour, fixed per model so that heatmaps
    of different images compare.
    """
    import cv2

    error = np.mean(np.square(inputs.astype(np.float32) - output.astype(np.float32)), axis=-1)
    level = np.clip(error / max(scale, 1e-12), 0.0, 1.0)
    colours = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = np.clip(inputs * 255.0, 0, 255).astype(np.uint8)
    overlay = cv2.addWeighted(base, 0.45, cv2.cvtColor(colours, cv2.COLOR_BGR2RGB), 0.55, 0)
    return overlay
