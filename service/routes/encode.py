"""POST /encode: images -> latents."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.dataplane.inputs import wants_npy
from service.responses import FastJSON, npy_response
from service.routes.common import request_images
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import IMAGE_INPUTS, EncodeResponse, ImagesJson, request_body, responses

router = APIRouter(tags=["inference"])


@router.post(
    "/encode",
    summary="Encode images to latents",
    description=f"{IMAGE_INPUTS} "
    "`Accept: application/x-npy` returns a float32 [N, latent_dim] .npy array.",
    response_model=None,
    responses=responses(EncodeResponse, npy=True),
    openapi_extra=request_body(ImagesJson, raw_images=True) | SERVED_OPENAPI,
)
async def encode(request: Request):
    with serving(request) as served:
        parsed = await request_images(request, served)
        with served.admit(parsed.image_count):
            _, latents = await served.encoded(parsed, "encode")
            served.count("encode", len(latents))
            with served.phase("postprocess", "encode"):
                if wants_npy(request):
                    return npy_response(latents)
                return FastJSON({"model": served.ref(), "latents": latents})
