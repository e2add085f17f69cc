"""POST /encode: images -> latents."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.dependencies import RuntimeDep, require_api_key
from service.handlers.common import model_ref, request_images
from service.inputs import wants_npy
from service.responses import FastJSON, npy_response
from service.schemas import IMAGE_INPUTS, EncodeResponse, ImagesJson, request_body, responses

router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])


@router.post(
    "/encode",
    summary="Encode images to latents",
    description=f"{IMAGE_INPUTS} "
    "`Accept: application/x-npy` returns a float32 [N, latent_dim] .npy array.",
    response_model=None,
    responses=responses(EncodeResponse, npy=True),
    openapi_extra=request_body(ImagesJson, raw_images=True),
)
async def encode(request: Request, runtime: RuntimeDep):
    parsed = await request_images(request, runtime)
    with runtime.admit(parsed.image_count):
        with runtime.phase("preprocess", "encode"):
            images = await runtime.images(parsed)
        latents = await runtime.encode(images)
        runtime.count("encode", len(latents))
        with runtime.phase("postprocess", "encode"):
            if wants_npy(request):
                return npy_response(latents)
            return FastJSON({"model": model_ref(runtime), "latents": latents})
