"""The REST API through real HTTP on the ASGI app, the committed model and real images."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest

from aecore import manifest
from aecore.preprocessing import ImageSpec, load_image, to_uint8
from tests.conftest import DEFAULT_MODEL_DIR
from tests.service_client import (
    b64,
    batches_taken,
    metric,
    multipart,
    npy,
    png_pixels,
    running,
    stalled_inference,
    wait_until,
)

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def model_manifest() -> dict:
    return manifest.read(manifest.resolve(DEFAULT_MODEL_DIR, "intel-scenes"))


async def test_encode_multipart_and_json_agree_and_keep_order(scene_bytes, model_manifest):
    blobs = scene_bytes[:3]
    async with running() as client:
        form = await client.post("/encode", files=multipart(blobs))
        body = await client.post("/encode", json={"images": [b64(b) for b in blobs]})
        singles = [
            (await client.post("/encode", json={"images": [b64(b)]})).json()["latents"][0]
            for b in blobs
        ]
    assert form.status_code == body.status_code == 200
    latents = np.asarray(form.json()["latents"], np.float32)
    assert latents.shape == (3, model_manifest["latent_dim"])
    assert form.json()["model"] == {
        "name": model_manifest["name"],
        "version": model_manifest["version"],
    }
    np.testing.assert_array_equal(latents, np.asarray(body.json()["latents"], np.float32))
    np.testing.assert_allclose(latents, np.asarray(singles, np.float32), atol=1e-5)
    assert not np.allclose(latents[0], latents[1])


async def test_encode_npy_and_decode_npy_round_trip(scene_bytes):
    async with running() as client:
        encoded = await client.post(
            "/encode", files=multipart(scene_bytes[:2]), headers={"Accept": NPY}
        )
        assert encoded.headers["content-type"] == NPY
        latents = npy(encoded.content)
        assert latents.dtype == np.float32 and latents.shape == (2, 1024)
        buf = io.BytesIO()
        np.save(buf, latents)
        decoded = await client.post(
            "/decode", content=buf.getvalue(), headers={"Content-Type": NPY, "Accept": NPY}
        )
        as_json = await client.post("/decode", json={"latents": latents.tolist()})
    images = npy(decoded.content)
    assert images.shape == (2, 128, 128, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    pngs = [png_pixels(s) for s in as_json.json()["images"]]
    for png, image in zip(pngs, images, strict=True):
        np.testing.assert_array_equal(png, to_uint8(image))


async def test_encode_then_decode_equals_reconstruct_row_for_row(scene_bytes):
    blobs = scene_bytes[::6]  # one per class
    async with running() as client:
        latents = npy(
            (await client.post("/encode", files=multipart(blobs), headers={"Accept": NPY})).content
        )
        buf = io.BytesIO()
        np.save(buf, latents)
        decoded = npy(
            (await client.post("/decode", content=buf.getvalue(),
                               headers={"Content-Type": NPY, "Accept": NPY})).content
        )  # fmt: skip
        recon = (await client.post("/reconstruct", files=multipart(blobs))).json()
    assert len(recon["images"]) == len(recon["mse"]) == len(blobs)
    spec = ImageSpec()
    for i, blob in enumerate(blobs):
        pixels = png_pixels(recon["images"][i])
        assert np.abs(pixels.astype(int) - to_uint8(decoded[i]).astype(int)).max() <= 1
        expected_mse = float(np.mean((load_image(blob, spec) - decoded[i]) ** 2))
        assert recon["mse"][i] == pytest.approx(expected_mse, rel=1e-3)


async def test_anomaly_score_uses_the_manifest_scorer_and_threshold(scene_bytes, model_manifest):
    blobs = scene_bytes[:4]
    async with running() as client:
        default = (await client.post("/anomaly-score", files=multipart(blobs))).json()
        by_name = {
            name: (
                await client.post("/anomaly-score", params={"scorer": name}, files=multipart(blobs))
            ).json()
            for name in model_manifest["anomaly"]["scorers"]
        }
        maps = await client.post(
            "/anomaly-score", params={"heatmap": "true"}, files=multipart(blobs[:2])
        )
        unknown = await client.post(
            "/anomaly-score", params={"scorer": "magic"}, files=multipart(blobs)
        )
        recon = (await client.post("/reconstruct", files=multipart(blobs))).json()
    block = model_manifest["anomaly"]
    assert default["scorer"] == block["scorer"]
    assert default["raw_threshold"] == pytest.approx(block["threshold"])
    assert default["results"] == by_name[block["scorer"]]["results"]
    for name, reply in by_name.items():
        assert reply["scorer"] == name
        assert reply["raw_threshold"] == pytest.approx(block["scorers"][name]["threshold"])
        for result, mse in zip(reply["results"], recon["mse"], strict=True):
            assert result["mse"] == pytest.approx(mse, rel=1e-4)
            assert result["is_anomaly"] == (result["raw_score"] > reply["raw_threshold"])
            assert "heatmap" not in result
    mse_scores = [r["raw_score"] for r in by_name["mse"]["results"]]
    np.testing.assert_allclose(mse_scores, recon["mse"], rtol=1e-4)
    for result in maps.json()["results"]:
        assert png_pixels(result["heatmap"]).shape == (128, 128, 3)
    assert unknown.status_code == 422 and "combined" in unknown.json()["error"]["message"]


async def test_interpolation_path_ends_are_the_inputs(scene_bytes):
    a, b = scene_bytes[0], scene_bytes[20]
    async with running() as client:
        path = (
            await client.post("/interpolate", json={"images": [b64(a), b64(b)], "steps": 3})
        ).json()
        ends = (await client.post("/encode", files=multipart([a, b]))).json()["latents"]
        decoded = (await client.post("/decode", json={"latents": ends})).json()["images"]
        form = await client.post("/interpolate", files=multipart([a, b]), data={"steps": "0"})
    latents = np.asarray(path["latents"], np.float32)
    assert len(path["images"]) == len(latents) == 5
    np.testing.assert_allclose(latents[0], ends[0], atol=1e-6)
    np.testing.assert_allclose(latents[-1], ends[1], atol=1e-6)
    np.testing.assert_allclose(latents[2], (latents[0] + latents[-1]) / 2, atol=1e-5)
    assert path["images"][0] == decoded[0] and path["images"][-1] == decoded[1]
    assert form.status_code == 200 and len(form.json()["images"]) == 2


async def test_weights_half_half_is_the_latent_midpoint(scene_bytes):
    async with running() as client:
        ends = (await client.post("/encode", files=multipart(scene_bytes[:2]))).json()["latents"]
        avg = (
            await client.post("/interpolate", json={"latents": ends, "weights": [0.5, 0.5]})
        ).json()
        three = await client.post(
            "/interpolate", files=multipart(scene_bytes[:3]), data={"weights": "0.2,0.3,0.5"}
        )
    assert len(avg["images"]) == 1
    np.testing.assert_allclose(avg["latents"][0], (np.array(ends[0]) + ends[1]) / 2, atol=1e-5)
    assert three.status_code == 200 and len(three.json()["images"]) == 1


async def test_concurrent_single_requests_are_batched_and_keep_their_rows(scene_bytes):
    blobs = scene_bytes[:16]
    async with running(max_batch_size=16) as client:
        plane = client.app.state.plane
        expected = np.asarray(
            (await client.post("/encode", files=multipart(blobs))).json()["latents"], np.float32
        )
        taken = batches_taken(plane)
        # The engine is held on the first request while the other 15 queue up: released, they
        # must run as one batch, each request getting its own row back.
        with stalled_inference(plane):
            first = asyncio.create_task(client.post("/encode", files=multipart(blobs[:1])))
            await wait_until(lambda: batches_taken(plane) > taken, "the first request taken")
            rest = [
                asyncio.create_task(client.post("/encode", files=multipart([b]))) for b in blobs[1:]
            ]
            await wait_until(
                lambda: plane.repository.resolve(None, None).batchers["encoder"].depth == 15,
                "15 requests queued",
            )
        replies = [await first, *[await r for r in rest]]
        text = (await client.get("/metrics")).text
    got = np.asarray([r.json()["latents"][0] for r in replies], np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)  # request i got row i
    assert metric(text, "ae_batch_size_count", part="encoder") == 3  # 16 together, 1, then 15
    assert metric(text, "ae_batch_size_sum", part="encoder") == 32  # every image ran once
    assert metric(text, "ae_batch_size_bucket", le="1.0", part="encoder") == 1
    assert metric(text, "ae_images_total", endpoint="encode") == 32


async def test_a_request_larger_than_the_max_batch_is_split_in_order(scene_bytes):
    blobs = scene_bytes[:10]
    async with running(max_batch_size=4) as client:
        whole = (await client.post("/encode", files=multipart(blobs))).json()["latents"]
        singles = [
            (await client.post("/encode", files=multipart([b]))).json()["latents"][0] for b in blobs
        ]
        text = (await client.get("/metrics")).text
    np.testing.assert_allclose(np.asarray(whole), np.asarray(singles), atol=1e-5)
    assert metric(text, "ae_batch_size_bucket", le="4.0", part="encoder") == metric(
        text, "ae_batch_size_count", part="encoder"
    )


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        (
            {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ({"json": [1, 2]}, 422, "invalid_request"),
        ({"json": {"images": ["%%%not base64%%%"]}}, 400, "invalid_base64"),
        ({"json": {"images": [b64(b"this is text, not a jpeg")]}}, 400, "invalid_image"),
        ({"json": {"pictures": []}}, 422, "invalid_request"),
    ],
)
async def test_bad_image_requests_get_json_errors(request_kwargs, status, code):
    async with running() as client:
        reply = await client.post("/encode", **request_kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code
    assert reply.json()["error"]["message"]


async def test_one_bad_image_fails_the_request_naming_its_index(scene_bytes):
    async with running() as client:
        reply = await client.post(
            "/reconstruct", files=multipart([scene_bytes[0], b"garbage", scene_bytes[1]])
        )
    assert reply.status_code == 400
    assert "images[1]" in reply.json()["error"]["message"]


async def test_size_limits_are_413(scene_bytes):
    async with running(
        max_images_per_request=2, max_image_pixels=100 * 100, max_body_bytes=60_000
    ) as client:
        count = await client.post("/encode", files=multipart(scene_bytes[:3]))
        pixels = await client.post("/encode", files=multipart(scene_bytes[:1]))  # 150x150
        body = await client.post(
            "/encode", content=b"x" * 70_000, headers={"Content-Type": "application/json"}
        )

        async def chunks():
            for _ in range(10):
                yield b"y" * 10_000

        chunked = await client.post(
            "/encode", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert [r.status_code for r in (count, pixels, body, chunked)] == [413] * 4
    assert count.json()["error"]["code"] == "too_many_images"
    assert pixels.json()["error"]["code"] == "image_too_large"
    assert body.json()["error"]["code"] == chunked.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"latents": [[0.0] * 10]}, "invalid_latents"),
        ({"latents": [["0.1"] * 1024]}, "invalid_latents"),
        ({"latents": [[1e39] * 1024]}, "invalid_latents"),
        ({"latents": [[0.0] * 1024, [0.0] * 5]}, "invalid_latents"),
        ({"latents": [[True] * 1024]}, "invalid_latents"),
        ({}, "invalid_latents"),
    ],
)
async def test_bad_latents_are_422(payload, code):
    async with running() as client:
        reply = await client.post("/decode", json=payload)
    assert reply.status_code == 422 and reply.json()["error"]["code"] == code


async def test_nan_in_npy_latents_is_422():
    buf = io.BytesIO()
    np.save(buf, np.full((1, 1024), np.nan, np.float32))
    async with running() as client:
        reply = await client.post("/decode", content=buf.getvalue(), headers={"Content-Type": NPY})
        junk = await client.post(
            "/decode", content=b"\x93NUMPY junk", headers={"Content-Type": NPY}
        )
    assert reply.status_code == junk.status_code == 422


@pytest.mark.parametrize(
    "params",
    [
        {"steps": -1},
        {"steps": 10_000},
        {"steps": "3"},
        {"weights": [0.7, 0.7]},
        {"weights": [1.5, -0.5]},
        {"weights": [1.0]},
        {"steps": 1, "weights": [0.5, 0.5]},
        {},
    ],
)
async def test_bad_interpolation_parameters_are_422(params):
    latents = [[0.0] * 1024, [1.0] * 1024]
    async with running() as client:
        reply = await client.post("/interpolate", json={"latents": latents, **params})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["code"] == "invalid_parameter"


async def test_full_queue_is_429_with_retry_after(scene_bytes):
    async with running(max_queue_size=2, retry_after_s=3) as client:
        reply = await client.post("/encode", files=multipart(scene_bytes[:3]))
        ok = await client.post("/encode", files=multipart(scene_bytes[:2]))
    assert reply.status_code == 429 and reply.headers["retry-after"] == "3"
    assert reply.json()["error"]["code"] == "queue_full"
    assert ok.status_code == 200


async def test_readyz_before_and_after_load():
    from service.app import create_app
    from tests.service_client import settings

    app = create_app(settings())
    import httpx

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://svc"
    ) as client:
        before = await client.get("/readyz")
        encode_before = await client.post("/encode", json={"images": []})
        alive = await client.get("/healthz")
        async with app.router.lifespan_context(app):
            after = await client.get("/readyz")
        drained = await client.get("/readyz")
    assert before.status_code == 503 and before.headers["retry-after"]
    assert encode_before.status_code == 503 and encode_before.json()["error"]["code"] == "not_ready"
    assert alive.status_code == 200
    assert after.status_code == 200 and after.json()["status"] == "ready"
    assert drained.status_code == 503


async def test_api_key_guards_inference_and_model_but_not_probes(scene_bytes):
    async with running(api_key="s3cret") as client:
        missing = await client.post("/encode", files=multipart(scene_bytes[:1]))
        wrong = await client.get("/model", headers={"X-API-Key": "nope"})
        right = await client.post(
            "/encode", files=multipart(scene_bytes[:1]), headers={"X-API-Key": "s3cret"}
        )
        probes = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert right.status_code == 200
    assert [p.status_code for p in probes] == [200, 200, 200]
    async with running(api_key="s3cret", protect_metrics=True) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"X-API-Key": "s3cret"})).status_code == 200


async def test_the_key_is_checked_before_the_model_version_asked_for(scene_bytes):
    """401 first, then `?version=` (422 invalid_parameter), then whether it is served (404)."""
    key = {"X-API-Key": "s3cret"}
    async with running(api_key="s3cret") as client:

        async def encode(params: dict, headers: dict | None = None):
            files = multipart(scene_bytes[:1])
            return await client.post("/encode", files=files, params=params, headers=headers)

        anonymous = await encode({"version": "0"})
        zero, word = await encode({"version": "0"}, key), await encode({"version": "two"}, key)
        served = (await client.get("/model", headers=key)).json()["version"]
        absent = await encode({"version": "99"}, key)
        chosen = await encode({"version": str(served)}, key)
        card = await client.get("/model", params={"version": "-1"}, headers=key)
    assert anonymous.status_code == 401
    for reply in (zero, word, card):
        assert reply.status_code == 422 and reply.json()["error"]["code"] == "invalid_parameter"
        assert reply.json()["error"]["message"].startswith("query.version: ")
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "model_not_found"
    assert chosen.status_code == 200 and chosen.json()["model"]["version"] == served


async def test_model_reports_providers_in_use_and_batching():
    import onnxruntime as ort

    async with running(max_batch_size=8) as client:
        card = (await client.get("/model")).json()
    assert card["providers"][-1] == "CPUExecutionProvider"
    assert set(card["providers"]) <= set(ort.get_available_providers())
    assert card["batching"]["max_batch_size"] == 8
    assert card["latent_dim"] == 1024 and "anomaly" in card and "metrics" in card


async def test_require_gpu_refuses_to_start_without_one():
    import onnxruntime as ort

    from service.engine.models import GpuUnavailable

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a GPU build of onnxruntime")
    with pytest.raises(GpuUnavailable):
        async with running(require_gpu=True):
            pass


async def test_a_tampered_graph_is_refused_at_start(tmp_path):
    import shutil

    folder = manifest.resolve(DEFAULT_MODEL_DIR, "intel-scenes")
    copy = tmp_path / "intel-scenes" / "1"
    shutil.copytree(folder, copy)
    with open(copy / "decoder.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(manifest.ModelFolderError, match="sha256"):
        async with running(model_dir=tmp_path):
            pass


async def test_openapi_documents_every_endpoint():
    from openapi_spec_validator import validate

    async with running() as client:
        spec = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
        missing = await client.get("/nope")
    assert docs.status_code == 200
    for path in ("/encode", "/decode", "/reconstruct", "/anomaly-score", "/interpolate",
                 "/healthz", "/readyz", "/model", "/metrics"):  # fmt: skip
        assert path in spec["paths"], path
    body = spec["paths"]["/encode"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    validate(spec)  # a valid OpenAPI document, as client generators and gateways read it


async def test_each_phase_is_timed_per_endpoint(scene_bytes):
    async with running() as client:
        await client.post("/encode", files=multipart(scene_bytes[:2]))
        await client.post("/reconstruct", json={"images": [b64(scene_bytes[0])]})
        text = (await client.get("/metrics")).text
    for endpoint in ("encode", "reconstruct"):
        for phase in ("preprocess", "postprocess"):
            assert metric(text, f"ae_{phase}_seconds_count", endpoint=endpoint) == 1, (
                phase,
                endpoint,
            )


async def test_raw_image_bodies_and_npy_tensors_give_the_same_latents(scene_bytes, scene_paths):
    from aecore.preprocessing import load_rgb8

    spec = ImageSpec()
    blobs = scene_bytes[:3]
    uint8 = np.stack([load_rgb8(b, spec) for b in blobs])
    float32 = np.stack([load_image(b, spec) for b in blobs])
    async with running() as client:
        form = npy(
            (await client.post("/encode", files=multipart(blobs), headers={"Accept": NPY})).content
        )
        raw = [
            npy(
                (
                    await client.post(
                        "/encode", content=b, headers={"Content-Type": "image/jpeg", "Accept": NPY}
                    )
                ).content
            )[0]
            for b in blobs
        ]
        tensors = {
            name: npy(
                (
                    await client.post(
                        "/encode",
                        content=_npy_body(array),
                        headers={"Content-Type": NPY, "Accept": NPY},
                    )
                ).content
            )
            for name, array in (("uint8", uint8), ("float32", float32))
        }
        png_raw = await client.post(
            "/reconstruct",
            content=(scene_paths[0].parent / scene_paths[0].name).read_bytes(),
            headers={"Content-Type": "image/jpeg"},
        )
        anomaly = await client.post(
            "/anomaly-score", content=_npy_body(uint8[:1]), headers={"Content-Type": NPY}
        )
    # The same bytes through each body form give the same latents, bit for bit.
    np.testing.assert_array_equal(np.stack(raw), form)
    np.testing.assert_array_equal(tensors["uint8"], form)
    np.testing.assert_array_equal(tensors["float32"], form)
    assert png_raw.status_code == 200 and len(png_raw.json()["images"]) == 1
    assert anomaly.status_code == 200 and len(anomaly.json()["results"]) == 1


@pytest.mark.parametrize(
    ("array", "why"),
    [
        (np.zeros((1, 64, 64, 3), np.uint8), "shape"),
        (np.zeros((128, 128, 3), np.uint8), "shape"),
        (np.zeros((0, 128, 128, 3), np.uint8), "shape"),
        (np.full((1, 128, 128, 3), 1.5, np.float32), "range"),
        (np.full((1, 128, 128, 3), np.nan, np.float32), "finite"),
        (np.zeros((1, 128, 128, 3), np.float64), "dtype"),
        (np.zeros((1, 128, 128, 3), np.int16), "dtype"),
    ],
)
async def test_bad_npy_tensors_are_422(array, why):
    async with running() as client:
        reply = await client.post(
            "/encode", content=_npy_body(array), headers={"Content-Type": NPY}
        )
    assert reply.status_code == 422, (why, reply.text)
    assert reply.json()["error"]["code"] == "invalid_tensor"


def _npy_body(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_gpu_provider_options_tune_cuda_and_keep_tensorrt_engines_on_disk(tmp_path):
    from aecore.graphs import gpu_provider_options

    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt, cuda, cpu = gpu_provider_options(providers, tmp_path, "fp16", "HEURISTIC")
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path) and trt["trt_fp16_enable"] == "True"
    assert cpu == {}
    assert gpu_provider_options(providers[:1], tmp_path)[0]["trt_fp16_enable"] == "False"


async def test_fp16_graphs_serve_close_to_fp32_and_a_model_without_them_is_refused(
    tmp_path, scene_bytes
):
    import shutil

    from training.precision import write_fp16

    source = DEFAULT_MODEL_DIR / "intel-scenes" / "4"  # exported before fp16 graphs existed
    copy = tmp_path / "intel-scenes" / "1"
    shutil.copytree(source, copy)
    with pytest.raises(manifest.ModelFolderError, match="no fp16 graphs"):
        async with running(model_dir=tmp_path, precision="fp16"):
            pass
    images = np.stack([load_image(b, ImageSpec()) for b in scene_bytes[:4]])
    body = manifest.read(copy)
    body["precisions"] = {"fp32": {"encoder": "encoder", "decoder": "decoder"},
                          "fp16": write_fp16(copy, images)}  # fmt: skip
    names = {**manifest.graph_files(body), "encoder_fp16": "encoder.fp16.onnx",
             "decoder_fp16": "decoder.fp16.onnx"}  # fmt: skip
    body["files"] = manifest.file_entries(copy, names)
    manifest.write(copy, body)
    async with running(model_dir=tmp_path) as client:
        fp32 = npy((await client.post("/encode", files=multipart(scene_bytes[:4]),
                                      headers={"Accept": NPY})).content)  # fmt: skip
    async with running(model_dir=tmp_path, precision="fp16") as client:
        card = (await client.get("/model")).json()
        fp16 = npy((await client.post("/encode", files=multipart(scene_bytes[:4]),
                                      headers={"Accept": NPY})).content)  # fmt: skip
    assert card["precision"] == "fp16"
    assert card["precisions"]["fp16"]["parity_max_abs"]["encoder"] < 0.05
    assert np.max(np.abs(fp16 - fp32)) < 0.05 and not np.array_equal(fp16, fp32)
    # The default version was exported with its fp16 graphs: it serves them as published.
    async with running(precision="fp16") as client:
        card = (await client.get("/model")).json()
        reply = await client.post("/encode", files=multipart(scene_bytes[:2]))
    assert card["precision"] == "fp16" and "fp16" in card["precisions"]
    assert reply.status_code == 200 and len(reply.json()["latents"]) == 2
