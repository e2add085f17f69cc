"""FastAPI dependencies: the loaded model and its batchers, and the API key."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import Unauthorized, Unavailable
from service.repository import Served
from service.runtime import Runtime
from service.settings import Settings

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="AE_API_KEY")


# Every dependency is `async def`: FastAPI runs a plain `def` one in the thread pool, a thread
# hop per dependency per request for work that takes microseconds.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = request.app.state.runtime
    settings: Settings = request.app.state.settings
    if runtime is None or not runtime.ready:
        raise Unavailable(
            "the model is not loaded, or the server is shutting down; retry shortly",
            "not_ready",
            settings.retry_after_s,
        )
    return runtime


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


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_served(
    runtime: RuntimeDep,
    model: Annotated[
        str | None, Query(description="a served model (GET /models); default AE_MODEL_NAME")
    ] = None,
    version: Annotated[
        int | None, Query(gt=0, description="one of its served versions; default the highest")
    ] = None,
) -> AsyncIterator[Served]:
    """The model version a request runs on, held (leased) until the request is answered: a
    version retired meanwhile finishes this request before it stops."""
    with runtime.repository.resolve(model, version).lease() as served:
        yield served


ServedDep = Annotated[Served, Depends(get_served)]
