"""Chaos under a steady load: the model lifecycle changes while clients keep sending `/encode`
and V2 `infer` to a real two-worker server on loopback, and no request may fail for it.

In order: (a) a new version is published, (b) a non-default model is unloaded and loaded again
through the repository API, (c) a version whose graph is corrupt is published, (d) one of the
two workers is killed with SIGKILL, (e) the server gets SIGTERM. Every request gets an answer:
a 200, or during the shutdown the documented 503; a request whose connection died with the
killed worker (it never reached a model) is sent again and must then succeed. The corrupt
version never serves, and before the shutdown every worker serves the new version and the
reloaded model.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.live import LiveServer, live_server, settles
from tests.test_repository import KEY, KEYED, publish

LIMIT_S = 240  # the whole run, whatever happens: the load stops by itself
HEADER = "Inference-Header-Content-Length"


def _v2_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    """A V2 request for the encoder with one encoded image as a binary BYTES tensor."""
    element = struct.pack("<I", len(image)) + image
    head = (b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],'
            b'"parameters":{"binary_data_size":%d}}],'
            b'"outputs":[{"name":"latent","parameters":{"binary_data":true}}]}') % len(element)  # fmt: skip
    return head + element, {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


class Load:
    """Clients that keep sending until stopped, each request's outcome recorded with the phase
    it was sent in."""

    def __init__(self, server: LiveServer, image: bytes, clients: int = 4) -> None:
        self.server = server
        self.image = image
        self.phase = "steady"
        self.outcomes: list[tuple[str, str, object, int | None]] = []  # phase, kind, what, ver
        self.stopped = threading.Event()
        self.deadline = time.monotonic() + LIMIT_S
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()

    def _request(self, client: httpx.Client, kind: str) -> tuple[int, int | None, str]:
        base = self.server.base
        if kind == "encode":
            reply = client.post(f"{base}/encode", content=self.image,
                                headers={"Content-Type": "image/jpeg", **KEYED})  # fmt: skip
            version = reply.json()["model"]["version"] if reply.status_code == 200 else None
        else:
            body, headers = _v2_body(self.image)
            reply = client.post(f"{base}/v2/models/intel-scenes-encoder/infer", content=body,
                                headers={**headers, **KEYED})  # fmt: skip
            version = None
            if reply.status_code == 200:
                head = reply.content[: int(reply.headers[HEADER])]
                version = int(httpx.Response(200, content=head).json()["model_version"])
        code = ""
        if reply.status_code >= 400:  # the API's code; the V2 protocol's error is a message
            error = reply.json()["error"]
            code = error["code"] if isinstance(error, dict) else f"v2: {error}"
        return reply.status_code, version, code

    def _run(self, index: int) -> None:
        kinds = ("encode", "infer")
        sent = 0
        client = httpx.Client(timeout=60)
        while not self.stopped.is_set() and time.monotonic() < self.deadline:
            kind = kinds[(index + sent) % 2]
            sent += 1
            phase = self.phase
            for _attempt in range(10):  # the same request again after a dead connection
                try:
                    status, version, code = self._request(client, kind)
                except httpx.TransportError as exc:  # counted in the phase that caused it
                    self.outcomes.append((self.phase, kind, type(exc).__name__, None))
                    client.close()
                    client = httpx.Client(timeout=60)
                    if self.phase == "shutdown" and isinstance(exc, httpx.ConnectError):
                        client.close()
                        return  # the server has stopped listening: nothing more to send
                    phase = self.phase
                    continue
                self.outcomes.append((phase, kind, status if not code else f"{status} {code}",
                                      version))  # fmt: skip
                break
            else:
                self.outcomes.append((phase, kind, "lost", None))
        client.close()

    def versions_since(self, index: int) -> set[int | None]:
        return {version for *_, version in self.outcomes[index:] if version is not None}


def _wait(condition, what: str, server: LiveServer, limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{server.output()}"
        time.sleep(0.2)


def _every_worker(
    server: LiveServer, path: str, n: int = 16, after_kill: bool = False, **kwargs
) -> list[object]:
    """What `n` fresh connections get (the kernel spreads new connections over the workers'
    sockets): the served version, or the status when it is not 200. `after_kill`: a
    connection that dies is what the load's clients may also see after the kill (it is sent
    again), so it is seen as its error's name; otherwise it fails, with the server's log."""
    seen: list[object] = []
    for _ in range(n):
        with httpx.Client(timeout=60) as client:
            try:
                reply = client.post(f"{server.base}{path}", **kwargs)
            except httpx.TransportError as exc:
                if after_kill:
                    seen.append(type(exc).__name__)
                    continue
                raise AssertionError(f"{path}: {exc!r}\n{server.output()}") from exc
            seen.append(reply.json()["model"]["version"] if reply.is_success else reply.status_code)
    return seen


def test_lifecycle_chaos_under_load(tmp_path: Path, scene_bytes):
    publish(tmp_path, "intel-scenes", 1)
    publish(tmp_path, "other", 1)
    env = {"AE_MODEL_DIR": str(tmp_path), "AE_WORKERS": "2", "AE_MODEL_CONTROL": "explicit",
           "AE_API_KEY": KEY, "AE_MODEL_POLL_S": "0.5", "AE_ACCESS_LOG": "false"}  # fmt: skip
    jpeg = {"content": scene_bytes[0], "headers": {"Content-Type": "image/jpeg", **KEYED}}
    repository_api = "/v2/repository/models/other"
    with live_server(env) as server, Load(server, scene_bytes[0]) as load:
        time.sleep(2)  # steady load first (a duration of load, not a wait for anything)
        # (a) a new version takes over
        load.phase = "publish"
        publish(tmp_path, "intel-scenes", 2)
        mark = len(load.outcomes)
        _wait(lambda: 2 in load.versions_since(mark), "version 2 to take traffic", server)
        # (b) unload and load a non-default model through the API
        load.phase = "unload-load"
        unloaded = httpx.post(f"{server.base}{repository_api}/unload", headers=KEYED, timeout=60)
        gone = settles(lambda: set(_every_worker(server, "/encode", params={"model": "other"},
                                                  **jpeg)), {404})  # every worker follows  # fmt: skip
        loaded = httpx.post(f"{server.base}{repository_api}/load", headers=KEYED, timeout=120)
        # (c) a corrupt version is published: it is refused, version 2 keeps serving
        load.phase = "corrupt"
        publish(tmp_path, "intel-scenes", 3, corrupt=True)
        mark = len(load.outcomes)
        _wait(lambda: any(row["version"] == "3" and row["state"] == "UNAVAILABLE" for row in
                          httpx.post(f"{server.base}/v2/repository/index", headers=KEYED,
                                     timeout=60).json()), "version 3 to be refused", server)  # fmt: skip
        time.sleep(2)  # load on the refused version for a while
        # (d) one of the two workers is killed; the supervisor starts another
        load.phase = "kill"
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len(server.workers()) == 2 and victim not in server.workers()
              and set(server.workers()) <= set(server.listeners()), "a replacement worker", server)  # fmt: skip
        # The replacement loads and warms up its models, then serves what the other does.
        final = settles(lambda: set(_every_worker(server, "/encode", after_kill=True, **jpeg)), {2})
        load.phase = "settled"
        time.sleep(2)  # load on the two workers again
        final_other = set(_every_worker(server, "/encode", params={"model": "other"}, **jpeg))
        # (e) SIGTERM under load
        load.phase = "shutdown"
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        log = server.output(200_000)
    outcomes = Counter((phase, what) for phase, _, what, _ in load.outcomes)
    assert unloaded.status_code == 200 and gone == {404}, gone
    assert loaded.status_code == 200
    assert final == {2} and final_other == {1}, (final, final_other, log[-4000:])
    assert 3 not in {version for *_, version in load.outcomes}  # the corrupt version never served
    # Connection errors that mean the request never reached a worker: refused once the server
    # stopped listening, or a keep-alive connection closed as idle (by the draining server, or
    # with the killed worker) just as the client reused it. Every request a worker started is
    # answered: uvicorn finishes them before it exits.
    unsent = ("ConnectError", "ReadError", "RemoteProtocolError")
    for phase, what in outcomes:
        if phase == "shutdown":  # finished, refused with the documented 503, or never sent
            refused = str(what).startswith("503 ") and "shutting" in str(what)  # V2 message
            assert what in (200, "503 shutting_down", "503 not_ready", *unsent) or refused, outcomes
        elif phase == "kill":  # sent again after its connection died, it succeeded
            assert what in (200, *unsent), outcomes
        else:
            assert what == 200, outcomes
    assert ("kill", "lost") not in outcomes and sum(
        count for (phase, what), count in outcomes.items() if what == 200
    ) > 50, outcomes
    assert code in (0, -signal.SIGTERM) and log.count("Finished server process") >= 2
