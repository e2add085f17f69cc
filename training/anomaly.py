"""Anomaly scoring: an evaluation set, the latent Gaussian, calibration and the AUROC table.

The validation split is cut in two, stratified by class: one half calibrates (thresholds and
the combined scorer's normalisation), the other half and anomalies made from it measure. No
training image is ever used for either; the latent Gaussian alone is fitted on training latents.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from aecore import anomaly
from aecore.graphs import open_session, run_batched
from aecore.preprocessing import ImageSpec, resize_rgb, to_float
from training import report
from training.data import ImageSet, stratified_split

log = logging.getLogger(__name__)

KINDS = ("noise", "occlusion", "pattern", "off_domain", "channel_swap")
BASE_SCORERS = ("mse", "local", "latent", "noise", "flat", "colour")
DEFAULT_SCORER = "combined"


# -- the evaluation set --------------------------------------------------------------------


def off_domain_photos() -> list[np.ndarray]:
    """RGB uint8 photos that ship inside scikit-learn and scikit-image (no download)."""
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    try:
        import skimage.data as data
    except ImportError:
        return photos
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page",
                 "text", "clock", "immunohistochemistry", "hubble_deep_field"):  # fmt: skip
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # some builds fetch optional images over the network; skip those
            continue
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    return photos


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = images.astype(np.float32) + rng.normal(0, 0.08 * 255, images.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _occlusion(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    h, w = images.shape[1:3]
    for image in out:
        for _ in range(rng.integers(1, 4)):
            ph, pw = (rng.uniform(0.12, 0.3, 2) * (h, w)).astype(int)
            y, x = rng.integers(0, h - ph), rng.integers(0, w - pw)
            image[y : y + ph, x : x + pw] = rng.integers(0, 256, 3)
    return out


def _patterns(n: int, spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Stripes, checkerboards and gratings in random colours and frequencies."""
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)
    out = np.empty((n, *spec.shape), np.uint8)
    for i in range(n):
        freq, angle = rng.uniform(0.05, 0.5), rng.uniform(0, np.pi)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        kind = i % 3
        if kind == 0:
            level = (np.sin(u * freq) > 0).astype(np.float32)
        elif kind == 1:
            level = ((xx * freq // 1 + yy * freq // 1) % 2).astype(np.float32)
        else:
            level = 0.5 + 0.5 * np.sin(u * freq) * np.cos(yy * freq * rng.uniform(0.5, 2))
        a, b = rng.integers(0, 256, (2, 3)).astype(np.float32)
        out[i] = (a + (b - a) * level[..., None]).astype(np.uint8)
    return out


def _crops(n: int, spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    photos = off_domain_photos()
    out = np.empty((n, *spec.shape), np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(min(photo.shape[:2]) * rng.uniform(0.35, 1.0))
        y = rng.integers(0, photo.shape[0] - side + 1)
        x = rng.integers(0, photo.shape[1] - side + 1)
        out[i] = resize_rgb(np.ascontiguousarray(photo[y : y + side, x : x + side]), spec)
    return out


def make_anomalies(normals: np.ndarray, spec: ImageSpec, seed: int = 42) -> dict[str, np.ndarray]:
    """One uint8 set per kind, as many images as `normals`, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    n = len(normals)
    return {
        "noise": _noise(normals, rng),  # sensor noise, sigma 8% of the range
        "occlusion": _occlusion(normals, rng),  # 1-3 solid patches, 12-30% of each side
        "pattern": _patterns(n, spec, rng),  # synthetic test patterns
        "off_domain": _crops(n, spec, rng),  # other photos: people, objects, text, space
        "channel_swap": np.ascontiguousarray(normals[..., ::-1]),  # a client sending BGR
    }


# -- evidence, fitting, calibration --------------------------------------------------------


def evidence(folder: Path, images: np.ndarray, batch_size: int = 32) -> anomaly.Evidence:
    """Inputs, reconstructions and latents of uint8 images through the model's ONNX graphs."""
    encoder, decoder = open_session(folder / "encoder.onnx"), open_session(folder / "decoder.onnx")
    inputs = to_float(images)
    latents = run_batched(encoder, inputs, batch_size)
    return anomaly.Evidence(inputs, run_batched(decoder, latents, batch_size), latents)


def fit_gaussians(folder: Path, train_images: np.ndarray) -> Path:
    """Ledoit-Wolf Gaussians of the training latents and colour statistics, beside the graphs."""
    from sklearn.covariance import LedoitWolf

    encoder = open_session(folder / "encoder.onnx")
    features: dict[str, list[np.ndarray]] = {name: [] for name in anomaly.DENSITY_FEATURES}
    for i in range(0, len(train_images), 256):
        inputs = to_float(train_images[i : i + 256])
        ev = anomaly.Evidence(inputs, inputs, run_batched(encoder, inputs, 32))
        for name, feature in anomaly.DENSITY_FEATURES.items():
            features[name].append(feature(ev))
    arrays = {}
    for name, chunks in features.items():
        fit = LedoitWolf().fit(np.concatenate(chunks).astype(np.float64))
        # float32 halves the file; the distances are accumulated in float64 at scoring time.
        arrays[f"{name}_mean"] = fit.location_.astype(np.float32)
        arrays[f"{name}_precision"] = fit.precision_.astype(np.float32)
    path = folder / anomaly.GAUSSIAN_FILE
    np.savez(path, **arrays)
    return path


def calibrate_and_evaluate(
    folder: Path,
    train: ImageSet,
    val: ImageSet,
    target_fpr: float = 0.01,
    seed: int = 42,
    default: str = DEFAULT_SCORER,
) -> dict:
    """Fit, calibrate on half the validation split, measure on the other half; the manifest block.

    Also writes report/anomaly.md and report/anomaly_examples.png into `folder`.
    """
    from aecore.manifest import sha256_file

    if default not in (*BASE_SCORERS, "combined"):
        raise ValueError(f"unknown scorer {default!r}; choose from {[*BASE_SCORERS, 'combined']}")
    spec = ImageSpec(*val.images.shape[1:3])
    gaussians = fit_gaussians(folder, train.images)
    calib_idx, eval_idx = stratified_split(val.labels, 0.5, seed)
    calib = evidence(folder, val.images[calib_idx])
    specs: dict[str, dict] = {name: {} for name in BASE_SCORERS}
    specs["local"]["sigma"] = anomaly.DEFAULT_SIGMA
    for name in anomaly.DENSITY_FEATURES:
        specs[name].update(file=gaussians.name, sha256=sha256_file(gaussians))
    base = anomaly.AnomalyScorers({"scorer": default, "scorers": specs}, folder)
    calib_scores = {name: base.score(name, calib) for name in BASE_SCORERS}
    norms = {name: anomaly.normalisation(scores) for name, scores in calib_scores.items()}
    specs["combined"] = {"normalisation": norms}
    combined = anomaly.AnomalyScorers({"scorer": default, "scorers": specs}, folder)
    calib_scores["combined"] = combined.score("combined", calib)
    for name, scores in calib_scores.items():
        specs[name]["threshold"] = anomaly.calibrate(scores, target_fpr)
    block = {
        "scorer": default,
        "threshold": specs[default]["threshold"],
        "target_fpr": target_fpr,
        "calibration_images": len(calib_idx),
        "calibration_split": "half of the validation split (stratified); never training images",
        "heatmap_scale": specs["local"]["threshold"],
        "scorers": specs,
    }
    # Measure through the same class the service uses, so the figures are the served ones.
    scorers = anomaly.AnomalyScorers(block, folder)
    normal = evidence(folder, val.images[eval_idx])
    anomalies = make_anomalies(val.images[eval_idx], spec, seed)
    kinds = {kind: evidence(folder, images) for kind, images in anomalies.items()}
    block["evaluation"] = _evaluate(scorers, normal, kinds)
    _write_report(folder / "report", block, scorers, kinds)
    return block


def _evaluate(scorers: anomaly.AnomalyScorers, normal: anomaly.Evidence, kinds: dict) -> dict:
    from sklearn.metrics import roc_auc_score

    auroc, fpr = {}, {}
    for name in scorers.names:
        normal_scores = scorers.score(name, normal)
        fpr[name] = float(np.mean(normal_scores > scorers.thresholds[name]))
        auroc[name] = {}
        for kind, ev in kinds.items():
            scores = scorers.score(name, ev)
            labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(scores))]
            auroc[name][kind] = float(roc_auc_score(labels, np.r_[normal_scores, scores]))
    return {
        "split": "the validation half not used for calibration, and anomalies made from it",
        "normal_images": len(normal.inputs),
        "anomalies_per_kind": {k: len(ev.inputs) for k, ev in kinds.items()},
        "auroc": auroc,
        "fpr_at_threshold": fpr,
    }


def _write_report(report_dir: Path, block: dict, scorers, kinds: dict) -> None:
    ev = block["evaluation"]
    lines = [
        "# Anomaly scoring",
        "",
        f"Default scorer: **{block['scorer']}**, threshold {block['threshold']:.5g}, calibrated "
        f"for a {block['target_fpr']:.0%} false-positive rate on {block['calibration_images']} "
        "held-out normal images (half the validation split).",
        "",
        f"Measured on the other half ({ev['normal_images']} normal images) and "
        f"{next(iter(ev['anomalies_per_kind'].values()))} anomalies per kind made from it.",
        "",
        "| scorer | " + " | ".join(KINDS) + " | worst | FPR at threshold |",
        "|---|" + "---|" * (len(KINDS) + 2),
    ]
    for name, row in ev["auroc"].items():
        worst = min(row, key=row.get)
        cells = " | ".join(f"{row[k]:.3f}" for k in KINDS)
        lines.append(
            f"| {name} | {cells} | {worst} {row[worst]:.3f} | {ev['fpr_at_threshold'][name]:.1%} |"
        )
    lines += ["", "AUROC per anomaly kind against held-out normal images (1.0 separates fully).",
              "", "![examples](anomaly_examples.png)"]  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "anomaly.md").write_text("\n".join(lines) + "\n")
    examples = {kind: (ev_k.inputs[0], ev_k.outputs[0]) for kind, ev_k in kinds.items()}
    report.anomaly_examples(examples, scorers, report_dir / "anomaly_examples.png")
