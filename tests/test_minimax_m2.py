"""MiniMax-M2 (models/minimax_m2.py): the sigmoid router without groups or scaling against transformers'
MiniMaxM2TopKRouter, partial RoPE from `rotary_dim` or `partial_rotary_factor` in transformers' order, a
bfloat16 checkpoint and the variants refused. Its hub files' block-FP8 weights are tests/test_fp8.py's; logits
against transformers at every cache size, tests/test_families.py's; int4, convert, the tiered store and
`--miss-policy cpu`, tests/test_family_features.py's; batched == alone, tests/test_batch.py's."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from families import hub_config, make_family
from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.modeling.transformer import sigmoid_topk
from offload_moe.models import from_hf_config
from offload_moe.options import EngineOptions

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("minimax") / "minimax_m2", "minimax_m2", seed=41)


def edited(mm, tmp_path, change: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in (json.loads((mm / "config.json").read_text()) | change).items()
                                if v is not None}))
    return path


@pytest.mark.parametrize("E,K", [(8, 2), (256, 8)])
def test_the_router_is_minimaxs(E, K):
    """sigmoid_topk with one group and a scale of 1: the experts of transformers' router (float32 logits here), and
    their weights to the rounding of a sum taken in another order (transformers' top-k is unsorted); the bias
    changes some tokens' choice, so that the comparison is not vacuous."""
    cfg = transformers.MiniMaxM2Config(hidden_size=32, num_local_experts=E, num_experts_per_tok=K)
    router = MiniMaxM2TopKRouter(cfg)
    g = torch.Generator().manual_seed(E)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 32, generator=g))
        bias = torch.rand(E, generator=g) * 0.6 - 0.3
        x = torch.randn(64, 32, generator=g)
        logits, want_w, want_i = router(x, bias)
    w, i = sigmoid_topk(logits, bias, K, 1, 1, True, 1.0)
    order, want_order = i.argsort(-1), want_i.argsort(-1)  # transformers' top-k is unsorted
    assert torch.equal(i.gather(1, order), want_i.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=1e-6, atol=0)
    _, unbiased = sigmoid_topk(logits, torch.zeros(E), K, 1, 1, True, 1.0)
    assert not torch.equal(i.sort(-1)[0], unbiased.sort(-1)[0])


@pytest.mark.parametrize("change,rotary", [
    ({}, 8),  # the hub's rotary_dim 8 of 16
    ({"rotary_dim": None}, 16),
    ({"rotary_dim": None, "partial_rotary_factor": 0.25}, 4),
    ({"partial_rotary_factor": 0.25}, 4),  # transformers: partial_rotary_factor before rotary_dim
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75},
      "partial_rotary_factor": 0.25}, 12),  # and rope_parameters' before either
])
def test_partial_rope_as_transformers_reads_it(mm, tmp_path, change, rotary):
    path = edited(mm, tmp_path, change)
    rope = transformers.MiniMaxM2Config.from_pretrained(path.parent).rope_parameters
    c = from_hf_config(path)
    assert c.rotary_dim == rotary == int(16 * rope.get("partial_rotary_factor", 1.0))
    assert (c.family, c.qk_norm, c.router, c.n_group, c.routed_scaling_factor, c.norm_topk_prob) == (
        "minimax_m2", "full", "sigmoid", 1, 1.0, True)


def test_a_bfloat16_checkpoint_matches_transformers(tmp_path):
    torch.manual_seed(5)
    cfg = transformers.MiniMaxM2Config(
        vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    transformers.MiniMaxM2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    hub_config(tmp_path / "config.json", "minimax_m2")
    engine = Engine.load(tmp_path, EngineOptions(prefetch=0, progress=False, dtype="float32"))
    ref = transformers.MiniMaxM2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(engine.score(PROMPT), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("change,says", [
    ({"attn_type_list": [0, 1]}, "attn_type_list"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not implemented"),
    ({"use_routing_bias": False}, "use_routing_bias"),
    ({"use_qk_norm": False}, "use_qk_norm"),
    ({"qk_norm_type": "per_head"}, "qk_norm_type 'per_head'"),
    ({"shared_intermediate_size": 64}, "shared_intermediate_size 64"),
])
def test_variants_refused(mm, tmp_path, change, says):
    with pytest.raises(UserError, match=says):
        from_hf_config(edited(mm, tmp_path, change))
