"""What every inference router shares: auth, and the parsed images of a request."""

from __future__ import annotations

import numpy as np
from fastapi import Request

from service.inputs import parse_body, require_images
from service.runtime import Runtime


def model_ref(runtime: Runtime) -> dict:
    return {"name": runtime.model.name, "version": runtime.model.version}


async def request_images(request: Request, runtime: Runtime) -> np.ndarray:
    """Preprocessed float32 [N, H, W, 3] from a multipart or JSON image request."""
    parsed = await parse_body(
        request, runtime.settings.max_images_per_request, accept_latents=False
    )
    return await runtime.images(require_images(parsed))
