"""What every inference router shares: the model reference, and the image bytes of a request."""

from __future__ import annotations

from fastapi import Request

from service.inputs import parse_body, require_images
from service.runtime import Runtime


def model_ref(runtime: Runtime) -> dict:
    return {"name": runtime.model.name, "version": runtime.model.version}


async def request_blobs(request: Request, runtime: Runtime) -> list[bytes]:
    """The image files of a multipart or JSON image request, counted but not yet decoded.

    Handlers hold `runtime.admit(len(blobs))` while they decode and run them.
    """
    parsed = await parse_body(
        request, runtime.settings.max_images_per_request, accept_latents=False
    )
    return require_images(parsed)
