"""Eviction rules: which expert leaves the cache when another must come in.

No tensor is moved here. The engine (`cache.py`) and the trace simulator (`planning/replay.py`) both run
this exact code, one loop (`slot_loop._replay_row`) through `SlotTable.replay`, so they cannot disagree
about hits, misses or prefetch use. The engine replays one step at a time as tokens arrive, the simulator
a whole trace per call.

The loop is written in the subset of Python that numba compiles. Where numba is installed (the
`jit` extra) it runs compiled, over numpy arrays; else, or with the
environment variable OFFLOAD_MOE_JIT=0, the same source runs as plain Python over lists. Both give
the same counts, bit for bit (the tests run both). The compiled code is cached on disk by numba
(`cache=True`): in `offload_moe/__pycache__`, or where the package is read-only in numba's
user-wide cache folder (~/.cache/numba on Linux; NUMBA_CACHE_DIR overrides both), so only the first
run on a machine compiles; with no writable folder at all it compiles in every run.

A `SlotTable` holds several independent caches, one *row* each; row r has `slots[r]` slots. Rows
share nothing (each even has its own random stream), so a caller may advance them in any
interleaving: the engine goes token by token, the simulator row by row. A row is either one layer's
cache (`layers=1`, the default pool) or a pool shared by `layers` layers (`--slot-pool global`): any
layer's expert may then evict any other layer's, and the row's experts are numbered
layer * num_experts + expert. Hits, misses and prefetch use are counted per layer either way.

One step of a row (one token reaching one layer) is an optional prefetch, then an access; a step
holds experts of one layer:
  prefetch  the predicted experts that are not resident are inserted in the given order (entries
            < 0 and repeats are skipped); no use is counted, recency is stamped at insertion, and
            no predicted expert is evicted to make room for another of the same prediction, nor, in a
            pool shared by layers, an expert of the access just before it (the engine prefetches right
            after a layer's demand copies, before that layer computes);
  access    1. an expert is a hit if it is resident when the access starts;
            2. every accessed expert counts one use (LFU) and hits are stamped with the row's
               clock (LRU); the layer's own clock counts one step;
            3. each missing expert, in the given order, takes an empty slot if there is one (lowest
               first), else evicts the resident expert with the smallest policy key (ties: lowest
               slot), never one of the experts this same access uses.
Entries < 0 of an access are skipped too (they pad ragged steps to one width).
A slot empties only by `vacate` (a prefetch whose copy the engine dropped before it landed); the next
insertion into the row takes it. A slot filled by a prefetch is *fresh* until its first access: that hit
counts as a prefetch hit (the prefetch was used); an eviction before any access means the prefetch was wasted.

Policy keys (smallest leaves first; "the layer's clock": the access steps of the expert's own layer):
  lru          last use (insertion counts as use)
  fifo         insertion time
  lfu          (uses of that expert at that layer so far, last use)
  random       a uniform draw per candidate at each eviction (Python's `random.Random`, seeded per row;
               compiled, a port of its Mersenne Twister over the generator's state, the same numbers)
  lrfu         (decayed use count, last use): each use adds one, and the count halves every
               HALF_LIFE steps of the layer's clock (between halvings, linearly: 2^-x as 1 - x/2);
               integers, as every key here
  arc          ARC's two lists over the slots: T1 holds experts used once since they came in (a prefetch
               that has not been used yet, or used once), T2 those used again; the victim is T1's least
               recently used while T1 holds more than its target p (or exactly p and the incoming expert
               is a B2 ghost), else T2's (the other list when one has no candidate). The ghosts are the
               last `slots` evicted experts, each remembering its list (B1, B2); an access that misses
               on a B1 ghost raises p by max(1, |B2| / |B1|), on a B2 ghost lowers it by max(1, |B1| /
               |B2|) (p within 0..slots), and a ghost comes back into T2 (a prefetch into T1, p unchanged)
  least-stale  (staleness, distance, last use): staleness = the layer's clock now minus its clock at
               the expert's last use (the stalest leaves first: each layer measured by its own steps,
               not the pool's); ties: the expert of the layer whose next access lies furthest ahead
               of the step's layer in the forward's order (the step's own layer: a full cycle), then
               the least recently used. With one layer per row it is exactly lru; it differs in a
               global pool, where lru ranks the layers the forward just left as the freshest
  predicted    (named, then least-stale's key): named = 1 when the latest prefetch of the expert's
               layer named it (resident already or inserted), else 0, so experts the predictor names
               for their layer's coming access leave last; without prefetch, least-stale
  learned      (next-use score, last use): P_WEIGHT x the share of the layer's accesses that followed
               its latest access's experts and used this expert (transition counts learned online,
               per layer: the estimated chance that the layer's next access uses it) + RATE_WEIGHT x its
               lrfu count per HALF_LIFE (its decayed use rate), in fixed point
  belady       minus the next use of that expert (never again leaves first); offline only: the caller
               passes the next-use table.

What a forward prefetches for a layer, from its tokens' ranked predictions, is one rule too
(`prefetch_choice`), which the engine's prefetcher and the batched replay both call.

Shape legend: T steps, W experts per step, R rows, S slots, E experts (per layer), G layers per row.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from . import slot_loop
from .slot_loop import BAD_EXPERT, G_HITS, G_MISSES, G_PF_COPIES, G_PF_HITS, GW, NO_VICTIM, NSTATE

POLICIES = ("lru", "lfu", "fifo", "random", "lrfu", "arc", "least-stale", "predicted", "learned", "belady")
ONLINE_POLICIES = POLICIES[:-1]
POOLS = ("layer", "global")  # a cache per layer, or one pool of their slots shared by every layer
NEVER = 1 << 60  # next-use value for "not used again"


class NoVictimError(RuntimeError):
    """Every slot of the row holds an expert that the same access needs."""


def jit_available() -> bool:
    """Whether `SlotTable` compiles its loop: numba is installed and OFFLOAD_MOE_JIT is not 0."""
    return os.environ.get("OFFLOAD_MOE_JIT", "1") != "0" and importlib.util.find_spec("numba") is not None


class SlotTable:
    """Which expert sits in which slot, for several independent caches ("rows"), and what each layer's
    accesses cost: `hits`, `misses`, `prefetch_copies`, `prefetch_hits` per layer (row r's layer g is
    entry r * layers + g)."""

    def __init__(self, slots: Sequence[int], num_experts: int, policy: str = "lru", seed: int = 0,
                 streams: Sequence[int] | None = None, compiled: bool | None = None, layers: int = 1):
        """`num_experts` per layer; `layers` sharing each row (1: a cache per layer). `streams[r]` names row
        r's random stream (default r): rows that model the same cache in several tables (the simulator's
        cache sizes) draw the same numbers as the engine's. `compiled` None: `jit_available()`."""
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from {', '.join(POLICIES)}")
        slots = [int(s) for s in slots]
        if not slots or min(slots) < 1:
            raise ValueError("slots must be a non-empty list of positive counts, one per row")
        G, E0 = int(layers), num_experts
        R, S, E = len(slots), max(slots), G * E0
        self.policy, self.num_experts, self.slots, self.layers = policy, num_experts, slots, G
        self.compiled = jit_available() if compiled is None else compiled
        streams = range(R) if streams is None else streams
        rngs = [random.Random(seed * 1_000_003 + s) for s in streams]
        learned = policy == "learned"
        T, F = (E * (E0 + 1), G * (E0 + 1)) if learned else (0, 0)
        if self.compiled:
            self._loop = slot_loop.compiled_loop()
            self.expert = np.full((R, S), -1, np.int64)  # [R, S] resident expert or -1 (beyond a row's slots too)
            self.slot_of = np.full((R, E), -1, np.int64)  # [R, E] slot or -1
            self.last_use, self.inserted = np.zeros((R, S), np.int64), np.zeros((R, S), np.int64)
            self.fresh = np.zeros((R, S), np.bool_)  # filled by a prefetch, not accessed since
            self.uses = np.zeros((R, E), np.int64)
            self.mark = np.zeros((R, S), np.int64)  # the STAMP of the last victim search that protected the slot
            self.links = np.full((R, 2 * S), -1, np.int64)  # LRU, FIFO rows: the slots in key order (previous, next)
            self.state = np.zeros((R, NSTATE), np.int64)  # slot_loop's CLOCK ... SERIAL
            self.state[:, [slot_loop.HEAD, slot_loop.TAIL, slot_loop.GUARD]] = -1
            self.rng = np.array([r.getstate()[1] for r in rngs], np.int64)  # [R, 625]: Mersenne Twister words, index
            self.draws = np.zeros((R, S), np.float64)  # the loop's scratch, per row (rows may run in threads)
            self.groups = np.zeros((R, G * GW), np.int64)  # per layer: its clock, latest prefetch, counts
            self.aux, self.eaux = np.zeros((R, 2 * S), np.int64), np.zeros((R, 2 * E), np.int64)
            self.trans, self.tfrom = np.zeros((R, T), np.int64), np.zeros((R, F), np.int64)
        else:
            self._loop = slot_loop._replay_row
            self.expert = [[-1] * n for n in slots]
            self.slot_of = [[-1] * E for _ in slots]
            self.last_use, self.inserted = [[0] * n for n in slots], [[0] * n for n in slots]
            self.fresh = [[False] * n for n in slots]
            self.uses = [[0] * E for _ in slots]
            self.mark = [[0] * n for n in slots]
            self.links = [[-1] * (2 * n) for n in slots]
            self.state = [[-1 if c in (slot_loop.HEAD, slot_loop.TAIL, slot_loop.GUARD) else 0 for c in range(NSTATE)]
                          for _ in slots]
            self.rng = rngs
            self.draws = [[0.0] * n for n in slots]
            self.groups = [[0] * (G * GW) for _ in slots]
            self.aux, self.eaux = [[0] * (2 * n) for n in slots], [[0] * (2 * E) for _ in slots]
            self.trans, self.tfrom = [[0] * T for _ in slots], [[0] * F for _ in slots]
        self._code = POLICIES.index(policy)
        self._empty = (np.zeros((0, 0), np.int64), np.zeros(0, np.int64)) if self.compiled else ((), [])
        # each row's arguments to the loop, built once: the engine calls it per layer and token
        self._rows = [(n, E0, self.expert[r], self.slot_of[r], self.last_use[r], self.inserted[r], self.fresh[r],
                       self.uses[r], self.mark[r], self.links[r], self.draws[r], self.state[r], self.rng[r],
                       self.groups[r], self.aux[r], self.eaux[r], self.trans[r], self.tfrom[r])
                      for r, n in enumerate(slots)]

    def reset_counts(self) -> None:
        for row in self.groups:
            for g in range(self.layers):
                for c in (G_HITS, G_MISSES, G_PF_COPIES, G_PF_HITS):
                    row[g * GW + c] = 0

    def _counts(self, c: int) -> list[int]:
        return [int(row[g * GW + c]) for row in self.groups for g in range(self.layers)]

    hits = property(lambda self: self._counts(G_HITS), doc="accesses that found the expert resident, per layer")
    misses = property(lambda self: self._counts(G_MISSES), doc="accesses that inserted the expert, per layer")
    prefetch_copies = property(lambda self: self._counts(G_PF_COPIES), doc="experts a prefetch inserted")
    prefetch_hits = property(lambda self: self._counts(G_PF_HITS), doc="first hits on a prefetched slot")

    # -- one layer at a time, for the engine: `layer` is row * layers + the layer in the row ----------
    def _where(self, layer: int) -> tuple[int, int]:
        """The row holding `layer`'s experts and the offset of their numbers in it."""
        row, g = divmod(layer, self.layers)
        return row, g * self.num_experts

    def slot(self, layer: int, expert: int) -> int:
        """Slot of `expert` of `layer` in its row, or -1 when it is not resident."""
        row, off = self._where(layer)
        return int(self._rows[row][3][expert + off])

    def expert_in(self, layer: int, slot: int) -> int:
        """The expert of `layer` in `slot` of its row (-1: none, or another layer's)."""
        row, off = self._where(layer)
        e = int(self.expert[row][slot]) - off
        return e if 0 <= e < self.num_experts else -1

    def resident(self, layer: int) -> list[int]:
        """`layer`'s resident experts."""
        row, off = self._where(layer)
        return [int(e) - off for e in self.expert[row] if off <= e < off + self.num_experts]

    def reuse(self, layer: int, top_k: int) -> float:
        """The chance that a resident of `layer`'s pool is used at the next token: the pool's hits per token
        (its layers' hit rate so far x top-k each) over its slots, at most 1; 1 before any access."""
        row, _ = self._where(layer)
        g = self.groups[row]
        hits = sum(int(g[i * GW + G_HITS]) for i in range(self.layers))
        seen = hits + sum(int(g[i * GW + G_MISSES]) for i in range(self.layers))
        return min(1.0, hits / seen * top_k * self.layers / self._rows[row][0]) if seen else 1.0

    def pool_of(self, layer: int) -> tuple[int, int]:
        """(slots, empty slots) of the row `layer`'s experts sit in: never filled, or vacated."""
        row, _ = self._where(layer)
        state = self.state[row]
        n = self._rows[row][0]
        return n, int(n - state[slot_loop.FILLED] + state[slot_loop.HOLES])

    def uses_of(self, layer: int):
        """`layer`'s use counts [E] (a view where the table is numpy)."""
        row, off = self._where(layer)
        return self.uses[row][off : off + self.num_experts]

    def vacate(self, layer: int, expert: int) -> None:
        """Make `layer`'s resident `expert` not resident, its slot empty (the next insertion into the row takes
        it): a prefetched expert whose copy was dropped (`slot_loop.vacate`)."""
        row, off = self._where(layer)
        if self._rows[row][3][expert + off] < 0:
            raise ValueError(f"expert {expert} of layer {layer} is not resident")
        slot_loop.vacate(self._code, expert + off, self.expert[row], self.slot_of[row], self.fresh[row],
                         self.aux[row], self.state[row])

    def access_row(self, layer: int, experts: Sequence[int], next_use: list[int] | None = None,
                   pending: tuple[int, Sequence[int]] | None = None) -> tuple[list[bool], list[int], list[int]]:
        """One access of `layer`'s experts; `pending`: (layer, experts) of the prefetch decided before it and
        issued after it, when that layer shares the row. Returns hit, slot (where each expert now sits in the
        row) and evicted (the expert a miss displaced, as its layer's number; -1 for none or for a hit), one
        entry per expert."""
        row, _ = self._where(layer)
        ids = self._ids(layer, experts)
        held, slot_of = _values(self.expert[row]), self.slot_of[row]
        hit = [bool(slot_of[e] >= 0) for e in ids]
        named = None
        if pending is not None and self._where(pending[0])[0] == row:
            named = (self._ids(*pending),)
        self.replay(row, (ids,), next_use=next_use, pending=named)
        slots = [int(slot_of[e]) for e in ids]
        return hit, slots, [-1 if h else self._local(held[s]) for h, s in zip(hit, slots, strict=True)]

    def prefetch_row(self, layer: int, experts: Sequence[int], next_use: list[int] | None = None
                     ) -> tuple[list[bool], list[int], list[int]]:
        """A prefetch alone into `layer`. Returns inserted, slot (-1 where nothing was inserted) and
        evicted, one entry per predicted expert."""
        row, _ = self._where(layer)
        ids = self._ids(layer, experts)
        held, slot_of = _values(self.expert[row]), self.slot_of[row]
        absent = [bool(e >= 0 and slot_of[e] < 0 and e not in ids[:k]) for k, e in enumerate(ids)]
        self.replay(row, ((),), (ids,), next_use=next_use)
        slots = [int(slot_of[e]) if new else -1 for e, new in zip(ids, absent, strict=True)]
        return absent, slots, [self._local(held[s]) if s >= 0 else -1 for s in slots]

    def _ids(self, layer: int, experts: Sequence[int]) -> Sequence[int]:
        """`layer`'s experts as its row numbers them (entries < 0 stay)."""
        off = self._where(layer)[1]
        return [e + off if e >= 0 else e for e in experts] if off else experts

    def _local(self, e: int) -> int:
        """A row's expert number as its layer's (-1 stays -1)."""
        return e % self.num_experts if e >= 0 else -1

    # -- the loop both run ---------------------------------------------------------------
    def steps(self, steps) -> np.ndarray | list:
        """Steps (a [T, W] array or T sequences of experts, ragged allowed) in the loop's form:
        compiled, a C-contiguous int64 [T, W] array, ragged steps padded with -1; else lists."""
        if not self.compiled:
            return steps.tolist() if isinstance(steps, np.ndarray) else steps
        if isinstance(steps, np.ndarray):
            return np.ascontiguousarray(steps, np.int64).reshape(len(steps), -1)
        try:
            out = np.array(steps, np.int64)
            if out.ndim == 2:
                return out
        except ValueError:  # ragged
            pass
        width = max((len(s) for s in steps), default=0)
        out = np.full((len(steps), width), -1, np.int64)  # [T, W]
        for t, s in enumerate(steps):
            out[t, : len(s)] = s
        return out

    def replay(self, row: int, accesses, predictions=None, later=None, next_use: list[int] | np.ndarray | None = None,
               pending=None) -> None:
        """Run steps through one row (its experts numbered as the row numbers them): step t prefetches
        predictions[t] (when given), then accesses accesses[t] ([T][W] each, in any form `steps` takes).
        Counts go to the row's layers' counters.

        next_use [E] is Belady's table (each expert's next use at or after the current step); with
        `later` [T][W] (the step after t at which accesses[t][k] is used again) the loop keeps it
        current, in place, so one table serves a whole trace. pending [T][W]: the prefetch the engine
        decided before access t and issues after it (a global pool's next layer's), which `predicted`
        keeps from access t's evictions."""
        E = self.layers * self.num_experts
        if next_use is None and (self.policy == "belady" or later is not None):
            raise ValueError("belady needs the next-use table: it is an offline policy")
        if next_use is not None and len(next_use) != E:
            raise ValueError(f"the next-use table has {len(next_use)} entries, not one per expert ({E})")
        none, table = self._empty
        if next_use is not None:
            table = next_use
            if self.compiled and not (isinstance(next_use, np.ndarray) and next_use.dtype == np.int64):
                table = np.array(next_use, np.int64)
            elif not self.compiled and isinstance(next_use, np.ndarray):
                table = next_use.tolist()
        status = self._loop(self._code, *self._rows[row], self.steps(accesses),
                            none if predictions is None else self.steps(predictions),
                            none if later is None else self.steps(later), table,
                            none if pending is None else self.steps(pending))
        if table is not next_use and later is not None:  # the loop changed the copy: hand back the changes
            next_use[:] = table
        if status == NO_VICTIM:
            raise NoVictimError("every slot holds an expert that this access still needs")
        if status == BAD_EXPERT:
            raise ValueError(f"an expert id is not below {E} (num_experts={self.num_experts} x {self.layers} "
                             "layers)" if self.layers > 1 else f"an expert id is not below num_experts={E}")


def prefetch_choice(predicted: list[list[int]], top_k: int, width: int, uses) -> list[int]:
    """What a forward prefetches for one layer (the engine's `Prefetcher` and `batch_replay` both call this, so
    they cannot disagree):
    predicted [T][P] its tokens' ranked predictions (rows starting with -1: none made). One token's
    prediction is taken whole; several tokens' vote with their top-k, the most votes first, ties to the
    layer's most used experts so far (`uses` [E], the frequency prior); at most `width` and P experts."""
    made = [p for p in predicted if p and p[0] >= 0]
    if not made:
        return []
    width = min(width, sum(e >= 0 for e in made[0]))
    if len(made) == 1:
        return list(made[0][:width])
    votes = Counter(e for p in made for e in p[:top_k] if e >= 0)
    return sorted(votes, key=lambda e: (-votes[e], -uses[e], e))[:width]


def _values(row: np.ndarray | list) -> list:
    """A copy of one row of the table's state as a list of Python numbers."""
    return row.tolist() if isinstance(row, np.ndarray) else list(row)
