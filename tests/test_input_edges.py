"""Every `.npy` body shape and dtype, over real HTTP against a live server, and large bodies
parsed off the event loop.

Image endpoints take `[N, H, W, 3]` uint8 or float32 in [0, 1]; latent endpoints take
`[N, latent_dim]` numbers. Anything else is a 422 naming what was wrong, never a 500, and never
a 429 or 413 for an array that was counted as images before its shape was known.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import threading
import types

import httpx
import numpy as np
import pytest
import pytest_asyncio

from service.dataplane import inputs
from tests.live import live_server
from tests.service_client import b64, running, wait_until

NPY = "application/x-npy"
IMAGE_ENDPOINTS = ["/encode", "/reconstruct", "/anomaly-score", "/denoise"]
LATENT_ENDPOINTS = ["/decode", "/interpolate"]
SIZE = (128, 128, 3)  # the bundled models' input
LATENT = 1024


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)  # object arrays too: the server must refuse them
    return buf.getvalue()


def images(n: int, dtype=np.uint8, fill=0) -> np.ndarray:
    return np.full((n, *SIZE), fill, dtype)


@pytest.fixture(scope="module")
def server():
    with live_server() as live, httpx.Client(base_url=live.base, timeout=60) as client:
        yield client


def post_npy(client: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": NPY})


def assert_error(reply: httpx.Response, code: str, *fragments: str) -> None:
    assert reply.status_code == 422, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


# ---------------------------------------------------------------- images

BAD_IMAGE_SHAPES = {  # name: array; each is refused by its shape, whatever its size
    "0d": np.array(0.5, np.float32),
    "0d_uint8": np.array(7, np.uint8),
    "1d_one_value": np.zeros(1, np.float32),
    "1d_1000": np.zeros(1000, np.float32),  # was counted as 1,000 images: 429 "retry later"
    "1d_flat_image": np.zeros(128 * 128 * 3, np.uint8),
    "2d_1000x3": np.zeros((1000, 3), np.uint8),
    "2d_latents": np.zeros((1, LATENT), np.float32),
    "3d_one_image_without_batch": np.zeros(SIZE, np.uint8),
    "3d_600": np.zeros((600, 4, 3), np.uint8),
    "4d_rgba": np.zeros((1, 128, 128, 4), np.uint8),
    "4d_nchw": np.zeros((1, 3, 128, 128), np.float32),
    "4d_gray": np.zeros((1, 128, 128, 1), np.uint8),
    "4d_small": np.zeros((2, 64, 64, 3), np.uint8),
    "4d_no_rows": np.zeros((0, *SIZE), np.uint8),
    "5d": np.zeros((1, 1, *SIZE), np.uint8),
    "5d_1000": np.zeros((1000, 1, 1, 1, 3), np.uint8),
}


@pytest.mark.parametrize("path", IMAGE_ENDPOINTS)
@pytest.mark.parametrize("array", BAD_IMAGE_SHAPES.values(), ids=BAD_IMAGE_SHAPES.keys())
def test_image_tensors_of_the_wrong_shape_are_422(server, path, array):
    reply = post_npy(server, path, npy(array))
    assert_error(reply, "invalid_tensor", "[N, ", f"got shape {list(array.shape)}")


def test_one_image_without_its_batch_dimension_is_told_so(server):
    reply = post_npy(server, "/encode", npy(np.zeros(SIZE, np.uint8)))
    assert_error(reply, "invalid_tensor", "[1, 128, 128, 3]")


BAD_IMAGE_DTYPES = {  # name: (array, what the message names)
    "float16": (images(1, np.float16), "float16"),
    "float64": (images(1, np.float64), "float64"),
    "int8": (images(1, np.int8), "int8"),
    "int16": (images(1, np.int16), "int16"),
    "int64": (images(1, np.int64), "int64"),
    "uint16": (images(1, np.uint16), "uint16"),
    "bool": (images(1, np.bool_), "bool"),
    "complex64": (images(1, np.complex64), "complex64"),
    "unicode": (np.full((1, *SIZE), "a"), "<U1"),
    "bytes": (np.full((1, *SIZE), b"a"), "|S1"),
    "object_pickled": (np.array([[object()]], dtype=object), "object"),
    "structured": (np.zeros((1, *SIZE), [("r", "u1"), ("g", "u1")]), "dtype"),
}


@pytest.mark.parametrize("path", IMAGE_ENDPOINTS)
@pytest.mark.parametrize(("array", "named"), BAD_IMAGE_DTYPES.values(), ids=BAD_IMAGE_DTYPES.keys())
def test_image_tensors_of_the_wrong_dtype_are_422(server, path, array, named):
    assert_error(post_npy(server, path, npy(array)), "invalid_tensor", named)


def test_the_wrong_dtype_is_refused_before_the_count(server):
    """100 float16 images: a wrong dtype (422), not too many images (413)."""
    reply = post_npy(server, "/encode", npy(images(100, np.float16)))
    assert_error(reply, "invalid_tensor", "float16")


BAD_IMAGE_VALUES = {
    "nan": images(1, np.float32, np.nan),
    "inf": images(1, np.float32, np.inf),
    "minus_inf": images(1, np.float32, -np.inf),
    "above_one": images(1, np.float32, 1.5),
    "below_zero": images(1, np.float32, -0.1),
}


@pytest.mark.parametrize("path", IMAGE_ENDPOINTS)
@pytest.mark.parametrize("array", BAD_IMAGE_VALUES.values(), ids=BAD_IMAGE_VALUES.keys())
def test_float_image_tensors_outside_0_1_are_422(server, path, array):
    assert_error(post_npy(server, path, npy(array)), "invalid_tensor", "[0, 1]")


NOT_NPY = {
    "empty": b"",
    "pickle": pickle.dumps(np.zeros((1, *SIZE), np.uint8)),
    "magic_only": b"\x93NUMPY",
    "truncated": npy(images(1))[:-100],
}


@pytest.mark.parametrize("path", IMAGE_ENDPOINTS)
@pytest.mark.parametrize("body", NOT_NPY.values(), ids=NOT_NPY.keys())
def test_bodies_that_are_not_npy_are_422(server, path, body):
    assert_error(post_npy(server, path, body), "invalid_tensor", "not a valid .npy")


ACCEPTED_IMAGES = {
    "uint8": images(2, np.uint8, 200),
    "float32": images(2, np.float32, 0.75),
    "float32_fortran_order": np.asfortranarray(images(2, np.float32, 0.25)),
    "float32_big_endian": images(2, np.dtype(">f4"), 0.5),
}


@pytest.mark.parametrize("path", IMAGE_ENDPOINTS)
@pytest.mark.parametrize("array", ACCEPTED_IMAGES.values(), ids=ACCEPTED_IMAGES.keys())
def test_uint8_and_float32_image_tensors_are_served(server, path, array):
    reply = post_npy(server, path, npy(array))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    rows = body.get("latents") or body.get("images") or body.get("results")
    assert len(rows) == 2


def test_float32_tensors_give_the_latents_of_their_uint8_source(server):
    pixels = np.random.default_rng(0).integers(0, 256, (3, *SIZE), dtype=np.uint8)
    scaled = np.divide(pixels, np.float32(255), dtype=np.float32)  # as the service scales
    as_uint8 = post_npy(server, "/encode", npy(pixels)).json()["latents"]
    for array in (scaled, scaled.astype(">f4")):
        assert post_npy(server, "/encode", npy(array)).json()["latents"] == as_uint8


def test_more_images_than_the_limit_is_still_413(server):
    reply = post_npy(server, "/encode", npy(images(65)))
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "too_many_images"


# ---------------------------------------------------------------- latents

BAD_LATENT_NPY = {  # refused while the body is read, whatever the endpoint
    "0d": np.array(0.5, np.float32),
    "1d_one_latent": np.zeros(LATENT, np.float32),
    "1d_100000": np.zeros(100_000, np.float32),
    "3d": np.zeros((1, 1, LATENT), np.float32),
    "5d": np.zeros((1, 1, 1, 1, LATENT), np.float32),
    "no_rows": np.zeros((0, LATENT), np.float32),
    "no_columns": np.zeros((2, 0), np.float32),
    "images": images(1, np.float32),
    "bool": np.zeros((2, LATENT), np.bool_),
    "complex": np.zeros((2, LATENT), np.complex128),
    "unicode": np.full((2, LATENT), "a"),
    "object_pickled": np.array([[object()] * LATENT] * 2, dtype=object),
    "nan": np.full((2, LATENT), np.nan, np.float32),
    "inf": np.full((2, LATENT), np.inf, np.float16),
    "beyond_float32": np.full((2, LATENT), 1e300, np.float64),
}


@pytest.mark.parametrize("path", LATENT_ENDPOINTS)
@pytest.mark.parametrize("array", BAD_LATENT_NPY.values(), ids=BAD_LATENT_NPY.keys())
def test_bad_npy_latents_are_422(server, path, array):
    assert_error(post_npy(server, path, npy(array)), "invalid_latents")


@pytest.mark.parametrize("path", LATENT_ENDPOINTS)
@pytest.mark.parametrize("body", NOT_NPY.values(), ids=NOT_NPY.keys())
def test_latent_bodies_that_are_not_npy_are_422(server, path, body):
    assert_error(post_npy(server, path, body), "invalid_latents", "not a valid .npy")


def test_latents_of_the_wrong_length_are_422(server):
    reply = post_npy(server, "/decode", npy(np.zeros((2, LATENT - 1), np.float32)))
    assert_error(reply, "invalid_latents", f"{LATENT} values, got {LATENT - 1}")


ACCEPTED_LATENTS = {  # every real number type is cast to float32, as today
    dtype: np.full((2, LATENT), 1, dtype)
    for dtype in ("float32", ">f4", "float16", "float64", "int8", "int64", "uint8", "uint64")
}


@pytest.mark.parametrize("array", ACCEPTED_LATENTS.values(), ids=ACCEPTED_LATENTS.keys())
def test_numeric_npy_latents_are_decoded(server, array):
    reply = post_npy(server, "/decode", npy(array))
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["images"]) == 2


def test_npy_latents_to_interpolate_still_need_steps_or_weights(server):
    """A .npy body carries no parameters: the latents pass, the request asks for `steps`."""
    reply = post_npy(server, "/interpolate", npy(ACCEPTED_LATENTS["float32"]))
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "invalid_parameter"


BAD_JSON_LATENTS = {
    "a_number": 5,
    "3d": [[[0.0] * LATENT] * 2],
    "bools": [[True] * LATENT] * 2,
    "empty_rows": [[], []],
    "ragged": [[0.0] * LATENT, [0.0] * (LATENT - 1)],
    "beyond_float32": [[1e39] * LATENT] * 2,
}


@pytest.mark.parametrize("latents", BAD_JSON_LATENTS.values(), ids=BAD_JSON_LATENTS.keys())
def test_bad_json_latents_to_interpolate_are_422(server, latents):
    reply = server.post("/interpolate", json={"latents": latents, "steps": 1})
    assert_error(reply, "invalid_latents")


# ---------------------------------------------------------------- large bodies off the loop

# The async tests share one event loop and one in-process app, so the model loads once.
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app_client():
    async with running() as client:
        yield client


def gate(loop_thread: threading.Thread, parse):
    """`parse`, recording the thread it runs in; off the loop it then waits until the test
    says the loop answered a request meanwhile (on the loop it cannot wait: nothing else would
    run)."""
    seen: list[threading.Thread] = []
    answered = threading.Event()

    def gated(*args, **kwargs):
        seen.append(threading.current_thread())
        if seen[-1] is not loop_thread and not answered.wait(60):
            raise AssertionError("the event loop answered nothing while the body was parsed")
        return parse(*args, **kwargs)

    return gated, seen, answered


def big_json_images(scene_bytes: list[bytes]) -> dict:
    return {"images": [b64(b) for b in scene_bytes]}


def big_json_latents() -> dict:
    return {"latents": np.random.default_rng(1).normal(size=(48, LATENT)).tolist()}


def big_npy_images() -> bytes:
    return npy(np.random.default_rng(2).random((8, *SIZE), dtype=np.float32))


def big_npy_latents() -> bytes:
    return npy(np.random.default_rng(3).normal(size=(64, LATENT)).astype(np.float32))


def _json_shim(gated):
    return types.SimpleNamespace(loads=gated, JSONDecodeError=inputs.orjson.JSONDecodeError)


def _npy_shim(gated):
    public = {k: getattr(inputs.npy_format, k) for k in dir(inputs.npy_format) if k[0] != "_"}
    return types.SimpleNamespace(**{**public, "read_magic": gated})


CASES = {  # name: (path, body maker, module attribute, its shim around the gated parse)
    "json_images": ("/encode", "json_images", "orjson", _json_shim),
    "json_latents": ("/decode", "json_latents", "orjson", _json_shim),
    "npy_images": ("/encode", "npy_images", "npy_format", _npy_shim),
    "npy_latents": ("/decode", "npy_latents", "npy_format", _npy_shim),
}


def _body(kind: str, scene_bytes: list[bytes]) -> dict:
    """httpx keyword arguments for a body of `kind`, larger than the off-loop threshold."""
    if kind == "json_images":
        return {"json": big_json_images(scene_bytes)}
    if kind == "json_latents":
        return {"json": big_json_latents()}
    content = big_npy_images() if kind == "npy_images" else big_npy_latents()
    return {"content": content, "headers": {"Content-Type": NPY}}


@pytest.mark.parametrize(("path", "kind", "attribute", "shim"), CASES.values(), ids=CASES.keys())
@module_loop
async def test_a_large_body_is_parsed_while_the_loop_answers(
    app_client, monkeypatch, scene_bytes, path, kind, attribute, shim
):
    body = _body(kind, scene_bytes)
    size = len(httpx.Request("POST", "http://x", **body).read())
    assert size > inputs.OFF_LOOP_BYTES, size
    original = getattr(inputs, attribute)
    parse = original.loads if attribute == "orjson" else original.read_magic
    gated, seen, answered = gate(threading.current_thread(), parse)
    monkeypatch.setattr(inputs, attribute, shim(gated))
    request = asyncio.create_task(app_client.post(path, **body))
    try:
        await wait_until(lambda: seen or request.done(), "the body being parsed")
        assert seen and seen[0] is not threading.current_thread(), "parsed on the event loop"
        assert (await app_client.get("/healthz")).status_code == 200  # while the parse waits
    finally:
        answered.set()
        reply = await request
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["latents" if path == "/encode" else "images"]) > 1


@module_loop
async def test_a_small_body_is_parsed_inline(app_client, monkeypatch, scene_bytes):
    """A thread hop costs more than parsing a small body: it stays on the loop."""
    gated, seen, _ = gate(threading.current_thread(), inputs.orjson.loads)
    monkeypatch.setattr(inputs, "orjson", _json_shim(gated))
    reply = await app_client.post("/encode", json={"images": [b64(scene_bytes[0])]})
    assert reply.status_code == 200, reply.text
    assert seen == [threading.current_thread()]
