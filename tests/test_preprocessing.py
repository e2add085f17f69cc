"""The shared preprocessing on real and awkward images (contract §2)."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest

from aecore.preprocessing import (
    ImageDecodeError,
    ImageSpec,
    ImageTooLargeError,
    declared_pixels,
    decode_rgb,
    encode_png,
    load_image,
    to_uint8,
)

SPEC = ImageSpec()


def test_real_jpeg_matches_the_contract_recipe(scene_paths):
    data = scene_paths[0].read_bytes()
    expected = (
        cv2.resize(
            cv2.cvtColor(cv2.imread(str(scene_paths[0])), cv2.COLOR_BGR2RGB),
            (128, 128),
            interpolation=cv2.INTER_AREA,
        ).astype(np.float32)
        / 255.0
    )
    got = load_image(data, SPEC)
    assert got.dtype == np.float32 and got.shape == (128, 128, 3)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "kind",
    ["gray_png", "gray_jpg", "rgba_png", "png16", "bmp", "webp", "tiff", "wide_jpg", "tiny_png"],
)
def test_odd_images_become_rgb_floats_in_range(odd_images, kind):
    x = load_image(odd_images[kind], SPEC)
    assert x.shape == (128, 128, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_grayscale_gives_equal_channels(odd_images):
    x = load_image(odd_images["gray_png"], SPEC)
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    np.testing.assert_array_equal(x[..., 1], x[..., 2])


def test_alpha_is_dropped_not_blended(odd_images, scene_paths):
    # The RGBA variant carries the same colour channels as the original photo.
    from_rgba = decode_rgb(odd_images["rgba_png"])
    original = cv2.cvtColor(cv2.imread(str(scene_paths[0])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(from_rgba, original)


def test_sixteen_bit_maps_to_eight_bit(odd_images, scene_paths):
    original = cv2.cvtColor(cv2.imread(str(scene_paths[0])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decode_rgb(odd_images["png16"]), original)


@pytest.mark.parametrize("data", [b"", b"this is a text file", b"\xff\xd8\xff\xe0" + b"\0" * 40])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_rgb(data)


def test_truncated_jpeg_is_refused_or_decoded_but_never_crashes(scene_bytes):
    try:
        x = load_image(scene_bytes[0][:200], SPEC)
    except ImageDecodeError:
        return
    assert x.shape == (128, 128, 3)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # A 50000x50000 PNG header: only the IHDR is real, the data would never fit in memory.
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    png = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )
    assert declared_pixels(png) == 50000 * 50000
    with pytest.raises(ImageTooLargeError):
        decode_rgb(png, max_pixels=4096 * 4096)


def test_png_round_trip_is_exact_for_uint8_values():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    back = decode_rgb(encode_png(img.astype(np.float32) / 255.0))
    np.testing.assert_array_equal(back, img)
    np.testing.assert_array_equal(to_uint8(np.array([-0.2, 0.5, 1.3])), [0, 128, 255])


def test_preprocessing_does_not_import_tensorflow_or_onnxruntime():
    import subprocess

    code = "import sys, aecore.preprocessing; sys.exit(('tensorflow' in sys.modules) + ('onnxruntime' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_swapping_colours_after_the_resize_changes_no_pixel(scene_bytes, odd_images):
    """The pipeline swaps BGR to RGB on the small image; the result is the full-resolution
    swap's, bit for bit, for every kind of input (and into a batch slot the same)."""
    from aecore.preprocessing import load_image, load_rgb8, resize_rgb, to_float

    spec = ImageSpec()
    batch = np.zeros((2, *spec.shape), np.float32)
    for data in [*scene_bytes[:6], *odd_images.values()]:
        reference = resize_rgb(decode_rgb(data), spec)
        np.testing.assert_array_equal(load_rgb8(data, spec), reference)
        load_image(data, spec, out=batch[1])
        np.testing.assert_array_equal(batch[1], reference.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(to_float(reference), batch[1])
