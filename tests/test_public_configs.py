"""The public configs shipped in offload_moe/data/configs (their sources: SOURCES.md there): each reads through
its family's reader, and its parameter count (routed experts plus everything else, as `plan` counts them)
is the published total within 1%."""

from __future__ import annotations

import pytest

from offload_moe.models import from_hf_config
from offload_moe.models.public import public_config

# the totals the model cards publish
PUBLISHED_TOTAL = {"GLM-4.7-Flash": 30e9, "MiniMax-M2": 230e9, "LFM2-8B-A1B": 8.3e9, "Qwen3.6-35B-A3B": 35e9,
                   "NVIDIA-Nemotron-3-Nano-30B-A3B": 31.6e9}


@pytest.mark.parametrize("name", list(PUBLISHED_TOTAL))
def test_public_config_total_is_the_published_one(name):
    c = from_hf_config(public_config(name))
    total = c.n_moe_layers * c.num_experts * c.expert_params + c.dense_params
    assert total == pytest.approx(PUBLISHED_TOTAL[name], rel=0.01)
