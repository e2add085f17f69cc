"""The one data plane every protocol's routes go through: readiness, the model version a request
runs on (leased before its body is read), admission of its images, decoding them straight into
one batch in the thread pool, the engine's batchers, and the per-phase timings (as KServe's
model server has them: preprocess, predict, postprocess)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from service import workers
from service.dataplane.inputs import Parsed, decode_into, validate_tensors
from service.engine.batcher import Batcher
from service.engine.models import ServedModel
from service.engine.version import ModelVersion
from service.errors import Busy, Unavailable
from service.metrics import Metrics
from service.repository.repository import Repository
from service.settings import Settings


class DataPlane:
    def __init__(
        self, settings: Settings, metrics: Metrics, repository: Repository, decode_threads: int
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = repository
        self.accepting = False  # loaded, and no exit signal yet
        self.images_in_flight = 0
        self._all_started = False  # every worker process has been ready (AE_WORKERS > 1)
        # OpenCV releases the GIL, so decoding and PNG encoding scale over threads.
        self.pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="images")

    # -- health ------------------------------------------------------------------------------
    def unready(self) -> str | None:
        """Why this server should not be sent traffic now, or None: not loaded or shutting
        down, the default model not served, a served version's inference thread dead for good,
        or worker processes still starting."""
        if not self.accepting:
            return "the models are not loaded yet, or the server is shutting down"
        if self.settings.model_name not in self.repository.served:
            return f"the default model {self.settings.model_name!r} is not served"
        if dead := self.dead():
            return f"the inference worker of {', '.join(dead)} failed for good"
        if waiting := self._workers_waiting():
            return f"{waiting} of {self.settings.workers} worker processes are still starting"
        return None

    def dead(self) -> list[str]:
        """The served versions whose inference thread kept dying and is not restarted: the
        process cannot heal, so liveness fails and the orchestrator replaces it."""
        return [f"{v.name} v{v.version}" for v in self.repository.versions() if not v.healthy]

    def _workers_waiting(self) -> int:
        """The worker processes of this server (AE_WORKERS) not ready yet, until all have been."""
        if self._all_started or workers.folder() is None:
            return 0
        waiting = max(0, self.settings.workers - workers.ready_workers())
        self._all_started = waiting == 0
        return waiting

    # -- a request's model version --------------------------------------------------------------
    @contextmanager
    def serving(
        self, name: str | None, version: int | None, task: str | None
    ) -> Iterator[Inference]:
        """The version a request runs on, leased until the block exits."""
        if not self.accepting:
            raise Unavailable("the models are not loaded yet, or the server is shutting down; "
                              "retry shortly", "not_ready", self.settings.retry_after_s)  # fmt: skip
        with self.repository.resolve(name, version, task).lease() as served:
            yield Inference(self, served)

    # -- admission and phases -------------------------------------------------------------------
    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Hold `images` places of AE_MAX_INFLIGHT_IMAGES while a request works on them."""
        limit = self.settings.max_inflight_images
        if self.images_in_flight + images > limit:
            raise Busy(
                f"{self.images_in_flight} images in progress, the limit is {limit}; retry later",
                "overloaded",
                self.settings.retry_after_s,
            )
        self.images_in_flight += images
        try:
            yield
        finally:
            self.images_in_flight -= images

    @contextmanager
    def phase(self, name: str, endpoint: str) -> Iterator[None]:
        """Time a request's `preprocess` or `postprocess` phase into its histogram."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.phases[name].labels(endpoint).observe(time.perf_counter() - started)

    # -- decode -> batch ---------------------------------------------------------------------
    async def through(
        self, batcher: Batcher, model: ServedModel, parsed: Parsed, endpoint: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """A request's images, preprocessed for `model`, and what `batcher`'s graph makes of
        them. Image files are decoded in the pool straight into one batch, which the thread
        that decodes the last of them hands to the batcher itself: between the body and the
        answer the event loop does nothing for the request."""
        if parsed.tensors is not None:
            with self.phase("preprocess", endpoint):
                images = validate_tensors(parsed.tensors, model.spec)
            return images, await batcher.submit(images)
        batcher.check(parsed.image_count)  # refuse before decoding anything
        pending = batcher.pending()
        started, preprocess = time.perf_counter(), self.metrics.phases["preprocess"]

        def hand_over(images: np.ndarray, error: BaseException | None) -> None:  # in the pool
            preprocess.labels(endpoint).observe(time.perf_counter() - started)
            if error is None:
                batcher.put(images, pending)
            else:
                pending.settle_threadsafe(error=error)

        try:
            images = decode_into(model, parsed.images, self.settings.max_image_pixels, self.pool,
                                 hand_over)  # fmt: skip
            return images, await pending.future
        finally:
            pending.timer.cancel()

    async def pngs(self, model: ServedModel, images: np.ndarray) -> list[str]:
        """Base64 PNGs of [0, 1] images, encoded in the thread pool."""
        loop = asyncio.get_running_loop()

        def one(image: np.ndarray) -> str:
            return base64.b64encode(model.postprocess(image)).decode("ascii")

        return list(
            await asyncio.gather(*(loop.run_in_executor(self.pool, one, im) for im in images))
        )

    async def close(self) -> None:
        """Stop taking work, finish what is queued, release threads."""
        self.accepting = False
        await self.repository.close()
        self.pool.shutdown(wait=True)

    def batching(self) -> dict:
        s = self.settings
        return {
            "max_batch_size": s.max_batch_size,
            "max_queue_delay_ms": s.max_queue_delay_ms,
            "max_queue_size": s.max_queue_size,
            "queue_timeout_s": s.queue_timeout_s,
        }


class Inference:
    """One request's model version with the data plane's steps, as the routes compose them."""

    __slots__ = ("plane", "served")

    def __init__(self, plane: DataPlane, served: ModelVersion) -> None:
        self.plane = plane
        self.served = served

    @property
    def model(self) -> ServedModel:
        return self.served.model

    @property
    def settings(self) -> Settings:
        return self.plane.settings

    @property
    def pool(self) -> ThreadPoolExecutor:
        return self.plane.pool

    def ref(self) -> dict:
        return self.served.ref()

    async def through(self, part: str, parsed: Parsed, endpoint: str
                      ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """A request's images as graph `part` takes them, and what it makes of them."""
        return await self.plane.through(self.served.batchers[part], self.model, parsed, endpoint)

    async def encoded(self, parsed: Parsed, endpoint: str) -> tuple[np.ndarray, np.ndarray]:
        return await self.through("encoder", parsed, endpoint)

    async def run(self, part: str, rows: np.ndarray) -> np.ndarray:
        return await self.served.batchers[part].submit(rows)

    async def encode(self, images: np.ndarray) -> np.ndarray:
        return await self.run("encoder", images)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return await self.run("decoder", latents)

    async def pngs(self, images: np.ndarray) -> list[str]:
        return await self.plane.pngs(self.model, images)

    def admit(self, images: int):
        return self.plane.admit(images)

    def phase(self, name: str, endpoint: str):
        return self.plane.phase(name, endpoint)

    def count(self, endpoint: str, n: int) -> None:
        self.plane.metrics.images.labels(endpoint).inc(n)
