"""`python -m service` as a user starts it: a real uvicorn process on loopback."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.live import live_server


@pytest.fixture
def server():
    with live_server({"AE_MAX_QUEUE_DELAY_MS": "20"}) as server:
        yield server


def test_curl_style_multipart_encode_and_clean_shutdown(server, scene_paths):
    base, proc = server.base, server.proc
    with open(scene_paths[0], "rb") as fh:
        reply = httpx.post(
            f"{base}/encode",
            files={"images": (scene_paths[0].name, fh)},
            headers={"X-Request-ID": "curl-test-42"},
            timeout=30,
        )
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "curl-test-42"
    generated = httpx.get(f"{base}/model", timeout=10).headers["x-request-id"]
    assert len(generated) == 32 and generated != "curl-test-42"
    latents = reply.json()["latents"]
    assert len(latents) == 1 and len(latents[0]) == 1024
    assert all(isinstance(v, float) for v in latents[0])
    card = httpx.get(f"{base}/model", timeout=10).json()
    assert "CPUExecutionProvider" in card["providers"]

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    output = server.output()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in output
    assert "providers in use" in output  # the start-up log names the providers
    # The access line of each request carries its id, the client's or a generated one.
    assert '"POST /encode HTTP/1.1" 200 OK [curl-test-42]' in output
    assert f"[{generated}]" in output
