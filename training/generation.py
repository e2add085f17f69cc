"""Fit the generation density to training latents, choose it on held-out evidence, measure it.

The density family (`aecore.generation.Density`) is a Gaussian per class with a full
(Ledoit-Wolf) or low-rank-plus-noise (probabilistic PCA) covariance. Candidates are fitted on
the training latents and compared by the mean log-likelihood of the validation latents of
each class; the best is kept. The evaluation decodes samples through the ONNX graphs, rounds
them to uint8 as the service's PNGs do, re-encodes them, and asks a logistic regression
trained on the training latents which class they show; and it measures each sample's pixel
distance to its nearest training image against held-out real images'.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np

from aecore import manifest
from aecore.generation import GENERATOR_FILE, TEMPERATURE_RANGE, Density
from aecore.preprocessing import to_float, to_uint8
from aecore.runner import Autoencoder
from training import report
from training.data import ImageSet
from training.probe import linear_probe, probe_classifier
from training.probe import markdown as probe_markdown

PPCA_RANKS = (32, 64, 96, 128, 192)
EVAL_TEMPERATURES = (0.5, 0.8, 1.0)


def fit_ledoit_wolf(latents: np.ndarray, labels: np.ndarray, classes: list[str]) -> Density:
    """A full covariance per class, shrunk towards a multiple of the identity."""
    from sklearn.covariance import LedoitWolf

    means, factors = [], []
    for k in range(len(classes)):
        fitted = LedoitWolf(store_precision=False).fit(latents[labels == k].astype(np.float64))
        means.append(fitted.location_)
        factors.append(np.linalg.cholesky(fitted.covariance_))
    return _density(classes, labels, means, factors, np.zeros(len(classes)))


def fit_ppca(latents: np.ndarray, labels: np.ndarray, classes: list[str], rank: int) -> Density:
    """Probabilistic PCA per class: `rank` principal directions plus isotropic noise (Tipping and
    Bishop; scikit-learn's PCA fits exactly this model and scores its likelihood)."""
    from sklearn.decomposition import PCA

    means, factors, noise = [], [], []
    for k in range(len(classes)):
        pca = PCA(rank, random_state=0).fit(latents[labels == k])
        scale = np.sqrt(np.maximum(pca.explained_variance_ - pca.noise_variance_, 0.0))
        means.append(pca.mean_)
        factors.append(pca.components_.T * scale)
        noise.append(np.sqrt(max(pca.noise_variance_, 0.0)))
    return _density(classes, labels, means, factors, np.asarray(noise))


def _density(classes, labels, means, factors, noise) -> Density:
    return Density(
        classes=list(classes),
        weights=np.bincount(labels, minlength=len(classes)).astype(np.float64),
        means=np.asarray(means, np.float32),
        factors=np.asarray(factors, np.float32),
        noise_std=np.asarray(noise, np.float32),
    )


def log_likelihood(density: Density, latents: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean Gaussian log-density of each class's latents."""
    d = density.latent_dim
    per_class = []
    for k in range(len(density.classes)):
        f = density.factors[k].astype(np.float64)
        cov = f @ f.T + float(density.noise_std[k]) ** 2 * np.eye(d)
        sign, logdet = np.linalg.slogdet(cov)
        x = latents[labels == k].astype(np.float64) - density.means[k]
        if sign <= 0 or not len(x):
            per_class.append(-np.inf)
            continue
        maha = np.einsum("ij,ij->i", x, np.linalg.solve(cov, x.T).T)
        per_class.append(float(np.mean(-0.5 * (maha + logdet + d * np.log(2 * np.pi)))))
    return float(np.mean(per_class))


def choose_density(
    train_latents: np.ndarray, train_labels: np.ndarray, val_latents: np.ndarray,
    val_labels: np.ndarray, classes: list[str],
) -> tuple[str, Density, dict[str, float]]:  # fmt: skip
    """(name, density, held-out log-likelihood of every candidate): the most likely wins."""
    candidates = {"ledoit-wolf": lambda: fit_ledoit_wolf(train_latents, train_labels, classes)}
    # A rank needs more latents than directions in every class, or nothing is left for noise.
    fewest = int(np.bincount(train_labels, minlength=len(classes)).min())
    for rank in sorted({min(r, fewest - 2) for r in PPCA_RANKS if fewest > 2}):
        candidates[f"ppca-{rank}"] = lambda r=rank: fit_ppca(
            train_latents, train_labels, classes, r
        )
    fitted, scores = {}, {}
    for name, fit in candidates.items():
        fitted[name] = fit()
        scores[name] = log_likelihood(fitted[name], val_latents, val_labels)
    best = max(scores, key=scores.get)
    return best, fitted[best], scores


def regenerate(ae: Autoencoder, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images as served, their latents re-encoded from those images)."""
    images = to_uint8(ae.decode_all(latents))
    return images, ae.encode_all(to_float(images))


def nearest_mse(queries: np.ndarray, references: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per query image, the pixel MSE to its nearest reference image (uint8 inputs, [0, 1])."""
    ref = to_float(references).reshape(len(references), -1)
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    out = np.empty(len(queries))
    for i in range(0, len(queries), chunk):
        q = to_float(queries[i : i + chunk]).reshape(-1, ref.shape[1])
        dist = np.einsum("ij,ij->i", q, q)[:, None] + ref_sq[None, :] - 2.0 * (q @ ref.T)
        out[i : i + chunk] = np.maximum(dist.min(axis=1), 0.0) / ref.shape[1]
    return out


def evaluate(
    ae: Autoencoder,
    density: Density,
    train: ImageSet,
    train_latents: np.ndarray,
    val: ImageSet,
    val_latents: np.ndarray,
    report_dir: Path,
    per_class: int = 100,
    seed: int = 0,
) -> dict:
    """Class rates per temperature, nearest-training distances, and the grid picture."""
    classifier = probe_classifier(train_latents, train.labels)
    rates: dict[str, dict[str, float]] = {}
    generated = {}
    for t in EVAL_TEMPERATURES:
        rates[f"{t:g}"] = {}
        for k, name in enumerate(density.classes):
            z, _ = density.sample(per_class, seed=seed + k, temperature=t, class_name=name)
            images, again = regenerate(ae, z)
            rates[f"{t:g}"][name] = float(np.mean(classifier.predict(again) == k))
            generated[(t, name)] = images
    all_generated = np.concatenate(list(generated.values()))
    reconstructed_train = to_uint8(
        ae.reconstruct_all(train.images[:: max(1, len(train) // 300)])[1]
    )
    distance = {
        "generated": nearest_mse(all_generated, train.images),
        "held_out_real": nearest_mse(val.images, train.images),
        "reconstructed_training": nearest_mse(reconstructed_train, train.images),
    }
    grid_t = max(EVAL_TEMPERATURES)
    grid = generation_grid(
        {name: generated[(grid_t, name)][:8] for name in density.classes},
        grid_t,
        report_dir / "generated.png",
    )
    return {
        "samples_per_class": per_class,
        "seeds": f"class k of the model's classes uses seed {seed} + k",
        "classifier": "standardised latents -> logistic regression, fitted on the training latents",
        "classifier_accuracy_held_out_real": float(
            np.mean(classifier.predict(val_latents) == val.labels)
        ),
        "class_rate": rates,
        "class_rate_mean": {t: float(np.mean(list(r.values()))) for t, r in rates.items()},
        "nearest_training_mse": {
            name: {
                "median": float(np.median(d)),
                "p05": float(np.percentile(d, 5)),
                "min": float(d.min()),
                "images": len(d),
            }
            for name, d in distance.items()
        },
        "generated_closer_than_held_out_p01": float(
            np.mean(distance["generated"] < np.percentile(distance["held_out_real"], 1))
        ),
        "grid": grid.name,
    }


def generation_grid(rows: dict[str, np.ndarray], temperature: float, path: Path) -> Path:
    """One row of generated uint8 images per class."""
    import matplotlib.pyplot as plt

    n = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.5 * len(rows)), squeeze=False)
    for row, (name, images) in enumerate(rows.items()):
        for col in range(n):
            if col < len(images):
                axes[row, col].imshow(images[col])
            axes[row, col].axis("off")
        axes[row, 0].text(-0.06, 0.5, name, rotation=90, fontsize=8, ha="right", va="center",
                          transform=axes[row, 0].transAxes)  # fmt: skip
    fig.suptitle(f"generated images, one row per requested class (temperature {temperature:g})",
                 fontsize=9)  # fmt: skip
    return report._save(fig, path)


def markdown(generation: dict | None) -> str:
    """The report's generation section, to append to report.md ("" without a density)."""
    if not generation:
        return ""
    ev = generation["evaluation"]
    temps = list(ev["class_rate"])
    lines = [
        "",
        "## Generation",
        "",
        f"Density: `{generation['family']}`, one Gaussian per class fitted on the training "
        "latents, chosen by held-out log-likelihood of the validation latents "
        "(" + ", ".join(f"{k} {v:.1f}" for k, v in generation["candidates"].items()) + "). "
        f"{ev['samples_per_class']} samples per class and temperature are decoded, rounded to "
        "uint8 as served, re-encoded, and classified by a logistic regression fitted on the "
        "training latents (its accuracy on held-out real images: "
        f"{ev['classifier_accuracy_held_out_real']:.3f}).",
        "",
        "| class | " + " | ".join(f"rate at temperature {t}" for t in temps) + " |",
        "|---|" + "---|" * len(temps),
    ]
    for name in generation["classes"]:
        lines.append(
            f"| {name} | " + " | ".join(f"{ev['class_rate'][t][name]:.2f}" for t in temps) + " |"
        )
    lines.append("| mean | " + " | ".join(f"{ev['class_rate_mean'][t]:.2f}" for t in temps) + " |")
    near = ev["nearest_training_mse"]
    lines += [
        "",
        "Pixel MSE to the nearest training image (not a copy: a copy would sit near 0, and a "
        "decoded training image sits at its reconstruction error):",
        "",
        "| images | median | 5th percentile | min |",
        "|---|---|---|---|",
        *[
            f"| {name.replace('_', ' ')} ({d['images']}) | {d['median']:.4f} | {d['p05']:.4f} | "
            f"{d['min']:.4f} |"
            for name, d in near.items()
        ],
        "",
        f"Generated images closer to a training image than the closest 1% of held-out real "
        f"images: {ev['generated_closer_than_held_out_p01']:.1%}.",
        "",
        f"![Generated images]({ev['grid']})",
    ]
    return "\n".join(lines) + "\n"


def fit_generator(
    ae: Autoencoder, folder: Path, train: ImageSet, train_z: np.ndarray, val: ImageSet,
    val_z: np.ndarray,
) -> dict:  # fmt: skip
    """Choose and fit the generation density of a model folder's latents, write it to
    `folder/generator.npz`, evaluate it (figure in `folder/report`); the manifest's block."""
    family, density, candidates = choose_density(
        train_z, train.labels, val_z, val.labels, train.classes
    )
    density.save(folder / GENERATOR_FILE)
    evaluation = evaluate(ae, density, train, train_z, val, val_z, folder / "report")
    low, high = TEMPERATURE_RANGE
    return {
        "file": GENERATOR_FILE,
        "classes": density.classes,
        "weights": (density.weights / density.weights.sum()).tolist(),
        "family": family,
        "fitted_on": f"latents of the {len(train)} training-split images, one Gaussian per class",
        "candidates": candidates,
        "chosen_by": "mean per-class log-likelihood of the validation latents",
        "sampling": "rng = numpy default_rng(seed); without a class, classes ~ weights; "
        "z = mean + temperature * (factor @ e + noise_std * e'), e ~ N(0, I_rank) then "
        "e' ~ N(0, I_latent) from the same rng (aecore.generation.Density.sample)",
        "temperature": {
            "range": [low, high],
            "min_exclusive": True,
            "default": 1.0,
            "meaning": "scales the spread around the class mean; 1 samples the fitted density",
        },
        "evaluation": evaluation,
    }


def add_generator(source: Path, data_root: Path, version: int | None = None) -> Path:
    """Publish the next version of `source`: its files unchanged, plus the generation density
    and the linear probe in its report. `data_root` is the folder it was trained on."""
    from training.train import TrainConfig, load_split  # TensorFlow: only for this verb

    source = Path(source)
    body = manifest.read(source)
    t, spec = body["training"], body["input"]
    config = TrainConfig(
        data=str(data_root), out="", height=spec["height"], width=spec["width"],
        latent_dim=body["latent_dim"], val_fraction=t["val_fraction"], seed=t["seed"],
    )  # fmt: skip
    train, val = load_split(config)
    if (len(train), len(val), train.classes) != (t["train_images"], t["val_images"], t["classes"]):
        raise ValueError(
            f"{data_root} splits into {len(train)}/{len(val)} images of {train.classes}; "
            f"{source} was trained on {t['train_images']}/{t['val_images']} of {t['classes']}"
        )
    ae = Autoencoder(source)
    train_z, val_z = ae.encode_all(train.images), ae.encode_all(val.images)
    staging, root, version = manifest.stage_copy(source, version)
    probe = linear_probe(train, val, train_z, val_z, config.seed)

    body = copy.deepcopy(body)
    body["derived_from"] = {
        "version": body["version"],
        "created": body["created"],
        "changes": "adds the generation density (generator.npz, `generation`) and the linear "
        "probe (metrics.linear_probe, report); graphs, anomaly calibration and training "
        "record unchanged",
    }
    body["version"] = version
    body["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    # The data set's name, not this machine's path to it.
    data_name = "/".join(Path(data_root).resolve().parts[-2:])
    body["training"]["data"] = data_name
    for run in body["metrics"].get("comparison", {}).get("runs", {}).values():
        run["data"] = data_name
    body["generation"] = fit_generator(ae, staging, train, train_z, val, val_z)
    body["files"]["generator"] = GENERATOR_FILE
    body["files"]["sha256"]["generator"] = manifest.sha256_file(staging / GENERATOR_FILE)
    body["metrics"]["linear_probe"] = probe
    figures = {
        title: staging / "report" / name
        for title, name in (("Reconstructions", "reconstructions.png"),
                            ("Training curve", "loss.png"), ("Latent map", "latent_map.png"))
        if (staging / "report" / name).is_file()
    }  # fmt: skip
    text = report.markdown(body, figures) + probe_markdown(probe) + markdown(body["generation"])
    (staging / "report" / "report.md").write_text(text)
    manifest.write(staging, body)
    return manifest.publish(staging, root, version)
