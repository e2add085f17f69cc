"""POST /decode: latents -> images."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service import errors
from service.dataplane.inputs import parse_body, validate_latents, wants_npy
from service.responses import FastJSON, npy_response
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import DecodeResponse, LatentsJson, request_body, responses

router = APIRouter(tags=["inference"])


@router.post(
    "/decode",
    summary="Decode latents to images",
    description="JSON `latents` or a float32 .npy body (`Content-Type: application/x-npy`). "
    "`Accept: application/x-npy` returns float32 [N, H, W, 3] in [0, 1].",
    response_model=None,
    responses=responses(DecodeResponse, npy=True),
    openapi_extra=request_body(LatentsJson, multipart=False, npy=True) | SERVED_OPENAPI,
)
async def decode(request: Request):
    with serving(request) as served:
        parsed = await parse_body(request, served.settings.max_images_per_request, latents=True)
        if parsed.latents is None:
            raise errors.InvalidLatents(
                'no latents: send JSON {"latents": [[...], ...]} or a .npy body'
            )
        latents = validate_latents(parsed.latents, served.model.latent_dim)
        if len(latents) > served.settings.max_images_per_request:
            raise errors.TooManyImages(
                f"{len(latents)} latents; the limit is {served.settings.max_images_per_request}"
            )
        with served.admit(len(latents)):
            images = await served.decode(latents)
            served.count("decode", len(images))
            with served.phase("postprocess", "decode"):
                if wants_npy(request):
                    return npy_response(images)
                return FastJSON({"model": served.ref(), "images": await served.pngs(images)})
