"""What every inference router shares: the image bytes of a request."""

from __future__ import annotations

from fastapi import Request

from service.dataplane.inputs import Parsed, parse_body, require_images
from service.dataplane.plane import Inference


async def request_images(request: Request, served: Inference) -> Parsed:
    """The images of a request (files, or preprocessed tensors), counted but not yet decoded.

    Handlers hold `served.admit(parsed.image_count)` while they decode and run them.
    """
    parsed = await parse_body(request, served.settings.max_images_per_request, raw_images=True)
    return require_images(parsed)
