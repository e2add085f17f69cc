"""Dynamic batching across requests, one batcher per graph.

Requests put their rows on a bounded queue, from the event loop (`submit`) or straight from the
decoding thread that finished a request's images (`put`: no trip through the event loop between
decoding and inference). One inference thread per graph takes up to `max_batch` rows, or
whatever arrived within `max_delay` of the oldest waiting row, assembles them into one buffer,
runs one onnxruntime call and hands every request its own rows back, all batches' results in one
call into the event loop. A request larger than `max_batch` is split into chunks and rejoined in
order.

The inference thread is supervised: if it dies (a bug outside the engine call), every waiting
request is failed at once with 503 `worker_failed` instead of waiting out its deadline, the
failure is logged, and the thread goes on; one that keeps dying marks the batcher unhealthy,
which turns /readyz to 503 so that an orchestrator replaces the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import Busy, Unavailable
from service.metrics import Metrics

log = logging.getLogger(__name__)

RESTARTS = 3  # worker deaths within RESTART_WINDOW_S before the batcher is declared unhealthy
RESTART_WINDOW_S = 60.0


class EngineError(RuntimeError):
    """The engine broke its contract (e.g. returned a different number of rows)."""


@dataclass(eq=False)
class Pending:
    """One request's place in a batcher: its future (on the event loop), the results of its
    chunks as they come back, and the deadline that fails it with 429 `queue_timeout`."""

    future: asyncio.Future
    parts: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0
    timer: asyncio.TimerHandle | None = None

    def settle(self, result: np.ndarray | None = None, error: BaseException | None = None):
        """On the event loop: resolve the request once (a late result after its timeout or
        cancellation is dropped)."""
        if self.timer is not None:
            self.timer.cancel()
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def settle_threadsafe(
        self, result: np.ndarray | None = None, error: BaseException | None = None
    ) -> None:
        """`settle`, from any thread."""
        _call(self.future.get_loop(), self.settle, result, error)


@dataclass(eq=False)
class _Item:
    rows: np.ndarray
    pending: Pending
    index: int  # which chunk of its request
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
        self.run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        # Every metric of this batcher: its model and version (a repository serves several);
        # the labelled children are looked up once, not per request.
        labels = {"model": "", "version": "", **(labels or {}), "part": part}
        self._depth = metrics.queue_depth.labels(**labels)
        self._waits = metrics.queue_wait.labels(**labels)
        self._sizes = metrics.batch_size.labels(**labels)
        self._inference = metrics.inference_duration.labels(**labels)
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._ready = threading.Condition()  # guards the queue and `_closing`
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._deaths: deque[float] = deque()
        self.healthy = True

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # One inference thread per graph: onnxruntime parallelises inside a call already.
        self._thread = threading.Thread(target=self._supervise, name=f"ort-{self.part}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    async def stop(self) -> None:
        """Finish what is queued, then stop the inference thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def depth(self) -> int:
        return self._queued_rows

    # -- putting rows in ---------------------------------------------------------------------
    def check(self, rows: int) -> None:
        """Raise what `submit` would raise for `rows` more rows: shutting down, unhealthy, full.
        Callers that decode first check here, before the work."""
        if self._closing:
            raise Unavailable("the server is shutting down", "shutting_down", self.retry_after_s)
        if not self.healthy:
            raise Unavailable(
                f"the {self.part} worker failed repeatedly; see the server log",
                "worker_failed",
                self.retry_after_s,
            )
        if self._queued_rows + rows > self.max_queue:
            raise Busy(
                f"the {self.part} queue is full ({self._queued_rows} images waiting); retry later",
                "queue_full",
                self.retry_after_s,
            )

    def pending(self) -> Pending:
        """On the event loop: a request's place, failed with 429 `queue_timeout` if its rows
        are not back within the batcher's timeout."""
        loop = asyncio.get_running_loop()
        pending = Pending(loop.create_future())
        busy = Busy(
            f"waited more than {self.timeout_s:g} s for the {self.part}; retry later",
            "queue_timeout",
            self.retry_after_s,
        )
        pending.timer = loop.call_later(self.timeout_s, pending.settle, None, busy)
        return pending

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Run `rows` through the graph, batched with other requests; results in order."""
        self.check(len(rows))
        pending = self.pending()
        self.put(rows, pending)
        try:
            return await pending.future
        finally:
            pending.timer.cancel()  # answered, or cancelled (the client went away)

    def put(self, rows: np.ndarray, pending: Pending) -> None:
        """Queue `rows` for `pending`; safe from any thread (a decoding thread hands its batch
        over here). Refusals (full, shutting down) reach the request through its future."""
        try:
            with self._ready:
                self.check(len(rows))
                chunks = [rows[i : i + self.max_batch] for i in range(0, len(rows), self.max_batch)]
                pending.parts, pending.remaining = [None] * len(chunks), len(chunks)
                self._queue.extend(_Item(chunk, pending, i) for i, chunk in enumerate(chunks))
                self._queued_rows += len(rows)
                self._depth.set(self._queued_rows)
                self._ready.notify()
        except (Busy, Unavailable) as exc:
            pending.settle_threadsafe(error=exc)

    # -- the inference thread --------------------------------------------------------------
    def _supervise(self) -> None:
        while True:
            try:
                self._serve()
                return  # closing, queue drained
            except Exception:
                log.exception(
                    "the %s batching worker died; failing its waiting requests", self.part
                )
                now = time.monotonic()
                self._deaths.append(now)
                while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
                    self._deaths.popleft()
                dead = len(self._deaths) >= RESTARTS
                if dead:
                    # Under the lock `put` checks health under, and before the queue is
                    # failed: a request that arrives meanwhile is either failed with the
                    # queue or refused, never left queued for a thread that is gone.
                    with self._ready:
                        self.healthy = False
                self._fail_waiting()
                if dead:
                    log.error("the %s worker died %d times in %g s: unhealthy", self.part,
                              len(self._deaths), RESTART_WINDOW_S)  # fmt: skip
                    return

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    if self._closing:
                        return
                    self._ready.wait()
                self._fill_or_wait()
                batch = self._take()
            if batch:
                self._execute(batch)

    def _fill_or_wait(self) -> None:
        """Holding the lock: wait until a full batch is queued or the oldest item has waited
        `max_delay`."""
        deadline = self._queue[0].enqueued + self.max_delay_s
        while self._queued_rows < self.max_batch and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._ready.wait(remaining)

    def _take(self) -> list[_Item]:
        taken, rows = [], 0
        while self._queue and rows + len(self._queue[0].rows) <= self.max_batch:
            item = self._queue.popleft()
            self._queued_rows -= len(item.rows)
            if item.pending.future.done():  # its request timed out or was cancelled
                continue
            taken.append(item)
            rows += len(item.rows)
        self._depth.set(self._queued_rows)
        return taken

    def _fail_waiting(self) -> None:
        error = Unavailable(
            f"the {self.part} worker failed; retry", "worker_failed", self.retry_after_s
        )
        with self._ready:
            waiting = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._depth.set(0)
        _call(self._loop, _settle_all, [item.pending for item in waiting], error)

    def _execute(self, batch: list[_Item]) -> None:
        now = time.perf_counter()
        for item in batch:
            self._waits.observe(now - item.enqueued)
        parts = [item.rows for item in batch]
        rows = sum(len(p) for p in parts)
        self._sizes.observe(rows)
        try:
            # One buffer for the batch, assembled here, off the event loop.
            out = self.run(parts[0] if len(parts) == 1 else np.concatenate(parts))
            if len(out) != rows:
                raise EngineError(f"the {self.part} returned {len(out)} rows for {rows}")
        except Exception as exc:  # an engine failure fails this batch, not the worker
            log.exception("%s inference failed on a batch of %d items", self.part, len(batch))
            _call(self._loop, _settle_all, [item.pending for item in batch], exc)
            return
        self._inference.observe(time.perf_counter() - now)
        _call(self._loop, _deliver, batch, out)


def _call(loop: asyncio.AbstractEventLoop, callback: Callable, *args) -> None:
    """Run `callback(*args)` on `loop`, from whichever thread we are on."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


def _deliver(batch: list[_Item], out: np.ndarray) -> None:
    """On the event loop: every item's rows of `out` to its request, rejoined in order."""
    start = 0
    for item in batch:
        end = start + len(item.rows)
        pending = item.pending
        if not pending.future.done():
            pending.parts[item.index] = out[start:end]
            pending.remaining -= 1
            if pending.remaining == 0:
                parts = pending.parts
                pending.settle(parts[0] if len(parts) == 1 else np.concatenate(parts))
        start = end


def _settle_all(pendings: list[Pending], error: BaseException) -> None:
    for pending in dict.fromkeys(pendings):  # a request with several chunks, once
        pending.settle(error=error)
