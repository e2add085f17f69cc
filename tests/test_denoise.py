"""POST /denoise on the committed denoising model, with real scene images: in-process and live."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from aecore import manifest
from aecore.preprocessing import ImageSpec, encode_png, load_image, to_uint8
from service.app import create_app
from tests.conftest import DEFAULT_MODEL_DIR
from tests.live import live_server
from tests.service_client import b64, multipart, npy, png_pixels, running, settings

NPY = "application/x-npy"
SPEC = ImageSpec()


@pytest.fixture(scope="module")
def denoiser_manifest() -> dict:
    return manifest.read(manifest.resolve(DEFAULT_MODEL_DIR, "intel-scenes-denoise"))


def noisy_png(image_bytes: bytes, sigma: float, seed: int = 0) -> tuple[np.ndarray, bytes]:
    """The preprocessed clean image (uint8) and a PNG of it with Gaussian noise of `sigma`."""
    clean = to_uint8(load_image(image_bytes, SPEC))
    noise = np.random.default_rng(seed).normal(0, sigma, clean.shape)
    return clean, encode_png(np.clip(np.rint(clean + noise), 0, 255).astype(np.uint8))


def psnr(clean: np.ndarray, other: np.ndarray) -> float:
    return peak_signal_noise_ratio(clean, other, data_range=255)


def test_the_committed_model_declares_the_denoise_task(denoiser_manifest):
    assert manifest.tasks(denoiser_manifest) == ["denoise"]
    assert denoiser_manifest["input"] == SPEC.manifest_block()
    evaluation = denoiser_manifest["evaluation"]
    assert set(evaluation["results"]) == {"15", "25", "50"}


async def test_denoise_json_returns_cleaner_pngs(scene_bytes, denoiser_manifest):
    pairs = [noisy_png(b, 25, seed) for seed, b in enumerate(scene_bytes[:3])]
    async with running() as client:
        response = await client.post("/denoise", json={"images": [b64(p) for _, p in pairs]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {
        "name": denoiser_manifest["name"],
        "version": denoiser_manifest["version"],
    }
    assert len(body["images"]) == 3
    for (clean, noisy), text in zip(pairs, body["images"], strict=True):
        cleaned = png_pixels(text)
        assert cleaned.shape == (128, 128, 3) and cleaned.dtype == np.uint8
        before = psnr(clean, png_pixels(base64.b64encode(noisy).decode()))
        assert psnr(clean, cleaned) > before + 3.0  # sigma 25: about 20 dB noisy


async def test_denoise_multipart_npy_matches_the_png_path(scene_bytes):
    _, noisy = noisy_png(scene_bytes[5], 15)
    async with running() as client:
        as_npy = await client.post("/denoise", files=multipart([noisy]), headers={"Accept": NPY})
        as_png = await client.post("/denoise", files=multipart([noisy]))
    assert as_npy.status_code == as_png.status_code == 200
    assert as_npy.headers["content-type"] == NPY
    array = npy(as_npy.content)
    assert array.dtype == np.float32 and array.shape == (1, 128, 128, 3)
    assert array.min() >= 0.0 and array.max() <= 1.0
    np.testing.assert_array_equal(to_uint8(array[0]), png_pixels(as_png.json()["images"][0]))


async def test_denoise_any_size_is_preprocessed_like_every_endpoint(odd_images):
    async with running() as client:
        response = await client.post(
            "/denoise", files=multipart([odd_images["wide_jpg"], odd_images["gray_png"]])
        )
    assert response.status_code == 200
    assert [png_pixels(t).shape for t in response.json()["images"]] == [(128, 128, 3)] * 2


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"images": ["not base64!"]}}, 400, "invalid_base64"),
        ({"json": {"images": [b64(b"not an image")]}}, 400, "invalid_image"),
        ({"json": {"images": []}}, 422, "invalid_request"),
        ({"json": {"latents": [[0.0] * 1024]}}, 422, "invalid_request"),
        ({"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, None),
    ],
)
async def test_denoise_bad_inputs_are_4xx(kwargs, status, code):
    async with running() as client:
        response = await client.post("/denoise", **kwargs)
    assert response.status_code == status
    if code:
        assert response.json()["error"]["code"] == code


async def test_denoise_refuses_too_many_images(scene_bytes):
    async with running(max_images_per_request=2) as client:
        response = await client.post("/denoise", json={"images": [b64(scene_bytes[0])] * 3})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_images"


async def test_model_card_names_the_denoiser(denoiser_manifest):
    async with running() as client:
        card = (await client.get("/model")).json()
    assert card["name"] == "intel-scenes"
    assert card["denoiser"]["name"] == denoiser_manifest["name"]
    assert card["denoiser"]["version"] == denoiser_manifest["version"]
    assert card["denoiser"]["tasks"] == ["denoise"]


async def test_without_a_denoiser_denoise_is_404_and_the_rest_serves(scene_bytes):
    async with running(denoise_model="") as client:
        denoise = await client.post("/denoise", json={"images": [b64(scene_bytes[0])]})
        encode = await client.post("/encode", json={"images": [b64(scene_bytes[0])]})
        card = (await client.get("/model")).json()
    assert denoise.status_code == 404
    assert denoise.json()["error"]["code"] == "not_found"
    assert "AE_DENOISE_MODEL" in denoise.json()["error"]["message"]
    assert encode.status_code == 200
    assert card["denoiser"] is None


async def test_a_model_that_does_not_declare_denoise_is_refused():
    with pytest.raises(manifest.ModelFolderError, match="not 'denoise'"):
        async with running(denoise_model="intel-scenes"):
            pass


def test_denoise_over_real_http(scene_bytes):
    clean, noisy = noisy_png(scene_bytes[10], 50)
    with live_server() as server:
        response = httpx.post(f"{server.base}/denoise", files=multipart([noisy]), timeout=60)
    assert response.status_code == 200
    cleaned = png_pixels(response.json()["images"][0])
    assert psnr(clean, cleaned) > psnr(clean, png_pixels(b64(noisy))) + 3.0


async def test_denoise_needs_the_api_key_when_one_is_set(scene_bytes):
    body = {"images": [b64(scene_bytes[0])]}
    async with running(api_key="denoise-key-1") as client:
        without = await client.post("/denoise", json=body)
        wrong = await client.post("/denoise", json=body, headers={"X-API-Key": "nope"})
        keyed = await client.post("/denoise", json=body, headers={"X-API-Key": "denoise-key-1"})
    assert without.status_code == wrong.status_code == 401
    assert without.json()["error"]["code"] == "unauthorized"
    assert keyed.status_code == 200


def test_openapi_documents_denoise():
    operation = create_app(settings()).openapi()["paths"]["/denoise"]["post"]
    assert {"200", "400", "404", "413", "415", "422"} <= set(operation["responses"])
    assert "application/x-npy" in operation["responses"]["200"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(operation["requestBody"]["content"])


async def test_denoise_takes_a_raw_image_body_and_preprocessed_tensors(scene_bytes):
    _, noisy = noisy_png(scene_bytes[7], 25)
    tensors = io.BytesIO()
    np.save(tensors, load_image(noisy, SPEC)[None])
    async with running() as client:
        raw = await client.post("/denoise", content=noisy, headers={"Content-Type": "image/png"})
        as_npy = await client.post(
            "/denoise", content=tensors.getvalue(), headers={"Content-Type": NPY}
        )
        form = await client.post("/denoise", files=multipart([noisy]))
    assert raw.status_code == as_npy.status_code == form.status_code == 200
    assert raw.json()["images"] == as_npy.json()["images"] == form.json()["images"]
