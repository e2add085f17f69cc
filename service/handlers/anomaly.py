"""POST /anomaly-score: the manifest's scorer against its calibrated threshold."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from aecore.anomaly import error_heatmap
from service.dependencies import RuntimeDep, require_api_key
from service.handlers.common import model_ref, request_images
from service.responses import FastJSON
from service.schemas import AnomalyResponse, ImagesJson, request_body, responses

router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])


@router.post(
    "/anomaly-score",
    summary="Score images for anomalies",
    description="`is_anomaly` is `score > threshold`; the scorer and threshold come from the "
    "model's manifest, calibrated on held-out images. `heatmap=true` adds a per-pixel error "
    "map laid over each input.",
    response_model=None,
    responses=responses(AnomalyResponse),
    openapi_extra=request_body(ImagesJson),
)
async def anomaly_score(
    request: Request,
    runtime: RuntimeDep,
    heatmap: Annotated[bool, Query(description="add a base64 PNG error heatmap per image")] = False,
):
    images = await request_images(request, runtime)
    outputs = await runtime.reconstruct(images)
    model = runtime.model
    scores, mse = model.score(images, outputs)
    threshold = float(model.anomaly["threshold"])
    results = [
        {"score": float(s), "is_anomaly": bool(s > threshold), "mse": float(m)}
        for s, m in zip(scores, mse, strict=True)
    ]
    if heatmap:
        scale = model.heatmap_scale
        maps = await asyncio.gather(
            *(
                asyncio.get_running_loop().run_in_executor(runtime.pool, error_heatmap, x, y, scale)
                for x, y in zip(images, outputs, strict=True)
            )
        )
        for result, png in zip(results, await runtime.pngs(maps), strict=True):
            result["heatmap"] = png
    runtime.count("anomaly-score", len(results))
    return FastJSON(
        {
            "model": model_ref(runtime),
            "threshold": threshold,
            "scorer": model.anomaly["scorer"],
            "results": results,
        }
    )
