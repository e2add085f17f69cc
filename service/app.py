"""The FastAPI application: settings, lifespan (load, warm up, drain), middleware, routers.

The layers, outermost first: protocol routes (`service.routes`: the REST API, the Open
Inference Protocol, the repository API) -> the data plane (`service.dataplane`: readiness,
leases, admission, decoding, batching) -> the model repository (`service.repository`: which
versions serve) -> the engine (`service.engine`: sessions and batchers of one version).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors, openapi, workers
from service.dataplane.plane import DataPlane
from service.engine.threads import thread_budget
from service.limits import Admission, BodySizeLimit
from service.metrics import Metrics
from service.repository.control import SharedState
from service.repository.repository import Repository
from service.request_id import RequestId
from service.routes import (
    anomaly,
    decode,
    denoise,
    encode,
    generate,
    health,
    interpolate,
    reconstruct,
    repository,
    ui,
    v2,
)
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


def _unready_on_exit_signals(plane: DataPlane) -> Callable[[], None]:
    """Turn /readyz to 503 the moment SIGTERM or SIGINT arrives; returns what undoes this.

    uvicorn installs its exit handlers before the lifespan starts; on a signal it stops
    accepting, waits for in-flight requests, and only then runs the lifespan's shutdown. Chaining
    its handlers fails readiness (and refuses new inference with 503) at once, while in-flight
    requests still complete.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # handlers can only be set from the main thread
    chained = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        server_handler = signal.getsignal(sig)
        if not callable(server_handler):
            continue  # no Python handler (the default ends the process): nothing to chain

        def handler(signum, frame, server_handler=server_handler):
            plane.accepting = False
            server_handler(signum, frame)

        signal.signal(sig, handler)
        chained[sig] = (handler, server_handler)

    def restore() -> None:
        for sig, (handler, server_handler) in chained.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, server_handler)

    return restore


FOLLOW_S = 1.0  # how soon every worker process applies a load or unload made through another


def _follow(repository: Repository, settings: Settings) -> asyncio.Task | None:
    """Follow the model folder (AE_MODEL_POLL_S, AE_MODEL_CONTROL=poll) and, with several
    worker processes, the control state they share."""
    state_s = FOLLOW_S if repository.shared.path is not None else 0.0
    if not (settings.poll_s or state_s):
        return None
    loop = asyncio.get_running_loop()
    return loop.create_task(repository.follow(settings.poll_s, state_s), name="repository-follow")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threads = thread_budget(settings)
        repository = Repository(settings, metrics, SharedState.for_this_server(), threads[0])
        repository.on_change.append(lambda: setattr(app, "openapi_schema", None))  # redescribe
        plane = DataPlane(settings, metrics, repository, threads[1])
        # A missing default model or AE_REQUIRE_GPU without a GPU stops start-up.
        await repository.start()
        app.state.plane = plane
        following = _follow(repository, settings)
        plane.accepting = True
        workers.mark_ready()  # uvicorn listens a moment later: harmless at probe intervals
        restore_signals = _unready_on_exit_signals(plane)
        try:
            yield
        finally:
            restore_signals()
            if following is not None:
                following.cancel()
            await plane.close()
            metrics.worker_exited()

    app = FastAPI(
        title="Convolutional autoencoder service",
        version="1",
        summary="Encode, decode, reconstruct, score anomalies and interpolate with an ONNX "
        "autoencoder.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.plane = None
    errors.install(app)
    openapi.install(app, settings)
    routers = (encode, decode, reconstruct, anomaly, interpolate, generate, denoise, health, ui,
               v2, repository)  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    # Inference requests in flight are bounded like the queue they lead to (AE_MAX_QUEUE_SIZE),
    # and their bodies in bytes (AE_MAX_INFLIGHT_BYTES).
    app.add_middleware(
        Admission,
        max_requests=settings.max_queue_size,
        max_bytes=settings.max_inflight_bytes,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestId)  # outermost: every log line of the request carries its id
    return app
