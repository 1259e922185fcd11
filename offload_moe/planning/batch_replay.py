"""Replay a routing trace as batched forward passes: `simulate --batch B`.

With B sequences decoding together, a layer sees the union of their experts once per step (the
engine's `Transformer.forward_batch`), so more distinct experts per layer per step, fewer accesses
per token. This replays that through `eviction.SlotTable.replay`, the one eviction rule, with the
engine's order of operations for a forward of T tokens at a layer (`Transformer.moe`):
  * T = 1: one access of the token's K experts in rank order; its prefetch is the prediction as is;
  * T > 1: the distinct experts, ascending, then resident ones first, in groups of at most the
    layer's slots, one access per group; its prefetch is the predicted experts ranked by how many
    of the T tokens predicted them (ties: lower id first), at most the layer's slots
    (`prefetch.Prefetcher`).
`replay_forwards` takes any grouping of the trace's tokens into forwards: `recorded_forwards`, the
engine's own (a trace records its tokens per forward), or `batch_forwards`, B streams: the trace
cut into B contiguous parts, step s one forward of token s of every part that has one. There every
token is a step of its stream, prompt tokens too (a what-if of B sequences of this workload, not
the engine's schedule of prefills).

Counts: accesses = expert accesses (distinct per forward and layer), hits, misses (= demand
copies), prefetch copies and hits; belady evicts the expert whose next forward lies furthest ahead: the
next-forward optimum, which is not an optimum when a forward needs more experts than the slots (its
groups are loaded one after another, and lfu can then beat it).

Shape legend: T tokens, L layers, K top-k, E experts, F forwards, B streams.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..offload.eviction import NEVER, SlotTable, prefetch_choice
from .replay import check_policy, check_pool, check_prefetch, slots_per_layer
from .trace import Trace


def batch_forwards(num_tokens: int, batch: int) -> list[list[int]]:
    """B contiguous streams of the trace's tokens, stepped together: F lists of token indices."""
    if batch < 1:
        raise UserError("--batch must be 1 or more")
    bounds = np.linspace(0, num_tokens, batch + 1).round().astype(int)  # [B+1]
    streams = [range(bounds[b], bounds[b + 1]) for b in range(batch)]
    steps = max((len(s) for s in streams), default=0)
    return [[s[i] for s in streams if i < len(s)] for i in range(steps)]


def recorded_forwards(trace: Trace) -> list[list[int]]:
    """The forwards the engine ran while recording (the trace's `forward_tokens`, tokens per forward)."""
    sizes = trace.tensors.get("forward_tokens")
    if sizes is None or int(sizes.sum()) != trace.num_tokens or (sizes < 1).any():
        raise UserError("the trace does not say how its tokens were grouped into forwards (no valid "
                        "'forward_tokens'; traces recorded before batching do not)")
    ends = np.cumsum(sizes)  # [F]
    return [list(range(int(e - n), int(e))) for e, n in zip(ends, sizes, strict=True)]


def simulate_batch(trace: Trace, slots: int | list[int], policy: str, batch: int, prefetch: int = 0,
                   seed: int = 0, pool: str = "layer") -> dict:
    """`replay.simulate` for B streams decoding together (see the module docstring)."""
    out = replay_forwards(trace, batch_forwards(trace.num_tokens, batch), slots, policy, prefetch, seed, pool)
    out["batch"] = batch
    return out


def replay_forwards(trace: Trace, forwards: list[list[int]], slots: int | list[int], policy: str,
                    prefetch: int = 0, seed: int = 0, pool: str = "layer") -> dict:
    """Replay `forwards` (lists of trace token indices, each one forward pass) as the engine runs them: forward
    by forward, layer by layer; pool "global": one pool of the slots' sum, where the prefetch for a layer is
    issued after the first access of the layer `prefetch_lead` before it (the previous forward's, for the
    first layers), as the engine's `Prefetcher` plans and `ExpertCache.acquire` issues it."""
    check_policy(policy)
    check_prefetch(prefetch)
    check_pool(pool)
    per_layer = slots_per_layer(slots, trace)
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    shared = pool == "global"
    table = SlotTable([sum(per_layer)] if shared else per_layer, E, policy, seed, layers=L if shared else 1)
    lead = int(trace.metadata.get("prefetch_lead", 1)) if prefetch and shared else 0
    wants = [[_wanted(trace.experts[toks, layer].tolist()) for layer in range(L)] for toks in forwards]  # [F][L]
    next_use, later = _next_uses(wants, L * E) if policy == "belady" else (None, None)
    # Belady's next uses: a global pool's one table, or each layer's part of it
    tables = [next_use if shared else next_use[r * E : (r + 1) * E] for r in range(L)] if next_use else [None] * L
    accesses = [0] * L

    def chosen(f: int, layer: int) -> list[int]:
        """What the engine prefetches for `layer` of forward f (none past the trace)."""
        if f >= len(forwards):
            after = trace.tensors.get("predicted_after")
            return [] if after is None else [e for e in after[layer, : per_layer[layer]].tolist() if e >= 0]
        rows = [trace.predicted[t, layer].tolist() for t in forwards[f]]
        return prefetch_choice(rows, K, per_layer[layer], table.uses_of(layer))

    for j in range(lead):  # the first forward's first layers, predicted before the trace began
        table.prefetch_row(j, chosen(0, j), tables[j])
    for f, toks in enumerate(forwards):
        for layer in range(L):
            want, n = wants[f][layer], per_layer[layer]
            accesses[layer] += len(want)
            if prefetch and not shared:  # issued before this layer's accesses (at an earlier layer's acquire)
                table.prefetch_row(layer, chosen(f, layer), tables[layer])
            target = divmod(f * L + layer + lead, L)  # (forward, layer) of the prefetch issued after this access
            planned = (target[1], chosen(*target)) if lead else None
            if len(toks) == 1:
                groups = [want]
            else:
                want = sorted(want, key=lambda e: table.slot(layer, e) < 0)  # stable: resident first
                groups = [want[i : i + n] for i in range(0, len(want), n)]
            for g, group in enumerate(groups):
                table.access_row(layer, group, tables[layer], pending=planned if g == 0 else None)
                if g == 0 and planned is not None:
                    table.prefetch_row(*planned, tables[planned[0]])
            for e, nxt in later[f * L + layer] if later is not None else ():
                tables[layer][e if shared else e - layer * E] = nxt
    if prefetch and not shared and "predicted_after" in trace.tensors:  # the last token's, for a token never come
        for layer in range(L):
            table.prefetch_row(layer, chosen(len(forwards), layer), tables[layer])
    hits, misses = table.hits, table.misses
    total, copies_pf, pf_hits = sum(hits), sum(table.prefetch_copies), sum(table.prefetch_hits)
    n_acc = sum(accesses)
    return {
        "policy": policy,
        "slots": slots if isinstance(slots, int) else list(slots),
        "pool": pool,
        "prefetch": prefetch,
        "forwards": len(forwards),
        "hit_rate": total / n_acc if n_acc else 0.0,
        "hits": total,
        "accesses": n_acc,
        "misses": sum(misses),
        "per_layer": [h / a if a else 0.0 for h, a in zip(hits, accesses, strict=True)],
        "per_layer_hits": list(hits),
        "per_layer_misses": list(misses),
        "copies": sum(misses) + copies_pf,
        "copies_per_forward": (sum(misses) + copies_pf) / len(forwards) if forwards else 0.0,
        "prefetch_copies": copies_pf,
        "prefetch_hits": pf_hits,
        "prefetch_recall": pf_hits / n_acc if n_acc else 0.0,
        "prefetch_precision": pf_hits / copies_pf if copies_pf else 0.0,
    }


def _wanted(rows: list[list[int]]) -> list[int]:
    """The experts a forward needs at one layer, from its tokens' choices there: the token's own, in rank order,
    for one token; else the distinct ones, ascending (the engine's `_groups` order before residency)."""
    if len(rows) == 1:
        return list(rows[0])
    return sorted({e for row in rows for e in row})


def _next_uses(wants: list[list[list[int]]], size: int) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Belady's table over the steps (forward f, layer l) in order, step f * L + l, experts numbered
    l * E + e: first [L*E], each expert's first step (NEVER if none), and later [F*L], for each expert of a
    step the next step that needs it; the replay updates the table from `later` after each step, so it
    always holds each expert's next use (a layer's own rows read their part of it)."""
    L = len(wants[0]) if wants else 0
    E = size // L if L else 0
    steps = [[layer * E + e for e in want] for per in wants for layer, want in enumerate(per)]
    seen: dict[int, int] = {}
    later: list[list[tuple[int, int]]] = [[] for _ in steps]
    for i in range(len(steps) - 1, -1, -1):
        later[i] = [(e, seen.get(e, NEVER)) for e in steps[i]]
        for e in steps[i]:
            seen[e] = i
    return [seen.get(e, NEVER) for e in range(size)], later
