"""One listening socket per worker process, so that the kernel spreads connections over them.

uvicorn's workers share the one socket its parent binds: one accept queue, and whichever worker
wakes first accepts whatever waits there, so how connections opened together (a load
balancer's pool, a benchmark) spread over the workers is the scheduler's luck, and keep-alive
ones stay where they landed (docs/benchmarks.md measures it with four workers). With
SO_REUSEPORT on Linux every worker listens on its own socket of the port's group, and the
kernel picks the socket by a hash of each connection's addresses.

uvicorn's supervisor hands each worker it starts (or restarts) the parent's socket list by
pickling it; a `Listener` pickles into a call that binds a new socket of the group in the
worker. The parent binds one too, never listening on it: it reserves the port (and resolves
port 0) before any worker starts.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable

from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("uvicorn.error")

SPREADS = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A TCP socket bound to `host:port`, not yet listening; of the port's SO_REUSEPORT group
    unless `reuse_port` is false."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn's own bind
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _bind_in_worker(host: str, port: int) -> socket.socket:
    """What a pickled `Listener` becomes in a worker. This runs before uvicorn sets up the
    worker's logging, hence stderr; the exit code stops the supervisor, which would otherwise
    start the worker again and again."""
    try:
        return bind(host, port)
    except OSError as exc:
        print(f"ERROR:    cannot listen on {host}:{port}: {exc}", file=sys.stderr, flush=True)
        sys.exit(STARTUP_FAILURE)


class Listener:
    """Stands in the supervisor's socket list for a socket each worker binds for itself."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Callable[[str, int], socket.socket], tuple[str, int]]:
        return _bind_in_worker, (self.host, self.port)


def reserve(host: str, port: int) -> tuple[socket.socket, Listener]:
    """In the parent: the port's first socket of the group (kept open, never listening; it
    receives no connections), and the `Listener` that gives each worker its own.

    A plain bind first: SO_REUSEPORT would let this server join the group of another one
    already listening there (another copy of this service, say) and take half its
    connections, where it must fail to start."""
    try:
        if port != 0:
            bind(host, port, reuse_port=False).close()
        held = bind(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        sys.exit(STARTUP_FAILURE)
    return held, Listener(host, held.getsockname()[1])
