"""The one ONNX autoencoder runner: a model folder's encoder and decoder, opened from its manifest.

Training (export, calibration, reports), the service, the batch job and the benchmarks all run
the graphs through this class, so the file names, tensor names and shapes are read in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aecore import manifest
from aecore.graphs import default_threads, open_session
from aecore.preprocessing import ImageSpec, load_image, to_float


class ModelFolder:
    """What every model folder's runner shares: the manifest, the input it takes, its sessions'
    threads, and the one preprocessing of image bytes."""

    def __init__(
        self, folder: Path, intra_op_threads: int | None = None, verify: bool = True
    ) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = manifest.read(self.folder, verify=verify)
        self.spec = ImageSpec.from_manifest(self.manifest["input"])
        self.intra_op_threads = intra_op_threads or default_threads()

    def _open(self, name: str, providers, provider_options=None) -> Any:
        return open_session(self.folder / name, providers, self.intra_op_threads, provider_options)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    def preprocess(
        self, data: bytes, max_pixels: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Encoded image bytes -> the float32 [H, W, 3] the graph takes (the one pipeline),
        written into `out` (a slot of a batch) when given."""
        return load_image(data, self.spec, max_pixels, out)


def in_chunks(run, array: np.ndarray, batch_size: int, empty: tuple[int, ...]) -> np.ndarray:
    """`run` over `array` in chunks of `batch_size` (uint8 images scaled as preprocessing
    does), joined; an empty result has shape `empty`."""
    chunks = [run(_as_input(array[i : i + batch_size])) for i in range(0, len(array), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty(empty, np.float32)


class Autoencoder(ModelFolder):
    """Encoder and decoder sessions of one model folder, described by its `model.json`."""

    def __init__(
        self,
        folder: Path,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        verify: bool = True,
        precision: str = "fp32",
        provider_options: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(folder, intra_op_threads, verify)
        self.latent_dim = int(self.manifest["latent_dim"])
        self.precision = precision
        files, parts = self.manifest["files"], manifest.precision_parts(self.manifest, precision)
        self.encoder, self.decoder = (
            self._open(files[parts[graph]], providers, provider_options)
            for graph in ("encoder", "decoder")
        )
        enc_in, dec_in = self.encoder.get_inputs()[0], self.decoder.get_inputs()[0]
        if list(enc_in.shape[1:]) != list(self.spec.shape) or dec_in.shape[1] != self.latent_dim:
            raise manifest.ModelFolderError(
                f"graphs take {enc_in.shape} and {dec_in.shape}, the manifest says "
                f"{self.spec.shape} and latent {self.latent_dim}"
            )
        self._enc_input, self._dec_input = enc_in.name, dec_in.name

    @property
    def providers(self) -> list[str]:
        """The providers onnxruntime actually uses (it drops one that fails to initialise)."""
        return self.encoder.get_providers()

    # -- one onnxruntime call each: the service's batchers decide the batch --
    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, H, W, 3] in [0, 1] -> float32 [N, latent_dim]."""
        return self.encoder.run(None, {self._enc_input: images})[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float32 [N, latent_dim] -> float32 [N, H, W, 3] in [0, 1]."""
        return self.decoder.run(None, {self._dec_input: latents})[0]

    # -- whole arrays in chunks: offline work (training reports, calibration, batch jobs) --
    def encode_all(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Latents of float32 or uint8 images (uint8 is scaled as preprocessing does)."""
        return in_chunks(self.encode, images, batch_size, (0, self.latent_dim))

    def decode_all(self, latents: np.ndarray, batch_size: int = 32) -> np.ndarray:
        return in_chunks(self.decode, latents, batch_size, (0, *self.spec.shape))

    def reconstruct_all(
        self, images: np.ndarray, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """(latents, reconstructions) of uint8 or float32 images."""
        latents = self.encode_all(images, batch_size)
        return latents, self.decode_all(latents, batch_size)


def _as_input(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return to_float(images)
    return np.ascontiguousarray(images, np.float32)
