"""The model's `report/`: reconstructions, the loss curve, a latent map and report.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np


def reconstruction_grid(inputs: np.ndarray, outputs: np.ndarray, path: Path, n: int = 8) -> Path:
    """Top row: inputs; bottom row: reconstructions, with each image's MSE."""
    n = min(n, len(inputs))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.5), squeeze=False)
    for i in range(n):
        mse = float(np.mean((inputs[i] - outputs[i]) ** 2))
        axes[0, i].imshow(np.clip(inputs[i], 0, 1))
        axes[1, i].imshow(np.clip(outputs[i], 0, 1))
        axes[1, i].set_title(f"{mse:.4f}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    fig.suptitle("validation images (top) and reconstructions (bottom, with MSE)", fontsize=9)
    return _save(fig, path)


def loss_curve(history: list[dict[str, float]], path: Path) -> Path | None:
    if not history:
        return None
    epochs = [int(row.get("epoch", i)) + 1 for i, row in enumerate(history)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("loss", "val_loss"):
        if all(key in row for row in history):
            ax.plot(epochs, [row[key] for row in history], marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="MSE", yscale="log", title="training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def latent_map(
    latents: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, seed: int = 42
) -> Path | None:
    """A 2-D t-SNE of the latents, coloured by class."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if len(latents) < 5:
        return None
    reduced = PCA(min(50, *latents.shape), random_state=seed).fit_transform(latents)
    perplexity = float(min(30, max(2, (len(latents) - 1) // 3)))
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, name in enumerate(classes):
        mask = labels == label
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=6, label=name, alpha=0.7)
    ax.set(title="validation latents (t-SNE)", xticks=[], yticks=[])
    ax.legend(markerscale=2, fontsize=7, loc="best")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(manifest: dict, figures: dict[str, Path | None]) -> str:
    """report.md: the metrics table and the figures, relative to the report folder."""
    m, t = manifest["metrics"], manifest.get("training", {})
    rows = [
        ("validation MSE", _fmt(m.get("val_mse"))),
        (f"PCA baseline MSE ({m.get('pca_components')} components)", _fmt(m.get("pca_val_mse"))),
        ("ONNX parity (max abs, Keras vs onnxruntime)", _fmt(m.get("onnx_parity_max_abs"), ".2e")),
        ("train / validation images", f"{t.get('train_images')} / {t.get('val_images')}"),
        (
            "epochs, seconds per epoch",
            f"{t.get('epochs')}, {_fmt(t.get('seconds_per_epoch'), '.0f')}",
        ),
        ("training loss (term: weight)", loss_terms(t)),
        ("augmentation", ", ".join(t.get("augmentation") or []) or "none"),
    ]
    start = t.get("init_from")
    if start:  # a fine-tune or a decoder refit: where its weights came from, what it trained
        source = start.get("model") or f"run `{start.get('run')}` (epochs: {start.get('epochs')})"
        rows.append(("started from", f"{source}; trained: {t.get('trained', 'all weights')}"))
    lines = [
        f"# {manifest['name']} v{manifest['version']} ({manifest['architecture']})",
        "",
        f"Trained on `{t.get('data')}`, created {manifest['created']}.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    per_class = m.get("val_mse_per_class") or {}
    if per_class:
        lines += ["", "| class | validation MSE |", "|---|---|"]
        lines += [f"| {c} | {_fmt(v)} |" for c, v in per_class.items()]
    if "comparison" in m:
        lines += ["", *comparison_table(m["comparison"])]
    anomaly = manifest.get("anomaly", {})
    if "evaluation" in anomaly:
        worst = {s: min(r.values()) for s, r in anomaly["evaluation"]["auroc"].items()}
        lines += [
            "",
            f"Anomaly scoring: default scorer `{anomaly['scorer']}`, worst-kind AUROC "
            f"{worst[anomaly['scorer']]:.3f}; the full table is in [anomaly.md](anomaly.md).",
        ]
    for title, fig in figures.items():
        if fig is not None:
            lines += ["", f"## {title}", "", f"![{title}]({fig.name})"]
    return "\n".join(lines) + "\n"


def loss_terms(training: dict) -> str:
    """The manifest's loss terms and their weights, a decaying weight as its range."""
    terms = training.get("loss", "mse")
    if not isinstance(terms, dict):
        return str(terms)
    decay = training.get("invariance_decay")
    cells = []
    for term, weight in terms.items():
        if decay and term == decay["term"]:
            start, end = decay["epochs"]
            cells.append(f"{term}: {decay['from']:g} -> {decay['to']:g} (epochs {start}-{end})")
        else:
            cells.append(f"{term}: {weight:g}")
    return ", ".join(cells)


def comparison_table(c: dict) -> list[str]:
    """Markdown rows: this architecture against the seed, throughput and training."""
    archs = list(c["reconstruct_img_s"])
    runs = c["runs"]

    def run_cell(arch: str, key: str) -> str:
        run = runs.get(arch)
        if run is None:
            return "not trained here"
        curve = run["val_mse_by_epoch"]
        if key == "first":
            return _fmt(curve[0]) if curve else "n/a"
        if key == "best":
            return f"{_fmt(min(curve))} ({run['epochs']} epochs)" if curve else "n/a"
        return _fmt(run["seconds_per_epoch"], ".0f")

    m = c["machine"]
    lines = [
        "## Against the reference architecture",
        "",
        f"Measured in one run on {m['cpu']} ({m['usable_cores']} cores), onnxruntime {m['onnxruntime']}, "
        f"CPU provider, batch {c['batch']}. Speed-up: **{c['speedup_vs_seed']}x**.",
        "",
        "| | " + " | ".join(archs) + " |",
        "|---|" + "---|" * len(archs),
        "| reconstruct img/s (encoder + decoder) | "
        + " | ".join(f"{c['reconstruct_img_s'][a]:.1f}" for a in archs)
        + " |",
    ]
    for label, key in (("val MSE after 1 epoch", "first"), ("best val MSE", "best"),
                       ("training seconds per epoch", "seconds")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(run_cell(a, key) for a in archs) + " |")
    return lines


def _fmt(value, spec: str = ".5f") -> str:
    return "n/a" if value is None else format(value, spec)


def anomaly_examples(
    examples: dict[str, tuple[np.ndarray, np.ndarray]], scorers, path: Path
) -> Path:
    """One row per anomaly kind: the input, its reconstruction, and the served error heatmap."""
    from aecore.anomaly import error_heatmap

    fig, axes = plt.subplots(len(examples), 3, figsize=(5.4, 1.8 * len(examples)), squeeze=False)
    for row, (kind, (x, y)) in enumerate(examples.items()):
        heat = error_heatmap(x, y, scorers.heatmap_scale, scorers.sigma)
        for col, image in enumerate((x, y, heat)):
            axes[row, col].imshow(np.clip(image, 0, 1) if image.dtype != np.uint8 else image)
            axes[row, col].axis("off")
        axes[row, 0].text(-0.06, 0.5, kind, rotation=90, fontsize=8, ha="right", va="center",
                          transform=axes[row, 0].transAxes)  # fmt: skip
    for col, title in enumerate(("input", "reconstruction", "error heatmap")):
        axes[0, col].set_title(title, fontsize=8)
    return _save(fig, path)
