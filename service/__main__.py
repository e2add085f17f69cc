"""`python -m service [--host H] [--port P]`: run the API with uvicorn."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service import listeners, workers
from service.app import create_app
from service.logs import log_config
from service.repository import control
from service.settings import get_settings

log = logging.getLogger("uvicorn.error")


def main(argv: list[str] | None = None) -> None:
    try:
        settings = get_settings()
    except ValidationError as exc:  # a setting the server must not start with: say which
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in exc.errors())  # fmt: skip
        sys.exit(f"convae-serve will not start: {problems}")
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    common = dict(
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        log_config=log_config(settings.log_level),
        timeout_graceful_shutdown=30,
    )
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    # Several processes share the port; each builds its own app (sessions, batchers) from the
    # same environment, and their metrics and ready marks meet in one folder.
    app = "service.app:create_app"
    if not listeners.SPREADS:  # one socket shared by every worker, as uvicorn binds it
        share_folder()
        uvicorn.run(app, factory=True, workers=settings.workers, **common)
        return
    held, listener = listeners.reserve(args.host, args.port)  # before touching the folder
    share_folder()
    config = uvicorn.Config(app, factory=True, workers=settings.workers, **common)
    address = f"[{args.host}]" if ":" in args.host else args.host
    log.info("Uvicorn running on http://%s:%d, one listening socket per worker (Press CTRL+C "
             "to quit)", address, listener.port)  # fmt: skip
    supervisor = Multiprocess(config, sockets=[listener])  # type: ignore[list-item]
    with held:
        supervisor.run()
    # uvicorn's supervisor stops when a worker fails to start, but returns as if all went well.
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        sys.exit(STARTUP_FAILURE)


def share_folder() -> None:
    """The folder the workers' metrics and ready marks meet in, in their environment."""
    folder = metrics_folder()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    os.environ[workers.FOLDER_ENV] = folder


def metrics_folder() -> str:
    """The operator's PROMETHEUS_MULTIPROC_DIR, emptied (stale samples of a previous run
    would be summed in, its workers' ready marks counted and its model control applied), or a
    new temporary folder."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return tempfile.mkdtemp(prefix="convae-metrics-")
    os.makedirs(folder, exist_ok=True)
    for pattern in ("*.db", f"{workers.MARK}*", control.FILE, f".{control.FILE}*"):
        for stale in glob.glob(os.path.join(folder, pattern)):
            os.remove(stale)
    return folder


if __name__ == "__main__":
    main()
