"""POST /denoise: images -> the denoising model (AE_DENOISE_MODEL) -> cleaned images."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service import errors
from service.dependencies import RuntimeDep, require_api_key
from service.inputs import parse_body, require_images, wants_npy
from service.responses import FastJSON, npy_response
from service.schemas import DenoiseResponse, ErrorBody, ImagesJson, request_body, responses

router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])


@router.post(
    "/denoise",
    summary="Denoise images",
    description="Multipart `images` files or JSON base64 `images`, through the model that "
    "declares the `denoise` task (AE_DENOISE_MODEL), at its input size. "
    "`Accept: application/x-npy` returns a float32 [N, H, W, 3] .npy array in [0, 1]. "
    "404 `not_found` when no denoising model is loaded.",
    response_model=None,
    responses={
        **responses(DenoiseResponse, npy=True),
        404: {"model": ErrorBody, "description": "no denoising model is loaded"},
    },
    openapi_extra=request_body(ImagesJson),
)
async def denoise(request: Request, runtime: RuntimeDep):
    denoiser = runtime.denoiser
    if denoiser is None:  # before reading the body: nothing it holds can change the answer
        raise errors.NotFound(
            "no denoising model is loaded: set AE_DENOISE_MODEL to a model under AE_MODEL_DIR "
            "whose manifest declares the `denoise` task"
        )
    parsed = await parse_body(
        request, runtime.settings.max_images_per_request, accept_latents=False
    )
    images = await runtime.images(require_images(parsed), denoiser)
    cleaned = await runtime.denoise(images)
    runtime.count("denoise", len(cleaned))
    if wants_npy(request):
        return npy_response(cleaned)
    return FastJSON(
        {
            "model": {"name": denoiser.name, "version": denoiser.version},
            "images": await runtime.pngs(cleaned),
        }
    )
