"""The timed replay: the same hits as `simulate` where no copy is dropped, hand-worked clocks, and what copy speed
and lead do."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_simulate import make_trace

from offload_moe.cli.entry import main
from offload_moe.offload.eviction import ONLINE_POLICIES
from offload_moe.planning.replay import simulate
from offload_moe.planning.timed import simulate_timed
from offload_moe.planning.trace import save_trace


def random_trace(T: int, L: int, K: int, E: int, seed: int = 0, lead: int = 1, perfect: bool = False):
    """Random routing; predictions `lead` rows ahead: perfect, or right 70% of the time. None at layer 0
    when lead is 1, as a recorded one-layer-ahead trace."""
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((T, L, E)), axis=-1)[..., :K]  # [T, L, K]
    predicted = experts if perfect else np.where(rng.random((T, L, K)) < 0.7, experts, rng.integers(0, E, (T, L, K)))
    if lead == 1 and not perfect:
        predicted[:, 0] = -1
    return make_trace(experts, E, predicted)


def counts(r: dict, layer: int, tokens: int, top_k: int) -> list[int]:
    """ready, late, missed of one row, as counts."""
    return [round(r["per_layer"][layer][k] * tokens * top_k) for k in ("ready", "late", "missed")]


@pytest.mark.parametrize("policy", ONLINE_POLICIES)
@pytest.mark.parametrize("pool", ["layer", "global"])
def test_the_same_hits_as_simulate(policy, pool):
    """Where every copy lands before its row's routing is known, the table's counts are `simulate`'s; where
    speculative copies are dropped (their slots emptied, as the engine does), ready + late are the table's hits."""
    trace = random_trace(150, 3, 2, 6)
    for slots in (2, 3, [2, 4, 3]):
        for prefetch, predicted in ((1, trace.predicted), (0, None)):
            want = simulate(trace, slots, policy, prefetch, pool=pool)
            fast = simulate_timed(trace, slots, policy, predicted, 1, copy_s=1e-5, layer_s=1e-3, pool=pool)
            assert fast["per_layer_hits"] == want["per_layer_hits"] and fast["dropped"] == 0
            assert (fast["prefetch_copies"], fast["prefetch_hits"]) == (want["prefetch_copies"], want["prefetch_hits"])
            got = simulate_timed(trace, slots, policy, predicted, 1, copy_s=2e-3, layer_s=1e-3, pool=pool)
            if predicted is None:
                assert got["per_layer_hits"] == want["per_layer_hits"]
            for layer in range(3):  # ready + late = hits; + missed = all
                ready, late, missed = counts(got, layer, 150, 2)
                assert ready + late == got["per_layer_hits"][layer] and ready + late + missed == 300
            if predicted is None:  # a demand copy lands before its row computes: no hit is ever late
                assert got["late"] == 0 and got["prefetch_copies_per_token"] == 0


def test_a_hand_worked_clock():
    # 2 tokens x 2 rows, top-1, 1 slot; perfect predictions one row ahead; copy 3 s, compute 1 s.
    # t0 r0 at 0: expert 0 misses, copied 0-3; row ends 4. Its prefetch (row 1: expert 1) 3-6.
    # t0 r1 at 4: expert 1 late (2 s); ends 7. Prefetch of t1 r0 (expert 2), issued at 4: 6-9.
    # t1 r0 at 7: late (2 s); ends 10. Prefetch t1 r1 (expert 3) issued at 7: 9-12.
    # t1 r1 at 10: late (2 s); ends 13.
    trace = make_trace([[0, 1], [2, 3]], 4, [[-1, 1], [2, 3]])
    r = simulate_timed(trace, 1, "lru", trace.predicted, 1, copy_s=3.0, layer_s=1.0)
    assert (r["ready"], r["late"], r["missed"]) == (0.0, 0.75, 0.25)
    assert (r["late_wait_s"], r["miss_wait_s"], r["stall_s"], r["seconds_per_token"]) == (3.0, 1.5, 4.5, 6.5)
    assert r["link_busy"] == pytest.approx(12 / 13)
    assert (r["demand_copies"], r["prefetch_copies_per_token"]) == (0.5, 1.5)
    # the last token's prediction for a next token (expert 0 at row 0), issued at 10: copied 12-15, never used
    after = simulate_timed(trace, 1, "lru", trace.predicted, 1, 3.0, 1.0, after=np.array([[0], [-1]]))
    assert (after["hits"], after["seconds_per_token"], after["prefetch_copies_per_token"]) == (3, 6.5, 2.0)
    assert after["link_busy"] == 1.0
    # lead 2 = L: at row l, the next token's row l. t0 r0: 0 misses (0-3), ends 4; the prefetch of expert 2
    # evicts expert 0, so its copy waits for the row to end (4). t0 r1 at 4: 1 misses; its demand copy passes
    # the speculative one: 4-7; ends 8. Expert 2's copy runs 7-8; expert 3's waits for row 1 to end (8).
    # t1 r0 at 8: expert 2's copy is promoted, its 2 s left: 8-10, late; ends 11. Expert 3's runs 10-11.
    # t1 r1 at 11: promoted, 11-13, late; ends 14.
    r = simulate_timed(trace, 1, "lru", trace.predicted, 2, copy_s=3.0, layer_s=1.0)
    assert [counts(r, layer, 2, 1) for layer in range(2)] == [[0, 1, 1], [0, 1, 1]]
    assert (r["late_wait_s"], r["miss_wait_s"], r["seconds_per_token"]) == (2.0, 3.0, 7.0)


def test_copy_speed_decides_ready_or_late():
    trace = random_trace(200, 4, 2, 8, seed=1)
    slow = simulate_timed(trace, 4, "lru", trace.predicted, 1, copy_s=2e-3, layer_s=1e-3)
    fast = simulate_timed(trace, 4, "lru", trace.predicted, 1, copy_s=1e-6, layer_s=1e-3)
    # time changes residency only where a slow copy is dropped (its slot emptied): 4 hits of 1,600 here
    assert fast["dropped"] == 0 < slow["dropped"] and 0 < fast["hits"] - slow["hits"] < 0.01 * fast["hits"]
    assert slow["late"] > 0.05 and slow["late_wait_s"] > 0 and slow["link_busy"] > 0.5
    assert fast["late"] == 0 and fast["late_wait_s"] == 0
    assert fast["seconds_per_token"] < slow["seconds_per_token"]


def test_a_longer_lead_hides_more_of_the_copy():
    trace = random_trace(300, 4, 1, 4, seed=2, perfect=True)
    one, two = (simulate_timed(trace, 2, "lru", trace.predicted, lead, copy_s=1.5e-3, layer_s=1e-3) for lead in (1, 2))
    assert two["ready"] > one["ready"] + 0.2
    assert two["seconds_per_token"] < one["seconds_per_token"]


def test_bad_arguments():
    trace = random_trace(10, 2, 1, 4)
    for kwargs, message in (({"lead": 3}, "give 1 to 2 rows"), ({"copy_s": -1.0}, "copy time"),
                            ({"predicted": trace.predicted[:, :1]}, "expected"), ({"policy": "belady"}, "online")):
        args = {"policy": "lru", "predicted": trace.predicted, "lead": 1, "copy_s": 1.0, **kwargs}
        with pytest.raises(Exception, match=message):
            simulate_timed(trace, 2, args["policy"], args["predicted"], args["lead"], args["copy_s"], 1.0)


@pytest.fixture
def trace_file(tmp_path) -> str:
    trace = random_trace(120, 3, 2, 6, perfect=True)
    trace.metadata["prefetch_lead"] = "2"
    path = tmp_path / "t.trace"
    save_trace(path, trace)
    return str(path)


def test_the_command(trace_file, capsys):
    assert main(["simulate", "--trace", trace_file, "--slots", "2,4", "--policy", "fifo", "--timed", "--json",
                 "--link-gbs", "50", "--layer-ms", "2"]) == 0
    timed = json.loads(capsys.readouterr().out)["timed"]
    assert timed["policy"] == "fifo" and timed["lead"] == 2 and timed["h2d_bytes_per_s"] == 50e9
    assert timed["copy_s"] == pytest.approx(timed["expert_bytes"] / 50e9)
    assert [(r["slots"], r["lead"]) for r in timed["results"]] == [(2, 2), (2, 0), (4, 2), (4, 0)]
    for r in timed["results"]:
        assert r["layer_s"] == [2e-3] * 3 and len(r["per_layer"]) == 3
        assert all(sum(row[k] for k in ("ready", "late", "missed")) == pytest.approx(1) for row in r["per_layer"])
    assert main(["simulate", "--trace", trace_file, "--slots", "2", "--timed", "--expert-quant", "int4"]) == 0
    out = capsys.readouterr().out
    assert "timed replay, lru" in out and "experts int4" in out and "per layer, ready/late/missed % (lead 2)" in out


@pytest.mark.parametrize("flags, message", [
    (["--link-gbs", "-1"], "--link-gbs -1.0: give the link speed in GB/s, above 0"),
    (["--layer-ms", "-2"], "--layer-ms -2.0"),
    (["--expert-quant", "int3"], "choose from none, int8, int4"),
    (["--batch", "2"], "without --batch"),
    (["--policy", "belady"], "online policy"),
])
def test_the_command_rejects_bad_flags(trace_file, capsys, flags, message):
    assert main(["simulate", "--trace", trace_file, "--timed", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
