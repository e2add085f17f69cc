"""POST /denoise: images -> a model that declares the `denoise` task -> cleaned images."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.dataplane.inputs import wants_npy
from service.responses import FastJSON, npy_response
from service.routes.common import request_images
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import (
    IMAGE_INPUTS,
    DenoiseResponse,
    ErrorBody,
    ImagesJson,
    request_body,
    responses,
)

router = APIRouter(tags=["inference"])


@router.post(
    "/denoise",
    summary="Denoise images",
    description="Each image through a model that declares the `denoise` task (`?model=`, by "
    f"default AE_DENOISE_MODEL), at its input size. {IMAGE_INPUTS} "
    "`Accept: application/x-npy` returns a float32 [N, H, W, 3] .npy array in [0, 1]. "
    "404 `not_found` when no default denoising model is served, `model_not_found` for a "
    "`?model=` that is not served or does not declare the task.",
    response_model=None,
    responses={
        **responses(DenoiseResponse, npy=True),
        404: {"model": ErrorBody, "description": "no denoising model is served"},
    },
    openapi_extra=request_body(ImagesJson, raw_images=True) | SERVED_OPENAPI,
)
async def denoise(request: Request):
    with serving(request) as served:
        parsed = await request_images(request, served)
        with served.admit(parsed.image_count):
            _, cleaned = await served.through("denoiser", parsed, "denoise")
            served.count("denoise", len(cleaned))
            with served.phase("postprocess", "denoise"):
                if wants_npy(request):
                    return npy_response(cleaned)
                return FastJSON({"model": served.ref(), "images": await served.pngs(cleaned)})
