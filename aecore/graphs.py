"""onnxruntime sessions for the encoder and decoder graphs (used by training and serving).

Every session of the project is opened here, so this is also where onnxruntime's usage
telemetry is switched off: onnxruntime >= 1.31 reports usage events unless told not to, and a
self-hosted service must contact no one its operator did not configure. The environment switch,
which is what stops the uploads, is set when `aecore` is imported (aecore/__init__.py).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnxruntime is in both the `serve` and `train` extras, not in the core
    import onnxruntime as ort


@cache
def telemetry_off() -> None:
    """Switch onnxruntime's telemetry events off for this process (idempotent).

    onnxruntime's API switch. On Linux with onnxruntime 1.32 it alone does not stop the
    uploads (measured in a network namespace); ORT_DISABLE_TELEMETRY does (aecore/__init__.py).
    """
    import onnxruntime as ort

    disable = getattr(ort, "disable_telemetry_events", None)
    if disable is not None:  # present in every build that has telemetry
        disable()


def default_threads() -> int:
    """Intra-op threads: the cores this process may use (cgroup/affinity aware on Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_provider_options(
    providers: list[str], trt_cache: Path, precision: str = "fp32", cudnn_search: str = "EXHAUSTIVE"
) -> list[dict[str, str]]:
    """Options, one dict per provider, that matter for small convolutional graphs on a GPU.

    CUDA: cuDNN's algorithm search (EXHAUSTIVE times every algorithm once per input shape:
    the warm-up pays it), the whole workspace for the fastest algorithms, an arena that grows
    by what is asked rather than doubling. TensorRT: engines and timing caches kept on disk
    (`trt_cache`, beside the model's versions) so a restart does not rebuild them, fp16
    kernels with the fp16 precision.
    """
    options = {
        "CUDAExecutionProvider": {
            "cudnn_conv_algo_search": cudnn_search,
            "cudnn_conv_use_max_workspace": "1",
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": "1",
        },
        "TensorrtExecutionProvider": {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(trt_cache),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(trt_cache),
            "trt_fp16_enable": str(precision == "fp16"),
        },
    }
    return [options.get(provider, {}) for provider in providers]


def open_session(
    path: Path,
    providers: list[str] | None = None,
    intra_op_threads: int | None = None,
    provider_options: list[dict[str, str]] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession with full graph optimisation; providers default to CPU."""
    import onnxruntime as ort

    telemetry_off()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads or default_threads()
    options.inter_op_num_threads = 1
    # The encoder and decoder sessions each own a thread pool; spinning idle threads of one
    # would steal the cores the other is computing on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=providers or ["CPUExecutionProvider"],
        provider_options=provider_options if providers else None,
    )


def run_batched(
    session: ort.InferenceSession, array: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """Run a single-input, single-output graph over `array` in chunks of `batch_size`."""
    name = session.get_inputs()[0].name
    chunks = [
        session.run(None, {name: np.ascontiguousarray(array[i : i + batch_size], np.float32)})[0]
        for i in range(0, len(array), batch_size)
    ]
    if chunks:
        return np.concatenate(chunks)
    tail = [d if isinstance(d, int) else 0 for d in session.get_outputs()[0].shape[1:]]
    return np.empty((0, *tail), np.float32)
