"""`python -m service` as a user starts it: a real uvicorn process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL_DIR, REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_server():
    port = _free_port()
    env = {**os.environ, "AE_MODEL_DIR": str(DEFAULT_MODEL_DIR), "AE_MAX_QUEUE_DELAY_MS": "20"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not become ready in 60 s")
    yield base, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_curl_style_multipart_encode_and_clean_shutdown(live_server, scene_paths):
    base, proc = live_server
    with open(scene_paths[0], "rb") as fh:
        reply = httpx.post(
            f"{base}/encode", files={"images": (scene_paths[0].name, fh)}, timeout=30
        )
    assert reply.status_code == 200
    latents = reply.json()["latents"]
    assert len(latents) == 1 and len(latents[0]) == 1024
    assert all(isinstance(v, float) for v in latents[0])
    card = httpx.get(f"{base}/model", timeout=10).json()
    assert "CPUExecutionProvider" in card["providers"]

    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in output
    assert "providers in use" in output  # the start-up log names the providers
