"""The tuner's judge: every prefetch option, width and miss policy of one cache layout, scored in the timed
replay (`timed.simulate_timed`) with the copy, compute and CPU times of the cost model's hardware
(`timed.replay_times`).

The options, for each source of predictions (the trace's recorded ones, each predictor file's; each at its
own lead, since predictions made for one lead replayed at another would read routing the predictor could not
have seen): none; a fixed width of 1, top-k and every prediction the source makes per row (the engine's
--prefetch-width), each cut to the row's slots; and the cost-aware decision (`speculate`, the engine's rule
when its predictor carries a calibration), calibrated on the scored trace's own routing (`speculate.calibrate`),
with a calibrated file's deeper leads decided beside its nearest, as the engine decides them.
Each under every miss policy. No prefetch is listed first, so of equal times it wins: where nothing pays, the
answer is none.
Shape legend: T tokens, L rows, K top-k, P predicted per row.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ..config import ModelConfig
from ..offload.predictors import replayed
from ..offload.speculate import calibrate
from ..options import MISS_POLICIES
from .candidate import SCORED, Candidate
from .timed import deeper_of, replay_times, simulate_timed
from .trace import Trace


def prefetch_ways(lead: int, width: int, top_k: int) -> list[tuple[int, int, bool]]:
    """(lead, width, decided) of one source of predictions, `width` per row: fixed widths 1, top-k and
    `width` (those up to `width`), then the decision; lead 0: none."""
    if lead == 0:
        return [(0, 0, False)]
    return [(lead, w, False) for w in sorted({1, min(top_k, width), width})] + [(lead, 0, True)]


def run_candidate(source: Trace, config: ModelConfig, hw: dict, c: Candidate) -> dict:
    """`simulate_timed` of a `tune.Candidate`'s settings on `source` (a trace holding the predictions it
    replays: the recorded ones, or its predictor file's)."""
    times = replay_times(config, hw, c.precision, c.attention, c.group_size)
    predicted = after = calibration = None
    deeper = []
    if c.prefetch:
        after = source.tensors.get("predicted_after")  # [L, P]
        predicted = source.predicted  # [T, L, P]
        if c.decided:  # with the predictor file's deeper leads, as the engine decides them
            calibration, deeper = calibrate(predicted, source.experts), deeper_of(source, recalibrate=True)  # [L, P]
        else:
            predicted, after = predicted[:, :, : c.width], None if after is None else after[:, : c.width]
    return simulate_timed(source, c.slots, c.policy, predicted, max(c.prefetch, 1), times["copy_s"],
                          times["layer_s"], after=after, pool=c.pool, calibration=calibration,
                          miss_policy=c.miss_policy, cpu_s=times["cpu_s"], deeper=deeper)


def timed_candidate(c: Candidate, r: dict, trace: Trace) -> Candidate:
    """`c` with the hit rate (the table's hits, as `simulate`'s) and time of its timed replay `r` over `trace`."""
    return replace(c, hit_rate=r["hits"] / max(trace.experts.size, 1), seconds_per_step=r["seconds_per_token"],
                   scored=SCORED[1], link_busy=r["link_busy"])


def judge(layout: Candidate, sources: list[tuple[int, str, Trace]], config: ModelConfig, hw: dict,
          deadline: float | None = None) -> tuple[list[Candidate], int]:
    """Every prefetch option (from `sources`: `tune.prediction_options`' (lead, predictor, trace)), width and
    miss policy of `layout` (a `tune.Candidate` whose slots, policy, pool and precisions count), scored in the
    timed replay, no prefetch first, until `deadline` (`time.perf_counter`'s; None: all; the first replay always
    runs). Returns (candidates, how many replays the deadline left out)."""
    jobs = []
    for lead, predictor, source in sources:
        width = int(source.predicted.shape[2]) if source.predicted.ndim == 3 else 0
        if lead and not (source.predicted >= 0).any():
            continue
        jobs += [(source, replace(layout, prefetch=way_lead, predictor=predictor if way_lead else "", width=w,
                                  decided=decided, miss_policy=miss))
                 for way_lead, w, decided in prefetch_ways(lead, width, config.top_k) for miss in MISS_POLICIES]
    out = []
    for source, c in jobs:
        if out and deadline is not None and time.perf_counter() > deadline:
            break
        out.append(timed_candidate(c, run_candidate(source, config, hw, c), source))
    return out, len(jobs) - len(out)


def source_of(trace: Trace, c: Candidate) -> Trace:
    """The trace whose predictions `c` replays: its predictor file's made from `trace`'s hidden states, as wide
    as the engine ranks them (`replayed`), else `trace`'s recorded ones."""
    return replayed(trace, c.predictor) if c.predictor else trace
