"""The sigmoid router (DeepSeek-V3's, GLM-4.5's) against transformers' Glm4MoeTopkRouter on random scores,
the prefetcher's prediction against the router, and the GLM-4.5 pieces around it (partial rotary, the
correction bias as a resident float32 tensor, the memory plan's count of it)."""

from __future__ import annotations

import pytest
import torch
import transformers
from families import FAMILIES, make_family, reference
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from offload_moe.engine import Engine
from offload_moe.modeling.transformer import sigmoid_topk
from offload_moe.options import EngineOptions
from offload_moe.weights.checkpoint import Checkpoint

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]


def hf_router(E, K, groups, keep, norm, scale, seed):
    cfg = transformers.Glm4MoeConfig(hidden_size=32, n_routed_experts=E, num_experts_per_tok=K, n_group=groups,
                                     topk_group=keep, norm_topk_prob=norm, routed_scaling_factor=scale)
    router = Glm4MoeTopkRouter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 32, generator=g))
        router.e_score_correction_bias.copy_(torch.rand(E, generator=g) * 0.6 - 0.3)
    return router, torch.randn(64, 32, generator=g)


@pytest.mark.parametrize("E,K,groups,keep,norm,scale", [
    (16, 4, 4, 2, True, 2.5), (16, 4, 1, 1, True, 1.0), (32, 6, 8, 3, False, 1.5), (8, 2, 2, 1, True, 1.0)])
def test_sigmoid_topk_matches_transformers(E, K, groups, keep, norm, scale):
    router, x = hf_router(E, K, groups, keep, norm, scale, seed=E + K + groups)
    with torch.no_grad():
        logits, want_w, want_i = router(x)
    w, i = sigmoid_topk(logits, router.e_score_correction_bias, K, groups, keep, norm, scale)
    assert w.dtype == torch.float32
    # transformers' top-k is unsorted: compare per token as sets, weights matched by expert
    order, want_order = i.argsort(-1), want_i.argsort(-1)
    assert torch.equal(i.gather(1, order), want_i.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=0, atol=1e-6)
    # rank order: best biased score first
    biased = (logits.sigmoid() + router.e_score_correction_bias).gather(1, i)
    assert (biased[:, :-1] >= biased[:, 1:]).all()


def test_bias_and_groups_change_the_choice():
    """On these scores the bias and the group limit each change some tokens' experts, and the weights
    come from the unbiased scores: so the comparison above is not vacuous."""
    router, x = hf_router(16, 4, 4, 2, False, 1.0, seed=3)
    logits = torch.nn.functional.linear(x, router.weight)
    bias = router.e_score_correction_bias
    _, grouped = sigmoid_topk(logits, bias, 4, 4, 2, False, 1.0)
    _, ungrouped = sigmoid_topk(logits, bias, 4, 1, 1, False, 1.0)
    w, unbiased = sigmoid_topk(logits, torch.zeros(16), 4, 4, 2, False, 1.0)
    assert not torch.equal(grouped.sort(-1)[0], ungrouped.sort(-1)[0])
    assert not torch.equal(grouped.sort(-1)[0], unbiased.sort(-1)[0])
    torch.testing.assert_close(w, logits.sigmoid().gather(1, unbiased))
    for t in range(x.shape[0]):  # at most topk_group groups of 4 used by each token
        assert len({int(e) // 4 for e in grouped[t]}) <= 2


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("glm") / "glm4_moe", "glm4_moe", seed=7)


def test_glm_config_and_resident_tensors(glm):
    ckpt = Checkpoint(glm)
    c = ckpt.config
    assert (c.family, c.router, c.n_group, c.topk_group, c.routed_scaling_factor) == ("glm4_moe", "sigmoid", 4, 2, 2.5)
    assert (c.dense_layers, c.shared_ffn_dim, c.shared_gate, c.rotary_dim, c.qk_norm) == ((0,), 32, False, 16, "head")
    assert (c.qkv_bias, c.o_bias) == (True, False)
    shapes = ckpt.expected_dense()
    assert shapes["layers.1.gate.e_score_correction_bias"] == (16,)
    assert "layers.0.gate.e_score_correction_bias" not in shapes  # the dense layer has no router
    assert sum(torch.Size(s).numel() for s in shapes.values()) == c.dense_params
    ref = reference(glm, "glm4_moe")
    n_ref = sum(p.numel() for n, p in ref.state_dict().items() if ".experts." not in n)
    assert n_ref == c.dense_params


def test_glm_router_bias_stays_float32_and_predict_is_the_router(glm):
    engine = Engine.load(glm, EngineOptions(prefetch=0, dtype="bfloat16", progress=False))
    model = engine.model
    assert model.layers[1].gate.e_score_correction_bias.dtype == torch.float32
    assert model.layers[1].gate.weight.dtype == torch.bfloat16
    ref = reference(glm, "glm4_moe")
    torch.testing.assert_close(model.layers[2].gate.e_score_correction_bias,
                               ref.model.layers[2].mlp.gate.e_score_correction_bias, rtol=0, atol=0)
    h = torch.randn(12, 64, dtype=torch.bfloat16)
    for row, layer in enumerate(model.rows):
        blk = model.layers[layer]
        assert torch.equal(model.predict(row, h), model.route(blk, blk.ffn_norm(h))[1])


def test_glm_transformers_logits_need_the_bias(glm, tmp_path):
    """Zeroing the correction bias changes transformers' logits on the test prompt: the bias is exercised."""
    ref = reference(glm, "glm4_moe")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref(ids).logits
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        other = ref(ids).logits
    assert (want - other).abs().max() > 1e-3
    assert "glm4_moe" in FAMILIES
