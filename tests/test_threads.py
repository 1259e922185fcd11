"""The CPU thread count: physical cores from a (fake) sysfs, SMT siblings and a cgroup quota counted out; --threads
sets torch's pool and the kernels' teams, and the stats say so; a bad count is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from offload_moe.demo import TRAINED_DEMOS
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.options import EngineOptions
from offload_moe.threads import physical_cores


def fake_sys(root, cores: dict[int, tuple[int, int]], cpu_max: str | None = None, v1: tuple[int, int] | None = None):
    """cpu -> (package, core) topology files under root, and a cgroup v2 cpu.max or v1 cfs quota/period."""
    for cpu, (package, core) in cores.items():
        topology = root / "devices/system/cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    if cpu_max is not None:
        (root / "fs/cgroup").mkdir(parents=True)
        (root / "fs/cgroup/cpu.max").write_text(cpu_max)
    if v1 is not None:
        (root / "fs/cgroup/cpu").mkdir(parents=True)
        (root / "fs/cgroup/cpu/cpu.cfs_quota_us").write_text(str(v1[0]))
        (root / "fs/cgroup/cpu/cpu.cfs_period_us").write_text(str(v1[1]))
    return root


def test_physical_cores_count_cores_not_siblings_within_affinity_and_quota(tmp_path):
    smt = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0), 5: (1, 0)}  # cpu 2, 3 and 5: siblings
    root = fake_sys(tmp_path / "a", smt)
    assert physical_cores(root, set(smt)) == 3
    assert physical_cores(root, {0, 2}) == 1  # two siblings of one core
    assert physical_cores(fake_sys(tmp_path / "b", smt, cpu_max="150000 100000\n"), set(smt)) == 2  # 1.5 CPUs
    assert physical_cores(fake_sys(tmp_path / "c", smt, cpu_max="max 100000\n"), set(smt)) == 3
    assert physical_cores(fake_sys(tmp_path / "d", smt, v1=(100000, 100000)), set(smt)) == 1
    assert physical_cores(tmp_path / "none", {0, 1, 7}) == 3  # no topology: each CPU counts


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_set_torch_and_report_in_stats(keep_threads, capsys):
    demo_path = TRAINED_DEMOS["demo"]
    engine = Engine.load(demo_path, EngineOptions(threads=1, progress=False))
    assert torch.get_num_threads() == 1 and engine.generate([1, 2, 3], 3).stats["threads"] == 1
    code, out, err = run_cli(capsys, "generate", "--model", str(demo_path), "--prompt-ids", "1,2,3",
                             "--max-new-tokens", "2", "--threads", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["stats"]["threads"] == 1
    with pytest.raises(UserError, match="threads"):
        Engine.load(demo_path, EngineOptions(threads=0))
    code, _, err = run_cli(capsys, "generate", "--model", str(demo_path), "--prompt-ids", "1", "--threads", "0")
    assert code == 1 and "--threads: expected 1 or more" in err  # as every engine flag's value is checked
