"""Every error the API returns, and the one place that maps exceptions to HTTP.

Body: {"error": {"code": "<snake_case>", "message": "<what is wrong and how to fix it>"}}.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.responses import FastJSON

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidImage(ApiError):
    status, code = 400, "invalid_image"


class InvalidBase64(ApiError):
    status, code = 400, "invalid_base64"


class InvalidJson(ApiError):
    status, code = 400, "invalid_json"


class InvalidMultipart(ApiError):
    status, code = 400, "invalid_multipart"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class TooManyImages(ApiError):
    status, code = 413, "too_many_images"


class ImageTooLarge(ApiError):
    status, code = 413, "image_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class InvalidRequest(ApiError):
    """The JSON parsed but its shape is wrong (missing field, wrong type)."""

    status, code = 422, "invalid_request"


class InvalidLatents(ApiError):
    status, code = 422, "invalid_latents"


class InvalidTensor(ApiError):
    status, code = 422, "invalid_tensor"


class InvalidParameter(ApiError):
    status, code = 422, "invalid_parameter"


class NotSupported(ApiError):
    """The loaded model cannot do what was asked (e.g. /generate without a generation density)."""

    status, code = 409, "not_supported"


class RetryLater(ApiError):
    """A refusal the client should retry after `Retry-After` seconds."""

    def __init__(self, message: str, code: str, retry_after_s: int):
        super().__init__(message, {"Retry-After": str(retry_after_s)})
        self.code = code


class Busy(RetryLater):
    """Back-pressure: the queue is full, too much is in flight, or the request waited too long
    (`queue_full`, `overloaded`, `queue_timeout`). 429, as Ray Serve and TEI answer."""

    status = 429


class Unavailable(RetryLater):
    """The server cannot serve now: not loaded yet, shutting down, or its inference worker
    failed (`not_ready`, `shutting_down`, `worker_failed`)."""

    status = 503


V2_PREFIX = "/v2"  # the Open Inference Protocol's routes answer errors in its own form


def error_response(status: int, code: str, message: str, headers=None, path: str = "") -> FastJSON:
    """The contract's error body, or on the /v2 routes the protocol's `{"error": "..."}`."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        body: dict = {"error": message}
    else:
        body = {"error": {"code": code, "message": message}}
    return FastJSON(body, status_code=status, headers=headers)


CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        return error_response(422, "invalid_parameter", problems, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers, request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        # Every load generator does this at the end of a run: not a server error. 499 as nginx
        # logs it; nobody reads the body.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", "internal error; see the server log", path=request.url.path
        )
