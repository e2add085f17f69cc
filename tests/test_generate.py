"""POST /generate and the one sampler behind it, on the committed model's generation density."""

from __future__ import annotations

import numpy as np
import pytest

from aecore import generation, manifest
from aecore.preprocessing import to_uint8
from tests.conftest import DEFAULT_MODEL_DIR, SCENES
from tests.service_client import npy, png_pixels, running

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def folder():
    return manifest.resolve(DEFAULT_MODEL_DIR, "intel-scenes")


@pytest.fixture(scope="module")
def density(folder) -> generation.Density:
    found = generation.load(folder, manifest.read(folder))
    assert found is not None, "the default model has no generation density"
    return found


def test_sample_is_reproducible_and_temperature_scales_the_spread(density):
    a, labels_a = density.sample(6, seed=3, temperature=0.8)
    b, labels_b = density.sample(6, seed=3, temperature=0.8)
    c, _ = density.sample(6, seed=4, temperature=0.8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.allclose(a, c)
    k = density.classes[0]
    hot, _ = density.sample(4000, seed=1, temperature=1.0, class_name=k)
    cold, _ = density.sample(4000, seed=1, temperature=0.5, class_name=k)
    # The same draws, half as far from the mean.
    np.testing.assert_allclose(cold - density.means[0], 0.5 * (hot - density.means[0]), atol=1e-4)
    # At temperature 1 the samples have the fitted covariance's variances.
    f = density.factors[0].astype(np.float64)
    expected = np.sum(f * f, axis=1) + float(density.noise_std[0]) ** 2
    ratio = hot.astype(np.float64).var(axis=0) / expected
    assert abs(float(np.median(ratio)) - 1.0) < 0.05


def test_sample_rejects_what_it_cannot_serve(density):
    for kwargs in ({"class_name": "jungle"}, {"temperature": 0.0}, {"temperature": 2.5}):
        with pytest.raises(generation.GenerationError):
            density.sample(2, seed=0, **kwargs)


async def test_generate_is_reproducible_for_a_seed_and_respects_the_class(density):
    wanted = density.classes[1]
    request = {"n": 4, "seed": 11, "temperature": 0.8, "class": wanted}
    async with running() as client:
        first = await client.post("/generate", json=request)
        again = await client.post("/generate", json=request)
        other = await client.post("/generate", json={**request, "seed": 12})
        decoded = await client.post("/decode", json={"latents": first.json()["latents"]})
    assert first.status_code == again.status_code == other.status_code == 200
    body = first.json()
    assert body["seed"] == 11 and body["temperature"] == 0.8
    assert body["classes"] == [wanted] * 4
    assert len(body["images"]) == 4
    assert body == again.json()
    pixels = [png_pixels(s) for s in body["images"]]
    assert all(p.shape == (128, 128, 3) for p in pixels)
    assert not np.array_equal(pixels[0], pixels[1])  # four different images
    assert other.json()["images"] != body["images"]
    # The latents are the ones the images were decoded from.
    assert decoded.json()["images"] == body["images"]
    # And they lie nearer the requested class's mean than any other class's.
    latents = np.asarray(body["latents"], np.float32)
    nearest = np.linalg.norm(latents.mean(0) - density.means, axis=1).argmin()
    assert density.classes[nearest] == wanted


async def test_generate_without_seed_or_class_returns_a_seed_that_reproduces(density):
    async with running() as client:
        drawn = await client.post("/generate", json={"n": 5})
        seed = drawn.json()["seed"]
        again = await client.post("/generate", json={"n": 5, "seed": seed})
        as_npy = await client.post(
            "/generate", json={"n": 5, "seed": seed}, headers={"Accept": NPY}
        )
    assert drawn.status_code == 200 and isinstance(seed, int) and 0 <= seed < 2**53
    assert again.json()["images"] == drawn.json()["images"]
    assert set(drawn.json()["classes"]) <= set(density.classes)
    assert as_npy.headers["content-type"] == NPY
    images = npy(as_npy.content)
    assert images.shape == (5, 128, 128, 3) and images.dtype == np.float32
    for text, image in zip(drawn.json()["images"], images, strict=True):
        np.testing.assert_array_equal(png_pixels(text), to_uint8(image))


BAD = [
    {"n": 0},
    {"n": -2},
    {"n": 2.5},
    {"n": True},
    {"n": "8"},
    {"n": 9},  # above the limit set below
    {"temperature": 0},
    {"temperature": -1},
    {"temperature": 2.01},
    {"temperature": "warm"},
    {"class": "jungle"},
    {"class": 3},
    {"seed": -1},
    {"seed": 1.5},
    {"seed": 2**64},
    {"seed": "1"},
    {"colour": "red"},
]


async def test_bad_parameters_get_422():
    async with running(max_images_per_request=8) as client:
        responses = [await client.post("/generate", json=body) for body in BAD]
        good = await client.post("/generate", json={"n": 8, "temperature": 2, "seed": 2**64 - 1})
        whole = await client.post("/generate", json={"n": 2.0, "seed": 5.0})  # JSON integers
        same = await client.post("/generate", json={"n": 2, "seed": 5})
    for body, response in zip(BAD, responses, strict=True):
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["code"] == "invalid_parameter", body
    assert good.status_code == 200 and len(good.json()["images"]) == 8
    assert whole.status_code == 200 and whole.json()["images"] == same.json()["images"]


async def test_bad_bodies_get_4xx():
    async with running() as client:
        not_json = await client.post(
            "/generate", content=b"{", headers={"Content-Type": "application/json"}
        )
        wrong_type = await client.post(
            "/generate", content=b"n=2", headers={"Content-Type": "text/plain"}
        )
        a_list = await client.post("/generate", json=[1, 2])
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    assert wrong_type.status_code == 415
    assert a_list.status_code == 422


async def test_a_model_without_a_density_says_not_supported():
    without = [
        v for v in manifest.versions(DEFAULT_MODEL_DIR / "intel-scenes")
        if "generation" not in manifest.read(DEFAULT_MODEL_DIR / "intel-scenes" / str(v), verify=False)
    ]  # fmt: skip
    assert without, "expected a committed version without a generation density (version 1)"
    async with running(model_version=without[0]) as client:
        response = await client.post("/generate", json={"n": 1, "seed": 0})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_supported"


def test_probe_density_choice_and_evaluation_on_real_scenes(tmp_path, folder):
    """The training side on the committed scenes: 4 training and 1 held-out image per class."""
    from aecore.runner import Autoencoder
    from training import data
    from training.generation import choose_density, evaluate
    from training.probe import linear_probe

    ae = Autoencoder(folder)
    scenes = data.load(SCENES, ae.spec)
    train_idx, val_idx = data.stratified_split(scenes.labels, 0.2, seed=0)
    train, val = scenes.subset(train_idx), scenes.subset(val_idx)
    train_z, val_z = ae.encode_all(train.images), ae.encode_all(val.images)

    probe = linear_probe(train, val, train_z, val_z)
    assert set(probe["accuracy"]) == {"latents", "pca", "pixels"}
    assert all(0.0 <= a <= 1.0 for a in probe["accuracy"].values())
    assert "18x18x3 (972)" in probe["features"]["pixels"]
    assert probe["val_images"] == len(val) == 6

    name, density, candidates = choose_density(
        train_z, train.labels, val_z, val.labels, train.classes
    )
    assert candidates[name] == max(candidates.values())
    assert density.classes == train.classes and density.latent_dim == 1024

    result = evaluate(ae, density, train, train_z, val, val_z, tmp_path, per_class=4)
    assert (tmp_path / result["grid"]).stat().st_size > 10_000
    for rates in result["class_rate"].values():
        assert set(rates) == set(train.classes)
        assert all(0.0 <= r <= 1.0 for r in rates.values())
    near = result["nearest_training_mse"]
    # A decoded training image sits at its reconstruction error from its source; held-out
    # photos and generated images are further from every training image.
    assert near["reconstructed_training"]["median"] < near["held_out_real"]["median"]
    assert near["reconstructed_training"]["median"] < near["generated"]["median"]
