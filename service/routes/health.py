"""Probes, the model card and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.dataplane.plane import DataPlane
from service.errors import ApiError, error_response
from service.responses import FastJSON
from service.routes.dependencies import SERVED_OPENAPI, require_metrics_key, serving
from service.schemas import KEYED_ERRORS

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    summary="Liveness: 200 while the process can serve; 503 once an inference thread failed "
    "for good (restart the process)",
    responses={503: KEYED_ERRORS[503]},
)
async def healthz(request: Request):
    plane: DataPlane | None = request.app.state.plane
    if plane is not None and (dead := plane.dead()):
        return error_response(503, "not_live", f"the inference worker of {', '.join(dead)} "
                              "failed repeatedly and is not restarted")  # fmt: skip
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every served model is loaded, warmed up and healthy, in every "
    "worker process",
    responses={503: KEYED_ERRORS[503]},
)
async def readyz(request: Request):
    plane: DataPlane | None = request.app.state.plane
    reason = "the models are not loaded yet" if plane is None else plane.unready()
    if reason is not None:
        return error_response(503, "not_ready", reason, {"Retry-After": "1"})
    default = plane.repository.resolve(None, None)
    return {"status": "ready", "model": default.name, "version": default.version}


@router.get(
    "/model",
    summary="The manifest, the execution providers in use and the batching settings",
    responses=KEYED_ERRORS,
    openapi_extra=SERVED_OPENAPI,
)
async def model_card(request: Request):
    with serving(request) as served:
        plane = served.plane
        try:  # the model /denoise uses by default; null when there is none
            denoiser = plane.repository.resolve(None, None, "denoise").model.describe()
        except ApiError:
            denoiser = None
        return FastJSON(
            {**served.model.describe(), "batching": plane.batching(), "denoiser": denoiser}
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
