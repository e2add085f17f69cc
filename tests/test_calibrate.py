"""The 0-1 map, `python -m training calibrate` publishing a new version, and the served scores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from aecore import anomaly, manifest
from tests.conftest import DEFAULT_MODEL_DIR, REPO, SCENES
from tests.service_client import multipart, running
from training.anomaly import expected_fpr


def test_the_threshold_maps_to_exactly_one_half_and_the_normal_median_to_a_tenth():
    rng = np.random.default_rng(0)
    for normal in (rng.gamma(2.0, 3.0, 500), rng.normal(1e-3, 1e-4, 500), np.arange(1000.0)):
        threshold = anomaly.calibrate(normal, 0.01)
        scale = anomaly.logistic_scale(normal, threshold)
        assert anomaly.unit_score([threshold], threshold, scale)[0] == 0.5
        assert anomaly.unit_score([np.median(normal)], threshold, scale)[0] == pytest.approx(0.1)
        mapped = anomaly.unit_score(np.sort(normal), threshold, scale)
        assert np.all(np.diff(mapped) >= 0) and np.all((mapped >= 0) & (mapped <= 1))
        # Flags exactly the same images as the raw threshold.
        assert np.array_equal(mapped > 0.5, np.sort(normal) > threshold)
    assert anomaly.unit_score([1e300, -1e300], 0.0, 1.0).tolist() == [1.0, 0.0]


def test_expected_fpr_interval_covers_what_simulation_shows():
    n, target = 200, 0.02
    e = expected_fpr(n, target)
    rng = np.random.default_rng(1)
    # The true FPR of the calibrated threshold, over many calibration sets of n uniform scores.
    true_fpr = [1 - anomaly.calibrate(rng.uniform(size=n), target) for _ in range(2000)]
    assert e["expected"] == pytest.approx(np.mean(true_fpr), abs=0.002)
    inside = np.mean([(e["low"] <= f <= e["high"]) for f in true_fpr])
    assert 0.93 <= inside <= 0.97
    assert e["low"] < target < e["high"]


def _calibrate(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training", "calibrate", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO)


def _hashes(folder):
    return {
        p.relative_to(folder).as_posix(): manifest.sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def served_folder():
    return manifest.resolve(DEFAULT_MODEL_DIR, "intel-scenes")


def test_calibrate_publishes_a_new_version_and_never_touches_the_old_one(served_folder, tmp_path):
    root = tmp_path / "models" / "intel-scenes"
    source = root / served_folder.name
    shutil.copytree(served_folder, source)
    before = _hashes(source)
    result = _calibrate("--model", str(source), "--normal", str(SCENES), "--target-fpr", "0.05")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    new = root / str(int(source.name) + 1)
    assert reply["model"] == str(new) and reply["images"] == len(list(SCENES.glob("*/*.jpg")))
    assert reply["expected_fpr_ci95"][0] < reply["expected_fpr"] < reply["expected_fpr_ci95"][1]
    assert _hashes(source) == before  # byte-identical, every file
    assert not list(root.glob(".*.partial"))

    body = manifest.read(new)  # verifies every listed file, the scorers' ones included
    old = manifest.read(source)
    assert body["version"] == old["version"] + 1
    assert body["derived_from"]["version"] == old["version"]
    assert "calibrate" in body["derived_from"]["changes"]
    assert {"gaussians", "features"} <= set(manifest.graph_files(body))
    block = body["anomaly"]
    assert block["target_fpr"] == 0.05 and block["calibration_images"] == reply["images"]
    assert block["threshold"] != old["anomaly"]["threshold"]
    scorers = anomaly.AnomalyScorers(block, new)
    assert all(scorers.normalised(name) for name in scorers.names)
    assert (new / "report" / "calibration.md").is_file()

    # Same command again: the next version, the previous two unchanged.
    again = _calibrate("--model", str(new), "--normal", str(SCENES / "forest"))
    assert again.returncode == 0, again.stderr
    assert (root / str(body["version"] + 1)).is_dir() and _hashes(source) == before


def test_calibrate_explains_a_model_without_the_new_scorers(tmp_path):
    source = tmp_path / "intel-scenes" / "1"
    shutil.copytree(DEFAULT_MODEL_DIR / "intel-scenes" / "1", source)
    result = _calibrate("--model", str(source), "--normal", str(SCENES))
    assert result.returncode == 2 and "evaluate-anomaly" in result.stderr
    assert sorted(p.name for p in source.parent.iterdir()) == ["1"]


async def test_served_scores_are_normalised_with_the_raw_ones_beside(scene_bytes, served_folder):
    block = manifest.read(served_folder)["anomaly"]
    blobs = scene_bytes[:6]
    async with running() as client:
        replies = {
            name: (
                await client.post("/anomaly-score", params={"scorer": name}, files=multipart(blobs))
            ).json()
            for name in block["scorers"]  # the scorers the served version lists
        }
    for name, reply in replies.items():
        spec = block["scorers"][name]
        assert reply["normalised"] is True and reply["threshold"] == 0.5
        assert reply["raw_threshold"] == pytest.approx(spec["threshold"])
        raw = np.array([r["raw_score"] for r in reply["results"]])
        unit = np.array([r["score"] for r in reply["results"]])
        np.testing.assert_allclose(
            unit, anomaly.unit_score(raw, spec["threshold"], spec["logistic_scale"]), rtol=1e-9
        )
        assert np.all((unit > 0) & (unit < 1)) and np.all(np.isfinite(raw))
        for r in reply["results"]:
            assert r["is_anomaly"] == (r["raw_score"] > reply["raw_threshold"])


async def test_a_model_without_normalisation_is_served_raw(scene_bytes, tmp_path):
    shutil.copytree(DEFAULT_MODEL_DIR / "intel-scenes" / "1", tmp_path / "intel-scenes" / "1")
    async with running(model_dir=tmp_path) as client:
        reply = (await client.post("/anomaly-score", files=multipart(scene_bytes[:2]))).json()
    assert reply["normalised"] is False
    assert reply["threshold"] == reply["raw_threshold"]
    assert [r["score"] for r in reply["results"]] == [r["raw_score"] for r in reply["results"]]


def test_evaluate_anomaly_reuse_carries_the_scorers_to_a_new_version(tmp_path):
    donor = DEFAULT_MODEL_DIR / "intel-scenes" / "4"  # version 1's graphs with issue 25's scorers
    root = tmp_path / "models" / "intel-scenes"
    shutil.copytree(DEFAULT_MODEL_DIR / "intel-scenes" / "1", root / "1")
    before = _hashes(root / "1")
    command = [sys.executable, "-m", "training", "evaluate-anomaly", "--model", str(root / "1")]
    result = subprocess.run(
        [*command, "--reuse", str(donor)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    body = manifest.read(root / "2")
    assert body["anomaly"] == manifest.read(donor)["anomaly"]
    assert body["derived_from"]["version"] == 1 and _hashes(root / "1") == before
    assert (root / "2" / "report" / "anomaly.md").read_bytes() == (
        donor / "report" / "anomaly.md"
    ).read_bytes()
    anomaly.AnomalyScorers(body["anomaly"], root / "2")  # loads, hashes checked
