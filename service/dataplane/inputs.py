"""Reading request bodies: images (multipart, JSON base64, one raw image file, or a .npy of
preprocessed tensors), latents (JSON or .npy), and the other parameters.

Limits (image count, pixels) are checked before anything is decoded; the body-size limit is
enforced while the body streams in (see `service.limits`). A `.npy` body's rank, channels and
dtype are checked before its rows are counted as images. Large JSON and `.npy` bodies are
parsed in a worker thread, so the event loop keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from tokenize import TokenError
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from numpy.lib import format as npy_format
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from aecore.preprocessing import ImageDecodeError, ImageSpec, ImageTooLargeError, to_float
from service import errors
from service.responses import NPY

T = TypeVar("T")

# Bodies larger than this are parsed in a worker thread: orjson, base64 and np.load take
# milliseconds per MiB, during which the event loop would answer no one (probes included).
# Smaller ones are parsed inline, where the thread hop would cost more than the parse.
OFF_LOOP_BYTES = 256 * 1024


@dataclass
class Parsed:
    """A request body: image files, preprocessed image tensors or latents, plus any other
    fields it carried."""

    images: list[bytes] | None
    latents: np.ndarray | None
    fields: dict[str, Any]
    form: bool = False  # multipart: other fields arrive as strings
    tensors: np.ndarray | None = None  # a .npy of images the client preprocessed itself

    @property
    def image_count(self) -> int:
        if self.tensors is not None:
            return len(self.tensors)
        return len(self.images or ())


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "").lower()


async def parse_off_loop(body: bytes, parse: Callable[[bytes], T]) -> T:
    """`parse(body)`: in a worker thread when the body is over OFF_LOOP_BYTES, else inline."""
    if len(body) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse, body)
    return parse(body)


async def read_json(request: Request) -> dict[str, Any]:
    return await parse_off_loop(await request.body(), _json_object)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidJson(f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise errors.InvalidRequest('the JSON body must be an object, e.g. {"images": [...]}')
    return payload


class _ImageFormParser(MultiPartParser):
    """Starlette's multipart parser, counting file parts itself: past `max_images` it stops
    reading at once with 413 `too_many_images` (no spooled file is kept)."""

    def __init__(self, request: Request, max_images: int) -> None:
        super().__init__(request.headers, request.stream(), max_fields=32)
        self.max_images = max_images
        self.files = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()  # opens a spooled file for a part with a filename
        if self._current_part.file is None:
            return
        self.files += 1
        if self.files > self.max_images:
            raise errors.TooManyImages(
                f"more than {self.max_images} images in one request; the limit is {self.max_images}"
            )


async def _form(request: Request, max_images: int) -> Parsed:
    try:
        form = await _ImageFormParser(request, max_images).parse()
    except MultiPartException as exc:
        raise errors.InvalidMultipart(f"the multipart body is malformed: {exc.message}") from None
    try:
        values = form.getlist("images")
        if any(isinstance(v, str) for v in values):
            raise errors.InvalidRequest(
                "multipart `images` must be file fields (curl -F images=@a.jpg)"
            )
        images = [await v.read() for v in values if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.items() if k != "images"}
    finally:
        await form.close()  # the spooled upload files, on every path
    return Parsed(images or None, None, fields, form=True)


def _json(body: bytes, max_images: int, accept_latents: bool) -> Parsed:
    """A JSON body, parsed, its base64 images decoded and its latents made an array: the
    costly steps, in one function so that a large body takes one thread hop for all."""
    payload = _json_object(body)
    for key in ("images", "latents"):
        if key in payload and payload[key] is None:  # the document has no null; nor do we
            raise errors.InvalidRequest(f"`{key}` is null; leave it out or send a list")
    images = payload.get("images")
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
            raise errors.InvalidRequest("`images` must be a list of base64 strings")
        if not images:
            raise errors.InvalidRequest("`images` is empty; send at least one image")
        _check_count(len(images), max_images)
        images = [_b64(s, i) for i, s in enumerate(images)]
    latents = payload.get("latents") if accept_latents else None
    rest = {k: v for k, v in payload.items() if k not in ("images", "latents")}
    return Parsed(images, None if latents is None else as_latents(latents), rest)


async def parse_body(
    request: Request, max_images: int, *, latents: bool = False, raw_images: bool = False
) -> Parsed:
    """Dispatch on Content-Type: multipart or JSON images (JSON latents too with `latents`),
    a .npy of latents (`latents`) or of preprocessed images (`raw_images`), or one image file
    as the whole body (`raw_images`: `image/jpeg`, `image/png`, ...: no multipart parsing).

    Only the body's structure is checked here: image bytes are decoded later, once the
    handler has checked every parameter and count.
    """
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await _form(request, max_images)
    if kind == "application/json":
        parse = partial(_json, max_images=max_images, accept_latents=latents)
        return await parse_off_loop(await request.body(), parse)
    if kind == NPY and latents:
        return await parse_off_loop(await request.body(), _npy_latents)
    if kind == NPY and raw_images:
        parse = partial(_npy_images, max_images=max_images)
        return await parse_off_loop(await request.body(), parse)
    if kind.startswith("image/") and raw_images:
        body = await request.body()
        if not body:
            raise errors.InvalidRequest(f"the {kind} body is empty; send the image file")
        return Parsed([body], None, {})
    accepted = "multipart/form-data or application/json"
    if raw_images:
        accepted += f", one image file (image/jpeg, image/png, ...) or {NPY} image tensors"
    elif latents:
        accepted += f" or {NPY}"
    raise errors.UnsupportedMediaType(
        f"Content-Type {kind or '(none)'!r} is not supported; send {accepted}"
    )


def _npy_latents(body: bytes) -> Parsed:
    return Parsed(None, validate_latents(_npy(body, errors.InvalidLatents)), {})


def _npy_images(body: bytes, max_images: int) -> Parsed:
    """A .npy of images: what it is (rank, channels, dtype) before how many, so that an array
    of another shape is never counted as images (1,000 numbers are not 1,000 images)."""
    tensors = check_tensors(_npy(body, errors.InvalidTensor))
    _check_count(len(tensors), max_images)
    return Parsed(None, None, {}, tensors=tensors)


def require_images(parsed: Parsed) -> Parsed:
    if parsed.tensors is None and not parsed.images:  # tensors are checked by their shape
        raise errors.InvalidRequest(
            'no images: send multipart file fields named `images` or JSON {"images": [base64...]}'
        )
    return parsed


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
    if array.ndim == 1 and array.size:
        array = array[None, :]
    return validate_latents(array)


def validate_latents(array: np.ndarray, latent_dim: int | None = None) -> np.ndarray:
    if array.ndim != 2 or 0 in array.shape:
        raise errors.InvalidLatents(
            f"latents must be [N, latent_dim], got shape {list(array.shape)}"
        )
    if latent_dim is not None and array.shape[1] != latent_dim:
        raise errors.InvalidLatents(
            f"each latent must have {latent_dim} values, got {array.shape[1]}"
        )
    # Beyond float32's range a value would round to the largest float or to inf: refuse it
    # before the cast, as the OpenAPI document's bounds say.
    wide = array.dtype.kind == "f" and array.dtype.itemsize > 4
    if wide and np.any(np.abs(array) > np.finfo(np.float32).max):
        raise errors.InvalidLatents("latents hold values beyond float32's range")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise errors.InvalidLatents("latents contain NaN or Inf (or values beyond float32)")
    return array


_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def _npy(body: bytes, error: type[errors.ApiError]) -> np.ndarray:
    """A numeric array from a .npy body, its header checked before anything is allocated."""
    buf = io.BytesIO(body)
    try:
        # The header first: numpy allocates whatever shape it declares before reading the data,
        # so a 100-byte body declaring 10^12 floats must be refused here, not by a MemoryError.
        version = npy_format.read_magic(buf)
        if version not in _NPY_HEADERS:
            raise ValueError(f".npy format version {version} is not supported; use 1.0 or 2.0")
        shape, _, dtype = _NPY_HEADERS[version](buf)
        if dtype.kind not in "iuf":
            raise error(f"a .npy body must be numeric, got dtype {dtype}")
        declared, present = math.prod(shape) * dtype.itemsize, len(body) - buf.tell()
        if declared != present:
            raise ValueError(
                f"its header declares {declared} bytes of data, the body has {present}"
            )
        buf.seek(0)
        array = np.load(buf, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, TokenError) as exc:
        # numpy parses the header as a Python literal: a broken one raises tokenizer errors.
        raise error(f"the body is not a valid .npy array: {exc}") from None
    return array


def check_tensors(array: np.ndarray, spec: ImageSpec | None = None) -> np.ndarray:
    """`array` when it can be client-preprocessed images: [N >= 1, H, W, 3], uint8 or float32
    (either byte order), and with `spec` the model's H and W; else 422 `invalid_tensor`."""
    shape = list(array.shape)
    size = spec.shape if spec is not None else ("H", "W", 3)
    layout = ", ".join(map(str, size))
    wrong_size = array.ndim == 4 and (shape[3] != 3 if spec is None else tuple(shape[1:]) != size)
    if array.ndim != 4 or shape[0] == 0 or wrong_size:
        hint = ""
        if array.ndim == 3 and shape[2] == 3:  # the commonest slip: one image, no batch axis
            hint = f"; for one image add the batch dimension: {[1, *shape]}"
        raise errors.InvalidTensor(
            f"image tensors must be [N, {layout}] (NHWC, RGB, N >= 1), got shape {shape}{hint}"
        )
    float32 = array.dtype.kind == "f" and array.dtype.itemsize == 4
    if array.dtype != np.uint8 and not float32:
        raise errors.InvalidTensor(f"image tensors must be uint8 or float32, got {array.dtype}")
    return array


def validate_tensors(array: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Client-preprocessed images -> float32 [N, H, W, 3] in [0, 1], as `load_image` makes.

    uint8 is scaled exactly as the service's own preprocessing does; float32 must already be
    in [0, 1]. The size must be the model's: resizing is the client's side of the bargain.
    """
    check_tensors(array, spec)
    if array.dtype == np.uint8:
        return to_float(array)
    array = np.ascontiguousarray(array, np.float32)  # native byte order, C order
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
        raise errors.InvalidTensor("float32 image tensors must be finite and in [0, 1]")
    return array


def decode_into(
    model,
    blobs: list[bytes],
    max_pixels: int,
    pool,
    done: Callable[[np.ndarray, BaseException | None], None],
) -> np.ndarray:
    """Decode and preprocess every image in the thread pool straight into its slot of one batch
    buffer (no stacking afterwards), returned at once. The thread that finishes the last image
    calls `done(batch, None)`, or `done(batch, error)` with the error of the lowest bad index,
    whatever finished first; `done` may run before this returns."""
    batch = np.empty((len(blobs), *model.spec.shape), np.float32)
    failures: dict[int, BaseException] = {}
    remaining = len(blobs)
    lock = threading.Lock()

    def one(index: int, data: bytes) -> None:
        nonlocal remaining
        failure: BaseException | None = None
        try:
            model.preprocess(data, max_pixels, out=batch[index])
        except ImageTooLargeError as exc:
            failure = errors.ImageTooLarge(f"images[{index}]: {exc}")
        except ImageDecodeError as exc:
            failure = errors.InvalidImage(f"images[{index}]: {exc}")
        except Exception as exc:  # a bug: still the request's answer, never a lost request
            failure = exc
        with lock:
            if failure is not None:
                failures[index] = failure
            remaining -= 1
            last = remaining == 0
        if last:
            done(batch, failures[min(failures)] if failures else None)

    for index, data in enumerate(blobs):
        pool.submit(one, index, data)
    return batch
