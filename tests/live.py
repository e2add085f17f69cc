"""A real `python -m service` on loopback, as a user starts it, for tests that need a live server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL_DIR, REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_service(ready_timeout_s: float = 90, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server with `AE_*` overrides in `env`; yield (base URL, process); stop it after.

    The default model and only the given `AE_*` settings (the caller's environment would change
    what the tests see). The log goes to a file, not a pipe, so a long test cannot fill a pipe
    buffer and stall the server; it is shown when start-up fails, and readable as `proc.log`.
    """
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AE_")}
    full_env.update({"AE_MODEL_DIR": str(DEFAULT_MODEL_DIR), **env})
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        proc.log = log

        def output() -> str:
            log.flush()
            log.seek(0)
            return log.read()[-4000:]

        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the server exited early ({proc.returncode}):\n{output()}")
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the server was not ready in {ready_timeout_s:g} s:\n{output()}")
                time.sleep(0.2)
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
