"""Every family against transformers: logits within 1e-4, greedy tokens equal, at every cache size
from top-k to all experts, with and without prefetch; offloaded == resident exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES, make_family, reference

from offload_moe.engine import Engine
from offload_moe.options import EngineOptions

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


def test_phi_longrope_matches_transformers(tmp_path):
    """Phi-3.5's longrope. Within the original context: the short factors and mscale, logits as transformers'
    PhimoeForCausalLM. Beyond it the engine takes the long factors and long mscale for every position, as
    transformers' longrope initialiser gives them for such a length (and Phi-3.5's reference code uses);
    transformers 5's Phimoe forward keeps the short factors there (it calls the initialiser without the
    length), so the long side is checked against the initialiser's frequencies."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from offload_moe.modeling.layers import rope_tables

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.3 * i for i in range(8)],
            "short_mscale": 1.1, "long_mscale": 1.3}
    cfg = transformers.PhimoeConfig(vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=256, rope_parameters=rope)
    model = transformers.PhimoeForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    ids = [(7 * i + 3) % 320 for i in range(12)]
    engine = Engine.load(tmp_path, EngineOptions(prefetch=0, context=64, progress=False))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.score(ids), want, rtol=0, atol=1e-4)
    long = Engine.load(tmp_path, EngineOptions(prefetch=0, context=256, progress=False)).config
    inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, torch.device("cpu"), seq_len=256)
    emb = torch.outer(torch.arange(256, dtype=torch.float32), inv_freq).repeat(1, 2)  # [256, hd]
    cos, sin = rope_tables(16, long.rope_theta, 256, torch.device("cpu"), long.rope_scaling)
    torch.testing.assert_close(cos, emb.cos() * 1.3)
    torch.testing.assert_close(sin, emb.sin() * 1.3)


@pytest.mark.parametrize("cls, scaling", [
    ("GptOssConfig", {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 4096, "rope_theta": 150000.0}),
    ("DeepseekV2Config", {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "rope_theta": 10000.0}),
    ("DeepseekV2Config", {"rope_type": "yarn", "factor": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                          "original_max_position_embeddings": 128, "rope_theta": 10000.0}),
])
def test_yarn_tables_match_transformers(cls, scaling):
    """YaRN's frequencies and attention factor, as transformers computes them from the same config
    (gpt-oss with truncate off; DeepSeek with its mscale pair, equal and unequal)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from offload_moe.config import rope_of
    from offload_moe.modeling.layers import rope_tables

    cfg = getattr(transformers, cls)(rope_parameters=dict(scaling), max_position_embeddings=4096 * 32)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, torch.device("cpu"))
    theta, ours = rope_of(cfg.to_dict(), Path("config.json"))
    emb = torch.outer(torch.arange(300, dtype=torch.float32), inv_freq).repeat(1, 2)  # [300, hd]
    cos, sin = rope_tables(2 * inv_freq.numel(), theta, 300, torch.device("cpu"), ours)
    assert ours["attention_factor"] == pytest.approx(factor)
    torch.testing.assert_close(cos, emb.cos() * factor)
    torch.testing.assert_close(sin, emb.sin() * factor)
