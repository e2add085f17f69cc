"""Request and response schemas, for /docs and the OpenAPI document.

Bodies are parsed by `service.dataplane.inputs` (they come as multipart, JSON or .npy), so the request
schemas are attached to the routes through `openapi_extra`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelRef(BaseModel):
    name: str
    version: int


class ImagesJson(BaseModel):
    images: list[str] = Field(description="base64 of each image file (JPEG, PNG, BMP, WebP, TIFF)")


class LatentsJson(BaseModel):
    latents: list[list[float]] = Field(description="N latents of latent_dim numbers each")


class InterpolateJson(BaseModel):
    images: list[str] | None = Field(None, description="base64 image files: two with `steps`")
    latents: list[list[float]] | None = Field(None, description="instead of images")
    steps: int | None = Field(None, ge=0, description="K: K+2 images from a to b, ends included")
    weights: list[float] | None = Field(None, description="non-negative, summing to 1")


class GenerateJson(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    n: int = Field(1, ge=1, description="images to generate, at most AE_MAX_IMAGES_PER_REQUEST")
    seed: int | None = Field(
        None, ge=0, le=2**64 - 1, description="same seed, same images; default: drawn"
    )
    temperature: float = Field(1.0, gt=0, le=2, description="spread around the class mean")
    class_: str | None = Field(
        None, alias="class", description="one of the model's classes; default: drawn per image"
    )


class GenerateResponse(BaseModel):
    model: ModelRef
    seed: int = Field(description="the seed used: send it again for the same images")
    temperature: float
    classes: list[str] = Field(description="the class of each image")
    images: list[str] = Field(description="base64 PNGs")
    latents: list[list[float]]


class EncodeResponse(BaseModel):
    model: ModelRef
    latents: list[list[float]]


class DecodeResponse(BaseModel):
    model: ModelRef
    images: list[str] = Field(description="base64 PNGs")


class ReconstructResponse(BaseModel):
    model: ModelRef
    images: list[str] = Field(description="base64 PNGs")
    mse: list[float] = Field(description="per image, preprocessed input vs output, in [0, 1]")


class DenoiseResponse(BaseModel):
    model: ModelRef = Field(description="the denoising model, not the autoencoder")
    images: list[str] = Field(description="base64 PNGs, cleaned, at the model's input size")


class AnomalyResult(BaseModel):
    score: float = Field(description="0-1, threshold at 0.5; the raw score for older models")
    raw_score: float | None = Field(None, description="on the scorer's own scale")
    is_anomaly: bool
    mse: float
    heatmap: str | None = Field(None, description="base64 PNG, with heatmap=true")


class AnomalyResponse(BaseModel):
    model: ModelRef
    threshold: float = Field(description="0.5 when `normalised`, else the raw threshold")
    raw_threshold: float | None = Field(None, description="the calibrated raw threshold")
    normalised: bool | None = Field(None, description="scores are on the 0-1 scale")
    scorer: str
    results: list[AnomalyResult]


class InterpolateResponse(BaseModel):
    model: ModelRef
    images: list[str]
    latents: list[list[float]]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ProtocolErrorBody(BaseModel):
    """The Open Inference Protocol's error body, on every /v2 route."""

    error: str


V2_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProtocolErrorBody, "description": what}
    for status, what in ((401, "missing or wrong X-API-Key"), (404, "no such model"),
                         (503, "not loaded yet, or shutting down"))
}  # fmt: skip

# The errors of the non-inference routes that need the key and the loaded model.
KEYED_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong X-API-Key"},
    404: {"model": ErrorBody, "description": "no such model or version served (GET /models)"},
    422: {"model": ErrorBody, "description": "a malformed `version`"},
    503: {"model": ErrorBody, "description": "not loaded yet, or shutting down (see Retry-After)"},
}

NPY_SCHEMA = {"type": "string", "format": "binary", "description": ".npy float32 array"}
TENSORS_SCHEMA = {
    "type": "string",
    "format": "binary",
    "description": ".npy of preprocessed images: uint8 or float32 in [0, 1], [N, H, W, 3] "
    "RGB at the model's input size",
}
IMAGE_INPUTS = (
    "Images: multipart `images` files, JSON base64 `images`, one image file as the whole body "
    "(`Content-Type: image/jpeg`, `image/png`, ...: no multipart parsing), or a .npy of "
    "preprocessed uint8 or float32 [N, H, W, 3] tensors (`Content-Type: application/x-npy`). "
    "Bytes that do not decode as an image are a 400."
)
# One image file as the whole body; OpenCV decides what it can read.
RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")


def _multipart(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    properties = {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}
    return {"schema": {"type": "object", "properties": {**properties, **(extra or {})},
                       "required": ["images"]}}  # fmt: skip


def request_body(json_model: type[BaseModel], multipart: bool = True, npy: bool = False,
                 form_fields: dict[str, Any] | None = None,
                 raw_images: bool = False) -> dict[str, Any]:  # fmt: skip
    """`openapi_extra` documenting the accepted request bodies of one route: `npy` latents, or
    with `raw_images` one image file as the body and a .npy of preprocessed images."""
    content: dict[str, Any] = {"application/json": {"schema": json_model.model_json_schema()}}
    if multipart:
        content["multipart/form-data"] = _multipart(form_fields)
    if npy:
        content["application/x-npy"] = {"schema": NPY_SCHEMA}
    if raw_images:
        content["application/x-npy"] = {"schema": TENSORS_SCHEMA}
        for media in RAW_IMAGE_TYPES:
            content[media] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def responses(model: type[BaseModel], npy: bool = False) -> dict[int | str, dict[str, Any]]:
    """The documented responses: the JSON body, optionally .npy, and the error bodies."""
    ok: dict[str, Any] = {"model": model}
    if npy:
        ok["content"] = {"application/x-npy": {"schema": NPY_SCHEMA}}
    errors = {
        400: "undecodable image, bad base64 or invalid JSON",
        401: "missing or wrong X-API-Key",
        413: "body, image count or pixel count too large",
        404: "no such model or version served (GET /models)",
        415: "unsupported Content-Type",
        422: "invalid latents, steps or weights",
        429: "busy: queue full, too much in progress, or waited too long (see Retry-After)",
        503: "not ready, shutting down, or a failed worker (see Retry-After)",
    }
    return {200: ok, **{code: {"model": ErrorBody, "description": d} for code, d in errors.items()}}
