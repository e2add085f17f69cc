"""Which files of an image folder are images, and which class each belongs to.

The one rule for training (local folders) and the batch job (any pyarrow filesystem): the
caller lists the folder recursively, this module decides. `<root>/<class>/**` when the root has
class folders holding images (hidden folders are not classes), else the images directly in it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def class_layout(relative_files: list[str]) -> tuple[list[str], list[str] | None]:
    """(image files, class of each or None for a flat folder), in a stable order.

    `relative_files` are every file under the root, as POSIX paths relative to it. Files are
    ordered by their path components, so each class's files are together and classes sorted.
    """
    paths = sorted(
        (PurePosixPath(f) for f in relative_files if is_image_name(f)), key=lambda p: p.parts
    )
    classed = [p for p in paths if len(p.parts) > 1 and not p.parts[0].startswith(".")]
    if classed:
        return [str(p) for p in classed], [p.parts[0] for p in classed]
    return [str(p) for p in paths if len(p.parts) == 1], None
