"""How many threads the engine and the decode pool get: the CPUs this process may use (its
affinity and its container's CPU quota), divided among the worker processes of the server."""

from __future__ import annotations

import logging

from aecore.graphs import usable_cores
from service.settings import Settings

log = logging.getLogger(__name__)


def thread_budget(settings: Settings) -> tuple[int, int]:
    """(onnxruntime intra-op threads per session, decode pool threads) for one worker process;
    AE_INTRA_OP_THREADS and AE_DECODE_THREADS override them."""
    cpus, source = usable_cores()
    share = settings.workers
    intra_op = settings.intra_op_threads or max(1, cpus // share)
    decode = settings.decode_threads or max(1, cpus // share)
    log.info("threads: %d CPUs (%s) for %d worker process(es): %d intra-op, %d decode per "
             "process", cpus, source, share, intra_op, decode)  # fmt: skip
    return intra_op, decode
