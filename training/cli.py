"""`python -m training {train,export,evaluate,evaluate-anomaly,calibrate,add-generator,probe,...}`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from training.data import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an autoencoder on a folder of images")
    t.add_argument("--data", required=True, help="image folder: <root>/<class>/*.jpg or flat")
    t.add_argument("--out", required=True, help="run folder for checkpoints and history")
    t.add_argument("--arch", default="spatial", help="architecture (see `summary`)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument("--latent-dim", type=int, default=1024)
    t.add_argument("--val-fraction", type=float, default=0.12)
    t.add_argument("--val-dir", help="validation folder instead of a split of --data")
    t.add_argument("--limit", type=int, help="use a stratified subset of this many images")
    t.add_argument("--flip", action="store_true", help="augment with horizontal flips")
    t.add_argument("--patience", type=int, default=5, help="early-stopping patience (epochs)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--init-from",
        help="start from a published model version's weights (e.g. models/intel-scenes/3) "
        "or a run folder's best checkpoint (its train/validation split is kept)",
    )
    t.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="with --init-from, train only the decoder: the latents stay the starting model's "
        "(stored embeddings stay valid) and the decoder is refit to them on clean inputs",
    )
    ssl = t.add_argument_group(
        "self-supervised terms (docs/training.md); off by default, kept by --resume"
    )
    ssl.add_argument(
        "--invariance-weight",
        type=float,
        default=0.0,
        help="weight of a VICReg/NT-Xent term between the latents of two random views of each "
        "image (crop, mirror, colour), through a projector used only in training",
    )
    ssl.add_argument("--invariance-loss", default="vicreg", choices=["vicreg", "ntxent"])
    ssl.add_argument(
        "--invariance-final-weight",
        type=float,
        help="decay the invariance weight geometrically to this value over --invariance-decay",
    )
    ssl.add_argument(
        "--invariance-decay",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        help="the epochs over which the invariance weight decays (full weight before START)",
    )
    ssl.add_argument("--projector-dim", type=int, default=512, help="the projector's width")
    ssl.add_argument(
        "--mask-ratio",
        type=float,
        default=0.0,
        help="share of 16x16 patches zeroed in the encoder's input; the target stays clean",
    )
    ssl.add_argument("--ssim-weight", type=float, default=0.0, help="weight of 1 - SSIM")
    ssl.add_argument(
        "--schedule",
        default="plateau",
        choices=["plateau", "cosine"],
        help="plateau: halve the rate when val_loss stalls; cosine: decay over --epochs to 1%%",
    )

    e = sub.add_parser("export", help="export a run's best checkpoint to a model folder")
    e.add_argument("--run", required=True, help="run folder written by `train`")
    e.add_argument("--model-dir", default="models")
    e.add_argument("--name", default="intel-scenes")
    e.add_argument("--version", type=int, help="default: the next free version")
    e.add_argument("--target-fpr", type=float, default=0.01, help="anomaly calibration target")
    e.add_argument("--baseline-run", help="a `seed` run on the same split, for the report")
    e.add_argument("--no-compare", action="store_true", help="skip the throughput comparison")

    v = sub.add_parser("evaluate", help="metrics and a report for a model folder on images")
    v.add_argument("--model", required=True, help="model folder, e.g. models/intel-scenes/1")
    v.add_argument("--data", required=True, help="image folder")
    v.add_argument("--report-dir", help="write figures and report.md here")
    v.add_argument("--limit", type=int)

    a = sub.add_parser(
        "evaluate-anomaly",
        help="refit, calibrate and evaluate a model's anomaly scorers (ImageNet-C, off-domain "
        "photos) and publish them with their report as the model's next version",
    )
    a.add_argument("--model", required=True, help="model folder, e.g. models/intel-scenes/1")
    how = a.add_mutually_exclusive_group(required=True)
    how.add_argument("--run", help="its training run (for the train/val split)")
    how.add_argument(
        "--reuse",
        help="a version with the same encoder and decoder whose scorers, calibration and "
        "anomaly report to carry over instead of refitting",
    )
    a.add_argument("--target-fpr", type=float, default=0.01)
    a.add_argument("--scorer", default="combined", help="the default scorer to record")

    c = sub.add_parser(
        "calibrate",
        help="refit a model's anomaly thresholds and 0-1 maps on your own normal images and "
        "publish them as the model's next version",
    )
    c.add_argument("--model", required=True, help="model folder, e.g. models/intel-scenes/3")
    c.add_argument("--normal", required=True, help="folder of normal images (any layout)")
    c.add_argument("--target-fpr", type=float, default=0.01)
    g = sub.add_parser(
        "add-generator",
        help="publish a model's next version with a generation density and the linear probe",
    )
    g.add_argument("--model", required=True, help="model folder, e.g. models/intel-scenes/1")
    g.add_argument("--data", required=True, help="the image folder it was trained on")
    g.add_argument("--version", type=int, help="default: the next free version")

    d = sub.add_parser("train-denoiser", help="train a denoiser (noisy in, clean target)")
    d.add_argument("--data", required=True, help="image folder: <root>/<class>/*.jpg or flat")
    d.add_argument("--out", required=True, help="run folder for checkpoints and history")
    d.add_argument("--arch", default="denoiser")
    d.add_argument("--width", type=int, default=16, help="channels at the first scale")
    d.add_argument("--epochs", type=int, default=60)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--patch", type=int, default=96, help="training crop size (divisible by 16)")
    d.add_argument(
        "--learning-rate", type=float, help="default 1e-3; with --resume, the rate to continue at"
    )
    d.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this")
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--resume", action="store_true", help="continue the run in --out")

    x = sub.add_parser(
        "export-denoiser", help="export, evaluate and publish a denoiser run as a model folder"
    )
    x.add_argument("--run", required=True, help="run folder written by `train-denoiser`")
    x.add_argument("--model-dir", default="models")
    x.add_argument("--name", default="intel-scenes-denoise")
    x.add_argument("--version", type=int, help="default: the next free version")
    _evaluation_options(x)

    w = sub.add_parser(
        "evaluate-denoiser",
        help="PSNR/SSIM and speed of a denoiser, OpenCV NLM and BM3D on its held-out images",
    )
    w.add_argument("--model", required=True, help="e.g. models/intel-scenes-denoise/1")
    w.add_argument("--data", required=True, help="the folder it was trained on (split as recorded)")
    w.add_argument("--report-dir", help="write report.md and grid.jpg here")
    _evaluation_options(w)

    p = sub.add_parser(
        "probe",
        help="validation MSE and linear probe of a run's best checkpoint (Keras, no export)",
    )
    p.add_argument("--run", required=True, help="run folder written by `train`")
    p.add_argument("--anchors", action="store_true", help="also PCA and thumbnail rows")

    s = sub.add_parser("summary", help="print the Keras summaries of an architecture")
    s.add_argument("--arch", default="seed")
    s.add_argument("--latent-dim", type=int, default=1024)
    return parser


def _evaluation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bm3d-images", type=int, default=30, help="BM3D runs on this subset")
    parser.add_argument(
        "--compare-autoencoder", help="also score a bottleneck autoencoder folder on noisy input"
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from training.train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    run_dir = train(config, resume=args.resume)
    print(f"run saved in {run_dir}; export it with: python -m training export --run {run_dir}")
    return 0


def _export(args) -> int:
    from training.export import export

    baseline = Path(args.baseline_run) if args.baseline_run else None
    folder = export(
        Path(args.run), Path(args.model_dir), args.name, args.version, args.target_fpr,
        compare_seed=not args.no_compare, baseline_run=baseline,
    )  # fmt: skip
    print(
        json.dumps(
            {"model": str(folder), **json.loads((folder / "model.json").read_text())["metrics"]},
            indent=2,
        )
    )
    return 0


def _evaluate(args) -> int:
    from aecore import manifest
    from training import data
    from training.export import data_name, mse_metrics, reconstruct, spec_of, write_report

    folder = Path(args.model)
    images = data.load(Path(args.data), spec_of(folder), args.limit)
    latents, outputs = reconstruct(folder, images.images)
    scored = mse_metrics(images.images, outputs, images)
    result = {
        "model": str(folder),
        "data": args.data,
        "images": len(images),
        "skipped_files": len(images.skipped),
        "mse": scored["val_mse"],
        "mse_per_class": scored.get("val_mse_per_class", {}),
    }
    if args.report_dir:
        body = dict(manifest.read(folder))
        body["metrics"] = {
            **body.get("metrics", {}),
            "val_mse": result["mse"],
            "val_mse_per_class": result["mse_per_class"],
        }
        body["training"] = {**body.get("training", {}), "data": data_name(args.data)}
        write_report(Path(args.report_dir), body, images, outputs, latents)
    print(json.dumps(result, indent=2))
    return 0


def _evaluate_anomaly(args) -> int:
    from training.anomaly import publish_evaluated, publish_reused

    if args.reuse:
        folder = publish_reused(Path(args.model), Path(args.reuse))
        print(f"published {folder}")
        return 0
    from training.train import TrainConfig, load_split

    config = TrainConfig(**json.loads((Path(args.run) / "config.json").read_text()))
    train, val = load_split(config, Path(args.run))
    folder = publish_evaluated(
        Path(args.model), train, val, args.target_fpr, config.seed, args.scorer
    )
    print((folder / "report" / "anomaly.md").read_text())
    print(f"published {folder}")
    return 0


def _calibrate(args) -> int:
    from aecore import manifest
    from aecore.preprocessing import ImageSpec
    from training import data
    from training.anomaly import publish_recalibrated

    source = Path(args.model)
    try:
        spec = ImageSpec.from_manifest(manifest.read(source)["input"])
    except manifest.ModelFolderError as exc:
        raise ValueError(f"--model {source}: {exc}") from None
    normal = data.load(Path(args.normal), spec)
    folder, calibration = publish_recalibrated(source, normal, args.target_fpr)
    e = calibration["expected_fpr"]
    print(
        json.dumps(
            {
                "model": str(folder),
                "images": calibration["images"],
                "skipped_files": len(normal.skipped),
                "target_fpr": args.target_fpr,
                "expected_fpr": e["expected"],
                "expected_fpr_ci95": [e["low"], e["high"]],
            },
            indent=2,
        )
    )
    return 0


def _add_generator(args) -> int:
    from training.generation import add_generator

    folder = add_generator(Path(args.model), Path(args.data), args.version)
    print((folder / "report" / "report.md").read_text())
    return 0


def _train_denoiser(args) -> int:
    from training.denoise import DenoiseConfig, train_denoiser

    fields = DenoiseConfig.__dataclass_fields__
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    run_dir = train_denoiser(DenoiseConfig(**given), args.resume, args.learning_rate)
    print(
        f"run saved in {run_dir}; export it with: python -m training export-denoiser --run {run_dir}"
    )
    return 0


def _export_denoiser(args) -> int:
    from training.denoise_export import export_denoiser

    autoencoder = Path(args.compare_autoencoder) if args.compare_autoencoder else None
    folder = export_denoiser(
        Path(args.run), Path(args.model_dir), args.name, args.version, args.bm3d_images, autoencoder
    )
    print((folder / "report" / "report.md").read_text())
    return 0


def _evaluate_denoiser(args) -> int:
    from aecore import manifest
    from training import denoise_eval
    from training.denoise_export import heldout_split, sweep_images

    folder = Path(args.model)
    body = manifest.read(folder)
    train, heldout = heldout_split(folder, Path(args.data))
    autoencoder = Path(args.compare_autoencoder) if args.compare_autoencoder else None
    evaluation, examples = denoise_eval.evaluate(
        folder,
        heldout,
        sweep_images(train),
        args.bm3d_images,
        autoencoder,
        body["training"]["seed"],
    )
    if args.report_dir:
        report_dir = Path(args.report_dir)
        denoise_eval.picture_grid(examples, report_dir / "grid.jpg")
        body = {**body, "evaluation": evaluation}
        (report_dir / "report.md").write_text(denoise_eval.report_markdown(body))
    print(json.dumps(evaluation, indent=2))
    return 0


def _probe(args) -> int:
    from training.probe import probe_run

    result = probe_run(Path(args.run), anchors=args.anchors)
    (Path(args.run) / "probe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"val_mse": result["val_mse"], **result["accuracy"]}, indent=2))
    return 0


def _summary(args) -> int:
    from training.architectures import build

    encoder, decoder = build(args.arch, (128, 128, 3), args.latent_dim)
    encoder.summary()
    decoder.summary()
    print(f"encoder params: {encoder.count_params():,}")
    print(f"decoder params: {decoder.count_params():,}")
    return 0


COMMANDS = {
    "train": _train,
    "export": _export,
    "evaluate": _evaluate,
    "evaluate-anomaly": _evaluate_anomaly,
    "calibrate": _calibrate,
    "add-generator": _add_generator,
    "train-denoiser": _train_denoiser,
    "export-denoiser": _export_denoiser,
    "evaluate-denoiser": _evaluate_denoiser,
    "probe": _probe,
    "summary": _summary,
}
