"""The driver: plan the parts, skip those already written, run the rest on Ray Data, summarise.

Ray runs embedded on this machine (`ray.init("local")`) unless `--address` / RAY_ADDRESS
names a cluster. Ray's usage statistics and dashboard stay off: the product contacts no one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from aecore import manifest
from aecore.anomaly import AnomalyScorers
from batch import storage
from batch.sources import ParquetColumns, Part, plan

JOB_FILE = "_job.json"
log = logging.getLogger("batch")


class JobError(ValueError):
    """The job cannot start as asked (a bad option, an output holding another job)."""


@dataclass
class Options:
    verb: str
    source: str
    output: str
    model: Path
    kind: str | None = None
    scorer: str | None = None
    batch_size: int = 32
    part_size: int = 256
    concurrency: int | None = None  # default: every CPU (or GPU) of the cluster
    cpus_per_actor: int = 1
    gpus_per_actor: float | None = None  # default: 1 when CUDA is usable, else 0
    max_pixels: int | None = 4096 * 4096  # the service's AE_MAX_IMAGE_PIXELS default
    columns: ParquetColumns = field(default_factory=ParquetColumns)
    address: str | None = None
    num_cpus: int | None = None  # local Ray only: cap the CPUs it may use
    progress: bool = True


@dataclass
class Summary:
    images: int
    failed: int
    parts: int
    parts_skipped: int
    images_run: int
    seconds: float
    failures: dict[str, int]
    examples: dict[str, str]

    @property
    def images_per_s(self) -> float:
        return self.images_run / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"{self.images} images in {self.parts} parts ({self.parts_skipped} already done); "
            f"ran {self.images_run} in {self.seconds:.1f} s = {self.images_per_s:.1f} img/s; "
            f"{self.failed} failed"
        ]
        for reason, count in self.failures.items():
            lines.append(f"  {count} x {reason} (e.g. {self.examples[reason]})")
        return "\n".join(lines)


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start one embedded in this process."""
    # Set before Ray is imported; read when it starts a local cluster. A cluster started with
    # `ray start` needs it in its own environment (deploy/ray/rayjob.yaml sets it).
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init("local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar, counted in images, is ours
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def model_folder(path: Path) -> Path:
    """A model folder (with model.json), or a model's root folder: its highest version."""
    path = Path(path)
    if (path / manifest.MANIFEST).is_file():
        return path.resolve()
    return manifest.resolve(path.parent, path.name).resolve()


def run(options: Options) -> Summary:
    from batch.worker import VERBS

    if options.verb not in VERBS:
        raise JobError(f"unknown verb {options.verb!r}; one of {VERBS}")
    for name in ("batch_size", "part_size", "cpus_per_actor"):
        if getattr(options, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1")
    folder = model_folder(options.model)
    card = manifest.read(folder)
    scorers = AnomalyScorers(card["anomaly"], folder)
    scorer = None
    if options.verb == "score":
        scorer = options.scorer or scorers.default
        if scorer not in scorers.thresholds:
            raise JobError(
                f"unknown scorer {scorer!r}; this model has {sorted(scorers.thresholds)}"
            )
    source, output = storage.normalise(options.source), storage.normalise(options.output)
    parts = plan(source, options.kind, options.part_size, options.columns)
    job = {
        "verb": options.verb,
        "model": {"name": card["name"], "version": card["version"],
                  "sha256": card["files"].get("sha256")},
        "scorer": scorer,
        "threshold": scorers.thresholds.get(scorer) if scorer else None,
        "source": source,
    }  # fmt: skip
    todo = _prepare_output(output, job, parts)
    if todo:
        start_ray(options.address, options.num_cpus)
    started = time.perf_counter()  # Ray's own start-up (seconds, once per process) is not counted
    if todo:
        _execute(options, folder, output, job, todo, int(card["latent_dim"]))
    seconds = time.perf_counter() - started
    return _summarise(output, parts, todo, seconds)


def _prepare_output(output: str, job: dict, parts: list[Part]) -> list[Part]:
    """Check the output holds this job (or nothing); drop stale parts; the parts still to run."""
    fs, path = storage.resolve(output)
    fs.create_dir(path, recursive=True)
    record = storage.join(output, JOB_FILE)
    names = [p.rpartition("/")[2] for p in storage.list_files(output, recursive=False)]
    existing = {n for n in names if n.startswith("part-")}
    if existing and storage.exists(record):
        previous = json.loads(storage.read_bytes(record))
        if previous != job:
            raise JobError(
                f"{output} holds the output of another job ({previous['verb']} with "
                f"{previous['model']['name']} v{previous['model']['version']} on "
                f"{previous['source']}); write to a new folder or delete it"
            )
    storage.write_text_atomically(json.dumps(job, indent=2), record)
    wanted = {p.name for p in parts}
    for stale in sorted(existing - wanted):  # parts of an earlier plan of a changed input
        log.warning("removing %s: the input changed since it was written", stale)
        fs.delete_file(storage.resolve(storage.join(output, stale))[1])
    # Temporaries of an interrupted run (one job per output folder at a time).
    for name in names:
        if name.startswith(".part-") and name.endswith(".tmp"):
            fs.delete_file(storage.resolve(storage.join(output, name))[1])
    return [p for p in parts if p.name not in existing]


def _execute(
    options: Options, folder: Path, output: str, job: dict, todo: list[Part], latent_dim: int
) -> None:
    import ray
    import ray.data
    from tqdm import tqdm

    from batch.worker import PartRunner

    resources = ray.cluster_resources()
    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if _cuda_available() and resources.get("GPU", 0) >= 1 else 0.0
    if options.concurrency:
        actors = options.concurrency
    elif gpus:
        actors = max(1, int(resources.get("GPU", 0) // gpus))
    else:
        actors = max(1, int(resources.get("CPU", 1) // options.cpus_per_actor))
    actors = min(actors, len(todo))
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpus else None
    metadata = {**job, "latent_dim": latent_dim}
    dataset = ray.data.from_items(
        [{"part": p.to_json()} for p in todo], override_num_blocks=len(todo)
    ).map_batches(
        PartRunner,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=options.cpus_per_actor,
        num_gpus=gpus,
        fn_constructor_kwargs={
            "folder": str(folder), "verb": options.verb, "output": output,
            "scorer": job["scorer"], "batch_size": options.batch_size,
            "threads": options.cpus_per_actor, "providers": providers,
            "max_pixels": options.max_pixels, "metadata": metadata,
        },
    )  # fmt: skip
    total = sum(p.images for p in todo)
    log.info("%d parts (%d images) on %d actor(s), %s GPU each", len(todo), total, actors, gpus)
    # Closed here, while Ray runs: after Ctrl-C, an iterator left to the garbage collector shuts
    # Ray Data's executor down after Ray's own exit hook, and waits forever for a Ray to start.
    with (
        closing(iter(dataset.iter_rows())) as rows,
        tqdm(total=total, unit="img", disable=not options.progress, file=sys.stderr) as bar,
    ):
        failed = 0
        for done in rows:
            failed += int(done["failed"])
            bar.update(int(done["images"]))
            bar.set_postfix(failed=failed)


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _summarise(output: str, parts: list[Part], todo: list[Part], seconds: float) -> Summary:
    """Counts over the whole output (earlier runs included); throughput over this run."""
    fs = storage.resolve(output)[0]
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for part in parts:
        location = storage.join(output, part.name)
        table = pq.read_table(
            storage.resolve(location)[1], columns=["path", "error"], filesystem=fs
        )
        for path, error in zip(table["path"].to_pylist(), table["error"].to_pylist(), strict=True):
            if error is not None:
                reason = error.split(":", 1)[0]
                failures[reason] += 1
                examples.setdefault(reason, f"{path}: {error}")
    return Summary(
        images=sum(p.images for p in parts),
        failed=sum(failures.values()),
        parts=len(parts),
        parts_skipped=len(parts) - len(todo),
        images_run=sum(p.images for p in todo),
        seconds=seconds,
        failures=dict(failures.most_common()),
        examples=examples,
    )


def summary_json(summary: Summary) -> str:
    return json.dumps({**asdict(summary), "images_per_s": summary.images_per_s}, indent=2)
