"""POST /generate: new images sampled from the model's generation density, then decoded."""

from __future__ import annotations

import math
import secrets
from typing import Any

from fastapi import APIRouter, Request

from aecore.generation import TEMPERATURE_RANGE
from service import errors
from service.dataplane.inputs import media_type, read_json, wants_npy
from service.responses import FastJSON, npy_response
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import ErrorBody, GenerateJson, GenerateResponse, request_body, responses

router = APIRouter(tags=["inference"])

MAX_SEED = 2**64 - 1
_FIELDS = {"n", "seed", "temperature", "class"}


@router.post(
    "/generate",
    summary="Generate new images",
    description="Samples `n` latents from the density the model fitted to its training latents "
    "(a Gaussian per class) and decodes them. The same `seed` (with the same n, temperature, "
    "class and model version) gives the same images; without one a seed is drawn and returned. "
    "`temperature` in (0, 2] scales the spread around the class mean (1: the fitted density). "
    "Without `class`, each image's class is drawn by its training frequency. "
    "`Accept: application/x-npy` returns float32 [N, H, W, 3] in [0, 1]. "
    "A model without a generation density answers 409 `not_supported`.",
    response_model=None,
    responses={
        **responses(GenerateResponse, npy=True),
        409: {"model": ErrorBody, "description": "the model has no generation density"},
    },
    openapi_extra=request_body(GenerateJson, multipart=False) | SERVED_OPENAPI,
)
async def generate(request: Request):
    with serving(request) as served:
        if media_type(request) != "application/json":
            raise errors.UnsupportedMediaType(
                f"Content-Type {media_type(request) or '(none)'!r} is not supported; send "
                'application/json, e.g. {"n": 8, "seed": 1, "temperature": 0.8, "class": "forest"}'
            )
        payload = await read_json(request)
        density = served.model.generator
        if density is None:
            raise errors.NotSupported(
                f"model {served.model.name} v{served.model.version} has no generation density; "
                "serve a version whose model.json has a `generation` block"
            )
        unknown = sorted(set(payload) - _FIELDS)
        if unknown:
            raise errors.InvalidParameter(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
        n = _n(payload.get("n", 1), served.settings.max_images_per_request)
        seed = _seed(payload.get("seed"))
        temperature = _temperature(payload.get("temperature", 1.0))
        class_name = payload.get("class")
        if class_name is not None and class_name not in density.classes:
            raise errors.InvalidParameter(
                f"unknown class {class_name!r}; this model's classes are {density.classes}"
            )

        latents, labels = density.sample(n, seed, temperature, class_name)
        with served.admit(n):
            images = await served.decode(latents)
            served.count("generate", len(images))
            with served.phase("postprocess", "generate"):
                if wants_npy(request):
                    return npy_response(images)
                return FastJSON(
                    {
                        "model": served.ref(),
                        "seed": seed,
                        "temperature": temperature,
                        "classes": [density.classes[k] for k in labels],
                        "images": await served.pngs(images),
                        "latents": latents,
                    }
                )


def _whole(value: Any) -> int | None:
    """An int, or a float with no fractional part (JSON Schema's integers include 2.0)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def _n(value: Any, limit: int) -> int:
    whole = _whole(value)
    if whole is None or whole < 1:
        raise errors.InvalidParameter(f"`n` must be a whole number of at least 1, got {value!r}")
    value = whole
    if value > limit:
        raise errors.InvalidParameter(f"n={value} is above the limit of {limit} images")
    return value


def _seed(value: Any) -> int:
    if value is None:  # below 2^53, so that JavaScript clients read it back exactly
        return secrets.randbelow(2**53)
    whole = _whole(value)
    if whole is None or not 0 <= whole <= MAX_SEED:
        raise errors.InvalidParameter(
            f"`seed` must be a whole number from 0 to 2^64-1, got {value!r}"
        )
    return whole


def _temperature(value: Any) -> float:
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise errors.InvalidParameter(f"`temperature` must be a number, got {value!r}")
    if not (math.isfinite(value) and low < value <= high):
        raise errors.InvalidParameter(
            f"`temperature` must be above {low:g} and at most {high:g}, got {value!r}"
        )
    return float(value)
