"""Readiness across the worker processes `python -m service` starts (AE_WORKERS > 1): the
server is ready once every worker is.

A worker that is still loading accepts no connections, so a probe always reaches one that is
ready. Were that enough, an orchestrator would route traffic while the others still load, and
the keep-alive connections opened then would all stay on the workers that were up
(docs/benchmarks.md, "What paid"). So `python -m service` gives its workers a folder; each
worker leaves a mark there when it turns ready, and /readyz answers 200 once as many live
workers have marked as AE_WORKERS asks for. From then on it stops counting: a worker restarted
later does not take the server out of rotation.
"""

from __future__ import annotations

import os
from pathlib import Path

FOLDER_ENV = "CONVAE_READY_MARKS"  # set by `python -m service` for the workers it starts
MARK = "ready-"  # + the pid of a worker that has turned ready


def folder() -> str | None:
    """Where this server's workers mark themselves ready; None when one process serves."""
    return os.environ.get(FOLDER_ENV) or None


def mark_ready() -> None:
    """Record that this worker process is ready."""
    if (where := folder()) is not None:
        Path(where, f"{MARK}{os.getpid()}").touch()


def ready_workers() -> int:
    """How many live worker processes have marked themselves ready (a worker that died
    after marking, and its replacement, count once)."""
    where = folder()
    if where is None:
        return 0
    return sum(alive(int(mark.name[len(MARK) :])) for mark in Path(where).glob(f"{MARK}*"))


def alive(pid: int) -> bool:
    """Whether process `pid` runs: a killed worker stays a zombie until its supervisor reaps
    it, and a zombie is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's: not ours, but a pid is not reused that fast
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # not Linux, or gone meanwhile
        return True
    return state not in ("Z", "X")
