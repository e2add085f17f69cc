"""The one preprocessing implementation, shared by training and serving.

Bytes -> RGB uint8 (any OpenCV format, grayscale/alpha/16-bit handled) -> resize with
INTER_AREA -> float32 in [0, 1]. Outputs go back the other way: x 255, round, clip, PNG.
Importing this module never pulls in TensorFlow or onnxruntime.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

import cv2  # OpenCV's own pixel guard is set in aecore/__init__.py, before any cv2 import
import imagesize
import numpy as np

# Keep OpenCV from oversubscribing cores that onnxruntime and the thread pool already use.
cv2.setNumThreads(1)

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


class ImageDecodeError(ValueError):
    """The bytes are not an image OpenCV can decode."""


class ImageTooLargeError(ValueError):
    """The image declares more pixels than allowed."""


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects; read from the manifest's `input` block."""

    height: int = 128
    width: int = 128
    channels: int = 3
    resize: str = "area"

    @classmethod
    def from_manifest(cls, input_block: dict) -> ImageSpec:
        return cls(
            height=int(input_block.get("height", 128)),
            width=int(input_block.get("width", 128)),
            channels=int(input_block.get("channels", 3)),
            resize=str(input_block.get("resize", "area")),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def manifest_block(self) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "layout": "NHWC",
            "dtype": "float32",
            "range": [0, 1],
            "color": "RGB",
            "resize": self.resize,
        }


def declared_pixels(data: bytes) -> int | None:
    """Pixel count from the file header, without decoding; None when the header is unknown.

    Raises ImageDecodeError for a format that can expand a few KB into gigabytes when its
    header cannot be read, so that such a file is never decoded blind.
    """
    size = _compressed_header(data)
    if size is None:
        try:
            size = imagesize.get(io.BytesIO(data))
        except Exception:  # imagesize raises assorted errors on garbage; the decoder will judge
            return None
    width, height = size
    if width is None or height is None or width < 0 or height < 0:
        return None
    return int(width) * int(height)


_J2K = b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream: SOC, then the SIZ marker with the size
_JP2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_HDR_SIZE = re.compile(rb"FORMAT=32-bit_rle_rgbe\n\n-Y\s*([-+]?\d+)\s*\+X\s*([-+]?\d+)")


def _compressed_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the compressed formats OpenCV decodes that imagesize misses or misreads.

    GIF (imagesize reads its sizes as signed 16-bit, so 50000 becomes negative), Sun raster,
    Radiance HDR, and JPEG 2000, where what OpenCV allocates follows the codestream's SIZ
    marker, not the `ihdr` box imagesize reads. None for every other format.
    """
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _unpack("<HH", data, 6)
    if data[:4] == b"\x59\xa6\x6a\x95":  # Sun raster
        return _unpack(">II", data, 4)
    if data[:4] == _J2K or data[:12] == _JP2:
        start = 0 if data[:4] == _J2K else _jp2_codestream(data)
        if start is None or data[start : start + 4] != _J2K:
            raise ImageDecodeError("JPEG 2000 file without a readable codestream header")
        x1, y1, x0, y0 = _unpack(">IIII", data, start + 8)
        return x1 - x0, y1 - y0
    if data[:2] == b"#?":  # Radiance HDR, as OpenCV's reader parses it: height first
        match = _HDR_SIZE.search(data, 0, 65536)
        if match is None:
            raise ImageDecodeError("Radiance HDR file without a readable size line")
        return int(match[2]), int(match[1])
    return None


def _unpack(layout: str, data: bytes, offset: int) -> tuple[int, ...]:
    try:
        return struct.unpack_from(layout, data, offset)
    except struct.error:
        raise ImageDecodeError("truncated image header") from None


def _jp2_codestream(data: bytes) -> int | None:
    """Offset of the codestream in a JP2 file: the payload of its top-level `jp2c` box."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1 and pos + 16 <= len(data):  # a 64-bit box length follows
            length, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        if kind == b"jp2c":
            return pos + header
        if length < header:  # 0 means "to the end of the file": only the codestream may
            return None
        pos += length
    return None


def decode_rgb(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array [H, W, 3] at full resolution.

    Refuses images above `max_pixels` from the header before decoding. Grayscale, alpha
    and 16-bit images are converted; multi-frame files give their first frame.
    """
    return cv2.cvtColor(_decode_bgr(data, max_pixels), cv2.COLOR_BGR2RGB)


def _decode_bgr(data: bytes, max_pixels: int | None) -> np.ndarray:
    """Image bytes -> BGR uint8 [H, W, 3], OpenCV's own order (no colour swap yet)."""
    if not data:
        raise ImageDecodeError("empty file")
    if max_pixels is not None:
        pixels = declared_pixels(data)
        if pixels is not None and pixels > max_pixels:
            raise ImageTooLargeError(f"image declares {pixels} pixels, the limit is {max_pixels}")
    buf = np.frombuffer(data, dtype=np.uint8)
    undecodable = "not an image OpenCV can decode (JPEG, PNG, BMP, WebP, TIFF, ...)"
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:  # some decoders (GIF, a disabled EXR) raise instead of failing
        if "CV_IO_MAX_IMAGE" in str(exc):  # OpenCV's own guard (OPENCV_IO_MAX_IMAGE_PIXELS)
            raise ImageTooLargeError("image is larger than OpenCV's decoding limit") from None
        raise ImageDecodeError(undecodable) from None
    if image is None or image.size == 0:
        raise ImageDecodeError(undecodable)
    if max_pixels is not None and image.shape[0] * image.shape[1] > max_pixels:
        raise ImageTooLargeError(
            f"image has {image.shape[0] * image.shape[1]} pixels, the limit is {max_pixels}"
        )
    return to_colour8(image)


def to_colour8(image: np.ndarray) -> np.ndarray:
    """A decoded array (grey, with alpha, 16-bit, or float in [0, 1]) -> uint8 with three
    channels in the order given (BGR from OpenCV, RGB from other loaders); alpha is dropped."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        # float TIFF/EXR and the like: assume [0, 1] and clip.
        image = np.clip(np.nan_to_num(image.astype(np.float32)) * 255.0 + 0.5, 0, 255)
        image = image.astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if channels == 3:
        return image
    raise ImageDecodeError(f"unsupported channel count {channels}")


def resize_rgb(rgb: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Resize an RGB (or BGR: channels are independent) uint8 image to the model's size."""
    if rgb.shape[:2] == (spec.height, spec.width):
        return rgb
    return cv2.resize(rgb, (spec.width, spec.height), interpolation=_INTERPOLATION[spec.resize])


def load_rgb8(data: bytes, spec: ImageSpec, max_pixels: int | None = None) -> np.ndarray:
    """Bytes -> RGB uint8 [H, W, 3] at the model's size: decode, resize, then swap the
    colours, on the small image rather than at full resolution (the resize treats channels
    independently, so the result is the same as swapping first)."""
    return cv2.cvtColor(resize_rgb(_decode_bgr(data, max_pixels), spec), cv2.COLOR_BGR2RGB)


def to_float(rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 -> float32 in [0, 1]; works on one image or a batch; `out` is written in place."""
    return np.divide(rgb, np.float32(255.0), out=out, dtype=np.float32)


def load_image(
    data: bytes, spec: ImageSpec, max_pixels: int | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Bytes -> float32 [H, W, 3] in [0, 1], exactly what the encoder expects (into `out`, a
    slot of a batch, when given)."""
    return to_float(load_rgb8(data, spec, max_pixels), out)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Decoder output in [0, 1] -> uint8, rounded and clipped (NaN, from latents far outside
    anything the encoder produces, becomes 0)."""
    return np.clip(np.rint(np.nan_to_num(image * 255.0)), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """An RGB image (float in [0, 1], or uint8) -> PNG bytes."""
    rgb = image if image.dtype == np.uint8 else to_uint8(image)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # only on an impossible shape; callers pass decoder outputs
        raise ValueError(f"cannot encode array of shape {rgb.shape} as PNG")
    return buf.tobytes()
