"""Hostile input, overload, queue deadlines, shutdown and auth, over real HTTP.

Most cases go through the ASGI app in-process with its lifespan run (one app per module, so
the model loads once); body limits, memory and shutdown are also checked against a live
uvicorn on loopback. Every refused request must get the contract's JSON error body
(`{"error": {"code", "message"}}`) with a 4xx status (429 + Retry-After when busy), and
the server must keep answering afterwards.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from aecore.preprocessing import declared_pixels, decode_rgb
from tests.live import live_server
from tests.service_client import (
    b64,
    batches_taken,
    metric,
    multipart,
    running,
    stalled_inference,
    wait_until,
)

# The async tests share one event loop, so the module's apps (and the model) load once.
module_loop = pytest.mark.asyncio(loop_scope="module")

NPY = "application/x-npy"
LIMIT = 4096 * 4096  # the default AE_MAX_IMAGE_PIXELS
PROTECTED = [  # (method, path) that need X-API-Key when AE_API_KEY is set
    ("POST", "/encode"),
    ("POST", "/decode"),
    ("POST", "/reconstruct"),
    ("POST", "/anomaly-score"),
    ("POST", "/interpolate"),
    ("GET", "/model"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client():
    async with running() as c:
        yield c


def assert_error(reply: httpx.Response, status: int, code: str | None = None) -> dict:
    """The contract's error body, with the expected status (and code)."""
    assert reply.status_code == status, reply.text[:300]
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if status in (429, 503):
        assert int(reply.headers["retry-after"]) >= 0
    return error


# ------------------------------------------------------------------ files, real and crafted


def encode(ext: str, image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def pil(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 50000, height: int = 50000, depth: int = 8) -> bytes:
    """A real IHDR and a little compressed data; decoded it would take 7.5 GB."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 200_000, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_bomb() -> bytes:
    data = bytearray(encode(".jpg", np.zeros((16, 16, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 50000, 50000)  # height, width
    return bytes(data)


def bmp_bomb(height: int = 50000) -> bytes:
    """24-bit BMP header; a negative height is a top-down BMP."""
    pixels = b"\0" * 1024
    return (
        struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 50000, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        + pixels
    )


def webp_vp8l_bomb() -> bytes:
    """Lossless WebP whose 14-bit sizes say 16384 x 16384 (the format's maximum)."""
    data = bytearray(
        encode(".webp", np.zeros((16, 16, 3), np.uint8), cv2.IMWRITE_WEBP_QUALITY, 101)
    )
    at = data.index(b"VP8L") + 9  # after the chunk header and the 0x2f signature
    bits = int.from_bytes(data[at : at + 4], "little") & ~((1 << 28) - 1)
    data[at : at + 4] = (bits | 16383 | (16383 << 14)).to_bytes(4, "little")
    return bytes(data)


def webp_vp8x_bomb() -> bytes:
    """Extended WebP whose canvas (24-bit sizes) says 50000 x 50000."""
    inner = encode(".webp", np.zeros((16, 16, 3), np.uint8), cv2.IMWRITE_WEBP_QUALITY, 101)[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + (49999).to_bytes(3, "little") * 2
    payload = b"WEBP" + vp8x + inner
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def tiff_bomb() -> bytes:
    tags = [(256, 4, 50000), (257, 4, 50000), (258, 3, 8), (259, 3, 1), (262, 3, 1),
            (273, 4, 8), (277, 3, 1), (278, 4, 50000), (279, 4, 1024)]  # fmt: skip
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + struct.pack("<I" if kind == 4 else "<HH", value, *([0] if kind == 3 else []))
        for tag, kind, value in tags
    )  # fmt: skip
    return b"II*\0" + struct.pack("<I", 8 + 1024) + b"\0" * 1024 + ifd + b"\0\0\0\0"


def gif_bomb(screen: tuple[int, int] = (50000, 50000)) -> bytes:
    """50000 > 32767: imagesize reads GIF sizes as signed 16-bit and gets a negative number."""
    frame = struct.pack("<HHHHB", 0, 0, *screen, 0)
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", *screen, 0x80, 0, 0)
        + b"\0\0\0\xff\xff\xff"
        + b","
        + frame
        + bytes([2, 2, 0x4C, 0x01, 0])
        + b";"
    )


def hdr_rle_bomb(size: int = 8000) -> bytes:
    """A real Radiance HDR, run-length encoded: 4 MB of file, 64 M float pixels (1.5 GB)."""
    runs = bytes([128 + 127, 128]) * (size // 127) + bytes([128 + size % 127, 128])
    line = bytes([2, 2, size >> 8, size & 255]) + runs * 4
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n" % (size, size) + line * size


def sun_raster_bomb() -> bytes:
    return struct.pack(">8I", 0x59A66A95, 50000, 50000, 24, 0, 2, 0, 0) + b"\0" * 1024


def j2k_bomb(jp2: bool) -> bytes:
    """A small real JPEG 2000 whose codestream (SIZ marker) is patched to 50000 x 50000.

    In the JP2 wrapper the `ihdr` box keeps saying 16 x 16: what OpenCV allocates follows
    the codestream, so that is what must be checked.
    """
    data = bytearray(pil(Image.new("RGB", (16, 16)), "JPEG2000", no_jp2=not jp2))
    siz = data.index(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", data, siz + 8, 50000, 50000)  # Xsiz, Ysiz
    return bytes(data)


BOMBS = {
    "png": png_bomb,
    "png_16bit": lambda: png_bomb(depth=16),
    "jpeg": jpeg_bomb,
    "bmp": bmp_bomb,
    "bmp_top_down": lambda: bmp_bomb(height=-50000),
    "webp_lossless": webp_vp8l_bomb,
    "webp_extended": webp_vp8x_bomb,
    "tiff": tiff_bomb,
    "gif": gif_bomb,
    "hdr_rle": hdr_rle_bomb,
    "sun_raster": sun_raster_bomb,
    "j2k_codestream": lambda: j2k_bomb(jp2=False),
    "jp2_small_ihdr": lambda: j2k_bomb(jp2=True),
}


@pytest.fixture(scope="module")
def photo(scene_bytes) -> bytes:
    return scene_bytes[0]


@pytest.fixture(scope="module")
def photo_png(photo) -> bytes:
    return encode(".png", cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR))


def corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


@pytest.fixture(scope="module")
def undecodable(photo, photo_png) -> dict[str, bytes]:
    sof = photo.index(b"\xff\xc0")
    return {
        "zero_bytes": b"",
        "jpeg_header_only": photo[:200],
        "jpeg_half": photo[: len(photo) // 2],
        "jpeg_without_end_marker": photo[:-2],
        "jpeg_frame_marker_destroyed": corrupt(photo, sof, b"\xff\x00"),
        "png_half": photo_png[: len(photo_png) // 2],
        "png_signature_only": photo_png[:8],
        "png_bad_header_crc": corrupt(photo_png, 29, b"\x00\x00\x00\x00"),
        "text_named_jpg": b"this is a text file, not a JPEG\n" * 20,
        "html": b"<!doctype html><html><body>hello</body></html>",
        "jpeg_magic_then_text": b"\xff\xd8\xff\xe0" + b"not really a jpeg " * 10,
        # OpenEXR is compiled in but disabled: its decoder raised cv2.error, a 500.
        "openexr": b"\x76\x2f\x31\x01\x02\x00\x00\x00" + b"channels\0chlist\0" + b"\0" * 64,
        "j2k_without_codestream": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\0" * 64,
    }


# ------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "kind",
    [
        "zero_bytes",
        "jpeg_header_only",
        "jpeg_half",
        "jpeg_without_end_marker",
        "jpeg_frame_marker_destroyed",
        "png_half",
        "png_signature_only",
        "png_bad_header_crc",
        "text_named_jpg",
        "html",
        "jpeg_magic_then_text",
        "openexr",
        "j2k_without_codestream",
    ],
)
@module_loop
async def test_undecodable_files_are_400_naming_the_image(client, undecodable, photo, kind):
    data = undecodable[kind]
    form = await client.post("/encode", files=multipart([photo, data]))
    as_json = await client.post("/reconstruct", json={"images": [b64(data)]})
    assert "images[1]" in assert_error(form, 400, "invalid_image")["message"]
    assert "images[0]" in assert_error(as_json, 400, "invalid_image")["message"]


@pytest.mark.parametrize("kind", sorted(BOMBS))
@module_loop
async def test_decompression_bombs_are_refused_from_the_header(client, kind):
    data = BOMBS[kind]()
    assert len(data) < 8192 or kind == "hdr_rle"  # a few KB (the HDR is a real 4 MB file)
    assert declared_pixels(data) > LIMIT
    reply = await client.post("/encode", files=multipart([data]))
    # "declares" is the header check; "has" would mean it was decoded first.
    assert "declares" in assert_error(reply, 413, "image_too_large")["message"]


@module_loop
async def test_a_bomb_among_good_images_fails_the_request_naming_it(client, photo):
    reply = await client.post("/anomaly-score", files=multipart([photo, photo, gif_bomb()]))
    assert "images[2]" in assert_error(reply, 413, "image_too_large")["message"]


def awkward_images(photo: bytes) -> dict[str, bytes]:
    bgr = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    return {
        "png_16bit_rgb": encode(".png", bgr.astype(np.uint16) * 257),
        "png_16bit_gray": encode(
            ".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
        ),
        "png_1x1": encode(".png", bgr[:1, :1]),
        "jpeg_1x1": encode(".jpg", bgr[:1, :1]),
        "jpeg_cmyk": pil(Image.open(io.BytesIO(photo)).convert("CMYK"), "JPEG"),
        "png_palette": pil(Image.open(io.BytesIO(photo)).convert("P"), "PNG"),
        "png_gray_alpha": pil(Image.open(io.BytesIO(photo)).convert("LA"), "PNG"),
        "tiff_float": pil(Image.open(io.BytesIO(photo)).convert("F"), "TIFF"),
        "jp2": pil(Image.open(io.BytesIO(photo)), "JPEG2000"),
        "bmp_top_down": top_down_bmp(encode(".bmp", bgr)),
        "tall_3x1000": encode(".png", cv2.resize(bgr, (3, 1000))),
    }


def top_down_bmp(bmp: bytes) -> bytes:
    """The same BMP stored top-down (negative height, rows reversed)."""
    (height,) = struct.unpack_from("<i", bmp, 22)
    offset = struct.unpack_from("<I", bmp, 10)[0]
    row = (len(bmp) - offset) // height
    rows = [bmp[offset + i * row : offset + (i + 1) * row] for i in range(height)]
    return bmp[:22] + struct.pack("<i", -height) + bmp[26:offset] + b"".join(reversed(rows))


@module_loop
async def test_awkward_but_valid_images_are_encoded(client, photo):
    images = awkward_images(photo)
    reply = await client.post("/encode", files=multipart(list(images.values())))
    assert reply.status_code == 200, reply.text[:300]
    latents = np.asarray(reply.json()["latents"], np.float32)
    assert latents.shape == (len(images), 1024) and np.isfinite(latents).all()


def test_cmyk_and_top_down_images_keep_their_colours(photo):
    images = awkward_images(photo)
    original = decode_rgb(photo).astype(int)
    assert np.abs(decode_rgb(images["jpeg_cmyk"]).astype(int) - original).mean() < 8
    np.testing.assert_array_equal(decode_rgb(images["bmp_top_down"]), original)


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), colour) for colour in ((230, 20, 20), (20, 20, 230))]


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("GIF", {"duration": 100, "loop": 0}),
        ("TIFF", {}),
        ("PNG", {}),  # APNG
        ("WEBP", {"lossless": True}),
    ],
)
@module_loop
async def test_multi_frame_files_give_their_first_frame(client, fmt, kwargs):
    first, second = frames()
    animated = pil(first, fmt, save_all=True, append_images=[second], **kwargs)
    assert Image.open(io.BytesIO(animated)).n_frames == 2
    reply = await client.post(
        "/encode", files=multipart([animated, pil(first, "PNG"), pil(second, "PNG")])
    )
    assert reply.status_code == 200, reply.text[:300]
    got, want, other = np.asarray(reply.json()["latents"], np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, other, atol=1e-3)


# ------------------------------------------------------------------ bodies and content types


JSON, MULTIPART = "application/json", "multipart/form-data"
# fmt: off
MALFORMED = [  # (path, Content-Type, body, status, code)
    ("/encode", None, b'{"images": []}', 415, "unsupported_media_type"),
    ("/encode", "text/plain", b'{"images": []}', 415, "unsupported_media_type"),
    ("/encode", "application/xml", b"<images/>", 415, "unsupported_media_type"),
    ("/encode", "image/jpeg", b"\xff\xd8\xff", 400, "invalid_image"),  # a raw body, truncated
    ("/encode", "image/png", b"", 422, "invalid_request"),
    ("/decode", "image/jpeg", b"\xff\xd8\xff", 415, "unsupported_media_type"),
    ("/encode", NPY, b"\x93NUMPY", 422, "invalid_tensor"),  # a .npy of images, broken
    ("/decode", f"{MULTIPART}; boundary=x", b"--x--", 422, "invalid_latents"),
    ("/encode", MULTIPART, b"no boundary", 400, None),
    ("/encode", f"{MULTIPART}; boundary=b", b"--b\r\nbad", 422, "invalid_request"),
    ("/reconstruct", JSON, b"", 400, "invalid_json"),
    ("/reconstruct", JSON, b"\xff\xfe{", 400, "invalid_json"),
    ("/reconstruct", JSON, b"[" * 100_000, 400, "invalid_json"),
    ("/decode", JSON, b'{"latents": [[NaN]]}', 400, "invalid_json"),
    ("/decode", JSON, b'{"latents": [[1e999]]}', 400, "invalid_json"),
]
# fmt: on


@pytest.mark.parametrize(
    ("path", "content_type", "content", "status", "code"),
    MALFORMED,
    ids=[f"{i}-{row[0]}-{row[3]}" for i, row in enumerate(MALFORMED)],
)
@module_loop
async def test_wrong_content_types_and_malformed_bodies(
    client, path, content_type, content, status, code
):
    headers = {} if content_type is None else {"Content-Type": content_type}
    assert_error(await client.post(path, content=content, headers=headers), status, code)


@module_loop
async def test_media_type_parameters_and_case_are_accepted(client, photo):
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        reply = await client.post(
            "/encode",
            content=b'{"images": ["%s"]}' % b64(photo).encode(),
            headers={"Content-Type": content_type},
        )
        assert reply.status_code == 200, (content_type, reply.text[:200])


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ([], 422, "invalid_request"),
        ("images", 422, "invalid_request"),
        (42, 422, "invalid_request"),
        (None, 422, "invalid_request"),
        ({"images": "not a list"}, 422, "invalid_request"),
        ({"images": {"0": "abc"}}, 422, "invalid_request"),
        ({"images": [1, 2]}, 422, "invalid_request"),
        ({"images": []}, 422, "invalid_request"),
        ({"images": ["%%%"]}, 400, "invalid_base64"),
        ({"images": ["abc"]}, 400, "invalid_base64"),  # bad padding
        ({"images": ["ümlaut"]}, 400, "invalid_base64"),
        ({"images": ["data:image/png;base64,@@@@"]}, 400, "invalid_base64"),
        ({"images": ["QUJD\nREVG"]}, 400, "invalid_base64"),
    ],
)
@module_loop
async def test_json_that_is_not_an_image_request(client, payload, status, code):
    body = json.dumps(payload, ensure_ascii=False).encode()
    reply = await client.post("/encode", content=body, headers={"Content-Type": "application/json"})
    assert_error(reply, status, code)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring `shape` float32, with 64 bytes of data."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % str(shape).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64


BAD_LATENTS = {  # name: (JSON body or .npy bytes, status, code)
    "1023_values": ({"latents": [[0.0] * 1023]}, 422, "invalid_latents"),
    "1025_values": ({"latents": [[0.0] * 1025]}, 422, "invalid_latents"),
    "flat_1025": ({"latents": [0.0] * 1024 + [1.0]}, 422, "invalid_latents"),
    "beyond_float32": ({"latents": [[1e39] * 1024]}, 422, "invalid_latents"),
    "beyond_float32_negative": ({"latents": [[-1e39] + [0.0] * 1023]}, 422, "invalid_latents"),
    "strings": ({"latents": [["0.5"] * 1024]}, 422, "invalid_latents"),
    "a_string": ({"latents": "0.5, 0.5"}, 422, "invalid_latents"),
    "an_object": ({"latents": {"0": [0.0] * 1024}}, 422, "invalid_latents"),
    "nulls": ({"latents": [[None] * 1024]}, 422, "invalid_latents"),
    "3d": ({"latents": [[[0.0] * 1024]]}, 422, "invalid_latents"),
    "empty": ({"latents": []}, 422, "invalid_latents"),
    "65_latents": ({"latents": [[0.0] * 1024] * 65}, 413, "too_many_images"),
    "npy_inf": (npy_bytes(np.full((1, 1024), np.inf, np.float32)), 422, "invalid_latents"),
    "npy_nan": (npy_bytes(np.full((1, 1024), np.nan, np.float64)), 422, "invalid_latents"),
    "npy_no_rows": (npy_bytes(np.zeros((0, 1024), np.float32)), 422, "invalid_latents"),
    "npy_complex": (npy_bytes(np.zeros((1, 1024), np.complex64)), 422, "invalid_latents"),
    "npy_strings": (npy_bytes(np.array([["x"] * 1024])), 422, "invalid_latents"),
    "npy_objects": (
        npy_bytes(np.array([[object()] * 1024], dtype=object)),
        422,
        "invalid_latents",
    ),
    "npy_truncated": (npy_bytes(np.zeros((1, 1024), np.float32))[:-10], 422, "invalid_latents"),
    # A 128-byte body declaring 4 TB (was a MemoryError, a 500) or 16 GB of floats.
    "npy_declares_4tb": (npy_header_only((10**12,)), 422, "invalid_latents"),
    "npy_declares_16gb": (npy_header_only((4_000_000, 1024)), 422, "invalid_latents"),
}


@pytest.mark.parametrize(
    ("body", "status", "code"), list(BAD_LATENTS.values()), ids=list(BAD_LATENTS)
)
@module_loop
async def test_bad_latents(client, body, status, code):
    if isinstance(body, bytes):
        reply = await client.post("/decode", content=body, headers={"Content-Type": NPY})
    else:
        reply = await client.post("/decode", json=body)
    assert_error(reply, status, code)


LATENT_PAIR = [[0.0] * 1024, [0.5] * 1024]


@pytest.mark.parametrize(
    "params",
    [
        {"steps": -1},
        {"steps": -(2**63)},
        {"steps": 2**63 - 1},
        {"steps": 1.5},
        {"steps": True},
        {"steps": None, "weights": None},
        {"steps": [3]},
        {"weights": [0.6, 0.6]},
        {"weights": [2.0, -1.0]},
        {"weights": [-0.0, 1.0, 0.0]},  # one weight per input
        {"weights": [1e308, 1e308]},
        {"weights": ["0.5", "0.5"]},
        {"weights": [True, False]},
        {"weights": []},
        {"weights": "0.5,0.5"},
        {"steps": 2, "weights": [0.5, 0.5]},
    ],
)
@module_loop
async def test_bad_interpolation_parameters(client, params):
    reply = await client.post("/interpolate", json={"latents": LATENT_PAIR, **params})
    assert_error(reply, 422, "invalid_parameter")


@pytest.mark.parametrize(
    "fields",
    [
        {"steps": "abc"},
        {"steps": "-3"},
        {"steps": "1.5"},
        {"steps": ""},
        {"steps": "99999999999999999999999"},
        {"weights": "nan,1"},
        {"weights": "inf,0"},
        {"weights": "a,b"},
        {"weights": "[1e999, 0]"},
        {"weights": "[0.5, 0.5"},
        {"weights": ""},
    ],
)
@module_loop
async def test_bad_form_interpolation_parameters(client, photo, fields):
    reply = await client.post("/interpolate", files=multipart([photo, photo]), data=fields)
    assert_error(reply, 422, "invalid_parameter")


@module_loop
async def test_a_form_step_count_in_superscript_digits(photo):
    async with running() as c:  # its own app: the 500 must not count against the others
        reply = await c.post("/interpolate", files=multipart([photo, photo]), data={"steps": "²"})
    assert_error(reply, 422, "invalid_parameter")


@pytest.mark.parametrize("count", [65, 200])
@module_loop
async def test_too_many_images_is_413_before_decoding(client, count):
    # Not images at all: the count is refused before anything is decoded.
    form = await client.post("/encode", files=multipart([b"not an image"] * count))
    as_json = await client.post("/encode", json={"images": [b64(b"x")] * count})
    assert_error(form, 413, "too_many_images")
    assert_error(as_json, 413, "too_many_images")


@module_loop
async def test_oversized_bodies_are_413(photo):
    async with running(max_body_bytes=100_000) as c:
        declared = await c.post("/encode", files=multipart([photo] * 20))

        async def trickle():
            for _ in range(30):
                yield b"[" + b" " * 9_999

        chunked = await c.post(
            "/encode", content=trickle(), headers={"Content-Type": "application/json"}
        )
        after = await c.post("/encode", files=multipart([photo]))
    assert_error(declared, 413, "payload_too_large")
    assert_error(chunked, 413, "payload_too_large")
    assert after.status_code == 200


@module_loop
async def test_the_service_still_works_after_all_that(client, photo):
    # Runs after the cases above on the same app (and on its own, after these two).
    assert_error(await client.post("/encode", files=multipart([png_bomb()])), 413)
    assert_error(await client.post("/encode", files=multipart([b"junk"])), 400)
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    reply = await client.post("/reconstruct", files=multipart([photo]))
    assert reply.status_code == 200 and len(reply.json()["images"]) == 1
    text = (await client.get("/metrics")).text
    assert metric(text, "ae_requests_total", endpoint="/encode", status="413") > 0
    server_errors = [
        line for line in text.splitlines()
        if line.startswith("ae_requests_total{") and 'status="5' in line
        and float(line.rsplit(" ", 1)[1]) > 0
    ]  # fmt: skip
    assert server_errors == []


# ------------------------------------------------------------------ auth

KEY = "s3cret-key-0123456789"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def authed():
    async with running(api_key=KEY) as c:
        yield c


WRONG_KEYS = {
    "missing": None,
    "empty": b"",
    "one_byte": b"s",
    "one_byte_longer": KEY.encode() + b"x",
    "one_byte_shorter": KEY.encode()[:-1],
    "same_length_last_byte_wrong": KEY.encode()[:-1] + b"X",
    "upper_case": KEY.upper().encode(),
    "trailing_nul": KEY.encode() + b"\0",
    "non_ascii_utf8": "s3cret-kéy-0123456789".encode(),
    "non_ascii_latin1": "s3cret-kéy-0123456789".encode("latin-1"),
    "64_bytes_0xff": b"\xff" * 64,
    "bearer_prefix": b"Bearer " + KEY.encode(),
}


@pytest.mark.parametrize("sent", list(WRONG_KEYS.values()), ids=list(WRONG_KEYS))
@pytest.mark.parametrize(("method", "path"), PROTECTED)
@module_loop
async def test_wrong_api_keys_are_401_everywhere(authed, photo, method, path, sent):
    headers = {} if sent is None else {"X-API-Key": sent}
    if method == "GET":
        reply = await authed.get(path, headers=headers)
    else:  # a body that would fail later (a bomb): the key is checked first
        reply = await authed.post(path, files=multipart([photo, gif_bomb()]), headers=headers)
    assert_error(reply, 401, "unauthorized")


@module_loop
async def test_the_right_key_passes_and_probes_stay_open(authed, photo):
    for name in ("X-API-Key", "x-api-key", "X-API-KEY"):
        assert (await authed.get("/model", headers={name: KEY})).status_code == 200
    reply = await authed.post("/encode", files=multipart([photo]), headers={"X-API-Key": KEY})
    assert reply.status_code == 200
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert (await authed.get(probe)).status_code == 200, probe


@module_loop
async def test_protected_metrics_need_the_key():
    async with running(api_key=KEY, protect_metrics=True) as c:
        assert_error(await c.get("/metrics", headers={"X-API-Key": "nope"}), 401, "unauthorized")
        assert (await c.get("/metrics", headers={"X-API-Key": KEY})).status_code == 200
        assert (await c.get("/healthz")).status_code == 200


@module_loop
async def test_a_non_ascii_key_sent_as_utf8_is_accepted():
    key = "clé-ü-0123"
    async with running(api_key=key) as c:
        reply = await c.get("/model", headers={"X-API-Key": key.encode()})
    assert reply.status_code == 200


# ------------------------------------------------------------------ overload, deadlines, shutdown


@module_loop
async def test_a_request_waiting_past_the_queue_deadline_is_429(photo):
    async with running(queue_timeout_s=0.5, retry_after_s=2) as c:
        plane = c.app.state.plane
        with stalled_inference(plane):
            reply = await c.post("/encode", files=multipart([photo]))
        error = assert_error(reply, 429, "queue_timeout")
        assert "0.5" in error["message"] and reply.headers["retry-after"] == "2"
        # Nothing is stuck: the next request runs, the queue is empty.
        after = await c.post("/encode", files=multipart([photo]))
        text = (await c.get("/metrics")).text
        depth = plane.repository.resolve(None, None).batchers["encoder"].depth
    assert after.status_code == 200
    assert depth == 0
    assert metric(text, "ae_queue_depth", part="encoder") == 0


@module_loop
async def test_a_full_queue_answers_429_and_accepted_requests_complete(scene_bytes):
    blobs = scene_bytes[:6]
    async with running(max_queue_size=4, max_batch_size=4) as c:
        plane = c.app.state.plane
        expected = np.concatenate([
            (await c.post("/encode", files=multipart(part))).json()["latents"]
            for part in (blobs[:3], blobs[3:])
        ]).astype(np.float32)  # fmt: skip
        taken = batches_taken(plane)
        with stalled_inference(plane):
            first = asyncio.create_task(c.post("/encode", files=multipart(blobs[:1])))
            # The worker took the first request (and is stuck on it); three images queue up.
            await wait_until(lambda: batches_taken(plane) > taken, "the first request taken")
            second = asyncio.create_task(c.post("/encode", files=multipart(blobs[1:4])))
            await wait_until(
                lambda: plane.repository.resolve(None, None).batchers["encoder"].depth == 3,
                "three images queued",
            )
            refused = await c.post("/encode", files=multipart(blobs[4:6]))  # 3 + 2 > 4
            # Refused before decoding: two files that are no images get the 429, not a 400.
            undecoded = await c.post("/encode", files=multipart([b"not an image"] * 2))
            ready = await c.get("/readyz")
        replies = [await first, await second]
        after = await c.post("/encode", files=multipart(blobs[4:6]))
    assert "3 images waiting" in assert_error(refused, 429, "queue_full")["message"]
    assert "3 images waiting" in assert_error(undecoded, 429, "queue_full")["message"]
    assert ready.status_code == 200  # a full queue is back-pressure, not unreadiness
    assert [r.status_code for r in replies] == [200, 200]
    got = np.concatenate([r.json()["latents"] for r in replies]).astype(np.float32)
    np.testing.assert_allclose(got, expected[:4], atol=1e-5)  # each got its own rows
    assert after.status_code == 200


@module_loop
async def test_requests_beyond_the_in_flight_bound_are_429_before_decoding(photo):
    # Requests in flight are bounded by AE_MAX_QUEUE_SIZE too: under overload the work before
    # the queue (parsing bodies, decoding images) would otherwise pile up without limit.
    async with running(max_queue_size=2, retry_after_s=3) as c:
        plane = c.app.state.plane
        with stalled_inference(plane):
            first = asyncio.create_task(c.post("/encode", files=multipart([photo])))
            await wait_until(lambda: batches_taken(plane) > 0, "the first request taken")
            second = asyncio.create_task(c.post("/encode", files=multipart([photo])))
            await wait_until(
                lambda: plane.repository.resolve(None, None).batchers["encoder"].depth == 1,
                "the second request queued",
            )
            # Not an image: admitted, it would be a 400; refused, it is never decoded.
            refused = await c.post("/encode", files=multipart([b"not an image"]))
            probes = [await c.get(p) for p in ("/healthz", "/readyz", "/metrics")]
        replies = [await first, await second]
        after = [await c.post("/encode", files=multipart([photo])) for _ in range(3)]
    assert_error(refused, 429, "overloaded")
    assert refused.headers["retry-after"] == "3"
    assert [p.status_code for p in probes] == [200, 200, 200]  # probes are not counted
    assert [r.status_code for r in replies + after] == [200] * 5  # the places are given back


@module_loop
async def test_a_slow_upload_holds_no_in_flight_place(photo):
    body = b'{"images": ["%s"]}' % b64(photo).encode()
    reading, go_on = asyncio.Event(), asyncio.Event()

    async def trickle():
        yield body[:100]
        reading.set()  # the app has taken the first part and waits for more
        await go_on.wait()  # the rest arrives only once the other request has been answered
        yield body[100:]

    async with running(max_queue_size=1) as c:
        slow = asyncio.create_task(
            c.post("/encode", content=trickle(), headers={"Content-Type": "application/json"})
        )
        await reading.wait()
        other = await c.post("/encode", files=multipart([photo]))
        go_on.set()
        slow_reply = await slow
    assert other.status_code == 200, other.text[:200]
    assert slow_reply.status_code == 200


@module_loop
async def test_sigterm_turns_readiness_off_at_once_and_in_flight_requests_complete(photo):
    calls = []

    def server_handler(signum, frame):  # stands in for uvicorn's, which the app chains
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, server_handler)
    try:
        async with running() as c:
            plane = c.app.state.plane
            assert signal.getsignal(signal.SIGTERM) is not server_handler  # chained
            with stalled_inference(plane):
                in_flight = asyncio.create_task(c.post("/encode", files=multipart([photo])))
                await wait_until(lambda: batches_taken(plane) > 0, "the request in flight")
                signal.raise_signal(signal.SIGTERM)
                ready = await c.get("/readyz")
                refused = await c.post("/encode", files=multipart([photo]))
                alive = await c.get("/healthz")
            done = await in_flight
        after_shutdown = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [signal.SIGTERM]  # the server's handler still ran
    assert_error(ready, 503, "not_ready")
    assert_error(refused, 503, "not_ready")
    assert alive.status_code == 200
    assert done.status_code == 200 and len(done.json()["latents"]) == 1
    assert after_shutdown is server_handler  # the lifespan put it back


# ------------------------------------------------------------------ a live uvicorn


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_exchange(base: str, head: bytes, chunks, pause_s: float = 0.0) -> tuple[bytes, int]:
    """Send a request head, then body chunks (stopping once the server answers); return the
    raw response and how many body bytes were sent."""
    host, port = base.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], pause_s)[0]:
                break  # the server has answered already
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            response += part
    return response, sent


@pytest.fixture(scope="module")
def live():
    with live_server({"AE_MAX_BODY_BYTES": str(1024 * 1024)}) as server:
        yield server.base, server.proc


def test_live_body_over_the_limit_is_413_when_declared_slow_or_chunked(live, photo):
    base, proc = live
    declared, _ = raw_exchange(
        base,
        b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\nConnection: close\r\n\r\n",
        [],
    )
    piece = b" " * 16384
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    chunked, sent = raw_exchange(
        base,
        b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        [chunk] * 256,  # 4 MB offered, slowly; the limit is 1 MB
        pause_s=0.002,
    )
    for response in (declared, chunked):
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b'"code":"payload_too_large"' in response
    assert sent < 2 * 1024 * 1024  # refused while it was still arriving, not after
    assert httpx.get(f"{base}/healthz").status_code == 200
    reply = httpx.post(f"{base}/encode", files=multipart([photo]), timeout=60)
    assert reply.status_code == 200 and proc.poll() is None


def test_live_memory_stays_flat_under_hostile_input(live, photo):
    base, proc = live
    bombs = [build() for name, build in sorted(BOMBS.items()) if name != "hdr_rle"]
    garbage = os.urandom(900_000)  # big enough that a leaked body per request would show

    def round_(http: httpx.Client) -> None:
        statuses = [
            http.post("/encode", files=multipart([b])).status_code for b in [*bombs, garbage]
        ]
        statuses.append(http.post("/decode", content=npy_header_only((10**12,)),
                                  headers={"Content-Type": NPY}).status_code)  # fmt: skip
        statuses.append(http.post("/encode", files=multipart([photo] * 65)).status_code)
        statuses.append(http.post("/encode", files=multipart([photo] * 8)).status_code)
        assert all(s < 500 for s in statuses), statuses

    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(proc.pid))
            stop.wait(0.005)

    with httpx.Client(base_url=base, timeout=60) as http:
        round_(http)  # warm-up: arenas, thread pools, first-use allocations
        baseline = rss_mb(proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for _ in range(8):
                round_(http)
            # A real 4 MB RLE file that decodes to 1.5 GB: refused from its header.
            bomb = http.post("/encode", files=multipart([hdr_rle_bomb()]))
            for _ in range(2):
                round_(http)
        finally:
            stop.set()
            sampler.join()
        final = rss_mb(proc.pid)
    assert bomb.status_code == 413
    peak = max(samples)
    assert peak - baseline < 300, (baseline, peak, final)  # the HDR alone would add 1.5 GB
    assert final - baseline < 100, (baseline, peak, final)  # ~300 requests; a 1 MB leak each
    assert proc.poll() is None


def test_live_sigterm_drains_in_flight_requests_and_refuses_new_ones(photo):
    # The batcher waits up to 4 s for more rows, so one request is in flight for ~4 s.
    with live_server({"AE_MAX_QUEUE_DELAY_MS": "4000"}) as server:
        base, proc = server.base, server.proc
        result: dict = {}

        def call() -> None:
            result["reply"] = httpx.post(f"{base}/encode", files=multipart([photo]), timeout=60)

        worker = threading.Thread(target=call)
        worker.start()
        deadline = time.monotonic() + 20
        while metric(httpx.get(f"{base}/metrics").text, "ae_queue_depth", part="encoder") < 1:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        refused_while_in_flight = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
            except (httpx.ConnectError, httpx.ReadError):  # refused, or reset as it closes
                refused_while_in_flight = worker.is_alive()
                break
            time.sleep(0.02)
        worker.join(timeout=60)
        code = proc.wait(timeout=60)
        log = server.output()
    assert refused_while_in_flight, "new connections were not refused while draining"
    reply = result["reply"]
    assert reply.status_code == 200 and len(reply.json()["latents"]) == 1
    assert code in (0, -signal.SIGTERM), log[-2000:]
    assert "Finished server process" in log and "Traceback" not in log
