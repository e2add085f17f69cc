"""The one live-server harness: a real `python -m service` on loopback, as a user starts it.

Tests, benchmarks (bench/load.py, bench/profile.py) and the soak run all start servers here.
It depends on nothing but httpx, so it serves scripts as well as pytest; a server that exits
or never turns ready raises `ServerFailed` with the end of its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / "models"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerFailed(RuntimeError):
    """The server exited at start-up or was not ready in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    base: str
    proc: subprocess.Popen
    log_path: Path

    def output(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def pids(self) -> list[int]:
        """The server process and its descendants (worker processes with AE_WORKERS > 1)."""
        found, queue = [], [self.proc.pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    queue += [int(c) for c in (task / "children").read_text().split()]
        return found

    def workers(self) -> list[int]:
        """uvicorn's worker processes (AE_WORKERS > 1): the children it spawned, not
        multiprocessing's resource tracker; none when one process serves."""
        return [
            pid
            for pid in self.pids()
            if pid != self.proc.pid and b"spawn_main" in _read(Path(f"/proc/{pid}/cmdline"))
        ]

    def listeners(self) -> dict[int, set[str]]:
        """The server's processes that hold a socket listening on its port, and those sockets.
        With AE_WORKERS > 1 on Linux each worker binds its own once it serves (SO_REUSEPORT)."""
        listening = tcp_sockets(self.port, LISTEN)
        held = {pid: held_by(pid) & listening for pid in self.pids()}
        return {pid: sockets for pid, sockets in held.items() if sockets}

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def cpu_seconds(self) -> float:
        """User + system CPU of the server, all its processes and threads."""
        return sum(self.thread_cpu_seconds().values())

    def thread_cpu_seconds(self) -> dict[int, float]:
        """User + system CPU of each thread of the server's processes, by native thread id."""
        out = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):  # a process or thread may end meanwhile
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        out[int(task.name)] = _cpu(task / "stat")
        return out

    def rss_mb(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM (a graceful drain), then SIGKILL past `timeout_s`; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


ESTABLISHED, LISTEN = "01", "0A"  # TCP states as /proc/net/tcp writes them


def tcp_sockets(port: int, state: str) -> set[str]:
    """The IPv4 TCP sockets on local `port` in `state`, named as /proc/PID/fd links name them."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
            found.add(f"socket:[{fields[9]}]")
    return found


def held_by(pid: int) -> set[str]:
    """What process `pid`'s file descriptors point at (nothing once it has exited)."""
    held = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                held.add(os.readlink(fd))
    return held


def _read(path: Path) -> bytes:
    with contextlib.suppress(OSError):  # the process has exited
        return path.read_bytes()
    return b""


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def service_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a test server starts in: this one without its `AE_*` settings, the
    default model, then `env`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AE_")}
    full_env.update({"AE_MODEL_DIR": str(DEFAULT_MODEL_DIR), **(env or {})})
    return full_env


@contextlib.contextmanager
def live_server(
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
    ready_timeout_s: float = 120,
) -> Iterator[LiveServer]:
    """Start the server with `AE_*` overrides in `env`, wait for /readyz, stop it after.

    The default model and only the given `AE_*` settings: the caller's own `AE_*` variables
    would change what a test or benchmark sees. `argv` replaces `python -m service` (it gets
    `--host 127.0.0.1 --port P` too). With several workers, ready means every one listens:
    keep-alive clients that connect while one is still warming up would all stay on the
    others and skew what they measure. The log goes to a file, not a pipe, so a long run cannot
    fill a pipe buffer and stall the server.
    """
    port = free_port()
    full_env = service_env(env)
    command = [*(argv or [sys.executable, "-m", "service"]), "--host", "127.0.0.1"]
    with tempfile.NamedTemporaryFile("w+", prefix="live-server-", suffix=".log") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        server = LiveServer(f"http://127.0.0.1:{port}", proc, Path(log.name))
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    raise ServerFailed(
                        f"the server exited early ({proc.returncode}):\n{server.output()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{server.base}/readyz", timeout=1).status_code == 200 and (
                        set(server.workers()) <= set(server.listeners())
                    ):
                        break
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        f"the server was not ready in {ready_timeout_s:g} s:\n{server.output()}"
                    )
                time.sleep(0.2)
            yield server
        finally:
            server.stop()


def settles(observe, expected, limit_s: float = 90):
    """What `observe()` returns once it equals `expected`, or what it last returned when
    `limit_s` has passed: waiting for a server to converge, with a bound for a slow machine
    (not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while (seen := observe()) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return seen


_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in Prometheus text whose labels include `labels`
    (other labels, e.g. a batcher's model and version, are summed over); 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total
