"""New latents from a density fitted to a model's training latents: the one sampler.

The density is one Gaussian per class (one in all for a folder without classes), stored in the
model folder's generator file as `means` [K, D], `factors` [K, D, R] and `noise_std` [K], so
that the covariance of class k is `factors[k] @ factors[k].T + noise_std[k]**2 * I`. A full
Cholesky factor has R = D and noise_std 0; a low-rank one (probabilistic PCA) has R < D.

    z = mean + temperature * (factor @ e + noise_std * e')        e ~ N(0, I_R), e' ~ N(0, I_D)

drawn with numpy's `default_rng(seed)`, so a seed gives the same latents everywhere (the
service's POST /generate and the training report's evaluation both call `sample`).
Temperature 1 samples the fitted density; below 1 stays nearer the class mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GENERATOR_FILE = "generator.npz"
TEMPERATURE_RANGE = (0.0, 2.0)  # exclusive, inclusive: (0, 2]


class GenerationError(ValueError):
    """A sampling request the density cannot serve (unknown class, bad n or temperature)."""


@dataclass
class Density:
    classes: list[str]
    weights: np.ndarray  # [K], the class frequencies of the training latents
    means: np.ndarray  # [K, D] float32
    factors: np.ndarray  # [K, D, R] float32
    noise_std: np.ndarray  # [K] float32

    @property
    def latent_dim(self) -> int:
        return int(self.means.shape[1])

    def save(self, path: Path) -> Path:
        np.savez_compressed(
            path,
            classes=np.asarray(self.classes),
            weights=self.weights.astype(np.float64),
            means=self.means.astype(np.float32),
            factors=self.factors.astype(np.float32),
            noise_std=self.noise_std.astype(np.float32),
        )
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> Density:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                classes=[str(c) for c in f["classes"]],
                weights=f["weights"],
                means=f["means"],
                factors=f["factors"],
                noise_std=f["noise_std"],
            )

    def class_index(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name not in self.classes:
            raise GenerationError(f"unknown class {name!r}; the model's classes are {self.classes}")
        return self.classes.index(name)

    def sample(
        self,
        n: int,
        seed: int | None = None,
        temperature: float = 1.0,
        class_name: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(latents float32 [n, D], class index [n]); without a class, classes are drawn by
        their training frequency. The same arguments give the same latents."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GenerationError(f"n must be a whole number of at least 1, got {n!r}")
        low, high = TEMPERATURE_RANGE
        if not (low < temperature <= high):
            raise GenerationError(f"temperature must be in ({low:g}, {high:g}], got {temperature}")
        rng = np.random.default_rng(seed)
        fixed = self.class_index(class_name)
        if fixed is None:
            labels = rng.choice(len(self.classes), size=n, p=self.weights / self.weights.sum())
        else:
            labels = np.full(n, fixed)
        rank = self.factors.shape[2]
        structured = rng.standard_normal((n, rank), dtype=np.float32)
        isotropic = rng.standard_normal((n, self.latent_dim), dtype=np.float32)
        spread = self.noise_std[labels, None] * isotropic
        for k in np.unique(labels):  # one matrix product per class, not a factor per latent
            rows = labels == k
            spread[rows] += structured[rows] @ self.factors[k].T
        return (self.means[labels] + np.float32(temperature) * spread).astype(np.float32), labels


def load(folder: Path, body: dict[str, Any]) -> Density | None:
    """The density a model folder's manifest declares in `generation`, or None when it has none.

    The file's sha256 is checked by `aecore.manifest.read` (it is listed in `files`).
    """
    block = body.get("generation")
    if not block:
        return None
    density = Density.read(Path(folder) / block["file"])
    if density.latent_dim != int(body["latent_dim"]):
        raise ValueError(
            f"{block['file']} has latents of {density.latent_dim}, the model {body['latent_dim']}"
        )
    return density
