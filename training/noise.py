"""The noise model a denoiser is trained on, and the fixed Gaussian noise it is evaluated with.

Everything works on uint8 RGB [N, H, W, 3] and returns uint8: a noisy image is an image, which is
what a service receives, so noise is clipped and rounded like a camera or a file would.
"""

from __future__ import annotations

import cv2
import numpy as np

# Training noise, per image: each corruption is drawn independently, applied in this order
# (sensor noise, then impulses, then compression, as in a real pipeline).
GAUSSIAN_P = 0.8
SIGMA_MAX = 55.0
SALT_PEPPER_P = 0.2
SALT_PEPPER_MAX = 0.05
JPEG_P = 0.35
JPEG_QUALITY = (10, 90)


def describe() -> dict:
    """The noise model as recorded in a model's manifest."""
    return {
        "gaussian": {"p": GAUSSIAN_P, "sigma": [0, SIGMA_MAX], "scale": "0-255"},
        "salt_and_pepper": {"p": SALT_PEPPER_P, "fraction_of_pixels": [0, SALT_PEPPER_MAX]},
        "jpeg": {"p": JPEG_P, "quality": list(JPEG_QUALITY)},
        "order": ["gaussian", "salt_and_pepper", "jpeg"],
        "independent": True,
    }


def gaussian(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of `sigma` (0-255 scale), clipped and rounded to uint8."""
    noisy = images.astype(np.float32) + rng.normal(0.0, sigma, images.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def salt_and_pepper(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Set `fraction` of the pixels to black or white (all channels: a dead or stuck pixel)."""
    out = image.copy()
    hit = rng.random(image.shape[:2]) < fraction
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)[:, None].astype(np.uint8)
    return out


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through JPEG at `quality` (OpenCV works in BGR, so convert both ways)."""
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def corrupt(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The training noise model applied to each image independently; some stay clean."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        if rng.random() < GAUSSIAN_P:
            image = gaussian(image, rng.uniform(0, SIGMA_MAX), rng)
        if rng.random() < SALT_PEPPER_P:
            image = salt_and_pepper(image, rng.uniform(0, SALT_PEPPER_MAX), rng)
        if rng.random() < JPEG_P:
            image = jpeg(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
        out[i] = image
    return out
