"""The `simulate` command: every (policy, cache size) pair replayed over a trace (`replay`, or
`batch_replay` with --batch), optionally the timed replay (`timed`), printed as a table or one JSON
object, and optionally drawn as a PNG (matplotlib, imported only for --plot).

It starts without torch (run.py's light commands): only --predictor and --timed's cost model import it.
Shape legend: T tokens, L layers, K top-k, E experts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..offload.eviction import ONLINE_POLICIES, POLICIES
from .batch_replay import simulate_batch
from .replay import check_policy, check_pool, check_prefetch, default_slots, simulate_many, slots_per_layer
from .timed import TimedOptions, run_timed, timed_costs, timed_report
from .trace import Trace, load_trace


def run_simulate(trace_path: str, slots: list[int] | None, policies: list[str], prefetch: int | None, as_json: bool,
                 plot: str | None, batch: int = 1, timed: TimedOptions | None = None, predictor: str | None = None,
                 width: int = 0, pool: str = "layer") -> int:
    """The `simulate` command: every (policy, slots) pair, Belady always included as the bound ("all": every
    online policy); `slots` None: `default_slots` of the trace's top-k and expert count; `prefetch` None: what
    the engine that recorded the trace ran (`recorded_prefetch`). `batch` B > 1: the trace as B streams
    decoding together, one access set per layer and step (`batch_replay`). `timed`: also the timed replay
    of the first online policy at every size (`timed.run_timed`). `predictor`: a train-predictor file whose
    predictions, made from the trace's hidden states, `width` per layer (0: top-k), replace the recorded ones
    (prefetch on; imports torch). `pool` "global": the slots' sum as one pool shared by every layer.

    Prints a table (or, with as_json, exactly one JSON object on stdout) and optionally draws a PNG.
    """
    trace = load_trace(trace_path)
    sizes = _sizes(trace_path, trace, slots)
    check_pool(pool)
    if prefetch is None:
        prefetch = recorded_prefetch(trace)
    if predictor:
        from ..offload.predictors import replayed  # here: it needs torch, which `simulate` starts without

        trace, prefetch = replayed(trace, predictor, width or trace.top_k), 1  # a size below the width takes the best
    chosen = _policies(policies)
    _check_predictions(trace_path, trace, prefetch)
    if plot:
        _plot_target(plot)
    costs = _timed_costs(trace, timed, batch) if timed is not None else None  # bad flags fail before the replay
    results = _replay_all(trace, sizes, chosen, prefetch, batch, pool)
    extra = {"timed": run_timed(trace, sizes, chosen[0], costs, pool)} if timed is not None else {}
    if as_json:
        T, L, K, E = trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts
        print(json.dumps({"results": results, "trace": {"tokens": T, "layers": L, "experts": E, "top_k": K},
                          "batch": batch, "pool": pool, "prefetch": prefetch, **extra}))
    else:
        print(_report(trace_path, trace, results, chosen, sizes, prefetch, batch, pool))
        if extra:
            print(timed_report(extra["timed"], trace.num_layers))
    if plot:
        _plot(plot, trace, results, chosen, sizes, prefetch)
        print(f"wrote {plot}", file=sys.stderr if as_json else sys.stdout)
    return 0


def _sizes(trace_path: str, trace: Trace, slots: list[int] | None) -> list[int]:
    """The cache sizes to replay, ascending and each checked against the trace (which must hold tokens)."""
    if trace.num_tokens == 0:
        raise UserError(f"trace {trace_path} holds no tokens")
    if slots is None:
        slots = default_slots(trace.top_k, trace.num_experts)
    if not slots:
        raise UserError("give at least one slots count")
    sizes = sorted(set(slots))
    for s in sizes:
        slots_per_layer(s, trace)
    return sizes


def recorded_prefetch(trace: Trace) -> int:
    """What the engine that recorded `trace` prefetched: 1 when it ran with prefetch on (its metadata `prefetch`,
    the engine's --prefetch) and the trace holds predictions, else 0 (traces from before that key: 0)."""
    try:
        on = int(trace.metadata.get("prefetch", "0")) > 0
    except ValueError:
        on = False
    return int(on and bool((trace.predicted >= 0).any()))


def _policies(policies: list[str]) -> list[str]:
    """The policies asked for ("all": every online one), checked, without repeats, and belady last (the bound
    every table shows)."""
    if not policies:
        raise UserError(f"give at least one policy: {', '.join(POLICIES)}, or all")
    policies = [q for p in policies for q in (ONLINE_POLICIES if p == "all" else (p,))]
    for p in policies:
        if p not in POLICIES:
            raise UserError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}, or all")
        check_policy(p)
    return list(dict.fromkeys(p for p in policies if p != "belady")) + ["belady"]


def _check_predictions(trace_path: str, trace: Trace, prefetch: int) -> None:
    """Prefetch 1 replays the trace's predictions: refuse it when there are none to replay."""
    check_prefetch(prefetch)
    if prefetch and not (trace.predicted >= 0).any():
        raise UserError(f"trace {trace_path} holds no predictions (predicted is all -1), so prefetch 1 would "
                        "insert nothing; record the trace with prediction on or use prefetch 0")


def _timed_costs(trace: Trace, timed: TimedOptions, batch: int) -> dict:
    """`timed.timed_costs` for --timed, which models one sequence."""
    if batch != 1:
        raise UserError("--timed models one sequence decoding: use it without --batch")
    return timed_costs(trace, timed)


def _replay_all(trace: Trace, sizes: list[int], policies: list[str], prefetch: int, batch: int, pool: str
                ) -> list[dict]:
    """Every (policy, size) result, policy-major: token by token, or as `batch` streams."""
    if batch > 1:
        return [simulate_batch(trace, s, p, batch, prefetch, pool=pool) for p in policies for s in sizes]
    if batch == 1:
        return [r for p in policies for r in simulate_many(trace, sizes, p, prefetch, pool=pool)]
    raise UserError("--batch must be 1 or more")


def _report(path: str, trace: Trace, results: list[dict], policies: list[str], sizes: list[int],
            prefetch: int, batch: int = 1, pool: str = "layer") -> str:
    rate = {(r["policy"], r["slots"]): r for r in results}
    width = max(9, *(len(p) + 2 for p in policies))
    head = "".join(f"{p:>{width}}" for p in policies)
    if batch > 1:
        bound = ("the next-forward optimum: evicts the expert whose next forward lies furthest ahead; not an optimum "
                 "when a forward needs more experts than the slots (it then loads them in groups, and can lose to "
                 "lfu)" + (", nor with prefetch" if prefetch else ""))
    else:
        bound = ("evicts the expert used furthest ahead, " + ("the offline optimum" if not prefetch else
                                                             "under the same prefetches: not an optimum with prefetch"))
    where = "per layer" if pool == "layer" else "per layer, their sum one pool shared by every layer (global)"
    lines = [f"trace {path}: {trace.num_tokens} tokens x {trace.num_layers} layers, {trace.num_experts} experts, "
             f"top-{trace.top_k}" + (f", model {trace.model}" if trace.model else "") + f"; prefetch {prefetch}",
             "",
             f"hit rate by slots {where} (belady: {bound})",
             f"{'slots':>6}{head}"]
    if batch > 1:
        forwards = results[0]["forwards"]
        lines[1:1] = ["", f"batch {batch}: the trace as {batch} streams stepped together, {forwards} forwards; an "
                      "access is one distinct expert of a forward at a layer"]
    for s in sizes:
        lines.append(f"{s:>6}" + "".join(f"{100 * rate[(p, s)]['hit_rate']:>{width - 1}.1f}%" for p in policies))
    top = sizes[-1]
    lines += ["", f"per layer at {top} slots", f"{'layer':>6}{head}"]
    for layer in range(trace.num_layers):
        lines.append(f"{layer:>6}" + "".join(f"{100 * rate[(p, top)]['per_layer'][layer]:>{width - 1}.1f}%"
                                             for p in policies))
    if prefetch:
        lines += ["", f"prefetch at {top} slots: copies per token, precision, recall",
                  f"{'':>12}{'copies':>9}{'precision':>11}{'recall':>9}"]
        for p in policies:
            r = rate[(p, top)]
            lines.append(f"{p:>12}{r['copies'] / trace.num_tokens:>9.2f}{100 * r['prefetch_precision']:>10.1f}%"
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
