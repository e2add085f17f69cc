"""`python -m service [--host H] [--port P]`: run the API with uvicorn."""

from __future__ import annotations

import argparse
import copy
import logging

import uvicorn

from service.app import create_app
from service.request_id import RequestIdFilter
from service.settings import get_settings


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
        log_config=log_config(),
        timeout_graceful_shutdown=30,
    )


def log_config() -> dict:
    """uvicorn's own logging, with the request id on its access lines."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    config["formatters"]["access"]["fmt"] = (
        '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s [%(request_id)s]'
    )
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    return config


if __name__ == "__main__":
    main()
