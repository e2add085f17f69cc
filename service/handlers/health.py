"""Probes, the model card and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.dependencies import SERVED_OPENAPI, require_metrics_key, serving
from service.errors import error_response
from service.responses import FastJSON
from service.runtime import Runtime
from service.schemas import KEYED_ERRORS

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: 200 while the process runs")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once the model is loaded and warmed up (in every worker process)",
    responses={503: KEYED_ERRORS[503]},
)
async def readyz(request: Request):
    runtime: Runtime | None = request.app.state.runtime
    if runtime is None or not runtime.ready:
        return error_response(503, "not_ready", "the model is not loaded yet, or is shutting down",
                              {"Retry-After": "1"})  # fmt: skip
    if waiting := runtime.workers_waiting():
        return error_response(503, "not_ready", f"{waiting} of {runtime.settings.workers} worker "
                              "processes are still starting", {"Retry-After": "1"})  # fmt: skip
    default = runtime.default().model
    return {"status": "ready", "model": default.name, "version": default.version}


@router.get(
    "/model",
    summary="The manifest, the execution providers in use and the batching settings",
    responses=KEYED_ERRORS,
    openapi_extra=SERVED_OPENAPI,
)
async def model_card(request: Request):
    with serving(request) as served:
        runtime = served.runtime
        return FastJSON(
            {
                **served.model.describe(),
                "batching": runtime.batching(),
                "denoiser": runtime.denoiser_card(),  # null when /denoise has no model
            }
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=[Depends(require_metrics_key)],
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: KEYED_ERRORS[401]},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
