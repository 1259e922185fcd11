"""Continuous batching (`offload_moe.batch.Scheduler`): each sequence's tokens and logits are those of
the same sequence run alone with Engine.generate, whatever joins or leaves beside it."""

from __future__ import annotations

import pytest
import torch
from families import make_family

from offload_moe.batch import Scheduler
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.options import EngineOptions
from offload_moe.sampling import Sampling

TOL = 1e-4
# (prompt, max_new_tokens, step at which it is added): lengths 12, 3, 9, 6 and 1; with max_batch 3
# the fourth and fifth wait for a slot, and the sequences leave at different steps
MIXTRAL = [
    ([1, 415, 2936, 9060, 285, 1142, 28705, 28740, 28734, 6211, 12, 77], 9, 0),
    ([1, 851, 4300], 5, 0),
    ([1, 22557, 28725, 910, 349, 368, 28804, 315, 837], 7, 2),
    ([1, 28705, 28770, 28723, 28740, 28781], 6, 3),
    ([1], 4, 3),
]


def alone(engine: Engine, jobs, sampling=None) -> list:
    return [engine.generate(p, n, sampling, keep_logits=True) for p, n, _ in jobs]


def batched(engine: Engine, jobs, max_batch: int, prefill_chunk: int, sampling=None, cancel=None):
    """Run `jobs` through a Scheduler, each added at its step; returns (ids, events per step)."""
    sched = Scheduler(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
    ids: list[int | None] = [None] * len(jobs)
    steps = []
    for step in range(200):
        for j, (p, n, at) in enumerate(jobs):
            if at == step:
                ids[j] = sched.add(p, n, sampling, keep_logits=True)
        if cancel is not None and step == cancel[1]:
            sched.cancel(ids[cancel[0]])
        if step > max(at for *_, at in jobs) and not sched.busy:
            break
        steps.append(sched.step())
        assert len({rid for rid, *_ in steps[-1]}) == len(steps[-1])  # one event per request per step
    else:
        raise AssertionError("the scheduler did not finish")
    return sched, ids, steps


def check_same(sched, ids, refs) -> None:
    for rid, ref in zip(ids, refs, strict=True):
        got = sched.result(rid)
        assert got.tokens == ref.tokens, rid
        assert got.stop_reason == ref.stop_reason
        torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("name,slots,chunk", [("base", 2, 4), ("base", None, 256), ("top3", 3, 5), ("window", 2, 3)])
def test_batched_equals_alone_mixtral(ckpts, name, slots, chunk):
    """Different prompt lengths joining at different steps, leaving at different times; a cache of top-k
    slots (fewer than the union of a step's experts: misses) or every expert; chunked prefill; a
    sliding window shorter than the prompts (window: 5)."""
    engine = Engine.load(ckpts[name], EngineOptions(cache_experts=slots, prefetch=1, progress=False))
    refs = alone(engine, MIXTRAL)
    sched, ids, steps = batched(engine, MIXTRAL, max_batch=3, prefill_chunk=chunk)
    check_same(sched, ids, refs)
    assert max(sched.batch_sizes) == 3  # three sequences did decode in one forward
    ends = {rid: i for i, events in enumerate(steps) for rid, _, why in events if why}
    assert len(set(ends.values())) > 1
    if slots is not None:
        assert sum(engine.cache.table.misses) > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minimax_m2",
                                    "qwen3_next", "lfm2_moe", "qwen3_5_moe"])
def test_batched_equals_alone_families(tmp_path, family):
    """Top-k slots of 16 experts (Qwen3: top-8; MiniMax-M2: top-2 of 8): a batch's union overflows the slots at
    every step. DeepSeek and GLM-4.7-Flash: latent attention's batched decode over the pool's latent rows.
    Qwen3-Next: linear attention's state in the pool's slots, prompts prefilled in chunks of 4 from the state
    so far."""
    path = make_family(tmp_path / family, family, seed=1)
    jobs = [([1, 17, 33, 250, 4, 99, 180, 7, 64, 3], 8, 0), ([1, 5, 6], 6, 1), ([1, 40, 41, 42, 43, 44, 45], 5, 1),
            ([9, 8], 7, 4)]
    top_k = Engine.load(path, EngineOptions(prefetch=0, progress=False)).config.top_k
    engine = Engine.load(path, EngineOptions(cache_experts=top_k, prefetch=1, progress=False))
    refs = alone(engine, jobs)
    sched, ids, _ = batched(engine, jobs, max_batch=4, prefill_chunk=4)
    check_same(sched, ids, refs)
    assert sum(engine.cache.table.misses) > 0


def test_sampling_per_request_equals_alone(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, progress=False))
    s = Sampling(temperature=0.8, top_p=0.9, seed=3)
    refs = alone(engine, MIXTRAL[:3], s)
    sched, ids, _ = batched(engine, MIXTRAL[:3], max_batch=3, prefill_chunk=8, sampling=s)
    check_same(sched, ids, refs)


def test_union_of_the_batch_is_acquired_once_per_layer(ckpts, monkeypatch):
    """With slots for every expert, a decode step acquires each layer's distinct experts in one call."""
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=8, prefetch=0, progress=False))
    sched = Scheduler(engine, max_batch=3)
    for p, n, _ in MIXTRAL[:3]:
        sched.add(p, n)
    sched.step()  # prefills all three (a chunk of 256 tokens covers them)
    calls = []
    real = engine.cache.acquire
    monkeypatch.setattr(engine.cache, "acquire", lambda layer, experts, decode=False:
                        calls.append((layer, list(experts))) or real(layer, experts, decode))
    chosen = []
    tap = type("Tap", (), {"enter": lambda self, r, h, decode: None, "router_input": lambda self, r, x, decode: None,
                           "chosen": lambda self, r, idx, w: chosen.append((r, idx.tolist()))})()
    engine.model.recorder = tap
    sched.step()  # one decode forward of three sequences
    engine.model.recorder = None
    assert [layer for layer, _ in calls] == list(range(engine.config.n_moe_layers))
    for (layer, experts), (row, idx) in zip(calls, chosen, strict=True):
        assert layer == row and len(idx) == 3
        assert sorted(experts) == sorted({e for tok in idx for e in tok})


def test_trace_records_every_token(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, progress=False))
    engine.start_trace()
    sched, ids, _ = batched(engine, MIXTRAL, max_batch=3, prefill_chunk=4)
    trace = engine.stop_trace()
    fed = sum(len(p) + len(sched.result(rid).tokens) - 1 for (p, _, _), rid in zip(MIXTRAL, ids, strict=True))
    assert trace.num_tokens == fed


def test_cancel_frees_the_slot_and_leaves_the_others_alone(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, progress=False))
    refs = alone(engine, MIXTRAL)
    sched, ids, steps = batched(engine, MIXTRAL, max_batch=3, prefill_chunk=4, cancel=(0, 3))
    assert (ids[0], None, "cancelled") in steps[3]
    assert sched.result(ids[0]).stop_reason == "cancelled"
    assert sched.result(ids[0]).tokens == refs[0].tokens[: len(sched.result(ids[0]).tokens)]
    check_same(sched, ids[1:], refs[1:])
    assert sched.stats(ids[1])["generated_tokens"] == len(refs[1].tokens)


def test_bad_requests(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, context=16, progress=False))
    sched = Scheduler(engine, max_batch=2)
    with pytest.raises(UserError, match="context holds 16"):
        sched.add(list(range(1, 17)), 4)
    with pytest.raises(UserError, match="outside the vocabulary"):
        sched.add([1, 32000], 4)
    with pytest.raises(UserError, match="max-new-tokens"):
        sched.add([1], -1)
    rid = sched.add([1, 2, 3], 0)
    assert sched.step() == [(rid, None, "length")]
    # a sequence that fills the context stops there, as alone
    rid = sched.add(list(range(1, 14)), 10)
    while sched.busy:
        sched.step()
    assert sched.result(rid).stop_reason == engine.generate(list(range(1, 14)), 10).stop_reason
    assert sched.result(rid).tokens == engine.last_result.tokens


def test_requests_added_from_another_thread(ckpts):
    """A server's handlers add while the step loop runs; every request finishes as it would alone."""
    import threading

    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, progress=False))
    want = engine.generate([1, 851, 4300], 3).tokens
    sched = Scheduler(engine, max_batch=2)
    ids: list[int] = []

    def client():
        for _ in range(6):
            ids.append(sched.add([1, 851, 4300], 3))

    thread = threading.Thread(target=client)
    thread.start()
    for _ in range(500):
        sched.step()
        if not thread.is_alive() and not sched.busy:
            break
    thread.join(timeout=10)
    assert len(ids) == 6
    assert all(sched.result(rid).tokens == want for rid in ids)


def test_a_pool_beyond_the_device_budget_is_refused(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, context=64, progress=False))
    reserve = 1 << 20
    total = engine.plan.device_total + reserve
    one = engine.config.kv_bytes(64, 4)
    tight = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, context=64, progress=False,
                                                     device_budget=total + 2 * one, device_reserve=reserve))
    Scheduler(tight, max_batch=2)
    with pytest.raises(UserError, match="a KV pool of 3 sequences"):
        Scheduler(tight, max_batch=3)


@pytest.mark.parametrize("miss_policy", ["cpu", "auto"])
def test_misses_of_a_batched_step_computed_on_the_cpu(ckpts, miss_policy):
    """Miss policy cpu (and auto, which on a CPU device always computes from RAM: the device is the CPU)
    in batched steps: the same tokens, logits bit for bit and hits as fetching; on a CPU device nothing
    is copied: a slot filled by such a miss reads the expert's RAM buffer in place."""
    def run(policy: str):
        engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, prefetch=1, miss_policy=policy,
                                                          progress=False))
        sched, ids, _ = batched(engine, MIXTRAL, max_batch=3, prefill_chunk=4)
        return engine, [sched.result(rid) for rid in ids], sched

    ref, want, _ = run("fetch")
    engine, got, sched = run(miss_policy)
    assert max(sched.batch_sizes) == 3
    for a, b in zip(got, want, strict=True):
        assert a.tokens == b.tokens and torch.equal(a.logits, b.logits)
    assert engine.cache.table.hits == ref.cache.table.hits and engine.cache.table.misses == ref.cache.table.misses
    c = engine.cache.counters
    assert c.cpu_misses > 0 and c.copies == 0 and c.bytes_to_device == 0
    assert ref.cache.counters.bytes_to_device > 0


def test_penalties_bias_and_logprobs_per_request_equal_alone(ckpts):
    """Each sequence of one batch with its own penalties, min-p, bias or none: tokens and logits equal the same
    sequence alone; its log-probabilities (asked of the scheduler) are the log-softmax of those logits, its
    prompt's the log-softmax of the prompt's scored logits; a request for the prompt's alone (max_new_tokens 0)
    generates nothing."""
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, progress=False))
    samplings = [Sampling(repetition_penalty=1.5, frequency_penalty=0.7), Sampling(presence_penalty=-1.0),
                 Sampling(temperature=0.9, min_p=0.1, seed=3, logit_bias={415: 3.0, 28705: -2.0}), Sampling()]
    jobs = MIXTRAL[:3] + [MIXTRAL[0]]
    refs = [engine.generate(p, n, s, keep_logits=True) for (p, n, _), s in zip(jobs, samplings, strict=True)]
    sched = Scheduler(engine, max_batch=4, prefill_chunk=5)
    ids = [sched.add(p, n, s, keep_logits=True, logprobs=2, prompt_logprobs=1)
           for (p, n, _), s in zip(jobs, samplings, strict=True)]
    scored = sched.add(MIXTRAL[1][0], 0, prompt_logprobs=0)
    while sched.busy:
        sched.step()
    check_same(sched, ids, refs)
    assert max(sched.batch_sizes) >= 3  # sequences with different settings decoded together
    for rid, (prompt, *_) in zip(ids, jobs, strict=True):
        got = sched.result(rid)
        lp = torch.log_softmax(got.logits, dim=-1)
        assert [x.token for x in got.logprobs] == got.tokens
        want = lp[torch.arange(len(got.tokens)), torch.tensor(got.tokens)]
        assert (torch.tensor([x.logprob for x in got.logprobs]) - want).abs().max() < TOL
        assert all([t for t, _ in x.top] == lp[i].topk(2).indices.tolist() for i, x in enumerate(got.logprobs))
        check_prompt_logprobs(engine, prompt, got.prompt_logprobs)
    got = sched.result(scored)
    assert got.tokens == [] and got.stop_reason == "length"
    check_prompt_logprobs(engine, MIXTRAL[1][0], got.prompt_logprobs)


def check_prompt_logprobs(engine, prompt, got) -> None:
    want = torch.log_softmax(engine.score(prompt), dim=-1)  # [T, V]
    assert got[0] is None and [x.token for x in got[1:]] == prompt[1:]
    rows = want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert (torch.tensor([x.logprob for x in got[1:]]) - rows).abs().max() < TOL
