"""The served model: load (sessions, providers, warm-up), preprocess, predict, postprocess."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from aecore import manifest
from aecore.anomaly import AnomalyScorers, Evidence
from aecore.graphs import default_threads, open_session
from aecore.preprocessing import ImageSpec, encode_png, load_image

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")


class GpuUnavailable(RuntimeError):
    """AE_REQUIRE_GPU is set but onnxruntime runs on the CPU."""


def choose_providers(requested: list[str]) -> list[str]:
    """The providers to ask for: as configured, or CUDA (when this build has it) then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            log.warning("providers %s are not in this onnxruntime build (%s)", unknown, available)
        return requested
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class AutoencoderModel:
    """Encoder and decoder sessions of one model folder, described by its manifest."""

    def __init__(
        self,
        folder: Path,
        providers: list[str] | None = None,
        require_gpu: bool = False,
        intra_op_threads: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = manifest.read(self.folder, verify=True)
        self.spec = ImageSpec.from_manifest(self.manifest["input"])
        self.latent_dim = int(self.manifest["latent_dim"])
        self.scorers = AnomalyScorers(self.manifest["anomaly"], self.folder)
        requested = choose_providers(providers or [])
        threads = intra_op_threads or default_threads()
        files = self.manifest["files"]
        self.encoder = open_session(self.folder / files["encoder"], requested, threads)
        self.decoder = open_session(self.folder / files["decoder"], requested, threads)
        # onnxruntime drops a provider that fails to initialise without raising: read back.
        self.providers = self.encoder.get_providers()
        self.requested_providers = requested
        self.intra_op_threads = threads
        if require_gpu and not any(p in GPU_PROVIDERS for p in self.providers):
            raise GpuUnavailable(
                f"AE_REQUIRE_GPU is set but onnxruntime uses {self.providers} "
                f"(asked for {requested}); check the CUDA/cuDNN libraries and the GPU runtime"
            )
        self._check_graphs()

    def _check_graphs(self) -> None:
        enc_in, dec_in = self.encoder.get_inputs()[0], self.decoder.get_inputs()[0]
        if list(enc_in.shape[1:]) != list(self.spec.shape) or dec_in.shape[1] != self.latent_dim:
            raise manifest.ModelFolderError(
                f"graphs take {enc_in.shape} and {dec_in.shape}, the manifest says "
                f"{self.spec.shape} and latent {self.latent_dim}"
            )
        self._enc_input, self._dec_input = enc_in.name, dec_in.name

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    # -- predict: called from the batchers' inference threads --
    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {self._enc_input: images})[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.decoder.run(None, {self._dec_input: latents})[0]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run each graph once per batch size so the first request pays no set-up cost."""
        started = time.perf_counter()
        for n in batch_sizes:
            self.decode(self.encode(np.zeros((n, *self.spec.shape), np.float32)))
        return time.perf_counter() - started

    # -- pre/postprocessing: the shared implementation, run in the decode thread pool --
    def preprocess(self, data: bytes, max_pixels: int) -> np.ndarray:
        return load_image(data, self.spec, max_pixels)

    @staticmethod
    def postprocess(image: np.ndarray) -> bytes:
        return encode_png(image)

    def score(self, scorer: str, evidence: Evidence) -> np.ndarray:
        """Anomaly scores with one of the manifest's calibrated scorers."""
        return self.scorers.score(scorer, evidence)

    def describe(self) -> dict[str, Any]:
        return {
            **self.manifest,
            "providers": self.providers,
            "requested_providers": self.requested_providers,
            "intra_op_threads": self.intra_op_threads,
        }
