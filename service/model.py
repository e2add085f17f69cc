"""The served model: load (sessions, providers, warm-up), preprocess, predict, postprocess."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from aecore import generation
from aecore.anomaly import AnomalyScorers, Evidence
from aecore.graphs import gpu_provider_options
from aecore.preprocessing import encode_png
from aecore.runner import Autoencoder

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


class AutoencoderModel(Autoencoder):
    """The shared runner plus what serving adds: provider choice, scorers, warm-up, the card."""

    def __init__(
        self,
        folder: Path,
        providers: list[str] | None = None,
        require_gpu: bool = False,
        intra_op_threads: int | None = None,
        precision: str = "fp32",
        cudnn_search: str = "EXHAUSTIVE",
        trt_cache: Path | None = None,
    ) -> None:
        requested = choose_providers(providers or [])
        folder = Path(folder)
        # Engines are machine-specific and rebuilt at will: beside the versions, never in one.
        cache = trt_cache or folder.parent / ".trt-cache" / folder.name
        options = gpu_provider_options(requested, cache, precision, cudnn_search)
        super().__init__(folder, requested, intra_op_threads, True, precision, options)
        self.requested_providers = requested
        self.scorers = AnomalyScorers(self.manifest["anomaly"], self.folder)
        self.generator = generation.load(self.folder, self.manifest)  # None: no /generate
        if require_gpu and not self.on_gpu:
            raise GpuUnavailable(
                f"AE_REQUIRE_GPU is set but onnxruntime uses {self.providers} "
                f"(asked for {requested}); check the CUDA/cuDNN libraries and the GPU runtime"
            )

    @property
    def on_gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run each graph once per batch size so the first request pays no set-up cost."""
        started = time.perf_counter()
        for n in batch_sizes:
            self.decode(self.encode(np.zeros((n, *self.spec.shape), np.float32)))
        return time.perf_counter() - started

    # -- postprocessing: the shared implementation, run in the decode thread pool --
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
            "precision": self.precision,
        }
