"""Body-size limit as ASGI middleware: refuses a declared Content-Length at once, and stops a
chunked or slowly streamed body as soon as it passes the limit, before it is buffered whole."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, PayloadTooLarge, error_response


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
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(
                413,
                "payload_too_large",
                f"the body has {int(declared)} bytes; the limit is {limit}",
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


class InFlightLimit:
    """Admission control: at most `limit` inference requests (POST) being worked on at once.

    The batcher's queue is bounded, but a request only reaches it after its body has been
    parsed and its images decoded; under overload that work piled up in front of the queue,
    nothing was refused and latency grew without bound. A request is admitted when its body
    has arrived whole (so a slow upload holds no place) and counted until it is answered.
    Past the limit it is answered 503: at once when it arrives while the server is full (the
    cheap path that keeps an overloaded server responsive), else when its body is complete,
    before any of its images is decoded.
    """

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int) -> None:
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"{self.in_flight} requests in progress, the limit is {self.limit}; retry later",
            "overloaded",
            self.retry_after_s,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            exc = self._overloaded()
            await error_response(exc.status, exc.code, exc.message, exc.headers)(
                scope, receive, send
            )
            return
        admitted = False

        async def admitting_receive() -> Message:
            nonlocal admitted
            message = await receive()
            last = message["type"] == "http.request" and not message.get("more_body", False)
            if last and not admitted:
                if self.in_flight >= self.limit:
                    raise self._overloaded()  # inside the handler's body read: the app answers
                self.in_flight += 1
                admitted = True
            return message

        try:
            await self.app(scope, admitting_receive, send)
        finally:
            if admitted:
                self.in_flight -= 1
