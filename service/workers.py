"""Readiness across worker processes (AE_WORKERS > 1): the server is ready once every worker
has been.

A worker that is still loading accepts no connections, so a probe always reaches one that is
ready. Were that enough, an orchestrator would send traffic while the others still load, and the
keep-alive connections opened then would stay on the workers that were up: on this project's
2-core VM, clients that connected as soon as the first of two workers answered all 33 stayed on
it, at half the throughput. So each worker leaves a mark in the folder the workers share (the
one their metrics meet in, emptied by the parent at start) when it first turns ready, and
/readyz answers 200 once there are as many marks as workers. A worker restarted later adds its
own: a restart does not take the server out of rotation.
"""

from __future__ import annotations

import os
from pathlib import Path

MARK = "ready-"  # + the pid of a worker that has been ready


def mark_ready(folder: str | None) -> None:
    """Record that this worker process is ready (nothing when one process serves)."""
    if folder is not None:
        Path(folder, f"{MARK}{os.getpid()}").touch()


def started(folder: str | None) -> int:
    """How many worker processes have been ready."""
    return 0 if folder is None else sum(1 for _ in Path(folder).glob(f"{MARK}*"))
