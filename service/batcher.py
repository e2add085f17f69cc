"""Dynamic batching across requests, one batcher per graph.

Requests put their rows on a bounded queue. A single worker takes up to `max_batch` rows, or
whatever arrived within `max_delay` of the oldest waiting row, runs them as one onnxruntime
call in a dedicated thread (off the event loop) and hands every request its own rows back.
A request larger than `max_batch` is split into chunks and rejoined in order.

The worker is supervised: if it dies (a bug outside the engine call), every waiting request
is failed at once with 503 `worker_failed` instead of waiting out its deadline, the failure is
logged, and the worker restarts; one that keeps dying marks the batcher unhealthy, which turns
/readyz to 503 so that an orchestrator replaces the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import Busy, Unavailable
from service.metrics import Metrics

log = logging.getLogger(__name__)

RESTARTS = 3  # worker deaths within RESTART_WINDOW_S before the batcher is declared unhealthy
RESTART_WINDOW_S = 60.0


class EngineError(RuntimeError):
    """The engine broke its contract (e.g. returned a different number of rows)."""


@dataclass
class _Item:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """`run` is the engine call, rows in -> rows out; tests may swap it for a gated one."""

    def __init__(
        self,
        part: str,
        run: Callable[[np.ndarray], np.ndarray],
        metrics: Metrics,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        timeout_s: float,
        retry_after_s: int = 1,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.part = part
        # Every metric of this batcher: its model and version (a repository serves several).
        self._labels = {"model": "", "version": "", **(labels or {}), "part": part}
        self.run = run
        self._metrics = metrics
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        # One inference thread per graph: onnxruntime parallelises inside a call already.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{part}")
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._deaths: deque[float] = deque()
        self.healthy = True

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._supervise(), name=self.part)

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queued_rows

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Run `rows` through the graph, batched with other requests; results in order."""
        if self._closing:
            raise Unavailable("the server is shutting down", "shutting_down", self.retry_after_s)
        if not self.healthy:
            raise Unavailable(
                f"the {self.part} worker failed repeatedly; see the server log",
                "worker_failed",
                self.retry_after_s,
            )
        if self._queued_rows + len(rows) > self.max_queue:
            raise Busy(
                f"the {self.part} queue is full ({self._queued_rows} images waiting); retry later",
                "queue_full",
                self.retry_after_s,
            )
        loop = asyncio.get_running_loop()
        items = [
            _Item(rows[i : i + self.max_batch], loop.create_future())
            for i in range(0, len(rows), self.max_batch)
        ]
        self._queue.extend(items)
        self._queued_rows += len(rows)
        self._metrics.queue_depth.labels(**self._labels).set(self._queued_rows)
        self._wakeup.set()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(item.future for item in items)), self.timeout_s
            )
        except asyncio.TimeoutError:
            raise Busy(
                f"waited more than {self.timeout_s:g} s for the {self.part}; retry later",
                "queue_timeout",
                self.retry_after_s,
            ) from None
        return results[0] if len(results) == 1 else np.concatenate(results)

    def _assemble_and_run(self, parts: list[np.ndarray]) -> np.ndarray:
        """In the inference thread: one buffer for the batch (the copy stays off the event
        loop), then the engine call."""
        return self.run(parts[0] if len(parts) == 1 else np.concatenate(parts))

    # -- the worker ------------------------------------------------------------------------
    async def _supervise(self) -> None:
        while True:
            try:
                await self._loop()
                return  # closing, queue drained
            except Exception:
                log.exception(
                    "the %s batching worker died; failing its waiting requests", self.part
                )
                self._fail_waiting()
                now = time.monotonic()
                self._deaths.append(now)
                while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
                    self._deaths.popleft()
                if len(self._deaths) >= RESTARTS:
                    log.error("the %s worker died %d times in %g s: unhealthy", self.part,
                              len(self._deaths), RESTART_WINDOW_S)  # fmt: skip
                    self.healthy = False
                    return

    def _fail_waiting(self) -> None:
        error = Unavailable(
            f"the {self.part} worker failed; retry", "worker_failed", self.retry_after_s
        )
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(error)
        self._queued_rows = 0
        self._metrics.queue_depth.labels(**self._labels).set(0)

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill_or_wait()
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _fill_or_wait(self) -> None:
        """Wait until a full batch is queued or the oldest item has waited `max_delay`."""
        deadline = self._queue[0].enqueued + self.max_delay_s
        while self._queued_rows < self.max_batch and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Item]:
        taken, rows = [], 0
        while self._queue and rows + len(self._queue[0].rows) <= self.max_batch:
            item = self._queue.popleft()
            self._queued_rows -= len(item.rows)
            if item.future.done():  # its request timed out or was cancelled
                continue
            taken.append(item)
            rows += len(item.rows)
        self._metrics.queue_depth.labels(**self._labels).set(self._queued_rows)
        return taken

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            now = time.perf_counter()
            for item in batch:
                self._metrics.queue_wait.labels(**self._labels).observe(now - item.enqueued)
            parts = [item.rows for item in batch]
            rows = sum(len(p) for p in parts)
            self._metrics.batch_size.labels(**self._labels).observe(rows)
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self._executor, self._assemble_and_run, parts)
            if len(out) != rows:
                raise EngineError(f"the {self.part} returned {len(out)} rows for {rows}")
            self._metrics.inference_duration.labels(**self._labels).observe(
                time.perf_counter() - started
            )
        except Exception as exc:  # an engine failure fails this batch, not the worker
            log.exception("%s inference failed on a batch of %d items", self.part, len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        start = 0
        for item in batch:
            end = start + len(item.rows)
            if not item.future.done():
                item.future.set_result(out[start:end])
            start = end
