"""`python -m batch {encode,score,reconstruct-error} SOURCE --output OUT` (console: convae-batch)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from batch.job import JobError, Options, run, summary_json
from batch.sources import KINDS, ParquetColumns, SourceError

HELP = {
    "encode": "latents of every image",
    "reconstruct-error": "latents and reconstruction MSE",
    "score": "latents, MSE, and the model's calibrated anomaly score and flag",
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="convae-batch",
        description="Encode or score a whole data set with Ray Data; Parquet parts out, resumable.",
    )
    verbs = top.add_subparsers(dest="verb", required=True)
    for verb, text in HELP.items():
        p = verbs.add_parser(verb, help=text, description=text)
        p.add_argument("source", help="folder tree, glob, list of paths, or Parquet (local or URI)")
        p.add_argument("--output", "-o", required=True, help="output folder (local or URI)")
        p.add_argument(
            "--model",
            type=Path,
            default=Path("models/intel-scenes"),
            help="a model folder, or a model's folder of versions (highest is used)",
        )
        p.add_argument("--kind", choices=KINDS, help="what SOURCE is (default: detected)")
        p.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call")
        p.add_argument("--part-size", type=int, default=256, help="images per output part")
        p.add_argument("--concurrency", type=int, help="actors (default: all CPUs, or GPUs)")
        p.add_argument(
            "--cpus-per-actor", type=int, default=1, help="CPUs (and onnxruntime threads) per actor"
        )
        p.add_argument(
            "--gpus-per-actor",
            type=float,
            help="default: 1 when onnxruntime has CUDA and Ray sees a GPU, else 0",
        )
        p.add_argument(
            "--max-pixels",
            type=int,
            default=4096 * 4096,
            help="refuse larger images, as the service's AE_MAX_IMAGE_PIXELS",
        )
        p.add_argument("--image-column", default="image", help="Parquet input: image bytes")
        p.add_argument("--path-column", help="Parquet input: row id (default: path if present)")
        p.add_argument("--class-column", help="Parquet input: class (default: class if present)")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
        p.add_argument("--num-cpus", type=int, help="local Ray only: CPUs it may use")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--summary-json", type=Path, help="also write the summary here")
        if verb == "score":
            p.add_argument("--scorer", help="one of the manifest's scorers (default: its default)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = Options(
        verb=args.verb, source=args.source, output=args.output, model=args.model,
        kind=args.kind, scorer=getattr(args, "scorer", None), batch_size=args.batch_size,
        part_size=args.part_size, concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        max_pixels=args.max_pixels, address=args.address, num_cpus=args.num_cpus,
        columns=ParquetColumns(args.image_column, args.path_column, args.class_column),
        progress=not args.no_progress,
    )  # fmt: skip
    try:
        summary = run(options)
    except (JobError, SourceError) as exc:
        print(f"convae-batch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convae-batch: interrupted; the parts written are kept, the same command "
              "resumes", file=sys.stderr)  # fmt: skip
        return 130
    print(summary.text(), file=sys.stderr)
    if args.summary_json:
        args.summary_json.write_text(summary_json(summary))
    return 0
