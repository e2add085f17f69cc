"""Fit an autoencoder with MSE + Adam into a run folder that `--resume` can continue.

A run folder holds:
  config.json        what was asked (data, arch, sizes, seed, split, loss terms, schedule)
  split.json         the train/validation file lists, so export and calibration reuse them
  history.csv        one row per epoch (losses, rounded_accuracy, learning rate, seconds)
  init.json          with --init-from: the model version or run the weights started from
  best.keras         the autoencoder (encoder + decoder) with the lowest val_loss so far
  backup/            Keras' BackupAndRestore state for resuming an interrupted run

The loss is pixel MSE unless the self-supervised options add terms (`training.selfsup`); the
validation loss is always the validation MSE. A config.json written before those options
existed loads with them off, which is how such runs were trained.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import tensorflow as tf

from aecore.preprocessing import ImageSpec
from training import data as data_mod
from training import warmstart
from training.architectures import autoencoder, build
from training.selfsup import (
    INVARIANCE_LOSSES,
    InvarianceSchedule,
    SelfSupervisedAutoencoder,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "spatial"
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    latent_dim: int = 1024
    height: int = 128
    width: int = 128
    val_fraction: float = 0.12
    val_dir: str | None = None
    limit: int | None = None
    flip: bool = False
    patience: int = 5
    seed: int = 42
    # Self-supervised terms and the schedule (training.selfsup); off by default.
    invariance_weight: float = 0.0
    invariance_loss: str = "vicreg"
    # A geometric decay of the invariance weight to this value over epochs [start, end].
    invariance_final_weight: float | None = None
    invariance_decay: list[int] | None = None
    projector_dim: int = 512
    mask_ratio: float = 0.0
    ssim_weight: float = 0.0
    schedule: str = "plateau"
    # A published model version or a run folder whose weights the run starts from
    # (training.warmstart); with freeze_encoder only the decoder trains, so the latents stay
    # the starting model's and the decoder is refit to them on clean (unmasked) inputs.
    init_from: str | None = None
    freeze_encoder: bool = False

    def __post_init__(self):
        if self.invariance_loss not in INVARIANCE_LOSSES:
            raise ValueError(f"--invariance-loss must be one of {', '.join(INVARIANCE_LOSSES)}")
        if (self.invariance_final_weight is None) != (self.invariance_decay is None):
            raise ValueError("--invariance-final-weight and --invariance-decay go together")
        if self.invariance_decay is not None:
            if not self.invariance_weight:
                raise ValueError("--invariance-decay needs --invariance-weight")
            self.invariance_schedule(1)  # validates the weights and epochs
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError("--mask-ratio must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.freeze_encoder:
            if not self.init_from:
                raise ValueError("--freeze-encoder needs --init-from: an encoder to keep")
            if self.invariance_weight or self.mask_ratio:
                # The invariance term trains only the encoder; masking would fit the decoder
                # to latents of inputs the service never sees.
                raise ValueError(
                    "--freeze-encoder trains the decoder alone: drop --invariance-weight "
                    "and --mask-ratio"
                )

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.height, self.width)

    def invariance_schedule(self, steps_per_epoch: int) -> float | InvarianceSchedule:
        """The invariance weight: a constant, or its decay over the run."""
        if self.invariance_decay is None:
            return self.invariance_weight
        start, end = self.invariance_decay
        return InvarianceSchedule(
            self.invariance_weight, self.invariance_final_weight, start, end, steps_per_epoch
        )

    def objective(self) -> dict:
        """The loss terms and augmentations, as export records them."""
        terms = {"mse": 1.0}
        if self.ssim_weight:
            terms["1-ssim"] = self.ssim_weight
        if self.invariance_weight:
            terms[self.invariance_loss] = self.invariance_weight
        augmentation = ["horizontal_flip"] if self.flip else []
        if self.mask_ratio:
            augmentation.append(f"masked_input_{self.mask_ratio:g}")
        if self.invariance_weight:
            augmentation.append("second_view_crop_flip_colour")
        out = {"loss": terms, "augmentation": augmentation, "schedule": self.schedule}
        if self.freeze_encoder:
            out["trained"] = "decoder (encoder frozen at --init-from's)"
        if self.invariance_decay is not None:
            out["invariance_decay"] = {
                "term": self.invariance_loss,
                "from": self.invariance_weight,
                "to": self.invariance_final_weight,
                "epochs": list(self.invariance_decay),
                "shape": "geometric",
            }
        return out


SCHEDULES = ("plateau", "cosine")


def load_split(config: TrainConfig, run_dir: Path | None = None):
    """(train, val) ImageSets: the split recorded in `run_dir/split.json`, else a new one.

    Training records its split there; export and calibration read it back instead of scanning
    the folder again, so images added since training never leak into validation or calibration.
    A new split is `--val-dir`, or a stratified split of `--data`, and is recorded in `run_dir`.
    """
    recorded = Path(run_dir) / "split.json" if run_dir is not None else None
    if recorded is not None and recorded.is_file():
        split = json.loads(recorded.read_text())
        val_root = Path(config.val_dir or config.data)
        train = data_mod.load_listed(
            Path(config.data), split["train"], split["classes"], config.spec
        )
        val = data_mod.load_listed(val_root, split["val"], split["classes"], config.spec)
        return train, val
    spec = config.spec
    if config.val_dir:
        train = data_mod.load(Path(config.data), spec, config.limit, config.seed)
        val = data_mod.load(Path(config.val_dir), spec, seed=config.seed)
    else:
        everything = data_mod.load(Path(config.data), spec, config.limit, config.seed)
        if len(everything) < 2:
            raise data_mod.DataError("need at least 2 readable images to split train/validation")
        train_idx, val_idx = data_mod.stratified_split(
            everything.labels, config.val_fraction, config.seed
        )
        train, val = everything.subset(train_idx), everything.subset(val_idx)
        train.skipped = everything.skipped
    if recorded is not None:
        recorded.write_text(
            json.dumps(
                {
                    "classes": train.classes,
                    "train": train.paths,
                    "val": val.paths,
                    "skipped": train.skipped,
                },
                indent=1,
            )
        )
    return train, val


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` to the logs, so history.csv carries the wall time per epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = round(time.perf_counter() - self._start, 2)


class LogSchedules(keras.callbacks.Callback):
    """Adds the rate the epoch ended at to the logs (a schedule's current value), and the
    invariance weight's where it decays."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        value = keras.ops.convert_to_numpy
        logs["learning_rate"] = float(value(self.model.optimizer.learning_rate))
        if isinstance(self.model.invariance_weight, InvarianceSchedule):
            logs["invariance_weight"] = float(value(self.model.current_invariance_weight()))


class SaveBest(keras.callbacks.Callback):
    """Saves the plain autoencoder (encoder + decoder, no training heads) to `path` whenever
    `val_loss` improves on `best`, the lowest so far (a resumed run passes its history's)."""

    def __init__(self, path: Path, model: keras.Model, best: float = float("inf")):
        super().__init__()
        self.path, self.autoencoder, self.best = Path(path), model, best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_loss")
        if value is not None and value < self.best:
            self.best = float(value)
            self.autoencoder.save(self.path)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train into `config.out`; returns the run folder."""
    run_dir = Path(config.out)
    config_path = run_dir / "config.json"
    if config_path.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume or choose another --out"
        )
    if resume:
        if not config_path.exists():
            raise FileNotFoundError(f"nothing to resume: {config_path} does not exist")
        saved = json.loads(config_path.read_text())
        saved["epochs"] = config.epochs  # the one thing a resume may change
        config = TrainConfig(**saved)  # the run's own options; older runs get the defaults
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(asdict(config), indent=2))

    keras.utils.set_random_seed(config.seed)
    source_split = Path(config.init_from) / "split.json" if config.init_from else None
    if not resume and source_split is not None and source_split.is_file():
        # A run continued from another run keeps its split, so no validation image is trained on.
        shutil.copyfile(source_split, run_dir / "split.json")
    train_set, val_set = load_split(config, run_dir)
    log.info(
        "training %s on %d images, validating on %d (%d skipped)",
        config.arch,
        len(train_set),
        len(val_set),
        len(train_set.skipped),
    )

    encoder, decoder = build(config.arch, config.spec.shape, config.latent_dim)
    if config.init_from and not resume:  # a resumed run restores its own weights
        start = warmstart.initialise(
            encoder, decoder, Path(config.init_from), config.arch, config.latent_dim
        )
        (run_dir / "init.json").write_text(json.dumps(start, indent=2))
        log.info("weights from %s", start)
    encoder.trainable = not config.freeze_encoder
    steps = -(-len(train_set) // config.batch_size)
    model = SelfSupervisedAutoencoder(
        encoder,
        decoder,
        invariance_weight=config.invariance_schedule(steps),
        invariance_loss=config.invariance_loss,
        ssim_weight=config.ssim_weight,
        projector_dim=config.projector_dim,
    )
    train_ds = data_mod.dataset(
        train_set.images,
        config.batch_size,
        shuffle=True,
        flip=config.flip,
        seed=config.seed,
        mask_ratio=config.mask_ratio,
        second_view=config.invariance_weight > 0,
    )
    val_ds = data_mod.dataset(val_set.images, config.batch_size, shuffle=False)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(config, steps)))
    plain = autoencoder(encoder, decoder)
    history = read_history(run_dir) if resume else []
    best = min((row["val_loss"] for row in history if "val_loss" in row), default=float("inf"))
    callbacks = [
        EpochTimer(),
        LogSchedules(),
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), delete_checkpoint=False),
        SaveBest(run_dir / "best.keras", plain, best),
        keras.callbacks.EarlyStopping(patience=config.patience, restore_best_weights=True),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
    ]
    if config.schedule == "plateau":
        plateau = keras.callbacks.ReduceLROnPlateau(
            factor=0.5, patience=max(1, config.patience // 2)
        )
        callbacks.insert(4, plateau)
    tf.get_logger().setLevel("ERROR")
    model.fit(
        train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=callbacks, verbose=2
    )
    if not (run_dir / "best.keras").exists():  # zero epochs ran (e.g. resuming a finished run)
        plain.save(run_dir / "best.keras")
    return run_dir


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    """A constant rate (halved on plateaus by a callback) or a cosine decay over `epochs` to 1%
    of it. The schedule counts optimizer steps, which BackupAndRestore restores on --resume;
    resuming with more epochs stretches the remaining decay."""
    if config.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=0.01
        )
    return config.learning_rate


def read_history(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return []
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
