"""The policies beyond the classic ones, each on a hand-made sequence that shows its defining behaviour, and a
pool shared by layers; every test runs the loop as plain Python and compiled (where numba is installed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_moe.offload import eviction, slot_loop
from offload_moe.offload.eviction import NEVER, POLICIES

MODES = [False, pytest.param(True, marks=pytest.mark.skipif(not eviction.jit_available(), reason="numba is absent"))]


@pytest.fixture(params=MODES, ids=["python", "compiled"])
def SlotTable(request):
    return lambda *args, **kw: eviction.SlotTable(*args, compiled=request.param, **kw)


def run(table, layer: int, steps: list[list[int]]) -> None:
    for step in steps:
        table.access_row(layer, step)


def test_lrfu_keeps_the_frequent_expert_and_forgets_old_frequency(SlotTable):
    # 0 used three times, then 1 once: lru evicts 0 for 2, lrfu evicts 1 (fewer decayed uses)
    lru, lrfu = SlotTable([2], 4, "lru"), SlotTable([2], 4, "lrfu")
    for t in (lru, lrfu):
        run(t, 0, [[0], [0], [0], [1], [2]])
    assert sorted(lru.resident(0)) == [1, 2] and sorted(lrfu.resident(0)) == [0, 2]
    # 0 used ten times long ago (100 steps of 2 since, over six half-lives), 1 twice lately: lfu keeps the old
    # count, lrfu has let it decay below the recent one
    lfu, lrfu = SlotTable([3], 4, "lfu"), SlotTable([3], 4, "lrfu")
    for t in (lfu, lrfu):
        run(t, 0, [[0]] * 10 + [[2]] * 100 + [[1], [1], [3]])
    assert sorted(lfu.resident(0)) == [0, 2, 3] and sorted(lrfu.resident(0)) == [1, 2, 3]


def test_the_decay_halves_per_half_life_in_integers():
    h = slot_loop.HALF_LIFE
    assert slot_loop._decayed(1 << 20, 0) == 1 << 20
    assert slot_loop._decayed(1 << 20, h) == 1 << 19 and slot_loop._decayed(1 << 20, 3 * h) == 1 << 17
    assert slot_loop._decayed(1 << 20, h // 2) == (1 << 20) * 3 // 4  # between halvings: the chord of 2^-x
    assert slot_loop._decayed(1 << 20, 1000 * h) == 0


def test_arc_resists_a_scan_and_adapts_its_target(SlotTable):
    # 0 and 1 used twice (T2); a scan of experts used once (T1) passes without evicting them, where lru loses both
    lru, arc = SlotTable([3], 8, "lru"), SlotTable([3], 8, "arc")
    for t in (lru, arc):
        run(t, 0, [[0], [0], [1], [1], [2], [3], [4], [5]])
    assert {0, 1} <= set(arc.resident(0)) and not {0, 1} & set(lru.resident(0))
    state = arc.state[0]
    assert state[slot_loop.ARC_P] == 0 and state[slot_loop.ARC_B1] == 3  # 2, 3, 4 left T1 for its ghost list
    run(arc, 0, [[3]])  # a B1 ghost comes back: T1 was too small, its target grows; the ghost goes to T2
    assert arc.aux[0][arc.slot(0, 3)] == 1 and state[slot_loop.ARC_P] == 1
    # T1 (5) is at its target now: T2's least recently used (0) leaves for B2; the ghosts are the last 3 evicted,
    # so 2 is forgotten, and 3 left B1 on its return
    assert 0 not in arc.resident(0) and (state[slot_loop.ARC_B1], state[slot_loop.ARC_B2]) == (1, 1)


def test_a_prefetched_expert_is_used_once_at_its_first_hit(SlotTable):
    arc = SlotTable([2], 8, "arc")
    arc.prefetch_row(0, [4])
    run(arc, 0, [[4]])
    assert arc.aux[0][arc.slot(0, 4)] == 0  # T1: the prefetch was no use
    run(arc, 0, [[4]])
    assert arc.aux[0][arc.slot(0, 4)] == 1  # T2


def test_learned_learns_what_follows_what(SlotTable):
    """A cycle 0, 1, 2 through two slots: lru (and lfu, whose counts tie) always evicts the next one; learned
    counts that 2 follows 1 and 0 follows 2, keeps the expert that comes next, and hits every other step."""
    steps = [[t % 3] for t in range(60)]
    hits = {}
    for name in ("lru", "lfu", "learned"):
        t = SlotTable([2], 4, name)
        run(t, 0, steps)
        hits[name] = t.hits[0]
    assert hits["lru"] == hits["lfu"] == 0 and hits["learned"] >= 25


def global_tokens(table, tokens: list[list[list[int]]], pending=None) -> None:
    """Tokens through a pool shared by len(token) layers, layer by layer."""
    for token in tokens:
        for layer, experts in enumerate(token):
            table.access_row(layer, experts, pending=pending)


def test_least_stale_measures_each_layer_by_its_own_clock(SlotTable):
    """A pool of 3 for two layers. Token 1's layer 1 must evict: layer 0's expert 0 and layer 1's expert 0 both
    missed their layer's latest step (staleness 1). lru evicts layer 0's (used first in the pool's order);
    least-stale keeps it, since layer 0's next access comes first, and evicts layer 1's. In a layer's own
    cache least-stale is lru."""
    lru, stale = SlotTable([3], 4, "lru", layers=2), SlotTable([3], 4, "least-stale", layers=2)
    for t in (lru, stale):
        global_tokens(t, [[[0], [0]], [[1], [1]]])
    assert (sorted(lru.resident(0)), sorted(lru.resident(1))) == ([1], [0, 1])
    assert (sorted(stale.resident(0)), sorted(stale.resident(1))) == ([0, 1], [1])
    assert stale.hits == [0, 0] and stale.misses == [2, 2]  # counted per layer
    steps = [[t % 3] for t in range(30)] + [[0], [1], [0], [3]]
    one, other = SlotTable([2], 4, "lru"), SlotTable([2], 4, "least-stale")
    for t in (one, other):
        run(t, 0, steps)
    assert one.resident(0) == other.resident(0) and one.hits == other.hits


def test_predicted_keeps_what_a_pending_prefetch_names(SlotTable):
    """A pool of 4 for two layers; at token 4 layer 0 misses, and layer 1's expert 1, unused since token 0, is
    the stalest: least-stale evicts it. The prefetch decided for layer 1 names it: predicted keeps it and evicts
    layer 0's stalest instead."""
    tokens = [[[0], [1]], [[2], [3]], [[2], [3]], [[0], [3]]]
    stale, predicted = SlotTable([4], 4, "least-stale", layers=2), SlotTable([4], 4, "predicted", layers=2)
    for t in (stale, predicted):
        global_tokens(t, tokens)
        t.access_row(0, [1], pending=(1, [1]))
    assert sorted(stale.resident(1)) == [3] and sorted(stale.resident(0)) == [0, 1, 2]
    assert sorted(predicted.resident(1)) == [1, 3] and sorted(predicted.resident(0)) == [0, 1]


def test_a_pool_spans_layers_and_numbers_their_experts(SlotTable):
    t = SlotTable([3], 4, "lru", layers=2)
    hit, slots, evicted = t.access_row(1, [2, 3])
    assert hit == [False, False] and slots == [0, 1] and t.slot(1, 2) == 0 and t.slot(0, 2) == -1
    t.access_row(0, [2])
    hit, _, evicted = t.access_row(0, [1])  # the pool is full: layer 1's least recently used leaves
    assert evicted == [2] and t.resident(1) == [3] and list(t.uses_of(1)) == [0, 0, 1, 1]
    assert t.hits == [0, 0] and t.misses == [2, 2]


def test_a_prefetch_in_a_pool_never_evicts_the_access_before_it(SlotTable):
    """The engine prefetches right after a layer's demand copies, before that layer computes: lfu would evict
    layer 0's experts, used once, but they are the access just before, so layer 1's own (used thrice) goes."""
    t = SlotTable([3], 4, "lfu", layers=2)
    for _ in range(3):
        t.access_row(1, [3])
    t.access_row(0, [0, 1])
    assert t.prefetch_row(1, [2]) == ([True], [0], [3])
    assert sorted(t.resident(0)) == [0, 1] and t.resident(1) == [2]


def test_an_expert_beyond_a_pools_layers_is_refused(SlotTable):
    t = SlotTable([2], 4, "lru", layers=2)
    with pytest.raises(ValueError, match="not below 8"):
        t.replay(0, [[8]])


@settings(max_examples=30, deadline=None)
@given(policy=st.sampled_from(POLICIES), slots=st.sampled_from([4, 6, 9]), seed=st.integers(0, 3),
       steps=st.lists(st.tuples(st.integers(0, 2), st.permutations(range(6)), st.permutations(range(6)), st.booleans()),
                      min_size=1, max_size=40))
def test_a_pool_replayed_in_one_call_equals_stepping_it(policy, slots, seed, steps):
    """A pool shared by three layers (room for an access and a prefetch), the steps in any layer order: one call of
    the loop (the simulator's, with each step's pending prefetch) and the engine's calls (an access told the
    prefetch it precedes, then that prefetch) count the same, plain and compiled."""
    E = 6
    layers = [layer for layer, _, _, _ in steps]
    accesses = [[layer * E + e for e in a[:2]] for layer, a, _, _ in steps]
    target = [(layer + 1) % 3 for layer in layers]  # each access's prefetch is for the next layer
    predictions = [[-1, -1]] + [[target[t] * E + e for e in p[:2]] if on else [-1, -1]
                                for t, (_, _, p, on) in enumerate(steps)]  # step t's: issued after access t - 1
    later = [[NEVER] * 2 for _ in steps]
    seen: dict[int, int] = {}
    for t in reversed(range(len(steps))):
        later[t] = [seen.get(e, NEVER) for e in accesses[t]]
        seen.update({e: t for e in accesses[t]})
    first = [seen.get(e, NEVER) for e in range(3 * E)]
    tables = []
    for compiled in [False, True] if eviction.jit_available() else [False]:
        whole = eviction.SlotTable([slots], E, policy, seed, compiled=compiled, layers=3)
        stepped = eviction.SlotTable([slots], E, policy, seed, compiled=compiled, layers=3)
        whole.replay(0, accesses + [[-1, -1]], predictions, later + [[NEVER] * 2], list(first),
                     pending=predictions[1:] + [[-1, -1]])
        next_use = list(first)
        if predictions[0][0] >= 0:
            stepped.prefetch_row(0, predictions[0], next_use)
        for t, exps in enumerate(accesses):
            pred = predictions[t + 1]
            local = [e % E if e >= 0 else e for e in pred]
            stepped.access_row(layers[t], [e % E for e in exps], next_use, pending=(target[t], local))
            for e, n in zip(exps, later[t], strict=True):
                next_use[e] = n
            stepped.prefetch_row(target[t], local, next_use)
        tables += [whole, stepped]
    for t in tables[1:]:
        assert [int(e) for e in t.expert[0][:slots]] == [int(e) for e in tables[0].expert[0][:slots]]
        assert (t.hits, t.misses, t.prefetch_copies, t.prefetch_hits) == (
            tables[0].hits, tables[0].misses, tables[0].prefetch_copies, tables[0].prefetch_hits)
