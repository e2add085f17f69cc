"""What every inference router shares: the model reference, and the image bytes of a request."""

from __future__ import annotations

from fastapi import Request

from service.inputs import Parsed, parse_body, require_images
from service.runtime import Runtime


def model_ref(runtime: Runtime) -> dict:
    return {"name": runtime.model.name, "version": runtime.model.version}


async def request_images(request: Request, runtime: Runtime) -> Parsed:
    """The images of a request (files, or preprocessed tensors), counted but not yet decoded.

    Handlers hold `runtime.admit(parsed.image_count)` while they decode and run them.
    """
    parsed = await parse_body(request, runtime.settings.max_images_per_request, raw_images=True)
    return require_images(parsed)
