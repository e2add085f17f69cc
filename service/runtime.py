"""What the app holds while it runs: the model repository, the decode thread pool, and the
limits and metrics every loaded model shares."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from aecore import manifest
from aecore.denoiser import Denoiser
from aecore.graphs import default_threads
from service import workers
from service.batcher import Batcher
from service.errors import Busy
from service.inputs import Parsed, decode_into, validate_tensors
from service.metrics import Metrics
from service.model import AutoencoderModel, choose_providers
from service.repository import Repository, Served
from service.settings import Settings

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._ready = False
        self._all_started = False  # every worker process has been ready (AE_WORKERS > 1)
        self.images_in_flight = 0
        # OpenCV releases the GIL, so decoding and PNG encoding scale over threads.
        self.pool = ThreadPoolExecutor(
            max_workers=settings.decode_threads or max(2, default_threads()),
            thread_name_prefix="images",
        )
        self.repository = Repository(self)
        self.on_change: list[Callable[[], None]] = []
        self._poller: asyncio.Task | None = None
        # The denoiser, served beside the repository's autoencoders (which skip task folders
        # that do not encode) until the repository routes tasks itself.
        self.denoiser: Denoiser | None = None
        self.denoise_batcher: Batcher | None = None

    async def load(self) -> None:
        """Load every model the repository serves; the default model must be among them."""
        await self.repository.sync()
        s, failed = self.settings, self.repository.failed
        if s.model_name not in self.repository.served:  # the default model must serve
            reasons = [error for (name, _), error in failed.items() if name == s.model_name]
            if reasons:
                raise reasons[-1]
            self.default()  # raises ModelNotFound: no such model in the repository
        self.denoiser = await asyncio.to_thread(self._load_denoiser)
        if self.denoiser is not None:
            self.denoise_batcher = self.batcher("denoiser", self.denoiser.denoise, self.denoiser)
            self.denoise_batcher.start()
        if self.settings.model_poll_s > 0:
            self._poller = asyncio.get_running_loop().create_task(
                self.repository.poll(self.settings.model_poll_s), name="repository-poll"
            )
        self.ready = True
        workers.mark_ready()  # uvicorn listens a moment later: harmless at probe intervals

    async def open(self, folder: Path) -> Served:
        """One version: sessions opened and checked (sha256, shapes), warmed up, batchers made."""
        s = self.settings
        threads = s.intra_op_threads or max(1, default_threads() // s.workers)
        model = await asyncio.to_thread(
            AutoencoderModel, folder, s.providers, s.require_gpu, threads, s.precision,
            s.cudnn_conv_algo_search, s.trt_cache_dir,
        )  # fmt: skip
        # On a GPU every batch size the batcher can form is a new shape for cuDNN's search.
        sizes = range(1, s.max_batch_size + 1) if model.on_gpu else (1, s.max_batch_size)
        seconds = await asyncio.to_thread(model.warm_up, tuple(sizes))
        log.info(
            "loaded %s v%s from %s; providers in use: %s (asked for %s); %d intra-op threads; "
            "warm-up %.2f s",
            model.name, model.version, folder, model.providers, model.requested_providers,
            model.intra_op_threads, seconds,
        )  # fmt: skip
        return Served(self, model)

    def _load_denoiser(self) -> Denoiser | None:
        """AE_DENOISE_MODEL's highest version, warmed up; None when unset or not installed.

        A folder that is there but does not declare the `denoise` task stops start-up
        (ModelFolderError): that is a configuration mistake, not a missing option.
        """
        s = self.settings
        if not s.denoise_model:
            return None
        try:
            folder = manifest.resolve(s.model_dir, s.denoise_model)
        except manifest.ModelFolderError as exc:
            log.warning("no denoiser: %s; /denoise answers 404", exc)
            return None
        threads = s.intra_op_threads or max(1, default_threads() // s.workers)
        denoiser = Denoiser(folder, choose_providers(s.providers), threads)
        for n in (1, s.max_batch_size):
            denoiser.denoise(np.zeros((n, *denoiser.spec.shape), np.float32))
        log.info("loaded denoiser %s v%s from %s", denoiser.name, denoiser.version, folder)
        return denoiser

    def denoiser_card(self) -> dict | None:
        """What GET /model says about the denoiser: its manifest and providers."""
        if self.denoiser is None:
            return None
        return {**self.denoiser.manifest, "providers": self.denoiser.providers}

    def batcher(self, part: str, run: Callable, model: Any) -> Batcher:
        """A batcher for one graph of `model`, with the service's batching settings."""
        s = self.settings
        return Batcher(
            part,
            run,
            metrics=self.metrics,
            max_batch=s.max_batch_size,
            max_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue=s.max_queue_size,
            timeout_s=s.queue_timeout_s,
            retry_after_s=s.retry_after_s,
            labels={"model": model.name, "version": str(model.version)},
        )

    def default(self) -> Served:
        """The default model (AE_MODEL_NAME) at its highest served version."""
        return self.repository.resolve(None, None)

    def changed(self) -> None:
        for callback in self.on_change:
            callback()

    @property
    def ready(self) -> bool:
        """Loaded, not shutting down, and the default model's batching workers healthy."""
        if not self._ready:
            return False
        try:
            return self.default().healthy
        except Exception:  # the default model is not served (unloaded, or its folder gone)
            return False

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    def workers_waiting(self) -> int:
        """The worker processes of this server (AE_WORKERS) not ready yet, until all have been."""
        if self._all_started or workers.folder() is None:
            return 0
        waiting = max(0, self.settings.workers - workers.ready_workers())
        self._all_started = waiting == 0
        return waiting

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

    async def through(
        self, batcher: Batcher, model: Any, parsed: Parsed, endpoint: str
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

    async def close(self) -> None:
        """Stop taking work, finish what is queued, release threads."""
        self.ready = False
        if self._poller is not None:
            self._poller.cancel()
        await self.repository.close()
        if self.denoise_batcher is not None:
            await self.denoise_batcher.stop()
        self.pool.shutdown(wait=True)

    def batching(self) -> dict:
        s = self.settings
        return {
            "max_batch_size": s.max_batch_size,
            "max_queue_delay_ms": s.max_queue_delay_ms,
            "max_queue_size": s.max_queue_size,
            "queue_timeout_s": s.queue_timeout_s,
        }
