"""Anomaly scorers and their calibration; thresholds and normalisation travel with the model.

Every scorer maps the evidence the graphs already give (preprocessed inputs, reconstructions
and latents) to one score per image, higher meaning more anomalous:

- `mse`: mean squared reconstruction error (the reference approach);
- `local`: the peak of the Gaussian-smoothed per-pixel error map, as anomalib scores images
  from their anomaly maps: a small defect stands out where a global mean hides it;
- `latent`: squared Mahalanobis distance of the latent under a Gaussian of training latents;
- `noise`: the image's noise level (Donoho's estimate from the finest Haar detail band);
- `flat`: the fraction of perfectly flat pixels (occluders, dead or padded regions);
- `colour`: Mahalanobis distance of colour statistics under a Gaussian of training images;
- `combined`: each of the above put on the scale of its own held-out normal images (0 at their
  median, 1 at their 99th percentile), then the largest: as anomalous as the most alarmed.

Reconstruction error alone is a weak detector on natural scenes (smooth off-domain images
reconstruct *better* than the scenes); the image-statistics detectors cover what it misses.
The manifest's `anomaly` block holds the default scorer, one calibrated threshold per scorer
and the combined scorer's normalisation; both Gaussians sit in `gaussians.npz`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GAUSSIAN_FILE = "gaussians.npz"
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


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = features.astype(np.float64) - mean
    return np.einsum("ij,jk,ik->i", centred, precision, centred)


def noise_level(inputs: np.ndarray) -> np.ndarray:
    """Donoho's sigma estimate, median(|HH|) / 0.6745, on the finest diagonal Haar band of the
    grey image: edges barely move the median, sensor noise lifts it."""
    grey = inputs.mean(axis=-1)
    h, w = grey.shape[1] // 2 * 2, grey.shape[2] // 2 * 2
    g = grey[:, :h, :w]
    hh = (g[:, 0::2, 0::2] - g[:, 0::2, 1::2] - g[:, 1::2, 0::2] + g[:, 1::2, 1::2]) / 2
    return np.median(np.abs(hh).reshape(len(g), -1), axis=1) / 0.6745


def flat_fraction(inputs: np.ndarray, window: int = 5, tolerance: float = 1e-6) -> np.ndarray:
    """Fraction of pixels whose window x window neighbourhood is constant in every channel."""
    out = np.empty(len(inputs))
    for i, image in enumerate(inputs.astype(np.float32)):
        mean = cv2.blur(image, (window, window))
        variance = cv2.blur(image * image, (window, window)) - mean * mean
        out[i] = np.mean(variance.max(axis=-1) < tolerance)
    return out


def colour_statistics(inputs: np.ndarray) -> np.ndarray:
    """Per image: RGB mean and spread, mean RGB of the top and bottom thirds (sky, ground),
    mean and spread of HSV saturation: 14 numbers."""
    third = inputs.shape[1] // 3
    saturation = np.stack(
        [cv2.cvtColor(im.astype(np.float32), cv2.COLOR_RGB2HSV)[..., 1] for im in inputs]
    )
    return np.concatenate(
        [
            inputs.mean(axis=(1, 2)),
            inputs.std(axis=(1, 2)),
            inputs[:, :third].mean(axis=(1, 2)),
            inputs[:, -third:].mean(axis=(1, 2)),
            np.stack([saturation.mean(axis=(1, 2)), saturation.std(axis=(1, 2))], axis=1),
        ],
        axis=1,
    )


Scorer = Callable[[Evidence], np.ndarray]

# What each density scorer measures; its Gaussian is stored as <name>_mean, <name>_precision.
DENSITY_FEATURES: dict[str, Callable[[Evidence], np.ndarray]] = {
    "latent": lambda ev: ev.latents,
    "colour": lambda ev: colour_statistics(ev.inputs),
}


def mse_scorer() -> Scorer:
    return lambda ev: per_image_mse(ev.inputs, ev.outputs)


def local_scorer(sigma: float = DEFAULT_SIGMA) -> Scorer:
    return lambda ev: error_maps(ev.inputs, ev.outputs, sigma).reshape(len(ev.inputs), -1).max(1)


def density_scorer(name: str, mean: np.ndarray, precision: np.ndarray) -> Scorer:
    features = DENSITY_FEATURES[name]
    return lambda ev: mahalanobis(features(ev), mean, precision)


def combined_scorer(parts: dict[str, Scorer], norms: dict[str, dict[str, float]]) -> Scorer:
    """The largest normalised score over `parts`; `norms` gives each part's centre and scale."""

    def score(ev: Evidence) -> np.ndarray:
        normalised = [
            (parts[name](ev) - norm["center"]) / norm["scale"] for name, norm in norms.items()
        ]
        return np.max(np.stack(normalised), axis=0)

    return score


def normalisation(normal_scores: np.ndarray) -> dict[str, float]:
    """Centre at the median of held-out normal scores, unit at their 99th percentile."""
    median, q99 = np.quantile(np.asarray(normal_scores, np.float64), [0.5, 0.99])
    return {"center": float(median), "scale": float(max(q99 - median, 1e-12))}


def calibrate(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The threshold that flags `target_fpr` of held-out normal images: their (1 - fpr) quantile."""
    if not 0 < target_fpr < 1:
        raise ValueError("target_fpr must be in (0, 1)")
    scores = np.asarray(normal_scores, np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    return float(np.quantile(scores, 1.0 - target_fpr, method="higher"))


class AnomalyScorers:
    """The scorers a manifest's `anomaly` block describes, with their calibrated thresholds.

    While calibrating, the block may lack thresholds and the combined scorer.
    """

    def __init__(self, block: dict, folder: Path) -> None:
        self.default = block["scorer"]
        specs = block["scorers"]
        self.thresholds = {n: float(s["threshold"]) for n, s in specs.items() if "threshold" in s}
        self.sigma = float(specs.get("local", {}).get("sigma", DEFAULT_SIGMA))
        self.heatmap_scale = float(block.get("heatmap_scale", 0.05))
        self._scorers: dict[str, Scorer] = {}
        gaussians = self._gaussians(specs, folder)
        for name in specs:
            if name == "mse":
                self._scorers[name] = mse_scorer()
            elif name == "local":
                self._scorers[name] = local_scorer(self.sigma)
            elif name == "noise":
                self._scorers[name] = lambda ev: noise_level(ev.inputs)
            elif name == "flat":
                self._scorers[name] = lambda ev: flat_fraction(ev.inputs)
            elif name in DENSITY_FEATURES:
                mean, precision = gaussians[f"{name}_mean"], gaussians[f"{name}_precision"]
                self._scorers[name] = density_scorer(name, mean, precision)
        if "combined" in specs:
            norms = specs["combined"]["normalisation"]
            self._scorers["combined"] = combined_scorer(dict(self._scorers), norms)
        unknown = set(specs) - set(self._scorers)
        if unknown:
            raise ValueError(f"unknown anomaly scorer(s) {sorted(unknown)} in the manifest")

    @staticmethod
    def _gaussians(specs: dict, folder: Path) -> dict[str, np.ndarray]:
        files = {spec["file"]: spec.get("sha256") for name, spec in specs.items() if "file" in spec}
        arrays: dict[str, np.ndarray] = {}
        for file, expected in files.items():
            path = Path(folder) / file
            _check_hash(path, expected)
            with np.load(path) as data:
                arrays.update({key: data[key] for key in data.files})
        return arrays

    @property
    def names(self) -> list[str]:
        return list(self._scorers)

    def score(self, name: str, evidence: Evidence) -> np.ndarray:
        return self._scorers[name](evidence)


def _check_hash(path: Path, expected: str | None) -> None:
    from aecore.manifest import ModelFolderError, sha256_file

    if not path.is_file():
        raise ModelFolderError(f"{path} not found; the manifest's anomaly scorers need it")
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
