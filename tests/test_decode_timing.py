"""The decode figure users read is the steady state: the first decode step (one-time work such as the
first call of each one-token kernel) is reported apart, and a run with every expert resident spends
nothing on predictions it cannot use."""

from __future__ import annotations

import pytest
import torch

from offload_moe.config import ModelConfig
from offload_moe.demo import write_random_checkpoint
from offload_moe.engine import Engine
from offload_moe.options import EngineOptions
from offload_moe.stats import decode_rate

SHAPE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, num_experts=4, top_k=2,
                    vocab_size=256)
PROMPT = [1, 5, 9, 14]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("timing") / "ckpt", SHAPE, torch.float32)


def test_first_decode_step_is_reported_apart(ckpt):
    engine = Engine.load(ckpt, EngineOptions(cache_experts=2, prefetch=1, progress=False))
    r = engine.generate(PROMPT, 12)
    s = r.stats
    assert r.decode_steps == 11 and 0 < s["first_decode_s"] < s["decode_s"]
    assert s["decode_tokens_per_s"] == pytest.approx(10 / (s["decode_s"] - s["first_decode_s"]))
    one = engine.generate(PROMPT, 2)  # one decode step: it is the whole figure
    assert one.decode_steps == 1 and one.stats["decode_tokens_per_s"] == pytest.approx(1 / one.decode_s)
    assert decode_rate(engine.generate(PROMPT, 1)) == 0.0  # no decode step at all


def test_no_prefetcher_when_every_expert_is_resident(ckpt):
    resident = Engine.load(ckpt, EngineOptions(prefetch=1, progress=False))
    assert resident.model.prefetcher is None  # nothing could be prefetched: no router pass, no sync
    cached = Engine.load(ckpt, EngineOptions(cache_experts=[2, 4], prefetch=1, progress=False))
    assert cached.model.prefetcher is not None
    ref = Engine.load(ckpt, EngineOptions(prefetch=0, progress=False)).generate(PROMPT, 6, keep_logits=True)
    out = resident.generate(PROMPT, 6, keep_logits=True)
    assert torch.equal(out.logits, ref.logits) and out.stats["prefetch_copies"] == 0
