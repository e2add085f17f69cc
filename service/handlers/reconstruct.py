"""POST /reconstruct: images -> encoder -> decoder -> images, with the MSE of each."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from aecore.anomaly import per_image_mse
from service.dependencies import RuntimeDep, require_api_key
from service.handlers.common import model_ref, request_blobs
from service.responses import FastJSON
from service.schemas import ImagesJson, ReconstructResponse, request_body, responses

router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])


@router.post(
    "/reconstruct",
    summary="Reconstruct images",
    description="Each image through the encoder and decoder; `mse` compares the preprocessed "
    "input with the output, both in [0, 1].",
    response_model=None,
    responses=responses(ReconstructResponse),
    openapi_extra=request_body(ImagesJson),
)
async def reconstruct(request: Request, runtime: RuntimeDep):
    blobs = await request_blobs(request, runtime)
    with runtime.admit(len(blobs)):
        with runtime.phase("preprocess", "reconstruct"):
            images = await runtime.images(blobs)
        outputs = await runtime.reconstruct(images)
        runtime.count("reconstruct", len(outputs))
        with runtime.phase("postprocess", "reconstruct"):
            return FastJSON(
                {
                    "model": model_ref(runtime),
                    "images": await runtime.pngs(outputs),
                    "mse": per_image_mse(images, outputs),
                }
            )
