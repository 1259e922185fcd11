"""The tuner's winner scored on routing it was not fitted to.

`tune` picks slots per layer, eviction policy and the rest on a trace; scored on that same trace the
pick flatters itself (slots spread over layers by the hit curves of these tokens fit these tokens).
So `tune` fits on the head of the trace and scores the winner, and the default it is
compared with, on the held-out tail: the split lies at a boundary between prompts (`prompt_lengths`),
else between forward passes (`forward_tokens`), else between tokens, the one nearest to holding out
`fraction` of the tokens. Where the head or the tail would be shorter than MIN_TOKENS it fits and
scores on everything and says so. `--validate TRACE` fits on the whole trace and scores on another
of the same shape. Scoring replays the candidate's own settings the way the tuner scored them (one sequence: the timed
replay, `judge.run_candidate`; a batch: the simulator and cost model, `tune.replay`, `costs.step_cost`) on
the held-out tokens, starting from empty caches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..config import ModelConfig
from ..errors import UserError
from .candidate import SCORED
from .costs import step_cost
from .judge import run_candidate, source_of, timed_candidate
from .trace import Trace, group_ends, slice_trace
from .tune import Candidate, replay

DEFAULT_HOLDOUT = 0.25
MIN_TOKENS = 64  # a held-out part (or a fitted head) shorter than this says little


@dataclass
class Split:
    fit: Trace
    held_out: Trace | None  # None: no held-out score
    note: str  # what was fitted and what scored, for the output


def split_point(trace: Trace, fraction: float) -> tuple[int, str]:
    """(the token index where the held-out tail starts, what kind of boundary it is): of the ends of
    prompts, else of forwards, else of tokens, the one inside the trace nearest to holding out
    `fraction` of the tokens (ties: the longer tail); T where none lies inside."""
    T = trace.num_tokens
    groupings = [(group_ends(trace, key), kind) for key, kind in (("prompt_lengths", "prompts"),
                                                                  ("forward_tokens", "forward passes"))]
    ends, kind = next(((e, k) for e, k in groupings if e is not None), (np.arange(1, T + 1), "tokens"))
    inside = ends[ends < T]
    if not inside.size:
        return T, kind
    return int(inside[np.argmin(np.abs(inside - T * (1 - fraction)))]), kind


def validation_split(trace: Trace, name: str, fraction: float | None, other: Trace | None = None,
                     other_name: str = "") -> Split:
    """What `tune` fits on and what it scores on: `other` (the whole trace fitted) when given, else the
    tail of `fraction` (default DEFAULT_HOLDOUT; 0: none) of `trace`."""
    T = trace.num_tokens
    if other is not None:
        if fraction is not None:
            raise UserError("give --validate or --holdout, not both: --validate fits on the whole --trace")
        if (other.num_layers, other.num_experts, other.top_k) != (trace.num_layers, trace.num_experts, trace.top_k):
            raise UserError(f"--validate {other_name} has {other.num_layers} layers x {other.num_experts} experts, "
                            f"top-{other.top_k}; --trace {name} has {trace.num_layers} x {trace.num_experts}, "
                            f"top-{trace.top_k}: they must match")
        if other.num_tokens == 0:
            raise UserError(f"--validate {other_name} holds no tokens")
        return Split(trace, other, f"fitted on all {T} tokens of {name}, scored on {other_name} "
                                   f"({other.num_tokens} tokens)")
    fraction = DEFAULT_HOLDOUT if fraction is None else fraction
    if not 0 <= fraction < 1:
        raise UserError(f"--holdout must be at least 0 and below 1, not {fraction}")
    if fraction == 0:
        return Split(trace, None, f"--holdout 0: fitted and scored on all {T} tokens of {name}, no held-out score")
    cut, kind = split_point(trace, fraction)
    if min(cut, T - cut) < MIN_TOKENS:
        return Split(trace, None, f"no held-out score: split between {kind}, the fitted head would be {cut} tokens "
                                  f"and the held-out tail {T - cut} (each needs {MIN_TOKENS}); fitted and scored "
                                  f"on all {T} tokens of {name}")
    return Split(slice_trace(trace, 0, cut), slice_trace(trace, cut, T),
                 f"fitted on the first {cut} tokens of {name}, scored on the last {T - cut} (--holdout {fraction:g}, "
                 f"split between {kind})")


def rescore(trace: Trace, config: ModelConfig, hw: dict, c: Candidate) -> Candidate:
    """`c`'s settings, hit rate and time predicted on `trace`, the way `c` was scored (the timed replay, or the
    cost model)."""
    if c.scored == SCORED[1]:
        source = source_of(trace, c)
        return timed_candidate(c, run_candidate(source, config, hw, c), source)
    r = replay(trace, c.slots, c.policy, c.prefetch, c.batch, c.predictor, c.pool)
    return replace(c, hit_rate=r["hit_rate"], seconds_per_step=step_cost(
        config, hw, r, trace.num_tokens, c.precision, c.attention, c.group_size, c.miss_policy))


def scores(split: Split, config: ModelConfig, hw: dict, best: Candidate, default: Candidate) -> dict:
    """Both figures (hit rate, tokens/s) of the winner and the default: "fitted" on the tokens they were
    chosen on and "held_out" (None without held-out data), each with its token count."""
    def figures(tokens: int, pair: tuple[Candidate, Candidate]) -> dict:
        return {"tokens": tokens, **{key: {"hit_rate": c.hit_rate, "tokens_per_s": c.tokens_per_s}
                                     for key, c in zip(("best", "default"), pair, strict=True)}}

    held = split.held_out
    return {"fitted": figures(split.fit.num_tokens, (best, default)),
            "held_out": None if held is None else figures(held.num_tokens, tuple(
                rescore(held, config, hw, c) for c in (best, default)))}


def score_lines(s: dict) -> list[str]:
    """`scores` as a table: a row each for the default and the winner, fitted beside held out."""
    parts = [p for p in ("fitted", "held_out") if s[p]]
    head = "  ".join(f"{p.replace('_', ' ') + ' (' + str(s[p]['tokens']) + ' tokens)':<28}" for p in parts)
    lines = [f"  {'':<9}{head}".rstrip()]
    for key in ("default", "best"):
        cells = "  ".join(f"hit {100 * s[p][key]['hit_rate']:5.1f}% {s[p][key]['tokens_per_s']:9.2f} tok/s "
                          for p in parts)
        lines.append(f"  {key:<9}{cells}".rstrip())
    ratios = ", ".join(f"{s[p]['best']['tokens_per_s'] / s[p]['default']['tokens_per_s']:.2f}x {p.replace('_', ' ')}"
                       for p in parts)
    lines.append(f"  {'':<9}best over default: {ratios}")
    return lines
