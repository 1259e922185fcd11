"""Eviction rules: which expert leaves a layer's cache when another must come in.

Pure Python: no tensor is moved here. The engine (`cache.py`) and the trace simulator
(`simulate.py`) both run this exact code, `SlotTable.replay`, so they cannot disagree about
hits, misses or prefetch use. The engine replays one step at a time as tokens arrive, the
simulator a whole trace per call; one tight loop serves both, because per-step method calls
would cost the simulator five times its running time.

A `SlotTable` holds several independent layer caches, one *row* each; row r has `slots[r]`
slots. Rows share nothing (each even has its own random stream), so a caller may advance them
in any interleaving: the engine goes token by token, the simulator layer by layer.

One step of a row (one token reaching one layer) is an optional prefetch, then an access:
  prefetch  the predicted experts that are not resident are inserted in the given order (entries
            < 0 and repeats are skipped); no use is counted, recency is stamped at insertion, and
            no predicted expert is evicted to make room for another of the same prediction;
  access    1. an expert is a hit if it is resident when the access starts;
            2. every accessed expert counts one use (LFU) and hits are stamped with the row's
               clock (LRU);
            3. each missing expert, in the given order, takes an empty slot if there is one (lowest
               first), else evicts the resident expert with the smallest policy key (ties: lowest
               slot), never one of the experts this same access uses.
A slot filled by a prefetch is *fresh* until its first access: that hit counts as a prefetch hit
(the prefetch was used); an eviction before any access means the prefetch was wasted.

Policy keys (smallest leaves first):
  lru     last use (insertion counts as use)
  fifo    insertion time
  lfu     (uses of that expert at that layer so far, last use)
  random  a uniform draw per candidate at each eviction (seeded per row)
  belady  minus the next use of that expert at that layer (never again leaves first);
          offline only: the caller passes the next-use table.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

POLICIES = ("lru", "lfu", "fifo", "random", "belady")
ONLINE_POLICIES = ("lru", "lfu", "fifo", "random")
NEVER = 1 << 60  # next-use value for "not used again"


class NoVictimError(RuntimeError):
    """Every slot of the row holds an expert that the same access needs."""


class SlotTable:
    """Which expert sits in which slot, for several independent layer caches ("rows"), and what
    each row's accesses cost: `hits`, `misses`, `prefetch_copies`, `prefetch_hits` per row."""

    def __init__(self, slots: Sequence[int], num_experts: int, policy: str = "lru", seed: int = 0,
                 streams: Sequence[int] | None = None):
        """`streams[r]` names row r's random stream (default r): rows that model the same layer in
        several tables (the simulator's cache sizes) draw the same numbers as the engine's layer."""
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from {', '.join(POLICIES)}")
        slots = [int(s) for s in slots]
        if not slots or min(slots) < 1:
            raise ValueError("slots must be a non-empty list of positive counts, one per layer")
        R = len(slots)
        self.policy, self.num_experts, self.slots = policy, num_experts, slots
        self.expert = [[-1] * n for n in slots]  # [R][S] resident expert or -1
        self.slot_of = [[-1] * num_experts for _ in slots]  # [R][E] slot or -1
        self.last_use = [[0] * n for n in slots]  # [R][S]
        self.inserted = [[0] * n for n in slots]  # [R][S]
        self.fresh = [[False] * n for n in slots]  # [R][S] filled by a prefetch, not accessed since
        self.uses = [[0] * num_experts for _ in slots]  # [R][E]
        self.clock = [0] * R  # per row: rows advance independently
        streams = range(R) if streams is None else streams
        self.rng = [random.Random(seed * 1_000_003 + s) for s in streams]
        self.reset_counts()

    def reset_counts(self) -> None:
        R = len(self.slots)
        self.hits, self.misses = [0] * R, [0] * R
        self.prefetch_copies, self.prefetch_hits = [0] * R, [0] * R

    # -- queries -------------------------------------------------------------------
    def slot(self, row: int, expert: int) -> int:
        """Slot of `expert` in `row`, or -1 when it is not resident."""
        return self.slot_of[row][expert]

    def resident(self, row: int) -> list[int]:
        return [e for e in self.expert[row] if e >= 0]

    # -- one step, for the engine --------------------------------------------------------
    def access_row(self, row: int, experts: Sequence[int], next_use: list[int] | None = None
                   ) -> tuple[list[bool], list[int], list[int]]:
        """One access. Returns hit, slot (where each expert now sits) and evicted (the expert a
        miss displaced; -1 for none or for a hit), one entry per expert."""
        admitted: list[tuple[int, int, int]] = []
        self.replay(row, (experts,), next_use=next_use, admitted=admitted)
        came = {e: old for e, _, old in admitted}  # missed expert -> the expert it displaced
        return ([e not in came for e in experts], [self.slot_of[row][e] for e in experts],
                [came.get(e, -1) for e in experts])

    def prefetch_row(self, row: int, experts: Sequence[int], next_use: list[int] | None = None
                     ) -> tuple[list[bool], list[int], list[int]]:
        """A prefetch alone. Returns inserted, slot (-1 where nothing was inserted) and evicted,
        one entry per predicted expert."""
        admitted: list[tuple[int, int, int]] = []
        self.replay(row, ((),), (experts,), next_use=next_use, admitted=admitted)
        done = {e: (s, old) for e, s, old in admitted}
        inserted = [False] * len(experts)
        for k, e in enumerate(experts):
            if e in done and e not in experts[:k]:
                inserted[k] = True
        return (inserted, [done[e][0] if ok else -1 for e, ok in zip(experts, inserted, strict=True)],
                [done[e][1] if ok else -1 for e, ok in zip(experts, inserted, strict=True)])

    # -- the loop both run ---------------------------------------------------------------
    def replay(self, row: int, accesses: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]] | None = None,
               later: Sequence[Sequence[int]] | None = None, next_use: list[int] | None = None,
               admitted: list[tuple[int, int, int]] | None = None) -> None:
        """Run steps through one row: step t prefetches predictions[t] (when given), then accesses
        accesses[t]. Counts go to the row's counters; `admitted`, when given, receives
        (expert, slot, evicted expert or -1) for every insertion, in order.

        next_use [E] is Belady's table (each expert's next use at or after the current step); with
        `later` [T][K] (the step after t at which accesses[t][k] is used again) the loop keeps it
        current, so one table serves a whole trace."""
        held, slot_of = self.expert[row], self.slot_of[row]
        last, ins, uses, fresh = self.last_use[row], self.inserted[row], self.uses[row], self.fresh[row]
        victim = self._victim_rule(row, next_use)
        clock = self.clock[row]
        hits = misses = pf_copies = pf_hits = 0
        for t, exps in enumerate(accesses):
            if predictions is not None:
                clock += 1
                pred = predictions[t]
                for e in pred:
                    if e >= 0 and slot_of[e] < 0:
                        s = held.index(-1) if -1 in held else victim(pred)
                        old = held[s]
                        if old >= 0:
                            slot_of[old] = -1
                        held[s], slot_of[e], last[s], ins[s], fresh[s] = e, s, clock, clock, True
                        pf_copies += 1
                        if admitted is not None:
                            admitted.append((e, s, old))
            clock += 1
            missing = None
            for e in exps:
                uses[e] += 1
                s = slot_of[e]
                if s < 0:
                    missing = [e] if missing is None else [*missing, e]
                    continue
                last[s] = clock
                hits += 1
                if fresh[s]:
                    pf_hits += 1
                    fresh[s] = False
            if missing is not None:
                misses += len(missing)
                for e in missing:
                    s = held.index(-1) if -1 in held else victim(exps)
                    old = held[s]
                    if old >= 0:
                        slot_of[old] = -1
                    held[s], slot_of[e], last[s], ins[s], fresh[s] = e, s, clock, clock, False
                    if admitted is not None:
                        admitted.append((e, s, old))
            if later is not None:
                for e, n in zip(exps, later[t]):  # noqa: B905 (same length by construction; hot loop)
                    next_use[e] = n
        self.clock[row] = clock
        self.hits[row] += hits
        self.misses[row] += misses
        self.prefetch_copies[row] += pf_copies
        self.prefetch_hits[row] += pf_hits

    def _victim_rule(self, row: int, next_use: list[int] | None) -> Callable[[Sequence[int]], int]:
        """victim(protect) -> the slot to empty in a full row: the smallest key among the slots
        whose expert is not in `protect` (ties: lowest slot). It runs at every miss of a simulated
        trace, so the keys are inline branches, not calls."""
        held, last, ins, uses = self.expert[row], self.last_use[row], self.inserted[row], self.uses[row]
        rng = self.rng[row]
        p = self.policy
        if p == "belady" and next_use is None:
            raise ValueError("belady needs the next-use table: it is an offline policy")

        def victim(protect: Sequence[int]) -> int:
            best, best_key = -1, None
            for s, e in enumerate(held):
                if e in protect:
                    continue
                if p == "lru":
                    key = last[s]
                elif p == "fifo":
                    key = ins[s]
                elif p == "lfu":
                    key = (uses[e], last[s])
                elif p == "random":
                    key = rng.random()
                else:
                    key = -next_use[e]
                if best < 0 or key < best_key:
                    best, best_key = s, key
            if best < 0:
                raise NoVictimError("every slot holds an expert that this access still needs")
            return best

        return victim
