"""POST /interpolate: straight latent paths (`steps`) and weighted averages (`weights`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request

from service import errors
from service.dataplane.inputs import parse_body, validate_latents
from service.responses import FastJSON
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import InterpolateJson, InterpolateResponse, request_body, responses

router = APIRouter(tags=["inference"])

_FORM_FIELDS = {
    "steps": {"type": "integer", "minimum": 0},
    "weights": {"type": "string", "description": "JSON list or comma-separated, e.g. 0.5,0.5"},
}


@router.post(
    "/interpolate",
    summary="Interpolate or average in latent space",
    description="With `steps` K: K+2 decoded images along the straight latent path from a to "
    "b, both ends included (`steps=0` gives the two ends). With `weights` (non-negative, "
    "summing to 1, one per input): the single decoded weighted average; `[0.5, 0.5]` is the "
    "average of two pictures. Inputs are `images` (JSON base64 or multipart files) or `latents`.",
    response_model=None,
    responses=responses(InterpolateResponse),
    openapi_extra=request_body(InterpolateJson, form_fields=_FORM_FIELDS) | SERVED_OPENAPI,
)
async def interpolate(request: Request):
    with serving(request) as served:
        settings = served.settings
        parsed = await parse_body(request, settings.max_images_per_request, latents=True)
        if (parsed.images is None) == (parsed.latents is None):
            raise errors.InvalidRequest("send either `images` or `latents` (one of them)")
        steps = _steps(_present(parsed.fields, "steps", parsed.form), parsed.form)
        weights = _weights(_present(parsed.fields, "weights", parsed.form), parsed.form)
        if (steps is None) == (weights is None):
            raise errors.InvalidParameter("give either `steps` (a path) or `weights` (an average)")

        inputs = len(parsed.images) if parsed.images is not None else len(parsed.latents)
        if inputs > settings.max_images_per_request:
            raise errors.TooManyImages(
                f"{inputs} inputs; the limit is {settings.max_images_per_request}"
            )
        if steps is not None:
            if inputs != 2:
                raise errors.InvalidParameter(f"`steps` needs exactly two inputs, got {inputs}")
            if steps > settings.max_interpolation_steps:
                raise errors.InvalidParameter(
                    f"steps={steps} is above the limit of {settings.max_interpolation_steps}"
                )
        elif len(weights) != inputs:
            raise errors.InvalidParameter(
                f"{len(weights)} weights for {inputs} inputs; give one weight per input"
            )
        outputs = steps + 2 if steps is not None else 1
        # Every parameter is checked: only now are images decoded and encoded.
        with served.admit(inputs + outputs):
            if parsed.images is not None:
                _, latents = await served.encoded(parsed, "interpolate")
            else:
                latents = validate_latents(parsed.latents, served.model.latent_dim)
            if steps is not None:
                t = np.linspace(0.0, 1.0, outputs, dtype=np.float32)[:, None]
                path = (1.0 - t) * latents[0] + t * latents[1]
            else:
                path = (np.asarray(weights, np.float32)[:, None] * latents).sum(
                    axis=0, keepdims=True
                )
            images = await served.decode(path.astype(np.float32))
            served.count("interpolate", len(images))
            with served.phase("postprocess", "interpolate"):
                return FastJSON(
                    {"model": served.ref(), "images": await served.pngs(images), "latents": path}
                )


def _present(fields: dict[str, Any], name: str, form: bool) -> Any:
    """A parameter's value, None when absent; an empty form field counts as absent (browsers
    send every input of a form), an explicit JSON null as a wrong type."""
    value = fields.get(name)
    if form and isinstance(value, str) and not value.strip():
        return None
    if not form and name in fields and value is None:
        raise errors.InvalidParameter(f"`{name}` is null; leave it out or give a value")
    return value


def _steps(value: Any, form: bool) -> int | None:
    if value is None:
        return None
    if form and isinstance(value, str):
        try:
            value = int(value.strip(), 10) if value.strip().isascii() else None
        except ValueError:
            value = None
        if value is None:
            raise errors.InvalidParameter("`steps` must be a whole number") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidParameter(f"`steps` must be a whole number, got {value!r}")
    if value < 0:
        raise errors.InvalidParameter(f"`steps` must be 0 or more, got {value}")
    return value


def _weights(value: Any, form: bool) -> list[float] | None:
    if value is None:
        return None
    if form and isinstance(value, str):  # JSON list or "0.5,0.5"
        try:
            value = orjson.loads(value) if value.strip().startswith("[") else value.split(",")
            value = [float(v) for v in value]
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise errors.InvalidParameter(
                f"`weights` must be a list of numbers, got {value!r}"
            ) from None
    if not isinstance(value, list) or not value:
        raise errors.InvalidParameter("`weights` must be a non-empty list of numbers")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in value):
        raise errors.InvalidParameter("`weights` must contain numbers only")
    if any(not math.isfinite(w) or w < 0 for w in value):
        raise errors.InvalidParameter("`weights` must be finite and non-negative")
    if abs(sum(value) - 1.0) > 1e-4:
        raise errors.InvalidParameter(f"`weights` must sum to 1, they sum to {sum(value):g}")
    return [float(w) for w in value]
