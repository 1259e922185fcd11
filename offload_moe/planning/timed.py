"""Replay a trace in modelled time: is a prefetched expert's copy done when its layer needs it?

`simulate` counts hits; a hit on an expert whose copy is still crossing the link saves only part
of a miss. Here the trace goes token by token, row by row (a row: one MoE layer's cache), through
one `eviction.SlotTable` with the engine's per-step calls in the engine's order, so the hit counts are
`simulate`'s with the same predictions (`link` "fifo"), and a clock runs beside them:

  * one host-to-device link carries one expert copy at a time, each copy `copy_s` seconds. `link`
    "fifo": first issued first served. That is pessimistic for demand copies: on CUDA they have their
    own higher-priority stream (prefetch.py, rule 2), though they share the copy engine. `link`
    "demand-first": as the engine's emulated link serves them (prefetch.py, rules 7-9), a demand copy
    goes ahead of every speculative copy not landed yet (each of those lands `copy_s` later), and a
    speculative copy not landed is dropped, giving its remaining link time back, when its row's
    routing is known and does not use it (its slot emptied: `SlotTable.vacate`, so the hit counts may
    differ from `simulate`'s) or when another copy fills its slot;
  * row l of token t starts at `now`, and its experts are needed at `now`. An accessed expert is
    ready (resident, its copy done by `now`), late (resident, its copy finishing later: the wait is
    that finish - now) or missed (not resident: a demand copy issued at `now`, queued on the link,
    waited for until it lands);
  * the row ends at max(now, the latest needed copy's finish) + layer_s[l]: the compute waits for
    every copy first, pessimistic again (the engine runs the resident experts while the others land);
  * then the prefetches issued at this row go on the link, issued at `now` (the row's start), after
    its demand copies: the prediction for row l + lead of this token, or, past the last row, for row
    l + lead - L of the next token (the engine predicts `lead` rows ahead, wrapping to the next
    token). A copy into a slot also waits until the last row that read the slot has ended (only a
    prefetch of lead L, for this row of the next token, can meet that).

Predictions are `predicted[t, l, :]`, ranked, -1 padded, any width P (cut to the row's slot count:
a prediction never evicts its own experts). With a pool shared by every row (`pool` "global") the slots and
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
from ..profiles import load_profile
from .replay import check_pool, slots_per_layer
from .trace import Trace

OUTCOMES = ("ready", "late", "missed")
LINKS = ("fifo", "demand-first")  # how the link orders copies (the module docstring)


def simulate_timed(trace: Trace, slots: int | list[int], policy: str, predicted: np.ndarray | None, lead: int,
                   copy_s: float, layer_s: float | Sequence[float], seed: int = 0, after: np.ndarray | None = None,
                   pool: str = "layer", link: str = "fifo") -> dict:
    """Replay `trace` in modelled time (see the module docstring); `predicted` [T, L, P] or None (no
    prefetch); `after` [L, P]: the predictions the last token issued for a token that never came (the
    trace's `predicted_after`), prefetched as the engine did; `pool` "global": the slots' sum shared by every
    row (each access told the prefetch decided at its row's entry, as the engine's); `link`: one of LINKS.
    Returns {"policy", "slots", "lead" (0 without prefetch), "copy_s", "layer_s" [L], "hits", "per_layer_hits",
    "prefetch_copies",
    "prefetch_hits" (the table's counts, as `simulate`),
    "ready", "late", "missed" (shares of all accesses), "late_wait_s", "miss_wait_s" (per token: the
    waits of every late or missed access, summed), "stall_s" (per token: what the rows waited for
    copies, the latest copy per row), "demand_copies", "prefetch_copies_per_token" (per token),
    "prefetch_dropped" (per token), "link_busy" (share of the modelled time the link carried a copy),
    "seconds_per_token",
    "tokens_per_s", "per_layer" [L] {the same shares (of that row's accesses) and per-token figures,
    "prefetch_copies" (per token, into that row)}}.
    """
    T, L, K = trace.experts.shape
    check_pool(pool)
    if link not in LINKS:
        raise UserError(f"unknown link order {link!r}; choose from {', '.join(LINKS)}")
    per_layer = slots_per_layer(slots, trace)
    layer_s = _checked(trace, policy, predicted, lead, copy_s, layer_s)
    shared = pool == "global"
    table = SlotTable([sum(per_layer)] if shared else per_layer, trace.num_experts, policy, seed,
                      layers=L if shared else 1)
    experts = trace.experts.tolist()  # [T][L][K]: the loop reads Python lists
    preds = _issued(predicted, after, per_layer)
    clock = _Clock([sum(per_layer)] if shared else per_layer, [0] * L if shared else list(range(L)), copy_s,
                   link == "demand-first")
    for t in range(T):
        for l in range(L):  # noqa: E741 (a row, as in the legend)
            target, tt = (l + lead, t) if l + lead < L else (l + lead - L, t + 1)
            planned = (target, preds[tt][target]) if preds is not None and tt < len(preds) else None
            if clock.preempt:
                clock.drop_stale(table, l, experts[t][l])
            ends, where = clock.access(table, l, experts[t][l], planned)
            ends += layer_s[l]
            for s in where:
                clock.free_at[clock.pool_of[l]][s] = ends
            if planned is not None:
                clock.prefetch(table, *planned)
            clock.now = ends
    out = {"policy": policy, "slots": slots if isinstance(slots, int) else per_layer,
           "lead": lead if predicted is not None else 0, "copy_s": float(copy_s), "layer_s": layer_s}
    return {**out, **_figures_of(table, clock, T, K)}


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


def _issued(predicted: np.ndarray | None, after: np.ndarray | None, per_layer: list[int]
            ) -> list[list[list[int]]] | None:
    """The prefetches each token issues per row, cut to the row's slots, as Python lists [T(+1)][L][<=S];
    `after`'s, for token T (never accessed), last. None without prefetch."""
    if predicted is None:
        return None
    preds = [[p[:n] for p, n in zip(tok, per_layer, strict=True)] for tok in predicted.tolist()]
    if after is not None:
        preds.append([p[:n] for p, n in zip(after.tolist(), per_layer, strict=True)])
    return preds


class _Clock:
    """The modelled time beside the table: when each slot's copy lands, when its last reader ends, the
    link, the current row's start, and the outcome counts and waits per row."""

    def __init__(self, sizes: list[int], pool_of: list[int], copy_s: float, preempt: bool):
        L = len(pool_of)
        self.preempt = preempt  # link "demand-first"
        self.copy_s, self.pool_of = copy_s, pool_of  # each row's pool (its own, or the one shared)
        self.ready_at = [[0.0] * n for n in sizes]  # [pools][S]: when the copy into each slot finishes
        self.free_at = [[0.0] * n for n in sizes]  # [pools][S]: when the last row that read each slot ends
        self.count = [[0] * L for _ in OUTCOMES]  # [3][L]: ready, late, missed per row
        self.wait = [[0.0] * L for _ in range(3)]  # [3][L]: late waits, miss waits, stall per row
        self.link = self.now = 0.0  # when the link is free; the current row's start
        self.demand = 0.0  # when the link is free of demand copies (they pass speculative ones)
        self.queued: dict[tuple[int, int], list] = {}  # (pool, slot) -> [row, expert] of a speculative copy not landed
        self.dropped, self.returned = 0, 0.0  # copies dropped, the link seconds they gave back

    def access(self, table: SlotTable, l: int, experts: list[int], planned=None) -> tuple[float, list[int]]:  # noqa: E741
        """Row l's accesses at `now`, demand copies queued on the link (`planned`: the prefetch decided at its
        entry): (when the latest needed copy lands, or now; the slots the row reads)."""
        hit, where, _ = table.access_row(l, experts, pending=planned)
        p, now = self.pool_of[l], self.now
        ready = self.ready_at[p]
        count, wait, ends = self.count, self.wait, now
        for k, s in enumerate(where):
            if hit[k]:
                done = ready[s]
                late = done > now
                count[late][l] += 1
                wait[0][l] += done - now if late else 0.0
            else:  # the evicted slot held no expert of this access: its readers have ended
                if self.preempt:
                    self._drop(p, s)
                    done = ready[s] = self.demand = max(now, self.demand) + self.copy_s
                    self._pass(done - self.copy_s)
                else:
                    done = ready[s] = self.link = max(now, self.link) + self.copy_s
                count[2][l] += 1
                wait[1][l] += done - now
            ends = max(ends, done)
        wait[2][l] += ends - now
        return ends, where

    def prefetch(self, table: SlotTable, row: int, predicted: list[int]) -> None:
        """Issue `predicted` into `row` at `now`, after the demand copies; a copy into a slot waits for
        its last reader to end."""
        inserted, into, _ = table.prefetch_row(row, predicted)
        p = self.pool_of[row]
        ready, free = self.ready_at[p], self.free_at[p]
        for k, (new, s) in enumerate(zip(inserted, into, strict=True)):
            if new:
                if self.preempt:
                    self._drop(p, s)
                    self.queued[p, s] = [row, predicted[k]]
                ready[s] = self.link = max(self.now, self.link, free[s]) + self.copy_s

    def drop_stale(self, table: SlotTable, l: int, experts: list[int]) -> None:  # noqa: E741
        """Row l's routing is known at `now`: drop its speculative copies not landed of experts it does not use,
        emptying their slots."""
        p = self.pool_of[l]
        for (q, s), (row, e) in list(self.queued.items()):
            if self.ready_at[q][s] <= self.now:  # landed
                del self.queued[q, s]
            elif q == p and row == l and e not in experts and self._drop(p, s):
                table.vacate(l, e)

    def _drop(self, p: int, s: int) -> bool:
        """Drop the speculative copy into slot s of pool p if it has not landed by `now`; its remaining link time
        comes back to the copies after it."""
        if self.queued.pop((p, s), None) is None or self.ready_at[p][s] <= self.now:
            return False
        end = self.ready_at[p][s]
        back = min(self.copy_s, end - self.now)
        for q, t in self.queued:
            if self.ready_at[q][t] > end:
                self.ready_at[q][t] -= back
        self.link = max(self.link - back, self.demand)
        self.ready_at[p][s] = self.now
        self.dropped += 1
        self.returned += back
        return True

    def _pass(self, start: float) -> None:
        """A demand copy takes the link from `start`: the speculative copies not landed by then land later."""
        for q, t in self.queued:
            if self.ready_at[q][t] > start:
                self.ready_at[q][t] += self.copy_s
        self.link = max(self.link, start) + self.copy_s


def _figures_of(table: SlotTable, clock: _Clock, T: int, K: int) -> dict:
    """`simulate_timed`'s counts, shares and per-token figures, in total and per row."""
    count, wait = np.array(clock.count, np.float64), np.array(clock.wait)  # [3, L] each
    prefetched = np.array(table.prefetch_copies, np.float64)  # [L]: copies into each row
    L, now, copy_s = count.shape[1], clock.now, clock.copy_s
    span, tokens = max(now, clock.link), max(T, 1)
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
        "prefetch_copies_per_token": float(prefetched.sum()) / tokens, "prefetch_dropped": clock.dropped / tokens,
        "link_busy": (copy_s * float(count[2].sum() + prefetched.sum()) - clock.returned) / span if span > 0 else 0.0,
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
    from ..formats.registry import bytes_per_expert
    from .costs import PRECISIONS, hardware_of, model_shape, step_seconds

    profile = load_profile(opts.profile) if opts.profile else None
    quant = opts.expert_quant or (profile.settings.get("expert_quant") if profile else None) or "none"
    if quant not in PRECISIONS:
        raise UserError(f"--expert-quant {quant!r}: choose from {', '.join(PRECISIONS)}")
    hw = hardware_of(profile)
    if opts.link_gbs is not None:
        hw["h2d_bytes_per_s"] = opts.link_gbs * 1e9
    config = model_shape(trace)
    nbytes = bytes_per_expert(config, quant)
    compute = step_seconds(config, nbytes, hw, 0, 0, "fetch", precision=quant)  # no copies: the compute term
    return {"copy_s": nbytes / hw["h2d_bytes_per_s"], "expert_bytes": nbytes, "expert_quant": quant,
            "h2d_bytes_per_s": hw["h2d_bytes_per_s"],
            "layer_s": opts.layer_ms / 1e3 if opts.layer_ms is not None else compute / config.n_moe_layers,
            "layer_from": "--layer-ms" if opts.layer_ms is not None else "the tuner's cost model",
            "shape": "the trace's" if trace.metadata.get("config") else "Mixtral-8x7B's (the trace records none)"}


def trace_lead(trace: Trace) -> int:
    """The prefetch lead the trace was recorded with (metadata `prefetch_lead`), else 1."""
    raw = trace.metadata.get("prefetch_lead", "1")
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"the trace's prefetch_lead {raw!r} is not a whole number of rows") from None


def run_timed(trace: Trace, sizes: list[int], policy: str, costs: dict, pool: str = "layer") -> dict:
    """`simulate --timed`: at every cache size, the timed replay with the trace's predictions (when it
    has any) and without prefetch, in `pool`. Returns `costs` with "policy", "lead" and "results" (a list of
    `simulate_timed` results, with prefetch then without at each size)."""
    if policy not in ONLINE_POLICIES:
        raise UserError(f"--timed replays an online policy ({', '.join(ONLINE_POLICIES)}), the engine's; "
                        f"add one to --policy")
    lead = trace_lead(trace)
    runs = ([trace.predicted] if (trace.predicted >= 0).any() else []) + [None]
    after = trace.tensors.get("predicted_after")
    results = [simulate_timed(trace, s, policy, p, lead, costs["copy_s"], costs["layer_s"],
                              after=None if p is None else after, pool=pool) for s in sizes for p in runs]
    return {**costs, "policy": policy, "lead": lead, "results": results}


def timed_report(timed: dict, layers: int) -> str:
    """The text table of `run_timed`'s result: totals per cache size with and without prefetch, then
    each layer's ready/late/missed shares per size (with prefetch where the trace has predictions)."""
    results = timed["results"]
    lines = ["", f"timed replay, {timed['policy']}: one link carries one copy at a time, first issued first served; "
             f"copy {1e3 * timed['copy_s']:.3f} ms per expert ({timed['expert_bytes'] / 1e6:.2f} MB, experts "
             f"{timed['expert_quant']}, {timed['shape']} shape, over {timed['h2d_bytes_per_s'] / 1e9:.1f} GB/s), "
             f"compute {1e3 * results[0]['layer_s'][0]:.3f} ms per layer ({timed['layer_from']})",
             f"{'slots':>6}{'prefetch':>10}{'ready':>8}{'late':>8}{'missed':>8}{'wait ms/tok':>13}{'stall ms/tok':>14}"
             f"{'link busy':>11}{'ms/tok':>9}{'tok/s':>9}  copies/tok demand+prefetch"]
    for r in results:
        lines.append(f"{str(r['slots']):>6}{'lead ' + str(r['lead']) if r['lead'] else 'none':>10}"
                     + "".join(f"{100 * r[k]:>7.1f}%" for k in OUTCOMES)
                     + f"{1e3 * (r['late_wait_s'] + r['miss_wait_s']):>13.3f}{1e3 * r['stall_s']:>14.3f}"
                     f"{100 * r['link_busy']:>10.1f}%{1e3 * r['seconds_per_token']:>9.3f}{r['tokens_per_s']:>9.1f}"
                     f"  {r['demand_copies']:.2f}+{r['prefetch_copies_per_token']:.2f}")
    shown = [r for r in results if r["lead"]] or results
    mode = f"lead {shown[0]['lead']}" if shown[0]["lead"] else "no prefetch"
    lines += ["", f"per layer, ready/late/missed % ({mode})",
              f"{'layer':>6}" + "".join(f"{str(r['slots']) + ' slots':>18}" for r in shown)]
    for layer in range(layers):
        cells = ["/".join(f"{100 * r['per_layer'][layer][k]:.0f}" for k in OUTCOMES) for r in shown]
        lines.append(f"{layer:>6}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)
