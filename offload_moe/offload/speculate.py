"""Whether a copy pays: the prefetch decision that weighs cost (`decide`), the per-miss choice of
`--miss-policy auto` (`miss_on_cpu`) and the calibrated probabilities the first reads (`calibrate`,
`candidates`). The engine (`prefetch.Prefetcher`, `cache.ExpertCache`) and the timed replay
(`planning/timed.py`) call these same functions with the same kinds of figures, so the replay judges the
engine's own rule.

The cost model of one speculative copy of an expert that its row uses with probability p, on a link where
demand copies pass speculative ones and a speculative copy whose row does not use it is dropped when the
row's routing is known (planning/link.py):
  lead    = min(copy_s, until_s - queued): the link time the copy gets before its row runs (queued: the
            backlog ahead of it, its own row's earlier copies included);
  saving  = p * lead: used, it spares that much of the demand copy the row would wait for;
  cost    = (1 - p) * (lead + victim * copy_s): unused, it held the link for `lead` before it was dropped,
            and the expert it displaced (when the row's slots are full) comes back as a miss with the
            probability `victim`. In a pool of the row's own the prediction picks the victim: the least likely
            resident (`decide` names the others, which the eviction loop then spares), used now with its
            chance v, else at the next token with the pool's reuse (`SlotTable.reuse`, its hits per token
            over its slots): victim = v + (1 - v) * reuse (against the policy's victim: BENCHMARKS.md). In a
            pool shared by every row the policy picks among all its residents: `victim` is their mean
            chance, the other rows' at the pool's reuse.
A copy is issued when saving > cost; none once `lead` <= 0 (it could not start before its row runs).

Shape legend: T tokens, L rows, K top-k, P predicted per row (ranks), E experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def calibrate(predicted: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """[L, P]: per row and rank, the share of tokens whose prediction at that rank was among the experts
    the row chose, on routing the predictor was not fitted on (ranks with no prediction, -1, are left out;
    a rank never predicted: 0). predicted [T, L, P], experts [T, L, K]."""
    made = predicted >= 0  # [T, L, P]
    used = (predicted[..., :, None] == experts[..., None, :]).any(-1) & made  # [T, L, P]
    n = made.sum(0)  # [L, P]
    return np.where(n > 0, used.sum(0) / np.maximum(n, 1), 0.0)


def candidates(predicted: Sequence[Sequence[int]], table: Sequence[float], uses) -> list[tuple[int, float]]:
    """(expert, probability that its row uses it), most likely first (ties: the row's most used, `uses` [E],
    then the lowest id), from the row's tokens' ranked predictions [T][P] (a token's starting with -1: none
    made) and the row's calibration [P]: one token's by rank; several tokens' combined as independent
    chances, 1 - prod(1 - p)."""
    unused: dict[int, float] = {}
    for ranks in predicted:
        for r, e in enumerate(ranks[: len(table)]):
            if e >= 0:
                unused[e] = unused.get(e, 1.0) * (1.0 - float(table[r]))
    return sorted(((e, 1.0 - q) for e, q in unused.items()), key=lambda c: (-c[1], -uses[c[0]], c[0]))


def rest_chance(ranked: Sequence[tuple[int, float]], top_k: int, num_experts: int) -> float:
    """The probability that the row uses an expert `ranked` does not name: the K uses it expects, less those
    the ranked ones take, shared by the others."""
    others = num_experts - len(ranked)
    return min(1.0, max(0.0, top_k - sum(p for _, p in ranked)) / others) if others > 0 else 0.0


def could_start(backlog_s: float, until_s: float, better_s: float = float("inf")) -> bool:
    """Whether a copy issued behind the link's `backlog_s` starts before its row runs (`until_s`) and before a
    nearer guess of the row comes (`better_s`): if not, `decide` issues nothing, and the prefetcher does not
    predict (its host time is saved where the link is saturated)."""
    return backlog_s < until_s and backlog_s < better_s


def decide_row(table, row: int, ranked: Sequence[tuple[int, float]], top_k: int, copy_s: float, backlog_s: float,
               until_s: float, width: int, better_s: float = float("inf")) -> list[tuple[int, float]]:
    """`decide` for `row` of an `eviction.SlotTable`, which gives the rest of its figures: the row's residents,
    its pool's slots, empty slots, reuse and whether other rows share it, and an unranked expert's chance
    (`rest_chance`). The engine (`cache.ExpertCache`) and the timed replay both call this, so they decide from
    the same figures."""
    n, free = table.pool_of(row)
    return decide(ranked, table.resident(row), n, copy_s, backlog_s, until_s, width,
                  rest_chance(ranked, top_k, table.num_experts), better_s, free, table.reuse(row, top_k),
                  table.layers > 1)


def decide(ranked: Sequence[tuple[int, float]], held: Sequence[int], slots: int, copy_s: float, backlog_s: float,
           until_s: float, width: int, rest: float = 0.0, better_s: float = float("inf"), free: int | None = None,
           reuse: float = 0.0, shared: bool = False) -> list[tuple[int, float]]:
    """The experts to prefetch for one row, with each one's expected saving in seconds (saving - cost above; 0.0
    for a resident one), at most `width` copies and ranked residents, from `ranked` (`candidates`). The row's
    resident experts `held` sit in a pool of `slots`, `free` of them empty (None: slots - held); `reuse`: the
    chance that a resident of the pool is used at the next token (`SlotTable.reuse`). `copy_s`: one copy;
    `backlog_s`: the copy work queued on the link ahead of a new copy; `until_s`: the time until the row runs
    (see the module docstring); `rest`: the chance of an unranked resident (`rest_chance`); `better_s`: the time
    until a nearer row predicts this row again (a guess from further ahead, which depth adds).

    A resident candidate costs nothing and is named, so the copies do not evict it; each copy issued queues the
    next one behind it, so the width shrinks as the link fills. A copy that could not start before the better
    guess is left to it: a guess from further ahead only fills the link's gap until then, so the depth adapts
    to the link's queue. Victims (see the module docstring): in a pool of the row's own, each copy displaces
    the least likely resident left, and every other resident is named after the ranked ones, so the copies
    evict exactly those; in a pool `shared` by every row, the policy picks among all its residents."""
    if not could_start(backlog_s, until_s, better_s):
        return []
    chance = dict(ranked)
    free = slots - len(held) if free is None else free
    resident = set(held)
    rank = {e: r for r, (e, _) in enumerate(ranked)}
    # a pool of its own: displaced in this order, the least likely first (ties: the lowest ranked)
    victims = sorted(held, key=lambda e: (chance.get(e, rest), -rank.get(e, len(ranked))))
    displaced: set[int] = set()
    mean = (sum(chance.get(e, rest) for e in held) + (slots - len(held)) * reuse) / slots  # a shared pool's victim
    out: list[tuple[int, float]] = []
    queued = backlog_s
    for e, p in ranked:
        if len(out) >= width:
            break
        if e in displaced:  # not copied back: a likelier one took its slot
            continue
        if e in resident:
            out.append((e, 0.0))
            victims.remove(e)
            continue
        lead = min(copy_s, until_s - queued)
        if lead <= 0 or queued >= better_s or not (free > 0 or shared or victims):
            break  # too late, left to the nearer guess, or every resident of its own pool is named
        if free > 0:
            victim = 0.0
        elif shared:
            victim = mean
        else:  # used now, or else at the next token as the pool's residents are
            v = chance.get(victims[0], rest)
            victim = v + (1.0 - v) * reuse
        gain = p * lead - (1.0 - p) * (lead + victim * copy_s)
        if gain > 0:
            out.append((e, gain))
            queued += copy_s
            if free > 0:
                free -= 1
            elif not shared:
                displaced.add(victims.pop(0))
    if out and not shared:  # the residents neither named nor displaced: named too, so the copies spare them
        out += [(e, 0.0) for e in victims]
    return out


def miss_on_cpu(link_wait_s: float, copy_s: float, cpu_wait_s: float, cpu_s: float) -> bool:
    """A miss under `--miss-policy auto`: computed on the CPU when it is done there sooner than its demand
    copy lands (each resource's queue ahead of it, then its own time)."""
    return cpu_wait_s + cpu_s < link_wait_s + copy_s
