"""Issue-by-issue regressions of the service's contract: no 500 for any client input, parameters
checked before any image is decoded, busy is 429 and unavailable 503, memory-bounded
admission, client disconnects, a supervised batching worker, OpenCV's own pixel guard."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys

import cv2
import httpx
import numpy as np
import pytest
import pytest_asyncio

from tests.conftest import REPO
from tests.service_client import b64, metric, multipart, running, stalled_inference, wait_until

module_loop = pytest.mark.asyncio(loop_scope="module")
NPY = "application/x-npy"
LATENT = [0.0] * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client():
    async with running() as c:
        yield c


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def garbage_npy() -> bytes:
    return b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f4', 'fortran_order': False, 'shape': (9999999999, 1024), }\n"


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# (endpoint, content-type, body): every one must get a 4xx with the contract's error body.
MALFORMED: list[tuple[str, str, bytes | str]] = []
for endpoint in ("/encode", "/reconstruct", "/anomaly-score", "/interpolate", "/decode"):
    MALFORMED += [
        (endpoint, "application/json", b""),
        (endpoint, "application/json", b"null"),
        (endpoint, "application/json", b"[]"),
        (endpoint, "application/json", b'"images"'),
        (endpoint, "application/json", b"{}"),
        (endpoint, "application/json", b'{"images": null, "latents": null}'),
        (endpoint, "application/json", b'{"images": []}'),
        (endpoint, "application/json", b'{"images": [null]}'),
        (endpoint, "application/json", b'{"images": [1, 2]}'),
        (endpoint, "application/json", b'{"images": "aGVsbG8="}'),
        (endpoint, "application/json", b'{"images": ["not base64!"]}'),
        (endpoint, "application/json", b'{"images": ["aGVsbG8="]}'),  # base64 of no image
        (endpoint, "application/json", b'{"images": {"a": 1}}'),
        (endpoint, "application/json", b'{"latents": []}'),
        (endpoint, "application/json", b'{"latents": [[]]}'),
        (endpoint, "application/json", b'{"latents": [[NaN]]}'),
        (endpoint, "application/json", b'{"latents": [[1e999]]}'),
        (endpoint, "application/json", b'{"latents": [[1e39]]}'),
        (endpoint, "application/json", b'{"latents": [[123456789012345678901234567890]]}'),
        (endpoint, "application/json", b'{"latents": [["a"]]}'),
        (endpoint, "application/json", b'{"latents": [[true]]}'),
        (endpoint, "application/json", b'{"latents": [[1, 2], [1]]}'),
        (endpoint, "application/json", b'{"latents": [[[1.0]]]}'),
        (endpoint, "application/json", ('{"latents": ' + deep(5000) + "}").encode()),
        (endpoint, "application/json", ('{"images": ' + deep(200) + "}").encode()),
        (endpoint, NPY, b""),
        (endpoint, NPY, b"garbage"),
        (endpoint, NPY, garbage_npy()),
        (endpoint, NPY, npy_bytes(np.zeros((2, 7), np.float32))),
        (endpoint, NPY, npy_bytes(np.zeros((0, 1024), np.float32))),
        (endpoint, NPY, npy_bytes(np.full((1, 1024), np.nan, np.float32))),
        (endpoint, NPY, npy_bytes(np.array([["a"] * 1024]))),
        (endpoint, "multipart/form-data; boundary=x", b"--x\r\nnonsense"),
        (endpoint, "multipart/form-data", b"no boundary"),
        (endpoint, "text/plain", b"hello"),
    ]
INTERPOLATE_BAD = [
    {"images": [], "steps": 1},
    {"images": [], "weights": [1.0]},
    {"latents": [LATENT], "steps": 1},  # one input where two are needed
    {"latents": [LATENT] * 3, "steps": 1},
    {"latents": [LATENT, LATENT], "steps": -1},
    {"latents": [LATENT, LATENT], "steps": 1.5},
    {"latents": [LATENT, LATENT], "steps": "2"},
    {"latents": [LATENT, LATENT], "steps": None, "weights": None},
    {"latents": [LATENT, LATENT], "steps": 10**30},
    {"latents": [LATENT, LATENT], "weights": []},
    {"latents": [LATENT, LATENT], "weights": [0.5]},
    {"latents": [LATENT, LATENT], "weights": [0.5, "0.5"]},
    {"latents": [LATENT, LATENT], "weights": [2.0, -1.0]},
    {"latents": [LATENT, LATENT], "weights": [0.5, 0.5], "steps": 1},
    {"latents": [LATENT, LATENT], "weights": {"a": 1}},
]


def assert_4xx(reply) -> None:
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    error = reply.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]


@module_loop
@pytest.mark.parametrize(("endpoint", "content_type", "body"), MALFORMED)
async def test_malformed_bodies_get_a_4xx_on_every_endpoint(client, endpoint, content_type, body):
    reply = await client.post(endpoint, content=body, headers={"Content-Type": content_type})
    assert_4xx(reply)


@module_loop
@pytest.mark.parametrize("payload", INTERPOLATE_BAD)
async def test_bad_interpolations_are_422_not_500(client, payload):
    reply = await client.post("/interpolate", json=payload)
    assert reply.status_code == 422, reply.text[:300]


@module_loop
async def test_bad_query_parameters_are_4xx(client, scene_bytes):
    for params in ({"scorer": ""}, {"scorer": "nope"}, {"heatmap": "maybe"}):
        reply = await client.post("/anomaly-score", files=multipart(scene_bytes[:1]), params=params)
        assert_4xx(reply)


@module_loop
async def test_the_server_answers_normally_after_the_sweep(client, scene_bytes):
    reply = await client.post("/encode", files=multipart(scene_bytes[:2]))
    assert reply.status_code == 200 and len(reply.json()["latents"]) == 2
    text = (await client.get("/metrics")).text
    assert 'status="500"' not in text  # not one 500 in this module's whole sweep


@module_loop
async def test_interpolate_checks_its_parameters_before_decoding_any_image(client, scene_bytes):
    plane = client.app.state.plane
    before = metric((await client.get("/metrics")).text, "ae_batch_size_count", part="encoder")
    # 3 images with `steps`: refused without one image decoded or encoded.
    reply = await client.post("/interpolate", files=multipart(scene_bytes[:3]), data={"steps": "2"})
    after = metric((await client.get("/metrics")).text, "ae_batch_size_count", part="encoder")
    assert reply.status_code == 422 and "exactly two" in reply.json()["error"]["message"]
    assert after == before and plane.images_in_flight == 0
    # A broken image with a bad parameter: the parameter is reported, the image never decoded.
    reply = await client.post(
        "/interpolate",
        json={"images": [b64(b"not an image"), b64(b"nor this")], "steps": -1},
    )
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "invalid_parameter"


@module_loop
async def test_too_many_multipart_files_is_413_counted_by_the_service(scene_bytes):
    async with running(max_images_per_request=2) as c:
        reply = await c.post("/encode", files=multipart(scene_bytes[:3]))
        ok = await c.post("/encode", files=multipart(scene_bytes[:2]))
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "too_many_images"
    assert ok.status_code == 200


# -- admission bounded in bytes and images --------------------------------------------------


@module_loop
async def test_admission_is_bounded_in_images_in_flight(scene_bytes):
    async with running(max_inflight_images=4, retry_after_s=2) as c:
        plane = c.app.state.plane
        with stalled_inference(plane):
            held = asyncio.create_task(c.post("/encode", files=multipart(scene_bytes[:3])))
            await wait_until(lambda: plane.images_in_flight == 3, "three images in flight")
            refused = await c.post("/encode", files=multipart(scene_bytes[3:5]))  # 3 + 2 > 4
            one_more = asyncio.create_task(c.post("/encode", files=multipart(scene_bytes[5:6])))
            await wait_until(lambda: plane.images_in_flight == 4, "four images in flight")
        replies = [await held, await one_more]
        after = await c.post("/encode", files=multipart(scene_bytes[3:5]))
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "overloaded"
    assert [r.status_code for r in replies] == [200, 200]
    assert after.status_code == 200 and plane.images_in_flight == 0


@module_loop
async def test_admission_counts_the_bytes_of_bodies_still_streaming(scene_bytes):
    body = b'{"images": ["%s"]}' % b64(scene_bytes[0]).encode()
    reading, go_on = asyncio.Event(), asyncio.Event()

    async def trickle():
        yield body[: len(body) - 10]
        reading.set()  # most of the body is in, the rest waits
        await go_on.wait()
        yield body[len(body) - 10 :]

    # Room for one such body in flight, not two.
    async with running(max_inflight_bytes=len(body) + len(body) // 2) as c:
        slow = asyncio.create_task(
            c.post("/encode", content=trickle(), headers={"Content-Type": "application/json"})
        )
        await reading.wait()
        refused = await c.post(
            "/encode", content=body, headers={"Content-Type": "application/json"}
        )
        go_on.set()
        slow_reply = await slow
        after = await c.post("/encode", content=body, headers={"Content-Type": "application/json"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
    assert slow_reply.status_code == 200 and after.status_code == 200


# -- client disconnects ----------------------------------------------------------------------


@module_loop
async def test_a_client_gone_mid_body_is_499_and_no_server_error(client, caplog):
    app = client.app
    sent: list[dict] = []
    messages = [
        {"type": "http.request", "body": b'{"images": ["aGVs', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/encode", "raw_path": b"/encode", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", b"100000")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    with caplog.at_level(logging.INFO):
        await app(scope, receive, send)
    assert sent[0]["status"] == 499
    assert "unhandled error" not in caplog.text and "Traceback" not in caplog.text
    text = (await client.get("/metrics")).text
    assert metric(text, "ae_requests_total", endpoint="/encode", status="499") >= 1


# -- a supervised batching worker --------------------------------------------------------------


@module_loop
async def test_a_dead_batching_worker_fails_waiting_requests_at_once_and_restarts(
    scene_bytes, monkeypatch
):
    async with running(queue_timeout_s=60) as c:
        batcher = c.app.state.plane.repository.resolve(None, None).batchers["encoder"]
        take = batcher._take
        deaths = []

        def dying_take():
            deaths.append(1)
            raise RuntimeError("a bug outside the engine call")

        monkeypatch.setattr(batcher, "_take", dying_take)
        reply = await asyncio.wait_for(c.post("/encode", files=multipart(scene_bytes[:1])), 10)
        monkeypatch.setattr(batcher, "_take", take)
        ready = await c.get("/readyz")
        after = await c.post("/encode", files=multipart(scene_bytes[:1]))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "worker_failed"
    assert deaths == [1] and ready.status_code == 200 and after.status_code == 200


@module_loop
async def test_a_worker_that_keeps_dying_turns_readiness_off(scene_bytes, monkeypatch):
    async with running(queue_timeout_s=60) as c:
        batcher = c.app.state.plane.repository.resolve(None, None).batchers["encoder"]

        def dying_take():
            raise RuntimeError("always")

        monkeypatch.setattr(batcher, "_take", dying_take)
        replies = [await c.post("/encode", files=multipart(scene_bytes[:1])) for _ in range(4)]
        ready = await c.get("/readyz")
    assert [r.status_code for r in replies] == [503] * 4
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"


@module_loop
async def test_an_engine_returning_the_wrong_number_of_rows_fails_that_batch(scene_bytes):
    async with running() as c:
        batcher = c.app.state.plane.repository.resolve(None, None).batchers["encoder"]
        run = batcher.run
        batcher.run = lambda rows: run(rows)[:-1]
        # As uvicorn does: the app answers 500 and re-raises for the server to log.
        transport = httpx.ASGITransport(app=c.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as raw:
            broken = await raw.post("/encode", files=multipart(scene_bytes[:2]))
        batcher.run = run
        after = await c.post("/encode", files=multipart(scene_bytes[:2]))
    assert broken.status_code == 500 and broken.json()["error"]["code"] == "internal_error"
    assert after.status_code == 200 and len(after.json()["latents"]) == 2


# -- OpenCV's own pixel guard, on every import order -----------------------------------------


@pytest.mark.parametrize(
    "imports", ["import service.app", "import aecore.anomaly", "import aecore.preprocessing"]
)
def test_opencv_pixel_guard_is_on_whatever_imports_cv2_first(tmp_path, imports):
    big = tmp_path / "big.png"  # 72 M pixels, over the 64 M guard, 80 KB of PNG
    _, buf = cv2.imencode(".png", np.zeros((9000, 8000), np.uint8))
    big.write_bytes(buf.tobytes())
    probe = (
        f"{imports}\nimport cv2, numpy as np\n"
        f"data = np.fromfile({str(big)!r}, np.uint8)\n"
        "try:\n    out = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)\nexcept cv2.error:\n    out = None\n"
        "print('refused' if out is None else 'decoded')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    fresh = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert fresh.stdout.strip() == "refused", fresh.stderr[-2000:]
    wider = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
        env={**env, "OPENCV_IO_MAX_IMAGE_PIXELS": str(10**8)},
    )  # fmt: skip
    assert wider.stdout.strip() == "decoded", wider.stderr[-2000:]  # an operator's value wins


@module_loop
async def test_an_empty_form_field_is_absent_as_browsers_send_it(client, scene_bytes):
    reply = await client.post(
        "/interpolate", files=multipart(scene_bytes[:2]), data={"steps": "1", "weights": ""}
    )
    assert reply.status_code == 200, reply.text[:300]
    assert len(reply.json()["images"]) == 3
