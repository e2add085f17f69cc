"""POST /reconstruct: images -> encoder -> decoder -> images, with the MSE of each."""

from __future__ import annotations

from fastapi import APIRouter, Request

from aecore.anomaly import per_image_mse
from service.responses import FastJSON
from service.routes.common import request_images
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import IMAGE_INPUTS, ImagesJson, ReconstructResponse, request_body, responses

router = APIRouter(tags=["inference"])


@router.post(
    "/reconstruct",
    summary="Reconstruct images",
    description="Each image through the encoder and decoder; `mse` compares the preprocessed "
    f"input with the output, both in [0, 1]. {IMAGE_INPUTS}",
    response_model=None,
    responses=responses(ReconstructResponse),
    openapi_extra=request_body(ImagesJson, raw_images=True) | SERVED_OPENAPI,
)
async def reconstruct(request: Request):
    with serving(request) as served:
        parsed = await request_images(request, served)
        with served.admit(parsed.image_count):
            images, latents = await served.encoded(parsed, "reconstruct")
            outputs = await served.decode(latents)
            served.count("reconstruct", len(outputs))
            with served.phase("postprocess", "reconstruct"):
                return FastJSON(
                    {
                        "model": served.ref(),
                        "images": await served.pngs(outputs),
                        "mse": per_image_mse(images, outputs),
                    }
                )
