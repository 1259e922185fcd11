"""Every family against transformers: logits within 1e-4, greedy tokens equal, at every cache size
from top-k to all experts, with and without prefetch; offloaded == resident exactly."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, make_family, reference

from offload_moe.engine import Engine, EngineOptions

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]


@pytest.fixture(scope="session")
def family_ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {name: make_family(root / name, name, seed=i) for i, name in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(family_ckpts, family):
    path = family_ckpts[family]
    ref = reference(path, family)
    engine = Engine.load(path, EngineOptions(prefetch=0, progress=False))
    assert engine.config.family == family
    got = engine.generate(PROMPT, 8, keep_logits=True)
    ids = torch.tensor([PROMPT + got.tokens[:-1]])
    with torch.no_grad():
        want = ref(ids).logits[0, len(PROMPT) - 1 :]  # [generated, V]: the logits each token was chosen from
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-4)
    assert got.tokens == want.argmax(-1).tolist()
    with torch.no_grad():
        prompt_logits = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(engine.score(PROMPT), prompt_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offloaded_equals_resident_at_every_cache_size(family_ckpts, family):
    path = family_ckpts[family]
    resident = Engine.load(path, EngineOptions(prefetch=0, progress=False)).generate(PROMPT, 10, keep_logits=True)
    c = Engine.load(path, EngineOptions(prefetch=0, progress=False)).config
    for slots in sorted({c.top_k, (c.top_k + c.num_experts) // 2, c.num_experts - 1}):
        for prefetch in (0, 1):
            engine = Engine.load(path, EngineOptions(cache_experts=slots, prefetch=prefetch, progress=False))
            got = engine.generate(PROMPT, 10, keep_logits=True)
            assert torch.equal(got.logits, resident.logits), (slots, prefetch)
            assert got.tokens == resident.tokens
            if slots < c.num_experts:
                assert got.stats["misses"] > 0
