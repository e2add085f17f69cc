"""Anomaly scorers and calibration: arithmetic on synthetic data, behaviour on real fixtures."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from aecore import anomaly, manifest
from aecore.preprocessing import ImageSpec, load_image
from tests.conftest import DEFAULT_MODEL_DIR


def test_threshold_is_the_upper_quantile_of_normal_scores():
    scores = np.arange(1, 1001, dtype=float)
    threshold = anomaly.calibrate(scores, 0.01)
    flagged = np.mean(scores > threshold)
    assert threshold == 991.0
    assert flagged == pytest.approx(0.009)  # 992..1000: just under the 1% target
    assert anomaly.calibrate(scores, 0.5) == 501.0
    with pytest.raises(ValueError):
        anomaly.calibrate(scores, 0.0)
    with pytest.raises(ValueError):
        anomaly.calibrate([], 0.01)


def test_normalisation_puts_the_normal_median_at_0_and_99th_percentile_at_1():
    scores = np.arange(0, 1001, dtype=float)
    norm = anomaly.normalisation(scores)
    assert norm == {"center": 500.0, "scale": 490.0}
    assert (np.quantile(scores, 0.99) - norm["center"]) / norm["scale"] == pytest.approx(1.0)


def _evidence(inputs, outputs, latents=None):
    latents = np.zeros((len(inputs), 4)) if latents is None else latents
    return anomaly.Evidence(inputs.astype(np.float32), outputs.astype(np.float32), latents)


def test_local_scorer_finds_a_concentrated_error_that_mse_averages_away():
    clean = np.full((2, 64, 64, 3), 0.5, np.float32)
    spread = clean.copy()
    spread[0] += 0.05  # small error everywhere
    spread[1, 24:40, 24:40] += 0.05 * np.sqrt(64 * 64 / (16 * 16))  # same total, in one patch
    ev = _evidence(spread, clean)
    mse = anomaly.mse_scorer()(ev)
    local = anomaly.local_scorer(sigma=2.0)(ev)
    assert mse[0] == pytest.approx(mse[1], rel=1e-4)
    assert local[1] > 5 * local[0]


def test_density_scorer_is_the_mahalanobis_distance():
    cov = np.diag([1.0, 4.0, 9.0])
    latents = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [2.0, 2.0, 0]])
    ev = _evidence(np.zeros((4, 2, 2, 3)), np.zeros((4, 2, 2, 3)), latents)
    scores = anomaly.density_scorer("latent", np.zeros(3), np.linalg.inv(cov))(ev)
    np.testing.assert_allclose(scores, [1.0, 1.0, 1.0, 5.0])


def test_noise_level_estimates_sigma_on_a_real_photo(scene_paths):
    photo = load_image(scene_paths[3].read_bytes(), ImageSpec())[None]
    rng = np.random.default_rng(0)
    noisy = np.clip(photo + rng.normal(0, 0.08, photo.shape), 0, 1)
    clean_level, noisy_level = anomaly.noise_level(photo)[0], anomaly.noise_level(noisy)[0]
    assert clean_level < 0.03
    assert noisy_level == pytest.approx(0.08 / np.sqrt(3), rel=0.3)  # grey averages 3 channels


def test_flat_fraction_counts_constant_neighbourhoods(scene_paths):
    photo = load_image(scene_paths[0].read_bytes(), ImageSpec())[None]
    patched = photo.copy()
    patched[0, :64, :64] = [0.9, 0.1, 0.1]
    flat_before, flat_after = anomaly.flat_fraction(photo)[0], anomaly.flat_fraction(patched)[0]
    assert flat_after - flat_before == pytest.approx(60 * 60 / 128**2, abs=0.02)


def test_colour_statistics_see_a_swapped_channel_order(scene_paths):
    photo = load_image(scene_paths[-8].read_bytes(), ImageSpec())[None]  # a sea image
    stats, swapped = (
        anomaly.colour_statistics(photo)[0],
        anomaly.colour_statistics(photo[..., ::-1])[0],
    )
    assert stats.shape == (14,)
    np.testing.assert_allclose(swapped[:3], stats[2::-1], rtol=1e-5)  # mean R and B trade places


def test_combined_is_the_largest_standardised_part():
    ev = _evidence(np.zeros((3, 2, 2, 3)), np.zeros((3, 2, 2, 3)))
    parts = {"a": lambda e: np.array([1.0, 5.0, 3.0]), "b": lambda e: np.array([10.0, 10.0, 40.0])}
    norms = {"a": {"center": 1.0, "scale": 1.0}, "b": {"center": 10.0, "scale": 10.0}}
    np.testing.assert_allclose(anomaly.combined_scorer(parts, norms)(ev), [0.0, 4.0, 3.0])


@pytest.fixture(scope="module")
def served_folder():
    return manifest.resolve(DEFAULT_MODEL_DIR, "intel-scenes")


def test_the_bundled_model_carries_every_scorer_calibrated(served_folder, scene_paths):
    from aecore.runner import Autoencoder

    block = manifest.read(served_folder)["anomaly"]
    scorers = anomaly.AnomalyScorers(block, served_folder)
    assert set(scorers.names) == {"mse", "local", "latent", "noise", "flat", "colour", "combined"}
    assert scorers.default == block["scorer"] and block["target_fpr"] == 0.01
    assert block["calibration_images"] > 0
    spec = ImageSpec()
    inputs = np.stack([load_image(p.read_bytes(), spec) for p in scene_paths[:6]])
    latents, outputs = Autoencoder(served_folder).reconstruct_all(inputs)
    ev = anomaly.Evidence(inputs, outputs, latents)
    for name in scorers.names:
        scores = scorers.score(name, ev)
        assert scores.shape == (6,) and np.all(np.isfinite(scores))
    np.testing.assert_allclose(
        scorers.score("mse", ev), anomaly.per_image_mse(ev.inputs, ev.outputs)
    )


def test_a_tampered_latent_gaussian_is_refused(served_folder, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(served_folder, copy)
    with open(copy / anomaly.GAUSSIAN_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(manifest.ModelFolderError):
        anomaly.AnomalyScorers(manifest.read(copy)["anomaly"], copy)


def test_heatmap_is_an_rgb_overlay_hottest_where_the_error_is():
    clean = np.full((64, 64, 3), 0.5, np.float32)
    broken = clean.copy()
    broken[40:56, 8:24] = 1.0
    heat = anomaly.error_heatmap(broken, clean, scale=0.05, sigma=2.0)
    assert heat.shape == (64, 64, 3) and heat.dtype == np.uint8
    # JET maps high error to red: the patch is redder than a far corner.
    assert heat[48, 16, 0] > heat[5, 60, 0] + 60
