"""`AE_WORKERS`: several processes share the port, each with its own sessions and batchers;
/metrics sums them (prometheus-client's multiprocess mode), and SIGTERM drains every one."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from uvicorn.config import STARTUP_FAILURE

from service import listeners, workers
from service.__main__ import metrics_folder
from tests.live import ESTABLISHED, REPO, held_by, live_server, service_env, tcp_sockets
from tests.service_client import metric, running


def test_two_workers_share_the_port_and_their_metrics_add_up(scene_paths):
    image = scene_paths[0].read_bytes()
    with live_server({"AE_WORKERS": "2", "AE_LOG_LEVEL": "info"}) as server:
        assert len(server.workers()) == 2  # both serve: live_server waits until they listen

        def encode(i: int) -> int:
            return httpx.post(
                f"{server.base}/encode",
                content=image,
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(encode, range(40)))
        text = httpx.get(f"{server.base}/metrics", timeout=10).text
        card = httpx.get(f"{server.base}/model", timeout=10).json()
        code = server.stop()
        log = server.output(100_000)
    assert statuses == [200] * 40
    # Whichever worker answered /metrics, it reports both workers' requests.
    assert metric(text, "ae_images_total", endpoint="encode") == 40
    assert metric(text, "ae_requests_total", endpoint="/encode", status="200") == 40
    assert card["intra_op_threads"] >= 1
    assert code in (0, -signal.SIGTERM)
    assert log.count("Finished server process") == 2 and "Traceback" not in log


def test_connections_opened_together_are_spread_over_the_workers(scene_paths):
    """A pool of keep-alive clients that connect at once (a load balancer, a benchmark) must
    not all land on one worker: each worker listens on its own SO_REUSEPORT socket and the
    kernel spreads connections by their addresses. With uvicorn's one shared socket, how they
    spread was the scheduler's luck (with four workers, as uneven as 1-7-7-18 of 33)."""
    image = scene_paths[0].read_bytes()
    with live_server({"AE_WORKERS": "2"}) as server:
        port = server.port
        workers = server.workers()
        listeners = server.listeners()  # each worker its own socket once it serves
        assert len(workers) == 2 and set(listeners) == set(workers)
        assert len(set.union(*listeners.values())) == 2
        clients = [httpx.Client(base_url=server.base, timeout=60) for _ in range(32)]
        try:

            def encode(client: httpx.Client) -> int:
                reply = client.post("/encode", content=image,
                                    headers={"Content-Type": "image/jpeg"})  # fmt: skip
                return reply.status_code

            with ThreadPoolExecutor(32) as pool:
                statuses = list(pool.map(encode, clients))
            connections = tcp_sockets(port, ESTABLISHED)
            counts = {pid: len(connections & held_by(pid)) for pid in workers}
        finally:
            for client in clients:
                client.close()
    assert statuses == [200] * 32
    assert sum(counts.values()) == 32, counts
    # 32 connections hashed over 2 sockets: fewer than 4 on one happens 3 times in a million.
    assert min(counts.values()) >= 4, counts


def _start(port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m service` on 127.0.0.1:`port` that is expected not to start, run to its end."""
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.run(command, cwd=REPO, env=service_env(env), capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_a_port_another_program_listens_on_stops_start_up_with_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _start(port, {"AE_WORKERS": "2"})
    assert done.returncode == STARTUP_FAILURE, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr
    assert "Started server process" not in done.stderr  # no worker was started


async def test_readiness_waits_until_every_worker_has_been_ready(
    monkeypatch, tmp_path, scene_bytes
):
    """One of two workers is ready, the other still loading: /readyz is 503 (an orchestrator
    would otherwise route traffic whose keep-alive connections all stay on the first), while
    the ready worker serves whatever reaches it. A mark left by a worker that has died does
    not count; a live sibling's does, and for good once every worker has been ready."""
    monkeypatch.setenv(workers.FOLDER_ENV, str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        async with running(workers=2) as client:
            waiting = await client.get("/readyz")
            encoded = await client.post("/encode", content=scene_bytes[0],
                                        headers={"Content-Type": "image/jpeg"})  # fmt: skip
            (tmp_path / f"{workers.MARK}{gone.pid}").touch()  # ready once, then died
            still_waiting = await client.get("/readyz")
            (tmp_path / f"{workers.MARK}{sibling.pid}").touch()  # the other worker is ready
            ready = await client.get("/readyz")
            sibling.kill()
            sibling.wait()
            after_a_death = await client.get("/readyz")
    finally:
        sibling.kill()
    assert waiting.status_code == 503 and waiting.headers["retry-after"] == "1"
    assert waiting.json()["error"]["code"] == "not_ready"
    assert "1 of 2 worker processes are still starting" in waiting.json()["error"]["message"]
    assert encoded.status_code == 200
    assert still_waiting.status_code == 503
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert after_a_death.status_code == 200  # a restart does not take the server out


def test_a_second_server_on_the_same_port_does_not_start_and_leaves_the_first_alone(tmp_path):
    """SO_REUSEPORT would let a second copy join the first one's group and take half its
    connections; it must fail instead, before it empties the metrics folder they share."""
    shared = {"AE_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with live_server(shared) as first:
        marks = sorted(p.name for p in tmp_path.glob(f"{workers.MARK}*"))
        second = _start(first.port, shared)
        assert second.returncode == STARTUP_FAILURE, second.stderr
        assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr
        assert sorted(p.name for p in tmp_path.glob(f"{workers.MARK}*")) == marks
        assert len(marks) == 2
        assert httpx.get(f"{first.base}/readyz", timeout=10).status_code == 200
        assert len(first.listeners()) == 2


def test_a_worker_that_fails_to_start_fails_the_server():
    """uvicorn's supervisor stops when a worker cannot start but exits 0, which a process
    manager would take for a clean stop; the server exits with uvicorn's STARTUP_FAILURE."""
    done = _start(0, {"AE_WORKERS": "2", "AE_MODEL_DIR": "/nonexistent/models"})
    assert done.returncode == STARTUP_FAILURE, done.stderr[-2000:]


def test_a_killed_worker_is_replaced_by_one_with_its_own_socket():
    with live_server({"AE_WORKERS": "2"}) as server:
        before = server.listeners()
        victim, survivor = list(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while len(now := server.listeners()) < 2 or victim in now:  # uvicorn starts another
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        ready = httpx.get(f"{server.base}/readyz", timeout=10)
    replacement = next(pid for pid in now if pid != survivor)
    assert now[survivor] == before[survivor]  # the survivor kept its socket
    assert len(now[replacement]) == 1 and now[replacement] != before[victim]
    assert ready.status_code == 200  # every worker has been ready once: a restart is not a start


def test_a_listener_pickles_into_a_socket_of_the_reserved_port():
    """What uvicorn's supervisor sends each worker: the port, resolved from 0 in the parent,
    becomes a socket of the same SO_REUSEPORT group when the worker unpickles it."""
    held, listener = listeners.reserve("127.0.0.1", 0)
    with held, pickle.loads(pickle.dumps(listener)) as sock:
        assert listener.port == held.getsockname()[1] != 0
        assert sock.getsockname() == ("127.0.0.1", listener.port)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def test_a_new_server_forgets_the_previous_ones_metrics_and_ready_marks(monkeypatch, tmp_path):
    for name in ("counter_123.db", f"{workers.MARK}123", "notes.txt"):
        (tmp_path / name).touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert metrics_folder() == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
