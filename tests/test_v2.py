"""The Open Inference Protocol (KServe V2) driven by `tritonclient[http]`, a real client nobody
here wrote, against a live server; malformed requests get a 4xx in the protocol's form."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest

from aecore.preprocessing import ImageSpec, load_image
from tests.live import live_server

httpclient = pytest.importorskip("tritonclient.http")
ENCODER, DECODER = "intel-scenes-encoder", "intel-scenes-decoder"
NPY = "application/x-npy"


@pytest.fixture(scope="module")
def server():
    with live_server() as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    triton = httpclient.InferenceServerClient(server.base.removeprefix("http://"))
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def images(scene_bytes) -> np.ndarray:
    return np.stack([load_image(b, ImageSpec()) for b in scene_bytes[:3]])


def service_latents(server, images: np.ndarray) -> np.ndarray:
    reply = httpx.post(f"{server.base}/encode", content=_npy(images),
                       headers={"Content-Type": NPY, "Accept": NPY}, timeout=30)  # fmt: skip
    return np.load(io.BytesIO(reply.content))


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata(ENCODER)
    (version,) = meta["versions"]  # the repository serves the highest version by default
    assert client.is_model_ready(ENCODER) and client.is_model_ready(DECODER, version)
    assert not client.is_model_ready("nope") and not client.is_model_ready(ENCODER, "99")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 128, 128, 3]}]
    assert meta["outputs"] == [{"name": "latent", "datatype": "FP32", "shape": [-1, 1024]}]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    # Triton's model configuration, which its tools (perf_analyzer) read to size requests.
    config = client.get_model_config(ENCODER)
    assert config["max_batch_size"] > 0 and config["input"][0]["dims"] == [128, 128, 3]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoder_gives_the_latents_of_post_encode(client, server, images, binary):
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("latent", binary_data=binary)
    result = client.infer(ENCODER, [tensor], outputs=[wanted], request_id="r1")
    latents = result.as_numpy("latent")
    assert result.get_response()["id"] == "r1"
    assert latents.shape == (3, 1024) and latents.dtype == np.float32
    np.testing.assert_array_equal(latents, service_latents(server, images))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_decoder_round_trip_matches_reconstruct(client, server, images, binary):
    latents = service_latents(server, images)
    tensor = httpclient.InferInput("latent", list(latents.shape), "FP32")
    tensor.set_data_from_numpy(latents, binary_data=binary)
    version = client.get_model_metadata(DECODER)["versions"][-1]
    result = client.infer(DECODER, [tensor], model_version=version,
                          outputs=[httpclient.InferRequestedOutput("image", binary_data=binary)])  # fmt: skip
    decoded = result.as_numpy("image")
    buf = io.BytesIO()
    np.save(buf, latents)
    expected = np.load(io.BytesIO(httpx.post(
        f"{server.base}/decode", content=buf.getvalue(),
        headers={"Content-Type": NPY, "Accept": NPY}, timeout=30).content))  # fmt: skip
    np.testing.assert_array_equal(decoded, expected)


def test_encoded_image_files_as_a_bytes_tensor(client, server, scene_bytes, images):
    files = np.array(scene_bytes[:3], dtype=np.object_)
    tensor = httpclient.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(files, binary_data=True)
    result = client.infer(ENCODER, [tensor])
    np.testing.assert_array_equal(result.as_numpy("latent"), service_latents(server, images))


def _binary(header: dict, data: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    length = len(head) if declared is None else declared
    return head + data, {"Inference-Header-Content-Length": str(length),
                         "Content-Type": "application/octet-stream"}  # fmt: skip


def _image_input(**extra) -> dict:
    return {"name": "image", "datatype": "FP32", "shape": [1, 128, 128, 3], **extra}


ONE = np.zeros((1, 128, 128, 3), np.float32).tobytes()
MALFORMED = {
    "not json": (b"{nope", {}),
    "no inputs": (b'{"outputs": []}', {}),
    "wrong name": (json.dumps({"inputs": [_image_input(name="x", data=[0] * 49152)]}).encode(), {}),
    "wrong datatype": (json.dumps({"inputs": [_image_input(datatype="INT8", data=[0] * 49152)]}).encode(), {}),
    "wrong shape": (json.dumps({"inputs": [_image_input(shape=[1, 64, 64, 3], data=[0] * 12288)]}).encode(), {}),
    "data of the wrong length": (json.dumps({"inputs": [_image_input(data=[0] * 10)]}).encode(), {}),
    "out of range": (json.dumps({"inputs": [_image_input(data=[7.0] * 49152)]}).encode(), {}),
    "bytes in json": (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode(), {}),
    "truncated binary": _binary({"inputs": [_image_input(parameters={"binary_data_size": len(ONE)})]}, ONE[:-7]),
    "header length past the body": _binary({"inputs": [_image_input(parameters={"binary_data_size": len(ONE)})]}, ONE, declared=10**9),
    "header length not a number": _binary({"inputs": [_image_input()]}, b"", declared=-1),
    "wrong output": (json.dumps({"inputs": [_image_input(data=[0] * 49152)], "outputs": [{"name": "nope"}]}).encode(), {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_4xx_in_the_protocols_form(server, case):
    body, headers = MALFORMED[case]
    reply = httpx.post(f"{server.base}/v2/models/{ENCODER}/infer", content=body,
                       headers={"Content-Type": "application/json", **headers}, timeout=30)  # fmt: skip
    assert 400 <= reply.status_code < 500, (case, reply.status_code, reply.text[:200])
    error = reply.json()["error"]
    assert isinstance(error, str) and error, reply.text[:200]


def test_unknown_models_and_versions_are_404_in_the_protocols_form(server):
    for path in ("/v2/models/nope", "/v2/models/nope/infer", f"/v2/models/{ENCODER}/versions/999"):
        method = httpx.post if path.endswith("infer") else httpx.get
        reply = method(f"{server.base}{path}", timeout=10)
        assert reply.status_code == 404 and isinstance(reply.json()["error"], str), path


def test_the_repository_models_are_v2_models_too(client, server, images):
    """The names the repository index lists: an autoencoder gives its latents and its
    reconstruction in one request, the denoiser its cleaned images, as the REST API does."""
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    both = client.infer("intel-scenes", [tensor])
    only_latent = client.infer("intel-scenes", [tensor],
                               outputs=[httpclient.InferRequestedOutput("latent")])  # fmt: skip
    latents = service_latents(server, images)
    decoded = httpx.post(f"{server.base}/decode", content=_npy(latents),
                         headers={"Content-Type": NPY, "Accept": NPY}, timeout=30)  # fmt: skip
    cleaned = client.infer("intel-scenes-denoise", [tensor]).as_numpy("cleaned")
    denoised = httpx.post(f"{server.base}/denoise", content=_npy(images),
                          headers={"Content-Type": NPY, "Accept": NPY}, timeout=30)  # fmt: skip
    listed = {row["name"] for row in client.get_model_repository_index()}
    np.testing.assert_array_equal(both.as_numpy("latent"), latents)
    np.testing.assert_allclose(both.as_numpy("reconstruction"),
                               np.load(io.BytesIO(decoded.content)), atol=1e-6)  # fmt: skip
    assert only_latent.as_numpy("reconstruction") is None
    np.testing.assert_allclose(cleaned, np.load(io.BytesIO(denoised.content)), atol=1e-6)
    assert listed == {"intel-scenes", "intel-scenes-denoise"}
    assert all(client.is_model_ready(name) for name in listed)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
