"""The trace format and the policy simulator: hand-worked hit counts, a plain-Python reference,
Belady's bound as a property, and every way a trace file can be bad."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from offload_moe.errors import UserError
from offload_moe.offload.eviction import NEVER, ONLINE_POLICIES, POLICIES, SlotTable, jit_available
from offload_moe.planning import replay as simulate_module
from offload_moe.planning.replay import next_uses, simulate, simulate_many
from offload_moe.planning.report import run_simulate
from offload_moe.planning.trace import Trace, TraceRecorder, load_trace, save_trace

ROOT = Path(__file__).resolve().parents[1]
needs_numba = pytest.mark.skipif(not jit_available(), reason="numba is absent (or OFFLOAD_MOE_JIT=0)")


def make_trace(experts, num_experts: int, predicted=None) -> Trace:
    """experts: nested lists [T][L][K] (or [T][L] for K=1)."""
    ex = np.asarray(experts, np.int32)
    if ex.ndim == 2:
        ex = ex[:, :, None]  # [T, L] -> [T, L, 1]
    pred = np.full_like(ex, -1) if predicted is None else np.asarray(predicted, np.int32).reshape(ex.shape)
    weights = np.full(ex.shape, 1.0 / ex.shape[2], np.float32)
    return Trace(ex, weights, pred, num_experts, ex.shape[2], ex.shape[1], "test")


def hits_of(trace: Trace, slots, policy: str, prefetch: int = 0) -> list[int]:
    return simulate(trace, slots, policy, prefetch)["per_layer_hits"]


# -- hand-worked traces --------------------------------------------------------------------------

def test_lru_keeps_the_refreshed_expert_fifo_does_not():
    # one layer, top-1, 2 slots; experts 0 1 0 2 0
    #   lru:    0 miss, 1 miss, 0 hit (0 now most recent), 2 miss evicts 1, 0 hit      -> 2 hits
    #   fifo:   0 miss, 1 miss, 0 hit (no refresh),       2 miss evicts 0, 0 miss      -> 1 hit
    #   belady: 2 evicts 1 (never used again) rather than 0 (used at t=4)               -> 2 hits
    trace = make_trace([[0], [1], [0], [2], [0]], num_experts=4)
    assert hits_of(trace, 2, "lru") == [2]
    assert hits_of(trace, 2, "fifo") == [1]
    assert hits_of(trace, 2, "belady") == [2]
    r = simulate(trace, 2, "fifo")
    assert (r["hits"], r["misses"], r["accesses"], r["copies"]) == (1, 4, 5, 4)
    assert r["hit_rate"] == pytest.approx(0.2)


def test_lfu_keeps_the_most_used_expert():
    # experts 0 0 1 2 0 with 2 slots
    #   lfu:    0 m, 0 h, 1 m; 2 evicts 1 (1 use against 2); 0 h                          -> 2 hits
    #   lru:    0 m, 0 h, 1 m; 2 evicts 0 (used at t=1, 1 at t=2); 0 m evicts 1          -> 1 hit
    #   fifo:   2 evicts 0 (first in); 0 misses                                          -> 1 hit
    #   belady: 2 evicts 1 (never again), 0 hits                                          -> 2 hits
    trace = make_trace([[0], [0], [1], [2], [0]], num_experts=4)
    assert hits_of(trace, 2, "lfu") == [2]
    assert hits_of(trace, 2, "lru") == [1]
    assert hits_of(trace, 2, "fifo") == [1]
    assert hits_of(trace, 2, "belady") == [2]


def test_belady_looks_ahead_and_layers_are_separate_caches():
    # top-2, 3 slots, two layers; on a tie of keys the lower slot leaves.
    # layer 0: {0,1} {2,0} {1,3} {0,1}
    #   lru:    t0 0->s0, 1->s1; t1 0 hit, 2->s2; t2 1 hit, 3 must evict 0 or 2 (both last used at t1):
    #           the tie takes s0, expert 0; t3 1 hit, 0 misses                             -> 3 hits
    #   belady: t2 evicts 2 (never used again) and keeps 0 (used at t3); t3 two hits     -> 4 hits
    # layer 1: {2,3} {2,3} {0,1} {2,3}
    #   both:   t1 two hits; t2 0->s2, 1 evicts 2 (s0: ties with 3 under both rules); t3 3 hits -> 3 hits
    trace = make_trace([[[0, 1], [2, 3]], [[2, 0], [2, 3]], [[1, 3], [0, 1]], [[0, 1], [2, 3]]], num_experts=4)
    assert hits_of(trace, 3, "lru") == [3, 3]
    assert hits_of(trace, 3, "belady") == [4, 3]
    r = simulate(trace, 3, "belady")
    assert r["per_layer_misses"] == [4, 5]
    assert r["per_layer"] == [0.5, 0.375]
    assert r["hit_rate"] == pytest.approx(7 / 16)


def test_prefetch_counts():
    # two layers, top-1, 2 slots, lru. Layer 0 always wants 0: 1 miss, 3 hits, no prediction.
    # layer 1 wants 1 2 3 1, predicted 1 2 0 1:
    #   t0 prefetch 1 (copy), access 1 hit, served by prefetch
    #   t1 prefetch 2 (copy, empty slot), access 2 hit, served by prefetch
    #   t2 prefetch 0 (copy) evicts 1; access 3 misses, evicts 2 (used at t1, 0 stamped at t2)
    #   t3 prefetch 1 (copy) evicts 0 (stamped before 3's access at t2); access 1 hit, served by prefetch
    # layer 1: 3 hits, 1 miss; 4 prefetch copies, 3 of them used (by their own token here).
    trace = make_trace([[0, 1], [0, 2], [0, 3], [0, 1]], num_experts=4,
                       predicted=[[-1, 1], [-1, 2], [-1, 0], [-1, 1]])
    r = simulate(trace, 2, "lru", prefetch=1)
    assert r["per_layer_hits"] == [3, 3] and r["per_layer_misses"] == [1, 1]
    assert r["prefetch_copies"] == 4
    assert r["prefetch_hits"] == 3
    assert r["copies"] == 2 + 4
    assert r["prefetch_precision"] == pytest.approx(3 / 4)
    assert r["prefetch_recall"] == pytest.approx(3 / 8)
    # without prefetch layer 1 misses every time (1 2 3 1 with 2 slots: 1 is evicted by 3)
    assert hits_of(trace, 2, "lru") == [3, 0]


def test_a_prefetch_used_by_a_later_token_counts_as_used():
    # 3 slots, lru; layer 0 wants 0 twice (1 hit); layer 1 wants 1 then 2, predicted 2 then 3:
    #   t0 prefetch 2 (copy, empty slot); access 1 misses (empty slot)
    #   t1 prefetch 3 (copy, empty slot); access 2 hits the slot that t0's prefetch filled, unused since:
    #   a prefetch hit, though not for the token it was fetched for; 3 is never used.
    trace = make_trace([[0, 1], [0, 2]], num_experts=4, predicted=[[-1, 2], [-1, 3]])
    r = simulate(trace, 3, "lru", prefetch=1)
    assert r["per_layer_hits"] == [1, 1]
    assert r["prefetch_copies"] == 2 and r["prefetch_hits"] == 1
    assert r["prefetch_precision"] == pytest.approx(1 / 2)
    assert r["prefetch_recall"] == pytest.approx(1 / 4)


def test_per_layer_slots():
    # layer 0 with 1 slot: 0 1 0 1 all miss; layer 1 with 2 slots: 0 1 hits after the first two
    trace = make_trace([[0, 0], [1, 1], [0, 0], [1, 1]], num_experts=2)
    r = simulate(trace, [1, 2], "lru")
    assert r["per_layer_hits"] == [0, 2]
    assert r["slots"] == [1, 2]
    with pytest.raises(UserError, match="2 layers"):
        simulate(trace, [1, 2, 2], "lru")
    with pytest.raises(UserError, match="at least top_k=1"):
        simulate(trace, [0, 2], "lru")


def test_bad_arguments():
    trace = make_trace([[0], [1]], num_experts=2)
    with pytest.raises(UserError, match="lru"):
        simulate(trace, 2, "mru")
    with pytest.raises(UserError, match="use 1 .replay the predictions"):
        simulate(trace, 2, "lru", prefetch=2)


def test_next_uses_matches_a_scan_ahead():
    rng = np.random.default_rng(3)
    experts = np.stack([rng.permutation(6)[:2] for _ in range(40 * 3)]).reshape(40, 3, 2)  # [T*L, K] -> [T, L, K]
    for layer in range(3):
        nxt, first = next_uses(experts[:, layer], 6)
        for t in range(40):
            for k in range(2):
                later = [u for u in range(t + 1, 40) if experts[t, layer, k] in experts[u, layer]] or [NEVER]
                assert nxt[t, k] == later[0]
        for e in range(6):
            uses = [u for u in range(40) if e in experts[u, layer]] or [NEVER]
            assert first[e] == uses[0]


# -- a plain-Python reference and properties ------------------------------------------------------

def reference_hits(trace: Trace, slots: list[int], policy: str) -> list[int]:
    """The simulate docstring, one layer and one token at a time, with dicts and lists."""
    T, L, K = trace.experts.shape
    out = []
    for layer in range(L):
        cache: list[int | None] = [None] * slots[layer]
        last: dict[int, int] = {}
        inserted: dict[int, int] = {}
        uses: Counter[int] = Counter()
        hits = 0
        for t in range(T):
            want = [int(e) for e in trace.experts[t, layer]]
            for e in want:
                uses[e] += 1
                if e in cache:
                    hits += 1
                    last[e] = t
            for e in want:
                if e in cache:
                    continue
                if None in cache:
                    s = cache.index(None)
                else:  # smallest key leaves, the lower slot on a tie; never an expert this token wants
                    s = min((reference_key(policy, old, last, inserted, uses, next_use(trace, t, layer, old)), s)
                            for s, old in enumerate(cache) if old not in want)[1]
                cache[s] = e
                last[e] = inserted[e] = t
        out.append(hits)
    return out


def reference_key(policy: str, expert: int, last: dict, inserted: dict, uses: Counter, next_at: int):
    return {"lru": last[expert], "fifo": inserted[expert], "lfu": (uses[expert], last[expert]),
            "belady": -next_at}[policy]


def next_use(trace: Trace, t: int, layer: int, expert: int) -> int:
    later = [u for u in range(t + 1, trace.num_tokens) if expert in trace.experts[u, layer]]
    return later[0] if later else NEVER


@st.composite
def traces(draw) -> tuple[Trace, list[int]]:
    E = draw(st.integers(2, 6))
    K = draw(st.integers(1, min(3, E)))
    L = draw(st.integers(1, 3))
    T = draw(st.integers(1, 25))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((T, L, E)), axis=-1)[..., :K]  # [T, L, K] distinct per token-layer
    skew = draw(st.booleans())  # a few hot experts, so that caches do something
    if skew:
        experts = np.where(rng.random((T, L, 1)) < 0.6, np.arange(K), experts)  # [T, L, K]
    slots = [draw(st.integers(K, E)) for _ in range(L)]
    return make_trace(experts, E), slots


@settings(max_examples=60, deadline=None)
@given(traces())
def test_simulator_matches_the_reference_and_belady_bounds_every_policy(case):
    trace, slots = case
    results = {p: simulate(trace, slots, p) for p in POLICIES}
    for p in ("lru", "fifo", "lfu", "belady"):
        assert results[p]["per_layer_hits"] == reference_hits(trace, slots, p), p
    for p in ONLINE_POLICIES:
        assert results["belady"]["hits"] >= results[p]["hits"], p


def test_many_slots_match_the_reference():
    """LRU and FIFO rows of more than LINKED_SLOTS slots keep their slots listed in key order:
    the same hits as the reference's scan."""
    rng = np.random.default_rng(11)
    T, L, E, K = 300, 2, 16, 3
    experts = np.argsort(rng.random((T, L, E)) + (np.arange(E) < 5) * rng.random((T, L, 1)), axis=-1)[..., :K]
    trace = make_trace(experts, E)
    for slots in ([9, 12], [11, 3]):
        for p in ("lru", "fifo", "lfu", "belady"):
            assert simulate(trace, slots, p)["per_layer_hits"] == reference_hits(trace, slots, p), (slots, p)


@settings(max_examples=30, deadline=None)
@given(traces())
def test_with_slots_equal_to_top_k_every_policy_agrees(case):
    trace, _ = case
    K = trace.top_k
    # every token's K experts fill the layer, so the cache holds exactly the previous token's experts
    lru = simulate(trace, K, "lru")["per_layer_hits"]
    assert simulate(trace, K, "belady")["per_layer_hits"] == lru
    assert simulate(trace, K, "random", seed=5)["per_layer_hits"] == lru


@settings(max_examples=20, deadline=None)
@given(traces(), st.sampled_from(POLICIES), st.booleans())
def test_several_sizes_in_one_table_equal_separate_runs(case, policy, prefetch):
    trace, slots = case
    trace.predicted[:, 1:] = trace.experts[:, :-1]  # some prediction, however poor
    sizes = [trace.top_k, slots, trace.num_experts]
    together = simulate_many(trace, sizes, policy, int(prefetch), seed=1)
    assert together == [simulate(trace, s, policy, int(prefetch), seed=1) for s in sizes]


# -- the compiled loop and the plain Python one ----------------------------------------------------

@needs_numba
@pytest.mark.parametrize("prefetch", [0, 1])
def test_the_compiled_loop_counts_what_the_python_loop_counts(monkeypatch, prefetch):
    """Every policy and size, long enough that each row's random stream regenerates its Mersenne
    Twister words several times; the layers shared out over threads (compiled) and processes (not)."""
    rng = np.random.default_rng(7)
    T, L, E, K = 1500, 2, 16, 2
    experts = np.argsort(rng.random((T, L, E)), axis=-1)[..., :K]  # [T, L, K]
    experts = np.where(rng.random((T, L, 1)) < 0.5, experts % 6, experts)  # [T, L, K]: some locality
    experts[..., 1] = np.where(experts[..., 1] == experts[..., 0], (experts[..., 0] + 1) % E, experts[..., 1])
    predicted = np.where(rng.random((T, L, 1)) < 0.6, experts, np.roll(experts, 1, axis=0))  # [T, L, K]
    predicted[:, 0] = -1
    trace = make_trace(experts, E, predicted)
    sizes = [2, 5, 12]  # 12: LRU and FIFO rows that keep their slots listed
    monkeypatch.setattr(simulate_module, "PARALLEL_WORK", 0)
    compiled = [simulate_many(trace, sizes, p, prefetch, seed=3) for p in POLICIES]
    monkeypatch.setenv("OFFLOAD_MOE_JIT", "0")
    assert not SlotTable([2], E).compiled
    assert [simulate_many(trace, sizes, p, prefetch, seed=3) for p in POLICIES] == compiled


# -- trace files ----------------------------------------------------------------------------------

def sample_trace() -> Trace:
    trace = make_trace([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[0, 3], [1, 2]]], num_experts=4,
                       predicted=[[[-1, -1], [2, 1]], [[-1, -1], [3, 0]], [[-1, -1], [0, 1]]])
    trace.weights[:] = [0.7, 0.3]
    trace.metadata["config"] = '{"dim": 8}'
    trace.tensors["prompt_lengths"] = np.array([2, 1], np.int64)
    return trace


def test_round_trip(tmp_path):
    trace = sample_trace()
    path = tmp_path / "t.safetensors"
    save_trace(path, trace)
    back = load_trace(path)
    for key in ("experts", "weights", "predicted"):
        np.testing.assert_array_equal(getattr(back, key), getattr(trace, key))
        assert getattr(back, key).dtype == getattr(trace, key).dtype
    assert (back.num_experts, back.top_k, back.num_layers, back.model) == (4, 2, 2, "test")
    assert back.metadata == {"config": '{"dim": 8}'}
    np.testing.assert_array_equal(back.tensors["prompt_lengths"], [2, 1])
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary file left behind


def write_raw(path, tensors: dict, metadata: dict | None) -> str:
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def raw_parts() -> tuple[dict, dict]:
    t = sample_trace()
    tensors = {"experts": t.experts, "weights": t.weights, "predicted": t.predicted}
    return tensors, {"num_experts": "4", "top_k": "2", "num_layers": "2", "model": "m"}


@pytest.mark.parametrize("change, message", [
    (lambda t, m: t.pop("weights"), "lacks tensor.*weights"),
    (lambda t, m: m.pop("top_k"), "lacks metadata top_k"),
    (lambda t, m: m.update(num_layers="two"), "num_layers='two' is not an integer"),
    (lambda t, m: m.update(num_layers="3"), "num_layers=3"),
    (lambda t, m: t.update(weights=t["weights"][:2]), "'weights' has shape \\[2, 2, 2\\]"),
    (lambda t, m: t.update(experts=t["experts"].reshape(3, 4)), "must be \\[tokens, layers, top_k\\]"),
    (lambda t, m: t.update(experts=t["experts"].astype(np.int64)), "'experts' must be int32, not int64"),
    (lambda t, m: t.update(experts=t["experts"] + 1), "ids from 1 to 4; they must lie in \\[0, 4\\)"),
    (lambda t, m: t.update(predicted=t["predicted"] - 1), "'predicted' holds ids from -2"),
    (lambda t, m: t.update(experts=np.zeros_like(t["experts"])), "names one expert twice for token 0 at layer 0"),
    (lambda t, m: t.update(weights=np.full_like(t["weights"], np.nan)), "NaN"),
])
def test_bad_traces_say_what_is_wrong(tmp_path, change, message):
    tensors, metadata = raw_parts()
    change(tensors, metadata)
    path = write_raw(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(UserError, match=message):
        load_trace(path)


def test_unreadable_trace_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_trace(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("this is not a safetensors file at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_trace(junk)
    tensors, _ = raw_parts()
    with pytest.raises(UserError, match="lacks metadata"):
        load_trace(write_raw(tmp_path / "bare.safetensors", tensors, None))
    with pytest.raises(UserError, match="folder .* does not exist"):
        save_trace(tmp_path / "no" / "t.safetensors", sample_trace())
    _, metadata = raw_parts()
    as_torch = {k: torch.from_numpy(v) for k, v in tensors.items()}
    as_torch["weights"] = as_torch["weights"].bfloat16()
    save_torch(as_torch, str(tmp_path / "bf16.safetensors"), metadata=metadata)
    with pytest.raises(UserError, match="'weights' is BF16, which numpy cannot read"):
        load_trace(tmp_path / "bf16.safetensors")


def test_recorder_stacks_forwards_in_token_order():
    rec = TraceRecorder(num_layers=2, top_k=2, num_experts=4, model_name="tiny")
    # a prefill of 2 tokens, then one decode token
    rec.add(0, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.6, 0.4], [0.5, 0.5]]), None)
    rec.add(1, torch.tensor([[1, 2], [3, 0]]), torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([[1, 3], [3, 0]]))
    rec.add(0, torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]], dtype=torch.bfloat16), None)
    rec.add(1, torch.tensor([[0, 2]]), torch.tensor([[0.6, 0.4]]), torch.tensor([[0, 1]]))
    trace = rec.finish()
    assert trace.experts.shape == (3, 2, 2) and trace.experts.dtype == np.int32
    assert trace.experts[:, 0].tolist() == [[0, 1], [2, 3], [3, 1]]
    assert trace.experts[:, 1].tolist() == [[1, 2], [3, 0], [0, 2]]
    assert trace.predicted[:, 0].tolist() == [[-1, -1]] * 3
    assert trace.predicted[:, 1].tolist() == [[1, 3], [3, 0], [0, 1]]
    assert trace.weights.dtype == np.float32 and trace.weights[2, 0, 0] == pytest.approx(0.7, abs=1e-2)
    assert (trace.model, trace.num_layers, trace.top_k, trace.num_experts) == ("tiny", 2, 2, 4)
    with pytest.raises(RuntimeError, match="expected layer 0"):
        rec.add(1, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]), None)
    rec.add(0, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]), None)
    with pytest.raises(RuntimeError, match="after 1 of 2 layers"):
        rec.finish()
    assert TraceRecorder(3, 2, 8, "m").finish().experts.shape == (0, 3, 2)


# -- the command ----------------------------------------------------------------------------------

@pytest.fixture
def trace_file(tmp_path) -> str:
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((200, 3, 6)), axis=-1)[..., :2]  # [T, L, K]
    experts = np.where(rng.random((200, 3, 1)) < 0.5, [0, 1], experts)  # [T, L, K]: two hot experts
    predicted = np.full_like(experts, -1)
    predicted[:, 1:] = experts[:, 1:]  # a perfect predictor
    path = tmp_path / "run.safetensors"
    save_trace(path, make_trace(experts, 6, predicted))
    return str(path)


def test_run_simulate_json(trace_file, capsys):
    assert run_simulate(trace_file, [4, 2], ["lru", "fifo"], 0, True, None) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"] == {"tokens": 200, "layers": 3, "experts": 6, "top_k": 2}
    pairs = [(r["policy"], r["slots"]) for r in out["results"]]
    assert pairs == [("lru", 2), ("lru", 4), ("fifo", 2), ("fifo", 4), ("belady", 2), ("belady", 4)]
    for r in out["results"]:
        assert len(r["per_layer"]) == 3 and r["hits"] + r["misses"] == r["accesses"] == 1200
        assert r["hit_rate"] <= next(b["hit_rate"] for b in out["results"]
                                     if b["policy"] == "belady" and b["slots"] == r["slots"])


def test_run_simulate_table_prefetch_and_plot(trace_file, tmp_path, capsys):
    png = tmp_path / "sim.png"
    assert run_simulate(trace_file, [3], ["lru"], 1, False, str(png)) == 0
    out = capsys.readouterr().out
    assert "belady" in out and "per layer at 3 slots" in out and "precision" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("slots, policies, prefetch, message", [
    ([1], ["lru"], 0, "at least top_k=2"),
    ([7], ["lru"], 0, "at most num_experts=6"),
    ([2], ["lru", "clock"], 0, "unknown policy 'clock'; choose from lru, lfu, fifo, random, lrfu, arc, least-stale, "
                               "predicted, learned, belady, or all"),
    ([2], ["lru"], 2, "use 1 .replay the predictions"),
])
def test_run_simulate_rejects_bad_requests(trace_file, slots, policies, prefetch, message):
    with pytest.raises(UserError, match=message):
        run_simulate(trace_file, slots, policies, prefetch, False, None)


def test_run_simulate_prefetch_needs_predictions(tmp_path):
    path = tmp_path / "t.safetensors"
    save_trace(path, make_trace([[0], [1]], num_experts=2))
    with pytest.raises(UserError, match="no predictions"):
        run_simulate(str(path), [1], ["lru"], 1, False, None)


@needs_numba
def test_the_command_prints_the_same_results_without_numba(trace_file):
    runs = [subprocess.run([sys.executable, "run.py", "simulate", "--trace", trace_file, "--prefetch", "1", "--json"],
                           cwd=ROOT, env={**os.environ, "OFFLOAD_MOE_JIT": jit}, capture_output=True, text=True,
                           check=True).stdout for jit in ("1", "0")]
    assert json.loads(runs[0]) == json.loads(runs[1])


def test_the_command_starts_without_torch(trace_file):
    """run.py's `simulate` imports neither torch nor the engine (their import alone takes seconds)."""
    code = ("import json, sys; from offload_moe.cli.entry import main; "
            f"assert main(['simulate', '--trace', {trace_file!r}, '--slots', '2', '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [r["policy"] for r in json.loads(done.stdout)["results"]] == [*POLICIES]


# -- a slot pool shared by the layers ---------------------------------------------------------------

def test_a_global_pool_lends_one_layers_slots_to_another():
    """Layer 0 keeps to expert 0, layer 1 cycles through 0, 1, 2: 2 slots each, layer 1's lru misses every
    step; one pool of their 4 holds layer 0's expert and all three of layer 1's, so only first uses miss."""
    trace = make_trace([[0, t % 3] for t in range(30)], num_experts=4)
    assert simulate(trace, 2, "lru")["per_layer_hits"] == [29, 0]
    pooled = simulate(trace, 2, "lru", pool="global")
    assert pooled["per_layer_hits"] == [29, 27] and pooled["pool"] == "global" and pooled["slots"] == 2
    with pytest.raises(UserError, match="unknown slot pool 'shared'"):
        simulate(trace, 2, "lru", pool="shared")


@settings(max_examples=30, deadline=None)
@given(traces())
def test_in_a_global_pool_belady_bounds_every_policy_and_sizes_share_a_table(case):
    trace, slots = case
    results = {p: simulate(trace, slots, p, pool="global") for p in POLICIES}
    for p in ONLINE_POLICIES:
        assert results["belady"]["hits"] >= results[p]["hits"], p
        assert simulate_many(trace, [slots, slots], p, pool="global") == [results[p]] * 2
