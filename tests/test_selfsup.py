"""The self-supervised training options: augmentations, loss terms, config and resume (CPU, tiny)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tensorflow as tf

from aecore.preprocessing import ImageSpec, to_float
from tests.conftest import SCENES
from training import augment, cli, data, report
from training.architectures import build
from training.onnx_export import parity, to_onnx
from training.selfsup import InvarianceSchedule, SelfSupervisedAutoencoder, nt_xent, vicreg
from training.train import TrainConfig, load_split, train
from training.warmstart import load_autoencoder

SEED = tf.constant([3, 4], tf.int64)


@pytest.fixture(scope="module")
def images():
    return data.load(SCENES, ImageSpec()).images[:8]


def _rows(run):
    with open(run / "history.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def test_a_config_from_before_the_options_trains_as_it_did():
    old = {  # a run folder's config.json from before the self-supervised options existed
        "data": "scenes", "out": "runs/old", "arch": "spatial", "epochs": 30, "batch_size": 32,
        "learning_rate": 0.001, "latent_dim": 1024, "height": 128, "width": 128,
        "val_fraction": 0.12, "val_dir": None, "limit": None, "flip": True, "patience": 5,
        "seed": 42,
    }  # fmt: skip
    config = TrainConfig(**old)
    assert config.invariance_weight == 0 and config.mask_ratio == 0 and config.ssim_weight == 0
    assert config.schedule == "plateau"
    assert config.objective() == {
        "loss": {"mse": 1.0},
        "augmentation": ["horizontal_flip"],
        "schedule": "plateau",
    }
    with pytest.raises(ValueError, match="mask-ratio"):
        TrainConfig(**old, mask_ratio=1.0)
    with pytest.raises(ValueError, match="invariance-loss"):
        TrainConfig(**old, invariance_loss="barlow")


def test_augmentations_keep_shape_and_range_and_are_seeded(images):
    x = tf.constant(to_float(images))
    mirrored = augment.flip(x, SEED).numpy()
    for got, original in zip(
        mirrored, x.numpy(), strict=True
    ):  # each image is itself or its mirror
        assert np.array_equal(got, original) or np.array_equal(got, original[:, ::-1])

    view = augment.strong_view(x, SEED).numpy()
    assert view.shape == x.shape and view.min() >= 0 and view.max() <= 1
    np.testing.assert_array_equal(view, augment.strong_view(x, SEED).numpy())
    other = augment.strong_view(x, tf.constant([5, 6], tf.int64)).numpy()
    assert np.abs(view - other).mean() > 0.02
    assert np.abs(view - x.numpy()).mean() > 0.02  # a different picture of the same scene

    full = augment.crop_flip(x, SEED, min_area=1.0, ratio=(1.0, 1.0)).numpy()
    for got, original in zip(full, x.numpy(), strict=True):  # the whole image: itself or its mirror
        assert min(np.abs(got - original).max(), np.abs(got - original[:, ::-1]).max()) < 1e-5


def test_masking_zeroes_whole_patches_at_the_ratio(images):
    x = tf.constant(to_float(images)) + 0.01  # no pixel is zero before masking
    masked = augment.mask_patches(x, 0.5, SEED).numpy()
    patches = masked.reshape(len(images), 8, 16, 8, 16, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(len(images), 64, -1)
    zeroed = (patches == 0).all(axis=2)
    kept = (patches > 0).all(axis=2)
    assert (zeroed | kept).all()  # every 16x16 patch is either gone or untouched
    assert 0.4 < zeroed.mean() < 0.6
    assert not augment.mask_patches(x, 0.0, SEED).numpy().__eq__(0).any()


def test_dataset_batches_carry_input_target_and_a_second_view(images):
    plain = next(iter(data.dataset(images, 4, shuffle=False)))
    assert set(plain) == {"image", "target"}
    np.testing.assert_array_equal(plain["image"], to_float(images[:4]))
    np.testing.assert_array_equal(plain["target"], plain["image"])

    def first_epochs(seed):
        ds = data.dataset(images, 4, shuffle=False, seed=seed, mask_ratio=0.5, second_view=True)
        return [next(iter(ds)) for _ in range(2)]

    one, two = first_epochs(7)
    assert set(one) == {"image", "target", "view"}
    np.testing.assert_array_equal(one["target"], to_float(images[:4]))  # the target stays clean
    hidden = one["image"].numpy() != one["target"].numpy()
    assert 0.2 < hidden.mean() < 0.8 and (one["image"].numpy()[hidden] == 0).all()
    assert not np.array_equal(one["view"], two["view"])  # new views every epoch
    again = first_epochs(7)[0]  # ... and the same ones for the same seed
    np.testing.assert_array_equal(one["view"], again["view"])
    np.testing.assert_array_equal(one["image"], again["image"])


def test_vicreg_and_nt_xent_reward_matched_views_and_punish_collapse():
    rng = np.random.default_rng(0)

    def normal(n, d, scale=1.0):
        return tf.constant(rng.normal(size=(n, d)) * scale, tf.float32)

    z = normal(512, 16, 1.5)
    matched = float(vicreg(z, z + normal(512, 16, 0.1)))
    assert matched < 0.1  # spread out, decorrelated, nearly equal: almost nothing to pay
    collapsed = tf.zeros((512, 16)) + normal(1, 16)
    assert float(vicreg(collapsed, collapsed)) > 1.9  # the variance hinge: about 1 per view
    assert float(vicreg(z, tf.random.shuffle(z, seed=1))) > matched + 1

    z = normal(16, 64)
    matched = float(nt_xent(z, z + normal(16, 64, 0.1)))
    assert matched < 0.5  # each view finds its partner among 31
    assert float(nt_xent(z, tf.random.shuffle(z, seed=1))) > matched + 2


def test_the_loss_is_the_weighted_sum_of_its_terms(images):
    encoder, decoder = build("spatial", (128, 128, 3), 1024)
    x = tf.constant(to_float(images[:4]))
    batch = {"image": x, "target": x, "view": augment.strong_view(x, SEED)}
    plain = SelfSupervisedAutoencoder(encoder, decoder).terms(batch, training=True)
    assert set(plain) == {"loss", "mse", "rounded_accuracy"}
    assert float(plain["loss"]) == float(plain["mse"])

    model = SelfSupervisedAutoencoder(encoder, decoder, invariance_weight=0.3, ssim_weight=0.2)
    terms = model.terms(batch, training=True)
    assert float(terms["invariance"]) > 0 and 0 < float(terms["ssim"]) < 2
    np.testing.assert_allclose(
        float(terms["loss"]),
        float(terms["mse"]) + 0.3 * float(terms["invariance"]) + 0.2 * float(terms["ssim"]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(float(terms["mse"]), float(plain["mse"]), rtol=1e-4)
    # Validation scores the reconstruction alone, whatever the training terms.
    assert set(model.test_step(batch)) == {"loss", "rounded_accuracy"}
    np.testing.assert_allclose(
        float(model.test_step(batch)["loss"]), float(plain["mse"]), rtol=1e-4
    )


def test_options_train_record_and_survive_resume(tmp_path):
    scenes, run = tmp_path / "scenes", tmp_path / "run"
    shutil.copytree(SCENES, scenes)
    options = ["--invariance-weight", "0.05", "--mask-ratio", "0.25", "--ssim-weight", "0.1",
               "--schedule", "cosine", "--arch", "hybrid"]  # fmt: skip
    base = ["train", "--data", str(scenes), "--out", str(run), "--batch-size", "8",
            "--val-fraction", "0.2", "--seed", "1"]  # fmt: skip
    assert cli.main([*base, "--epochs", "1", *options]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["invariance_weight"] == 0.05 and saved["mask_ratio"] == 0.25
    assert saved["ssim_weight"] == 0.1 and saved["schedule"] == "cosine"
    assert saved["arch"] == "hybrid"

    assert cli.main([*base, "--epochs", "2", "--resume"]) == 0  # options not repeated
    assert json.loads((run / "config.json").read_text()) == {**saved, "epochs": 2}
    rows = _rows(run)
    assert [row["epoch"] for row in rows] == [0, 1]
    for row in rows:  # every term was trained, and the loss is their weighted sum
        assert row["invariance"] > 0 and row["ssim"] > 0 and row["mse"] > 0
        expected = row["mse"] + 0.05 * row["invariance"] + 0.1 * row["ssim"]
        assert row["loss"] == pytest.approx(expected, rel=1e-4)
    # The cosine schedule counts optimizer steps, restored on resume: both epochs end at its
    # floor (1% of 1e-3). Counting from zero again would have left the rate at half-way.
    assert [row["learning_rate"] for row in rows] == pytest.approx([1e-5, 1e-5], rel=1e-3)

    encoder, decoder = load_autoencoder(run)  # the plain autoencoder, no projector
    assert encoder.output_shape == (None, 1024) and decoder.output_shape == (None, 128, 128, 3)


def test_the_invariance_weight_decays_geometrically_between_its_epochs():
    schedule = InvarianceSchedule(0.1, 0.001, start=2, end=4, steps_per_epoch=10)
    weights = [float(schedule(step)) for step in (0, 20, 30, 40, 100)]
    assert weights == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001], rel=1e-5)
    with pytest.raises(ValueError, match="final invariance weight"):
        InvarianceSchedule(0.1, 0.2, 0, 1, 10)
    with pytest.raises(ValueError, match="must end after it starts"):
        InvarianceSchedule(0.1, 0.01, 3, 3, 10)

    common = dict(data="scenes", out="run", invariance_weight=0.1)
    config = TrainConfig(**common, invariance_final_weight=0.01, invariance_decay=[1, 5])
    assert config.objective()["invariance_decay"] == {
        "term": "vicreg", "from": 0.1, "to": 0.01, "epochs": [1, 5], "shape": "geometric",
    }  # fmt: skip
    # The model report states each term and its weight, a decaying one as its range.
    assert report.loss_terms(config.objective()) == "mse: 1, vicreg: 0.1 -> 0.01 (epochs 1-5)"
    constant = TrainConfig(**common, ssim_weight=0.2).objective()
    assert report.loss_terms(constant) == "mse: 1, 1-ssim: 0.2, vicreg: 0.1"
    assert report.loss_terms({"loss": "mse"}) == "mse"
    with pytest.raises(ValueError, match="go together"):
        TrainConfig(**common, invariance_final_weight=0.01)
    with pytest.raises(ValueError, match="final invariance weight"):
        TrainConfig(**common, invariance_final_weight=0.0, invariance_decay=[0, 2])
    with pytest.raises(ValueError, match="needs --invariance-weight"):
        TrainConfig(data="s", out="r", invariance_final_weight=0.01, invariance_decay=[0, 2])


def test_a_decaying_invariance_weight_is_logged_and_continues_on_resume(tmp_path):
    scenes, run = tmp_path / "scenes", tmp_path / "run"
    shutil.copytree(SCENES, scenes)
    base = ["train", "--data", str(scenes), "--out", str(run), "--batch-size", "8",
            "--val-fraction", "0.2", "--seed", "1"]  # fmt: skip
    decay = ["--invariance-weight", "0.1", "--invariance-final-weight", "0.001",
             "--invariance-decay", "0", "2"]  # fmt: skip
    assert cli.main([*base, "--epochs", "1", *decay]) == 0
    assert cli.main([*base, "--epochs", "3", "--resume"]) == 0
    rows = _rows(run)
    # Half-way through the decay after epoch 1, its end after 2; a resume that counted from zero
    # again would log 0.01 twice.
    assert [row["invariance_weight"] for row in rows] == pytest.approx([0.01, 1e-3, 1e-3], rel=1e-4)
    last = rows[-1]  # a constant weight all epoch: the loss is the weighted sum
    assert last["loss"] == pytest.approx(last["mse"] + 1e-3 * last["invariance"], rel=1e-4)


def test_cosine_decays_within_a_run_and_the_default_logs_its_rate(tmp_path):
    shutil.copytree(SCENES, tmp_path / "scenes")
    common = dict(data=str(tmp_path / "scenes"), epochs=2, batch_size=8, val_fraction=0.2)
    train(TrainConfig(out=str(tmp_path / "cosine"), schedule="cosine", **common))
    rates = [row["learning_rate"] for row in _rows(tmp_path / "cosine")]
    assert rates[0] == pytest.approx(0.5e-3 + 0.5e-5, rel=1e-3) and rates[1] == pytest.approx(1e-5)

    train(TrainConfig(out=str(tmp_path / "plain"), **common))
    rows = _rows(tmp_path / "plain")
    assert {"loss", "rounded_accuracy", "val_loss", "learning_rate"} <= set(rows[0])
    assert "invariance" not in rows[0] and "mse" not in rows[0]  # the old columns only
    assert [row["learning_rate"] for row in rows] == pytest.approx([1e-3, 1e-3])


def test_hybrid_exports_with_the_contract(tmp_path, images):
    encoder, decoder = build("hybrid", (128, 128, 3), 1024)
    x = to_float(images[:3])
    assert parity(encoder, to_onnx(encoder, "image", "latent", tmp_path / "e.onnx"), x) < 1e-4
    z = encoder(x).numpy()
    assert parity(decoder, to_onnx(decoder, "latent", "image", tmp_path / "d.onnx"), z) < 1e-4


# Keras warns of the nested models' depth bookkeeping missing from the old file; every weight
# loads all the same, which is what the test checks.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_a_run_from_before_the_options_resumes(tmp_path):
    """A run folder written by the plain Keras autoencoder (the training before these options)
    resumes: its weights and optimizer step load into the new training model, history goes on."""
    import keras

    from training.architectures import autoencoder
    from training.selfsup import rounded_accuracy
    from training.train import EpochTimer

    shutil.copytree(SCENES, tmp_path / "scenes")
    run = tmp_path / "run"
    old = TrainConfig(data=str(tmp_path / "scenes"), out=str(run), epochs=1, batch_size=8,
                      val_fraction=0.2)  # fmt: skip
    run.mkdir()
    train_set, val_set = load_split(old, run)
    config = {k: v for k, v in old.__dict__.items() if k in OLD_FIELDS}
    (run / "config.json").write_text(json.dumps(config))
    encoder, decoder = build("spatial", (128, 128, 3), 1024)
    model = autoencoder(encoder, decoder)  # as train() built, compiled and fitted it then
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=[rounded_accuracy])
    x, v = to_float(train_set.images), to_float(val_set.images)
    model.fit(x, x, validation_data=(v, v), batch_size=8, epochs=1, verbose=0, callbacks=[
        EpochTimer(),
        keras.callbacks.BackupAndRestore(str(run / "backup"), delete_checkpoint=False),
        keras.callbacks.ModelCheckpoint(str(run / "best.keras"), save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2),
        keras.callbacks.CSVLogger(str(run / "history.csv")),
    ])  # fmt: skip

    fresh = SelfSupervisedAutoencoder(*build("spatial", (128, 128, 3), 1024))
    fresh.compile(optimizer=keras.optimizers.Adam(1e-3))
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(run / "backup" / "latest.weights.h5")
    for got, saved in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, saved)  # encoder and decoder, every weight
    assert int(fresh.optimizer.iterations) == int(model.optimizer.iterations) > 0

    train(TrainConfig(**{**config, "epochs": 2}), resume=True)
    rows = _rows(run)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert set(rows[0]) == set(rows[1])  # the same columns as before
    assert json.loads((run / "config.json").read_text())["invariance_weight"] == 0


OLD_FIELDS = {"data", "out", "arch", "epochs", "batch_size", "learning_rate", "latent_dim",
              "height", "width", "val_fraction", "val_dir", "limit", "flip", "patience", "seed"}  # fmt: skip


def test_init_from_copies_a_published_versions_weights(tmp_path, images):
    """A run started from models/intel-scenes/3 begins as that version: the Keras encoder and
    decoder give what its ONNX graphs give on real images, and the run records where from."""
    from aecore.runner import Autoencoder
    from tests.conftest import DEFAULT_MODEL_DIR
    from training import warmstart

    version = DEFAULT_MODEL_DIR / "intel-scenes" / "3"
    encoder, decoder = build("spatial", (128, 128, 3), 1024)
    start = warmstart.initialise(encoder, decoder, version, "spatial", 1024)
    assert start["model"] == "intel-scenes/3"
    assert max(start["parity"].values()) <= 1e-4
    latents, outputs = Autoencoder(version).reconstruct_all(images)
    np.testing.assert_allclose(encoder(to_float(images)).numpy(), latents, atol=1e-4)
    np.testing.assert_allclose(decoder(latents).numpy(), outputs, atol=1e-4)

    other, _ = build("hybrid", (128, 128, 3), 1024)
    with pytest.raises(ValueError, match="spatial"):  # another architecture is refused
        warmstart.initialise(other, decoder, version, "hybrid", 1024)

    run = tmp_path / "run"
    config = TrainConfig(
        data=str(SCENES), out=str(run), epochs=1, batch_size=8, val_fraction=0.2,
        learning_rate=1e-6, init_from=str(version),
    )  # fmt: skip
    train(config)
    recorded = json.loads((run / "init.json").read_text())
    assert recorded["encoder_sha256"] == manifest_hash(version, "encoder")
    # One step at a tiny rate leaves the reconstructions those of the version it started from.
    trained_encoder, trained_decoder = load_autoencoder(run)
    again = trained_decoder(trained_encoder(to_float(images))).numpy()
    assert np.abs(again - outputs).max() < 0.02


def manifest_hash(version, part: str) -> str:
    from aecore import manifest

    return manifest.read(version)["files"]["sha256"][part]


def test_freeze_encoder_refits_the_decoder_of_a_run_and_keeps_its_latents(tmp_path, images):
    """A decoder refit from a run folder: the latents are the source run's to the bit, the
    decoder has moved, the source's split is kept and the run records where it started."""
    source, refit = tmp_path / "source", tmp_path / "refit"
    base = ["train", "--data", str(SCENES), "--batch-size", "8", "--val-fraction", "0.2",
            "--epochs", "1"]  # fmt: skip
    assert cli.main([*base, "--out", str(source), "--mask-ratio", "0.25"]) == 0
    assert cli.main([*base, "--out", str(refit), "--init-from", str(source),
                     "--freeze-encoder", "--seed", "7"]) == 0  # fmt: skip

    x = to_float(images)
    source_encoder, source_decoder = load_autoencoder(source)
    encoder, decoder = load_autoencoder(refit)
    np.testing.assert_array_equal(encoder(x).numpy(), source_encoder(x).numpy())
    latents = encoder(x).numpy()
    assert np.abs(decoder(latents).numpy() - source_decoder(latents).numpy()).max() > 1e-4
    # Another seed would split differently; the refit validates on the source's images.
    assert json.loads((refit / "split.json").read_text()) == json.loads(
        (source / "split.json").read_text()
    )
    start = json.loads((refit / "init.json").read_text())
    assert start["run"] == "source" and len(start["best_keras_sha256"]) == 64
    assert start["epochs"] == 1 and start["config"]["mask_ratio"] == 0.25  # how it was trained
    assert start["config"]["out"] == "source"  # a name, never this machine's path
    from aecore import manifest
    from training.export import export

    # Export says so: the manifest and the report name the source run and what was trained.
    body = manifest.read(export(refit, tmp_path / "models", "fixture", compare_seed=False))
    assert body["training"]["trained"].startswith("decoder")
    assert body["training"]["init_from"] == start
    report_md = (tmp_path / "models" / "fixture" / "1" / "report" / "report.md").read_text()
    assert "| started from | run `source` (epochs: 1); trained: decoder" in report_md

    with pytest.raises(ValueError, match="needs --init-from"):
        TrainConfig(data="d", out="o", freeze_encoder=True)
    with pytest.raises(ValueError, match="decoder alone"):
        TrainConfig(data="d", out="o", init_from=str(source), freeze_encoder=True, mask_ratio=0.25)
