"""Response classes: JSON through orjson (numpy arrays serialised natively), and .npy."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson
from starlette.responses import JSONResponse, Response

NPY = "application/x-npy"


class FastJSON(JSONResponse):
    """JSON that serialises numpy arrays without .tolist(): 1024 floats per image add up."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def npy_response(array: np.ndarray) -> Response:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, np.float32), allow_pickle=False)
    return Response(buf.getvalue(), media_type=NPY)
