"""Helpers for service tests: a running app on the committed model, and response decoding."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from contextlib import asynccontextmanager, contextmanager

import httpx
import numpy as np
import pytest

from aecore.preprocessing import decode_rgb
from service.app import create_app
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL_DIR
from tests.live import metric  # noqa: F401  (the service tests read metrics with it)


def settings(**overrides) -> Settings:
    return Settings(_env_file=None, **{"model_dir": DEFAULT_MODEL_DIR, **overrides})


@asynccontextmanager
async def running(**overrides):
    """An httpx client on the app, after its lifespan has loaded and warmed up the model."""
    app = create_app(settings(**overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            client.app = app
            yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_pixels(text: str) -> np.ndarray:
    return decode_rgb(base64.b64decode(text))


def npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def multipart(blobs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


@contextmanager
def stalled_inference(plane, part: str = "encoder"):
    """Hold every engine call of the graph until the block exits (a gated `run` injected)."""
    release = threading.Event()
    batcher = plane.repository.resolve(None, None).batchers[part]
    run = batcher.run

    def gated(rows):
        release.wait(60)
        return run(rows)

    batcher.run = gated
    try:
        yield
    finally:
        release.set()
        batcher.run = run


def batches_taken(plane, part: str = "encoder") -> float:
    """How many queued items the default model's worker has taken so far (observed when a
    batch starts)."""
    model = plane.repository.resolve(None, None).model
    labels = {"model": model.name, "version": str(model.version), "part": part}
    value = plane.metrics.registry.get_sample_value("ae_queue_wait_seconds_count", labels)
    return value or 0.0


async def wait_until(condition, what: str, limit_s: float = 20.0) -> None:
    """Synchronisation, not a timing assertion: wait for a server-side state to be reached."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never reached: {what}")
        await asyncio.sleep(0.01)
