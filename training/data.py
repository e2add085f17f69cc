"""Image folders -> uint8 arrays -> a tf.data pipeline.

Images are kept as uint8 [N, H, W, 3] (a quarter of float32) and converted per batch.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aecore.folders import IMAGE_SUFFIXES, class_layout
from aecore.preprocessing import ImageDecodeError, ImageSpec, load_rgb8

log = logging.getLogger(__name__)

FLAT_CLASS = "(all)"


class DataError(ValueError):
    """The data folder is missing, empty or unusable."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int [N], an index into `classes`
    classes: list[str]
    paths: list[str]  # relative to the data root
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(
            self.images[idx], self.labels[idx], self.classes, [self.paths[i] for i in idx]
        )

    @property
    def has_classes(self) -> bool:
        return self.classes != [FLAT_CLASS]


def discover(root: Path) -> tuple[list[Path], list[str], list[int]]:
    """Image files under `root`: `<root>/<class>/**` when there are class folders, else flat."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    listing = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    names, file_classes = class_layout(listing)
    if not names:
        raise DataError(
            f"no images under {root}: expected <root>/<class>/*.jpg or image files directly "
            f"in it ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    classes = sorted(set(file_classes)) if file_classes else [FLAT_CLASS]
    label_of = {c: i for i, c in enumerate(classes)}
    labels = [label_of[c] for c in file_classes] if file_classes else [0] * len(names)
    return [root / name for name in names], classes, labels


def _read(path: Path, spec: ImageSpec) -> np.ndarray | None:
    try:
        return load_rgb8(path.read_bytes(), spec)
    except (ImageDecodeError, OSError) as exc:
        log.warning("skipping unreadable image %s: %s", path, exc)
        return None


def load(
    root: Path, spec: ImageSpec, limit: int | None = None, seed: int = 42, workers: int = 4
) -> ImageSet:
    """Read every image under `root` (or a stratified `limit` of them) as uint8 at the model size."""
    files, classes, labels = discover(root)
    if limit is not None and limit < len(files):
        keep = stratified_split(np.asarray(labels), 1 - limit / len(files), seed)[0]
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 releases the GIL
        decoded = list(pool.map(lambda p: _read(p, spec), files))
    ok = [i for i, img in enumerate(decoded) if img is not None]
    skipped = [str(files[i]) for i, img in enumerate(decoded) if img is None]
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d", len(skipped), len(files))
    if not ok:
        raise DataError(f"none of the {len(files)} image files under {root} could be read")
    images = np.empty((len(ok), *spec.shape), np.uint8)
    for row, i in enumerate(ok):
        images[row] = decoded[i]
        decoded[i] = None  # free as we go so the set is not held twice
    return ImageSet(
        images=images,
        labels=np.asarray([labels[i] for i in ok], np.int64),
        classes=classes,
        paths=[str(files[i].relative_to(root)) for i in ok],
        skipped=skipped,
    )


def load_listed(root: Path, paths: list[str], classes: list[str], spec: ImageSpec) -> ImageSet:
    """The images a split file lists (paths relative to `root`, class = first folder)."""
    files = [Path(root) / p for p in paths]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} file(s) of the recorded split are gone, e.g. {missing[0]}; "
            "a model's validation images must be the ones it was trained beside"
        )
    flat = classes == [FLAT_CLASS]
    labels = [0 if flat else classes.index(Path(p).parts[0]) for p in paths]
    images = np.empty((len(files), *spec.shape), np.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:  # cv2 releases the GIL
        for row, image in enumerate(pool.map(lambda p: _read(p, spec), files)):
            if image is None:
                raise DataError(f"{files[row]} of the recorded split can no longer be read")
            images[row] = image
    return ImageSet(images, np.asarray(labels, np.int64), classes, list(paths))


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices, stratified by label where every class allows it."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    train, val = train_test_split(
        idx, test_size=val_fraction, random_state=seed, stratify=stratify, shuffle=True
    )
    return np.sort(train), np.sort(val)


def dataset(
    images: np.ndarray,
    batch_size: int,
    shuffle: bool,
    flip: bool = False,
    seed: int = 42,
    mask_ratio: float = 0.0,
    second_view: bool = False,
):
    """A tf.data pipeline of float32 batches built from the uint8 array, as dicts:

    "target": the image (mirrored at random with `flip`), what the decoder must give back;
    "image": the encoder's input, the target with `mask_ratio` of its 16x16 patches zeroed;
    "view": with `second_view`, another random view of the target (crop, mirror, colour).
    """
    import tensorflow as tf

    from training import augment

    ds = tf.data.Dataset.from_tensor_slices(images)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    # One seed pair per batch, new every epoch: the stateless augmentations draw from it.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def prepare(batch, pair):
        x = tf.cast(batch, tf.float32) / 255.0  # the same scaling as aecore.preprocessing.to_float
        s = tf.random.experimental.stateless_split(pair, 3)
        if flip:
            x = augment.flip(x, s[0])
        out = {"image": x, "target": x}
        if mask_ratio > 0:
            out["image"] = augment.mask_patches(x, mask_ratio, s[1])
        if second_view:
            out["view"] = augment.strong_view(x, s[2])
        return out

    ds = tf.data.Dataset.zip(ds, seeds).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
