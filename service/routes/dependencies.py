"""What a request runs with: the API key checked, the data plane or the repository, and the
model version it asked for (FastAPI dependencies, and `serving` for the routes that run on a
model version)."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import Field, TypeAdapter, ValidationError

from service.dataplane.plane import DataPlane, Inference
from service.errors import InvalidParameter, Unauthorized, Unavailable
from service.repository.repository import Repository
from service.settings import Settings

KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(name=KEY_HEADER, auto_error=False, description="AE_API_KEY")


# Every dependency is `async def`: FastAPI runs a plain `def` one in the thread pool, a thread
# hop per dependency per request for work that takes microseconds.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def started_plane(request: Request) -> DataPlane:
    """The data plane once the lifespan has built it (it may not be accepting requests yet)."""
    plane: DataPlane | None = request.app.state.plane
    if plane is None:
        settings: Settings = request.app.state.settings
        raise Unavailable("the server is starting; retry shortly", "not_ready",
                          settings.retry_after_s)  # fmt: skip
    return plane


async def get_plane(request: Request) -> DataPlane:
    return started_plane(request)


async def get_repository(request: Request) -> Repository:
    """The repository, whatever state the server is in (a load must be able to repair it)."""
    return started_plane(request).repository


ApiKey = Annotated[str | None, Security(_api_key_header)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _check_key(key: str | None, settings: Settings) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    # Starlette decodes header bytes as latin-1; undo that to compare the bytes that were sent.
    if key is None or not hmac.compare_digest(key.encode("latin-1"), expected):
        raise Unauthorized("missing or wrong X-API-Key header")


async def require_api_key(key: ApiKey, settings: SettingsDep) -> None:
    _check_key(key, settings)


async def require_metrics_key(key: ApiKey, settings: SettingsDep) -> None:
    if settings.protect_metrics:
        _check_key(key, settings)


PlaneDep = Annotated[DataPlane, Depends(get_plane)]
RepositoryDep = Annotated[Repository, Depends(get_repository)]

_VERSION = TypeAdapter(Annotated[int, Field(gt=0)])

# What the routes that run on a model version document: `?model=&version=` and the API key.
# They check both in `serving`, not through FastAPI's dependencies, whose resolution cost a
# fifth of a millisecond per request on the hot path (measured at concurrency 1).
SERVED_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "model",
            "in": "query",
            "required": False,
            "description": "a served model (GET /models); default AE_MODEL_NAME",
            "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Model"},
        },
        {
            "name": "version",
            "in": "query",
            "required": False,
            "description": "one of its served versions; default the highest",
            "schema": {
                "anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "null"}],
                "description": "one of its served versions; default the highest",
                "title": "Version",
            },
        },
    ],
    "security": [{"APIKeyHeader": []}],
}


# The task a route needs of its model (the manifest's `tasks`): a request that names no model
# runs on the default model for the task, and `?model=` may name only a model that declares it.
TASKS = {
    "/encode": "encode",
    "/reconstruct": "reconstruct",
    "/anomaly-score": "anomaly-score",
    "/interpolate": "interpolate",
    "/decode": "decode",
    "/generate": "decode",
    "/denoise": "denoise",
}


@contextmanager
def serving(request: Request) -> Iterator[Inference]:
    """The model version a request runs on, of a model that declares the route's task, held
    (leased) until the block exits: a version retired meanwhile finishes this request before
    it stops. Routes enter it before reading the body. Checked in this order: the API key
    (401), readiness (503), `?version=` (422), the model and version served (404)."""
    settings: Settings = request.app.state.settings
    _check_key(request.headers.get(KEY_HEADER), settings)
    plane = started_plane(request)
    query = request.query_params
    version = query.get("version")
    if version is not None:
        try:
            version = _VERSION.validate_python(version)
        except ValidationError as exc:
            raise InvalidParameter(f"query.version: {exc.errors()[0]['msg']}") from None
    task = TASKS.get(request.scope["route"].path)
    with plane.serving(query.get("model"), version, task) as inference:
        yield inference
