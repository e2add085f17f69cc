"""Shared fixtures: real scene images committed under tests/fixtures, and odd variants of them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SCENES = FIXTURES / "scenes"
REPO = Path(__file__).parent.parent
DEFAULT_MODEL_DIR = REPO / "models"


@pytest.fixture(scope="session")
def scene_paths() -> list[Path]:
    return sorted(SCENES.glob("*/*.jpg"))


@pytest.fixture(scope="session")
def scene_bytes(scene_paths) -> list[bytes]:
    return [p.read_bytes() for p in scene_paths]


@pytest.fixture(scope="session")
def odd_images(scene_paths) -> dict[str, bytes]:
    """The same real photo in awkward encodings: grayscale, alpha, 16-bit, palette-free BMP..."""
    bgr = cv2.imread(str(scene_paths[0]), cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 128
    wide = cv2.resize(bgr, (300, 97), interpolation=cv2.INTER_AREA)

    def enc(ext: str, image: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(ext, image)
        assert ok
        return buf.tobytes()

    return {
        "gray_png": enc(".png", gray),
        "gray_jpg": enc(".jpg", gray),
        "rgba_png": enc(".png", bgra),
        "png16": enc(".png", bgr.astype(np.uint16) * 257),
        "bmp": enc(".bmp", bgr),
        "webp": enc(".webp", bgr),
        "tiff": enc(".tiff", bgr),
        "wide_jpg": enc(".jpg", wide),
        "tiny_png": enc(".png", bgr[:1, :1]),
    }
