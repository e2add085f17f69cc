"""Body size and admission control as ASGI middleware.

`BodySizeLimit` refuses a declared Content-Length at once, and stops a chunked or slowly
streamed body as soon as it passes the limit, before it is buffered whole.

`Admission` bounds what inference requests (POST) hold in memory, in requests and in bytes:
the bytes of every body in flight count from their first chunk (a body still streaming holds
memory too) until the request is answered. A request that would pass either bound is answered
429 `overloaded` with Retry-After: at once when it arrives while the server is full (the cheap
path that keeps an overloaded server responsive), else from inside its body read, before any
of its images is decoded. Images in flight are bounded by the data plane (`DataPlane.admit`),
once a request's image count is known.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Busy, PayloadTooLarge, error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and int(declared) > limit
        ):
            response = error_response(
                413,
                "payload_too_large",
                f"the body has {int(declared)} bytes; the limit is {limit}",
                path=scope["path"],
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the handler's body read, so the app's handler answers 413.
                    raise PayloadTooLarge(f"the body passed the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


class Admission:
    """Requests are counted once their body is whole (a slow upload holds no place), bytes
    from their first chunk (a body still streaming holds memory)."""

    def __init__(self, app: ASGIApp, max_requests: int, max_bytes: int, retry_after_s: int):
        self.app = app
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.retry_after_s = retry_after_s
        self.requests = 0
        self.bytes = 0

    def _busy(self) -> Busy:
        return Busy(
            f"{self.requests} requests and {self.bytes} body bytes in progress, the limits are "
            f"{self.max_requests} and {self.max_bytes}; retry later",
            "overloaded",
            self.retry_after_s,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.requests >= self.max_requests or self.bytes >= self.max_bytes:
            exc = self._busy()
            await error_response(exc.status, exc.code, exc.message, exc.headers, scope["path"])(
                scope, receive, send
            )
            return
        held, admitted = 0, False

        async def admitting_receive() -> Message:
            nonlocal held, admitted
            message = await receive()
            if message["type"] != "http.request":
                return message
            size = len(message.get("body", b""))
            # Raised inside the handler's body read: the app answers, nothing is decoded.
            if self.bytes + size > self.max_bytes:
                raise self._busy()
            self.bytes += size
            held += size
            if not message.get("more_body", False) and not admitted:
                if self.requests >= self.max_requests:
                    raise self._busy()
                self.requests += 1
                admitted = True
            return message

        try:
            await self.app(scope, admitting_receive, send)
        finally:
            self.bytes -= held
            if admitted:
                self.requests -= 1
