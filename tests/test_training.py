"""The training module end to end on the committed fixture images (TensorFlow, CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from aecore import manifest
from aecore.preprocessing import ImageSpec
from aecore.runner import Autoencoder
from tests.conftest import SCENES
from training import anomaly, data
from training.architectures import ARCHITECTURES, build
from training.export import export
from training.train import TrainConfig, train

SEED_ENCODER_SHAPES = [
    (None, 128, 128, 3),
    (None, 128, 128, 32),
    (None, 64, 64, 32),
    (None, 64, 64, 64),
    (None, 32, 32, 64),
    (None, 32, 32, 128),
    (None, 16, 16, 128),
    (None, 16, 16, 256),
    (None, 8, 8, 256),
    (None, 8, 8, 512),
    (None, 512),
    (None, 1024),
]
SEED_DECODER_SHAPES = [
    (None, 1024),
    (None, 16, 16, 4),
    (None, 16, 16, 512),
    (None, 32, 32, 512),
    (None, 32, 32, 256),
    (None, 64, 64, 256),
    (None, 64, 64, 128),
    (None, 128, 128, 128),
    (None, 128, 128, 64),
    (None, 128, 128, 32),
    (None, 128, 128, 3),
]


def _shapes(model):
    return [tuple(layer.output.shape) for layer in model.layers]


def test_seed_is_exactly_the_reference():
    encoder, decoder = build("seed", (128, 128, 3), 1024)
    assert encoder.count_params() == 2_093_888
    assert decoder.count_params() == 1_587_011
    assert _shapes(encoder) == SEED_ENCODER_SHAPES
    assert _shapes(decoder) == SEED_DECODER_SHAPES
    assert [
        layer.activation.__name__ for layer in encoder.layers if hasattr(layer, "activation")
    ] == ["selu"] * 6
    assert decoder.layers[-1].activation.__name__ == "sigmoid"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_keeps_the_interface(arch):
    encoder, decoder = build(arch, (128, 128, 3), 1024)
    x = np.random.default_rng(0).random((2, 128, 128, 3), np.float32)
    z = encoder(x).numpy()
    y = decoder(z).numpy()
    assert z.shape == (2, 1024) and y.shape == (2, 128, 128, 3)
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_loader_handles_class_folders_flat_folders_and_bad_files(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(SCENES.glob("forest/*.jpg"))[:3]:
        shutil.copy(p, flat / p.name)
    (flat / "broken.jpg").write_bytes(b"not a jpeg")
    loaded = data.load(flat, ImageSpec())
    assert len(loaded) == 3 and loaded.classes == [data.FLAT_CLASS]
    assert [s.endswith("broken.jpg") for s in loaded.skipped] == [True]
    assert loaded.images.dtype == np.uint8 and loaded.images.shape[1:] == (128, 128, 3)

    scenes = data.load(SCENES, ImageSpec())
    assert scenes.classes == ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    train_idx, val_idx = data.stratified_split(scenes.labels, 0.2, seed=1)
    assert set(np.bincount(scenes.labels[val_idx])) == {1}  # one per class
    assert not set(train_idx) & set(val_idx)


def test_anomaly_set_is_reproducible_and_differs_from_the_normals():
    normals = data.load(SCENES, ImageSpec()).images[:8]
    first = anomaly.make_anomalies(normals, ImageSpec(), seed=3)
    again = anomaly.make_anomalies(normals, ImageSpec(), seed=3)
    assert set(first) == set(anomaly.KINDS)
    for kind, images in first.items():
        assert images.shape == normals.shape and images.dtype == np.uint8
        np.testing.assert_array_equal(images, again[kind])
        assert np.abs(images.astype(int) - normals).mean() > 5, kind
    measured, chosen_on = anomaly.off_domain_photos(), anomaly.other_photos()
    assert len(measured) >= 2 and len(chosen_on) >= 2
    # The photos the combined scorer's parts are chosen on are none of those the report measures.
    seen = {p.tobytes() for p in measured}
    assert all(p.dtype == np.uint8 and p.shape[2] == 3 for p in chosen_on)
    assert not any(p.tobytes() in seen for p in chosen_on)


@pytest.mark.parametrize("missing", ["does-not-exist", "empty"])
def test_cli_explains_a_missing_or_empty_data_folder(tmp_path, missing):
    folder = tmp_path / missing
    if missing == "empty":
        folder.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert str(folder) in result.stderr
    assert "does not exist" in result.stderr or "no images" in result.stderr


def test_train_resume_export_gives_a_valid_model_folder(tmp_path):
    run, scenes = tmp_path / "run", tmp_path / "scenes"
    shutil.copytree(SCENES, scenes)
    config = TrainConfig(
        data=str(scenes), out=str(run), arch="spatial", epochs=1, batch_size=8, val_fraction=0.2
    )
    train(config)
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "rounded_accuracy" in history[0] and "epoch_seconds" in history[0]
    with pytest.raises(FileExistsError):
        train(config)
    train(TrainConfig(**{**config.__dict__, "epochs": 2}), resume=True)  # continues at epoch 2
    assert len((run / "history.csv").read_text().splitlines()) == 3

    # Images added after training must not enter validation or calibration: export reads the
    # split that training recorded instead of splitting the folder again.
    recorded = json.loads((run / "split.json").read_text())
    for i, path in enumerate(sorted(scenes.glob("*/*.jpg"))[:12]):
        shutil.copy(path, path.with_name(f"added-{i}.jpg"))
    folder = export(run, tmp_path / "models", "fixture", compare_seed=False)
    assert folder == tmp_path / "models" / "fixture" / "1"
    body = manifest.read(folder)  # verifies the sha256 of both graphs
    assert body["training"]["train_images"] == len(recorded["train"])
    assert body["training"]["data"] == "scenes"  # a name, never this machine's path
    assert not list((tmp_path / "models" / "fixture").glob(".*.partial"))  # published by rename
    assert body["latent_dim"] == 1024 and body["architecture"] == "spatial"
    assert body["input"]["resize"] == "area" and body["input"]["layout"] == "NHWC"
    split = json.loads((run / "split.json").read_text())
    n_val = len(split["val"])
    assert body["training"]["val_images"] == n_val == 6  # one per class
    metrics = body["metrics"]
    assert metrics["onnx_parity_max_abs"] <= 1e-4
    assert 0 < metrics["val_mse"] < 0.2 and 0 < metrics["pca_val_mse"] < 0.2
    assert set(metrics["val_mse_per_class"]) == set(split["classes"])
    block = body["anomaly"]
    assert block["calibration_images"] + block["evaluation"]["normal_images"] == n_val
    assert set(block["scorers"]) == {*anomaly.BASE_SCORERS, "combined"}
    assert set(block["evaluation"]["auroc"]["combined"]) == set(anomaly.KINDS)
    assert (folder / block["scorers"]["latent"]["file"]).is_file()
    # The export fits the generation density too (its file hashed in `files`, checked above).
    assert body["files"]["generator"] == body["generation"]["file"] == "generator.npz"
    assert body["generation"]["classes"] == split["classes"]
    assert "init_from" not in body["training"]  # trained from scratch
    for name in (
        "report.md",
        "reconstructions.png",
        "loss.png",
        "latent_map.png",
        "anomaly.md",
        "anomaly_examples.png",
    ):
        assert (folder / "report" / name).stat().st_size > 0

    runner = Autoencoder(folder)
    encoder, decoder = runner.encoder, runner.decoder
    assert [(i.name, i.shape[1:]) for i in encoder.get_inputs()] == [("image", [128, 128, 3])]
    assert [o.name for o in encoder.get_outputs()] == ["latent"]
    assert [i.name for i in decoder.get_inputs()] == ["latent"]
    for batch in (1, 3):  # dynamic batch dimension
        z = encoder.run(None, {"image": np.zeros((batch, 128, 128, 3), np.float32)})[0]
        assert z.shape == (batch, 1024)
        assert decoder.run(None, {"latent": z})[0].shape == (batch, 128, 128, 3)
    recalibrated = subprocess.run(
        [sys.executable, "-m", "training", "evaluate-anomaly", "--model", str(folder),
         "--run", str(run), "--target-fpr", "0.05", "--scorer", "local"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert recalibrated.returncode == 0, recalibrated.stderr
    assert "| combined |" in recalibrated.stdout  # the AUROC table
    # A published version never changes: the recalibration is version 2.
    assert manifest.read(folder)["anomaly"]["scorer"] == "combined"
    block = manifest.read(folder.with_name("2"))["anomaly"]
    assert block["scorer"] == "local" and block["target_fpr"] == 0.05
    assert block["threshold"] == block["scorers"]["local"]["threshold"]

    again = export(run, tmp_path / "models", "fixture", baseline_run=run)  # with the comparison
    assert again.name == "3"  # the next free version
    comparison = manifest.read(again)["metrics"]["comparison"]
    assert set(comparison["reconstruct_img_s"]) == {"spatial", "seed"}
    # Both architectures measured in the same run; the ratio is theirs (no timing is asserted).
    img_s = comparison["reconstruct_img_s"]
    assert img_s["spatial"] > 0 and img_s["seed"] > 0
    assert comparison["speedup_vs_seed"] == pytest.approx(
        img_s["spatial"] / img_s["seed"], rel=0.01
    )
    assert comparison["runs"]["seed"]["epochs"] == 2
    assert "Against the reference architecture" in (again / "report" / "report.md").read_text()
