"""The served runners: a model folder's graphs opened for serving (providers, provider options,
AE_REQUIRE_GPU), each graph named by its part with the rows it takes, and the card GET /model
shows. Autoencoders and denoisers are opened by the same code; the manifest's tasks choose."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aecore import generation, manifest
from aecore.anomaly import AnomalyScorers, Evidence
from aecore.denoiser import TASK as DENOISE
from aecore.denoiser import Denoiser
from aecore.graphs import gpu_provider_options
from aecore.preprocessing import encode_png
from aecore.runner import Autoencoder

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")

# A graph as the engine runs it: rows in -> rows out, and the shape of one input row.
Graph = tuple[Callable[[np.ndarray], np.ndarray], tuple[int, ...]]


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


class ServedGraphs:
    """What serving adds to a runner of `aecore`, whatever its task."""

    manifest: dict[str, Any]
    folder: Path
    intra_op_threads: int
    precision: str = "fp32"
    requested_providers: list[str]
    providers: list[str]  # the runner's: what onnxruntime actually uses

    @property
    def tasks(self) -> list[str]:
        return manifest.tasks(self.manifest)

    @property
    def on_gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    def graphs(self) -> dict[str, Graph]:
        """Every graph of the model by part (`encoder`, `decoder`, `denoiser`)."""
        raise NotImplementedError

    def _opened(self, requested: list[str], require_gpu: bool) -> None:
        self.requested_providers = requested
        if require_gpu and not self.on_gpu:
            raise GpuUnavailable(
                f"AE_REQUIRE_GPU is set but onnxruntime uses {self.providers} "
                f"(asked for {self.requested_providers}); check the CUDA/cuDNN libraries and "
                "the GPU runtime"
            )

    def warm_up(self, batch_sizes: tuple[int, ...]) -> float:
        """Run every graph once per batch size so the first request pays no set-up cost."""
        started = time.perf_counter()
        for run, row in self.graphs().values():
            for n in batch_sizes:
                run(np.zeros((n, *row), np.float32))
        return time.perf_counter() - started

    @staticmethod
    def postprocess(image: np.ndarray) -> bytes:
        """The shared output encoding, run in the decode thread pool."""
        return encode_png(image)

    def describe(self) -> dict[str, Any]:
        return {
            **self.manifest,
            "providers": self.providers,
            "requested_providers": self.requested_providers,
            "intra_op_threads": self.intra_op_threads,
            "precision": self.precision,
        }


@dataclass(frozen=True)
class Serving:
    """How a version's sessions are opened for serving (the AE_ settings of the engine)."""

    providers: list[str]
    require_gpu: bool = False
    intra_op_threads: int | None = None
    precision: str = "fp32"
    cudnn_search: str = "EXHAUSTIVE"
    trt_cache: Path | None = None

    def providers_for(self, folder: Path, precision: str) -> tuple[list[str], list[dict]]:
        """The providers to ask for, and their options, for the graphs in `folder`."""
        requested = choose_providers(self.providers)
        # Engines are machine-specific and rebuilt at will: beside the versions, never in one.
        cache = self.trt_cache or folder.parent / ".trt-cache" / folder.name
        return requested, gpu_provider_options(requested, cache, precision, self.cudnn_search)


class AutoencoderModel(ServedGraphs, Autoencoder):
    """The shared runner plus what serving adds: scorers and the generation density."""

    def __init__(self, folder: Path, how: Serving) -> None:
        requested, options = how.providers_for(folder, how.precision)
        Autoencoder.__init__(self, folder, requested, how.intra_op_threads, True, how.precision,
                             options)  # fmt: skip
        self.scorers = AnomalyScorers(self.manifest["anomaly"], self.folder)
        self.generator = generation.load(self.folder, self.manifest)  # None: no /generate
        self._opened(requested, how.require_gpu)

    def graphs(self) -> dict[str, Graph]:
        return {"encoder": (self.encode, self.spec.shape), "decoder": (self.decode,
                (self.latent_dim,))}  # fmt: skip

    def score(self, scorer: str, evidence: Evidence) -> np.ndarray:
        """Anomaly scores with one of the manifest's calibrated scorers."""
        return self.scorers.score(scorer, evidence)


class DenoiserModel(ServedGraphs, Denoiser):
    """A denoising model folder, opened as autoencoders are (fp32 graphs only, whatever
    AE_PRECISION asks of the autoencoders)."""

    def __init__(self, folder: Path, how: Serving) -> None:
        requested, options = how.providers_for(folder, "fp32")
        Denoiser.__init__(self, folder, requested, how.intra_op_threads, True, options)
        self._opened(requested, how.require_gpu)

    def graphs(self) -> dict[str, Graph]:
        return {"denoiser": (self.denoise, self.spec.shape)}


ServedModel = AutoencoderModel | DenoiserModel


def open_model(folder: Path, how: Serving) -> ServedModel:
    """The runner a version's manifest asks for: a denoiser when it declares `denoise`."""
    body = manifest.read(folder, verify=False)
    kind = DenoiserModel if DENOISE in manifest.tasks(body) else AutoencoderModel
    return kind(Path(folder), how)
