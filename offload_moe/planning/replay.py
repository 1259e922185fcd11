"""Replay a routing trace under eviction policies and cache sizes, without the model.

What a policy is worth depends on the workload's routing, so we measure it on a recorded trace
and put it beside Belady's rule (evict the expert whose next use lies furthest ahead), the best
any eviction rule can do when experts are fetched on demand.

Semantics, exactly those of the engine because both run `policy.SlotTable`:
  * every layer has its own cache of `slots` experts, empty at the start;
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
Python), so a 100k-token trace replays in well under a second per policy (seconds without numba).
These are the engine's counts too: its stats read the same table counters.
Shape legend: T tokens, L layers, K top-k, E experts, S slots, R table rows.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from ..offload.eviction import NEVER, POLICIES, SlotTable
from .trace import Trace, load_trace

if TYPE_CHECKING:  # timed.py builds on this module
    from .timed import TimedOptions

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


def _per_layer(slots: int | Sequence[int], trace: Trace) -> list[int]:
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


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")


def _check_prefetch(prefetch: int) -> None:
    if prefetch not in PREFETCH_DEPTHS:
        raise UserError(f"--prefetch {prefetch}: use 1 (replay the predictions the trace recorded, made as many "
                        "layers ahead as the engine's --prefetch when it ran) or 0 (none)")


def simulate(trace: Trace, slots: int | list[int], policy: str, prefetch: int = 0, seed: int = 0) -> dict:
    """Replay `trace` with `slots` per layer (one count, or a list with one per layer).

    Returns {"policy", "slots", "prefetch", "hit_rate", "hits", "accesses", "misses", "per_layer"
    (hit rate per layer), "per_layer_hits", "per_layer_misses", "copies", "prefetch_copies",
    "prefetch_hits", "prefetch_recall", "prefetch_precision"}; see the module docstring.
    """
    return simulate_many(trace, [slots], policy, prefetch, seed)[0]


def simulate_many(trace: Trace, slot_configs: Sequence[int | list[int]], policy: str, prefetch: int = 0,
                  seed: int = 0) -> list[dict]:
    """`simulate` for several cache sizes of one policy, one result per entry of `slot_configs`.

    All sizes replay in one table (R = sizes x L rows); row l of every size draws layer l's random
    stream, so each result is the one `simulate` gives alone with the same seed.
    """
    _check_policy(policy)
    _check_prefetch(prefetch)
    configs = [_per_layer(s, trace) for s in slot_configs]
    out = _replay(trace, configs, policy, prefetch, seed) if configs else []
    for res, given in zip(out, slot_configs, strict=True):
        res["slots"] = int(given) if isinstance(given, (int, np.integer)) else [int(s) for s in given]
    return out


def _replay(trace: Trace, configs: list[list[int]], policy: str, prefetch: int, seed: int) -> list[dict]:
    """Row c*L + l of the table is layer l's cache in configuration c. Rows are independent, so
    each replays all its tokens in one `SlotTable.replay` call (layer-major): the same steps, in
    the same order per row, as the engine's token-major run."""
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
    hits, inserted, prefetch_hits = counts
    accesses = T * L * K
    out = []
    for c in range(n):
        total = int(hits[c].sum())
        copies_pf = int(inserted[c].sum())
        pf_hits = int(prefetch_hits[c].sum())
        out.append({
            "policy": policy,
            "slots": configs[c],
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
    them again and again while they are built (it cost as much as the replay itself). Nothing
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
    """fn(layer) for every layer, in parallel when the work is large (rows are independent and each has
    its own random stream, so the result does not depend on the split): in threads when the loop is
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


def run_simulate(trace_path: str, slots: list[int] | None, policies: list[str], prefetch: int, as_json: bool,
                 plot: str | None, batch: int = 1, timed: TimedOptions | None = None, predictor: str | None = None,
                 width: int = 0) -> int:
    """The `simulate` command: every (policy, slots) pair, Belady always included as the bound; `slots`
    None: `default_slots` of the trace's top-k and expert count. `batch` B > 1: the trace as B streams
    decoding together, one access set per layer and step (`batch_sim`). `timed`: also the timed replay
    of the first online policy at every size (`timed.run_timed`). `predictor`: a train-predictor file whose
    predictions, made from the trace's hidden states, `width` per layer (0: top-k), replace the recorded ones
    (prefetch on; imports torch).

    Prints a table (or, with as_json, exactly one JSON object on stdout) and optionally draws a PNG.
    """
    trace = load_trace(trace_path)
    T, L, K, E = trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts
    if T == 0:
        raise UserError(f"trace {trace_path} holds no tokens")
    if slots is None:
        slots = default_slots(K, E)
    if not slots:
        raise UserError("give at least one slots count")
    sizes = sorted(set(slots))
    for s in sizes:
        _per_layer(s, trace)
    if predictor:
        from ..offload.predictors import replayed

        trace, prefetch = replayed(trace, predictor, width or K), 1  # a size below the width takes the best
    if not policies:
        raise UserError(f"give at least one policy: {', '.join(POLICIES)}")
    for p in policies:
        _check_policy(p)
    chosen = list(dict.fromkeys(p for p in policies if p != "belady")) + ["belady"]
    _check_prefetch(prefetch)
    if prefetch and not (trace.predicted >= 0).any():
        raise UserError(f"trace {trace_path} holds no predictions (predicted is all -1), so prefetch 1 would "
                        "insert nothing; record the trace with prediction on or use prefetch 0")
    if plot:
        _plot_target(plot)
    if timed is not None:
        from .timed import run_timed, timed_costs, timed_report  # it builds on this module

        if batch != 1:
            raise UserError("--timed models one sequence decoding: use it without --batch")
        costs = timed_costs(trace, timed)  # bad flags fail before the replay
    if batch > 1:
        from .batch_replay import simulate_batch  # it builds on this module

        results = [simulate_batch(trace, s, p, batch, prefetch) for p in chosen for s in sizes]
    elif batch == 1:
        results = [r for p in chosen for r in simulate_many(trace, sizes, p, prefetch)]
    else:
        raise UserError("--batch must be 1 or more")
    extra = {"timed": run_timed(trace, sizes, chosen[0], costs)} if timed is not None else {}
    if as_json:
        print(json.dumps({"results": results, "trace": {"tokens": T, "layers": L, "experts": E, "top_k": K},
                          "batch": batch, **extra}))
    else:
        print(_report(trace_path, trace, results, chosen, sizes, prefetch, batch))
        if extra:
            print(timed_report(extra["timed"], L))
    if plot:
        _plot(plot, trace, results, chosen, sizes, prefetch)
        print(f"wrote {plot}", file=sys.stderr if as_json else sys.stdout)
    return 0


def _report(path: str, trace: Trace, results: list[dict], policies: list[str], sizes: list[int],
            prefetch: int, batch: int = 1) -> str:
    rate = {(r["policy"], r["slots"]): r for r in results}
    head = "".join(f"{p:>9}" for p in policies)
    lines = [f"trace {path}: {trace.num_tokens} tokens x {trace.num_layers} layers, {trace.num_experts} experts, "
             f"top-{trace.top_k}" + (f", model {trace.model}" if trace.model else "") + f"; prefetch {prefetch}",
             "",
             "hit rate by slots per layer (belady: evicts the expert used furthest ahead, "
             + ("the offline optimum)" if not prefetch else "under the same prefetches: not an optimum with prefetch)"),
             f"{'slots':>6}{head}"]
    if batch > 1:
        forwards = results[0]["forwards"]
        lines[1:1] = ["", f"batch {batch}: the trace as {batch} streams stepped together, {forwards} forwards; an "
                      "access is one distinct expert of a forward at a layer"]
    for s in sizes:
        lines.append(f"{s:>6}" + "".join(f"{100 * rate[(p, s)]['hit_rate']:>8.1f}%" for p in policies))
    top = sizes[-1]
    lines += ["", f"per layer at {top} slots", f"{'layer':>6}{head}"]
    for layer in range(trace.num_layers):
        lines.append(f"{layer:>6}" + "".join(f"{100 * rate[(p, top)]['per_layer'][layer]:>8.1f}%"
                                             for p in policies))
    if prefetch:
        lines += ["", f"prefetch at {top} slots: copies per token, precision, recall",
                  f"{'':>6}{'copies':>9}{'precision':>11}{'recall':>9}"]
        for p in policies:
            r = rate[(p, top)]
            lines.append(f"{p:>6}{r['copies'] / trace.num_tokens:>9.2f}{100 * r['prefetch_precision']:>10.1f}%"
                         f"{100 * r['prefetch_recall']:>8.1f}%")
    return "\n".join(lines)


def _plot_target(plot: str) -> None:
    """Fail before the replay, not after it, when the picture cannot be drawn or written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'offload_moe[plot]'") from None
    folder = Path(plot).parent
    if not folder.is_dir():
        raise UserError(f"cannot write {plot}: folder {folder} does not exist")


def _plot(plot: str, trace: Trace, results: list[dict], policies: list[str], sizes: list[int],
          prefetch: int) -> None:
    """Two panels: hit rate against slots per policy (belady dashed), and the share of each layer's
    accesses that each expert takes (skewed layers are where a small cache does well)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'offload_moe[plot]'") from None
    T, L, K, E = trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    curve, heat = fig.subplots(1, 2)
    for p in policies:
        ys = [100 * next(r["hit_rate"] for r in results if r["policy"] == p and r["slots"] == s) for s in sizes]
        curve.plot(sizes, ys, marker="o", linestyle="--" if p == "belady" else "-", label=p)
    curve.set(xlabel="slots per layer", ylabel="hit rate (%)", xticks=sizes,
              title="hit rate against cache size" + (f" (prefetch {prefetch})" if prefetch else ""))
    curve.grid(alpha=0.3)
    curve.legend()
    key = (np.arange(L)[None, :, None] * E + trace.experts.astype(np.int64)).reshape(-1)  # [T, L, K] -> [T*L*K]
    share = np.bincount(key, minlength=L * E).reshape(L, E) / (T * K)  # [L*E] -> [L, E]
    image = heat.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set(xlabel="expert", ylabel="layer", title="share of each layer's accesses")
    fig.colorbar(image, ax=heat)
    try:
        fig.savefig(plot, dpi=120)
    except OSError as exc:
        raise UserError(f"cannot write {plot}: {exc.strerror or exc}") from None
