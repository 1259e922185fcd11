"""The cost-aware prefetch decision (speculate.py) as pure logic, and what it does in the timed replay."""

from __future__ import annotations

import numpy as np
import pytest
from test_timed import random_trace

from offload_moe.offload.speculate import calibrate, candidates, decide, miss_on_cpu
from offload_moe.planning.timed import simulate_timed

RANKED = [(3, 0.9), (5, 0.6), (1, 0.2)]


def speculate(*args, **kwargs) -> list[int]:
    """`decide`'s experts, without their expected savings."""
    return [e for e, _ in decide(*args, **kwargs)]


def test_a_likely_copy_that_lands_in_time_is_issued():
    assert speculate(RANKED, held=[], slots=4, copy_s=1.0, backlog_s=0.0, until_s=10.0, width=4) == [3, 5]


def test_a_copy_that_cannot_start_before_its_row_runs_is_not_issued():
    assert speculate(RANKED, held=[], slots=4, copy_s=1.0, backlog_s=2.0, until_s=2.0, width=4) == []
    # the second copy queues behind the first, which fills the time left
    assert speculate(RANKED, held=[], slots=4, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=4) == [3]


def test_a_saturated_link_issues_none():
    assert speculate(RANKED, held=[], slots=4, copy_s=1.0, backlog_s=50.0, until_s=3.0, width=4) == []


def test_unlikely_copies_are_not_issued():
    assert speculate([(2, 0.4), (6, 0.1)], held=[], slots=4, copy_s=1.0, backlog_s=0.0, until_s=9.0, width=4) == []


def test_resident_candidates_are_named_free_and_a_likely_victim_raises_the_bar():
    # expert 3 is resident: named (so the copies do not evict it), no copy; 5 is copied into an empty slot; 7,
    # resident and unranked, is named after them
    assert speculate(RANKED, held=[3, 7], slots=4, copy_s=1.0, backlog_s=0.0, until_s=9.0, width=4) == [3, 5, 7]
    # a full row of its own: the least likely resident goes (ties: the lowest ranked, 2), the other is named
    full = [(3, 0.9), (5, 0.6), (1, 0.5), (2, 0.5)]
    assert speculate(full, held=[1, 2], slots=2, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=2) == [3, 1]
    # a likely victim (0.9, used now; else at the next token at the pool's reuse) raises the bar: 3 at 0.6 pays
    # only against the unlikely one
    assert speculate([(3, 0.6), (1, 0.9)], held=[1], slots=1, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=2) == [1]
    assert speculate([(3, 0.6), (2, 0.1)], held=[2], slots=1, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=2) == [3]
    assert speculate([(3, 0.6), (2, 0.1)], held=[2], slots=1, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=2,
                     reuse=0.9) == [2]
    # a displaced resident is not copied back, though ranked
    assert speculate([(3, 0.95), (2, 0.9), (1, 0.1)], held=[1], slots=1, copy_s=1.0, backlog_s=0.0, until_s=9.0,
                     width=3) == [3]
    assert speculate(RANKED, held=[3], slots=4, copy_s=1.0, backlog_s=0.0, until_s=9.0, width=1) == [3]


def test_the_copies_evict_the_least_likely_resident_not_the_policys():
    from offload_moe.offload.eviction import SlotTable
    from offload_moe.offload.speculate import decide_row

    table = SlotTable([3], 8, "lru")
    for e in (0, 1, 2):  # LRU would evict 0
        table.access_row(0, [e])
    ranked = [(5, 0.9), (0, 0.8), (1, 0.6), (2, 0.05)]
    chosen = [e for e, _ in decide_row(table, 0, ranked, 2, 1.0, 0.0, 9.0, 3)]
    assert chosen == [5, 0, 1]
    inserted, _, evicted = table.prefetch_row(0, chosen)
    assert inserted == [True, False, False] and evicted[0] == 2 and sorted(table.resident(0)) == [0, 1, 5]


def test_in_a_shared_pool_the_other_rows_residents_count_at_the_pools_reuse():
    from offload_moe.offload.eviction import SlotTable

    ranked = [(3, 0.6), (1, 0.1)]
    # this row holds 1 of a full pool of 4; the 3 others' residents are used at the pool's reuse, 0.7: victim 0.55
    assert speculate(ranked, held=[1], slots=4, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=2, free=0,
                     reuse=0.7, shared=True) == [1]
    assert speculate(ranked, held=[1], slots=4, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=2, free=0,
                     reuse=0.1, shared=True) == [3, 1]
    assert speculate(ranked, held=[1], slots=4, copy_s=1.0, backlog_s=0.0, until_s=1.0, width=2, free=1,
                     reuse=0.5, shared=True) == [3, 1]  # an empty slot: nothing is displaced
    table = SlotTable([4], 3, "lru", layers=2)  # one pool of 4 for 2 layers of 3 experts
    table.access_row(0, [0, 1])
    assert table.pool_of(0) == table.pool_of(1) == (4, 2)
    table.access_row(1, [2, 0])
    assert table.pool_of(1) == (4, 0)
    table.vacate(1, 0)
    assert table.pool_of(0) == (4, 1)
    table.access_row(0, [0, 1])  # 2 hits in 6 accesses: a third of top-k 2 per layer, 2 layers, over 4 slots
    assert table.reuse(0, 2) == pytest.approx(1 / 3)


def test_probabilities_are_calibrated_per_row_and_rank():
    # one row, two ranks; rank 0 right 3 of 4 times, rank 1 right 1 of 2 (twice no prediction)
    predicted = np.array([[[0, 1]], [[2, -1]], [[4, 5]], [[6, -1]]])  # [T, L, P]
    experts = np.array([[[0, 9]], [[2, 9]], [[4, 5]], [[7, 9]]])  # [T, L, K]
    assert calibrate(predicted, experts).tolist() == [[0.75, 0.5]]
    # one token's by rank; two tokens' combined as independent chances
    assert candidates([[4, 2]], [0.8, 0.5], np.zeros(8)) == [(4, 0.8), (2, 0.5)]
    got = candidates([[4, 2], [2, 4]], [0.8, 0.5], np.zeros(8))
    assert [e for e, _ in got] == [2, 4] and got[0][1] == pytest.approx(0.9)


def test_a_miss_goes_to_the_cpu_when_it_is_done_there_sooner():
    assert not miss_on_cpu(link_wait_s=0.0, copy_s=1.0, cpu_wait_s=0.0, cpu_s=2.0)
    assert miss_on_cpu(link_wait_s=3.0, copy_s=1.0, cpu_wait_s=0.0, cpu_s=2.0)  # the link is saturated
    assert not miss_on_cpu(link_wait_s=3.0, copy_s=1.0, cpu_wait_s=5.0, cpu_s=2.0)  # so is the CPU


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_decision_is_never_slower_than_no_prefetch(seed):
    """Small random traces with a poor predictor (right 70% of the time), at every cache size and link speed:
    the calibrated decision does not lose to no prefetch (within 2%: with copies 4x the compute and 6 of 8
    slots, the pollution its one-access look-ahead misses costs 1.6% on seed 0)."""
    trace = random_trace(200, 4, 2, 8, seed=seed)
    table = calibrate(trace.predicted, trace.experts)
    for slots in (2, 3, 4, 6):
        for copy_s in (0.2e-3, 1e-3, 4e-3):
            none = simulate_timed(trace, slots, "lru", None, 1, copy_s, 1e-3)
            chosen = simulate_timed(trace, slots, "lru", trace.predicted, 1, copy_s, 1e-3, calibration=table)
            assert chosen["decided"] and chosen["tokens_per_s"] >= 0.98 * none["tokens_per_s"], (slots, copy_s)


def test_the_cpu_takes_misses_when_the_link_is_saturated():
    trace = random_trace(200, 4, 2, 8, seed=3)
    fetch = simulate_timed(trace, 2, "lru", None, 1, 4e-3, 1e-3)
    auto = simulate_timed(trace, 2, "lru", None, 1, 4e-3, 1e-3, miss_policy="auto", cpu_s=2.5e-3)
    cpu = simulate_timed(trace, 2, "lru", None, 1, 4e-3, 1e-3, miss_policy="cpu", cpu_s=2.5e-3)
    assert fetch["cpu_misses"] == 0 and cpu["demand_copies"] == 0 and 0 < auto["cpu_misses"]
    assert auto["tokens_per_s"] > fetch["tokens_per_s"] and auto["cpu_busy"] > 0
    # a slow CPU: auto keeps fetching
    slow = simulate_timed(trace, 2, "lru", None, 1, 4e-3, 1e-3, miss_policy="auto", cpu_s=1.0)
    assert slow["cpu_misses"] == 0 and slow["tokens_per_s"] == fetch["tokens_per_s"]


def test_a_predictor_file_carries_its_calibration(tmp_path):
    import torch

    from offload_moe.offload.predictors import load_predictor, save_predictor

    rows = [{"w1": torch.zeros(3, 4), "b1": torch.zeros(3), "w2": torch.zeros(5, 3), "b2": torch.zeros(5)}
            for _ in range(2)]
    table = np.array([[0.9, 0.4, 0.1], [0.8, 0.3, 0.0]])
    save_predictor(tmp_path / "p.safetensors", rows, 1, {}, calibration=table)
    assert np.allclose(load_predictor(tmp_path / "p.safetensors", 2, 4, 5).calibration, table)
    save_predictor(tmp_path / "q.safetensors", rows, 1, {})
    assert load_predictor(tmp_path / "q.safetensors", 2, 4, 5).calibration is None


def _calibrated_engine(tmp_path, chance: float | None):
    """The demo with its learned predictor's weights and, unless `chance` is None, a calibration of that chance
    at every row and rank."""
    from offload_moe.demo import resolve_model
    from offload_moe.engine import Engine
    from offload_moe.offload.predictors import FILE_NAME, load_predictor, save_predictor
    from offload_moe.options import EngineOptions

    shipped = load_predictor(resolve_model("demo") / FILE_NAME, 4, 128, 8)
    path = tmp_path / "p.safetensors"
    save_predictor(path, shipped.weights, 1, {}, None if chance is None else np.full((4, 8), chance))
    return Engine.load("demo", EngineOptions(progress=False, device="cpu", cache_experts=3, prefetch=1,
                                             policy="lru", predictor=str(path)))


def test_the_engine_issues_only_the_copies_speculate_chooses(tmp_path, monkeypatch):
    import offload_moe.offload.cache as cache_module

    fixed = _calibrated_engine(tmp_path, None)
    fixed.generate("def f(x):", 6)
    assert sum(fixed.cache.table.prefetch_copies) > 0  # no calibration: the fixed width is copied

    never = _calibrated_engine(tmp_path, 0.0)  # no prediction is ever used: no copy pays
    never.generate("def f(x):", 6)
    assert sum(never.cache.table.prefetch_copies) == 0

    engine = _calibrated_engine(tmp_path, 0.9)
    chosen, issued = [], []
    decide_row, prefetch = cache_module.decide_row, engine.cache.prefetch
    monkeypatch.setattr(cache_module, "decide_row", lambda *a: chosen.append(decide_row(*a)) or chosen[-1])
    monkeypatch.setattr(engine.cache, "prefetch", lambda row, experts: issued.append(experts) or prefetch(row, experts))
    engine.start_trace("decided")  # the predictions recorded are the full ranking the decision chose from
    engine.generate("def f(x):", 4)
    assert engine.stop_trace().predicted.shape[2] == 8
    copies = sum(engine.cache.table.prefetch_copies)
    assert issued and issued == [[e for e, _ in c] for c in chosen] and copies > 0  # the decision's; likely ones pay
    # a link whose queue outlasts any row's lead: no copy could start in time, none is issued
    monkeypatch.setattr(engine.cache.transfers, "backlog_s", lambda demand=False: 1e9)
    engine.generate("def f(x):", 4)
    assert issued == [[e for e, _ in c] for c in chosen] and sum(engine.cache.table.prefetch_copies) == 0


def test_a_trace_keeps_its_predictors_calibration_and_the_timed_replay_decides_by_it():
    """A trace recorded with a calibrated predictor carries the calibration (through a slice too), and
    `simulate --timed`'s runs with prefetch replay the engine's decision."""
    from offload_moe.engine import Engine
    from offload_moe.options import EngineOptions
    from offload_moe.planning.timed import run_timed
    from offload_moe.planning.trace import slice_trace

    engine = Engine.load("demo", EngineOptions(progress=False, cache_experts=4, prefetch=1))
    assert engine.model.prefetcher.predictor.calibration is not None  # the shipped demo predictor has one
    engine.start_trace("demo")
    engine.generate([1, 415, 296, 906], 6)
    trace = engine.stop_trace()
    cal = trace.tensors["calibration"]
    assert cal.shape == tuple(engine.model.prefetcher.predictor.calibration.shape)
    assert np.array_equal(slice_trace(trace, 2, 6).tensors["calibration"], cal)
    out = run_timed(trace, [4], "lru", {"copy_s": 1e-4, "layer_s": 1e-4})
    assert [r["decided"] for r in out["results"]] == [True, False]  # with prefetch, then without


def test_a_guess_from_further_ahead_only_fills_the_links_gap_before_a_nearer_guess():
    # the next layer's nearer guess comes in 1 s: the first copy starts before it, the second would not
    assert speculate(RANKED, held=[], slots=4, copy_s=1.0, backlog_s=0.0, until_s=9.0, width=4, better_s=1.0) == [3]
    assert speculate(RANKED, held=[], slots=4, copy_s=1.0, backlog_s=0.0, until_s=9.0, width=4, better_s=1.5) == [3, 5]
    assert speculate(RANKED, held=[], slots=4, copy_s=1.0, backlog_s=2.0, until_s=9.0, width=4, better_s=1.5) == []
    # nothing could start before it: nothing is decided, a resident candidate not even named
    assert speculate(RANKED, held=[3], slots=4, copy_s=1.0, backlog_s=2.0, until_s=9.0, width=4, better_s=1.5) == []


def test_the_timed_replay_decides_deeper_leads_into_the_links_gaps():
    """Perfect predictions at leads 1 and 3 on a link whose copy lasts three layers: lead 1 alone cannot hide a
    copy; with lead 3 decided beside it the copies start sooner and the tokens run faster. Deeper leads need a
    calibration."""
    from offload_moe.errors import UserError
    from offload_moe.planning.timed import Deeper

    near, far = random_trace(200, 4, 2, 8, seed=4, perfect=True), random_trace(200, 4, 2, 8, seed=4, perfect=True)
    table = calibrate(near.predicted, near.experts)  # [L, P]: 1.0, perfect
    none = simulate_timed(near, 4, "lru", None, 1, 3e-3, 1e-3)
    one = simulate_timed(near, 4, "lru", near.predicted, 1, 3e-3, 1e-3, calibration=table)
    deeper = [Deeper(3, far.predicted, None, table)]
    both = simulate_timed(near, 4, "lru", near.predicted, 1, 3e-3, 1e-3, calibration=table, deeper=deeper)
    assert none["tokens_per_s"] < one["tokens_per_s"] < both["tokens_per_s"]
    assert both["ready"] > one["ready"]
    with pytest.raises(UserError, match="need a calibration"):
        simulate_timed(near, 4, "lru", near.predicted, 1, 3e-3, 1e-3, deeper=deeper)
    # a pool shared by every row takes the nearest lead only, as the engine
    shared = [simulate_timed(near, 4, "lru", near.predicted, 1, 3e-3, 1e-3, calibration=table, pool="global",
                             deeper=d) for d in (deeper, ())]
    assert shared[0] == shared[1]


def test_a_predictor_file_holds_deeper_leads_and_prefetch_takes_those_from_its_lead(tmp_path):
    import torch

    from offload_moe.errors import UserError
    from offload_moe.offload.predictors import LearnedPredictor, load_predictor, save_predictor

    def rows(v):
        return [{"w1": torch.full((3, 4), v), "b1": torch.zeros(3), "w2": torch.zeros(5, 3), "b2": torch.zeros(5)}
                for _ in range(4)]

    cal = [np.full((4, 5), x) for x in (0.9, 0.7, 0.5)]
    deeper = [LearnedPredictor(rows(2.0), 2, {}, cal[1]), LearnedPredictor(rows(3.0), 3, {}, cal[2])]
    save_predictor(tmp_path / "p", rows(1.0), 1, {}, cal[0], deeper)
    p = load_predictor(tmp_path / "p", 4, 4, 5)
    assert [p.lead, *(d.lead for d in p.deeper)] == [1, 2, 3] and p.meta["leads"] == "1,2,3"
    assert [float(d.weights[0]["w1"][0, 0]) for d in p.deeper] == [2.0, 3.0]
    assert np.allclose(p.deeper[1].calibration, 0.5)
    assert [d.lead for d in p.from_lead(1).deeper] == [2, 3] and [d.lead for d in p.from_lead(2).deeper] == [3]
    assert p.from_lead(3).lead == 3 and p.from_lead(3).deeper == []
    # a file of one uncalibrated lead serves that lead only, a fixed width
    save_predictor(tmp_path / "q", rows(1.0), 2, {})
    assert load_predictor(tmp_path / "q", 4, 4, 5).from_lead(2).lead == 2
    with pytest.raises(UserError, match="lead 3 has no calibration"):
        save_predictor(tmp_path / "r", rows(1.0), 1, {}, cal[0], [LearnedPredictor(rows(3.0), 3, {})])
        load_predictor(tmp_path / "r", 4, 4, 5)


def test_the_engine_decides_every_lead_up_to_its_depth(tmp_path, monkeypatch):
    """The demo with its predictor's weights at leads 1 and 2, calibrated, a pool per layer: --prefetch 1 plans both
    leads' copies (the deeper one's as a guess a nearer one follows, all from one sync a row), --prefetch 2 lead
    2's only, a shared pool lead 1's only, --prefetch 3 is refused; the tokens are those of no prefetch."""
    from offload_moe.demo import resolve_model
    from offload_moe.engine import Engine
    from offload_moe.errors import UserError
    from offload_moe.offload.predictors import FILE_NAME, LearnedPredictor, load_predictor, save_predictor
    from offload_moe.options import EngineOptions

    shipped = load_predictor(resolve_model("demo") / FILE_NAME, 4, 128, 8)
    path = tmp_path / "p.safetensors"
    table = np.full((4, 8), 0.9)
    again = [{k: v.clone() for k, v in w.items()} for w in shipped.weights]  # as lead 2's (a file keeps no aliases)
    save_predictor(path, shipped.weights, 1, {}, table, [LearnedPredictor(again, 2, {}, table)])

    def load(depth, pool="layer"):
        return Engine.load("demo", EngineOptions(progress=False, device="cpu", cache_experts=3, prefetch=depth,
                                                 policy="lru", predictor=str(path), slot_pool=pool))

    plans = []
    one = load(1)
    plan = one.cache.plan_prefetch
    monkeypatch.setattr(one.cache, "plan_prefetch", lambda *a, **k: plans.append((a[3], k["deeper"])) or plan(*a, **k))
    tokens = one.generate("def f(x):", 6).tokens
    assert {(1, False), (2, True)} <= set(plans) and sum(one.cache.table.prefetch_copies) > 0
    assert [s.lead for s in one.model.prefetcher.stages] == [1, 2] and one.model.prefetcher.lead == 2
    one.start_trace("t")  # a trace holds the nearest lead's predictions, and says so
    one.generate("def f(x):", 3)
    assert one.stop_trace().metadata["prefetch_lead"] == "1"
    assert [s.lead for s in load(2).model.prefetcher.stages] == [2]
    assert [s.lead for s in load(1, "global").model.prefetcher.stages] == [1]  # deeper leads: a row's own pool only
    none = Engine.load("demo", EngineOptions(progress=False, device="cpu", cache_experts=3, prefetch=0))
    assert none.generate("def f(x):", 6).tokens == tokens
    with pytest.raises(UserError, match="predicts 1, 2 layer"):
        load(3)


def test_the_gate_counts_the_host_time_of_deciding_and_issuing_the_copies(tmp_path, monkeypatch):
    """A prediction is made while its copies' expected saving covers its host time: the prefetcher's own and the
    cache's, deciding and issuing the copies (`ExpertCache.spent`, folded into `Prefetcher.issue`)."""
    engine = _calibrated_engine(tmp_path, 0.9)
    pre, cache = engine.model.prefetcher, engine.cache
    monkeypatch.setattr(cache, "layer_s", 1.0)  # every copy could start in time: only the gate decides
    monkeypatch.setattr(cache, "_pace", lambda: None)
    engine.generate("def f(x):", 8)
    assert pre.issue[1] > 0.0 and not cache.spent  # measured, and read with the gains

    def gate(saved: float, issuing: float) -> bool:
        pre.gain[1], pre.cost[1], pre.issue[1], pre.calls[1] = 0.0, 1e-4, 0.0, 5  # not a probing call
        cache.gains, cache.spent = {1: saved}, {1: issuing}
        return pre._pays(pre.predictor)

    assert gate(2e-3, 0.0)  # the average saving 2e-4 s covers the prediction's own 1e-4 s
    assert not gate(2e-3, 2e-3)  # not with the 2e-4 s its copies took to decide and issue


def test_a_prediction_whose_copies_never_pay_is_made_only_to_probe(tmp_path, monkeypatch):
    """Calibrated at chance 0, no copy pays, so a prediction's expected saving (0) stays below its host time: after
    the first, the prefetcher predicts once in PROBE calls; recording a trace, it predicts every time."""
    from offload_moe.offload.prefetch import PROBE

    engine = _calibrated_engine(tmp_path, 0.0)
    stage = engine.model.prefetcher.predictor
    made, rank = [], stage.rank
    monkeypatch.setattr(stage, "rank", lambda *a: made.append(1) or rank(*a))
    monkeypatch.setattr(engine.cache, "layer_s", 1.0)  # every copy could start in time: only the gate holds it back
    monkeypatch.setattr(engine.cache, "_pace", lambda: None)
    engine.generate("def f(x):", 16)
    calls = engine.model.prefetcher.calls[1]
    assert calls > 2 * PROBE and len(made) <= calls // PROBE + 2 and sum(engine.cache.table.prefetch_copies) == 0
    made.clear()
    engine.start_trace("all")
    engine.generate("def f(x):", 4)
    engine.stop_trace()
    assert len(made) >= 4 * 4 - 1  # every row's entry but the first token's cross-token one
