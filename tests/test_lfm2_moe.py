"""LFM2-MoE, the hybrid of short convs and attention (`modeling/shortconv.py`): a prompt prefilled whole, in
pieces and token by token (the conv's inputs carried), its state in the pool and the memory plan, the config's
keys. Logits against transformers, offloading, batching, int8/int4, convert and the rest come with the other
families (tests/families.py)."""

from __future__ import annotations

import json

import pytest
import torch
from families import check_prefill_three_ways, make_family
from transformers import Lfm2MoeConfig
from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeTopKRouter

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.modeling.layers import KVPool
from offload_moe.modeling.transformer import sigmoid_topk
from offload_moe.models import from_hf_config
from offload_moe.options import EngineOptions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("lfm2_moe") / "m", "lfm2_moe", seed=5)


def test_prefill_whole_equals_pieces_and_token_by_token_and_transformers(ckpt):
    """A 40-token prompt at once, in pieces of 7 (each from the conv inputs so far) and token by token (the
    conv one step at a time): within 1e-4; against transformers within 1e-3."""
    check_prefill_three_ways(ckpt, "lfm2_moe", 40, 7)


def test_the_router_is_transformers_exactly():
    """sigmoid + expert_bias for the choice, the unbiased sigmoid renormalised over the sum + 1e-6, scaled: the
    same experts and the same float32 weights as `Lfm2MoeTopKRouter`."""
    g = torch.Generator().manual_seed(0)
    cfg = Lfm2MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4, routed_scaling_factor=2.5)
    router = Lfm2MoeTopKRouter(cfg)
    router.weight.data = torch.randn(16, 32, generator=g)
    x, bias = torch.randn(50, 32, generator=g), torch.rand(16, generator=g) * 0.3
    with torch.no_grad():
        logits, want_w, want_i = router(x, bias)
    w, i = sigmoid_topk(logits, bias, 4, 1, 1, True, 2.5, 1e-6)
    assert torch.equal(i, want_i) and torch.equal(w, want_w)


def test_the_state_in_the_pool_and_the_memory_plan(ckpt):
    c = Engine.load(ckpt, EngineOptions(prefetch=0, progress=False)).config
    assert c.conv_layers == (0, 2) and c.n_attention_layers == 1 and c.dense_layers == (0,) and c.router == "sigmoid"
    pool = KVPool(c, 32, 3, torch.device("cpu"), torch.float32)
    assert [tuple(t.shape) for t in pool.k] == [(3, 2, 0, 16), (3, 2, 32, 16), (3, 2, 0, 16)]  # no KV rows there
    assert tuple(pool.conv[0].shape) == (3, 64, 2) and pool.conv[1] is None and pool.recurrent[0] is None
    state = 2 * 64 * 2 * 4  # two layers: the conv's last 2 inputs of 64 channels, float32
    assert c.state_bytes(4) == state and c.kv_bytes(32, 4) == 2 * 2 * 32 * 16 * 4 + state
    assert pool.nbytes == 3 * c.kv_bytes(32, 4)
    pool.conv[2].fill_(1.0)
    pool.seqs[1].reset()  # a slot taken by a new sequence: its conv inputs zeroed, the other slots' kept
    assert pool.conv[2][1].abs().sum() == 0 and pool.conv[2][0].abs().sum() > 0


def test_config_keys(ckpt, tmp_path):
    """`full_attn_idxs` (LFM2's older key) for layer_types; `tie_embedding` wins; an unsupported variant is
    refused in one line."""
    c = json.loads((ckpt / "config.json").read_text())
    c.pop("layer_types")
    c |= {"full_attn_idxs": [1], "tie_embedding": False, "tie_word_embeddings": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c))
    got = from_hf_config(path)
    assert got.conv_layers == (0, 2) and not got.tie_word_embeddings
    for bad in ({"use_expert_bias": False}, {"full_attn_idxs": None}, {"layer_types": ["conv", "sliding"]}):
        path.write_text(json.dumps(c | bad))
        with pytest.raises(UserError, match="use_expert_bias|layer_types"):
            from_hf_config(path)
