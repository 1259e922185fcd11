"""DeepSeek-V2's router (`model.grouped_softmax_topk`) against transformers' DeepseekV2TopkRouter, and the
group limit and norm_topk_prob on their own."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

from offload_moe.model import grouped_softmax_topk


@pytest.mark.parametrize("E,K,method,groups,keep,scale", [
    (16, 4, "group_limited_greedy", 4, 2, 2.0), (16, 4, "greedy", 1, 1, 1.0), (64, 6, "greedy", 1, 1, 1.0),
    (32, 6, "group_limited_greedy", 8, 3, 16.0)])
def test_grouped_softmax_topk_matches_transformers(E, K, method, groups, keep, scale):
    cfg = transformers.DeepseekV2Config(hidden_size=32, n_routed_experts=E, num_experts_per_tok=K, topk_method=method,
                                        n_group=groups, topk_group=keep, routed_scaling_factor=scale)
    router = DeepseekV2TopkRouter(cfg)
    g = torch.Generator().manual_seed(E + K + groups)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 32, generator=g))
        logits, want_w, want_i = router(torch.randn(64, 32, generator=g))
    w, i = grouped_softmax_topk(logits, K, groups, keep, False, scale)
    assert w.dtype == torch.float32
    # transformers' top-k is unsorted: compare per token as sets, weights matched by expert
    order, want_order = i.argsort(-1), want_i.argsort(-1)
    assert torch.equal(i.gather(1, order), want_i.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=0, atol=1e-6)
    assert (w[:, :-1] >= w[:, 1:]).all()  # rank order


def test_groups_change_the_choice_and_norm_topk_prob_renormalises_unscaled():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 3
    _, grouped = grouped_softmax_topk(logits, 4, 4, 2, False, 1.0)
    _, greedy = grouped_softmax_topk(logits, 4, 1, 1, False, 1.0)
    assert not torch.equal(grouped.sort(-1)[0], greedy.sort(-1)[0])
    assert all(len({int(e) // 4 for e in grouped[t]}) <= 2 for t in range(64))
    w, i = grouped_softmax_topk(logits, 4, 1, 1, True, 16.0)  # DeepSeek's code: renormalised, not scaled
    chosen = logits.softmax(-1).gather(1, i)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))
