"""The baseline a user would write first: a plain FastAPI app, one onnxruntime call per request.

No batching, no admission control, no thread pool: each `/encode` request reads its multipart
file, decodes it with the project's own preprocessing and runs the encoder, in the handler.
`bench.load` measures it beside the service (same machine, same run) for the single-client
latency target of docs/benchmarks.md.

    python -m bench.naive --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import argparse

import numpy as np
import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import ORJSONResponse

from aecore.runner import Autoencoder
from bench.common import model_folder


def create_app() -> FastAPI:
    model = Autoencoder(model_folder())
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready", "model": model.name}

    @app.post("/encode")
    async def encode(images: list[UploadFile]) -> ORJSONResponse:
        batch = [model.preprocess(await image.read()) for image in images]
        latents = model.encode(np.stack(batch))
        return ORJSONResponse({"latents": latents.tolist()})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
