"""The FastAPI application: settings, lifespan (load, warm up, drain), middleware, routers."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.handlers import anomaly, decode, encode, health, interpolate, reconstruct
from service.limits import BodySizeLimit
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings, get_settings

log = logging.getLogger("service")


class RequestMetrics:
    """ae_requests_total and ae_request_duration_seconds, labelled by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime = Runtime(settings, metrics)
        await runtime.load()  # a missing model or AE_REQUIRE_GPU without a GPU stops start-up
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="Convolutional autoencoder service",
        version="1",
        summary="Encode, decode, reconstruct, score anomalies and interpolate with an ONNX "
        "autoencoder.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    errors.install(app)
    for module in (encode, decode, reconstruct, anomaly, interpolate, health):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
