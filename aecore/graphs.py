"""onnxruntime sessions for the encoder and decoder graphs (used by training and serving).

Every session of the project is opened here, so this is also where onnxruntime's usage
telemetry is switched off: onnxruntime >= 1.31 reports usage events unless told not to, and a
self-hosted service must contact no one its operator did not configure. The environment switch,
which is what stops the uploads, is set when `aecore` is imported (aecore/__init__.py).
"""

from __future__ import annotations

import math
import os
import posixpath
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


def default_threads(root: Path = Path("/")) -> int:
    """Threads to size compute by: the cores this process may use, the smaller of its CPU
    affinity and its cgroup's CPU quota (see `usable_cores`)."""
    return usable_cores(root)[0]


def usable_cores(root: Path = Path("/")) -> tuple[int, str]:
    """The cores this process may use, and how that was found, for a start-up log line:
    `(2, "cgroup v2 cpu.max 2 (affinity 64)")`, `(16, "affinity 16 (no CPU quota)")`.

    Affinity alone counts a node's cores: a pod limited to 2 CPUs on a 64-core node sees 64,
    and 64 busy threads there are throttled, not faster. The quota (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`, the smallest along the process's cgroup and its
    ancestors) is rounded up to whole cores. `root` is where /proc and /sys are (tests).
    """
    try:
        affinity = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux: no affinity, no cgroups
        count = max(1, os.cpu_count() or 1)
        return count, f"cpu_count {count}"
    quota = cgroup_cpu_quota(root)
    if quota is None:
        return affinity, f"affinity {affinity} (no CPU quota)"
    cpus, source = quota
    cores = max(1, math.ceil(cpus))
    if cores < affinity:
        return cores, f"{source} {cpus:g} (affinity {affinity})"
    return affinity, f"affinity {affinity} ({source} {cpus:g})"


def cgroup_cpu_quota(root: Path = Path("/")) -> tuple[float, str] | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5) and which file said so
    ("cgroup v2 cpu.max", "cgroup v1 cpu.cfs_quota_us"); None without a quota, or where the
    files are missing or unreadable (no cgroups, another OS: the affinity then decides)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[float, str]] = []
    for line in lines:  # "hierarchy-id:controllers:path"; v2's is "0::/path"
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            mount, read, source = root / "sys/fs/cgroup", _v2_quota, "cgroup v2 cpu.max"
        elif "cpu" in controllers.split(","):
            # Mounted under the controllers' names ("cpu,cpuacct"), with "cpu" often a link.
            mount = root / "sys/fs/cgroup" / controllers
            if not mount.is_dir():
                mount = root / "sys/fs/cgroup/cpu"
            read, source = _v1_quota, "cgroup v1 cpu.cfs_quota_us"
        else:
            continue
        for folder in _cgroup_folders(mount, path):
            cpus = read(folder)
            if cpus is not None:
                found.append((cpus, source))
    return min(found, default=None)


def _cgroup_folders(mount: Path, path: str) -> list[Path]:
    """The process's cgroup folder under `mount` and its ancestors up to `mount`, where a
    quota set higher up also binds. Only `mount` itself when the path is not visible there:
    in a container, /proc/self/cgroup may name the host's path while the container's own
    cgroup is mounted at the root."""
    relative = posixpath.normpath("/" + path.strip()).lstrip("/")  # no ".." past the mount
    folders = [mount]
    if relative:
        parts = relative.split("/")
        nested = [mount.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
        if nested[0].is_dir():
            folders = [*nested, mount]
    return folders


def _v2_quota(folder: Path) -> float | None:
    """cpu.max: "max 100000" is no quota, "150000 100000" is 1.5 CPUs."""
    try:
        fields = (folder / "cpu.max").read_text().split()
        if fields and fields[0] == "max":
            return None
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):  # missing, or not what the kernel writes
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    """cpu.cfs_quota_us over cpu.cfs_period_us, in microseconds; a quota of -1 is none."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


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
