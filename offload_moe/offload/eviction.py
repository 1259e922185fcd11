"""Eviction rules: which expert leaves a layer's cache when another must come in.

No tensor is moved here. The engine (`cache.py`) and the trace simulator (`planning/replay.py`) both run
this exact code, `_replay_row` through `SlotTable.replay`, so they cannot disagree about hits,
misses or prefetch use. The engine replays one step at a time as tokens arrive, the simulator a
whole trace per call; one tight loop serves both.

The loop is written in the subset of Python that numba compiles. Where numba is installed (the
`jit` extra) it runs compiled, over numpy arrays; else, or with the
environment variable OFFLOAD_MOE_JIT=0, the same source runs as plain Python over lists. Both give
the same counts, bit for bit (the tests run both). The compiled code is cached on disk by numba
(`cache=True`): in `offload_moe/__pycache__`, or where the package is read-only in numba's
user-wide cache folder (~/.cache/numba on Linux; NUMBA_CACHE_DIR overrides both), so only the first
run on a machine compiles; with no writable folder at all it compiles in every run.

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
Entries < 0 of an access are skipped too (they pad ragged steps to one width).
A slot filled by a prefetch is *fresh* until its first access: that hit counts as a prefetch hit
(the prefetch was used); an eviction before any access means the prefetch was wasted.

Policy keys (smallest leaves first):
  lru     last use (insertion counts as use)
  fifo    insertion time
  lfu     (uses of that expert at that layer so far, last use)
  random  a uniform draw per candidate at each eviction (Python's `random.Random`, seeded per row;
          compiled, a port of its Mersenne Twister over the generator's state, the same numbers)
  belady  minus the next use of that expert at that layer (never again leaves first);
          offline only: the caller passes the next-use table.

What a forward prefetches for a row, from its tokens' ranked predictions, is one rule too
(`prefetch_choice`), which the engine's prefetcher and the batched replay both call.

Shape legend: T steps, W experts per step, R rows, S slots, E experts.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np

POLICIES = ("lru", "lfu", "fifo", "random", "belady")
ONLINE_POLICIES = ("lru", "lfu", "fifo", "random")
LRU, LFU, FIFO, RANDOM, BELADY = range(len(POLICIES))  # the loop's policy codes
NEVER = 1 << 60  # next-use value for "not used again"
CLOCK, FILLED, STAMP, HEAD, TAIL, HITS, MISSES, PREFETCH_COPIES, PREFETCH_HITS = range(9)  # a row's state entries
DONE, NO_VICTIM, BAD_EXPERT = range(3)  # what the loop returns
LINKED_SLOTS = 8  # LRU and FIFO rows with more slots keep them listed in key order (a scan of fewer costs less)


class NoVictimError(RuntimeError):
    """Every slot of the row holds an expert that the same access needs."""


def jit_available() -> bool:
    """Whether `SlotTable` compiles its loop: numba is installed and OFFLOAD_MOE_JIT is not 0."""
    return os.environ.get("OFFLOAD_MOE_JIT", "1") != "0" and importlib.util.find_spec("numba") is not None


class SlotTable:
    """Which expert sits in which slot, for several independent layer caches ("rows"), and what
    each row's accesses cost: `hits`, `misses`, `prefetch_copies`, `prefetch_hits` per row."""

    def __init__(self, slots: Sequence[int], num_experts: int, policy: str = "lru", seed: int = 0,
                 streams: Sequence[int] | None = None, compiled: bool | None = None):
        """`streams[r]` names row r's random stream (default r): rows that model the same layer in
        several tables (the simulator's cache sizes) draw the same numbers as the engine's layer.
        `compiled` None: `jit_available()`."""
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from {', '.join(POLICIES)}")
        slots = [int(s) for s in slots]
        if not slots or min(slots) < 1:
            raise ValueError("slots must be a non-empty list of positive counts, one per layer")
        R, S, E = len(slots), max(slots), num_experts
        self.policy, self.num_experts, self.slots = policy, num_experts, slots
        self.compiled = jit_available() if compiled is None else compiled
        streams = range(R) if streams is None else streams
        rngs = [random.Random(seed * 1_000_003 + s) for s in streams]
        if self.compiled:
            self._loop = _compiled_loop()
            self.expert = np.full((R, S), -1, np.int64)  # [R, S] resident expert or -1 (beyond a row's slots too)
            self.slot_of = np.full((R, E), -1, np.int64)  # [R, E] slot or -1
            self.last_use, self.inserted = np.zeros((R, S), np.int64), np.zeros((R, S), np.int64)
            self.fresh = np.zeros((R, S), np.bool_)  # filled by a prefetch, not accessed since
            self.uses = np.zeros((R, E), np.int64)
            self.mark = np.zeros((R, S), np.int64)  # the STAMP of the last victim search that protected the slot
            self.links = np.full((R, 2 * S), -1, np.int64)  # LRU, FIFO rows: the slots in key order (previous, next)
            self.state = np.zeros((R, 9), np.int64)  # CLOCK, FILLED, STAMP, HEAD, TAIL, then the counts
            self.state[:, [HEAD, TAIL]] = -1
            self.rng = np.array([r.getstate()[1] for r in rngs], np.int64)  # [R, 625]: Mersenne Twister words, index
            self.draws = np.zeros((R, S), np.float64)  # the loop's scratch, per row (rows may run in threads)
        else:
            self._loop = _replay_row
            self.expert = [[-1] * n for n in slots]
            self.slot_of = [[-1] * E for _ in slots]
            self.last_use, self.inserted = [[0] * n for n in slots], [[0] * n for n in slots]
            self.fresh = [[False] * n for n in slots]
            self.uses = [[0] * E for _ in slots]
            self.mark = [[0] * n for n in slots]
            self.links = [[-1] * (2 * n) for n in slots]
            self.state = [[-1 if c in (HEAD, TAIL) else 0 for c in range(9)] for _ in slots]
            self.rng = rngs
            self.draws = [[0.0] * n for n in slots]
        self._code = POLICIES.index(policy)
        self._empty = (np.zeros((0, 0), np.int64), np.zeros(0, np.int64)) if self.compiled else ((), [])
        # each row's arguments to the loop, built once: the engine calls it per layer and token
        self._rows = [(n, self.expert[r], self.slot_of[r], self.last_use[r], self.inserted[r], self.fresh[r],
                       self.uses[r], self.mark[r], self.links[r], self.draws[r], self.state[r], self.rng[r])
                      for r, n in enumerate(slots)]

    def reset_counts(self) -> None:
        for row in self.state:
            for c in range(HITS, PREFETCH_HITS + 1):
                row[c] = 0

    def _counts(self, c: int) -> list[int]:
        return [int(row[c]) for row in self.state]

    hits = property(lambda self: self._counts(HITS), doc="accesses that found the expert resident, per row")
    misses = property(lambda self: self._counts(MISSES), doc="accesses that inserted the expert, per row")
    prefetch_copies = property(lambda self: self._counts(PREFETCH_COPIES), doc="experts a prefetch inserted")
    prefetch_hits = property(lambda self: self._counts(PREFETCH_HITS), doc="first hits on a prefetched slot")

    # -- queries -------------------------------------------------------------------
    def slot(self, row: int, expert: int) -> int:
        """Slot of `expert` in `row`, or -1 when it is not resident."""
        return int(self._rows[row][2][expert])

    def resident(self, row: int) -> list[int]:
        return [int(e) for e in self.expert[row] if e >= 0]

    # -- one step, for the engine --------------------------------------------------------
    def access_row(self, row: int, experts: Sequence[int], next_use: list[int] | None = None
                   ) -> tuple[list[bool], list[int], list[int]]:
        """One access. Returns hit, slot (where each expert now sits) and evicted (the expert a
        miss displaced; -1 for none or for a hit), one entry per expert."""
        held, slot_of = _values(self.expert[row]), self.slot_of[row]
        hit = [bool(slot_of[e] >= 0) for e in experts]
        self.replay(row, (experts,), next_use=next_use)
        slots = [int(slot_of[e]) for e in experts]
        return hit, slots, [-1 if h else held[s] for h, s in zip(hit, slots, strict=True)]

    def prefetch_row(self, row: int, experts: Sequence[int], next_use: list[int] | None = None
                     ) -> tuple[list[bool], list[int], list[int]]:
        """A prefetch alone. Returns inserted, slot (-1 where nothing was inserted) and evicted,
        one entry per predicted expert."""
        held, slot_of = _values(self.expert[row]), self.slot_of[row]
        absent = [bool(e >= 0 and slot_of[e] < 0 and e not in experts[:k]) for k, e in enumerate(experts)]
        self.replay(row, ((),), (experts,), next_use=next_use)
        slots = [int(slot_of[e]) if new else -1 for e, new in zip(experts, absent, strict=True)]
        return absent, slots, [held[s] if s >= 0 else -1 for s in slots]

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

    def replay(self, row: int, accesses, predictions=None, later=None, next_use: list[int] | np.ndarray | None = None
               ) -> None:
        """Run steps through one row: step t prefetches predictions[t] (when given), then accesses
        accesses[t] ([T][W] each, in any form `steps` takes). Counts go to the row's counters.

        next_use [E] is Belady's table (each expert's next use at or after the current step); with
        `later` [T][W] (the step after t at which accesses[t][k] is used again) the loop keeps it
        current, in place, so one table serves a whole trace."""
        if next_use is None and (self.policy == "belady" or later is not None):
            raise ValueError("belady needs the next-use table: it is an offline policy")
        if next_use is not None and len(next_use) != self.num_experts:
            raise ValueError(f"the next-use table has {len(next_use)} entries, not one per expert ({self.num_experts})")
        none, table = self._empty
        if next_use is not None:
            table = next_use
            if self.compiled and not (isinstance(next_use, np.ndarray) and next_use.dtype == np.int64):
                table = np.array(next_use, np.int64)
            elif not self.compiled and isinstance(next_use, np.ndarray):
                table = next_use.tolist()
        status = self._loop(self._code, *self._rows[row], self.steps(accesses),
                            none if predictions is None else self.steps(predictions),
                            none if later is None else self.steps(later), table)
        if table is not next_use and later is not None:  # the loop changed the copy: hand back the changes
            next_use[:] = table
        if status == NO_VICTIM:
            raise NoVictimError("every slot holds an expert that this access still needs")
        if status == BAD_EXPERT:
            raise ValueError(f"an expert id is not below num_experts={self.num_experts}")


def prefetch_choice(predicted: list[list[int]], top_k: int, width: int, uses) -> list[int]:
    """What a forward prefetches for one row (the engine's `Prefetcher` and `batch_replay` both call this, so
    they cannot disagree):
    predicted [T][P] its tokens' ranked predictions (rows starting with -1: none made). One token's
    prediction is taken whole; several tokens' vote with their top-k, the most votes first, ties to the
    row's most used experts so far (`uses` [E], the frequency prior); at most `width` and P experts."""
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


def _replay_row(policy, n, held, slot_of, last, ins, fresh, uses, mark, links, draws, state, rng, accesses,
                predictions, later, next_use) -> int:
    """The loop: `SlotTable.replay` of one row, whose state it updates in place (held, last, ins,
    fresh, mark [S]; links [2S]; slot_of, uses [E]; state [9]; draws [S] is scratch). predictions
    and later empty: none given. Returns DONE, or NO_VICTIM when an access found no victim, or
    BAD_EXPERT at an id >= E (compiled code does not check bounds), leaving the step half done.

    One body serves the prefetch (phase 0) and the access (phase 1) of a step, and the victim
    search is written out in it, not called: compiled, a call per miss cost a third of the time.
    The counts and the clock stay in locals until the end (as plain Python, a list entry costs).
    LRU and FIFO rows of more than LINKED_SLOTS slots keep their slots listed in key order
    (`_to_tail`), so a victim search walks a few slots from the head instead of scanning all."""
    prefetching, tracking, E = len(predictions) > 0, len(later) > 0, len(slot_of)
    linked = n > LINKED_SLOTS and (policy == LRU or policy == FIFO)
    clock, filled, stamp = state[CLOCK], state[FILLED], state[STAMP]
    hits = misses = pf_copies = pf_hits = 0
    status = DONE
    for t in range(len(accesses)):
        for phase in range(2):
            if phase == 0 and not prefetching:
                continue
            step = predictions[t] if phase == 0 else accesses[t]
            clock += 1
            missing = 1
            if phase == 1:  # hits are decided before any insertion: a miss never evicts an expert of this access
                missing = 0
                for e in step:
                    if e >= E:
                        status = BAD_EXPERT
                    elif e >= 0:
                        uses[e] += 1
                        s = slot_of[e]
                        if s < 0:
                            missing += 1
                            continue
                        last[s] = clock
                        if linked and policy == LRU:
                            _to_tail(s, links, state)
                        hits += 1
                        if fresh[s]:
                            pf_hits += 1
                            fresh[s] = False
            if missing == 0 and status == DONE:
                continue
            marked = False  # the slots of this step's experts are marked at its first eviction
            candidates = 0
            for e in step:
                if e >= E:
                    status = BAD_EXPERT
                if status != DONE or e < 0 or slot_of[e] >= 0:
                    continue
                if filled < n:  # slots fill lowest first and never empty again
                    s = filled
                    filled += 1
                else:  # the victim: the smallest key among the slots that hold no expert of this step
                    if not marked:
                        marked, stamp, candidates = True, stamp + 1, n
                        for p in step:
                            if p >= 0 and slot_of[p] >= 0 and mark[slot_of[p]] != stamp:
                                mark[slot_of[p]] = stamp
                                candidates -= 1
                    s, key, tie, j = -1, 0, 0, 0
                    if linked:  # the slots listed in key order: walk from the head
                        keys, c, half = last if policy == LRU else ins, state[HEAD], len(links) // 2
                        while c >= 0:
                            if mark[c] != stamp:
                                if s < 0:
                                    s, key = c, keys[c]
                                elif keys[c] != key:  # past the smallest key (ties: the lowest slot)
                                    break
                                elif c < s:
                                    s = c
                            c = links[half + c]
                    elif policy == LRU or policy == FIFO:  # one stored key per slot
                        keys = last if policy == LRU else ins
                        for c in range(n):
                            if mark[c] != stamp and (s < 0 or keys[c] < key):
                                s, key = c, keys[c]
                    elif policy == RANDOM:  # key: the candidates' draws, in slot order
                        _uniforms(rng, draws, candidates)
                        for c in range(n):
                            if mark[c] != stamp:
                                if s < 0 or draws[j] < draws[key]:
                                    s, key = c, j
                                j += 1
                    else:  # LFU: (uses, last use); Belady: minus the next use
                        for c in range(n):
                            if mark[c] != stamp:
                                x = held[c]
                                k, k2 = (uses[x], last[c]) if policy == LFU else (-next_use[x], 0)
                                if s < 0 or k < key or (k == key and k2 < tie):
                                    s, key, tie = c, k, k2
                    if s < 0:
                        status = NO_VICTIM
                        continue
                    slot_of[held[s]] = -1
                held[s], slot_of[e], last[s], ins[s], fresh[s] = e, s, clock, clock, phase == 0
                if linked:
                    _to_tail(s, links, state)
                if marked:  # e is an expert of this step now: protected from the step's next evictions
                    mark[s] = stamp
                    candidates -= 1
                if phase == 0:
                    pf_copies += 1
                else:
                    misses += 1
            if status != DONE:
                break
        if status != DONE:
            break
        if tracking:
            exps, nxt = accesses[t], later[t]
            for k in range(len(exps)):
                if exps[k] >= 0:
                    next_use[exps[k]] = nxt[k]
    state[CLOCK], state[FILLED], state[STAMP] = clock, filled, stamp
    state[HITS] += hits
    state[MISSES] += misses
    state[PREFETCH_COPIES] += pf_copies
    state[PREFETCH_HITS] += pf_hits
    return status


def _to_tail(s, links, state) -> None:
    """Move slot s to the tail of its row's list, or append it when it is not listed yet. links holds
    each slot's previous, then each slot's next (-1: none); state the HEAD and the TAIL. Slots join
    the tail as their key (last use, insertion) is stamped with the row's clock, which never goes
    back, so the list stays in key order and a victim search reads it from the head."""
    tail, half = state[TAIL], len(links) // 2
    if tail == s:
        return
    before, after = links[s], links[half + s]
    if before >= 0:
        links[half + before] = after
    elif state[HEAD] == s:
        state[HEAD] = after
    if after >= 0:
        links[after] = before
    links[s], links[half + s] = tail, -1
    if tail >= 0:
        links[half + tail] = s
    else:
        state[HEAD] = s
    state[TAIL] = s


def _uniforms(rng, out, count) -> None:
    """out[:count] = `count` draws in [0, 1) from the row's `random.Random` (compiled: `_mt_uniforms`
    over its state)."""
    for i in range(count):
        out[i] = rng.random()


def _mt_uniforms(rng, out, count) -> None:
    """`_uniforms` over a `random.Random`'s state rng [625] (624 words, then the index): CPython's
    MT19937 (genrand_uint32), and `random()`'s 53 bits from two 32-bit outputs."""
    i = rng[624]
    for c in range(count):
        if i >= 624:
            _mt_regenerate(rng)
            i = 0
        a = _mt_temper(rng[i]) >> 5
        i += 1
        if i >= 624:
            _mt_regenerate(rng)
            i = 0
        out[c] = (a * 67108864.0 + (_mt_temper(rng[i]) >> 6)) * (1.0 / 9007199254740992.0)
        i += 1
    rng[624] = i


def _mt_regenerate(rng) -> None:
    """The next 624 words of MT19937's state."""
    for k in range(227):
        y = (rng[k] & 0x80000000) | (rng[k + 1] & 0x7FFFFFFF)
        rng[k] = rng[k + 397] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
    for k in range(227, 623):
        y = (rng[k] & 0x80000000) | (rng[k + 1] & 0x7FFFFFFF)
        rng[k] = rng[k - 227] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
    y = (rng[623] & 0x80000000) | (rng[0] & 0x7FFFFFFF)
    rng[623] = rng[396] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)


def _mt_temper(y: int) -> int:
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    return y ^ (y >> 18)


_COMPILED = None


def _compiled_loop():
    """`_replay_row` compiled by numba (once per process; from numba's disk cache after the first run)."""
    global _COMPILED
    if _COMPILED is None:
        from numba import njit, types
        from numba.extending import overload, register_jitable

        for fn in (_mt_uniforms, _mt_regenerate, _mt_temper, _to_tail):
            register_jitable(fn)
        overload(_uniforms)(lambda rng, out, count: _mt_uniforms)  # compiled, a row's generator is its state array
        i64, row, rows = types.int64, types.int64[::1], types.int64[:, ::1]
        signature = i64(i64, i64, row, row, row, row, types.boolean[::1], row, row, row, types.float64[::1],
                        row, row, rows, rows, rows, row)
        _COMPILED = _compile(njit, _replay_row, signature)
    return _COMPILED


def _compile(njit, fn, signature):
    """njit(fn), cached on disk; where numba finds no writable cache folder (a read-only install, and
    a read-only home), compiled for this process only, with a note."""
    try:
        return njit(signature, cache=True, nogil=True)(fn)
    except RuntimeError as e:
        if "cannot cache" not in str(e):
            raise
        print("note: numba has no writable cache folder (set NUMBA_CACHE_DIR to one), so the eviction loop is "
              "compiled again in every run (seconds)", file=sys.stderr)
        return njit(signature, nogil=True)(fn)
