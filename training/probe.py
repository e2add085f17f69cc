"""The linear probe: how well a linear classifier reads the scene class from a representation.

Logistic regression on standardised features, trained on the training split and scored on the
validation split, for (a) the model's latents, (b) PCA of the pixels with as many components
(fitted on the training split) and (c) raw pixels downscaled to the side whose size is closest
to the latent's (1024 -> 18x18x3 = 972). A reduction worth its name should beat both anchors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from aecore.preprocessing import ImageSpec, resize_rgb, to_float
from training.data import ImageSet


def probe_classifier(features: np.ndarray, labels: np.ndarray):
    """StandardScaler + logistic regression, fitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return model.fit(features, labels)


def thumbnail_side(size: int, channels: int = 3) -> int:
    """The square side whose side*side*channels is closest to `size`."""
    return max(1, round(math.sqrt(size / channels)))


def thumbnails(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, side*side*3] with the one resize (INTER_AREA)."""
    spec = ImageSpec(side, side)
    return np.stack([to_float(resize_rgb(im, spec)).ravel() for im in images])


def pca_features(train: np.ndarray, val: np.ndarray, components: int, seed: int = 42):
    from sklearn.decomposition import PCA

    pca = PCA(components, random_state=seed).fit(to_float(train).reshape(len(train), -1))
    return (
        pca.transform(to_float(train).reshape(len(train), -1)),
        pca.transform(to_float(val).reshape(len(val), -1)),
    )


def linear_probe(
    train: ImageSet,
    val: ImageSet,
    train_latents: np.ndarray,
    val_latents: np.ndarray,
    seed: int = 42,
    anchors: bool = True,
) -> dict:
    """The probe's accuracies on the validation split, given the model's latents of both
    (without `anchors`, only the latents' accuracy: the PCA and thumbnail rows are left out)."""
    dim = train_latents.shape[1]
    components = min(dim, len(train), int(np.prod(train.images.shape[1:])))
    side = thumbnail_side(dim)
    features = {"latents": (train_latents, val_latents)}
    if anchors:
        features["pca"] = pca_features(train.images, val.images, components, seed)
        features["pixels"] = (thumbnails(train.images, side), thumbnails(val.images, side))
    accuracy = {
        name: float(probe_classifier(x_train, train.labels).score(x_val, val.labels))
        for name, (x_train, x_val) in features.items()
    }
    return {
        "split": "trained on the training split, accuracy on the validation split",
        "classifier": "standardised features -> logistic regression (scikit-learn, lbfgs, C=1)",
        "train_images": len(train),
        "val_images": len(val),
        "chance": float(np.max(np.bincount(val.labels)) / len(val)),
        "features": {
            "latents": f"the model's latents ({dim})",
            "pca": f"PCA of the pixels, {components} components fitted on the training split",
            "pixels": f"raw pixels downscaled to {side}x{side}x3 ({side * side * 3})",
        },
        "accuracy": accuracy,
    }


def markdown(probe: dict | None) -> str:
    """The report's linear-probe section, to append to report.md ("" without a probe)."""
    if not probe:
        return ""
    rows = [f"| {probe['features'][k]} | {v:.3f} |" for k, v in probe["accuracy"].items()]
    lines = [
        "",
        "## Linear probe",
        "",
        f"Scene class from each representation: {probe['classifier']}, trained on "
        f"{probe['train_images']} training images, accuracy on {probe['val_images']} validation "
        f"images (majority class: {probe['chance']:.3f}).",
        "",
        "| features | accuracy |",
        "|---|---|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def probe_run(run_dir: Path, anchors: bool = False, batch_size: int = 64) -> dict:
    """A training run's best checkpoint on its own split: the validation MSE and the linear
    probe, with Keras (no export needed, so a run can be checked while it trains)."""
    import json

    from training.train import TrainConfig, load_split
    from training.warmstart import load_autoencoder

    config = TrainConfig(**json.loads((Path(run_dir) / "config.json").read_text()))
    encoder, decoder = load_autoencoder(run_dir)
    train, val = load_split(config, run_dir)

    def encode(images: np.ndarray) -> np.ndarray:
        return encoder.predict(to_float(images), batch_size=batch_size, verbose=0)

    val_latents = encode(val.images)
    outputs = decoder.predict(val_latents, batch_size=batch_size, verbose=0)
    result = linear_probe(train, val, encode(train.images), val_latents, config.seed, anchors)
    result["val_mse"] = float(np.mean((to_float(val.images) - outputs) ** 2))
    return result
