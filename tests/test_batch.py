"""The batch job (`python -m batch`) on the committed fixtures with local Ray limited to 2 CPUs.

Checks rows and classes, latents and anomaly scores bit-equal to the running service's, a
corrupt file reported in its own row, resume after an interruption, Parquet and list inputs,
the CLI, and the KubeRay example manifest. Ray starts once for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batch.cli import main
from batch.job import JobError, Options, run, start_ray
from batch.sources import ParquetColumns, Part, plan
from batch.worker import PartRunner
from tests.conftest import DEFAULT_MODEL_DIR, REPO
from tests.service_client import multipart, npy, running

# Ray Data's own DataContext warns about its deprecated fields on first use.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
MODEL = DEFAULT_MODEL_DIR / "intel-scenes"
CORRUPT = {"forest/corrupt.jpg": b"\xff\xd8\xff\xe0" + b"not a jpeg" * 40, "sea/empty.png": b""}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    start_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, scene_paths) -> Path:
    """The fixture scenes in class folders, plus a corrupt JPEG and an empty PNG."""
    root = tmp_path_factory.mktemp("scenes")
    for path in scene_paths:
        (root / path.parent.name).mkdir(exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)
    for name, data in CORRUPT.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def scored(local_ray, scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    summary = run(Options("score", str(scenes), str(out), MODEL, part_size=8, progress=False))
    return out, summary


def table_of(folder: Path) -> pa.Table:
    return pq.read_table(folder).sort_by("path")


def test_rows_classes_and_bad_files_in_their_rows(scored, scenes, scene_paths):
    out, summary = scored
    table = table_of(out)
    assert table.num_rows == len(scene_paths) + len(CORRUPT) == summary.images == 32
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        p.name for p in plan(str(scenes), part_size=8)
    ]
    rows = table.to_pylist()
    for row in rows:
        relative = Path(row["path"]).relative_to(scenes)
        assert row["class"] == relative.parts[0]
        if relative.as_posix() in CORRUPT:
            assert row["error"].startswith("invalid_image: ")
            assert row["latent"] is row["mse"] is row["score"] is row["is_anomaly"] is None
        else:
            assert row["error"] is None and len(row["latent"]) == 1024
            assert row["mse"] > 0 and isinstance(row["is_anomaly"], bool)
    assert summary.failures == {"invalid_image": 2}
    assert summary.parts == 4 and summary.parts_skipped == 0 and summary.images_run == 32
    meta = json.loads(table.schema.metadata[b"convae"])
    assert meta["model"]["name"] == "intel-scenes" and meta["verb"] == "score"


async def test_latents_and_scores_equal_the_service(scored, scenes, scene_paths):
    table = table_of(scored[0]).filter(pa.compute.is_null(pa.compute.field("error")))
    relative = [Path(p).relative_to(scenes) for p in table["path"].to_pylist()]
    blobs = [(scenes / r).read_bytes() for r in relative]
    assert len(blobs) == len(scene_paths)
    async with running() as client:
        encoded = await client.post(
            "/encode", files=multipart(blobs), headers={"Accept": "application/x-npy"}
        )
        scored_by_service = await client.post("/anomaly-score", files=multipart(blobs))
    assert encoded.status_code == 200 and scored_by_service.status_code == 200
    latents = np.stack(table["latent"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert latents.dtype == npy(encoded.content).dtype
    assert np.array_equal(latents, npy(encoded.content))  # bit for bit, not approximately
    results = scored_by_service.json()["results"]
    assert table["score"].to_pylist() == [r["raw_score"] for r in results]  # raw, as batch writes
    assert table["mse"].to_pylist() == [r["mse"] for r in results]
    assert table["is_anomaly"].to_pylist() == [r["is_anomaly"] for r in results]


def test_resume_recomputes_only_the_missing_part(scored, scenes, tmp_path):
    original, _ = scored
    out = tmp_path / "out"
    shutil.copytree(original, out)
    parts = sorted(out.glob("part-*.parquet"))
    lost = parts[1]
    lost.unlink()  # as if the run had stopped before this part was written
    (out / f".{lost.name}.0123abcd.tmp").write_bytes(b"half a part")  # and left its temporary
    before = {p.name: p.stat().st_mtime_ns for p in parts if p != lost}
    stale = out / "part-00004-0123456789ab.parquet"  # a part of an earlier, different input
    shutil.copy(parts[0], stale)
    summary = run(Options("score", str(scenes), str(out), MODEL, part_size=8, progress=False))
    assert (summary.parts_skipped, summary.images_run) == (3, lost_rows(original / lost.name))
    assert {p.name: p.stat().st_mtime_ns for p in parts if p != lost} == before
    assert lost.is_file() and not stale.exists() and not list(out.glob(".*.tmp"))
    assert table_of(out).equals(table_of(original))
    again = run(Options("score", str(scenes), str(out), MODEL, part_size=8, progress=False))
    assert again.images_run == 0 and again.parts_skipped == 4 and again.failed == 2


def test_an_interrupted_run_resumes_where_it_stopped(local_ray, scored, scenes, tmp_path):
    """Ctrl-C a real `python -m batch` (its own Ray) after its first parts, then run again."""
    out = tmp_path / "out"
    # `python -m batch`, with Ctrl-C raising KeyboardInterrupt as in a terminal even when this
    # test runs in the background (`make test &`), whose children start with SIGINT ignored.
    terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('batch', run_name='__main__', alter_sys=True)")  # fmt: skip
    command = [sys.executable, "-c", terminal, "score", str(scenes), "-o", str(out),
               "--model", str(MODEL), "--part-size", "2", "--num-cpus", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    with subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as job:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 1 and time.monotonic() < deadline:
            assert job.poll() is None, job.stderr.read()
            time.sleep(0.05)
        seen = sorted(p.name for p in out.glob("part-*.parquet"))
        job.send_signal(signal.SIGINT)
        try:
            stderr = job.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            job.kill()  # else leaving `with` waits for it without a limit
            raise
    assert job.returncode == 130, stderr[-3000:]  # it stopped on Ctrl-C, and said so
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    # Stopped part-way (one actor, parts one at a time).
    assert 1 <= len(written) < 16, (
        f"{len(seen)} parts at the interrupt; the job said {stderr[-3000:]}"
    )
    summary = run(Options("score", str(scenes), str(out), MODEL, part_size=2, progress=False))
    assert summary.parts_skipped == len(written) and summary.parts == 16
    assert table_of(out).equals(table_of(scored[0]))  # the same rows as one uninterrupted run


def lost_rows(part: Path) -> int:
    return pq.read_metadata(part).num_rows


def test_an_output_of_another_job_is_refused(scored, scenes):
    with pytest.raises(JobError, match="another job"):
        run(Options("encode", str(scenes), str(scored[0]), MODEL, part_size=8, progress=False))


def test_parquet_input_gives_the_same_latents(scored, scenes, tmp_path):
    reference = table_of(scored[0]).filter(pa.compute.is_null(pa.compute.field("error")))
    paths = reference["path"].to_pylist()
    images = pa.table(
        {
            "path": paths,
            "class": reference["class"],
            "image": pa.array([Path(p).read_bytes() for p in paths], pa.binary()),
        }
    )
    source = tmp_path / "images.parquet"
    pq.write_table(images, source, row_group_size=16)
    out = tmp_path / "out"
    summary = run(Options("encode", str(source), str(out), MODEL, progress=False))
    assert summary.parts == 2 and summary.failed == 0
    table = table_of(out)
    assert table["path"].to_pylist() == paths and table["class"].equals(reference["class"])
    assert table["latent"].equals(reference["latent"])
    assert table["mse"].null_count == table["score"].null_count == table.num_rows


def test_list_and_glob_inputs_plan_the_same_files(scenes, tmp_path):
    folder = plan(str(scenes), part_size=1000)[0]
    listing = tmp_path / "files.txt"
    lines = [f"{p}\t{c}" for p, c in zip(folder.paths, folder.classes, strict=True)]
    listing.write_text("# path<TAB>class\n" + "\n".join(lines) + "\n")
    listed = plan(str(listing), part_size=1000)[0]
    assert (listed.paths, listed.classes) == (folder.paths, folder.classes)
    relative = tmp_path / "relative.txt"
    shutil.copy(scenes / "sea" / sorted(p.name for p in (scenes / "sea").iterdir())[0],
                tmp_path / "one.jpg")  # fmt: skip
    relative.write_text("one.jpg\n")
    assert plan(str(relative))[0].paths == [str(tmp_path / "one.jpg")]
    globbed = plan(str(scenes / "*" / "*.jpg"), part_size=1000)[0]
    assert globbed.paths == sorted(p for p in folder.paths if p.endswith(".jpg"))
    assert set(globbed.classes) == {None}
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no image column"):
        plan(str(tmp_path / "bad.parquet"), columns=ParquetColumns())


def test_a_missing_or_oversized_file_is_its_own_row(scenes, tmp_path):
    """The actor's work without Ray: a vanished file and a too-large image fail alone."""
    good = sorted((scenes / "sea").glob("*.jpg"))[:2]
    part = Part(index=0, images=3, paths=[str(good[0]), str(tmp_path / "gone.jpg"), str(good[1])],
                classes=["sea", None, "sea"])  # fmt: skip
    runner = PartRunner(str(MODEL / "1"), "encode", str(tmp_path), None, 2, 1, None, 10_000, {})
    assert runner.run(part) == {"name": part.name, "images": 3, "failed": 3}  # 150x150 > 10,000
    errors = pq.read_table(tmp_path / part.name)["error"].to_pylist()
    assert errors[1].startswith("unreadable: ") and "gone.jpg" in errors[1]
    assert errors[0].startswith("image_too_large: ") and errors[2].startswith("image_too_large: ")
    runner.max_pixels = 150 * 150
    assert runner.run(part)["failed"] == 1


def test_cli_on_a_flat_folder(local_ray, scenes, tmp_path):
    summary_file = tmp_path / "summary.json"
    argv = ["reconstruct-error", str(scenes / "sea"), "-o", str(tmp_path / "out"),
            "--model", str(MODEL / "1"), "--part-size", "4", "--no-progress",
            "--summary-json", str(summary_file)]  # fmt: skip
    assert main(argv) == 0
    table = table_of(tmp_path / "out")
    summary = json.loads(summary_file.read_text())
    assert table.num_rows == summary["images"] == len(list((scenes / "sea").iterdir()))
    assert table["class"].null_count == table.num_rows  # a flat folder has no classes
    assert summary["failures"] == {"invalid_image": 1}  # sea/empty.png
    assert table["score"].null_count == table.num_rows and table["mse"].null_count == 1
    assert main(["encode", str(tmp_path / "missing"), "-o", str(tmp_path / "o2")]) == 2
    assert main(["encode", str(scenes), "-o", str(tmp_path / "o3"), "--part-size", "0"]) == 2


def test_rayjob_manifest_runs_the_batch_job_with_telemetry_off():
    documents = list(yaml.safe_load_all((REPO / "deploy" / "ray" / "rayjob.yaml").read_text()))
    job = next(d for d in documents if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("python -m batch ")
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_USAGE_STATS_ENABLED") == "0"
            assert env.get("RAY_USAGE_STATS_REPORT_URL", "").startswith("http://127.0.0.1:")


def test_the_ray_image_lints_and_its_context_has_what_it_copies():
    dockerfile = REPO / "deploy" / "ray" / "Dockerfile"
    hadolint = Path(sys.executable).with_name("hadolint")
    lint = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    allowed = {
        line[1:].rstrip("/")
        for line in dockerfile.with_name("Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = [
        source.rstrip("/")
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
        if not source.startswith("--")
    ]
    assert {"pyproject.toml", "batch", "aecore", "service", "models"} <= set(copied)
    for source in copied:
        assert source in allowed and (REPO / source).exists(), source


# Run inside `unshare --net --mount`: the batch job on its own local Ray, then a control lookup.
NAMESPACED_JOB = """
import json, subprocess, sys
from pathlib import Path
from tests.test_telemetry import CONTROL_NAME, QueryLog, loopback_up, resolve_through_loopback, serve_dns
work = Path(sys.argv[1])
loopback_up()
resolve_through_loopback(work)
log = QueryLog()
serve_dns(log)
job = subprocess.run([sys.executable, "-m", "batch", "score", sys.argv[2], "-o", str(work / "out"),
                      "--num-cpus", "1", "--no-progress"], capture_output=True, text=True)
assert job.returncode == 0, job.stderr[-3000:]
project = log.snapshot()
subprocess.run([sys.executable, "-c", f"import socket; socket.getaddrinfo({CONTROL_NAME!r}, 80)"],
               capture_output=True, timeout=30)
(work / "lookups.json").write_text(json.dumps({"project": project, "control": log.snapshot()}))
"""


def test_the_batch_job_looks_up_no_name_but_rays_metadata_probe(scenes, tmp_path):
    """Only Ray's own cloud-metadata probe (docs/batch.md, "Network"); never usage-stats."""
    from tests.test_telemetry import CONTROL_NAME, namespace_unavailable

    reason = namespace_unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"CI runs as root, so this test must run, but: {reason}")
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        ["unshare", "--net", "--mount", "--", sys.executable, "-c", NAMESPACED_JOB,
         str(tmp_path), str(scenes / "sea")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads((tmp_path / "lookups.json").read_text())
    assert CONTROL_NAME in seen["control"], seen  # the listener does see lookups
    assert set(seen["project"]) <= {"metadata.google.internal"}, seen["project"]
