"""Anomaly scorers and their calibration; thresholds and normalisation travel with the model.

Every scorer maps the evidence the graphs already give (preprocessed inputs, reconstructions
and latents) to one score per image, higher meaning more anomalous:

- `mse`: mean squared reconstruction error (the reference approach);
- `local`: the peak of the Gaussian-smoothed per-pixel error map, as anomalib scores images
  from their anomaly maps: a small occluder or stain stands out where a global mean hides it;
- `latent`: squared Mahalanobis distance of the latent under a Gaussian fitted on the training
  latents, for images that reconstruct well but lie off the training distribution;
- `combined`: each of the above standardised by its own held-out normal distribution, then
  the largest of them: an image is as anomalous as its most alarmed detector.

The manifest's `anomaly` block holds the default scorer, one calibrated threshold per scorer,
and everything they need; the latent Gaussian sits beside the graphs in `latent_gaussian.npz`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GAUSSIAN_FILE = "latent_gaussian.npz"
DEFAULT_SIGMA = 4.0


@dataclass
class Evidence:
    """What the graphs give for N images: inputs and outputs [N, H, W, 3], latents [N, D]."""

    inputs: np.ndarray
    outputs: np.ndarray
    latents: np.ndarray


def per_image_mse(inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Mean squared error per image, both in [0, 1]."""
    diff = inputs.astype(np.float32) - outputs.astype(np.float32)
    return np.mean(np.square(diff), axis=tuple(range(1, diff.ndim)), dtype=np.float64)


def error_maps(inputs: np.ndarray, outputs: np.ndarray, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Per-pixel squared error averaged over channels, Gaussian-smoothed: [N, H, W]."""
    error = np.mean(np.square(inputs.astype(np.float32) - outputs.astype(np.float32)), axis=-1)
    if sigma <= 0:
        return error
    return np.stack([cv2.GaussianBlur(e, (0, 0), sigmaX=sigma) for e in error])


def mahalanobis(latents: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = latents.astype(np.float64) - mean
    return np.einsum("ij,jk,ik->i", centred, precision, centred)


Scorer = Callable[[Evidence], np.ndarray]


def mse_scorer() -> Scorer:
    return lambda ev: per_image_mse(ev.inputs, ev.outputs)


def local_scorer(sigma: float = DEFAULT_SIGMA) -> Scorer:
    return lambda ev: error_maps(ev.inputs, ev.outputs, sigma).reshape(len(ev.inputs), -1).max(1)


def latent_scorer(mean: np.ndarray, precision: np.ndarray) -> Scorer:
    return lambda ev: mahalanobis(ev.latents, mean, precision)


def combined_scorer(parts: dict[str, Scorer], norms: dict[str, dict[str, float]]) -> Scorer:
    """The largest standardised score over `parts`; `norms` gives each part's centre and scale."""

    def score(ev: Evidence) -> np.ndarray:
        standardised = [
            (parts[name](ev) - norm["center"]) / norm["scale"] for name, norm in norms.items()
        ]
        return np.max(np.stack(standardised), axis=0)

    return score


def standardisation(normal_scores: np.ndarray) -> dict[str, float]:
    """Robust centre and scale of held-out normal scores (median and IQR/1.349 ~ one sigma)."""
    q25, median, q75 = np.quantile(np.asarray(normal_scores, np.float64), [0.25, 0.5, 0.75])
    return {"center": float(median), "scale": float(max((q75 - q25) / 1.349, 1e-12))}


def calibrate(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The threshold that flags `target_fpr` of held-out normal images: their (1 - fpr) quantile."""
    if not 0 < target_fpr < 1:
        raise ValueError("target_fpr must be in (0, 1)")
    scores = np.asarray(normal_scores, np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    return float(np.quantile(scores, 1.0 - target_fpr, method="higher"))


class AnomalyScorers:
    """The scorers a manifest's `anomaly` block describes, with their thresholds."""

    def __init__(self, block: dict, folder: Path) -> None:
        self.default = block["scorer"]
        self.target_fpr = block.get("target_fpr")
        specs = block.get("scorers") or {self.default: {"threshold": block["threshold"]}}
        self.thresholds = {name: float(spec["threshold"]) for name, spec in specs.items()}
        self.heatmap_scale = float(block.get("heatmap_scale", 5 * self.thresholds[self.default]))
        self.sigma = float(specs.get("local", {}).get("sigma", DEFAULT_SIGMA))
        self._scorers: dict[str, Scorer] = {}
        for name in specs:
            if name == "mse":
                self._scorers[name] = mse_scorer()
            elif name == "local":
                self._scorers[name] = local_scorer(self.sigma)
            elif name == "latent":
                path = Path(folder) / specs[name].get("file", GAUSSIAN_FILE)
                _check_hash(path, specs[name].get("sha256"))
                with np.load(path) as gaussian:
                    self._scorers[name] = latent_scorer(gaussian["mean"], gaussian["precision"])
        if "combined" in specs:
            norms = specs["combined"]["normalisation"]
            self._scorers["combined"] = combined_scorer(self._scorers, norms)
        unknown = set(specs) - set(self._scorers)
        if unknown:
            raise ValueError(f"unknown anomaly scorer(s) {sorted(unknown)} in the manifest")

    @property
    def names(self) -> list[str]:
        return list(self._scorers)

    def score(self, name: str, evidence: Evidence) -> np.ndarray:
        return self._scorers[name](evidence)


def _check_hash(path: Path, expected: str | None) -> None:
    from aecore.manifest import ModelFolderError, sha256_file

    if not path.is_file():
        raise ModelFolderError(f"{path} not found; the manifest's latent scorer needs it")
    if expected is not None and sha256_file(path) != expected:
        raise ModelFolderError(f"{path} does not match its sha256 in the manifest")


def error_heatmap(inputs: np.ndarray, output: np.ndarray, scale: float, sigma: float) -> np.ndarray:
    """The smoothed error map of one image, colour-mapped (JET) and laid over it: RGB uint8.

    `scale` is the error drawn hottest, fixed per model so that heatmaps of images compare.
    """
    error = error_maps(inputs[None], output[None], sigma)[0]
    level = np.clip(error / max(scale, 1e-12), 0.0, 1.0)
    colours = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = np.clip(inputs * 255.0, 0, 255).astype(np.uint8)
    return cv2.addWeighted(base, 0.45, cv2.cvtColor(colours, cv2.COLOR_BGR2RGB), 0.55, 0)
