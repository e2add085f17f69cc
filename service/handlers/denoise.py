"""POST /denoise: images -> the denoising model (AE_DENOISE_MODEL) -> cleaned images."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service import errors
from service.dependencies import SERVED_OPENAPI, serving
from service.handlers.common import request_images
from service.inputs import wants_npy
from service.responses import FastJSON, npy_response
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
    description="Each image through the model that declares the `denoise` task "
    f"(AE_DENOISE_MODEL), at its input size. {IMAGE_INPUTS} "
    "`Accept: application/x-npy` returns a float32 [N, H, W, 3] .npy array in [0, 1]. "
    "404 `not_found` when no denoising model is loaded.",
    response_model=None,
    responses={
        **responses(DenoiseResponse, npy=True),
        404: {"model": ErrorBody, "description": "no denoising model is loaded"},
    },
    openapi_extra=request_body(ImagesJson, raw_images=True) | SERVED_OPENAPI,
)
async def denoise(request: Request):
    with serving(request) as served:
        runtime = served.runtime
        # `served` (the default autoencoder) lends the shared request steps: body parsing,
        # admission, phase timing and PNG encoding; the images run through the denoiser.
        denoiser = runtime.denoiser
        if denoiser is None:  # before reading the body: nothing it holds can change the answer
            raise errors.NotFound(
                "no denoising model is loaded: set AE_DENOISE_MODEL to a model under AE_MODEL_DIR "
                "whose manifest declares the `denoise` task"
            )
        parsed = await request_images(request, served)
        with served.admit(parsed.image_count):
            _, cleaned = await runtime.through(runtime.denoise_batcher, denoiser, parsed, "denoise")
            served.count("denoise", len(cleaned))
            with served.phase("postprocess", "denoise"):
                if wants_npy(request):
                    return npy_response(cleaned)
                return FastJSON(
                    {
                        "model": {"name": denoiser.name, "version": denoiser.version},
                        "images": await served.pngs(cleaned),
                    }
                )
