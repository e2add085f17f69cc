"""Model control (AE_MODEL_CONTROL) and a lifecycle no request can break: the repository API
is read-only unless explicit control is configured with a key, the default model is never
unloaded, a load repairs whatever state the server is in, health says what an orchestrator
must do, and every model the repository lists is served under that name."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from aecore.preprocessing import ImageSpec, load_image
from service.engine.threads import thread_budget
from tests.live import REPO, live_server, service_env, settles
from tests.service_client import b64, multipart, running, settings
from tests.test_repository import CONTROL, KEY, KEYED, publish

DENOISER = "intel-scenes-denoise"


@pytest.fixture
def repo(tmp_path) -> Path:
    """intel-scenes v1, `other` v1 and the bundled denoiser."""
    publish(tmp_path, "intel-scenes", 1)
    publish(tmp_path, "other", 1)
    shutil.copytree(REPO / "models" / DENOISER, tmp_path / DENOISER)
    return tmp_path


async def test_by_default_the_repository_api_reads_but_never_changes_what_serves(scene_bytes):
    async with running() as c:  # no key, no control mode: as `make serve` starts
        index = await c.post("/v2/repository/index")
        unload = await c.post("/v2/repository/models/intel-scenes/unload")
        unload_other = await c.post(f"/v2/repository/models/{DENOISER}/unload")
        load = await c.post("/v2/repository/models/intel-scenes/load")
        encode = await c.post("/encode", files=multipart(scene_bytes[:1]))
        ready = await c.get("/readyz")
    assert index.status_code == 200
    for refused in (unload, unload_other, load):
        assert refused.status_code == 403
        assert "AE_MODEL_CONTROL" in refused.json()["error"]  # the V2 form: says how
    assert encode.status_code == 200 and ready.status_code == 200


def test_explicit_control_without_a_key_refuses_to_start():
    env = service_env({"AE_MODEL_CONTROL": "explicit"})
    done = subprocess.run([sys.executable, "-m", "service", "--port", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "AE_API_KEY" in done.stderr and "Traceback" not in done.stderr


async def test_explicit_control_needs_the_key_and_never_unloads_the_default(repo, scene_bytes):
    files = multipart(scene_bytes[:1])
    async with running(model_dir=repo, **CONTROL) as c:
        anonymous = await c.post("/v2/repository/models/other/unload")
        c.headers.update(KEYED)
        default = await c.post("/v2/repository/models/intel-scenes/unload")
        unloaded = await c.post("/v2/repository/models/other/unload")
        again = await c.post("/v2/repository/models/other/unload")
        encode = await c.post("/encode", files=files)
        gone = await c.post("/encode", files=files, params={"model": "other"})
        loaded = await c.post("/v2/repository/models/other/load")
        back = await c.post("/encode", files=files, params={"model": "other"})
    assert anonymous.status_code == 401
    assert default.status_code == 409 and "default model" in default.json()["error"]
    assert unloaded.status_code == 200 and again.status_code == 404
    assert encode.status_code == 200 and gone.status_code == 404
    assert loaded.status_code == 200 and back.json()["model"] == {"name": "other", "version": 1}


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a%2F..%2Fb", "-x"])
async def test_a_model_name_outside_the_repository_is_404(repo, name):
    async with running(model_dir=repo, **CONTROL) as c:
        c.headers.update(KEYED)
        reply = await c.post(f"/v2/repository/models/{name}/load")
    assert reply.status_code == 404, reply.text


async def test_the_load_api_keeps_to_the_allow_list(repo):
    async with running(model_dir=repo, models=["intel-scenes"], **CONTROL) as c:
        c.headers.update(KEYED)
        outside = await c.post("/v2/repository/models/other/load")
        listed = {row["name"] for row in (await c.post("/v2/repository/index")).json()}
    assert outside.status_code == 404
    assert "other" not in listed  # AE_MODELS names what this server may serve


def _break(batcher) -> None:
    """One death of the batcher's inference thread outside the engine call (as a bug in the
    batching loop would be): a queued request makes it take a batch, which raises."""

    def broken():
        raise RuntimeError("injected: the batching loop itself failed")

    batcher._take = broken
    batcher.put(np.zeros((1, 1024), np.float32), batcher.pending())


async def test_a_dead_inference_thread_fails_liveness_and_a_load_repairs_it(repo):
    async with running(model_dir=repo, **CONTROL) as c:
        c.headers.update(KEYED)
        plane = c.app.state.plane
        other = plane.repository.resolve("other", None)
        decoder = other.batchers["decoder"]
        while decoder.healthy:  # RESTARTS deaths: the thread is not restarted again
            _break(decoder)
            await asyncio.sleep(0.1)
        live = await c.get("/healthz")
        v2_live = await c.get("/v2/health/live")
        ready = await c.get("/readyz")  # a non-default model counts too
        v2_ready = await c.get("/v2/health/ready")
        load = await c.post("/v2/repository/models/other/load")  # in any state
        live_after = await c.get("/healthz")
        ready_after = await c.get("/readyz")
    assert live.status_code == v2_live.status_code == 503
    assert "other v1" in live.json()["error"]["message"]
    assert ready.status_code == v2_ready.status_code == 503
    assert load.status_code == 200
    assert live_after.status_code == 200 and ready_after.status_code == 200


async def test_every_model_the_index_lists_is_a_v2_model(repo):
    async with running(model_dir=repo) as c:
        names = {row["name"] for row in (await c.post("/v2/repository/index")).json()}
        metadata = {name: await c.get(f"/v2/models/{name}") for name in names}
        ready = {name: await c.get(f"/v2/models/{name}/ready") for name in names}
    assert names == {"intel-scenes", "other", DENOISER}
    assert {n: r.status_code for n, r in metadata.items()} == dict.fromkeys(names, 200)
    assert {n: r.status_code for n, r in ready.items()} == dict.fromkeys(names, 200)
    assert [o["name"] for o in metadata["intel-scenes"].json()["outputs"]] == [
        "latent", "reconstruction"]  # fmt: skip
    assert [o["name"] for o in metadata[DENOISER].json()["outputs"]] == ["cleaned"]


async def test_the_denoiser_is_a_repository_model_like_any_other(repo, scene_bytes):
    body = {"images": [b64(scene_bytes[0])]}
    async with running(model_dir=repo, **CONTROL) as c:
        c.headers.update(KEYED)
        listing = (await c.get("/models")).json()["models"]
        default = await c.post("/denoise", json=body)
        named = await c.post("/denoise", json=body, params={"model": DENOISER, "version": 1})
        not_a_denoiser = await c.post("/denoise", json=body, params={"model": "other"})
        not_an_encoder = await c.post("/encode", json=body, params={"model": DENOISER})
        card = (await c.get("/model", params={"model": DENOISER})).json()
        unloaded = await c.post(f"/v2/repository/models/{DENOISER}/unload")
        gone = await c.post("/denoise", json=body)
        encode = await c.post("/encode", json=body)  # the autoencoders do not care
        loaded = await c.post(f"/v2/repository/models/{DENOISER}/load")
        back = await c.post("/denoise", json=body)
        metrics = (await c.get("/metrics")).text
    assert {(m["name"], m["state"]) for m in listing} >= {(DENOISER, "READY")}
    assert default.status_code == named.status_code == 200
    assert default.json()["model"] == {"name": DENOISER, "version": 1}
    assert not_a_denoiser.status_code == not_an_encoder.status_code == 404
    assert card["tasks"] == ["denoise"] and card["providers"]
    assert unloaded.status_code == 200 and gone.status_code == 404
    assert encode.status_code == 200 and loaded.status_code == 200
    assert back.status_code == 200
    assert f'ae_batch_size_count{{model="{DENOISER}",part="denoiser",version="1"}}' in metrics


async def test_metadata_of_a_model_being_loaded_is_never_a_server_error(repo):
    async with running(model_dir=repo, **CONTROL) as c:
        c.headers.update(KEYED)
        await c.post("/v2/repository/models/other/unload")
        loading = asyncio.create_task(c.post("/v2/repository/models/other/load"))
        seen = set()
        infer = {"inputs": [{"name": "latent", "datatype": "FP32", "shape": [1, 1024],
                             "data": [0.0] * 1024}]}  # fmt: skip
        while not loading.done():
            for path in ("/v2/models/other", "/v2/models/other-encoder/config"):
                seen.add((await c.get(path)).status_code)
            seen.add((await c.post("/v2/models/other-decoder/infer", json=infer)).status_code)
            seen.add((await c.post("/v2/repository/index")).status_code)
            await asyncio.sleep(0)
        assert (await loading).status_code == 200
        final = await c.get("/v2/models/other")
    assert seen <= {200, 404, 503}, seen
    assert final.status_code == 200


async def test_a_v2_request_finishes_on_its_version_when_that_is_retired_mid_upload(
    repo, scene_bytes
):
    """The version is leased before the body is read: a new version published and the old one
    retired while the request uploads does not fail it."""
    image = load_image(scene_bytes[0], ImageSpec())[None]
    header = (b'{"inputs":[{"name":"image","datatype":"FP32","shape":[1,128,128,3],'
              b'"parameters":{"binary_data_size":%d}}]}') % image.nbytes  # fmt: skip
    uploading, finish = asyncio.Event(), asyncio.Event()

    async def body():
        yield header
        uploading.set()
        await finish.wait()
        yield image.astype("<f4").tobytes()

    async with running(model_dir=repo) as c:
        repository = c.app.state.plane.repository
        request = asyncio.create_task(c.post(
            "/v2/models/intel-scenes-encoder/infer", content=body(),
            headers={"Inference-Header-Content-Length": str(len(header))}))  # fmt: skip
        await uploading.wait()
        publish(repo, "intel-scenes", 2)
        await repository.sync()  # v2 takes traffic, v1 retires
        finish.set()
        reply = await request
        newer = (await c.post("/encode", files=multipart(scene_bytes[:1]))).json()["model"]
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == "1" and newer["version"] == 2
    assert np.asarray(reply.json()["outputs"][0]["data"]).size == 1024


def test_thread_budget_divides_the_cpus_among_the_workers(monkeypatch):
    monkeypatch.setattr("service.engine.threads.usable_cores", lambda: (8, "a test's 8"))
    assert thread_budget(settings(workers=1)) == (8, 8)
    assert thread_budget(settings(workers=4)) == (2, 2)
    assert thread_budget(settings(workers=16)) == (1, 1)
    assert thread_budget(settings(workers=4, intra_op_threads=3, decode_threads=5)) == (3, 5)


def _fresh_connection_answers(base: str, path: str, n: int, **kwargs) -> list[int]:
    """Status codes of `n` requests, each on a new connection (the kernel spreads new
    connections over the workers' sockets)."""
    codes = []
    for _ in range(n):
        with httpx.Client(timeout=60) as client:
            codes.append(client.post(f"{base}{path}", **kwargs).status_code)
    return codes


def test_a_load_or_unload_through_one_worker_reaches_every_worker(repo, scene_bytes):
    env = {"AE_MODEL_DIR": str(repo), "AE_WORKERS": "2", "AE_MODEL_CONTROL": "explicit",
           "AE_API_KEY": KEY}  # fmt: skip
    kwargs = {"content": scene_bytes[0], "headers": {"Content-Type": "image/jpeg", **KEYED},
              "params": {"model": "other"}}  # fmt: skip
    with live_server(env) as server:

        def answers() -> set[int]:
            return set(_fresh_connection_answers(server.base, "/encode", 16, **kwargs))

        before = answers()
        unload = httpx.post(f"{server.base}/v2/repository/models/other/unload", headers=KEYED)
        gone = settles(answers, {404})  # each worker follows the shared state within 1 s
        load = httpx.post(f"{server.base}/v2/repository/models/other/load", headers=KEYED,
                          timeout=120)  # fmt: skip
        back = settles(answers, {200})  # ... and loads and warms the model up again
    assert before == {200}
    assert unload.status_code == 200 and gone == {404}, gone
    assert load.status_code == 200 and back == {200}, back


def test_a_killed_worker_leaves_no_live_gauge_in_the_sums(tmp_path):
    metrics_dir = tmp_path / "metrics"
    env = {"AE_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with live_server(env) as server:
        victim = server.workers()[0]
        assert list(metrics_dir.glob(f"gauge_live*_{victim}.db"))  # it has reported a depth
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in server.workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Any worker's /metrics cleans up (a connection queued on the killed worker's socket
        # is reset by the kernel: ask again).
        reply = None
        while reply is None and time.monotonic() < deadline:
            try:
                reply = httpx.get(f"{server.base}/metrics", timeout=10)
            except httpx.TransportError:
                time.sleep(0.5)
        left = list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
    assert reply is not None and reply.status_code == 200 and not left


async def test_both_readiness_probes_wait_for_every_worker(tmp_path, monkeypatch):
    """/v2/health/ready, like /readyz, is 503 until every worker process has been ready."""
    monkeypatch.setenv("CONVAE_READY_MARKS", str(tmp_path))
    (tmp_path / f"ready-{os.getpid()}").touch()  # one of two workers ready (a live pid)
    async with running(workers=2) as c:
        one = [(await c.get(p)).status_code for p in ("/readyz", "/v2/health/ready")]
        (tmp_path / f"ready-{os.getppid()}").touch()  # the second (another live pid)
        both = [(await c.get(p)).status_code for p in ("/readyz", "/v2/health/ready")]
    assert one == [503, 503] and both == [200, 200]


async def test_a_fresh_process_serves_the_newest_version_that_loads(tmp_path, scene_bytes):
    """A corrupt newest version must not stop a process that starts after it was published (a
    worker's replacement, a restarted pod): it serves what the others still serve."""
    publish(tmp_path, "intel-scenes", 1)
    publish(tmp_path, "intel-scenes", 2, corrupt=True)
    async with running(model_dir=tmp_path) as c:
        served = (await c.post("/encode", files=multipart(scene_bytes[:1]))).json()["model"]
        rows = {r["version"]: r for r in (await c.post("/v2/repository/index")).json()}
        ready = await c.get("/readyz")
    assert served == {"name": "intel-scenes", "version": 1} and ready.status_code == 200
    assert rows["2"]["state"] == "UNAVAILABLE" and "sha256" in rows["2"]["reason"]
    assert rows["1"]["state"] == "READY"


async def test_digits_that_are_not_ascii_are_not_versions(repo):
    """`"³".isdigit()` is true but `int("³")` fails: a version in a path, a folder name or a
    header length must be ASCII digits (a 500 and a broken repository scan before)."""
    (repo / "other" / "³").mkdir()
    async with running(model_dir=repo) as c:
        config = await c.get("/v2/models/intel-scenes-decoder/versions/%C2%B3/config")
        infer = await c.post("/v2/models/intel-scenes-decoder/infer", content=b"{}",
                             headers={"Inference-Header-Content-Length": "²".encode("latin-1")})  # fmt: skip
        listed = {(r["name"], r["version"]) for r in (await c.get("/models")).json()["models"]}
    assert config.status_code == 404 and infer.status_code == 400
    assert ("other", "1") in listed and not any(v == "³" for _, v in listed)


@pytest.mark.parametrize(
    "value", ["1.5", True, None, [0.5]], ids=["string", "bool", "null", "list"]
)
async def test_v2_json_data_must_be_json_numbers(value):
    latent = [0.0] * 1024
    latent[7] = value
    body = {"inputs": [{"name": "latent", "datatype": "FP32", "shape": [1, 1024], "data": latent}]}
    async with running() as c:
        bad = await c.post("/v2/models/intel-scenes-decoder/infer", json=body)
        latent[7] = 0.5
        good = await c.post("/v2/models/intel-scenes-decoder/infer", json=body)
    assert bad.status_code == 400 and "numbers" in bad.json()["error"], bad.text
    assert good.status_code == 200


async def test_denoise_leases_the_denoiser_not_the_default_autoencoder(scene_bytes):
    """/denoise runs on the denoising model's own version (its lease, its batcher): the
    default autoencoder is not involved, whatever state it is in."""
    async with running() as c:
        repository = c.app.state.plane.repository
        denoiser = repository.resolve(None, None, "denoise")
        autoencoder = repository.resolve(None, None)
        batcher, gate = denoiser.batchers["denoiser"], asyncio.Event()
        run = batcher.run
        batcher.run = lambda rows: (asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(),
                                    run(rows))[1]  # fmt: skip
        loop = asyncio.get_running_loop()
        request = asyncio.create_task(c.post("/denoise", json={"images": [b64(scene_bytes[0])]}))
        deadline = time.monotonic() + 60
        while denoiser.leases == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        leases = (denoiser.leases, autoencoder.leases)
        gate.set()
        reply = await request
    assert leases == (1, 0)
    assert reply.status_code == 200 and reply.json()["model"]["name"] == DENOISER


@pytest.mark.parametrize("where", ["request", "input", "output"])
@pytest.mark.parametrize("value", [[1], "x", 3])
async def test_v2_parameters_that_are_not_an_object_are_a_400(where, value):
    body = {"inputs": [{"name": "latent", "datatype": "FP32", "shape": [1, 1024],
                        "data": [0.0] * 1024}], "outputs": [{"name": "image"}]}  # fmt: skip
    target = {"request": body, "input": body["inputs"][0], "output": body["outputs"][0]}[where]
    target["parameters"] = value
    async with running() as c:
        reply = await c.post("/v2/models/intel-scenes-decoder/infer", json=body)
    assert reply.status_code == 400 and "parameters" in reply.json()["error"], reply.text


async def test_a_dead_version_whose_reload_fails_keeps_liveness_failing(repo, monkeypatch):
    """The dead version stays listed until a new one loads: a poll that cannot load it again
    must not turn liveness back to 200 with nothing serving."""
    async with running(model_dir=repo) as c:
        repository = c.app.state.plane.repository
        decoder = repository.resolve("other", None).batchers["decoder"]
        while decoder.healthy:
            _break(decoder)
            await asyncio.sleep(0.1)

        async def cannot_load(*args, **kwargs):
            raise RuntimeError("injected: the version cannot load now")

        monkeypatch.setattr("service.repository.repository.open_version", cannot_load)
        await repository.sync()
        live = await c.get("/healthz")
        listed = {(r["name"], r["state"]) for r in (await c.get("/models")).json()["models"]}
    assert live.status_code == 503 and ("other", "UNAVAILABLE") in listed


async def test_latest_two_keeps_both_old_versions_when_the_newest_is_corrupt(tmp_path):
    publish(tmp_path, "intel-scenes", 1)
    publish(tmp_path, "intel-scenes", 2)
    async with running(model_dir=tmp_path, version_policy="latest:2") as c:
        repository = c.app.state.plane.repository
        publish(tmp_path, "intel-scenes", 3, corrupt=True)
        await repository.sync()
        served = sorted(repository.served["intel-scenes"])
        pinned = await c.get("/model", params={"version": 1})
    assert served == [1, 2] and pinned.status_code == 200


def test_a_damaged_control_state_file_is_ignored(tmp_path):
    from service.repository.control import ControlState, SharedState

    path = tmp_path / "model-control.json"
    for garbage in ("{not json", "[1, 2]", '{"unloaded": 3}'):
        path.write_text(garbage)
        assert SharedState(path).read() == ControlState()
    state = SharedState(path).update(lambda s: s.unload("other"))
    assert SharedState(path).read() == state and state.unloaded == {"other"}
