"""How many threads compute on the CPU: torch's intra-op pool and the C kernels' OpenMP teams, one count for both
(`set_threads`), by default the physical cores this process may use (`physical_cores`).

Why physical cores: two SMT siblings share one core's FMA units and its cache, so a second thread on a core adds
synchronisation, not arithmetic, to a bandwidth-bound decode; and a count above the cores the process may run on
(its CPU affinity, a container's CPU quota) makes OpenMP teams wait on threads that are not running: on a loaded
2-core machine decode measured 3.7-16 tok/s with torch's default against 80-138 with one thread (issue 25).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .formats.cpu_kernels import set_kernel_threads
from .formats.gemm import faster_gemm

SYS = Path("/sys")


def physical_cores(root: Path = SYS, affinity: set[int] | None = None) -> int:
    """The cores (not SMT siblings) among the CPUs this process may run on, capped by its cgroup's CPU quota;
    `root`: where sysfs is (tests give a fake tree); at least 1."""
    cpus = os.sched_getaffinity(0) if affinity is None else affinity
    cores = set()
    for cpu in cpus:
        topology = root / "devices/system/cpu" / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no topology (some containers, other kernels): count the CPU itself
            cores.add(("cpu", str(cpu)))
    quota = _cgroup_quota(root)
    return max(1, min(len(cores), quota) if quota else len(cores))


def _cgroup_quota(root: Path) -> int | None:
    """CPUs a cgroup's quota allows (rounded up), cgroup v2's cpu.max or v1's cfs quota; None: no limit."""
    try:
        quota, period = (root / "fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int((root / "fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else math.ceil(quota / period)
    except (OSError, ValueError):
        return None


def set_threads(n: int) -> None:
    """Compute on `n` threads: torch's intra-op pool, and the C kernels' OpenMP teams (`cpu_kernels`), whichever
    thread calls them."""
    torch.set_num_threads(n)
    faster_gemm()  # timed here, on these threads, not in the middle of a prompt
    set_kernel_threads(n)
