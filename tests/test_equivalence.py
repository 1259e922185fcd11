"""Offloaded == resident == transformers, for every cache size, prefetch on and off, both layouts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import hf_model

from offload_moe.engine import Engine
from offload_moe.options import EngineOptions

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28740, 28734, 6211, 12, 77]
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(ckpts):
    """transformers' logits and greedy continuation for each HF checkpoint."""
    out = {}
    for name in ("base", "top3", "window"):
        model = hf_model(ckpts[name])
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT])).logits[0]
            tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)[0, len(PROMPT):]
        out[name] = (logits, tokens.tolist())
    return out


def slot_counts(engine_cfg):
    return range(engine_cfg.top_k, engine_cfg.num_experts + 1)


@pytest.mark.parametrize("name", ["base", "top3", "window"])
def test_logits_match_transformers_for_every_cache_size(ckpts, reference, name):
    ref_logits, _ = reference[name]
    full = Engine.load(ckpts[name], EngineOptions(prefetch=0))
    resident = full.score(PROMPT)
    assert (resident - ref_logits).abs().max() <= TOL
    for slots in slot_counts(full.config):
        for prefetch in (0, 1, 2):
            engine = Engine.load(ckpts[name], EngineOptions(cache_experts=slots, prefetch=prefetch))
            logits = engine.score(PROMPT)
            # the expert outputs are summed in rank order, so offloading changes no bit
            assert torch.equal(logits, resident), (slots, prefetch)


@pytest.mark.parametrize("name", ["base", "top3", "window"])
def test_greedy_tokens_match_transformers(ckpts, reference, name):
    _, ref_tokens = reference[name]
    for slots in (None, 2 if name != "top3" else 3):
        engine = Engine.load(ckpts[name], EngineOptions(cache_experts=slots, prefetch=1))
        assert engine.generate(PROMPT, max_new_tokens=8).tokens == ref_tokens


@pytest.mark.parametrize("name,source", [("original", "base"), ("original-named", "top3")])
def test_original_layout_gives_the_same_logits(ckpts, reference, name, source):
    engine = Engine.load(ckpts[name], EngineOptions(cache_experts=3, prefetch=1))
    assert engine.checkpoint.layout == "original"
    assert (engine.score(PROMPT) - reference[source][0]).abs().max() <= TOL


@pytest.mark.parametrize("name,slots", [("base", 2), ("window", 2), ("top3", 4)])
def test_decode_matches_one_pass_rescore(ckpts, name, slots):
    """Logits of token-by-token decode equal those of scoring the whole text in one pass."""
    engine = Engine.load(ckpts[name], EngineOptions(cache_experts=slots, prefetch=1))
    result = engine.generate(PROMPT, max_new_tokens=10, keep_logits=True)
    rescored = engine.score(PROMPT + result.tokens[:-1])[len(PROMPT) - 1:]
    assert result.logits.shape == rescored.shape
    assert (result.logits - rescored).abs().max() <= TOL


def test_sliding_window_ring_wraps_during_decode(ckpts):
    """A window of 5 and 20 tokens: the ring buffer wraps several times and still matches transformers."""
    model = hf_model(ckpts["window"])
    engine = Engine.load(ckpts["window"], EngineOptions(cache_experts=2, context=64))
    result = engine.generate(PROMPT[:3], max_new_tokens=20, keep_logits=True)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT[:3] + result.tokens[:-1]])).logits[0, 2:]
    assert (result.logits - ref).abs().max() <= TOL
    assert engine.kv.length == 5


def test_prefill_in_chunks_matches_one_pass(ckpts):
    """A second prefill on top of a cached prefix (the chat-turn case) masks by position correctly."""
    for name in ("base", "window"):
        engine = Engine.load(ckpts[name], EngineOptions(cache_experts=2))
        whole = engine.score(PROMPT)
        engine.kv.reset()
        first = engine.model(torch.tensor(PROMPT[:7]), engine.kv)
        second = engine.model(torch.tensor(PROMPT[7:]), engine.kv)
        assert (torch.cat([first, second]) - whole).abs().max() <= TOL


def test_sampling_is_seeded_and_respects_top_k(ckpts):
    from offload_moe.sampling import Sampling

    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2))
    s = Sampling(temperature=0.8, top_p=0.9, top_k=5, seed=7)
    a = engine.generate(PROMPT, 12, s, keep_logits=True)
    b = engine.generate(PROMPT, 12, s)
    assert a.tokens == b.tokens
    c = engine.generate(PROMPT, 12, Sampling(temperature=0.8, top_p=0.9, top_k=5, seed=8))
    assert c.tokens != a.tokens
    for row, tok in zip(a.logits, a.tokens, strict=True):
        assert tok in torch.topk(row, 5).indices.tolist()


def test_eos_stops_generation(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2))
    first = engine.generate(PROMPT, 1).tokens[0]
    engine.checkpoint.config = replace(engine.config, eos_id=first)
    result = engine.generate(PROMPT, 10)
    assert result.tokens == [first] and result.stop_reason == "eos"


def forced_decode_logits(engine: Engine, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The rows `generate(keep_logits=True)` gives for these tokens, fed in whatever the argmax says: a
    prefill, then one decode step per token but the last. [len(tokens), V] float32 on the CPU."""
    engine.kv.reset()
    dev = engine.device
    rows = [engine.model(torch.tensor(prompt, device=dev), engine.kv, last_only=True)[0]]
    rows += [engine.model(torch.tensor([t], device=dev), engine.kv)[0] for t in tokens[:-1]]
    return torch.stack(rows).float().cpu()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("miss_policy", ["cpu", "auto"])
def test_miss_policies_give_the_same_logits(ckpts, miss_policy, device):
    """A miss computed on the CPU from host RAM: on a CPU device it runs the kernels the copied slot
    would, so the bits are the same; on a GPU the CPU's kernels round differently from the GPU's, so
    the logits agree to a tolerance (fp16, 1e-2 of the largest logit), not bit for bit."""
    def load(policy: str) -> Engine:  # a cold cache each time: every run has the same misses
        return Engine.load(ckpts["base"], EngineOptions(device=device, cache_experts=2, prefetch=0,
                                                        miss_policy=policy))

    ref = load("fetch").generate(PROMPT, 8, keep_logits=True)
    result = load(miss_policy).generate(PROMPT, 8, keep_logits=True)
    if miss_policy == "cpu":
        assert 0 < result.stats["cpu_misses"] <= result.stats["misses"]
    # the same tokens on both sides, even where the argmax would differ
    logits = forced_decode_logits(load(miss_policy), PROMPT, ref.tokens)
    expected = forced_decode_logits(load("fetch"), PROMPT, ref.tokens)
    if device == "cpu":
        assert torch.equal(result.logits, ref.logits)
        assert result.stats["misses"] == ref.stats["misses"]
        assert torch.equal(expected, ref.logits) and torch.equal(logits, expected)
    else:
        error = (logits - expected).abs().max() / expected.abs().max()
        assert error <= 1e-2, f"{miss_policy}: {error:.2e} of the largest logit"


@pytest.mark.parametrize("name", ["base", "original"])
def test_experts_larger_than_the_ram_budget_stream_from_storage(ckpts, name):
    """With a RAM budget of a quarter of the experts the store is tiered; the logits do not change."""
    ref = Engine.load(ckpts[name], EngineOptions(cache_experts=2, prefetch=1)).generate(PROMPT, 8, keep_logits=True)
    experts = 3 * 8 * 3 * 64 * 96 * 4  # layers x experts x (w1, w2, w3) bytes, float32
    engine = Engine.load(ckpts[name], EngineOptions(cache_experts=2, prefetch=1, ram_budget=experts // 4))
    result = engine.generate(PROMPT, 8, keep_logits=True)
    assert torch.equal(result.logits, ref.logits)
    stats = result.stats
    assert stats["experts_in_ram"] is False and stats["bytes_read_from_storage"] > 0
    assert stats["ram_tier_bytes"] <= experts // 4
