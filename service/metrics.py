"""Prometheus metrics; their names are part of the API contract."""

from __future__ import annotations

import os
import re

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from service import workers

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCHER_LABELS = ["model", "version", "part"]
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


def multiprocess_dir() -> str | None:
    """Set when several worker processes serve one port (AE_WORKERS > 1): each writes its
    samples there and /metrics sums them (prometheus-client's multiprocess mode)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """One set per app, on its own registry, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ae_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "ae_request_duration_seconds", "Request latency", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "ae_batch_size",
            "Rows per onnxruntime call",
            BATCHER_LABELS,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ae_queue_wait_seconds", "Time a request waits in the batching queue", BATCHER_LABELS,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "ae_inference_duration_seconds", "onnxruntime time per batch", BATCHER_LABELS,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "ae_queue_depth", "Images waiting in the batching queue", BATCHER_LABELS, registry=r,
            multiprocess_mode="livesum",  # across workers: the images waiting in all of them
        )  # fmt: skip
        # Per phase, as KServe reports them: decoding requests into tensors, and turning
        # outputs into the response (PNG, .npy, JSON). Inference is ae_inference_duration.
        self.phases = {
            phase: Histogram(
                f"ae_{phase}_seconds",
                f"Time per request spent in {phase}",
                ["endpoint"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
            for phase in ("preprocess", "postprocess")
        }
        self.images = Counter(
            "ae_images", "Images or latents processed, by endpoint", ["endpoint"], registry=r
        )

    def exposition(self) -> bytes:
        """The text /metrics serves: this process's registry, or every worker's samples."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        _forget_dead_workers(folder)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)

    @staticmethod
    def worker_exited() -> None:
        """Drop this worker's live gauges from the sum (prometheus-client's cleanup)."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(os.getpid())


_LIVE_GAUGE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def _forget_dead_workers(folder: str) -> None:
    """Drop the live gauges of worker processes that died without cleaning up (killed by the
    OOM killer, SIGKILL): a dead worker has no queue, so its last depth must leave the sums."""
    for name in os.listdir(folder):
        if (match := _LIVE_GAUGE.match(name)) and not workers.alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), folder)
