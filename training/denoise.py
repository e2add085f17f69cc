"""Train an image denoiser (noisy in, clean target) into a run folder that `--resume` continues.

The split is the default autoencoder's (training.train.load_split with the same fraction and seed),
so the held-out images were seen by neither model. Training samples are random crops (with
horizontal flips) of the images at the model size, corrupted afresh every epoch by
training.noise.corrupt; validation is the held-out images at full size with noise drawn once.

A run folder holds config.json, split.json, history.csv, best.keras and backup/.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np

from aecore.preprocessing import to_float
from training import noise
from training.architectures import build_denoiser
from training.train import EpochTimer, TrainConfig, load_split

log = logging.getLogger(__name__)


@dataclass
class DenoiseConfig:
    data: str
    out: str
    arch: str = "denoiser"
    width: int = 16
    epochs: int = 60
    batch_size: int = 16
    patch: int = 96
    learning_rate: float = 1e-3
    height: int = 128
    width_px: int = 128
    val_fraction: float = 0.12
    seed: int = 42
    max_minutes: float | None = None

    def split_config(self) -> TrainConfig:
        """The autoencoder's TrainConfig with the same data, size and split."""
        return TrainConfig(
            data=self.data,
            out=self.out,
            height=self.height,
            width=self.width_px,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )


class NoisyCrops(keras.utils.PyDataset):
    """(noisy, clean) float32 batches of random crops, with fresh noise every epoch."""

    def __init__(self, images: np.ndarray, batch_size: int, patch: int, seed: int):
        super().__init__()
        self.images, self.batch_size, self.patch, self.seed = images, batch_size, patch, seed
        self.epoch = 0
        self.order = np.random.default_rng(seed).permutation(len(images))

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        picked = self.images[self.order[index * self.batch_size : (index + 1) * self.batch_size]]
        h, w = picked.shape[1:3]
        top = rng.integers(0, h - self.patch + 1, len(picked))
        left = rng.integers(0, w - self.patch + 1, len(picked))
        clean = np.stack(
            [
                img[t : t + self.patch, s : s + self.patch]
                for img, t, s in zip(picked, top, left, strict=True)
            ]
        )
        flip = rng.random(len(clean)) < 0.5
        clean[flip] = clean[flip, :, ::-1]
        return to_float(noise.corrupt(clean, rng)), to_float(clean)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.images))


class TimeLimit(keras.callbacks.Callback):
    """Stop after the epoch that passes `minutes` of training (the best checkpoint is kept)."""

    def __init__(self, minutes: float):
        super().__init__()
        self.deadline = time.monotonic() + 60 * minutes

    def on_epoch_end(self, epoch, logs=None):
        if time.monotonic() > self.deadline:
            log.info("time limit reached after epoch %d", epoch + 1)
            self.model.stop_training = True


class SetLearningRate(keras.callbacks.Callback):
    """Set the rate once training (and BackupAndRestore's restore) has begun: a resumed run
    may continue at a lower rate than the one its optimizer state was saved with."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate = self.rate


def train_denoiser(
    config: DenoiseConfig, resume: bool = False, learning_rate: float | None = None
) -> Path:
    """Train into `config.out`; returns the run folder. On resume, `learning_rate` replaces the
    rate the run had reached (the time budget, not a plateau, ends a CPU run)."""
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
        saved.update(epochs=config.epochs, max_minutes=config.max_minutes)
        config = DenoiseConfig(**saved)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(asdict(config), indent=2))

    keras.utils.set_random_seed(config.seed)
    train_set, val_set = load_split(config.split_config(), run_dir)
    val_clean = val_set.images
    val_noisy = noise.corrupt(val_clean, np.random.default_rng((config.seed, 1 << 20)))
    log.info("denoiser on %d training images, validating on %d", len(train_set), len(val_set))

    model = build_denoiser(config.arch, config.width)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="mse")
    callbacks = [
        EpochTimer(),
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), delete_checkpoint=False),
        keras.callbacks.ModelCheckpoint(str(run_dir / "best.keras"), save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=3, min_lr=1e-5),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
    ]
    if config.max_minutes:
        callbacks.append(TimeLimit(config.max_minutes))
    if resume and learning_rate:
        callbacks.append(SetLearningRate(learning_rate))
    model.fit(
        NoisyCrops(train_set.images, config.batch_size, config.patch, config.seed),
        validation_data=(to_float(val_noisy), to_float(val_clean)),
        validation_batch_size=32,
        epochs=config.epochs,
        callbacks=callbacks,
        verbose=2,
    )
    if not (run_dir / "best.keras").exists():
        model.save(run_dir / "best.keras")
    return run_dir
