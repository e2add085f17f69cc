"""One listening socket per worker process, so that the kernel spreads connections over them.

uvicorn's workers share the one socket its parent binds: one accept queue, and whichever worker
wakes first accepts whatever waits there, so how connections opened together (a load
balancer's pool, a benchmark) spread is the scheduler's luck, and keep-alive ones stay where
they landed. On this project's 2-core VM, four workers up and 33 connections opened at once,
five starts each: the shared socket split them from 3-9-9-12 to 1-7-7-18, a socket per worker
from 7-8-9-9 to 4-8-10-11. With SO_REUSEPORT on Linux every worker listens on its own socket
of the port's group and the kernel picks the socket by a hash of each connection's addresses.
(Clients that connect while some workers still load land on the others whatever the sockets:
that is /readyz's to prevent, service/workers.py.)

uvicorn's supervisor hands each worker it starts (or restarts) the parent's socket list by
pickling it; a `Listener` pickles into a call that binds a new socket of the group in the
worker. The parent binds one too, never listening on it: it reserves the port (and resolves
port 0) before any worker starts, and a port taken by another program fails start-up there.
"""

from __future__ import annotations

import logging
import socket
import sys

from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("uvicorn.error")

SPREADS = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket of `host:port`'s SO_REUSEPORT group, bound, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn's own bind
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _bind_in_worker(host: str, port: int) -> socket.socket:
    """What a pickled `Listener` becomes in a worker; a failure stops the supervisor (uvicorn
    restarts workers that die, except with STARTUP_FAILURE)."""
    try:
        return bind(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        sys.exit(STARTUP_FAILURE)


class Listener:
    """Stands in the supervisor's socket list for a socket each worker binds for itself."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self):
        return _bind_in_worker, (self.host, self.port)


def reserve(host: str, port: int) -> tuple[socket.socket, Listener]:
    """In the parent: the port's first socket of the group (kept open, never listening; it
    receives no connections), and the `Listener` that gives each worker its own."""
    try:
        held = bind(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        sys.exit(STARTUP_FAILURE)
    return held, Listener(host, held.getsockname()[1])
