"""Logging for `python -m service`: uvicorn's lines and the service's, each carrying the
request id, and answered health probes kept out of the access log. A dictConfig given to
uvicorn, so that every worker process (AE_WORKERS > 1, spawned) applies it as well; the
filters are named by import path for the same reason."""

from __future__ import annotations

import copy
import logging

import uvicorn

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


def log_config(level: str) -> dict:
    """uvicorn's own logging plus the service's, with the request id on every line, and
    answered health probes out of the access log unless the level is debug; given to uvicorn,
    so that each worker process applies it too."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "service.request_id.RequestIdFilter"}}
    config["formatters"]["access"]["fmt"] = (
        '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s [%(request_id)s]'
    )
    config["formatters"]["service"] = {
        "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    }
    config["handlers"]["service"] = {
        "class": "logging.StreamHandler",
        "formatter": "service",
        "stream": "ext://sys.stderr",
    }
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    config["root"] = {"handlers": ["service"], "level": level.upper()}
    if level.lower() not in ("debug", "trace"):
        config["filters"]["probes"] = {"()": "service.logs.SuccessfulProbesFilter"}
        config["loggers"]["uvicorn.access"]["filters"] = ["probes"]
    return config
