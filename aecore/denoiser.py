"""The one ONNX denoiser runner: a model folder that declares the `denoise` task.

Training (export, evaluation) and the service run the graph through this class, as they run
autoencoders through `aecore.runner.Autoencoder`: image -> cleaned image, both float32
[N, H, W, 3] in [0, 1] at the manifest's input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aecore import manifest
from aecore.graphs import default_threads, open_session
from aecore.preprocessing import ImageSpec, load_image, to_float

TASK = "denoise"


class Denoiser:
    """The denoising graph of one model folder, described by its `model.json`."""

    def __init__(
        self,
        folder: Path,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = manifest.read(self.folder, verify=verify)
        if TASK not in manifest.tasks(self.manifest):
            raise manifest.ModelFolderError(
                f"{self.folder} serves {manifest.tasks(self.manifest)}, not {TASK!r}"
            )
        self.spec = ImageSpec.from_manifest(self.manifest["input"])
        self.intra_op_threads = intra_op_threads or default_threads()
        self.session = open_session(
            self.folder / self.manifest["files"]["denoiser"], providers, self.intra_op_threads
        )
        graph_input = self.session.get_inputs()[0]
        if list(graph_input.shape[1:]) != list(self.spec.shape):
            raise manifest.ModelFolderError(
                f"the graph takes {graph_input.shape}, the manifest says {self.spec.shape}"
            )
        self._input = graph_input.name

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def denoise(self, images: np.ndarray) -> np.ndarray:
        """One onnxruntime call: float32 [N, H, W, 3] in [0, 1] -> the same, cleaned."""
        return self.session.run(None, {self._input: images})[0]

    def denoise_all(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 or float32 images in chunks (uint8 is scaled as preprocessing does)."""
        chunks = [
            self.denoise(_as_input(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.empty((0, *self.spec.shape), np.float32)

    def preprocess(
        self, data: bytes, max_pixels: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Encoded image bytes -> float32 [H, W, 3] in [0, 1] (the one pipeline), written into
        `out` (a slot of a batch) when given."""
        return load_image(data, self.spec, max_pixels, out)


def _as_input(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return to_float(images)
    return np.ascontiguousarray(images, np.float32)
