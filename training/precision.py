"""Reduced-precision copies of a model's graphs (no TensorFlow needed: ONNX to ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from aecore.graphs import open_session, run_batched


def write_fp16(folder: Path, images: np.ndarray) -> dict[str, Any]:
    """fp16 copies of both graphs beside the fp32 ones, and their parity on `images`.

    Inputs and outputs stay float32 (keep_io_types), so clients see no difference; on a GPU
    the convolutions run in half precision. Returns the manifest's `precisions.fp16` block;
    the new files still have to be listed in `files` (see `manifest.file_entries`).
    """
    from onnxconverter_common import float16

    names = {}
    for part in ("encoder", "decoder"):
        graph = float16.convert_float_to_float16(
            onnx.load(str(folder / f"{part}.onnx")), keep_io_types=True
        )
        names[part] = f"{part}.fp16.onnx"
        onnx.save(graph, str(folder / names[part]))
    z32 = run_batched(open_session(folder / "encoder.onnx"), images, len(images))
    z16 = run_batched(open_session(folder / names["encoder"]), images, len(images))
    y32 = run_batched(open_session(folder / "decoder.onnx"), z32, len(z32))
    y16 = run_batched(open_session(folder / names["decoder"]), z32, len(z32))
    return {
        "encoder": "encoder_fp16",
        "decoder": "decoder_fp16",
        "parity_max_abs": {
            "encoder": float(np.max(np.abs(z16 - z32))),
            "decoder": float(np.max(np.abs(y16 - y32))),
        },
        "parity_images": len(images),
    }
