"""The one ONNX denoiser runner: a model folder that declares the `denoise` task.

Training (export, evaluation) and the service run the graph through this class, as they run
autoencoders through `aecore.runner.Autoencoder`: image -> cleaned image, both float32
[N, H, W, 3] in [0, 1] at the manifest's input size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aecore import manifest
from aecore.runner import ModelFolder, in_chunks

TASK = "denoise"


class Denoiser(ModelFolder):
    """The denoising graph of one model folder, described by its `model.json`."""

    def __init__(
        self,
        folder: Path,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        verify: bool = True,
        provider_options: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(folder, intra_op_threads, verify)
        if TASK not in manifest.tasks(self.manifest):
            raise manifest.ModelFolderError(
                f"{self.folder} serves {manifest.tasks(self.manifest)}, not {TASK!r}"
            )
        self.session = self._open(self.manifest["files"]["denoiser"], providers, provider_options)
        graph_input = self.session.get_inputs()[0]
        if list(graph_input.shape[1:]) != list(self.spec.shape):
            raise manifest.ModelFolderError(
                f"the graph takes {graph_input.shape}, the manifest says {self.spec.shape}"
            )
        self._input = graph_input.name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def denoise(self, images: np.ndarray) -> np.ndarray:
        """One onnxruntime call: float32 [N, H, W, 3] in [0, 1] -> the same, cleaned."""
        return self.session.run(None, {self._input: images})[0]

    def denoise_all(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 or float32 images in chunks (uint8 is scaled as preprocessing does)."""
        return in_chunks(self.denoise, images, batch_size, (0, *self.spec.shape))
