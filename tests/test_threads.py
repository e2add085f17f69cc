"""Threads from the CPU quota: `aecore.graphs.default_threads` and `usable_cores` on fake
/proc and /sys trees (cgroup v2 and v1), with the affinity mask of a 16-core node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aecore.graphs import cgroup_cpu_quota, default_threads, usable_cores

NODE_CORES = 16


@pytest.fixture(autouse=True)
def sixteen_cores(monkeypatch):
    """The affinity mask of a 16-core node, whatever this machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(NODE_CORES)))


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(root: Path, cpu_max: str | None, path: str = "/kubepods/pod1/ctr") -> Path:
    """A cgroup v2 host: /proc/self/cgroup names `path`, whose cpu.max is `cpu_max`."""
    write(root, "proc/self/cgroup", f"0::{path}\n")
    folder = root / "sys/fs/cgroup" / path.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (folder / "cpu.max").write_text(cpu_max + "\n")
    return folder


def v1_tree(root: Path, quota: str, period: str = "100000", controllers: str = "cpu,cpuacct"):
    """A cgroup v1 host as systemd mounts it: one folder per controller set."""
    write(
        root,
        "proc/self/cgroup",
        f"12:memory:/docker/abc\n4:{controllers}:/docker/abc\n1:name=systemd:/docker/abc\n",
    )
    folder = root / "sys/fs/cgroup" / controllers / "docker/abc"
    write(folder, "cpu.cfs_quota_us", quota + "\n")
    write(folder, "cpu.cfs_period_us", period + "\n")
    return folder


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("100000 100000", 1)],
)
def test_v2_quota_rounds_up_to_whole_cores(tmp_path, cpu_max, cores):
    v2_tree(tmp_path, cpu_max)
    assert default_threads(tmp_path) == cores
    count, source = usable_cores(tmp_path)
    assert count == cores
    quota = int(cpu_max.split()[0]) / int(cpu_max.split()[1])
    assert source == f"cgroup v2 cpu.max {quota:g} (affinity {NODE_CORES})"


def test_v2_max_is_no_quota(tmp_path):
    v2_tree(tmp_path, "max 100000")
    assert cgroup_cpu_quota(tmp_path) is None
    assert usable_cores(tmp_path) == (NODE_CORES, f"affinity {NODE_CORES} (no CPU quota)")


def test_a_quota_above_the_affinity_leaves_the_affinity(tmp_path):
    v2_tree(tmp_path, "3200000 100000")  # 32 CPUs of quota, 16 cores in the mask
    assert usable_cores(tmp_path) == (
        NODE_CORES,
        f"affinity {NODE_CORES} (cgroup v2 cpu.max 32)",
    )


def test_v2_quota_of_a_parent_cgroup_binds(tmp_path):
    """Kubernetes sets a pod-level quota above the container's own cgroup."""
    folder = v2_tree(tmp_path, "max 100000")
    (folder.parent / "cpu.max").write_text("300000 100000\n")
    assert default_threads(tmp_path) == 3


def test_v2_path_not_visible_falls_back_to_the_mount_root(tmp_path):
    """In a container with its own cgroup namespace not mounted at the host's path."""
    write(tmp_path, "proc/self/cgroup", "0::/kubepods.slice/pod9.slice/cri-x.scope\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert usable_cores(tmp_path) == (2, f"cgroup v2 cpu.max 2 (affinity {NODE_CORES})")


def test_v1_quota(tmp_path):
    v1_tree(tmp_path, "250000")
    assert usable_cores(tmp_path) == (
        3,
        f"cgroup v1 cpu.cfs_quota_us 2.5 (affinity {NODE_CORES})",
    )


def test_v1_separate_cpu_controller(tmp_path):
    v1_tree(tmp_path, "100000", controllers="cpu")
    assert default_threads(tmp_path) == 1


def test_v1_minus_one_is_no_quota(tmp_path):
    v1_tree(tmp_path, "-1")
    assert cgroup_cpu_quota(tmp_path) is None
    assert default_threads(tmp_path) == NODE_CORES


def test_hybrid_host_reads_the_v1_cpu_controller(tmp_path):
    """v1 controllers with an empty v2 hierarchy beside them (no cpu.max anywhere)."""
    v1_tree(tmp_path, "200000")
    with (tmp_path / "proc/self/cgroup").open("a") as f:
        f.write("0::/docker/abc\n")
    (tmp_path / "sys/fs/cgroup/docker/abc").mkdir(parents=True)
    assert usable_cores(tmp_path)[0] == 2


@pytest.mark.parametrize(
    "setup",
    [
        "nothing",  # no /proc, no /sys: not Linux, or a sandbox
        "no_cpu_max",  # the cgroup exists, the cpu controller is not enabled for it
        "v1_no_period",
    ],
)
def test_missing_files_mean_no_quota(tmp_path, setup):
    if setup == "no_cpu_max":
        v2_tree(tmp_path, None)
    elif setup == "v1_no_period":
        (v1_tree(tmp_path, "200000") / "cpu.cfs_period_us").unlink()
    assert cgroup_cpu_quota(tmp_path) is None
    assert usable_cores(tmp_path) == (NODE_CORES, f"affinity {NODE_CORES} (no CPU quota)")


@pytest.mark.parametrize(
    "cpu_max", ["", "banana", "200000", "200000 0", "0 100000", "-5 100000", "1e5 1e5", "\x00"]
)
def test_garbage_cpu_max_is_ignored(tmp_path, cpu_max):
    v2_tree(tmp_path, cpu_max)
    assert cgroup_cpu_quota(tmp_path) is None
    assert default_threads(tmp_path) == NODE_CORES


@pytest.mark.parametrize("cgroup", ["", "garbage\n", "0::\n", "::::\n", "0::/../../etc\n"])
def test_garbage_proc_self_cgroup_is_ignored(tmp_path, cgroup):
    write(tmp_path, "proc/self/cgroup", cgroup)
    assert default_threads(tmp_path) == NODE_CORES


def test_garbage_v1_quota_is_ignored(tmp_path):
    v1_tree(tmp_path, "lots")
    assert default_threads(tmp_path) == NODE_CORES


def test_this_machine_is_described():
    """The real /proc and /sys: whatever they hold, a count of at least 1 and its source."""
    cores, source = usable_cores()
    assert 1 <= cores <= NODE_CORES
    assert source.startswith(("affinity ", "cgroup v2 cpu.max ", "cgroup v1 cpu.cfs_quota_us "))
    assert default_threads() == cores
