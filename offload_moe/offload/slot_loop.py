"""The eviction loop itself: `_replay_row`, which `eviction.SlotTable.replay` runs over one row, compiled
by numba where it is installed, else as plain Python (the rules it implements are in eviction.py's
docstring; this module is how).

Everything here is written in the subset of Python that numba compiles, over numpy arrays (compiled) or
lists (plain), and every number it compares is an integer, or a float drawn from Python's own random
stream, so both give the same counts, bit for bit.

A row's state, besides the slots (held, slot_of, last, ins, fresh, mark, links, draws as before):
  state  [NSTATE]  CLOCK (one tick per phase), FILLED, STAMP, HEAD, TAIL, GUARD (a pool's: the STAMP
                   marking its latest access's slots, which the prefetch after it may not evict; -1 none),
                   then arc's ARC_P, ARC_T1, ARC_B1, ARC_B2, SERIAL (evictions so far) and HOLES (slots
                   below FILLED emptied by `vacate`: the next insertions take them, lowest first)
  groups [G, GW]   per layer sharing the row (G = 1 for a layer's own cache): G_CLOCK (its access
                   steps so far: the layer's own clock), G_PRED (the CLOCK of its latest prefetch, or
                   of the latest pending one), G_LAST (the CLOCK of its latest access), then its counts
                   G_HITS, G_MISSES, G_PF_COPIES, G_PF_HITS
  aux    [2S]      per slot (n: the row's slots), by policy: lrfu, learned: [s] its key (`_score`),
                   refreshed at each access of its layer (nothing it reads changes in between);
                   least-stale: [n + s] the layer clock at the last use; predicted: [s] the CLOCK
                   of the latest prefetch that named it, [n + s] as least-stale; arc: [s] its list
                   (0 T1, 1 T2), [n + i] the ring of the last n evicted experts (the ghosts)
  eaux   [2E]      per expert, by policy: lrfu, learned: [e] the decayed score, [E + e] the layer
                   clock it was decayed to; arc: [e] its ghost list (0 none, 1 B1, 2 B2), [E + e]
                   the SERIAL of its eviction
  trans  [G, E0, E0 + 1]  learned only (else empty): per layer, how often expert b followed expert a
                   at the next access ([a, b]) and how many accesses followed a ([a, E0])
  tfrom  [G, E0 + 1]      learned only: per layer, its latest access (a count, then the experts)
"""

from __future__ import annotations

import sys

LRU, LFU, FIFO, RANDOM, LRFU, ARC, STALE, PREDICTED, LEARNED, BELADY = range(10)  # the policy codes
CLOCK, FILLED, STAMP, HEAD, TAIL, GUARD, ARC_P, ARC_T1, ARC_B1, ARC_B2, SERIAL, HOLES = range(12)  # a row's state
NSTATE = 12
G_CLOCK, G_PRED, G_LAST, G_HITS, G_MISSES, G_PF_COPIES, G_PF_HITS = range(7)  # a layer's entries in `groups`
GW = 7
DONE, NO_VICTIM, BAD_EXPERT = range(3)  # what the loop returns
LINKED_SLOTS = 8  # LRU and FIFO rows with more slots keep them listed in key order (a scan of fewer costs less)
UNIT = 1 << 16  # one use in lrfu's and learned's scores
HALF_LIFE = 16  # lrfu's and learned's half-life, in the layer's own steps (bench/bench_policies.py)
P_WEIGHT, RATE_WEIGHT = 7, 3  # learned: the next-access estimate's and the decayed use rate's weights


def _replay_row(policy, n, E0, held, slot_of, last, ins, fresh, uses, mark, links, draws, state, rng, groups,
                aux, eaux, trans, tfrom, accesses, predictions, later, next_use, pending) -> int:
    """`SlotTable.replay` of one row, whose state it updates in place. predictions, later and pending
    empty: none given (pending[t]: the prefetch decided before access t and issued after it). E0: experts
    per layer (the row's experts are layer * E0 + expert). Returns DONE, or NO_VICTIM when an access found
    no victim (leaving the step half done), or BAD_EXPERT at an id >= E (compiled code does not check
    bounds), before that step.

    One body serves the prefetch (phase 0) and the access (phase 1) of a step, and the victim search
    is written out in it, not called: compiled, a call per miss cost a third of the time. LRU and FIFO
    rows of more than LINKED_SLOTS slots keep their slots listed in key order (`_to_tail`), so a
    victim search walks a few slots from the head instead of scanning all."""
    prefetching, tracking, E = len(predictions) > 0, len(later) > 0, len(slot_of)
    naming = policy == PREDICTED and len(pending) > 0
    G = E // E0
    linked = n > LINKED_SLOTS and (policy == LRU or policy == FIFO)
    staled = policy == STALE or policy == PREDICTED
    scored = policy == LRFU or policy == LEARNED  # keys kept per slot (aux), exact between the layer's accesses
    clock, filled, stamp = state[CLOCK], state[FILLED], state[STAMP]
    status, now = DONE, 0
    for t in range(len(accesses)):
        for phase in range(2):
            if phase == 0 and not prefetching:
                continue
            step = predictions[t] if phase == 0 else accesses[t]
            clock += 1
            g = -1  # the step's layer: a step holds experts of one layer
            for e in step:
                if e >= E:
                    status = BAD_EXPERT
                elif e >= 0 and g < 0:
                    g = e // E0
            if status != DONE:
                break
            if g < 0:
                continue
            gi = g * GW
            missing = 1
            if phase == 0:
                groups[gi + G_PRED] = clock
            else:  # hits are decided before any insertion: a miss never evicts an expert of this access
                groups[gi + G_CLOCK] += 1
                groups[gi + G_LAST] = clock
                now = groups[gi + G_CLOCK]
                if policy == LEARNED:
                    _learn(trans, tfrom, step, g, E0)
                if naming:  # the prefetch already decided names its experts before this access evicts
                    for e in pending[t]:
                        if e >= 0:
                            groups[(e // E0) * GW + G_PRED] = clock
                            if slot_of[e] >= 0:
                                aux[slot_of[e]] = clock
                missing = 0
                for e in step:
                    if e < 0:
                        continue
                    uses[e] += 1
                    if policy == LRFU or policy == LEARNED:
                        eaux[e] = _decayed(eaux[e], now - eaux[E + e]) + UNIT
                        eaux[E + e] = now
                    s = slot_of[e]
                    if s < 0:
                        missing += 1
                        continue
                    last[s] = clock
                    if staled:
                        aux[n + s] = now
                    if linked and policy == LRU:
                        _to_tail(s, links, state)
                    if policy == ARC and aux[s] == 0 and not fresh[s]:  # a second use: T1 -> T2
                        aux[s] = 1
                        state[ARC_T1] -= 1
                    groups[gi + G_HITS] += 1
                    if fresh[s]:
                        groups[gi + G_PF_HITS] += 1
                        fresh[s] = False
                if scored:  # the layer's resident experts' keys, which change only at its own accesses
                    if G == 1:
                        for c in range(min(filled, n)):
                            if held[c] >= 0:
                                aux[c] = _score(policy, held[c], E0, trans, tfrom, eaux, groups)
                    else:
                        for x in range(g * E0, (g + 1) * E0):
                            if slot_of[x] >= 0:
                                aux[slot_of[x]] = _score(policy, x, E0, trans, tfrom, eaux, groups)
            marked = False  # the slots of this step's experts are marked at its first eviction
            candidates = 0
            guard = state[GUARD] if phase == 0 and G > 1 else -1  # the pool's latest access's slots: not victims
            if phase == 1 and G > 1:  # marked now, then each insertion: what the next prefetch may not evict
                marked, stamp, candidates = True, stamp + 1, n
                for p in step:
                    if p >= 0 and slot_of[p] >= 0 and mark[slot_of[p]] != stamp:
                        mark[slot_of[p]] = stamp
                        candidates -= 1
                state[GUARD] = stamp
            if missing == 0:
                continue
            for e in step:
                if e < 0:
                    continue
                if slot_of[e] >= 0:
                    if phase == 0 and policy == PREDICTED:  # named again: kept
                        aux[slot_of[e]] = clock
                    continue
                ghost = eaux[e] if policy == ARC else 0
                if policy == ARC and phase == 1 and ghost > 0:  # a ghost's return adapts T1's target size
                    b1, b2 = max(state[ARC_B1], 1), max(state[ARC_B2], 1)
                    if ghost == 1:
                        state[ARC_P] = min(n, state[ARC_P] + max(1, b2 // b1))
                    else:
                        state[ARC_P] = max(0, state[ARC_P] - max(1, b1 // b2))
                if filled < n:  # slots fill lowest first, and empty again only by `vacate`
                    s = filled
                    filled += 1
                elif state[HOLES] > 0:  # a vacated slot, lowest first: no victim while one is empty
                    s = 0
                    while held[s] >= 0:
                        s += 1
                    state[HOLES] -= 1
                else:  # the victim: the smallest key among the slots that hold no expert of this step
                    if not marked:
                        marked, stamp, candidates = True, stamp + 1, n
                        for p in step:
                            if p >= 0 and slot_of[p] >= 0 and mark[slot_of[p]] != stamp:
                                mark[slot_of[p]] = stamp
                                candidates -= 1
                        if guard >= 0:
                            for c in range(n):
                                if mark[c] == guard:
                                    candidates -= 1
                    s, key, tie, tie2, tie3, j = -1, 0, 0, 0, 0, 0
                    if linked:  # the slots listed in key order: walk from the head
                        keys, c, half = last if policy == LRU else ins, state[HEAD], len(links) // 2
                        while c >= 0:
                            if mark[c] != stamp and mark[c] != guard:
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
                            if mark[c] != stamp and mark[c] != guard and (s < 0 or keys[c] < key):
                                s, key = c, keys[c]
                    elif policy == RANDOM:  # key: the candidates' draws, in slot order
                        _uniforms(rng, draws, candidates)
                        for c in range(n):
                            if mark[c] != stamp and mark[c] != guard:
                                if s < 0 or draws[j] < draws[key]:
                                    s, key = c, j
                                j += 1
                    elif policy == ARC:  # T1's least recently used when T1 is over its target, else T2's
                        s1, s2 = -1, -1
                        for c in range(n):
                            if mark[c] != stamp and mark[c] != guard:
                                if aux[c] == 0:
                                    if s1 < 0 or last[c] < last[s1]:
                                        s1 = c
                                elif s2 < 0 or last[c] < last[s2]:
                                    s2 = c
                        t1 = state[ARC_T1]
                        s = s1 if s1 >= 0 and (s2 < 0 or t1 > state[ARC_P] or (ghost == 2 and t1 == state[ARC_P])) \
                            else s2
                    elif scored:  # the kept keys, then the last use
                        for c in range(n):
                            if mark[c] != stamp and mark[c] != guard:
                                k1 = aux[c]
                                if s < 0 or k1 < key or (k1 == key and last[c] < tie):
                                    s, key, tie = c, k1, last[c]
                    else:  # keys of four parts, compared in order (eviction.py)
                        for c in range(n):
                            if mark[c] == stamp or mark[c] == guard:
                                continue
                            x = held[c]
                            k1, k2, k3, k4 = 0, 0, 0, last[c]
                            if policy == LFU:
                                k1, k2, k4 = uses[x], last[c], 0
                            elif policy == BELADY:
                                k1, k4 = -next_use[x], 0
                            else:  # least-stale, predicted: staleness in the layer's own steps, then the
                                gx = x // E0  # layer whose next access lies furthest ahead of this step's
                                if policy == PREDICTED:  # named by a prefetch for an access still to come
                                    pred = groups[gx * GW + G_PRED]
                                    k1 = 1 if aux[c] == pred and pred > groups[gx * GW + G_LAST] else 0
                                k2 = aux[n + c] - groups[gx * GW + G_CLOCK]
                                k3 = -((gx - g - 1) % G + 1)
                            better = s < 0
                            if not better:
                                if k1 != key:
                                    better = k1 < key
                                elif k2 != tie:
                                    better = k2 < tie
                                elif k3 != tie2:
                                    better = k3 < tie2
                                else:
                                    better = k4 < tie3
                            if better:
                                s, key, tie, tie2, tie3 = c, k1, k2, k3, k4
                    if s < 0:
                        status = NO_VICTIM
                        break
                    x = held[s]
                    slot_of[x] = -1
                    if policy == ARC:
                        _to_ghost(x, s, n, E, aux, eaux, state)
                held[s], slot_of[e], last[s], ins[s], fresh[s] = e, s, clock, clock, phase == 0
                if staled:
                    aux[n + s] = groups[gi + G_CLOCK]
                if scored:
                    aux[s] = _score(policy, e, E0, trans, tfrom, eaux, groups)
                elif policy == PREDICTED:
                    aux[s] = clock if phase == 0 else 0
                elif policy == ARC:
                    if ghost > 0:
                        state[ARC_B1 + ghost - 1] -= 1
                        eaux[e] = 0
                    aux[s] = 1 if ghost > 0 and phase == 1 else 0
                    state[ARC_T1] += 1 - aux[s]
                if linked:
                    _to_tail(s, links, state)
                if marked:  # e is an expert of this step now: protected from the step's next evictions
                    mark[s] = stamp
                    candidates -= 1
                groups[gi + (G_PF_COPIES if phase == 0 else G_MISSES)] += 1
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
    return status


def vacate(policy, e, held, slot_of, fresh, aux, state) -> None:
    """Empty the slot of resident expert e (a row's number) as if it had never been filled: a prefetch whose
    copy was dropped before it landed (prefetch.py). Its counts stay (the copy was issued); the list of an
    LRU or FIFO row keeps the slot until its next insertion moves it to the tail. Plain Python: called per
    dropped copy, not per step."""
    s = slot_of[e]
    if policy == ARC and aux[s] == 0:
        state[ARC_T1] -= 1
    held[s], slot_of[e], fresh[s] = -1, -1, False
    state[HOLES] += 1


def _decayed(score, steps):
    """`score` after `steps` of its layer's clock, halved every HALF_LIFE steps (between halvings, the
    chord: 2^-x as 1 - x/2), in integers."""
    halvings = steps // HALF_LIFE
    if halvings > 40:
        return 0
    score >>= halvings
    return score * (2 * HALF_LIFE - steps % HALF_LIFE) // (2 * HALF_LIFE)


def _learn(trans, tfrom, step, g, E0) -> None:
    """Layer g's access `step` follows its latest one: count the transitions, and make `step` the latest."""
    base, width = g * (E0 + 1), E0 + 1
    for i in range(tfrom[base]):
        a = (g * E0 + tfrom[base + 1 + i]) * width
        trans[a + E0] += 1
        for b in step:
            if b >= 0:
                trans[a + b - g * E0] += 1
    m = 0
    for b in step:
        if b >= 0:
            tfrom[base + 1 + m] = b - g * E0
            m += 1
    tfrom[base] = m


def _score(policy, x, E0, trans, tfrom, eaux, groups):
    """lrfu's and learned's key of expert x, as its layer's clock stands. lrfu: its decayed use count. learned:
    the share of the accesses after its layer's latest access's experts that used x (the estimated chance that
    its layer's next access does), weighted P_WEIGHT, plus its decayed use rate (uses per step of its layer),
    weighted RATE_WEIGHT; in UNITs."""
    g = x // E0
    score = _decayed(eaux[x], groups[g * GW + G_CLOCK] - eaux[len(eaux) // 2 + x])
    if policy == LRFU:
        return score
    width = E0 + 1
    base = g * width
    hits, total = 0, 0
    for i in range(tfrom[base]):
        a = (g * E0 + tfrom[base + 1 + i]) * width
        hits += trans[a + x - g * E0]
        total += trans[a + E0]
    return P_WEIGHT * (hits * UNIT // max(total, 1)) + RATE_WEIGHT * (score // (2 * HALF_LIFE))


def _to_ghost(x, s, n, E, aux, eaux, state) -> None:
    """arc: expert x leaves slot s for the ghost list of its list (B1 from T1, B2 from T2), into the ring of
    the last n evicted; the one it replaces there, if still a ghost from then, is forgotten."""
    serial = state[SERIAL]
    i = n + serial % n
    old = aux[i]
    if old >= 0 and eaux[old] > 0 and eaux[E + old] == serial - n:
        state[ARC_B1 + eaux[old] - 1] -= 1
        eaux[old] = 0
    eaux[x] = 1 if aux[s] == 0 else 2
    state[ARC_B1 + eaux[x] - 1] += 1
    state[ARC_T1] -= 1 if aux[s] == 0 else 0
    eaux[E + x] = serial
    aux[i] = x
    state[SERIAL] = serial + 1


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


def compiled_loop():
    """`_replay_row` compiled by numba (once per process; from numba's disk cache after the first run)."""
    global _COMPILED
    if _COMPILED is None:
        from numba import njit, types
        from numba.extending import overload, register_jitable

        for fn in (_mt_uniforms, _mt_regenerate, _mt_temper, _to_tail, _decayed, _learn, _score, _to_ghost):
            register_jitable(fn)
        overload(_uniforms)(lambda rng, out, count: _mt_uniforms)  # compiled, a row's generator is its state array
        i64, row, rows = types.int64, types.int64[::1], types.int64[:, ::1]
        signature = i64(i64, i64, i64, row, row, row, row, types.boolean[::1], row, row, row, types.float64[::1],
                        row, row, row, row, row, row, row, rows, rows, rows, row, rows)
        _COMPILED = compile_loop(njit, _replay_row, signature)
    return _COMPILED


def compile_loop(njit, fn, signature):
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
