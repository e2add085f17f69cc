"""POST /anomaly-score: a calibrated scorer from the manifest against its threshold."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request

from aecore.anomaly import Evidence, error_heatmap, per_image_mse
from service import errors
from service.responses import FastJSON
from service.routes.common import request_images
from service.routes.dependencies import SERVED_OPENAPI, serving
from service.schemas import IMAGE_INPUTS, AnomalyResponse, ImagesJson, request_body, responses

router = APIRouter(tags=["inference"])


@router.post(
    "/anomaly-score",
    summary="Score images for anomalies",
    description="`is_anomaly` is `score > threshold`. The scorer (default: the manifest's) and "
    "its threshold come from the model's manifest, calibrated on held-out images. Scores are on "
    "a 0-1 scale with the threshold at 0.5 (`normalised`); `raw_score` and `raw_threshold` are "
    "on the scorer's own scale. "
    f"`heatmap=true` adds the smoothed per-pixel error laid over each input. {IMAGE_INPUTS}",
    response_model=None,
    responses=responses(AnomalyResponse),
    openapi_extra=request_body(ImagesJson, raw_images=True) | SERVED_OPENAPI,
)
async def anomaly_score(
    request: Request,
    heatmap: Annotated[bool, Query(description="add a base64 PNG error heatmap per image")] = False,
    scorer: Annotated[
        str | None, Query(description="a scorer in the model's manifest; default: the model's")
    ] = None,
):
    with serving(request) as served:
        scorers = served.model.scorers
        name = scorers.default if scorer is None else scorer
        if name not in scorers.names:
            raise errors.InvalidParameter(
                f"unknown scorer {name!r}; this model has {scorers.names}"
            )
        parsed = await request_images(request, served)
        with served.admit(parsed.image_count):
            images, latents = await served.encoded(parsed, "anomaly-score")
            outputs = await served.decode(latents)
            loop = asyncio.get_running_loop()
            evidence = Evidence(images, outputs, latents)
            scores = await loop.run_in_executor(served.pool, served.model.score, name, evidence)
            mse = per_image_mse(images, outputs)
            raw_threshold = scorers.thresholds[name]
            results = [
                {
                    "score": float(u),
                    "raw_score": float(s),
                    "is_anomaly": bool(s > raw_threshold),
                    "mse": float(m),
                }
                for u, s, m in zip(scorers.unit(name, scores), scores, mse, strict=True)
            ]
            if heatmap:
                with served.phase("postprocess", "anomaly-score"):
                    maps = await asyncio.gather(
                        *(
                            loop.run_in_executor(
                                served.pool,
                                error_heatmap,
                                x,
                                y,
                                scorers.heatmap_scale,
                                scorers.sigma,
                            )
                            for x, y in zip(images, outputs, strict=True)
                        )
                    )
                    for result, png in zip(results, await served.pngs(maps), strict=True):
                        result["heatmap"] = png
        served.count("anomaly-score", len(results))
        return FastJSON(
            {
                "model": served.ref(),
                "threshold": scorers.unit_threshold(name),
                "raw_threshold": raw_threshold,
                "normalised": scorers.normalised(name),
                "scorer": name,
                "results": results,
            }
        )
