"""Replay a trace in modelled time: is a prefetched expert's copy done when its layer needs it?

`simulate` counts hits; a hit on an expert whose copy is still crossing the link saves only part
of a miss. Here the trace goes token by token, row by row (a row: one MoE layer's cache), through
one `eviction.SlotTable` with the engine's per-step calls in the engine's order, so the hit counts are
`simulate`'s with the same predictions where no speculative copy is dropped, and a clock runs beside them:

  * one host-to-device link (`link.Link`) carries one expert copy at a time, demand copies first: a
    demand copy passes queued speculative ones and a started one; speculative copies go first issued
    first served in the gaps; a speculative copy still on the link when its row's routing is known is
    dropped if the row does not use it (its slot emptied in the table, `SlotTable.vacate`, before the
    row's access, as the engine's `ExpertCache.routed`) and promoted to a demand copy if it does;
  * row l of token t starts at `now`, and its experts are needed at `now`. An accessed expert is
    ready (resident, its copy done by `now`), late (resident, its copy finishing later: the wait is
    that finish - now) or missed (not resident: a demand copy issued at `now`, waited for until it
    lands; or, miss policy cpu, or auto when `speculate.miss_on_cpu` says so, computed on the CPU,
    a second resource that runs one expert at a time for `cpu_s` each, while the copy goes on the link
    as a speculative one for later tokens);
  * the row ends at max(now, the latest needed copy's finish) + layer_s[l], or when its CPU work ends
    if later: the compute waits for every copy first, pessimistic (the engine runs the resident
    experts while the others land);
  * then the prefetches planned at this row go on the link, issued at `now` (the row's start), after
    its demand copies: the prediction for row l + lead of this token, or, past the last row, for row
    l + lead - L of the next token (the engine predicts `lead` rows ahead, wrapping to the next
    token); with a calibration, only those `speculate` chooses (the time until the row runs: this
    row's demand copies, then lead x layer_s), and after them, with a pool per row, those of each deeper
    lead (`Deeper`), which may only start before the next row's nearer guess. A copy into a slot also
    waits until the last row that read the slot has ended (only a prefetch of lead L, for this row of the
    next token, can meet that).

Predictions are `predicted[t, l, :]`, ranked, -1 padded, any width P (without a calibration, cut to
the row's slot count: a prediction never evicts its own experts; with one, `speculate` names at most
that many). With a pool shared by every row (`pool` "global") the slots and
their clocks are the pool's. Those of the first `lead` rows of token 0 are never
issued (no token before it); those the last token made for a token that never came (`after`) are
copied all the same, as in the engine.
Shape legend: T tokens, L rows (MoE layers), K top-k, P predicted per row, S slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..offload.eviction import ONLINE_POLICIES, SlotTable
from ..offload.speculate import calibrate, candidates, decide_row, miss_on_cpu
from ..options import MISS_POLICIES
from ..profiles import load_profile
from .link import Link
from .replay import check_pool, slots_per_layer
from .trace import Trace

OUTCOMES = ("ready", "late", "missed")


def simulate_timed(trace: Trace, slots: int | list[int], policy: str, predicted: np.ndarray | None, lead: int,
                   copy_s: float, layer_s: float | Sequence[float], seed: int = 0, after: np.ndarray | None = None,
                   pool: str = "layer", calibration: np.ndarray | None = None, miss_policy: str = "fetch",
                   cpu_s: float = float("inf"), deeper: Sequence[Deeper] = ()) -> dict:
    """Replay `trace` in modelled time (see the module docstring); `predicted` [T, L, P] or None (no
    prefetch); `after` [L, P]: the predictions the last token issued for a token that never came (the
    trace's `predicted_after`), prefetched as the engine did; `pool` "global": the slots' sum shared by every
    row (each access told the prefetch planned at its row's entry, as the engine's); `calibration` [L, P]
    (`speculate.calibrate`): each prefetch is `speculate`'s choice from the predictions, else every prediction
    is copied (the fixed width); `miss_policy` fetch, cpu or auto (`speculate.miss_on_cpu` per miss), a CPU
    miss taking `cpu_s`. Returns {"policy", "slots", "lead" (0 without prefetch), "decided" (whether
    `speculate` chose), "miss_policy", "copy_s", "layer_s" [L], "hits", "per_layer_hits", "prefetch_copies",
    "prefetch_hits" (the table's counts, as `simulate` when every prediction is copied),
    "ready", "late", "missed" (shares of all accesses),
    "late_wait_s", "miss_wait_s" (per token: the waits of every late or missed access, summed), "stall_s" (per
    token: what the rows waited for copies and CPU misses), "demand_copies", "prefetch_copies_per_token",
    "dropped" (speculative copies dropped per token), "cpu_misses" (per token), "link_busy", "cpu_busy" (shares
    of the modelled time), "seconds_per_token", "tokens_per_s", "per_layer" [L] {the same shares (of that
    row's accesses) and per-token figures, "prefetch_copies" (per token, into that row)}}.
    """
    T, L, K = trace.experts.shape
    check_pool(pool)
    if miss_policy not in MISS_POLICIES:
        raise UserError(f"miss policy {miss_policy!r}: choose from {', '.join(MISS_POLICIES)}")
    per_layer = slots_per_layer(slots, trace)
    layer_s = _checked(trace, policy, predicted, lead, copy_s, layer_s)
    shared = pool == "global"
    table = SlotTable([sum(per_layer)] if shared else per_layer, trace.num_experts, policy, seed,
                      layers=L if shared else 1)
    experts = trace.experts.tolist()  # [T][L][K]: the loop reads Python lists
    preds = _issued(predicted, after, per_layer if calibration is None else None)
    if deeper and calibration is None:
        raise UserError("predictions further ahead are decided by cost: they need a calibration")
    # (lead, predictions [T(+1)][L][P], calibration [L, P]), nearest first: its copies go on the link first; the
    # deeper leads into a pool of each row's own only, as the engine (prefetch.Prefetcher)
    plans = sorted([(lead, preds, calibration)] + [(d.lead, _issued(d.predicted, d.after, None), d.calibration)
                                                   for d in ([] if shared else deeper)], key=lambda plan: plan[0])
    clock = _Clock([sum(per_layer)] if shared else per_layer, [0] * L if shared else list(range(L)), copy_s,
                   miss_policy, cpu_s)
    for t in range(T):
        for l in range(L):  # noqa: E741 (a row, as in the legend)
            target, tt = (l + lead, t) if l + lead < L else (l + lead - L, t + 1)
            planned = (target, preds[tt][target]) if preds is not None and tt < len(preds) else None
            ends, where = clock.access(table, l, experts[t][l], planned)
            ends += layer_s[l]
            ends = max(ends, clock.cpu_done)
            for s in where:
                clock.free_at[clock.pool_of[l]][s] = ends
            for d, issued, cal in plans if preds is not None else ():
                target, tt = (l + d, t) if l + d < L else (l + d - L, t + 1)
                if tt >= len(issued):
                    continue
                chosen = issued[tt][target]
                if cal is not None:  # a nearer row predicts this target again once this row has run
                    better = layer_s[l] if d > plans[0][0] else float("inf")
                    chosen = clock.decide(table, (target, chosen), cal[target], d * layer_s[l], per_layer[target], K,
                                          better)
                clock.prefetch(table, target, chosen)
            clock.now = ends
    out = {"policy": policy, "slots": slots if isinstance(slots, int) else per_layer,
           "lead": lead if predicted is not None else 0, "decided": calibration is not None and predicted is not None,
           "miss_policy": miss_policy, "copy_s": float(copy_s), "layer_s": layer_s}
    return {**out, **_figures_of(table, clock, T, K)}


@dataclass(frozen=True)
class Deeper:
    """Predictions `lead` rows ahead beside the nearest ones (depth that adapts): [T, L, P] ranked, `after`
    [L, P] (the last token's for a token that never came, or None) and their calibration [L, P]; at each row
    `speculate` decides them after the nearer rows' copies, with `lead` rows of compute until their row runs."""

    lead: int
    predicted: np.ndarray
    after: np.ndarray | None
    calibration: np.ndarray


def deeper_of(trace: Trace, recalibrate: bool = False) -> list[Deeper]:
    """The deeper leads' predictions a trace carries (`predictors.replayed` of a calibrated predictor file with
    deeper leads: tensors `predicted_lead{N}`, `predicted_after_lead{N}`, `calibration_lead{N}`), nearest first;
    `recalibrate`: each calibrated on the trace's own routing (`speculate.calibrate`, as the tuner's judge
    calibrates the nearest lead) instead of the file's."""
    leads = sorted(int(k.removeprefix("predicted_lead")) for k in trace.tensors if k.startswith("predicted_lead"))
    out = []
    for d in leads:
        predicted = trace.tensors[f"predicted_lead{d}"]
        table = calibrate(predicted, trace.experts) if recalibrate else trace.tensors[f"calibration_lead{d}"]
        out.append(Deeper(d, predicted, trace.tensors.get(f"predicted_after_lead{d}"), table))
    return out


def _checked(trace: Trace, policy: str, predicted: np.ndarray | None, lead: int, copy_s: float,
             layer_s: float | Sequence[float]) -> list[float]:
    """The checks of `simulate_timed`'s arguments; returns the layer times, one per row."""
    T, L, _ = trace.experts.shape
    if policy not in ONLINE_POLICIES:
        raise UserError(f"the timed replay runs the engine's online policies ({', '.join(ONLINE_POLICIES)}), "
                        f"not {policy!r}")
    layer_s = [float(layer_s)] * L if isinstance(layer_s, (int, float, np.floating)) else [float(x) for x in layer_s]
    if len(layer_s) != L or min(layer_s) < 0 or not copy_s >= 0:
        raise UserError(f"need a copy time >= 0 and {L} layer times >= 0, got {copy_s} and {layer_s}")
    if predicted is not None:
        if predicted.ndim != 3 or predicted.shape[:2] != (T, L):
            raise UserError(f"predictions of shape {predicted.shape}: expected [{T}, {L}, P]")
        if not 1 <= lead <= L:
            raise UserError(f"prefetch lead {lead}: give 1 to {L} rows (the trace has {L})")
    return layer_s


def _issued(predicted: np.ndarray | None, after: np.ndarray | None, per_layer: list[int] | None
            ) -> list[list[list[int]]] | None:
    """The predictions each token makes per row, cut to the row's slots `per_layer` (None: whole, for
    `speculate` to choose from), as Python lists [T(+1)][L][P]; `after`'s, for token T (never accessed),
    last. None without prefetch."""
    if predicted is None:
        return None
    rows = predicted.tolist() + ([after.tolist()] if after is not None else [])
    return rows if per_layer is None else [[p[:n] for p, n in zip(tok, per_layer, strict=True)] for tok in rows]


class _Clock:
    """The modelled time beside the table: when each slot's copy lands, when its last reader ends, the link, the
    CPU, the current row's start, and the outcome counts and waits per row."""

    def __init__(self, sizes: list[int], pool_of: list[int], copy_s: float, miss_policy: str, cpu_s: float):
        L = len(pool_of)
        self.copy_s, self.pool_of, self.miss_policy, self.cpu_s = copy_s, pool_of, miss_policy, cpu_s
        self.ready_at = [[0.0] * n for n in sizes]  # [pools][S]: when the copy into each slot finishes
        self.free_at = [[0.0] * n for n in sizes]  # [pools][S]: when the last row that read each slot ends
        self.count = [[0] * L for _ in OUTCOMES]  # [3][L]: ready, late, missed per row
        self.wait = [[0.0] * L for _ in range(3)]  # [3][L]: late waits, miss waits, stall per row
        self.now = 0.0  # the current row's start
        self.cpu_end = self.cpu_done = self.cpu_busy = 0.0  # the CPU's queue; the current row's CPU work ends
        self.cpu_misses = 0
        self.link = Link(copy_s, self._landed)

    def _landed(self, pool: int, slot: int, t: float) -> None:
        self.ready_at[pool][slot] = t

    def access(self, table: SlotTable, l: int, experts: list[int], planned=None) -> tuple[float, list[int]]:  # noqa: E741
        """Row l's accesses at `now` (`planned`: the prefetch planned at its entry): its stale copies dropped,
        its copies in flight promoted, its misses copied on demand or computed on the CPU. Returns (when the
        latest needed copy lands, or now; the slots the row reads)."""
        link, p, now = self.link, self.pool_of[l], self.now
        link.advance(now)
        # its routing is known: copies into it of experts it does not use are dropped and their slots emptied, as
        # the engine's `ExpertCache.routed` does before the access
        used = {table.slot(l, e) for e in experts} - {-1}
        for _, s in link.stale(l, used):
            if (e := table.expert_in(l, s)) >= 0:
                table.vacate(l, e)
        hit, where, _ = table.access_row(l, experts, pending=planned)
        ready = self.ready_at[p]
        count, wait, ends = self.count, self.wait, now
        self.cpu_done = now
        for k, s in enumerate(where):
            if hit[k]:
                promoted = link.promote(now, p, s)
                done = ready[s] = promoted if promoted is not None else ready[s]
                late = done > now
                count[late][l] += 1
                wait[0][l] += done - now if late else 0.0
                ends = max(ends, done)
                continue
            link.cancel(p, s)  # a miss overwrites the slot: the copy still going into it (another expert's) stops
            count[2][l] += 1
            if self.miss_policy == "cpu" or (self.miss_policy == "auto" and miss_on_cpu(
                    max(0.0, link.demand_end - now), self.copy_s, max(0.0, self.cpu_end - now), self.cpu_s)):
                self.cpu_done = self.cpu_end = max(now, self.cpu_end) + self.cpu_s
                self.cpu_busy += self.cpu_s
                self.cpu_misses += 1
                wait[1][l] += self.cpu_end - now
                ready[s] = float("inf")  # until its copy, queued behind the speculative ones, lands
                link.speculate(p, s, l, now)
                continue
            done = ready[s] = link.demand(now)
            wait[1][l] += done - now
            ends = max(ends, done)
        wait[2][l] += max(ends, self.cpu_done) - now
        return ends, where

    def decide(self, table: SlotTable, planned: tuple[int, list[int]], calibration, until_s: float,
               slots: int, top_k: int, better_s: float = float("inf")) -> list[int]:
        """`speculate`'s choice among the planned predictions, at most the target row's `slots`, from the link's
        backlog at `now` (after this row's demand copies, which the row waits for before `until_s` and
        `better_s` start)."""
        row, predicted = planned
        ranked = candidates([predicted], calibration, table.uses_of(row))
        demand = max(0.0, self.link.demand_end - self.now)
        return [e for e, _ in decide_row(table, row, ranked, top_k, self.copy_s, self.link.backlog(self.now),
                                         until_s + demand, slots, better_s + demand)]

    def prefetch(self, table: SlotTable, row: int, predicted: list[int]) -> None:
        """Issue `predicted` into `row` at `now`, after the demand copies; a copy into a slot waits for
        its last reader to end."""
        inserted, into, _ = table.prefetch_row(row, predicted)
        p = self.pool_of[row]
        for new, s in zip(inserted, into, strict=True):
            if new:
                self.link.cancel(p, s)
                self.ready_at[p][s] = float("inf")
                self.link.speculate(p, s, row, max(self.now, self.free_at[p][s]))


def _figures_of(table: SlotTable, clock: _Clock, T: int, K: int) -> dict:
    """`simulate_timed`'s counts, shares and per-token figures, in total and per row."""
    count, wait = np.array(clock.count, np.float64), np.array(clock.wait)  # [3, L] each
    prefetched = np.array(table.prefetch_copies, np.float64)  # [L]: copies into each row
    L, now = count.shape[1], clock.now
    span, tokens = max(now, clock.link.finish()), max(T, 1)
    row_accesses = max(T * K, 1)

    def figures(c: np.ndarray, w: np.ndarray, accesses: int) -> dict:
        """The shares of `accesses` and the per-token waits of counts c [3] and waits w [3]."""
        return {**{name: float(c[i]) / accesses for i, name in enumerate(OUTCOMES)},
                "late_wait_s": float(w[0]) / tokens, "miss_wait_s": float(w[1]) / tokens,
                "stall_s": float(w[2]) / tokens, "demand_copies": float(c[2]) / tokens}

    return {
        "hits": int(sum(table.hits)), "per_layer_hits": table.hits,
        "prefetch_copies": int(prefetched.sum()), "prefetch_hits": int(sum(table.prefetch_hits)),
        **figures(count.sum(1), wait.sum(1), row_accesses * L),
        "demand_copies": (float(count[2].sum()) - clock.cpu_misses) / tokens,
        "prefetch_copies_per_token": float(prefetched.sum()) / tokens,
        "dropped": clock.link.dropped / tokens, "cpu_misses": clock.cpu_misses / tokens,
        "link_busy": clock.link.busy / span if span > 0 else 0.0,
        "cpu_busy": clock.cpu_busy / span if span > 0 else 0.0,
        "seconds_per_token": now / tokens, "tokens_per_s": T / now if now > 0 else 0.0,
        "per_layer": [{**figures(count[:, r], wait[:, r], row_accesses),
                       "prefetch_copies": float(prefetched[r]) / tokens} for r in range(L)],
    }


@dataclass
class TimedOptions:
    """`simulate --timed`'s flags: None takes the default named in `timed_costs`."""

    link_gbs: float | None = None
    layer_ms: float | None = None
    expert_quant: str | None = None
    profile: str | None = None


def timed_costs(trace: Trace, opts: TimedOptions) -> dict:
    """The copy and compute times of the cost model the tuner uses (`costs`):
    copy_s = one expert's bytes (the trace's model shape, `--expert-quant`, else the profile's
    expert_quant, else none: the fp16 size) over the link (`--link-gbs`, else the profile's
    [hardware] h2d_bytes_per_s, else tune's default); layer_s = the cost model's compute of one
    token (dense weights and L*K experts) over the rows, or `--layer-ms`."""
    if opts.link_gbs is not None and not opts.link_gbs > 0:
        raise UserError(f"--link-gbs {opts.link_gbs}: give the link speed in GB/s, above 0")
    if opts.layer_ms is not None and not opts.layer_ms >= 0:
        raise UserError(f"--layer-ms {opts.layer_ms}: give the compute time of one layer in ms, 0 or more")
    # here, not at the top: the cost model needs torch, which `simulate` without --timed starts without
    from .costs import PRECISIONS, hardware_of, model_shape

    profile = load_profile(opts.profile) if opts.profile else None
    quant = opts.expert_quant or (profile.settings.get("expert_quant") if profile else None) or "none"
    if quant not in PRECISIONS:
        raise UserError(f"--expert-quant {quant!r}: choose from {', '.join(PRECISIONS)}")
    hw = hardware_of(profile)
    if opts.link_gbs is not None:
        hw["h2d_bytes_per_s"] = opts.link_gbs * 1e9
    config = model_shape(trace)
    times = replay_times(config, hw, quant)
    if opts.layer_ms is not None:
        times["layer_s"] = opts.layer_ms / 1e3
    return {**times, "expert_quant": quant, "h2d_bytes_per_s": hw["h2d_bytes_per_s"],
            "layer_from": "--layer-ms" if opts.layer_ms is not None else "the tuner's cost model",
            "shape": "the trace's" if trace.metadata.get("config") else "Mixtral-8x7B's (the trace records none)"}


def replay_times(config, hw: dict, precision: str, attention: str = "none", group_size: int | None = None) -> dict:
    """The timed replay's times from the cost model (`costs`) for experts in `precision`: {"copy_s" (one expert's
    bytes over the link), "layer_s" (one token's compute, dense weights and L*K experts, over the rows), "cpu_s"
    (one expert's forward on the CPU), "expert_bytes"}."""
    from ..formats.registry import bytes_per_expert  # here: torch, which `simulate` without --timed starts without
    from .costs import expert_seconds, step_seconds

    nbytes = bytes_per_expert(config, precision, group_size)
    compute = step_seconds(config, nbytes, hw, 0, 0, "fetch", attention, group_size or 64, precision)  # no copies
    return {"copy_s": nbytes / hw["h2d_bytes_per_s"], "layer_s": compute / config.n_moe_layers,
            "cpu_s": expert_seconds(config, nbytes, hw, precision)[1], "expert_bytes": nbytes}


def trace_lead(trace: Trace) -> int:
    """The prefetch lead the trace was recorded with (metadata `prefetch_lead`), else 1."""
    raw = trace.metadata.get("prefetch_lead", "1")
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"the trace's prefetch_lead {raw!r} is not a whole number of rows") from None


def run_timed(trace: Trace, sizes: list[int], policy: str, costs: dict, pool: str = "layer") -> dict:
    """`simulate --timed`: at every cache size, the timed replay with the trace's predictions (when it
    has any; chosen by `speculate` as the engine did where the trace carries its predictor's calibration, with
    the deeper leads of a predictor file replayed by `simulate --predictor`: `deeper_of`) and without prefetch,
    in `pool`. Returns `costs` with "policy", "lead" and "results" (a list of
    `simulate_timed` results, with prefetch then without at each size)."""
    if policy not in ONLINE_POLICIES:
        raise UserError(f"--timed replays an online policy ({', '.join(ONLINE_POLICIES)}), the engine's; "
                        f"add one to --policy")
    lead = trace_lead(trace)
    runs = ([trace.predicted] if (trace.predicted >= 0).any() else []) + [None]
    after = trace.tensors.get("predicted_after")
    calibration = trace.tensors.get("calibration")  # recorded with a calibrated predictor: the engine's decision
    deeper = deeper_of(trace) if calibration is not None else []  # a predictor file's deeper leads (--predictor)
    results = [simulate_timed(trace, s, policy, p, lead, costs["copy_s"], costs["layer_s"],
                              after=None if p is None else after, pool=pool,
                              calibration=None if p is None else calibration, deeper=() if p is None else deeper)
               for s in sizes for p in runs]
    return {**costs, "policy": policy, "lead": lead, "results": results}


def timed_report(timed: dict, layers: int) -> str:
    """The text table of `run_timed`'s result: totals per cache size with and without prefetch, then
    each layer's ready/late/missed shares per size (with prefetch where the trace has predictions)."""
    results = timed["results"]
    lines = ["", f"timed replay, {timed['policy']}: one link carries one copy at a time, demand copies first "
             "(speculative ones passed, stale ones dropped); "
             f"copy {1e3 * timed['copy_s']:.3f} ms per expert ({timed['expert_bytes'] / 1e6:.2f} MB, experts "
             f"{timed['expert_quant']}, {timed['shape']} shape, over {timed['h2d_bytes_per_s'] / 1e9:.1f} GB/s), "
             f"compute {1e3 * results[0]['layer_s'][0]:.3f} ms per layer ({timed['layer_from']})",
             f"{'slots':>6}{'prefetch':>10}{'ready':>8}{'late':>8}{'missed':>8}{'wait ms/tok':>13}{'stall ms/tok':>14}"
             f"{'link busy':>11}{'ms/tok':>9}{'tok/s':>9}  copies/tok demand+prefetch (dropped)"]
    for r in results:
        lines.append(f"{str(r['slots']):>6}{'lead ' + str(r['lead']) if r['lead'] else 'none':>10}"
                     + "".join(f"{100 * r[k]:>7.1f}%" for k in OUTCOMES)
                     + f"{1e3 * (r['late_wait_s'] + r['miss_wait_s']):>13.3f}{1e3 * r['stall_s']:>14.3f}"
                     f"{100 * r['link_busy']:>10.1f}%{1e3 * r['seconds_per_token']:>9.3f}{r['tokens_per_s']:>9.1f}"
                     f"  {r['demand_copies']:.2f}+{r['prefetch_copies_per_token']:.2f} ({r['dropped']:.2f})")
    shown = [r for r in results if r["lead"]] or results
    mode = f"lead {shown[0]['lead']}" if shown[0]["lead"] else "no prefetch"
    lines += ["", f"per layer, ready/late/missed % ({mode})",
              f"{'layer':>6}" + "".join(f"{str(r['slots']) + ' slots':>18}" for r in shown)]
    for layer in range(layers):
        cells = ["/".join(f"{100 * r['per_layer'][layer][k]:.0f}" for k in OUTCOMES) for r in shown]
        lines.append(f"{layer:>6}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)
