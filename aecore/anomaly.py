"""Anomaly scorers and their calibration; thresholds and normalisation travel with the model.

Every scorer maps the evidence the graphs already give (preprocessed inputs, reconstructions
and latents) to one score per image, higher meaning more anomalous:

- `mse`: mean squared reconstruction error (the reference approach);
- `local`: the peak of the Gaussian-smoothed per-pixel error map, as anomalib scores images
  from their anomaly maps: a small defect stands out where a global mean hides it;
- `latent`: squared Mahalanobis distance of the latent under a Gaussian of training latents;
- `noise`: the image's noise level (Donoho's estimate from the finest Haar detail band);
- `noise_floor`: the noise floor of the image's flattest colour patches (the square root of
  the smallest eigenvalue of their covariance): noise drawn per pixel and channel lifts it at
  levels where a scene's texture hides it from `noise`;
- `noise_floors`: the larger of `noise_floor` and the same floor of the grey image on 5 x 5
  patches (`grey_noise_floor`: noise the same in every channel), each in units of the training
  images' 99th-percentile rise above their median; only a rise counts;
- `flat`: the fraction of perfectly flat pixels (occluders, dead or padded regions);
- `colour`: Mahalanobis distance of colour statistics under a Gaussian of training images;
- `texture`: Mahalanobis distance of multi-scale high-frequency energy statistics (the noise
  residual's floor, median and peaks at three scales) under a Gaussian of training images:
  noise lifts them, blur, fog and low contrast lower them, whatever their parameters;
- `structure`: one minus the multi-scale SSIM of input and reconstruction;
- `excess_mse`, `excess_structure`: those two errors relative to the detail the image holds
  (`detail_level`): the log error minus what a line through training images' log detail and
  log error predicts. An autoencoder reproduces smooth images of anything better than detailed
  ones (Serra et al. 2020, input complexity), so an off-domain photo's raw error looks normal
  or low; for its detail level it is high. Since version 10 the detail level may be net of what
  noise at the grey noise floor adds to it (`log_net_detail`, its factor fitted with the line;
  version 10's MSE is, its structural error is not): noise lifts the detail level far more
  than the error, and against the raw level a noisy image looked better reconstructed than its
  detail predicts;
- `features`: PaDiM-style density of the encoder's own intermediate features per spatial
  position (a mean per position, one shared covariance), mean of the distance map;
- `photometric`: Mahalanobis distance of where the tonal range sits (black and white points,
  median, contrast, saturation, on log scales) under a Gaussian of training images:
  brightness, contrast and exposure shifts and veils (frost, haze) whatever the scene;
- `resampling`: Mahalanobis distance of the power spectrum's local slopes up to and past
  Nyquist and of edge-orientation coherence at three scales: evidence of pixels moved and
  interpolated (elastic and zoom warps), smoothed (blur) or quantised (JPEG), independent of
  contrast and of any block grid;
- `naturalness`: Mahalanobis distance of natural-scene statistics (BRISQUE's 36 features, Mittal
  et al. 2012: the shape and spread of mean-subtracted contrast-normalised coefficients and of
  their neighbours' products in four directions, at two scales) under a Gaussian of training
  images: blur, noise, ringing and smearing change how these coefficients are distributed
  whatever the scene holds; motion and zoom blur, which barely move the energies, show here;
- `tonal`: the photometric statistics tested one at a time: the largest of their distances from
  the training images' medians, each in units of its own 99th-percentile distance. A black
  point lifted past any training photo's (brightness, frost, snow) counts in full even where
  the other tonal statistics stay put, which the joint density of `photometric` dilutes;
- `typicality`: Mahalanobis distance of each encoder feature channel's pooled log mean and
  spread (both stages of `features.onnx`) under a Ledoit-Wolf Gaussian of training images:
  whether the image's mix of textures is that of the training scenes (off-domain photos);
- `combined`: each of its parts put on the scale of its own held-out normal images (0 at their
  median, 1 at their 99th percentile; two-sided parts on the log scale, distance from the
  median either way), then joined by its manifest's aggregate (`AGGREGATES`). Its parts are
  the ones its manifest's normalisation lists, so versions published before a part existed
  serve exactly as before.

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

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
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
    _statistics: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def statistic(self, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """`compute(self.inputs)`, once per Evidence however many scorers read it (`combined`
        runs `photometric` and `tonal` on the same statistics); shared, so never modified."""
        if compute not in self._statistics:
            self._statistics[compute] = compute(self.inputs)
        return self._statistics[compute]


Scorer = Callable[[Evidence], np.ndarray]


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


def noise_floor(inputs: np.ndarray, patch: int = 3, flattest: float = 0.3) -> np.ndarray:
    """The noise floor (about a sigma) of each image's flattest colour patches: the square root
    of the smallest eigenvalue of the covariance of its patch x patch RGB patches at every other
    position, over the `flattest` share of them, ranked by their channels' own spatial variance;
    after Liu, Tanaka and Okutomi's noise-level estimate (2013).

    A clean photo's flat patches hold almost nothing in their weakest direction whatever the
    scene, because colour varies smoothly and mostly along the luma direction; noise drawn
    per pixel and channel lifts every direction by its variance, where the scene's texture
    cannot mask it as it masks noise in `noise_level`'s grey detail band. Ranked per channel,
    so a flat saturated region (a blue sky) counts as flat; perfectly constant patches are left
    out (constant regions are `flat_fraction`'s business), so a clean border or bar cannot hide
    noise elsewhere. At least one more patch than a patch has numbers is kept, for a full-rank
    covariance; images without that many varying patches score 0; a non-finite pixel makes the
    score NaN.
    """
    out = np.empty(len(inputs))
    for i, image in enumerate(inputs.astype(np.float32)):
        if not np.isfinite(image).all():
            out[i] = np.nan
            continue
        windows = np.lib.stride_tricks.sliding_window_view(image, (patch, patch), axis=(0, 1))
        windows = windows[::2, ::2].reshape(-1, image.shape[-1], patch * patch)  # [n, C, p*p]
        spread = windows.var(axis=2).sum(axis=1)
        # Not `> 0`: the float variance of equal values can round above 0, by far less than
        # one 8-bit step in one pixel adds (1.5e-6).
        varying = spread > 1e-10
        patches = windows[varying].reshape(-1, windows.shape[1] * windows.shape[2])
        spread = spread[varying]
        if len(patches) <= patches.shape[1]:
            out[i] = 0.0
            continue
        keep = max(int(len(patches) * flattest), patches.shape[1] + 1)  # a full-rank covariance
        flat = patches[np.argpartition(spread, keep - 1)[:keep]]
        out[i] = np.sqrt(max(np.linalg.eigvalsh(np.cov(flat.T.astype(np.float64)))[0], 0.0))
    return out


def grey_noise_floor(inputs: np.ndarray) -> np.ndarray:
    """`noise_floor` of the grey image (the channels' mean) on 5 x 5 patches: noise drawn the
    same in every channel (a grey sensor's, or what JPEG's chroma subsampling leaves of colour
    noise) lies along the luma direction, where `noise_floor`'s weakest colour direction does
    not see it; the highest-frequency pattern of a clean photo's flat grey patches holds little."""
    return noise_floor(inputs.astype(np.float32).mean(axis=-1, keepdims=True), patch=5)


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


def photometric_statistics(inputs: np.ndarray) -> np.ndarray:
    """Per image, where the tonal range sits: log distances of the brightest channel's (HSV
    value's) 1st, 10th percentiles from black and of its 90th, 99th from white, its median,
    the darkest channel's 1st percentile, the grey image's spread and the median and 90th
    percentile of saturation: 9 numbers.

    Photos nearly always hold near-black and near-white pixels; a brightness, contrast or
    exposure shift (or a veil such as frost) lifts the black point or lowers the white point
    whatever the scene, which the colour means barely show. Logs, so that a black point moving
    from 0.01 to 0.1 counts as much as one moving from 0.1 to 1.
    """
    eps = 1.0 / 255
    rows = np.empty((len(inputs), 9))
    for i, image in enumerate(inputs.astype(np.float32)):
        value, low = image.max(axis=-1), image.min(axis=-1)
        saturation = (value - low) / np.maximum(value, eps)
        v1, v10, v50, v90, v99 = np.quantile(value, [0.01, 0.1, 0.5, 0.9, 0.99])
        s50, s90 = np.quantile(saturation, [0.5, 0.9])
        rows[i] = np.log(
            [v1 + eps, v10 + eps, 1 - v90 + eps, 1 - v99 + eps, v50 + eps,
             np.quantile(low, 0.01) + eps, image.mean(axis=-1).std() + eps, s50 + eps, s90 + eps]
        )  # fmt: skip
    return rows


# Radial frequency bands (cycles per pixel) of `resampling_statistics`: octave-like steps up
# to Nyquist (0.5) and the corners beyond it along the diagonals.
SPECTRUM_BANDS = (0.03, 0.06, 0.1, 0.15, 0.21, 0.28, 0.35, 0.42, 0.5, 0.71)
COHERENCE_SCALES = 3


def resampling_statistics(inputs: np.ndarray) -> np.ndarray:
    """Per image, evidence that its pixels were moved and interpolated: the shape of the grey
    image's power spectrum (the log power of each radial band of `SPECTRUM_BANDS`,
    Hann-windowed, minus that of the band below it: 8 local slopes) and the log orientation
    coherence of its strongest edges at `COHERENCE_SCALES` pyramid levels: 11 numbers.

    Natural images fall off as a power law with a narrow spread of slopes; an elastic warp
    (each pixel moved about a pixel its own way, then interpolated) leaks power from the band
    below Nyquist into the diagonal corners and frays straight edges at the finest scales
    while coarser ones stay coherent; blur and JPEG quantisation cut the bands near Nyquist
    and smooth edges into coherence. Differences of logs and coherence ignore contrast, and
    nothing here depends on where a block grid falls, so resizing a user's image neither fakes
    nor hides them.
    """
    n, h, w = inputs.shape[:3]
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fy * fy + fx * fx)
    bands = [(radius >= a) & (radius < b) for a, b in itertools.pairwise(SPECTRUM_BANDS)]
    rows = np.empty((n, len(bands) - 1 + COHERENCE_SCALES))
    for i, image in enumerate(inputs.astype(np.float32)):
        grey = image.mean(axis=-1)
        power = np.abs(np.fft.rfft2((grey - grey.mean()) * window)) ** 2
        logs = np.log([power[band].mean() + 1e-12 for band in bands])
        rows[i, : len(bands) - 1] = np.diff(logs)
        rows[i, len(bands) - 1 :] = np.log(_edge_coherence(grey, COHERENCE_SCALES))
    return rows


def _edge_coherence(grey: np.ndarray, scales: int) -> list[float]:
    """Mean structure-tensor coherence (0 for no direction, 1 for a straight edge) of the
    strongest fifth of the gradients, at each of `scales` pyramid levels."""
    out = []
    for _ in range(scales):
        gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
        jxx, jyy, jxy = (cv2.GaussianBlur(m, (0, 0), 1.0) for m in (gx * gx, gy * gy, gx * gy))
        trace = jxx + jyy
        coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy) / (trace + 1e-9)
        out.append(float(coherence[trace >= np.quantile(trace, 0.8)].mean()) + 1e-6)
        grey = cv2.pyrDown(grey)
    return out


# Shape parameters tried when fitting a generalised Gaussian by moment matching (BRISQUE's
# grid), with the moment ratio each gives for the symmetric and the asymmetric form.
_SHAPES = np.arange(0.2, 10.0, 0.001)
_LOG_GAMMA = {k: np.array([math.lgamma(k / a) for a in _SHAPES]) for k in (1, 2, 3)}
_GGD_RATIO = np.exp(_LOG_GAMMA[1] + _LOG_GAMMA[3] - 2 * _LOG_GAMMA[2])
_AGGD_RATIO = 1.0 / _GGD_RATIO
NSS_SCALES = 2


def _mscn(grey: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (7x7 Gaussian window, sigma 7/6)."""
    mu = cv2.GaussianBlur(grey, (7, 7), 7 / 6)
    var = cv2.GaussianBlur(grey * grey, (7, 7), 7 / 6) - mu * mu
    return (grey - mu) / (np.sqrt(np.abs(var)) + 1.0 / 255)


def _ggd(x: np.ndarray) -> list[float]:
    """Shape and log variance of a zero-mean generalised Gaussian, by moment matching."""
    var, mean_abs = float(np.mean(x * x)), float(np.mean(np.abs(x)))
    shape = _SHAPES[np.argmin(np.abs(var / (mean_abs * mean_abs + 1e-12) - _GGD_RATIO))]
    return [float(shape), np.log(var + 1e-8)]


def _aggd(x: np.ndarray) -> list[float]:
    """Shape, mean and log left and right variances of an asymmetric generalised Gaussian
    (BRISQUE's moment matching; the mean as published, bounded by the two spreads)."""
    x = x.astype(np.float64)
    left, right = x[x < 0], x[x > 0]
    sl = float(np.sqrt(np.mean(left * left))) if left.size else 0.0
    sr = float(np.sqrt(np.mean(right * right))) if right.size else 0.0
    g = sl / max(sr, 1e-12)
    r = float(np.mean(np.abs(x))) ** 2 / (float(np.mean(x * x)) + 1e-12)
    ratio = r * (g**3 + 1) * (g + 1) / (g * g + 1) ** 2
    i = int(np.argmin(np.abs(ratio - _AGGD_RATIO)))
    mean = (sr - sl) * math.sqrt(_AGGD_RATIO[i])  # Γ(2/a)/Γ(1/a) · sqrt(Γ(1/a)/Γ(3/a))
    return [float(_SHAPES[i]), mean, np.log(sl * sl + 1e-8), np.log(sr * sr + 1e-8)]


def naturalness_statistics(inputs: np.ndarray) -> np.ndarray:
    """Per image, BRISQUE's features of the grey image at `NSS_SCALES` scales: the generalised
    Gaussian fit of its MSCN coefficients (2) and the asymmetric fits of the products of each
    coefficient with its right, lower and two diagonal neighbours (4 x 4): 18 per scale.

    (OpenCV computes these only in its contrib build; this keeps the core on one cv2 wheel.)
    """
    rows = np.empty((len(inputs), 18 * NSS_SCALES))
    for i, image in enumerate(inputs):
        grey, row = image.mean(axis=-1, dtype=np.float64), []  # float64: flat areas' variance
        for scale in range(NSS_SCALES):
            if scale:
                grey = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
            m = _mscn(grey)
            row += _ggd(m)
            for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
                neighbour = np.roll(m, (-dy, -dx), axis=(0, 1))
                row += _aggd((m * neighbour)[1:-1, 1:-1])
        rows[i] = row
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


def detail_level(inputs: np.ndarray) -> np.ndarray:
    """How much fine detail each image holds: the mean absolute Laplacian of its grey image."""
    grey = np.ascontiguousarray(inputs.astype(np.float32).mean(axis=-1))
    return np.array([np.abs(cv2.Laplacian(g, cv2.CV_32F)).mean(dtype=np.float64) for g in grey])


# The reconstruction errors, as scorers of their own and as what the excess scorers relate to
# the detail level.
ERRORS: dict[str, Scorer] = {
    "mse": lambda ev: per_image_mse(ev.inputs, ev.outputs),
    "structure": lambda ev: structural_error(ev.inputs, ev.outputs),
}
# Each excess scorer's error; its line (intercept, slope) is stored as <name>_line beside the
# Gaussians, and since version 10 its noise factor (`log_net_detail`) as <name>_noise_factor.
EXCESS_ERRORS: dict[str, str] = {"excess_mse": "mse", "excess_structure": "structure"}


# The noise factors tried when an excess scorer's line is fitted (`excess_fit`).
NOISE_FACTORS = tuple(float(f) for f in np.arange(0.0, 8.01, 0.25))


def log_net_detail(detail: np.ndarray, floor: np.ndarray | None, factor: float) -> np.ndarray:
    """log of the detail level net of what noise at the grey noise floor adds to it:
    sqrt(detail^2 - (factor x floor)^2), at least a tenth of the detail; `factor` 0 (versions
    8-9, and an error the floor does not help predict, such as version 10's structural error)
    leaves the raw detail level untouched. Noise lifts the Laplacian (white noise of sigma by
    about 3.6 sigma) while the autoencoder's error rises only by its variance, so against the raw
    detail level a noisy image looks *better* reconstructed than its detail predicts. Shifted by
    1e-4 so that a flat image (no detail) stays finite: its log, -9.2, lies far below any photo's,
    and it scores as far above the line, as anomalous as it is."""
    if factor:
        detail = np.sqrt(np.maximum(detail**2 - (factor * floor) ** 2, (0.1 * detail) ** 2))
    return np.log(detail + 1e-4)


def excess_error(name: str, ev: Evidence) -> np.ndarray:
    """The log of the excess scorer's error, floored at 1e-12 (a perfect reconstruction)."""
    return np.log(np.maximum(ERRORS[EXCESS_ERRORS[name]](ev), 1e-12))


def excess_fit(
    detail: np.ndarray, floor: np.ndarray, error: np.ndarray
) -> tuple[np.ndarray, float]:
    """From training images' detail levels, grey noise floors and log errors: the line
    (intercept, slope) through (log net detail, log error), with the noise factor of
    `NOISE_FACTORS` whose net detail level predicts the error best (least squared residual;
    ties go to the smaller factor)."""
    fits = []
    for factor in NOISE_FACTORS:
        x = log_net_detail(detail, floor, factor)
        slope, intercept = np.polyfit(x, error, 1)
        fits.append((float(np.sum(np.square(error - intercept - slope * x))), intercept, slope))
    # Within a relative 1e-9 of the least residual counts as a tie: factors that leave the detail
    # as it is (floors of 0) differ only by rounding, and must not win over 0 for that.
    least = min(fit[0] for fit in fits)
    k = next(i for i, fit in enumerate(fits) if fit[0] <= least + 1e-9 * abs(least))
    return np.array(fits[k][1:]), NOISE_FACTORS[k]


def excess_scorer(name: str, line: np.ndarray, factor: float = 0.0) -> Scorer:
    """How far each image's log error lies above the line for its net detail level."""

    def score(ev: Evidence) -> np.ndarray:
        floor = ev.statistic(grey_noise_floor) if factor else None
        detail = log_net_detail(ev.statistic(detail_level), floor, factor)
        return excess_error(name, ev) - (line[0] + line[1] * detail)

    return score


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


def feature_statistics(maps: np.ndarray) -> np.ndarray:
    """[N, 2C] from feature maps [N, h, w, C]: each channel's log mean and log spread over the
    positions (what the image holds, wherever it is: a style, not a layout)."""
    flat = maps.reshape(len(maps), -1, maps.shape[-1]).astype(np.float64)
    return np.log(np.concatenate([flat.mean(1), flat.std(1)], axis=1) + 1e-6)


class FeatureTypicality(FeatureDensity):
    """Whether an image's encoder features are typical as a whole: the Mahalanobis distance of
    `feature_statistics` of both stages' maps under a Gaussian of training images (Ledoit-Wolf).
    `features` asks whether each position looks like that position in training scenes; this
    asks whether the mix of textures and materials does, which an off-domain photo fails
    wherever it puts them."""

    def __call__(self, ev: Evidence) -> np.ndarray:
        return mahalanobis(feature_statistics(self.features(ev.inputs)), self.mean, self.precision)


# What each density scorer measures; its Gaussian is stored as <name>_mean, <name>_precision.
DENSITY_FEATURES: dict[str, Callable[[Evidence], np.ndarray]] = {
    "latent": lambda ev: ev.latents,
    "colour": lambda ev: colour_statistics(ev.inputs),
    "texture": lambda ev: texture_statistics(ev.inputs),
    "photometric": lambda ev: ev.statistic(photometric_statistics),
    "resampling": lambda ev: resampling_statistics(ev.inputs),
    "naturalness": lambda ev: naturalness_statistics(ev.inputs),
}


# Statistics tested one at a time (`marginal_scorer`); each scorer's medians and scales are
# stored as <name>_median, <name>_scale beside the Gaussians.
MARGINAL_FEATURES: dict[str, Callable[[Evidence], np.ndarray]] = {
    "tonal": lambda ev: ev.statistic(photometric_statistics),
    "noise_floors": lambda ev: np.stack(
        [ev.statistic(noise_floor), ev.statistic(grey_noise_floor)], axis=1
    ),
}
# Marginal scorers that count only values above the median: a noise floor below the training
# images' (a smooth or blurred photo) is not noise, and the other parts judge smoothness.
ONE_SIDED_MARGINALS = ("noise_floors",)


def marginal_fit(statistics: np.ndarray, one_sided: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per statistic of training images [N, K]: the median and the 99th percentile of the
    distance from it, above it only where `one_sided` (at least 1e-3: a statistic the training
    images all share must not turn a rounding step into an alarm; that is a tenth of a percent
    on the photometric statistics' logs and a quarter of an 8-bit step on the noise floors)."""
    median = np.median(statistics, axis=0)
    distance = statistics - median if one_sided else np.abs(statistics - median)
    return median, np.maximum(np.quantile(distance, 0.99, axis=0), 1e-3)


def marginal_scorer(name: str, median: np.ndarray, scale: np.ndarray) -> Scorer:
    """The most atypical statistic: max over k of |x_k - median_k| / scale_k (without the
    absolute value for `ONE_SIDED_MARGINALS`)."""
    features = MARGINAL_FEATURES[name]
    if name in ONE_SIDED_MARGINALS:
        return lambda ev: ((features(ev) - median) / scale).max(axis=1)
    return lambda ev: (np.abs(features(ev) - median) / scale).max(axis=1)


# Scorers that are one statistic of the input image.
STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "noise": noise_level,
    "noise_floor": noise_floor,
    "flat": flat_fraction,
}


def statistic_scorer(name: str) -> Scorer:
    statistic = STATISTICS[name]
    return lambda ev: ev.statistic(statistic)


def local_scorer(sigma: float = DEFAULT_SIGMA) -> Scorer:
    return lambda ev: error_maps(ev.inputs, ev.outputs, sigma).reshape(len(ev.inputs), -1).max(1)


def density_scorer(name: str, mean: np.ndarray, precision: np.ndarray) -> Scorer:
    features = DENSITY_FEATURES[name]
    return lambda ev: mahalanobis(features(ev), mean, precision)


# How `combined` joins its normalised parts z [parts, N] (`norms` in the order of z's rows):
# `max`, as anomalous as the most alarmed part (every version before issue 25); `sum`, the
# parts' excess over their normal medians added up, so that several parts each moderately
# alarmed (a brightness shift lifts the photometric, colour and feature parts a little each)
# count for more than one (versions 4-5); `fisher`, Fisher's combination: the sum of each
# part's surprisal, -log of how rarely held-out normal images score that high (`surprisal`),
# so a part counts by how improbable its value is under its own normal tail, not by a linear
# scale on which every part's normal spread adds to the threshold (since version 6).
AGGREGATES: dict[str, Callable[[np.ndarray, list[dict]], np.ndarray]] = {
    "max": lambda z, norms: z.max(axis=0),
    # Part after part, not `.sum(axis=0)`: numpy sums a lone column pairwise, so an image's
    # score would change in the last bit with the size of the batch it came in.
    "sum": lambda z, norms: functools.reduce(np.add, np.maximum(z, 0.0)),
    "fisher": lambda z, norms: functools.reduce(
        np.add, [surprisal(zk, norm) for zk, norm in zip(z, norms, strict=True)]
    ),
}
# The normal scores' quantiles kept per part for `fisher` (every 5%), and where the fitted
# exponential tail takes over from them.
TAIL_LEVELS = np.linspace(0.0, 1.0, 21)
TAIL_FROM = 0.9


def combined_scorer(
    parts: dict[str, Scorer], norms: dict[str, dict[str, float]], aggregate: str = "max"
) -> Scorer:
    """`parts` normalised (`norms` gives each part's centre and scale, and for a two-sided part
    (`two_sided`) the centre and scale of its log), joined by `aggregate`."""
    return lambda ev: combine({name: parts[name](ev) for name in norms}, norms, aggregate)


def combine(
    scores: dict[str, np.ndarray], norms: dict[str, dict[str, float]], aggregate: str = "max"
) -> np.ndarray:
    """The parts' scores, each normalised as `norms` says, joined by `AGGREGATES[aggregate]`."""
    z = np.stack([normalised_part(scores[n], norm) for n, norm in norms.items()])
    return AGGREGATES[aggregate](z, list(norms.values()))


def surprisal(z: np.ndarray, norm: dict) -> np.ndarray:
    """-log P(a normal image's part >= z): the normal scores' empirical distribution (its
    quantiles every 5%, interpolated) up to their 90th percentile, beyond it an exponential
    tail with the mean excess the normal images had there (so a value past every normal one
    is still graded, not capped). Tied quantiles count from their lowest level, so a value
    many normal images share (no flat pixels) is no surprise. The exponential is the simple
    choice for the ~36 normal images past the 90th percentile of a calibration half: it
    overstates how rare a far value is for a part whose normal tail is heavier (a Pareto's)
    and understates it for a lighter one (a Gaussian's)."""
    quantiles = np.asarray(norm["quantiles"], np.float64)
    values, first = np.unique(quantiles, return_index=True)
    cdf = np.minimum(np.interp(z, values, TAIL_LEVELS[first], left=0.0), TAIL_FROM)
    start = _tail_start(quantiles)
    # In log space, so the tail keeps grading however far out (no probability underflows).
    tail = -np.log(1 - TAIL_FROM) + np.maximum(z - start, 0.0) / norm["tail_scale"]
    out = np.where(z > start, tail, -np.log1p(-cdf))
    return np.where(np.isnan(z), np.nan, out)  # a broken part stays visible, not "normal"


def _tail_start(quantiles: np.ndarray) -> float:
    """The 90th percentile, one of the kept quantiles: where the exponential tail begins."""
    return float(np.interp(TAIL_FROM, TAIL_LEVELS, quantiles))


def normalised_part(scores: np.ndarray, norm: dict) -> np.ndarray:
    """One part's scores on the combined scale that `normalisation` fitted."""
    if norm.get("two_sided"):
        return np.abs(np.log(np.maximum(scores, 1e-12)) - norm["center"]) / norm["scale"]
    return (scores - norm["center"]) / norm["scale"]


def normalisation(normal_scores: np.ndarray, two_sided: bool = False, tail: bool = False) -> dict:
    """Centre at the median of held-out normal scores, unit at their 99th percentile.

    Two-sided (a typicality test): on the log of the score, centre at its median, unit at the
    99th percentile of the distance from it, so an image whose statistic is unusually low (a
    blurred image reconstructs too well, fog leaves features too bland) counts as much as one
    whose statistic is unusually high. `tail` adds what `surprisal` reads: the normalised
    normal scores' quantiles at `TAIL_LEVELS` and their mean excess over the 90th percentile.
    """
    scores = np.asarray(normal_scores, np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError("normal scores to normalise on must be finite")
    if two_sided:
        logs = np.log(np.maximum(scores, 1e-12))
        center = float(np.median(logs))
        spread = float(np.quantile(np.abs(logs - center), 0.99))
        norm = {"center": center, "scale": max(spread, 1e-12), "two_sided": True}
    else:
        median, q99 = np.quantile(scores, [0.5, 0.99])
        norm = {"center": float(median), "scale": float(max(q99 - median, 1e-12))}
    if tail:
        z = normalised_part(scores, norm)
        quantiles = np.quantile(z, TAIL_LEVELS)
        start = _tail_start(quantiles)
        excess = z[z > start] - start
        norm["quantiles"] = [float(q) for q in quantiles]
        norm["tail_scale"] = float(max(excess.mean() if excess.size else 0.0, 1e-6))
    return norm


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
            if name in ERRORS:
                self._scorers[name] = ERRORS[name]
            elif name == "local":
                self._scorers[name] = local_scorer(self.sigma)
            elif name in STATISTICS:
                self._scorers[name] = statistic_scorer(name)
            elif name == "features":
                graph = Path(folder) / spec["graph"]
                _check_hash(graph, spec.get("graph_sha256"))
                mean, precision = gaussians["features_mean"], gaussians["features_precision"]
                self._scorers[name] = FeatureDensity(graph, mean, precision)
            elif name == "typicality":
                graph = Path(folder) / spec["graph"]
                _check_hash(graph, spec.get("graph_sha256"))
                mean, precision = gaussians["typicality_mean"], gaussians["typicality_precision"]
                self._scorers[name] = FeatureTypicality(graph, mean, precision)
            elif name in DENSITY_FEATURES:
                mean, precision = gaussians[f"{name}_mean"], gaussians[f"{name}_precision"]
                self._scorers[name] = density_scorer(name, mean, precision)
            elif name in EXCESS_ERRORS:
                factor = float(gaussians.get(f"{name}_noise_factor", 0.0))  # 0 before version 10
                self._scorers[name] = excess_scorer(name, gaussians[f"{name}_line"], factor)
            elif name in MARGINAL_FEATURES:
                median, scale = gaussians[f"{name}_median"], gaussians[f"{name}_scale"]
                self._scorers[name] = marginal_scorer(name, median, scale)
        if "combined" in specs:
            norms = specs["combined"]["normalisation"]
            aggregate = specs["combined"].get("aggregate", "max")  # absent before issue 25
            if aggregate not in AGGREGATES:
                raise ValueError(f"unknown combined aggregate {aggregate!r} in the manifest")
            self._scorers["combined"] = combined_scorer(dict(self._scorers), norms, aggregate)
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
