"""One loaded model version: its runner, one batcher per graph, and the requests leased on it.

`open_version` is the one way a version is loaded, whatever its task: sessions opened with the
configured providers and options and checked (sha256, shapes), warmed up at every batch size a
GPU will see, one batcher per graph with the service's batching settings and metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.engine.batcher import Batcher
from service.engine.models import ServedModel, Serving, open_model
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class ModelVersion:
    def __init__(self, model: ServedModel, batchers: dict[str, Batcher]) -> None:
        self.model = model
        self.batchers = batchers
        self.leases = 0

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def tasks(self) -> list[str]:
        return self.model.tasks

    @property
    def healthy(self) -> bool:
        """Every batcher's inference thread alive (one that kept dying is not restarted)."""
        return all(b.healthy for b in self.batchers.values())

    def ref(self) -> dict:
        return {"name": self.name, "version": self.version}

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()

    @contextmanager
    def lease(self) -> Iterator[ModelVersion]:
        """Held by a request from before its body is read until it is answered: a version
        retired meanwhile finishes the request before its batchers stop."""
        self.leases += 1
        try:
            yield self
        finally:
            self.leases -= 1


def _batcher(part: str, run, model: ServedModel, settings: Settings, metrics: Metrics) -> Batcher:
    """A batcher for one graph of `model`, with the service's batching settings."""
    s = settings
    return Batcher(
        part, run, metrics=metrics, max_batch=s.max_batch_size,
        max_delay_s=s.max_queue_delay_ms / 1000.0, max_queue=s.max_queue_size,
        timeout_s=s.queue_timeout_s, retry_after_s=s.retry_after_s,
        labels={"model": model.name, "version": str(model.version)},
    )  # fmt: skip


async def open_version(
    folder: Path, settings: Settings, metrics: Metrics, threads: int
) -> ModelVersion:
    """Load, check and warm up the version in `folder` with `threads` intra-op threads; its
    batchers are made, not started."""
    s = settings
    how = Serving(s.providers, s.require_gpu, threads, s.precision, s.cudnn_conv_algo_search,
                  s.trt_cache_dir)  # fmt: skip
    model = await asyncio.to_thread(open_model, folder, how)
    # On a GPU every batch size the batcher can form is a new shape for cuDNN's search.
    sizes = range(1, s.max_batch_size + 1) if model.on_gpu else (1, s.max_batch_size)
    seconds = await asyncio.to_thread(model.warm_up, tuple(sizes))
    log.info(
        "loaded %s v%s (%s) from %s; providers in use: %s (asked for %s); %d intra-op threads; "
        "warm-up %.2f s",
        model.name, model.version, ", ".join(model.tasks), folder, model.providers,
        model.requested_providers, model.intra_op_threads, seconds,
    )  # fmt: skip
    graphs = model.graphs()
    return ModelVersion(
        model, {part: _batcher(part, run, model, s, metrics) for part, (run, _) in graphs.items()}
    )
