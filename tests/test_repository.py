"""The model repository: several models and versions at once, version policies, reload by
polling and by Triton's repository API without a failed request, failed versions reported."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from aecore import manifest
from tests.conftest import DEFAULT_MODEL_DIR
from tests.live import live_server
from tests.service_client import multipart, running

SOURCE = manifest.resolve(DEFAULT_MODEL_DIR, "intel-scenes", 1)
# Loading and unloading through the API: explicit model control, which needs the key.
KEY = "control-key"
CONTROL = {"model_control": "explicit", "api_key": KEY}
KEYED = {"X-API-Key": KEY}


def publish(root: Path, name: str, version: int, corrupt: bool = False) -> Path:
    """A copy of the bundled version as `name`/`version`, staged and published by rename."""
    staging = root / name / f".{version}.partial"
    shutil.copytree(SOURCE, staging)
    body = manifest.read(staging)
    manifest.write(staging, {**body, "name": name, "version": version})
    if corrupt:
        with open(staging / "encoder.onnx", "ab") as fh:
            fh.write(b"\0")
    return staging.rename(root / name / str(version))


@pytest.fixture
def repo(tmp_path) -> Path:
    publish(tmp_path, "intel-scenes", 1)
    publish(tmp_path, "intel-scenes", 2)
    publish(tmp_path, "other", 1)
    return tmp_path


async def test_two_models_and_two_versions_served_by_name_and_version(repo, scene_bytes):
    files = multipart(scene_bytes[:1])
    async with running(model_dir=repo, version_policy="all") as c:
        default = (await c.post("/encode", files=files)).json()["model"]
        v1 = (await c.post("/encode", files=files, params={"version": 1})).json()["model"]
        other = (await c.post("/encode", files=files, params={"model": "other"})).json()["model"]
        missing = await c.post("/encode", files=files, params={"model": "nope"})
        no_version = await c.post("/encode", files=files, params={"version": 7})
        listing = (await c.get("/models")).json()
        card = (await c.get("/model", params={"model": "other"})).json()
        v2_names = (await c.get("/v2/models/other-encoder")).json()
        text = (await c.get("/metrics")).text
    assert default == {"name": "intel-scenes", "version": 2}  # the default: highest version
    assert v1 == {"name": "intel-scenes", "version": 1}
    assert other == {"name": "other", "version": 1}
    assert missing.status_code == no_version.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert listing["default"] == {"name": "intel-scenes", "version": 2}
    states = {(m["name"], m["version"]): m["state"] for m in listing["models"]}
    assert states == {("intel-scenes", "1"): "READY", ("intel-scenes", "2"): "READY",
                      ("other", "1"): "READY"}  # fmt: skip
    assert card["name"] == "other" and v2_names["versions"] == ["1"]
    # Each loaded version has its own batchers, and its metrics say which.
    assert 'ae_batch_size_count{model="other",part="encoder",version="1"}' in text


async def test_a_version_that_fails_to_load_is_reported_and_the_old_one_keeps_serving(
    repo, scene_bytes
):
    shutil.rmtree(repo / "intel-scenes" / "2")
    async with running(model_dir=repo, models=["intel-scenes"], **CONTROL) as c:
        c.headers.update(KEYED)
        publish(repo, "intel-scenes", 3, corrupt=True)
        (repo / "intel-scenes" / ".4.partial").mkdir()  # half-copied: never a version
        load = await c.post("/v2/repository/models/intel-scenes/load")
        index = (await c.post("/v2/repository/index")).json()
        served = (await c.post("/encode", files=multipart(scene_bytes[:1]))).json()["model"]
    rows = {row["version"]: row for row in index}
    assert set(rows) == {"1", "3"}
    assert rows["3"]["state"] == "UNAVAILABLE" and "sha256" in rows["3"]["reason"]
    assert rows["1"]["state"] == "READY" and served["version"] == 1
    assert load.status_code == 200  # the model still serves, on the version it had


async def test_the_repository_api_unloads_and_loads_a_model(repo, scene_bytes):
    files = multipart(scene_bytes[:1])
    async with running(model_dir=repo, **CONTROL) as c:
        c.headers.update(KEYED)
        unloaded = await c.post("/v2/repository/models/other/unload")
        gone = await c.post("/encode", files=files, params={"model": "other"})
        v2_gone = await c.get("/v2/models/other-encoder")
        loaded = await c.post("/v2/repository/models/other/load")
        back = await c.post("/encode", files=files, params={"model": "other"})
        unknown = await c.post("/v2/repository/models/nope/load")
    assert unloaded.status_code == 200 and gone.status_code == 404
    assert v2_gone.status_code == 404 and isinstance(v2_gone.json()["error"], str)
    assert loaded.status_code == 200 and back.json()["model"] == {"name": "other", "version": 1}
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)


def test_a_new_version_takes_traffic_under_load_without_a_failed_request(tmp_path, scene_bytes):
    publish(tmp_path, "intel-scenes", 1)
    env = {"AE_MODEL_DIR": str(tmp_path), "AE_MODEL_POLL_S": "0.5"}
    statuses: list[int] = []
    versions: list[tuple[float, int]] = []
    stop = threading.Event()

    with live_server(env) as server:

        def load() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    reply = client.post(f"{server.base}/encode", content=scene_bytes[0],
                                        headers={"Content-Type": "image/jpeg"})  # fmt: skip
                    statuses.append(reply.status_code)
                    if reply.status_code == 200:
                        versions.append((time.monotonic(), reply.json()["model"]["version"]))

        users = [threading.Thread(target=load) for _ in range(4)]
        for user in users:
            user.start()
        time.sleep(1.0)
        published = time.monotonic()
        publish(tmp_path, "intel-scenes", 2)
        while not any(v == 2 for _, v in versions) and time.monotonic() - published < 60:
            time.sleep(0.1)
        took_over = min((t for t, v in versions if v == 2), default=None)
        time.sleep(1.0)
        removed = time.monotonic()  # removing the new version brings the old one back
        (tmp_path / "intel-scenes" / "2").rename(tmp_path / "intel-scenes" / ".2.gone")
        while versions[-1][1] != 1 and time.monotonic() - removed < 60:
            time.sleep(0.1)
        time.sleep(1.0)
        stop.set()
        for user in users:
            user.join()
        log = server.output(100_000)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert took_over is not None, log[-2000:]
    # Within the poll interval plus loading and warming the version up (seconds on 2 cores).
    assert took_over - published < 30
    assert versions[-1][1] == 1 and "retired" in log
