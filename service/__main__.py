"""`python -m service [--host H] [--port P]`: run the API with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from service.app import create_app
from service.settings import get_settings

PROBES = frozenset({"/healthz", "/readyz"})


class SuccessfulProbesFilter(logging.Filter):
    """Keep answered health probes out of the access log: Docker's HEALTHCHECK, Compose and
    Kubernetes probe every few seconds, which would bury the requests. A probe that does not
    get 200 is still logged, and at AE_LOG_LEVEL=debug every probe is."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            isinstance(args, tuple) and len(args) == 5
        ):  # uvicorn: client, method, path, http, status
            _, method, path, _, status = args
            return not (method == "GET" and path in PROBES and status == 200)
        return True


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level.lower() not in ("debug", "trace"):
        # uvicorn's logging config adds handlers to this logger but leaves its filters alone.
        logging.getLogger("uvicorn.access").addFilter(SuccessfulProbesFilter())
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
