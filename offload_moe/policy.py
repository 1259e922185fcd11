"""Eviction rules: which expert leaves a layer's cache when another must come in.

Pure Python: no tensor is moved here. The engine (`cache.py`) and the trace simulator
(`simulate.py`) both run this exact code, so they cannot disagree about hits and misses.

A `SlotTable` holds several independent layer caches, one *row* each; row r has `slots[r]`
slots. Rows share nothing (each even has its own random stream), so a caller may advance them
in any interleaving: the engine goes token by token, the simulator layer by layer.

Semantics of one `access_row` (one token reaching one layer, or one group of experts that the
engine needs together):
  1. an expert is a hit if it is resident when the access starts;
  2. every accessed expert counts one use (LFU) and hits are stamped with the row's clock (LRU);
  3. each missing expert, in the given order, takes an empty slot if there is one (lowest
     first), else evicts the resident expert with the smallest policy key (ties: lowest slot),
     never one of the experts this same access uses.
`prefetch_row` inserts predicted experts the same way (no use is counted, recency is stamped at
insertion) and never evicts another expert of the same prediction.

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
from collections.abc import Sequence

import numpy as np

POLICIES = ("lru", "lfu", "fifo", "random", "belady")
ONLINE_POLICIES = ("lru", "lfu", "fifo", "random")
NEVER = 1 << 60  # next-use value for "not used again"


class NoVictimError(RuntimeError):
    """Every slot of the row holds an expert that the same access needs."""


class SlotTable:
    """Which expert sits in which slot, for several independent layer caches ("rows")."""

    def __init__(self, slots: Sequence[int], num_experts: int, policy: str = "lru", seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from {', '.join(POLICIES)}")
        slots = [int(s) for s in slots]
        if not slots or min(slots) < 1:
            raise ValueError("slots must be a non-empty list of positive counts, one per layer")
        self.policy, self.num_experts, self.slots = policy, num_experts, slots
        self.expert = [[-1] * n for n in slots]  # [R][S] resident expert or -1
        self.slot_of = [[-1] * num_experts for _ in slots]  # [R][E] slot or -1
        self.last_use = [[0] * n for n in slots]  # [R][S]
        self.inserted = [[0] * n for n in slots]  # [R][S]
        self.uses = [[0] * num_experts for _ in slots]  # [R][E]
        self.clock = [0] * len(slots)  # per row: rows advance independently
        self.rng = [random.Random(seed * 1_000_003 + r) for r in range(len(slots))]

    # -- queries -------------------------------------------------------------------
    def slot(self, row: int, expert: int) -> int:
        """Slot of `expert` in `row`, or -1 when it is not resident."""
        return self.slot_of[row][expert]

    def resident(self, row: int) -> list[int]:
        return [e for e in self.expert[row] if e >= 0]

    # -- one row ---------------------------------------------------------------------
    def access_row(self, row: int, experts: Sequence[int], next_use: Sequence[int] | None = None
                   ) -> tuple[list[bool], list[int], list[int]]:
        """One access. Returns hit, slot (where each expert now sits) and evicted (the expert a
        miss displaced; -1 for none or for a hit), one entry per expert."""
        clock = self.clock[row] = self.clock[row] + 1
        slot_of, last, uses = self.slot_of[row], self.last_use[row], self.uses[row]
        slots = [slot_of[e] for e in experts]
        for e, s in zip(experts, slots):  # noqa: B905 (same length by construction; this is the hot loop)
            uses[e] += 1
            if s >= 0:
                last[s] = clock
        if min(slots) >= 0:
            return [True] * len(slots), slots, [-1] * len(slots)
        hit = [s >= 0 for s in slots]
        evicted = [-1] * len(slots)
        protect = set(experts)
        for k, e in enumerate(experts):
            if not hit[k]:
                slots[k], evicted[k] = self._admit(row, e, protect, next_use)
        return hit, slots, evicted

    def prefetch_row(self, row: int, experts: Sequence[int], next_use: Sequence[int] | None = None
                     ) -> tuple[list[bool], list[int], list[int]]:
        """Insert predicted experts that are not resident (entries < 0 and repeats are skipped).
        Returns inserted, slot (-1 where nothing was inserted) and evicted, one entry per expert."""
        self.clock[row] += 1
        slot_of = self.slot_of[row]
        protect = {e for e in experts if e >= 0}
        inserted, slots, evicted = [False] * len(experts), [-1] * len(experts), [-1] * len(experts)
        for k, e in enumerate(experts):
            if e >= 0 and slot_of[e] < 0:
                slots[k], evicted[k] = self._admit(row, e, protect, next_use)
                inserted[k] = True
        return inserted, slots, evicted

    def _admit(self, row: int, expert: int, protect: set[int], next_use) -> tuple[int, int]:
        held = self.expert[row]
        slot = held.index(-1) if -1 in held else self._victim(row, protect, next_use)
        old = held[slot]
        if old >= 0:
            self.slot_of[row][old] = -1
        held[slot] = expert
        self.slot_of[row][expert] = slot
        self.last_use[row][slot] = self.inserted[row][slot] = self.clock[row]
        return slot, old

    def _victim(self, row: int, protect: set[int], next_use) -> int:
        held = self.expert[row]
        candidates = [s for s, e in enumerate(held) if e not in protect]
        if not candidates:
            raise NoVictimError("every slot holds an expert that this access still needs")
        p = self.policy
        if p == "lru":
            last = self.last_use[row]
            return min(candidates, key=last.__getitem__)
        if p == "fifo":
            ins = self.inserted[row]
            return min(candidates, key=ins.__getitem__)
        if p == "lfu":
            uses, last = self.uses[row], self.last_use[row]
            return min(candidates, key=lambda s: (uses[held[s]], last[s]))
        if p == "random":
            draws = [self.rng[row].random() for _ in candidates]
            return candidates[draws.index(min(draws))]
        if next_use is None:
            raise ValueError("belady needs the next-use table: it is an offline policy")
        return min(candidates, key=lambda s: -next_use[held[s]])

    # -- several rows at once (arrays in, arrays out) ------------------------------------
    def access(self, rows: Sequence[int], experts: np.ndarray, next_use: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`access_row` for each row: experts [n, K] -> hit [n, K] bool, slot [n, K], evicted [n, K]."""
        return self._batch(self.access_row, rows, experts, next_use)

    def prefetch(self, rows: Sequence[int], experts: np.ndarray, next_use: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`prefetch_row` for each row: experts [n, K] -> inserted [n, K] bool, slot [n, K], evicted [n, K]."""
        return self._batch(self.prefetch_row, rows, experts, next_use)

    @staticmethod
    def _batch(fn, rows, experts, next_use):
        out = [fn(int(r), [int(e) for e in exps], None if next_use is None else next_use[i])
               for i, (r, exps) in enumerate(zip(rows, np.asarray(experts), strict=True))]
        flag, slot, evicted = zip(*out, strict=True) if out else ((), (), ())
        return np.array(flag, dtype=bool), np.array(slot, dtype=np.int64), np.array(evicted, dtype=np.int64)
