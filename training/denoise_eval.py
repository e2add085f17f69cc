"""One evaluation run of a denoiser against the classical anchors, written into its report.

Held-out images (the split the model's manifest records, at the model size) get Gaussian noise at
each sigma; PSNR and SSIM (scikit-image, on the uint8 images a client would get back) are measured
for the noisy input, the model (its exported graph through onnxruntime), OpenCV's non-local means
(h and hColor chosen per sigma by a sweep on training images, never the evaluation images), BM3D
(on a subset: it is slow) and, optionally, a bottleneck autoencoder. Throughput is measured on the
same machine in the same run, with every method allowed all cores.
"""

from __future__ import annotations

import logging
import os
import time
from itertools import product
from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from aecore.denoiser import Denoiser
from aecore.graphs import default_threads
from aecore.preprocessing import to_float, to_uint8
from aecore.runner import Autoencoder
from training import noise
from training.data import ImageSet

log = logging.getLogger(__name__)

SIGMAS = (15, 25, 50)
NLM_FACTORS = (0.4, 0.6, 0.8, 1.0, 1.2)  # h and hColor are swept as these multiples of sigma
NLM_WINDOWS = (7, 21)  # OpenCV's recommended template and search windows
# Small batches keep the half-resolution activations in cache: on a 2-core CPU, batches of 1-4
# ran 2-3x faster per image than batches of 32.
MODEL_BATCH = 4


def psnr_ssim(clean: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of uint8 images against their clean originals."""
    psnr = [peak_signal_noise_ratio(c, o, data_range=255) for c, o in zip(clean, out, strict=True)]
    ssim = [
        structural_similarity(c, o, channel_axis=2, data_range=255)
        for c, o in zip(clean, out, strict=True)
    ]
    return np.asarray(psnr), np.asarray(ssim)


def nlm(noisy: np.ndarray, h: float, h_color: float) -> np.ndarray:
    """OpenCV's fastNlMeansDenoisingColored on RGB uint8 images (it works in Lab internally)."""
    return np.stack(
        [
            cv2.cvtColor(
                cv2.fastNlMeansDenoisingColored(
                    cv2.cvtColor(img, cv2.COLOR_RGB2BGR), None, h, h_color, *NLM_WINDOWS
                ),
                cv2.COLOR_BGR2RGB,
            )
            for img in noisy
        ]
    )


def bm3d_rgb(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (the `bm3d` package) with the true noise level, sigma_psd = sigma / 255."""
    import bm3d

    return np.stack([to_uint8(bm3d.bm3d_rgb(to_float(img), sigma / 255.0)) for img in noisy])


def sweep_nlm(train_images: np.ndarray, sigmas=SIGMAS, seed: int = 42) -> dict[int, dict]:
    """The best (h, hColor) per sigma by mean PSNR on a few training images."""
    chosen = {}
    for sigma in sigmas:
        noisy = noise.gaussian(train_images, sigma, np.random.default_rng((seed, sigma, 7)))
        scores = {
            (fh * sigma, fc * sigma): psnr_ssim(train_images, nlm(noisy, fh * sigma, fc * sigma))[
                0
            ].mean()
            for fh, fc in product(NLM_FACTORS, NLM_FACTORS)
        }
        (h, h_color), best = max(scores.items(), key=lambda kv: kv[1])
        chosen[sigma] = {"h": h, "hColor": h_color, "sweep_psnr": round(float(best), 2)}
        log.info(
            "NLM sigma %d: h=%.1f hColor=%.1f (%.2f dB on training images)", sigma, h, h_color, best
        )
    return chosen


class _Timed:
    """Wall time of a block, accumulated per method, for images/second."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.images: dict[str, int] = {}

    def run(self, method: str, fn, images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = fn(images)
        self.seconds[method] = self.seconds.get(method, 0.0) + time.perf_counter() - start
        self.images[method] = self.images.get(method, 0) + len(images)
        return out

    def rates(self) -> dict[str, float]:
        return {m: round(self.images[m] / s, 2) for m, s in self.seconds.items()}


def evaluate(
    folder: Path,
    heldout: ImageSet,
    train_images: np.ndarray,
    bm3d_images: int = 30,
    autoencoder: Path | None = None,
    seed: int = 42,
) -> dict:
    """The evaluation block of `folder`'s manifest (figures per sigma and method) and examples."""
    threads = default_threads()
    cv2.setNumThreads(threads)  # NLM parallelises over rows; the model has all cores too
    try:
        model = Denoiser(folder, intra_op_threads=threads)
        nlm_params = sweep_nlm(train_images, seed=seed)
        ae = Autoencoder(autoencoder) if autoencoder else None
        subset = np.linspace(0, len(heldout) - 1, num=min(bm3d_images, len(heldout))).astype(int)
        timer = _Timed()
        results, examples = {}, {}
        for sigma in SIGMAS:
            clean = heldout.images
            noisy = noise.gaussian(clean, sigma, np.random.default_rng((seed, sigma)))
            p = nlm_params[sigma]
            outputs = {
                "noisy input": noisy,
                "this model": timer.run(
                    "this model", lambda x: to_uint8(model.denoise_all(x, MODEL_BATCH)), noisy
                ),
                "OpenCV NLM": timer.run(
                    "OpenCV NLM", lambda x, p=p: nlm(x, p["h"], p["hColor"]), noisy
                ),
            }
            if ae is not None:
                outputs["bottleneck autoencoder"] = timer.run(
                    "bottleneck autoencoder",
                    lambda x: to_uint8(ae.reconstruct_all(x)[1]),
                    noisy,
                )
            bm3d_out = timer.run("BM3D", lambda x, s=sigma: bm3d_rgb(x, s), noisy[subset])
            all_rows = {m: psnr_ssim(clean, out) for m, out in outputs.items()}
            sub_rows = {m: (psnr[subset], ssim[subset]) for m, (psnr, ssim) in all_rows.items()}
            sub_rows["BM3D"] = psnr_ssim(clean[subset], bm3d_out)
            results[str(sigma)] = {
                "all": _summarise(all_rows),
                "subset": _summarise(sub_rows),
            }
            examples[sigma] = {
                "noisy": noisy[subset],
                **{m: o[subset] for m, o in outputs.items() if m != "noisy input"},
                "BM3D": bm3d_out,
                "clean": clean[subset],
            }
            log.info("sigma %d: %s", sigma, results[str(sigma)]["subset"])
    finally:
        cv2.setNumThreads(1)  # back to aecore.preprocessing's setting
    return {
        "split": "held-out (the stratified validation split neither model trained on)",
        "images": len(heldout),
        "subset_images": len(subset),
        "subset": "evenly spaced over the held-out list (all classes); BM3D runs on it only",
        "size": list(heldout.images.shape[1:]),
        "noise": "additive Gaussian, clipped and rounded to uint8",
        "sigmas": list(SIGMAS),
        "nlm": {
            "windows": {"template": NLM_WINDOWS[0], "search": NLM_WINDOWS[1]},
            "chosen_by": f"best mean PSNR over h, hColor in {list(NLM_FACTORS)} x sigma on "
            f"{len(train_images)} training images",
            "per_sigma": {str(s): v for s, v in nlm_params.items()},
        },
        "bm3d": {"package": "bm3d", "call": "bm3d_rgb(noisy, sigma_psd=sigma/255)"},
        "autoencoder": f"{ae.name} v{ae.version}" if ae else None,
        "results": results,
        "images_per_second": timer.rates(),
        "threads": threads,
        "model_batch": MODEL_BATCH,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }, examples


def _mse(value: float | None) -> str:
    return "—" if value is None else f"{value:.5f}"


def _summarise(rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict]:
    return {
        m: {"psnr": round(float(psnr.mean()), 2), "ssim": round(float(ssim.mean()), 4)}
        for m, (psnr, ssim) in rows.items()
    }


def picture_grid(examples: dict[int, dict[str, np.ndarray]], path: Path, rows: int = 2) -> Path:
    """Per sigma, `rows` held-out images: noisy, each method, clean (PSNR under each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = list(examples)
    columns = list(examples[sigmas[0]])
    n = min(rows, len(examples[sigmas[0]]["clean"]))
    pick = np.linspace(0, len(examples[sigmas[0]]["clean"]) - 1, num=n).astype(int)
    fig, axes = plt.subplots(
        n * len(sigmas), len(columns), figsize=(1.7 * len(columns), 1.85 * n * len(sigmas))
    )
    for s, sigma in enumerate(sigmas):
        clean = examples[sigma]["clean"]
        for r, i in enumerate(pick):
            for c, column in enumerate(columns):
                ax = axes[s * n + r, c]
                image = examples[sigma][column][i]
                ax.imshow(image)
                ax.set_xticks([]), ax.set_yticks([])
                if column != "clean":
                    db = peak_signal_noise_ratio(clean[i], image, data_range=255)
                    ax.set_xlabel(f"{db:.1f} dB", fontsize=7, labelpad=1)
                if s * n + r == 0:
                    ax.set_title(column.replace("noisy", "noisy input"), fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"sigma {sigma}", fontsize=8)
    fig.tight_layout(pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, pil_kwargs={"quality": 85})  # JPEG: photos, small in the repo
    plt.close(fig)
    return path


def markdown_table(evaluation: dict, part: str) -> list[str]:
    """PSNR / SSIM rows per method, one column pair per sigma."""
    sigmas = [str(s) for s in evaluation["sigmas"]]
    methods = list(evaluation["results"][sigmas[0]][part])
    lines = [
        "| method | " + " | ".join(f"σ={s} PSNR dB / SSIM" for s in sigmas) + " |",
        "|---|" + "---|" * len(sigmas),
    ]
    for method in methods:
        cells = [evaluation["results"][s][part][method] for s in sigmas]
        lines.append(
            f"| {method} | "
            + " | ".join(f"{c['psnr']:.2f} / {c['ssim']:.3f}" for c in cells)
            + " |"
        )
    return lines


def report_markdown(body: dict) -> str:
    """report.md of a denoiser folder: what it is, the evaluation tables, speed, the grid."""
    e, t = body["evaluation"], body["training"]
    rates = e["images_per_second"]
    nlm_rows = [
        f"| {s} | {p['h']:.1f} | {p['hColor']:.1f} | {p['sweep_psnr']:.2f} |"
        for s, p in e["nlm"]["per_sigma"].items()
    ]
    lines = [
        f"# {body['name']} v{body['version']} ({body['architecture']}, tasks: {body['tasks']})",
        "",
        f"A residual U-Net denoiser trained on `{t['data']}` ({t['train_images']} training images, "
        f"{t['epochs']} epochs of {t['patch']}x{t['patch']} random crops, "
        f"{t['wall_seconds'] / 60:.0f} min on CPU); best validation MSE {_mse(t['best_val_loss'])} "
        "on the training noise mix. ONNX parity (max abs, Keras vs onnxruntime): "
        f"{body['metrics']['onnx_parity_max_abs']:.2e}.",
        "",
        "Training noise, drawn independently per image and epoch: Gaussian σ ~ U[0, 55] (p 0.8), "
        "salt-and-pepper up to 5% of pixels (p 0.2), JPEG quality 10-90 (p 0.35), in that order.",
        "",
        f"## Evaluation: {e['images']} held-out images, {e['size'][0]}x{e['size'][1]}",
        "",
        f"Split: {e['split']}. Noise: {e['noise']}. PSNR and SSIM are means over images.",
        "",
        *markdown_table(e, "all"),
        "",
        f"On the {e['subset_images']}-image subset ({e['subset']}):",
        "",
        *markdown_table(e, "subset"),
        "",
        "OpenCV non-local means parameters (template 7, search 21), chosen per σ by the best mean "
        f"PSNR on training images ({e['nlm']['chosen_by']}):",
        "",
        "| σ | h | hColor | sweep PSNR dB |",
        "|---|---|---|---|",
        *nlm_rows,
        "",
        f"Images per second on this machine ({e['threads']} threads each, the model in batches "
        f"of {e.get('model_batch', 32)}, load average "
        f"{e['load_average'][0]} at the end of the run, shared with other jobs):",
        "",
        "| method | images/s | vs NLM |",
        "|---|---|---|",
        *[f"| {m} | {r:.2f} | {r / rates['OpenCV NLM']:.2f}x |" for m, r in rates.items()],
        "",
        *(
            [
                f"The bottleneck autoencoder row is `{e['autoencoder']}` reconstructing the noisy "
                "input: it cannot return more detail than its latent keeps, which caps it near "
                "its clean-input reconstruction PSNR whatever the noise level; the denoiser's skip "
                "connections carry each scale's detail past its bottleneck.",
                "",
            ]
            if e.get("autoencoder")
            else []
        ),
        "## Examples (held-out images; PSNR under each)",
        "",
        "![noisy, each method, clean](grid.jpg)",
    ]
    return "\n".join(lines) + "\n"
