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
copies), prefetch copies and hits; belady evicts the expert whose next forward lies furthest ahead.

Shape legend: T tokens, L layers, K top-k, E experts, F forwards, B streams.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..offload.eviction import NEVER, SlotTable, prefetch_choice
from .replay import check_policy, check_prefetch, slots_per_layer
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
                   seed: int = 0) -> dict:
    """`replay.simulate` for B streams decoding together (see the module docstring)."""
    out = replay_forwards(trace, batch_forwards(trace.num_tokens, batch), slots, policy, prefetch, seed)
    out["batch"] = batch
    return out


def replay_forwards(trace: Trace, forwards: list[list[int]], slots: int | list[int], policy: str,
                    prefetch: int = 0, seed: int = 0) -> dict:
    """Replay `forwards` (lists of trace token indices, each one forward pass) layer by layer."""
    check_policy(policy)
    check_prefetch(prefetch)
    per_layer = slots_per_layer(slots, trace)
    L, E = trace.num_layers, trace.num_experts
    table = SlotTable(per_layer, E, policy, seed)
    accesses = [0] * L
    for layer in range(L):
        experts = trace.experts[:, layer].tolist()  # [T][K]
        predicted = trace.predicted[:, layer].tolist() if prefetch else None
        n = per_layer[layer]
        wants = [_wanted(experts, f) for f in forwards]  # F x the forward's experts (rank order when T = 1)
        next_use, later = _next_uses(wants, E) if policy == "belady" else (None, None)
        for f, toks in enumerate(forwards):
            want = wants[f]
            accesses[layer] += len(want)
            if predicted is not None:  # issued before this layer's accesses (at the previous layer's acquire)
                chosen = prefetch_choice([predicted[t] for t in toks], trace.top_k, n, table.uses[layer])
                table.replay(layer, ((),), (chosen,), next_use=next_use)
            if len(toks) == 1:
                groups = [want]
            else:
                want = sorted(want, key=lambda e: table.slot(layer, e) < 0)  # stable: resident first
                groups = [want[i : i + n] for i in range(0, len(want), n)]
            for group in groups:
                table.replay(layer, (group,), next_use=next_use)
            if later is not None:
                for e, nxt in later[f]:
                    next_use[e] = nxt
        if prefetch and "predicted_after" in trace.tensors:  # the last token's prefetch for a token that never came
            chosen = [e for e in trace.tensors["predicted_after"][layer, :n].tolist() if e >= 0]
            table.replay(layer, ((),), (chosen,), next_use=next_use)
        del experts
    hits, misses = table.hits, table.misses
    total, copies_pf, pf_hits = sum(hits), sum(table.prefetch_copies), sum(table.prefetch_hits)
    n_acc = sum(accesses)
    return {
        "policy": policy,
        "slots": slots if isinstance(slots, int) else list(slots),
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


def _wanted(experts: list[list[int]], toks: list[int]) -> list[int]:
    """The experts a forward needs at one layer: the token's own, in rank order, for one token; else
    the distinct ones, ascending (the engine's `_groups` order before residency)."""
    if len(toks) == 1:
        return list(experts[toks[0]])
    return sorted({e for t in toks for e in experts[t]})


def _next_uses(wants: list[list[int]], num_experts: int) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Belady's table: first [E], each expert's first forward (NEVER if none), and later [F], for each
    expert of forward f the next forward after f that needs it; the replay updates the table from
    `later` after each forward, so it always holds each expert's next use."""
    seen: dict[int, int] = {}
    later: list[list[tuple[int, int]]] = [[] for _ in wants]
    for f in range(len(wants) - 1, -1, -1):
        later[f] = [(e, seen.get(e, NEVER)) for e in wants[f]]
        for e in wants[f]:
            seen[e] = f
    return [seen.get(e, NEVER) for e in range(num_experts)], later
