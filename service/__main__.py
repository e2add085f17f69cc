"""`python -m service [--host H] [--port P]`: run the API with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import tempfile

import uvicorn
from uvicorn.supervisors import Multiprocess

from service import listeners, workers
from service.app import create_app
from service.logs import log_config
from service.settings import get_settings

log = logging.getLogger("uvicorn.error")


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
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
    # same environment, and their metrics meet in one folder that /metrics sums.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_folder()
    app = "service.app:create_app"
    if not listeners.SPREADS:  # one socket shared by every worker, as uvicorn binds it
        uvicorn.run(app, factory=True, workers=settings.workers, **common)
        return
    config = uvicorn.Config(app, factory=True, workers=settings.workers, **common)
    held, listener = listeners.reserve(args.host, args.port)
    log.info("Uvicorn running on http://%s:%d, one listening socket per worker (Press CTRL+C "
             "to quit)", args.host, listener.port)  # fmt: skip
    with held, contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[listener]).run()  # type: ignore[list-item]


def metrics_folder() -> str:
    """The operator's PROMETHEUS_MULTIPROC_DIR, emptied (stale samples of a previous run
    would be summed in, and its workers' ready marks counted), or a new temporary folder."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return tempfile.mkdtemp(prefix="convae-metrics-")
    os.makedirs(folder, exist_ok=True)
    for pattern in ("*.db", f"{workers.MARK}*"):
        for stale in glob.glob(os.path.join(folder, pattern)):
            os.remove(stale)
    return folder


if __name__ == "__main__":
    main()
