"""The training model: an encoder and decoder fitted on pixel MSE plus optional terms that make
the latent worth using without labels.

  loss = MSE(target, decoder(encoder(input)))
       + ssim_weight * (1 - SSIM(target, reconstruction))
       + invariance_weight * vicreg(p(encoder(input)), p(encoder(view)))   [or NT-Xent]

`input` is the target with a share of its patches masked (`mask_ratio`), `view` another random
view of the same image (crop, mirror, colour), `p` a small projector used only in training.
The invariance weight may decay during the run (`InvarianceSchedule`): a strong term first shapes
the latent, a weak one later lets the reconstruction catch up.
Validation scores the plain reconstruction of the unmasked validation images, so `val_loss` is
the validation MSE whatever the options: checkpoints and early stopping compare like with like.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

INVARIANCE_LOSSES = ("vicreg", "ntxent")


class InvarianceSchedule:
    """The invariance weight at an optimizer step: `weight` until `start` epochs, then a
    geometric decay to `final` at `end` epochs, then `final`. Counting optimizer steps, as the
    learning rate's cosine does, means a resumed run continues where it stopped."""

    def __init__(self, weight: float, final: float, start: int, end: int, steps_per_epoch: int):
        if not 0 < final <= weight:
            raise ValueError("the final invariance weight must be in (0, --invariance-weight]")
        if not 0 <= start < end:
            raise ValueError("the invariance decay must end after it starts (epochs)")
        self.weight, self.final = weight, final
        self.start, self.end = start * steps_per_epoch, end * steps_per_epoch

    def __call__(self, step) -> tf.Tensor:
        progress = (tf.cast(step, tf.float32) - self.start) / (self.end - self.start)
        return self.weight * (self.final / self.weight) ** tf.clip_by_value(progress, 0.0, 1.0)


def projector(latent_dim: int, width: int = 512) -> keras.Model:
    """The VICReg/SimCLR head: latent -> width -> width. Discarded after training."""
    code = keras.Input((latent_dim,), name="latent")
    x = layers.Dense(width)(code)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    return keras.Model(code, layers.Dense(width)(x), name="projector")


def vicreg(za, zb, variance_weight: float = 1.0, covariance_weight: float = 0.04):
    """VICReg (Bardes et al. 2022) with the paper's ratios 25 : 25 : 1, divided by 25:
    invariance (MSE between the views' projections) + variance (hinge keeping every dimension's
    std >= 1 across the batch) + covariance (off-diagonal covariance pushed to zero)."""

    def variance(z):
        std = tf.sqrt(tf.math.reduce_variance(z, axis=0) + 1e-4)
        return tf.reduce_mean(tf.nn.relu(1.0 - std))

    def covariance(z):
        n, d = tf.cast(tf.shape(z)[0], z.dtype), tf.cast(tf.shape(z)[1], z.dtype)
        z = z - tf.reduce_mean(z, axis=0)
        cov = tf.matmul(z, z, transpose_a=True) / (n - 1.0)
        off_diagonal = tf.reduce_sum(tf.square(cov)) - tf.reduce_sum(
            tf.square(tf.linalg.diag_part(cov))
        )
        return off_diagonal / d

    invariance = tf.reduce_mean(tf.square(za - zb))
    return (
        invariance
        + variance_weight * (variance(za) + variance(zb))
        + covariance_weight * (covariance(za) + covariance(zb))
    )


def nt_xent(za, zb, temperature: float = 0.2):
    """SimCLR's normalised-temperature cross-entropy: each view must pick its partner among the
    2N - 1 other projections of the batch."""
    n = tf.shape(za)[0]
    z = tf.math.l2_normalize(tf.concat([za, zb], axis=0), axis=1)
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits -= 1e9 * tf.eye(2 * n)  # never match a projection with itself
    partner = tf.concat([tf.range(n, 2 * n), tf.range(n)], axis=0)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=partner, logits=logits)
    )


def rounded_accuracy(y_true, y_pred):
    """Binary accuracy of the rounded target against the rounded output (the reference metric)."""
    ops = keras.ops
    return ops.mean(ops.cast(ops.equal(ops.round(y_true), ops.round(y_pred)), "float32"))


class SelfSupervisedAutoencoder(keras.Model):
    """Trains `encoder` and `decoder` on the batches of `training.data.dataset` (dicts with
    "image", "target" and, with an invariance term, "view")."""

    def __init__(
        self,
        encoder: keras.Model,
        decoder: keras.Model,
        invariance_weight: float | InvarianceSchedule = 0.0,
        invariance_loss: str = "vicreg",
        ssim_weight: float = 0.0,
        projector_dim: int = 512,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if invariance_loss not in INVARIANCE_LOSSES:
            raise ValueError(
                f"invariance loss {invariance_loss!r}: choose from {INVARIANCE_LOSSES}"
            )
        self.encoder, self.decoder = encoder, decoder
        self.invariance_weight, self.ssim_weight = invariance_weight, ssim_weight
        self.invariance_loss = vicreg if invariance_loss == "vicreg" else nt_xent
        self.projector = (
            projector(encoder.output_shape[-1], projector_dim) if invariance_weight else None
        )
        names = ["loss", "rounded_accuracy"]
        if invariance_weight or ssim_weight:
            names.append("mse")
        if ssim_weight:
            names.append("ssim")
        if invariance_weight:
            names.append("invariance")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.built = True  # its parts are functional models with their weights already made

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        image = inputs["image"] if isinstance(inputs, dict) else inputs
        return self.decoder(self.encoder(image, training=training), training=training)

    def current_invariance_weight(self):
        """The invariance term's weight at this optimizer step (a schedule's current value)."""
        if isinstance(self.invariance_weight, InvarianceSchedule):
            return self.invariance_weight(self.optimizer.iterations)
        return self.invariance_weight

    def terms(self, batch, training: bool) -> dict:
        """Each term of the loss on one batch, and their weighted sum as "loss"."""
        latent = self.encoder(batch["image"], training=training)
        reconstruction = self.decoder(latent, training=training)
        target = batch["target"]
        mse = tf.reduce_mean(tf.square(target - reconstruction))
        out = {
            "mse": mse,
            "loss": mse,
            "rounded_accuracy": rounded_accuracy(target, reconstruction),
        }
        if training and self.ssim_weight:
            out["ssim"] = 1.0 - tf.reduce_mean(tf.image.ssim(target, reconstruction, max_val=1.0))
            out["loss"] += self.ssim_weight * out["ssim"]
        if training and self.projector is not None:
            za = self.projector(latent, training=True)
            zb = self.projector(self.encoder(batch["view"], training=True), training=True)
            out["invariance"] = self.invariance_loss(za, zb)
            out["loss"] += self.current_invariance_weight() * out["invariance"]
        return out

    def _logs(self, terms: dict) -> dict:
        for name, tracker in self.trackers.items():
            if name in terms:
                tracker.update_state(terms[name])
        return {name: self.trackers[name].result() for name in self.trackers if name in terms}

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            terms = self.terms(batch, training=True)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(terms["loss"], variables), variables)
        return self._logs(terms)

    def test_step(self, batch):
        terms = self.terms(batch, training=False)
        return self._logs({"loss": terms["mse"], "rounded_accuracy": terms["rounded_accuracy"]})
