"""`AE_WORKERS`: several processes share the port, each with its own sessions and batchers;
/metrics sums them (prometheus-client's multiprocess mode), and SIGTERM drains every one."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.live import live_server
from tests.service_client import metric


def test_two_workers_share_the_port_and_their_metrics_add_up(scene_paths):
    image = scene_paths[0].read_bytes()
    with live_server({"AE_WORKERS": "2", "AE_LOG_LEVEL": "info"}) as server:
        workers = [p for p in server.pids() if p != server.proc.pid]
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in workers]
        assert sum(b"spawn_main" in c for c in cmdlines) == 2, cmdlines
        deadline = time.monotonic() + 60  # the second worker may still be warming up
        while server.output(100_000).count("providers in use") < 2:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)

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
