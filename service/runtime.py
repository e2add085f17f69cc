"""What the app holds while it runs: the model, one batcher per graph, the decode thread pool."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from aecore import manifest
from aecore.denoiser import Denoiser
from aecore.graphs import default_threads
from service.batcher import Batcher
from service.errors import Busy
from service.inputs import Parsed, preprocess
from service.metrics import Metrics
from service.model import AutoencoderModel
from service.settings import Settings

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: AutoencoderModel | None = None
        self._ready = False
        self.images_in_flight = 0
        # OpenCV releases the GIL, so decoding and PNG encoding scale over threads.
        self.pool = ThreadPoolExecutor(
            max_workers=settings.decode_threads or max(2, default_threads()),
            thread_name_prefix="images",
        )
        self.encoder: Batcher | None = None
        self.decoder: Batcher | None = None
        self.denoiser: Denoiser | None = None
        self.denoise_batcher: Batcher | None = None

    async def load(self) -> None:
        """Load and check the model folder, warm both graphs up, start the batchers."""
        s = self.settings
        folder = manifest.resolve(s.model_dir, s.model_name, s.model_version)
        model = await asyncio.to_thread(
            AutoencoderModel, folder, s.providers, s.require_gpu, s.intra_op_threads
        )
        seconds = await asyncio.to_thread(model.warm_up, (1, s.max_batch_size))
        log.info(
            "loaded %s v%s from %s; providers in use: %s (asked for %s); %d intra-op threads; "
            "warm-up %.2f s",
            model.name, model.version, folder, model.providers, model.requested_providers,
            model.intra_op_threads, seconds,
        )  # fmt: skip
        self.denoiser = await asyncio.to_thread(self._load_denoiser, model.requested_providers)
        common = dict(
            metrics=self.metrics,
            max_batch=s.max_batch_size,
            max_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue=s.max_queue_size,
            timeout_s=s.queue_timeout_s,
            retry_after_s=s.retry_after_s,
        )
        self.encoder = Batcher("encoder", model.encode, **common)
        self.decoder = Batcher("decoder", model.decode, **common)
        self.encoder.start()
        self.decoder.start()
        if self.denoiser is not None:
            self.denoise_batcher = Batcher("denoiser", self.denoiser.denoise, **common)
            self.denoise_batcher.start()
        self.model = model
        self.ready = True

    @property
    def ready(self) -> bool:
        """Loaded, not shutting down, and both batching workers healthy."""
        batchers = (self.encoder, self.decoder)
        denoiser_ok = self.denoise_batcher is None or self.denoise_batcher.healthy
        return self._ready and denoiser_ok and all(b is not None and b.healthy for b in batchers)

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

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

    def _load_denoiser(self, providers: list[str]) -> Denoiser | None:
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
        denoiser = Denoiser(folder, providers, s.intra_op_threads)
        for n in (1, s.max_batch_size):
            denoiser.denoise(np.zeros((n, *denoiser.spec.shape), np.float32))
        log.info("loaded denoiser %s v%s from %s", denoiser.name, denoiser.version, folder)
        return denoiser

    def denoiser_card(self) -> dict | None:
        """What GET /model says about the denoiser: its name, version and manifest."""
        if self.denoiser is None:
            return None
        return {**self.denoiser.manifest, "providers": self.denoiser.providers}

    async def close(self) -> None:
        """Stop taking work, finish what is queued, release threads."""
        self.ready = False
        for batcher in (self.encoder, self.decoder, self.denoise_batcher):
            if batcher is not None:
                await batcher.stop()
        self.pool.shutdown(wait=True)

    # -- the steps handlers compose --
    async def images(self, parsed: Parsed, model=None) -> np.ndarray:
        """A request's images as `model` (default: the autoencoder) takes them."""
        return await preprocess(
            model or self.model, parsed, self.settings.max_image_pixels, self.pool
        )

    async def encode(self, images: np.ndarray) -> np.ndarray:
        return await self.encoder.submit(images)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return await self.decoder.submit(latents)

    async def denoise(self, images: np.ndarray) -> np.ndarray:
        return await self.denoise_batcher.submit(images)

    async def reconstruct(self, images: np.ndarray) -> np.ndarray:
        return await self.decode(await self.encode(images))

    def count(self, endpoint: str, n: int) -> None:
        self.metrics.images.labels(endpoint).inc(n)

    async def pngs(self, images: np.ndarray) -> list[str]:
        """Base64 PNGs of [0, 1] images, encoded in the thread pool."""
        loop = asyncio.get_running_loop()

        def one(image: np.ndarray) -> str:
            return base64.b64encode(self.model.postprocess(image)).decode("ascii")

        return list(
            await asyncio.gather(*(loop.run_in_executor(self.pool, one, im) for im in images))
        )

    def batching(self) -> dict:
        s = self.settings
        return {
            "max_batch_size": s.max_batch_size,
            "max_queue_delay_ms": s.max_queue_delay_ms,
            "max_queue_size": s.max_queue_size,
            "queue_timeout_s": s.queue_timeout_s,
        }
