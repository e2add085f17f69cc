"""A request id for every request: the client's `X-Request-ID` when it sends a sane one, else a
new one; echoed in the response and carried by every log line written while the request is
handled (as KServe and text-embeddings-inference do), so one slow or failed request can be
followed through the log."""

from __future__ import annotations

import contextvars
import logging
import random
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # never echo arbitrary bytes into logs
current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        # 128 random bits as 32 hex digits, like uuid4().hex; an id needs to be unique, not
        # secret, and os.urandom's system call per request showed in profiles.
        rid = sent if _SANE.match(sent) else f"{random.getrandbits(128):032x}"
        token = current.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (`-` outside a request) for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True
