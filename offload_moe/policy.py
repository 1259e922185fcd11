"""Eviction rules: which expert leaves a layer's cache when another must come in.

Pure logic: no tensor is moved here. The engine (`cache.py`) and the trace simulator
(`simulate.py`) both run this exact code, so they cannot disagree about hits and misses.

State is batched over *rows*, one row per layer cache, so that the simulator can
advance all layers of one token in a handful of numpy calls; the engine calls the
same methods with one row at a time. Row r has `slots[r]` slots; rows may differ.

Semantics of one `access` (one token reaching one layer, or one group of experts that
the engine needs together):
  1. an expert is a hit if it is resident when the access starts;
  2. every accessed expert counts one use (LFU) and hits are stamped with the clock (LRU);
  3. each missing expert, in the given order, takes an empty slot if there is one, else
     evicts the resident expert with the smallest policy key, never one of the experts
     this same access uses.
`prefetch` inserts predicted experts the same way (no use is counted, recency is stamped
at insertion) and never evicts another expert of the same prediction.

Policy keys (smallest leaves first):
  lru     last use (insertion counts as use)
  fifo    insertion time
  lfu     number of uses of that expert at that layer so far, ties by last use
  random  a uniform draw at each eviction (seeded)
  belady  minus the next use of that expert at that layer (never again leaves first);
          offline only: the caller passes the next-use table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

POLICIES = ("lru", "lfu", "fifo", "random", "belady")
ONLINE_POLICIES = ("lru", "lfu", "fifo", "random")
NEVER = np.iinfo(np.int64).max // 4  # next-use value for "not used again"


class NoVictimError(RuntimeError):
    """Every slot of the row holds an expert that the same access needs."""


class SlotTable:
    """Which expert sits in which slot, for several layer caches at once.

    Arrays are [R, S] (rows x max slots) or [R, E] (rows x experts).
    """

    def __init__(self, slots: Sequence[int], num_experts: int, policy: str = "lru", seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from {', '.join(POLICIES)}")
        slots = np.asarray(slots, dtype=np.int64)
        if slots.ndim != 1 or len(slots) == 0 or (slots < 1).any():
            raise ValueError("slots must be a non-empty list of positive counts, one per layer")
        self.policy = policy
        self.num_experts = num_experts
        self.slots = slots
        rows, width = len(slots), int(slots.max())
        self.expert = np.full((rows, width), -1, np.int64)  # [R, S] resident expert or -1
        self.slot_of = np.full((rows, num_experts), -1, np.int64)  # [R, E] slot or -1
        self.exists = np.arange(width)[None, :] < slots[:, None]  # [R, S]
        self.last_use = np.zeros((rows, width), np.int64)  # [R, S]
        self.inserted = np.zeros((rows, width), np.int64)  # [R, S]
        self.uses = np.zeros((rows, num_experts), np.int64)  # [R, E]
        self.clock = 0
        self.rng = np.random.default_rng(seed)

    # -- queries -------------------------------------------------------------------
    def slot(self, row: int, expert: int) -> int:
        """Slot of `expert` in `row`, or -1 when it is not resident."""
        return int(self.slot_of[row, expert])

    def resident(self, row: int) -> list[int]:
        return [int(e) for e in self.expert[row] if e >= 0]

    # -- updates -------------------------------------------------------------------
    def access(
        self, rows: np.ndarray, experts: np.ndarray, next_use: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One access per row. experts [n, K] (distinct within a row); next_use [n, E] for belady.

        Returns hit [n, K] bool, slot [n, K] (where each expert now sits) and
        evicted [n, K] (the expert that a miss displaced, -1 for none or for a hit).
        """
        rows = np.asarray(rows, dtype=np.int64)
        experts = np.asarray(experts, dtype=np.int64)
        self.clock += 1
        slot = self.slot_of[rows[:, None], experts]  # [n, K]
        hit = slot >= 0
        row_k = np.broadcast_to(rows[:, None], experts.shape)  # [n, K]
        self.last_use[row_k[hit], slot[hit]] = self.clock
        self.uses[row_k, experts] += 1
        evicted = np.full(experts.shape, -1, np.int64)
        if hit.all():
            return hit, slot, evicted
        protect = (self.expert[rows][:, :, None] == experts[:, None, :]).any(-1)  # [n, S]
        for k in range(experts.shape[1]):
            miss = np.flatnonzero(~hit[:, k])
            if len(miss) == 0:
                continue
            s, ev = self._admit(rows[miss], experts[miss, k], protect[miss], next_use, miss)
            slot[miss, k] = s
            evicted[miss, k] = ev
            protect[miss, s] = True
        return hit, slot, evicted

    def prefetch(
        self, rows: np.ndarray, experts: np.ndarray, next_use: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Insert predicted experts [n, K] that are not resident. Returns inserted [n, K] bool,
        slot [n, K] (-1 where nothing was inserted) and evicted [n, K]. Entries < 0 are ignored."""
        rows = np.asarray(rows, dtype=np.int64)
        experts = np.asarray(experts, dtype=np.int64)
        self.clock += 1
        valid = experts >= 0
        safe = np.where(valid, experts, 0)
        present = self.slot_of[rows[:, None], safe] >= 0
        todo = valid & ~present  # [n, K]
        slot = np.full(experts.shape, -1, np.int64)
        evicted = np.full(experts.shape, -1, np.int64)
        if not todo.any():
            return todo, slot, evicted
        protect = (self.expert[rows][:, :, None] == np.where(valid, experts, -2)[:, None, :]).any(-1)
        for k in range(experts.shape[1]):
            pick = np.flatnonzero(todo[:, k])
            if len(pick) == 0:
                continue
            s, ev = self._admit(rows[pick], experts[pick, k], protect[pick], next_use, pick)
            slot[pick, k] = s
            evicted[pick, k] = ev
            protect[pick, s] = True
        return todo, slot, evicted

    def _keys(self, rows: np.ndarray, next_use: np.ndarray | None, sel: np.ndarray) -> np.ndarray:
        """Policy key per slot, [n, S] float64; the smallest key is evicted."""
        if self.policy == "lru":
            return self.last_use[rows].astype(np.float64)
        if self.policy == "fifo":
            return self.inserted[rows].astype(np.float64)
        if self.policy == "lfu":
            held = np.maximum(self.expert[rows], 0)
            uses = np.take_along_axis(self.uses[rows], held, axis=1)
            return uses.astype(np.float64) * 2.0**32 + self.last_use[rows]
        if self.policy == "random":
            return self.rng.random(self.expert[rows].shape)
        if next_use is None:
            raise ValueError("belady needs the next-use table: it is an offline policy")
        held = np.maximum(self.expert[rows], 0)
        return -np.take_along_axis(next_use[sel], held, axis=1).astype(np.float64)

    def _admit(
        self, rows: np.ndarray, experts: np.ndarray, protect: np.ndarray, next_use, sel: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        keys = self._keys(rows, next_use, sel)
        exists = self.exists[rows]
        keys[exists & (self.expert[rows] < 0)] = -np.inf  # an empty slot is used first
        keys[protect | ~exists] = np.inf
        slot = keys.argmin(axis=1)
        if np.isposinf(keys[np.arange(len(rows)), slot]).any():
            raise NoVictimError("every slot holds an expert that this access still needs")
        evicted = self.expert[rows, slot]
        gone = evicted >= 0
        self.slot_of[rows[gone], evicted[gone]] = -1
        self.expert[rows, slot] = experts
        self.slot_of[rows, experts] = slot
        self.last_use[rows, slot] = self.clock
        self.inserted[rows, slot] = self.clock
        return slot, evicted
