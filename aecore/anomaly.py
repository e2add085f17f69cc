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
- `texture`: Mahalanobis distance of multi-scale high-frequency energy statistics (the noise
  residual's floor, median and peaks at three scales) under a Gaussian of training images:
  noise lifts them, blur, fog and low contrast lower them, whatever their parameters;
- `structure`: one minus the multi-scale SSIM of input and reconstruction;
- `features`: PaDiM-style density of the encoder's own intermediate features per spatial
  position (a mean per position, one shared covariance), mean of the distance map;
- `combined`: each of its parts put on the scale of its own held-out normal images (0 at their
  median, 1 at their 99th percentile; two-sided parts on the log scale, distance from the
  median either way), then the largest: as anomalous as the most alarmed.

Served scores are normalised to (0, 1) with the threshold at 0.5 (as anomalib does): a logistic
map of the raw score, centred on the calibrated threshold, one unit being the distance from the
normal median to the threshold divided by ln 9 (so the normal median maps to 0.1). Manifests
without `logistic_scale` (before normalisation existed) serve the raw score.

Reconstruction error alone is a weak detector on natural scenes (smooth off-domain images
reconstruct *better* than the scenes); the image-statistics detectors cover what it misses.
The manifest's `anomaly` block holds the default scorer, one calibrated threshold per scorer,
the combined scorer's normalisation and each scorer's 0-1 map; the Gaussians sit in
`gaussians.npz`, the feature scorer's graph (the encoder cut after its second stage) in
`features.onnx`; both are hashed in the block and in the manifest's `files`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GAUSSIAN_FILE = "gaussians.npz"
FEATURE_GRAPH = "features.onnx"
DEFAULT_SIGMA = 4.0
# The normal median maps to 0.1 on the 0-1 scale: logistic(-ln 9) = 0.1.
MEDIAN_LOGIT = float(np.log(9.0))


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


def texture_statistics(inputs: np.ndarray, scales: int = 3) -> np.ndarray:
    """Per image, at each of `scales` pyramid levels of the grey image: the log of the 10th,
    50th and 90th percentiles of the local (8x8) energy of the high-frequency residual
    (image minus its Gaussian blur) and of its mean: 4 * scales numbers.

    The low percentile is the noise floor that smooth regions show, the high one the detail of
    edges: added noise lifts the floor, blur and haze lower the peaks, at any strength.
    """
    rows = np.empty((len(inputs), 4 * scales))
    for i, image in enumerate(inputs.astype(np.float32)):
        level = image.mean(axis=-1)
        for s in range(scales):
            band = level - cv2.GaussianBlur(level, (0, 0), sigmaX=1.0)
            energy = cv2.blur(band * band, (8, 8))[4::8, 4::8].ravel()
            stats = np.r_[np.quantile(energy, [0.1, 0.5, 0.9]), np.mean(band * band)]
            rows[i, 4 * s : 4 * s + 4] = np.log(stats + 1e-8)
            level = cv2.pyrDown(level)
    return rows


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two [H, W, 3] images in [0, 1] (Wang et al. 2004, Gaussian window 1.5)."""
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (7, 7), 1.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    return float(ssim.mean())


def structural_error(inputs: np.ndarray, outputs: np.ndarray, scales: int = 3) -> np.ndarray:
    """One minus the SSIM of input and reconstruction, averaged over `scales` pyramid levels:
    texture and structure the model cannot reproduce count where a mean error averages out."""
    out = np.empty(len(inputs))
    for i, (a, b) in enumerate(zip(inputs.astype(np.float32), outputs, strict=True)):
        b = b.astype(np.float32)
        values = []
        for _ in range(scales):
            values.append(_ssim(a, b))
            a, b = cv2.pyrDown(a), cv2.pyrDown(b)
        out[i] = 1.0 - float(np.mean(values))
    return out


class FeatureDensity:
    """PaDiM with the model's own encoder as the backbone (no pretrained network is available
    offline): the encoder's two first stages, pooled to the second's grid and concatenated,
    scored per position by the Mahalanobis distance to that position's training mean under one
    shared covariance; the image's score is the map's mean (on corrupted held-out normals the
    mean separated better than PaDiM's peak: whole-image changes, not local defects)."""

    def __init__(self, graph: Path, mean: np.ndarray, precision: np.ndarray) -> None:
        from aecore.graphs import open_session

        self.session = open_session(graph)
        self.input = self.session.get_inputs()[0].name
        self.mean = mean.astype(np.float32)  # [h, w, C]
        self.precision = precision.astype(np.float32)  # [C, C]

    def features(self, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """[N, h, w, C]: every stage's map average-pooled to the coarsest grid, channels joined."""
        chunks = []
        for i in range(0, len(inputs), batch_size):
            batch = np.ascontiguousarray(inputs[i : i + batch_size], np.float32)
            maps = self.session.run(None, {self.input: batch})  # NCHW each
            h, w = maps[-1].shape[2:]
            pooled = [
                m.reshape(len(m), m.shape[1], h, m.shape[2] // h, w, m.shape[3] // w).mean((3, 5))
                for m in maps
            ]
            chunks.append(np.concatenate(pooled, axis=1).transpose(0, 2, 3, 1))
        return np.concatenate(chunks)

    def distance_maps(self, inputs: np.ndarray) -> np.ndarray:
        centred = self.features(inputs) - self.mean
        return np.einsum("nhwi,ij,nhwj->nhw", centred, self.precision, centred)

    def __call__(self, ev: Evidence) -> np.ndarray:
        return self.distance_maps(ev.inputs).mean(axis=(1, 2), dtype=np.float64)


Scorer = Callable[[Evidence], np.ndarray]

# What each density scorer measures; its Gaussian is stored as <name>_mean, <name>_precision.
DENSITY_FEATURES: dict[str, Callable[[Evidence], np.ndarray]] = {
    "latent": lambda ev: ev.latents,
    "colour": lambda ev: colour_statistics(ev.inputs),
    "texture": lambda ev: texture_statistics(ev.inputs),
}


def mse_scorer() -> Scorer:
    return lambda ev: per_image_mse(ev.inputs, ev.outputs)


def local_scorer(sigma: float = DEFAULT_SIGMA) -> Scorer:
    return lambda ev: error_maps(ev.inputs, ev.outputs, sigma).reshape(len(ev.inputs), -1).max(1)


def density_scorer(name: str, mean: np.ndarray, precision: np.ndarray) -> Scorer:
    features = DENSITY_FEATURES[name]
    return lambda ev: mahalanobis(features(ev), mean, precision)


def combined_scorer(parts: dict[str, Scorer], norms: dict[str, dict[str, float]]) -> Scorer:
    """The largest normalised score over `parts`; `norms` gives each part's centre and scale,
    and for a two-sided part (`two_sided`) the centre and scale of its log."""

    def score(ev: Evidence) -> np.ndarray:
        return np.max(np.stack([_normalised(parts[n](ev), norm) for n, norm in norms.items()]), 0)

    return score


def _normalised(scores: np.ndarray, norm: dict) -> np.ndarray:
    if norm.get("two_sided"):
        return np.abs(np.log(np.maximum(scores, 1e-12)) - norm["center"]) / norm["scale"]
    return (scores - norm["center"]) / norm["scale"]


def normalisation(normal_scores: np.ndarray, two_sided: bool = False) -> dict[str, float]:
    """Centre at the median of held-out normal scores, unit at their 99th percentile.

    Two-sided (a typicality test): on the log of the score, centre at its median, unit at the
    99th percentile of the distance from it, so an image whose statistic is unusually low (a
    blurred image reconstructs too well, fog leaves features too bland) counts as much as one
    whose statistic is unusually high.
    """
    scores = np.asarray(normal_scores, np.float64)
    if two_sided:
        logs = np.log(np.maximum(scores, 1e-12))
        center = float(np.median(logs))
        spread = float(np.quantile(np.abs(logs - center), 0.99))
        return {"center": center, "scale": max(spread, 1e-12), "two_sided": True}
    median, q99 = np.quantile(scores, [0.5, 0.99])
    return {"center": float(median), "scale": float(max(q99 - median, 1e-12))}


def logistic_scale(normal_scores: np.ndarray, threshold: float) -> float:
    """The unit of the 0-1 map: the normal median lands at 0.1 and the threshold at 0.5."""
    median = float(np.median(np.asarray(normal_scores, np.float64)))
    return max(threshold - median, 1e-12 * max(abs(threshold), 1.0)) / MEDIAN_LOGIT


def unit_score(raw: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    """Raw scores on the 0-1 scale: logistic((raw - threshold) / scale), exactly 0.5 at the
    threshold (tanh form: no overflow far from it)."""
    z = (np.asarray(raw, np.float64) - threshold) / scale
    return 0.5 * (1.0 + np.tanh(0.5 * z))


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
        self.scales = {
            n: float(s["logistic_scale"]) for n, s in specs.items() if "logistic_scale" in s
        }
        self.sigma = float(specs.get("local", {}).get("sigma", DEFAULT_SIGMA))
        self.heatmap_scale = float(block.get("heatmap_scale", 0.05))
        self._scorers: dict[str, Scorer] = {}
        gaussians = self._gaussians(specs, folder)
        for name, spec in specs.items():
            if name == "mse":
                self._scorers[name] = mse_scorer()
            elif name == "local":
                self._scorers[name] = local_scorer(self.sigma)
            elif name == "noise":
                self._scorers[name] = lambda ev: noise_level(ev.inputs)
            elif name == "flat":
                self._scorers[name] = lambda ev: flat_fraction(ev.inputs)
            elif name == "structure":
                self._scorers[name] = lambda ev: structural_error(ev.inputs, ev.outputs)
            elif name == "features":
                graph = Path(folder) / spec["graph"]
                _check_hash(graph, spec.get("graph_sha256"))
                mean, precision = gaussians["features_mean"], gaussians["features_precision"]
                self._scorers[name] = FeatureDensity(graph, mean, precision)
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
        """Raw scores, higher meaning more anomalous, on the scorer's own scale."""
        return self._scorers[name](evidence)

    def normalised(self, name: str) -> bool:
        return name in self.scales and name in self.thresholds

    def unit(self, name: str, raw: np.ndarray) -> np.ndarray:
        """Raw scores on the 0-1 scale (threshold at 0.5); raw where the manifest has no map."""
        if not self.normalised(name):
            return np.asarray(raw, np.float64)
        return unit_score(raw, self.thresholds[name], self.scales[name])

    def unit_threshold(self, name: str) -> float:
        """The threshold on the scale `unit` returns: 0.5, or the raw one without a map."""
        return 0.5 if self.normalised(name) else self.thresholds[name]


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
