"""`AE_WORKERS`: several processes share the port, each with its own sessions and batchers;
/metrics sums them (prometheus-client's multiprocess mode), and SIGTERM drains every one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
from uvicorn.config import STARTUP_FAILURE

from service import workers
from tests.live import DEFAULT_MODEL_DIR, ESTABLISHED, REPO, held_by, live_server, tcp_sockets
from tests.service_client import metric, running


def test_two_workers_share_the_port_and_their_metrics_add_up(scene_paths):
    image = scene_paths[0].read_bytes()
    with live_server({"AE_WORKERS": "2", "AE_LOG_LEVEL": "info"}) as server:
        assert len(server.workers()) == 2  # both serve: live_server waits until they listen
        assert server.output(100_000).count("providers in use") == 2

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


def test_a_port_another_program_listens_on_stops_start_up_with_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AE_")}
        env.update(AE_WORKERS="2", AE_MODEL_DIR=str(DEFAULT_MODEL_DIR))
        done = subprocess.run(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == STARTUP_FAILURE, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr
    assert "Started server process" not in done.stderr  # no worker was started


async def test_readiness_waits_until_every_worker_has_been_ready(
    monkeypatch, tmp_path, scene_bytes
):
    """One of two workers is ready, the other still loading: /readyz is 503 (an orchestrator
    would otherwise route traffic whose keep-alive connections all stay on the first), while
    the ready worker serves whatever reaches it. The other's mark turns it 200, for good."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    async with running(workers=2) as client:
        waiting = await client.get("/readyz")
        encoded = await client.post("/encode", content=scene_bytes[0],
                                    headers={"Content-Type": "image/jpeg"})  # fmt: skip
        (tmp_path / f"{workers.MARK}{os.getpid() + 1}").touch()  # the sibling is ready
        ready = await client.get("/readyz")
        (tmp_path / f"{workers.MARK}{os.getpid() + 1}").unlink()  # not counted again once all were
        still = await client.get("/readyz")
    assert waiting.status_code == 503 and waiting.headers["retry-after"] == "1"
    assert waiting.json()["error"]["code"] == "not_ready"
    assert "1 of 2 worker processes are still starting" in waiting.json()["error"]["message"]
    assert encoded.status_code == 200
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert still.status_code == 200
