"""No name is looked up: the real service, and a batch job, in a network namespace whose only
resolver logs.

onnxruntime >= 1.31 on Linux uploads usage telemetry to a Microsoft collector unless told not to
(aecore switches it off). This test proves the switch holds as a user runs the code. As root, it
starts this file as a script under `unshare --net --mount`; there, only loopback exists,
/etc/resolv.conf points at 127.0.0.1, and a DNS listener on 127.0.0.1:53 records every query
and answers NXDOMAIN. The script starts `python -m service` with tests/live.py and calls every
endpoint with real images, while a batch job runs the model through aecore.runner; both stay up
a while, then stop. Only then does a child process look up a name of its own: that control
proves the listener sees lookups, so "no query" means none was made.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
CONTROL_NAME = "telemetry-control.example.invalid"
# How long the processes stay up after their last inference. Without the switch, onnxruntime
# 1.32 looked its collector up about 9 s after a process started, then every 5.5 s.
QUIET_S = 15
# A batch job as the benchmarks and training scripts run one: aecore.machine imports onnxruntime
# before anything imports aecore.graphs, so the switch must not depend on the import order.
BATCH_JOB = """
import sys, time
import numpy as np
from aecore.machine import machine
machine()
from aecore.runner import Autoencoder
from tests.conftest import DEFAULT_MODEL_DIR, SCENES
model = Autoencoder(DEFAULT_MODEL_DIR / "intel-scenes" / "1")
model.reconstruct_all(np.stack([model.preprocess(p.read_bytes()) for p in SCENES.glob("*/*.jpg")]))
time.sleep(float(sys.argv[1]))
"""


def namespace_unavailable() -> str | None:
    """Why `unshare --net --mount` cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: the test runs the service under `unshare --net --mount`"
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare --net --mount` fails here: {probe.stderr.strip()}"
    return None


def test_the_service_and_a_batch_job_look_up_no_name(tmp_path):
    reason = namespace_unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"CI runs as root, so this test must run, but: {reason}")
        pytest.skip(reason)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        ["unshare", "--net", "--mount", "--", sys.executable, __file__, str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, f"inside the namespace:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    seen = json.loads((tmp_path / "lookups.json").read_text())
    assert CONTROL_NAME in seen["control"], (
        f"the listener did not see the control lookup ({seen}), so it would miss any other too"
    )
    assert seen["project"] == [], f"looked up: {sorted(set(seen['project']))}"


# ---------------------------------------------------------------- inside the namespace


class QueryLog:
    """Every name asked of the listener; each is answered NXDOMAIN."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.lock = threading.Lock()

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            with self.lock:
                self.names.append(f"<unparsable query of {len(wire)} bytes>")
            return None
        with self.lock:
            self.names += [q.name.to_text(omit_final_dot=True) for q in query.question]
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply.to_wire()

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.names)


def serve_dns(log: QueryLog) -> None:
    """Listen on 127.0.0.1:53, UDP and TCP (resolvers retry over TCP), in daemon threads."""

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            wire, sock = self.request
            reply = log.answer(wire)
            if reply is not None:
                sock.sendto(reply, self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while len(head := self.rfile.read(2)) == 2:
                reply = log.answer(self.rfile.read(int.from_bytes(head, "big")))
                if reply is None:
                    return
                self.wfile.write(len(reply).to_bytes(2, "big") + reply)

    for server_cls, handler in (
        (socketserver.ThreadingUDPServer, Udp),
        (socketserver.ThreadingTCPServer, Tcp),
    ):
        server_cls.daemon_threads = True
        server = server_cls(("127.0.0.1", 53), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()


def loopback_up() -> None:
    """`ip link set lo up` without needing iproute2: SIOCGIFFLAGS, then SIOCSIFFLAGS | IFF_UP."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    ifreq = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in a 24-byte union
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _, flags = ifreq.unpack(fcntl.ioctl(sock, siocgifflags, ifreq.pack(b"lo", 0)))
        fcntl.ioctl(sock, siocsifflags, ifreq.pack(b"lo", flags | iff_up))


def resolve_through_loopback(workdir: Path) -> None:
    """Bind-mount (in this mount namespace only) a resolv.conf naming 127.0.0.1 and an
    nsswitch.conf that asks DNS, so no other resolver (systemd-resolved, mDNS) is consulted."""
    files = {
        "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        "nsswitch.conf": "hosts: files dns\n",
    }
    for name, text in files.items():
        (workdir / name).write_text(text)
        subprocess.run(["mount", "--bind", str(workdir / name), f"/etc/{name}"], check=True)


def use_every_endpoint(base: str) -> None:
    """One real request to each endpoint, with the committed scene photos; each must succeed."""
    from tests.conftest import SCENES

    photos = [p.read_bytes() for p in sorted(SCENES.glob("*/*.jpg"))[:2]]
    files = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(photos)]
    with httpx.Client(base_url=base, timeout=120) as client:
        encoded = client.post("/encode", files=files)
        replies = [
            encoded,
            client.post("/decode", json={"latents": encoded.json()["latents"]}),
            client.post("/reconstruct", files=files),
            client.post("/anomaly-score", params={"heatmap": "true"}, files=files),
            client.post("/interpolate", files=files, data={"steps": "2"}),
            client.get("/model"),
            report := client.get("/model/report"),
            client.get(f"/model/report/{report.json()['figures'][0]}"),
            client.get("/metrics"),
            client.get("/healthz"),
            client.get("/readyz"),
            client.get("/"),
            client.get("/openapi.json"),
            client.get("/docs"),
        ]
    failed = [
        (r.request.url.path, r.status_code, r.text[:200]) for r in replies if r.status_code != 200
    ]
    assert not failed, failed


def inside_namespace(workdir: Path) -> None:
    from tests.live import live_server

    loopback_up()
    resolve_through_loopback(workdir)
    log = QueryLog()
    serve_dns(log)
    batch = subprocess.Popen([sys.executable, "-c", BATCH_JOB, str(QUIET_S)], cwd=REPO)
    with live_server() as server:
        use_every_endpoint(server.base)
        time.sleep(QUIET_S)
    assert batch.wait(timeout=300) == 0, "the batch job failed"
    project = log.snapshot()  # from before the starts to after the exits
    subprocess.run([sys.executable, "-c", f"import socket; socket.getaddrinfo({CONTROL_NAME!r}, 80)"],
                   capture_output=True, timeout=30)  # fmt: skip
    control = log.snapshot()[len(project) :]
    (workdir / "lookups.json").write_text(json.dumps({"project": project, "control": control}))


if __name__ == "__main__":
    inside_namespace(Path(sys.argv[1]))
