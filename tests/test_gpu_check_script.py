"""bench/gpu_check.py only runs where a GPU is lent: its CPU smoke mode keeps it from rotting meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_case_on_the_cpu(tmp_path):
    out = tmp_path / "figures.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--layers", "1",
                        "--tokens", "3", "--workdir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert figures["int4_kernel"] is None and "int4 CUDA kernel vs dequantize: skipped in smoke mode" in r.stdout
    assert len(rows) == 9
    assert rows[-1]["bytes_read_from_storage"] > 0  # the storage tier case read from the packed folder
    assert all(row["decode_tokens_per_s"] > 0 for row in rows)
    assert all(row["pinned_host_bytes"] == row["planned_pinned_bytes"] for row in rows)  # 0 on the CPU
