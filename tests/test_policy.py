"""Pure logic: the eviction rule (policy.SlotTable) and the router math."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_moe.config import ModelConfig
from offload_moe.modeling.transformer import Transformer
from offload_moe.offload import eviction as policy
from offload_moe.offload import slot_loop
from offload_moe.offload.eviction import NEVER, POLICIES, NoVictimError

# the loop runs compiled (numba) or as plain Python: every rule test runs both
MODES = [False, pytest.param(True, marks=pytest.mark.skipif(not policy.jit_available(), reason="numba is absent"))]


@pytest.fixture(params=MODES, ids=["python", "compiled"])
def SlotTable(request):
    return lambda *args, **kw: policy.SlotTable(*args, compiled=request.param, **kw)


def access(t: policy.SlotTable, row: int, experts: list[int], next_use=None):
    hit, _, evicted = t.access_row(row, experts, next_use)
    return hit, evicted


def test_lru_evicts_least_recently_used_and_never_the_tokens_own(SlotTable):
    t = SlotTable([3], num_experts=8, policy="lru")
    assert access(t, 0, [0, 1]) == ([False, False], [-1, -1])
    assert access(t, 0, [2, 0]) == ([False, True], [-1, -1])  # 2 fills the empty third slot
    # resident {0, 1, 2} with last uses 0:2, 1:1, 2:2. Token [3, 0]: 0 is protected (same token),
    # so 3 evicts 1, the least recently used of the others
    assert access(t, 0, [3, 0]) == ([False, True], [1, -1])
    # token [4, 5] with {0:3, 2:2, 3:3}: 4 evicts 2; 5 may not evict 4 (same token), evicts 0 (tie with 3,
    # lower slot first)
    assert access(t, 0, [4, 5]) == ([False, False], [2, 0])
    assert sorted(t.resident(0)) == [3, 4, 5]


def test_fifo_ignores_hits_and_lfu_counts_them(SlotTable):
    fifo, lfu = SlotTable([2], 8, "fifo"), SlotTable([2], 8, "lfu")
    for t in (fifo, lfu):
        access(t, 0, [0])
        access(t, 0, [1])
        access(t, 0, [0])  # hit: refreshes 0 for LRU/LFU, not for FIFO
        access(t, 0, [0])
        access(t, 0, [1])
    assert access(fifo, 0, [2]) == ([False], [0])  # 0 came in first
    assert access(lfu, 0, [2]) == ([False], [1])  # 1 used twice, 0 three times


def test_belady_evicts_the_furthest_next_use(SlotTable):
    t = SlotTable([2], 4, "belady")
    access(t, 0, [0, 1], [5, 9, NEVER, NEVER])
    # 2 arrives: 0 is next used at 5, 1 at 9 -> 1 leaves
    assert access(t, 0, [2], [5, 9, 7, NEVER]) == ([False], [1])
    # never-again leaves first
    assert access(t, 0, [3], [NEVER, NEVER, 8, 12]) == ([False], [0])


def test_prefetch_fills_without_counting_uses_and_never_evicts_its_own_predictions(SlotTable):
    t = SlotTable([2], 8, "lfu")
    inserted, slot, evicted = t.prefetch_row(0, [4, 5])
    assert inserted == [True, True] and sum(t.uses[0]) == 0
    inserted, _, _ = t.prefetch_row(0, [4, -1])  # resident already, -1 ignored
    assert inserted == [False, False]


def test_a_repeated_prediction_takes_one_slot(SlotTable):
    t = SlotTable([3], 8, "lru")
    inserted, slot, _ = t.prefetch_row(0, [2, 2, 5])
    assert inserted == [True, False, True] and sorted(t.resident(0)) == [2, 5]
    assert t.slot_of[0][2] == slot[0] and t.resident(0).count(2) == 1


def test_lfu_breaks_ties_by_recency_at_any_count(SlotTable):
    t = SlotTable([2], 4, "lfu")
    access(t, 0, [0])
    access(t, 0, [1])
    t.uses[0][0] = t.uses[0][1] = 1 << 40  # a long-running server: counts far beyond float precision
    access(t, 0, [1])  # 1 is now the more recently used of two equally used experts... and one more use
    t.uses[0][1] -= 1
    assert access(t, 0, [2]) == ([False], [0])


def test_rows_are_independent_and_may_differ_in_slots(SlotTable):
    t = SlotTable([2, 4], 8, "lru")
    for e in range(4):
        t.access_row(0, [e])
        t.access_row(1, [e])
    assert sorted(t.resident(0)) == [2, 3] and sorted(t.resident(1)) == [0, 1, 2, 3]


def test_no_victim_when_the_access_needs_more_than_the_slots(SlotTable):
    t = SlotTable([2], 8, "lru")
    with pytest.raises(NoVictimError):
        access(t, 0, [0, 1, 2])


def test_belady_is_offline_and_unknown_policy_is_refused(SlotTable):
    with pytest.raises(ValueError, match="next-use"):
        t = SlotTable([1], 4, "belady")
        access(t, 0, [0])
        access(t, 0, [1])
    with pytest.raises(ValueError, match="unknown eviction policy"):
        SlotTable([1], 4, "mru")


def test_an_expert_id_beyond_the_table_and_a_short_next_use_table_are_refused(SlotTable):
    t = SlotTable([2], 4, "belady")
    with pytest.raises(ValueError, match="not below num_experts=4"):  # the compiled loop does not check bounds
        t.replay(0, [[0], [1, 4]], [[-1], [5]], next_use=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="one per expert"):
        t.access_row(0, [1], [0, 0])


def test_the_compiled_random_stream_is_pythons():
    """`_mt_uniforms` (what the compiled loop draws with) is random.Random.random() over its state,
    across regenerations of the 624 words."""
    state, out = list(random.Random(1234).getstate()[1]), [0.0] * 1000
    slot_loop._mt_uniforms(state, out, 1000)
    reference = random.Random(1234)
    assert out == [reference.random() for _ in range(1000)]


def test_without_a_writable_cache_folder_the_loop_is_compiled_for_the_run(capsys):
    calls = []

    def njit(signature, **options):  # numba's, where no cache folder is writable
        calls.append(options)
        if options.get("cache"):
            raise RuntimeError("cannot cache function '_replay_row': no locator available for file 'policy.py'")
        return lambda fn: ("compiled", fn)

    assert slot_loop.compile_loop(njit, len, "sig") == ("compiled", len)
    assert calls == [{"cache": True, "nogil": True}, {"nogil": True}]
    assert "NUMBA_CACHE_DIR" in capsys.readouterr().err


def test_a_prefetch_counts_as_used_at_its_first_hit_and_wasted_when_evicted_unused(SlotTable):
    t = SlotTable([2], 8, "lru")
    t.prefetch_row(0, [4, 5])
    t.access_row(0, [4, 1])  # 4: a prefetch hit; 1 evicts 5, never used
    t.access_row(0, [4, 1])  # plain hits now
    assert (t.hits, t.misses, t.prefetch_copies, t.prefetch_hits) == ([3], [1], [2], [1])


@settings(max_examples=40, deadline=None)
@given(policy_name=st.sampled_from(POLICIES), slots=st.sampled_from([3, 4, 9, 11]), seed=st.integers(0, 3),
       steps=st.lists(st.tuples(st.permutations(range(12)), st.permutations(range(12)), st.booleans()),
                      min_size=1, max_size=40))
def test_replaying_a_trace_in_one_call_equals_stepping_it(policy_name, slots, seed, steps):
    """The simulator's one call per row and the engine's step-by-step calls are the same loop, and
    the compiled loop gives what the plain Python one gives, random draws included (9 and 11 slots:
    LRU and FIFO rows that keep their slots listed)."""
    accesses = [list(a[:3]) for a, _, _ in steps]
    predictions = [list(p[:3]) if on else [-1, -1, -1] for _, p, on in steps]
    later = [[NEVER] * 3 for _ in steps]  # a valid table: each access's next use, from the end
    seen: dict[int, int] = {}
    for t in reversed(range(len(steps))):
        later[t] = [seen.get(e, NEVER) for e in accesses[t]]
        seen.update({e: t for e in accesses[t]})
    first = [seen.get(e, NEVER) for e in range(12)]
    tables = []
    for compiled in [False, True] if policy.jit_available() else [False]:
        whole = policy.SlotTable([slots], 12, policy_name, seed, compiled=compiled)
        stepped = policy.SlotTable([slots], 12, policy_name, seed, compiled=compiled)
        whole.replay(0, accesses, predictions, later, list(first))
        next_use = list(first)
        for t, exps in enumerate(accesses):
            stepped.prefetch_row(0, predictions[t], next_use)
            stepped.access_row(0, exps, next_use)
            for e, n in zip(exps, later[t], strict=True):
                next_use[e] = n
        tables += [whole, stepped]
    for t in tables[1:]:
        assert [int(e) for e in t.expert[0][:slots]] == [int(e) for e in tables[0].expert[0][:slots]]
        assert (t.hits, t.misses, t.prefetch_copies, t.prefetch_hits) == (
            tables[0].hits, tables[0].misses, tables[0].prefetch_copies, tables[0].prefetch_hits)


def test_router_renormalises_the_top_k_of_the_softmax():
    c = ModelConfig(dim=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, ffn_dim=4, num_experts=4, top_k=2,
                    vocab_size=8)
    model = Transformer(c)
    blk = model.layers[0]
    with torch.no_grad():
        blk.gate.weight.copy_(torch.eye(4))
    weights, idx = model.route(blk, torch.tensor([[2.0, 1.0, 0.0, -1.0]]))
    assert idx.tolist() == [[0, 1]]
    e = math.exp(1.0)
    assert weights[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])
