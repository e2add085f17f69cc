"""Random views of image batches for self-supervised training (tf.data, float32 in [0, 1]).

The images arrive decoded and resized once by `training.data` (`aecore.preprocessing`); these
functions only move, recolour or hide the pixels of those batches. Every draw is stateless and
seeded per batch, so a run is reproducible and each epoch still sees new views.
"""

from __future__ import annotations

import math

import tensorflow as tf


def _uniform(seed, shape, low=0.0, high=1.0):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def flip(x, seed):
    """Mirror each image left-right with probability 1/2."""
    mirrored = _uniform(seed, [tf.shape(x)[0], 1, 1, 1]) < 0.5
    return tf.where(mirrored, tf.reverse(x, axis=[2]), x)


def crop_flip(x, seed, min_area: float = 0.25, ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """A random resized crop (area fraction in [min_area, 1], aspect in `ratio`) per image,
    mirrored with probability 1/2, resized back to the batch's size (bilinear)."""
    s = tf.random.experimental.stateless_split(seed, 5)
    n = tf.shape(x)[0]
    area = _uniform(s[0], [n], min_area, 1.0)
    aspect = tf.exp(_uniform(s[1], [n], math.log(ratio[0]), math.log(ratio[1])))
    h = tf.minimum(tf.sqrt(area / aspect), 1.0)  # fractions of the height and width
    w = tf.minimum(tf.sqrt(area * aspect), 1.0)
    top = _uniform(s[2], [n]) * (1.0 - h)
    left = _uniform(s[3], [n]) * (1.0 - w)
    mirrored = _uniform(s[4], [n]) < 0.5  # a box whose x1 > x2 is sampled mirrored
    x1 = tf.where(mirrored, left + w, left)
    x2 = tf.where(mirrored, left, left + w)
    boxes = tf.stack([top, x1, top + h, x2], axis=1)
    size = (x.shape[1], x.shape[2])
    return tf.image.crop_and_resize(x, boxes, tf.range(n), size)


def colour_jitter(x, seed, strength: float = 0.4, p: float = 0.8, grey_p: float = 0.2):
    """SimCLR-style colour distortion without hue: with probability `p` scale brightness,
    contrast and saturation by factors in [1 - strength, 1 + strength]; then turn the image
    grey with probability `grey_p`."""
    s = tf.random.experimental.stateless_split(seed, 5)
    n = tf.shape(x)[0]

    def factor(seed):
        return _uniform(seed, [n, 1, 1, 1], 1.0 - strength, 1.0 + strength)

    y = x * factor(s[0])
    mean = tf.reduce_mean(y, axis=[1, 2, 3], keepdims=True)
    y = (y - mean) * factor(s[1]) + mean
    grey = tf.image.rgb_to_grayscale(y)
    y = (y - grey) * factor(s[2]) + grey
    y = tf.where(_uniform(s[3], [n, 1, 1, 1]) < p, y, x)
    grey = tf.broadcast_to(tf.image.rgb_to_grayscale(y), tf.shape(y))
    y = tf.where(_uniform(s[4], [n, 1, 1, 1]) < grey_p, grey, y)
    return tf.clip_by_value(y, 0.0, 1.0)


def strong_view(x, seed):
    """The second view for the invariance term: crop, mirror and colour distortion."""
    s = tf.random.experimental.stateless_split(seed, 2)
    return colour_jitter(crop_flip(x, s[0]), s[1])


def mask_patches(x, ratio: float, seed, patch: int = 16):
    """Zero a random `ratio` of the non-overlapping `patch` x `patch` squares of each image."""
    n, height, width = tf.shape(x)[0], x.shape[1], x.shape[2]
    keep = _uniform(seed, [n, height // patch, width // patch, 1]) >= ratio
    keep = tf.repeat(tf.repeat(tf.cast(keep, x.dtype), patch, axis=1), patch, axis=2)
    return x * keep
