"""Reading request bodies: images (multipart or JSON base64), latents (JSON or .npy), params.

Limits (image count, pixels) are checked before anything is decoded; the body-size limit is
enforced while the body streams in (see `service.limits`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from numpy.lib import format as npy_format
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from aecore.preprocessing import ImageDecodeError, ImageTooLargeError
from service import errors
from service.responses import NPY


@dataclass
class Parsed:
    """A request body: image bytes and/or latents, plus any other fields it carried."""

    images: list[bytes] | None
    latents: np.ndarray | None
    fields: dict[str, Any]
    form: bool = False  # multipart: other fields arrive as strings


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "").lower()


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidJson(f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise errors.InvalidRequest('the JSON body must be an object, e.g. {"images": [...]}')
    return payload


async def parse_body(request: Request, max_images: int, accept_latents: bool) -> Parsed:
    """Dispatch on Content-Type: multipart images, JSON images/latents, or a .npy latent array."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=32)
        except HTTPException as exc:  # starlette's 400 for a malformed or oversized form
            if str(exc.detail).startswith("Too many files"):
                raise errors.TooManyImages(
                    f"more than {max_images} images in one request; the limit is {max_images}"
                ) from None
            raise
        try:
            uploads = [v for v in form.getlist("images") if isinstance(v, UploadFile)]
            strings = [v for v in form.getlist("images") if isinstance(v, str)]
            if strings:
                raise errors.InvalidRequest(
                    "multipart `images` must be file fields (curl -F images=@a.jpg)"
                )
            _check_count(len(uploads), max_images)
            images = [await u.read() for u in uploads]
            fields = {k: v for k, v in form.items() if k != "images"}
        finally:
            await form.close()  # the spooled upload files, on every path
        return Parsed(images or None, None, fields, form=True)
    if kind == "application/json":
        payload = await read_json(request)
        images = payload.get("images")
        latents = payload.get("latents") if accept_latents else None
        if images is not None:
            if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
                raise errors.InvalidRequest("`images` must be a list of base64 strings")
            _check_count(len(images), max_images)
            images = [_b64(s, i) for i, s in enumerate(images)]
        rest = {k: v for k, v in payload.items() if k not in ("images", "latents")}
        return Parsed(images, None if latents is None else as_latents(latents), rest)
    if kind == NPY and accept_latents:
        return Parsed(None, _npy(await request.body()), {})
    accepted = "multipart/form-data or application/json"
    if accept_latents:
        accepted += f" or {NPY}"
    raise errors.UnsupportedMediaType(
        f"Content-Type {kind or '(none)'!r} is not supported; send {accepted}"
    )


def require_images(parsed: Parsed) -> list[bytes]:
    if not parsed.images:
        raise errors.InvalidRequest(
            'no images: send multipart file fields named `images` or JSON {"images": [base64...]}'
        )
    return parsed.images


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise errors.TooManyImages(f"{count} images in one request; the limit is {limit}")


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:") and "," in text:  # tolerate data URLs from browsers
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidBase64(f"images[{index}] is not valid base64") from None


def as_latents(value: Any) -> np.ndarray:
    """A JSON list of equal-length number lists -> float32 [N, D]; no strings, bools or NaN."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise errors.InvalidLatents(
            "latents must be a list of equal-length lists of numbers"
        ) from None
    if array.dtype.kind not in "iuf":
        raise errors.InvalidLatents(
            "latents must contain numbers only (no strings, bools or nulls)"
        )
    if array.ndim == 1:
        array = array[None, :]
    return validate_latents(array)


def validate_latents(array: np.ndarray, latent_dim: int | None = None) -> np.ndarray:
    if array.ndim != 2 or array.shape[0] == 0:
        raise errors.InvalidLatents(
            f"latents must be [N, latent_dim], got shape {list(array.shape)}"
        )
    if latent_dim is not None and array.shape[1] != latent_dim:
        raise errors.InvalidLatents(
            f"each latent must have {latent_dim} values, got {array.shape[1]}"
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
        array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise errors.InvalidLatents("latents contain NaN or Inf (or values beyond float32)")
    return array


_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def _npy(body: bytes) -> np.ndarray:
    buf = io.BytesIO(body)
    try:
        # The header first: numpy allocates whatever shape it declares before reading the data,
        # so a 100-byte body declaring 10^12 floats must be refused here, not by a MemoryError.
        version = npy_format.read_magic(buf)
        if version not in _NPY_HEADERS:
            raise ValueError(f".npy format version {version} is not supported; use 1.0 or 2.0")
        shape, _, dtype = _NPY_HEADERS[version](buf)
        if dtype.kind not in "iuf":
            raise errors.InvalidLatents(f".npy latents must be numeric, got dtype {dtype}")
        declared, present = math.prod(shape) * dtype.itemsize, len(body) - buf.tell()
        if declared != present:
            raise ValueError(
                f"its header declares {declared} bytes of data, the body has {present}"
            )
        buf.seek(0)
        array = np.load(buf, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise errors.InvalidLatents(f"the body is not a valid .npy array: {exc}") from None
    return validate_latents(array)


async def decode_images(model, blobs: list[bytes], max_pixels: int, pool) -> np.ndarray:
    """Decode and preprocess every image in the thread pool; fail naming the first bad index."""
    loop = asyncio.get_running_loop()

    def one(index: int, data: bytes) -> np.ndarray:
        try:
            return model.preprocess(data, max_pixels)
        except ImageTooLargeError as exc:
            raise errors.ImageTooLarge(f"images[{index}]: {exc}") from None
        except ImageDecodeError as exc:
            raise errors.InvalidImage(f"images[{index}]: {exc}") from None

    results = await asyncio.gather(
        *(loop.run_in_executor(pool, one, i, b) for i, b in enumerate(blobs)),
        return_exceptions=True,
    )
    for result in results:  # the lowest bad index wins, whatever finished first
        if isinstance(result, BaseException):
            raise result
    return np.stack(results)
