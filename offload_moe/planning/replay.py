"""Replay a routing trace under eviction policies and cache sizes, without the model: the simulator
core (`simulate`, `simulate_many`), the checks of its inputs and Belady's next uses, which the
batched and timed replays share.

What a policy is worth depends on the workload's routing, so we measure it on a recorded trace
and put it beside Belady's rule (evict the expert whose next use lies furthest ahead), the best
any eviction rule can do when experts are fetched on demand.

Semantics, exactly those of the engine because both run `eviction.SlotTable`:
  * every layer has its own cache of `slots` experts, empty at the start (pool "layer"), or one pool
    of their sum holds any layer's experts (pool "global", `--slot-pool global`);
  * tokens go in trace order; at every layer a token accesses the K experts it chose; an access
    is a hit if the expert is resident when the token reaches that layer;
  * each missing expert is then inserted, evicting one resident expert chosen by the policy,
    never one that the same token uses at that layer;
  * hit rate = hits / (T * L * K).
With prefetch 1, before each token's access at layer l, `SlotTable.prefetch` inserts the trace's
prediction `predicted[t, l]` (made by the engine's predictor `prefetch_lead` layers earlier, or
offline by a learned one: `--predictor`; cut to the layer's slots), and after the last token its
`predicted_after` (the engine copied those too). Prefetch accounting:
  * prefetch_copies     experts that a prefetch inserted (it skips resident ones);
  * prefetch_hits       accesses that hit a slot filled by a prefetch and not accessed since: the
                        prefetches that were used;
  * prefetch_recall     prefetch_hits / all accesses: the share of accesses that a prefetch served;
  * prefetch_precision  prefetch_hits / prefetch_copies: the share of prefetches that were used;
  * copies              demand misses + prefetch_copies: every expert moved to the device.

Each row (one layer's cache in one configuration) replays the whole trace in one
`SlotTable.replay` call, the engine's own loop (compiled by numba where it is installed), and the
layers are shared out among threads (compiled; the loop releases the GIL) or processes (plain
Python). A global pool is one row per configuration that replays the T*L steps in the engine's
order (`pool_steps`): token by token, each layer's access, and after it the prefetch that the
engine issues there, for the layer `prefetch_lead` ahead (past the last layer, the next token's).
These are the engine's counts too: its stats read the same table counters.
Shape legend: T tokens, L layers, K top-k, E experts, S slots, R table rows.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import UserError
from ..offload.eviction import NEVER, POLICIES, POOLS, SlotTable
from .trace import Trace

PREFETCH_DEPTHS = (0, 1)


def next_uses(experts: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Belady's oracle for one layer, precomputed in one pass over the trace instead of scanning ahead.

    experts [T, K]. Returns nxt [T, K] int64, the next token after t that uses experts[t, k] (NEVER
    if none), and first [E] int64, each expert's first use (NEVER if unused). A stable sort groups
    the accesses by expert with tokens in order inside each group (8- or 16-bit keys take numpy's
    radix sort); the next use is then simply the next entry of the group.
    """
    T, K = experts.shape
    key = experts.reshape(-1)  # [T*K]
    order = np.argsort(key.astype(np.uint8 if num_experts <= 1 << 8 else np.uint16 if num_experts <= 1 << 16
                                  else np.int64), kind="stable")  # [T*K]: grouped by expert, token order inside
    group = key[order]
    token = order // K
    same = group[1:] == group[:-1]  # [T*K - 1]: the next entry is a later use of the same expert
    nxt_sorted = np.full(len(order), NEVER, np.int64)
    nxt_sorted[:-1][same] = token[1:][same]
    nxt = np.empty_like(nxt_sorted)
    nxt[order] = nxt_sorted
    first = np.full(num_experts, NEVER, np.int64)
    starts = np.flatnonzero(np.r_[True, ~same]) if len(order) else np.zeros(0, np.int64)
    first[group[starts]] = token[starts]
    return nxt.reshape(T, K), first  # [T*K] -> [T, K]


def slots_per_layer(slots: int | Sequence[int], trace: Trace) -> list[int]:
    """Slots per layer, validated: a token needs its K experts resident at once, and more slots
    than experts would never be used."""
    L, K, E = trace.num_layers, trace.top_k, trace.num_experts
    if isinstance(slots, (int, np.integer)):
        per_layer = [int(slots)] * L
    else:
        per_layer = [int(s) for s in slots]
        if len(per_layer) != L:
            raise UserError(f"slots give {len(per_layer)} counts, one per layer, but the trace has {L} layers")
    bad = [s for s in per_layer if not K <= s <= E]
    if bad:
        raise UserError(f"slots {bad[0]}: each layer needs at least top_k={K} slots (a token uses {K} experts "
                        f"at once) and at most num_experts={E}")
    return per_layer


def check_policy(policy: str) -> None:
    """A UserError naming the choices unless `policy` is one of eviction.POLICIES."""
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")


def check_pool(pool: str) -> None:
    """A UserError naming the choices unless `pool` is one of eviction.POOLS."""
    if pool not in POOLS:
        raise UserError(f"unknown slot pool {pool!r}; choose from {', '.join(POOLS)}")


def check_prefetch(prefetch: int) -> None:
    """A UserError unless `prefetch` is a depth the replay models (PREFETCH_DEPTHS)."""
    if prefetch not in PREFETCH_DEPTHS:
        raise UserError(f"--prefetch {prefetch}: use 1 (replay the predictions the trace recorded, made as many "
                        "layers ahead as the engine's --prefetch when it ran) or 0 (none)")


def simulate(trace: Trace, slots: int | list[int], policy: str, prefetch: int = 0, seed: int = 0,
             pool: str = "layer") -> dict:
    """Replay `trace` with `slots` per layer (one count, or a list with one per layer; pool "global": their
    sum, shared by every layer).

    Returns {"policy", "slots", "prefetch", "hit_rate", "hits", "accesses", "misses", "per_layer"
    (hit rate per layer), "per_layer_hits", "per_layer_misses", "copies", "prefetch_copies",
    "prefetch_hits", "prefetch_recall", "prefetch_precision"}; see the module docstring.
    """
    return simulate_many(trace, [slots], policy, prefetch, seed, pool)[0]


def simulate_many(trace: Trace, slot_configs: Sequence[int | list[int]], policy: str, prefetch: int = 0,
                  seed: int = 0, pool: str = "layer") -> list[dict]:
    """`simulate` for several cache sizes of one policy, one result per entry of `slot_configs`.

    All sizes replay in one table (R = sizes x L rows, or sizes rows of a global pool); row l of every
    size draws layer l's random stream (a global pool's, the engine's row 0's), so each result is the one
    `simulate` gives alone with the same seed.
    """
    check_policy(policy)
    check_prefetch(prefetch)
    check_pool(pool)
    configs = [slots_per_layer(s, trace) for s in slot_configs]
    replay = _replay_pool if pool == "global" else _replay
    counts = replay(trace, configs, policy, prefetch, seed) if configs else np.zeros((3, 0, trace.num_layers))
    out = _results(trace, configs, counts, policy, prefetch, pool)
    for res, given in zip(out, slot_configs, strict=True):
        res["slots"] = int(given) if isinstance(given, (int, np.integer)) else [int(s) for s in given]
    return out


def _replay(trace: Trace, configs: list[list[int]], policy: str, prefetch: int, seed: int) -> np.ndarray:
    """Row c*L + l of the table is layer l's cache in configuration c. Rows are independent, so
    each replays all its tokens in one `SlotTable.replay` call (layer-major): the same steps, in
    the same order per row, as the engine's token-major run. Returns the counts [3, configs, L]: hits,
    prefetch copies, prefetch hits."""
    T, L, K = trace.experts.shape
    n = len(configs)
    table = SlotTable([s for c in configs for s in c], trace.num_experts, policy, seed,
                      streams=[layer for _ in configs for layer in range(L)])
    belady = policy == "belady"
    after = trace.tensors.get("predicted_after") if prefetch else None  # [L, P]

    def layer_rows(layer: int) -> list[tuple[int, int, tuple[int, int, int]]]:
        experts = table.steps(trace.experts[:, layer])  # [T, K]
        widths = {configs[c][layer] for c in range(n)}  # a prefetch fills at most the row's slots, as the engine's
        predicted = {w: table.steps(trace.predicted[:, layer, :w]) for w in widths} if prefetch else {}
        later = first = None
        if belady:
            later, first = next_uses(trace.experts[:, layer], trace.num_experts)  # [T, K], [E]
            later = table.steps(later)
        out = []
        for c in range(n):
            row = c * L + layer
            next_use, width = first.copy() if belady else None, configs[c][layer]
            table.replay(row, experts, predicted.get(width), later, next_use)
            if after is not None:  # the last token's prefetch for a token that never came (trace.py)
                table.replay(row, table.steps([[]]), table.steps(after[layer : layer + 1, :width]), None, next_use)
            out.append((c, layer, (table.hits[row], table.prefetch_copies[row], table.prefetch_hits[row])))
        return out

    counts = np.zeros((3, n, L), np.int64)  # hits, prefetch copies, prefetch hits
    with _no_cyclic_gc():
        for c, layer, row_counts in _map_layers(layer_rows, L, work=T * n * L, threads=table.compiled):
            counts[:, c, layer] = row_counts
    return counts


def pool_steps(trace: Trace, per_layer: list[int], prefetch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A global pool's steps in the engine's order, its experts numbered layer * E + expert: accesses [S, K]
    and, with prefetch, predictions [S, P], S = T*L + lead (the loop's step: the prefetch issued just before
    the access). Access i = t*L + l; after it the engine prefetches the prediction for access i + lead
    (layer l + lead, or the next token's first layers: the trace's `predicted_after` for the last token),
    each layer's cut to its slots; the first `lead` predictions go before the first access."""
    T, L, K = trace.experts.shape
    E = trace.num_experts
    offsets = (np.arange(L, dtype=np.int64) * E)[None, :, None]  # [1, L, 1]
    accesses = (trace.experts + offsets).reshape(T * L, K)  # [T, L, K] -> [T*L, K]
    lead = int(trace.metadata.get("prefetch_lead", 1)) if prefetch else 0
    pad = np.full((max(lead - 1, 0), K), -1, np.int64)
    accesses = np.concatenate([pad, accesses, np.full((1 if lead else 0, K), -1, np.int64)])  # [S, K]
    if not lead:
        return accesses, None
    if not 1 <= lead < L:
        raise UserError(f"the trace's prefetch_lead {lead} must be from 1 to {L - 1} (its layers - 1)")
    predicted = trace.predicted.astype(np.int64)  # [T, L, P]
    after = trace.tensors.get("predicted_after")
    after = np.full((L, predicted.shape[2]), -1, np.int64) if after is None else after.astype(np.int64)
    predicted = np.concatenate([predicted, after[None, :, : predicted.shape[2]]])  # [T+1, L, P]
    width = np.arange(predicted.shape[2])[None, None, :] < np.array(per_layer)[None, :, None]  # [1, L, P]
    predicted = np.where((predicted >= 0) & width, predicted + offsets, -1)  # a layer's cut to its slots
    return accesses, predicted.reshape((T + 1) * L, -1)[: T * L + lead]  # prediction k: access k's


def _replay_pool(trace: Trace, configs: list[list[int]], policy: str, prefetch: int, seed: int) -> np.ndarray:
    """Row c of the table is configuration c's global pool of sum(configs[c]) slots, over all T*L steps in
    one `SlotTable.replay` call (`pool_steps`); its counts are per layer all the same. Returns the counts
    [3, configs, L] as `_replay`."""
    T, L, K = trace.experts.shape
    n, E = len(configs), trace.num_experts
    table = SlotTable([sum(c) for c in configs], E, policy, seed, streams=[0] * n, layers=L)

    def pool_rows(c: int) -> list[tuple[int, list[list[int]]]]:
        accesses, predicted = pool_steps(trace, configs[c], prefetch)
        later = next_use = None
        if policy == "belady":
            later, next_use = next_uses(np.where(accesses >= 0, accesses, L * E), L * E + 1)  # [S, K], [L*E+1]
            later, next_use = table.steps(later), next_use[: L * E].copy()
        pending = None
        if predicted is not None:  # the prefetch after each access is decided before it (`SlotTable.replay`)
            pending = table.steps(np.concatenate([predicted[1:], np.full((1, predicted.shape[1]), -1)]))
            predicted = table.steps(predicted)
        table.replay(c, table.steps(accesses), predicted, later, next_use, pending)
        rows = range(c * L, (c + 1) * L)
        return [(c, [[table.hits[r] for r in rows], [table.prefetch_copies[r] for r in rows],
                     [table.prefetch_hits[r] for r in rows]])]

    counts = np.zeros((3, n, L), np.int64)
    with _no_cyclic_gc():
        for c, row_counts in _map_layers(pool_rows, n, work=T * n * L, threads=table.compiled):
            counts[:, c] = row_counts
    return counts


def _results(trace: Trace, configs: list[list[int]], counts: np.ndarray, policy: str, prefetch: int, pool: str
             ) -> list[dict]:
    """`simulate`'s dicts from the counts [3, configs, L] of hits, prefetch copies and prefetch hits."""
    T, L, K = trace.experts.shape
    hits, inserted, prefetch_hits = counts
    accesses = T * L * K
    out = []
    for c in range(len(configs)):
        total = int(hits[c].sum())
        copies_pf = int(inserted[c].sum())
        pf_hits = int(prefetch_hits[c].sum())
        out.append({
            "policy": policy,
            "slots": configs[c],
            "pool": pool,
            "prefetch": prefetch,
            "hit_rate": total / accesses if accesses else 0.0,
            "hits": total,
            "accesses": accesses,
            "misses": accesses - total,
            "per_layer": [float(h) / (T * K) if T else 0.0 for h in hits[c]],
            "per_layer_hits": [int(h) for h in hits[c]],
            "per_layer_misses": [T * K - int(h) for h in hits[c]],
            "copies": accesses - total + copies_pf,
            "prefetch_copies": copies_pf,
            "prefetch_hits": pf_hits,
            "prefetch_recall": pf_hits / accesses if accesses else 0.0,
            "prefetch_precision": pf_hits / copies_pf if copies_pf else 0.0,
        })
    return out


@contextlib.contextmanager
def _no_cyclic_gc():
    """A trace as Python lists is millions of small objects, and the cyclic collector would walk
    them again and again while they are built, for nothing. Nothing
    here forms a cycle, so reference counting frees it all the same."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


PARALLEL_WORK = 200_000  # row-token steps above which the layers are shared out among workers


def _map_layers(fn, layers: int, work: int, threads: bool):
    """fn(layer) for every layer (or pool), in parallel when the work is large (rows are independent and each
    has its own random stream, so the result does not depend on the split): in threads when the loop is
    compiled (it releases the GIL), else in forked worker processes."""
    workers = min(os.cpu_count() or 1, layers)
    if work < PARALLEL_WORK or workers < 2:
        return [row for layer in range(layers) for row in fn(layer)]
    if threads:
        with ThreadPoolExecutor(workers) as pool:
            return [row for rows in pool.map(fn, range(layers)) for row in rows]
    if "fork" not in mp.get_all_start_methods():
        return [row for layer in range(layers) for row in fn(layer)]
    global _JOB
    _JOB = fn
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            return [row for rows in pool.map(_run_job, range(layers)) for row in rows]
    finally:
        _JOB = None


_JOB = None  # the function that forked workers run (inherited, never pickled)


def _run_job(layer: int):
    return _JOB(layer)


def default_slots(top_k: int, num_experts: int) -> list[int]:
    """The cache sizes `simulate` tries when none are given: top-k, 1.5x, 2x and 3x top-k, at most every
    expert (Mixtral, K=2 of 8: 2, 3, 4, 6; Qwen3-30B-A3B, K=8 of 128: 8, 12, 16, 24)."""
    return sorted({min(s, num_experts) for s in (top_k, top_k * 3 // 2, 2 * top_k, 3 * top_k)})
