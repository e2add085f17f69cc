"""`python -m service [--host H] [--port P]`: run the API with uvicorn."""

from __future__ import annotations

import argparse
import copy
import logging

import uvicorn

from service.app import create_app
from service.request_id import RequestIdFilter
from service.settings import get_settings

PROBES = frozenset({"/healthz", "/readyz"})


class SuccessfulProbesFilter(logging.Filter):
    """Keep answered health probes out of the access log: Docker's HEALTHCHECK, Compose and
    Kubernetes probe every few seconds, which would bury the requests. A probe that does not
    get 200 is still logged, and at AE_LOG_LEVEL=debug every probe is."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            _, method, path, _, status = args  # uvicorn's access line
            return not (method == "GET" and path in PROBES and status == 200)
        return True


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        log_config=log_config(quiet_probes=settings.log_level.lower() not in ("debug", "trace")),
        timeout_graceful_shutdown=30,
    )


def log_config(quiet_probes: bool = True) -> dict:
    """uvicorn's own logging, with the request id on its access lines (and, with
    `quiet_probes`, without the answered health probes)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    config["formatters"]["access"]["fmt"] = (
        '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s [%(request_id)s]'
    )
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    if quiet_probes:
        config["filters"]["probes"] = {"()": SuccessfulProbesFilter}
        config["loggers"]["uvicorn.access"]["filters"] = ["probes"]
    return config


if __name__ == "__main__":
    main()
