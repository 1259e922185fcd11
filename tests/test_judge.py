"""The tuner's judge (planning/judge.py): prefetch options, widths and miss policies scored in the timed replay."""

from __future__ import annotations

import json

import numpy as np

from offload_moe.planning.candidate import Candidate
from offload_moe.planning.costs import MIXTRAL_8X7B
from offload_moe.planning.judge import judge, prefetch_ways
from offload_moe.planning.trace import Trace
from offload_moe.planning.tune import tune

MIXTRAL = {"config": json.dumps(MIXTRAL_8X7B.to_dict()), "prefetch_lead": "1"}
# int4 experts (94.5 MiB): a 4 GB/s link takes 25 ms a copy against 0.5 ms of a layer's compute at 800 GB/s;
# at 100 GB/s a layer computes for 4 ms, longer than a 25 GB/s link's copy (4 ms) is not: both are near
SLOW_LINK = {"h2d_bytes_per_s": 4e9, "device_bytes_per_s": 800e9, "cpu_bytes_per_s": 40e9}
SLOW_DEVICE = {"h2d_bytes_per_s": 25e9, "device_bytes_per_s": 60e9, "cpu_bytes_per_s": 1e9}


def routed(tokens: int = 64, right: bool = True, seed: int = 0) -> Trace:
    """Mixtral's shape, random routing; predictions (lead 1, top-k wide) the experts each row then uses
    (`right`), else experts 6 and 7, which the routing (then over experts 0-5) never uses."""
    rng = np.random.default_rng(seed)
    E = 8 if right else 6
    experts = np.stack([rng.permutation(E)[:2] for _ in range(tokens * 32)]).reshape(tokens, 32, 2)  # [T, L, K]
    experts = experts.astype(np.int32)
    predicted = experts.copy() if right else np.broadcast_to(np.array([6, 7], np.int32), experts.shape).copy()
    return Trace(experts, np.full(experts.shape, 0.5, np.float32), predicted, 8, 2, 32, "routed", dict(MIXTRAL))


def layout(slots: int) -> Candidate:
    return Candidate("int4", "none", 64, [slots] * 32, "lru", 0, "fetch", 0.0, 0.0)


def test_ways_are_none_then_fixed_widths_then_the_decision():
    assert prefetch_ways(0, 0, 2) == [(0, 0, False)]
    assert prefetch_ways(1, 2, 2) == [(1, 1, False), (1, 2, False), (1, 0, True)]
    assert prefetch_ways(2, 8, 2) == [(2, 1, False), (2, 2, False), (2, 8, False), (2, 0, True)]


def test_tune_picks_no_prefetch_when_nothing_pays():
    """Copies long against compute and predictions always wrong: every prefetch loses time, so none wins."""
    best, default, out = tune(routed(right=False), MIXTRAL_8X7B, 20 * 2**30, SLOW_LINK, 2**30, policies=("lru",),
                              pools=("layer",), log=lambda _: None)
    timed = [c for c in out if c.scored == "timed replay" and c.slots == best.slots and c.miss_policy == "fetch"]
    assert {(c.prefetch, c.width, c.decided) for c in timed} == {(0, 0, False), (1, 1, False), (1, 2, False),
                                                                  (1, 0, True)}
    assert best.prefetch == 0 and best.scored == "timed replay" and default.prefetch == 0
    none = next(c for c in timed if c.prefetch == 0)
    assert all(c.seconds_per_token > none.seconds_per_token for c in timed if c.prefetch and not c.decided)


def test_tune_picks_prefetch_when_it_pays():
    """Perfect predictions and copies shorter than a layer's compute: prefetch hides the copies."""
    best, default, _ = tune(routed(), MIXTRAL_8X7B, 20 * 2**30, SLOW_DEVICE, 2**30, policies=("lru",),
                            pools=("layer",), log=lambda _: None)
    assert best.prefetch == 1 and best.scored == default.scored == "timed replay"
    assert default.prefetch == 0 and default.miss_policy == "fetch"
    assert best.tokens_per_s > 1.2 * default.tokens_per_s
    assert "prefetch 1" in best.describe() and "[timed, link busy" in best.describe()


def test_judge_scores_every_miss_policy():
    """On a slow link with a fast CPU, computing misses on the CPU beats fetching them; each way to prefetch is
    scored under fetch, cpu and auto."""
    hw = dict(SLOW_LINK, cpu_bytes_per_s=400e9)
    out, left = judge(layout(4), [(0, "", routed(32)), (1, "", routed(32))], MIXTRAL_8X7B, hw)
    assert left == 0
    assert len(out) == 4 * 3 and {c.miss_policy for c in out} == {"fetch", "cpu", "auto"}
    none = {c.miss_policy: c for c in out if c.prefetch == 0}
    assert none["cpu"].seconds_per_token < none["fetch"].seconds_per_token
    assert none["auto"].seconds_per_token <= none["fetch"].seconds_per_token
    assert min(out, key=lambda c: c.seconds_per_token).miss_policy != "fetch"


def test_the_pick_is_never_below_no_prefetch():
    """Half-right predictions on a link-bound profile: at every slot count the judge's pick is at least as fast
    as no prefetch (none itself where nothing pays)."""
    trace = routed(48)
    trace.predicted[::2] = routed(48, right=False, seed=1).predicted[::2]  # every other token's guesses wrong
    for slots in (2, 4, 6):
        out, _ = judge(layout(slots), [(0, "", trace), (1, "", trace)], MIXTRAL_8X7B, SLOW_LINK)
        pick = min(out, key=lambda c: c.seconds_per_token)
        none = next(c for c in out if c.prefetch == 0 and c.miss_policy == pick.miss_policy)
        assert pick.tokens_per_s >= none.tokens_per_s


def test_a_spent_budget_leaves_judge_replays_out_and_says_so():
    """--budget-s counts the timed replays too: a budget of 0 runs the default's curve and the default layout's
    judge, leaves out the rest and logs it; the default's no prefetch with fetch is always there."""
    logged: list[str] = []
    judged = judge(layout(4), [(0, "", routed(16)), (1, "", routed(16))], MIXTRAL_8X7B, SLOW_LINK, deadline=0.0)
    assert len(judged[0]) == 1 and judged[1] == 4 * 3 - 1  # only the first replay runs past the deadline
    best, default, out = tune(routed(16), MIXTRAL_8X7B, 20 * 2**30, SLOW_LINK, 2**30, policies=("lru", "lfu"),
                              pools=("layer",), log=logged.append, budget_s=0.0)
    assert any("--budget-s spent after 1 of" in line for line in logged)
    assert default.prefetch == 0 and default.miss_policy == "fetch" and default.scored == "timed replay"
