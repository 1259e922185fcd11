"""The offload-policy tuner: search the offload settings for a trace and a device budget, and write
the winner as a profile.

The tuner searches expert precision (which sets how many slots fit the budget), attention precision
(int8 attention frees device memory for slots and reads fewer bytes per token), prefetch depth,
miss handling, eviction policy, slot pool (per layer, or one pool of their sum shared by every layer),
and slots per layer (uniform, or spread by per-layer hit curves), each candidate's step time from the
closed-form cost model (`costs`). For one sequence (batch 1) the timed replay then judges (`judge`): at the
cost model's best layout and the default's, every prefetch option (none, each source of predictions at a
fixed width, the cost-aware decision), width and miss policy is replayed in modelled time, and the fastest
of those is the winner, "none" where no prefetch pays (a batch keeps the cost model: the timed replay models
one sequence). It reports the best against the default (uniform slots, the engine's default policy and
pool, no prefetch, miss policy fetch), one lever at a time. The hit curves are replayed in order of worth (the
default's first, then the engine's defaults, then the rest) within a time budget (`budget_s`); what the
budget leaves out is said.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UserError
from ..formats.registry import auto_group_size, bytes_per_expert
from ..memory import gib, resident_bytes
from ..offload.eviction import ONLINE_POLICIES, POOLS
from ..offload.predictors import replayed
from ..options import ATTENTION_QUANTS, DEFAULT_RESERVE, default_of
from ..profiles import Profile
from ..progress import progress_bar
from .batch_replay import simulate_batch
from .candidate import Candidate
from .costs import PRECISIONS, rate_notes, step_cost
from .judge import judge
from .replay import simulate, simulate_many
from .trace import Trace


def replay(trace: Trace, slots: int | list[int], policy: str, prefetch: int, batch: int, predictor: str = "",
           pool: str = "layer") -> dict:
    """One cache configuration run over `trace`: token by token, or as `batch` streams (`batch_replay`); with
    prefetch (its lead; any > 0 replays the predictions) those the trace recorded, or `predictor`'s."""
    if predictor:
        trace = replayed(trace, predictor, trace.top_k)
    prefetch = min(prefetch, 1)
    if batch == 1:
        return simulate(trace, slots, policy, prefetch, pool=pool)
    return simulate_batch(trace, slots, policy, batch, prefetch, pool=pool)


def prediction_options(trace: Trace, predictors: Sequence[str]) -> list[tuple[int, str, Trace]]:
    """(prefetch lead, predictor file or "", the trace with those predictions) for each way to prefetch: none,
    the recorded predictions (when there are some), and each predictor file's (as the engine makes them:
    `predictors.replayed`'s default width)."""
    out = [(0, "", trace)]
    if (trace.predicted >= 0).any():
        out.append((int(trace.metadata.get("prefetch_lead", 1)), "", trace))
    for path in predictors:
        variant = replayed(trace, path)
        out.append((int(variant.metadata["prefetch_lead"]), path, variant))
    return out


TUNE_SIZES = 16  # at most this many cache sizes per layer are simulated and spread (all of them up to 16)


def tune_sizes(top_k: int, num_experts: int, most: int = TUNE_SIZES) -> list[int]:
    """The cache sizes per layer the tuner simulates: every one from top-k to E when they are at most `most`
    (Mixtral: 2..8), else `most` of them spaced geometrically from top-k to E (Qwen3-30B-A3B: 8, 9, 10,
    12, ..., 128), so that a model of 128 or 256 experts costs what one of 16 does."""
    if num_experts - top_k + 1 <= most:
        return list(range(top_k, num_experts + 1))
    grid = np.geomspace(top_k, num_experts, most)
    return sorted({top_k, num_experts, *(int(round(x)) for x in grid)})


def spread_slots(hits: dict[int, list[int]], total: int, top_k: int, num_experts: int) -> list[int]:
    """Slots per layer maximising total hits for `total` slots, each layer's count one of the sizes in
    `hits` (from top-k to E); hits[s][l] = layer l's hits with s slots.

    Layer caches are independent, so this is a knapsack over layers (exact dynamic programming, one
    numpy pass per layer and size over every total: L x sizes x L*E steps). Of equal optima it takes the
    one with the fewest slots, and per layer the smallest size.
    """
    sizes = sorted(s for s in hits if top_k <= s <= num_experts)
    L = len(hits[sizes[0]])
    total = min(total, L * num_experts)
    best = np.full(total + 1, -1, dtype=np.int64)  # [slots used] -> hits so far; -1: not reachable
    best[0] = 0
    picks = np.zeros((L, total + 1), dtype=np.int64)  # [layer, slots used] -> that layer's size
    for layer in range(L):
        nxt = np.full(total + 1, -1, dtype=np.int64)
        for s in sizes:
            if s > total:
                break
            prev = best[: total + 1 - s]  # [total+1-s]: reached with u - s slots
            cand = np.where(prev >= 0, prev + hits[s][layer], -1)
            better = cand > nxt[s:]  # strictly: the smaller size keeps a tie
            nxt[s:][better] = cand[better]
            picks[layer, s:][better] = s
        best = nxt
    if (best < 0).all():
        raise UserError(f"the budget gives {total} slots, fewer than top-k ({top_k}) per layer")
    used = int(np.argmax(best))  # the first maximum: the fewest slots
    alloc = []
    for layer in reversed(range(L)):
        alloc.append(int(picks[layer, used]))
        used -= alloc[-1]
    return alloc[::-1]


def tune(trace: Trace, config: ModelConfig, budget: int, hw: dict, reserve: int = int(DEFAULT_RESERVE),
         context: int = 4096, policies: Sequence[str] = ONLINE_POLICIES, log=print, batch: int = 1,
         predictors: Sequence[str] = (), pools: Sequence[str] = POOLS, budget_s: float | None = None
         ) -> tuple[Candidate, Candidate, list[Candidate]]:
    """Search the offload settings for `trace` on a device of `budget` bytes, for `batch` sequences decoding
    together (the trace replayed as B streams, `batch_replay.simulate_batch`; their KV cache off the budget);
    prefetch: none, the trace's recorded predictions, and each of `predictors` (train-predictor files, each
    with its own lead: the depth); every policy of `policies` in every pool of `pools`, the replays within
    `budget_s` seconds (None: no limit). Returns (best, default, all)."""
    if batch < 1:
        raise UserError("--batch must be 1 or more")
    if trace.num_layers != config.n_moe_layers or trace.num_experts != config.num_experts:
        raise UserError(f"the trace has {trace.num_layers} layers x {trace.num_experts} experts; the model shape has "
                        f"{config.n_moe_layers} x {config.num_experts}")
    deadline = None if budget_s is None else time.perf_counter() + budget_s  # the hit curves' and the judge's
    curves = _hit_curves(trace, config, policies, predictors, batch, pools, deadline, log)
    for note in rate_notes(hw):
        log(note)
    out: list[Candidate] = []
    for attention, precision in [(a, p) for a in ATTENTION_QUANTS for p in PRECISIONS]:
        group = auto_group_size(config, experts=precision != "none", attention=attention != "none")
        if group is None:  # the engine's own choice when no --group-size is given; None: no allowed size divides
            log(f"  {precision:<5} attn {attention:<4} skipped: no group size divides D={config.dim}, "
                f"I={config.ffn_dim} and the attention inputs {', '.join(map(str, config.attention_inputs))}")
            continue
        dense = resident_bytes(config, torch.float16, group if attention == "int8" else None)
        free = budget - reserve - dense - config.kv_bytes(context, 2) * batch
        total = int(free // bytes_per_expert(config, precision, group, torch.float16))
        if total < config.top_k * config.n_moe_layers:
            log(f"  {precision:<5} attn {attention:<4} does not fit: {gib(max(free, 0))} left for experts holds "
                f"{max(total, 0)} slots, top-k needs {config.top_k * config.n_moe_layers}")
            continue
        out += _candidates(curves, config, hw, trace.num_tokens, total, precision, attention, group, batch)
    if not out:
        dense = resident_bytes(config, torch.float16, group)
        raise UserError(f"nothing fits a {gib(budget)} device: dense weights and KV cache take at least "
                        f"{gib(dense + config.kv_bytes(context, 2) * batch)} plus {gib(reserve)} reserve")
    best = min(out, key=lambda c: c.seconds_per_token)
    policy, pool = _default_setting(policies, pools)
    default = next((c for c in out if c.policy == policy and c.pool == pool and c.prefetch == 0
                    and c.miss_policy == "fetch" and len(set(c.slots)) == 1 and c.precision == best.precision
                    and c.attention == "none"), best)
    if batch == 1:  # the timed replay models one sequence decoding: there it judges prefetch and miss handling
        best, default, timed = _judged(curves, config, hw, best, default, deadline, log)
        out += timed
    return best, default, out


def _judged(curves: Curves, config: ModelConfig, hw: dict, best: Candidate, default: Candidate,
            deadline: float | None = None, log=print) -> tuple[Candidate, Candidate, list[Candidate]]:
    """Every prefetch option, width and miss policy (`judge`) at the cost model's best layout and the default's,
    in the timed replay: the default's layout in full, the best's until `deadline` (`time.perf_counter`'s), what
    that leaves out logged. Returns (the fastest, the default's layout without prefetch and with fetch, all)."""
    timed: list[Candidate] = []
    layouts = {(c.precision, c.attention, tuple(c.slots), c.policy, c.pool): c for c in (default, best)}
    left = 0
    for layout in layouts.values():
        sources = sorted(((lead, predictor, source) for (policy, lead, predictor, pool), (source, _) in curves.items()
                          if policy == layout.policy and pool == layout.pool), key=lambda s: s[0] != 0)
        scored, skipped = judge(layout, sources, config, hw, None if not timed else deadline)
        timed, left = timed + scored, left + skipped
    if left:
        log(f"  --budget-s spent: {left} timed replays of prefetch and miss options not run")
    fastest = min(timed, key=lambda c: c.seconds_per_token)  # the first of equal times: no prefetch, fetch
    base = next(c for c in timed if (c.precision, c.attention, c.slots, c.policy, c.pool, c.prefetch, c.miss_policy)
                == (default.precision, default.attention, default.slots, default.policy, default.pool, 0, "fetch"))
    return fastest, base, timed


Curves = dict[tuple[str, int, str, str], tuple[Trace, dict[int, dict]]]  # (policy, lead, predictor, pool) -> runs


def _default_setting(policies: Sequence[str], pools: Sequence[str]) -> tuple[str, str]:
    """The policy and pool the default candidate runs: the engine's defaults, where they are searched."""
    policy, pool = default_of("policy"), default_of("slot_pool")
    return (policy if policy in policies else policies[0]), (pool if pool in pools else pools[0])


def _hit_curves(trace: Trace, config: ModelConfig, policies: Sequence[str], predictors: Sequence[str], batch: int,
                pools: Sequence[str], deadline: float | None, log) -> Curves:
    """Every policy, pool and way to prefetch replayed at each of `tune_sizes`: the hit curves the search spreads
    slots by, kept with the trace they replayed. In order of worth (the default's curve first, the engine's
    default policy and pool next), until `deadline` (`time.perf_counter`'s): the rest is logged as left out."""
    curves: Curves = {}
    sizes = tune_sizes(config.top_k, config.num_experts)
    policy, pool = _default_setting(policies, pools)
    ways = prediction_options(trace, predictors)
    work = [(q, w, p) for q in policies for w in ways for p in pools]
    work.sort(key=lambda job: (job[0] != policy or job[2] != pool or job[1][0] != 0, job[0] != policy,
                               job[2] != pool))  # stable: the given order after these
    for done, (policy, (prefetch, predictor, source), pool) in enumerate(
            progress_bar(work, "replaying the trace", len(work), "curve")):
        if done and deadline is not None and time.perf_counter() > deadline:
            left = sorted({f"{q} ({p})" for q, _, p in work[done:]})
            log(f"  --budget-s spent after {done} of {len(work)} replays; not searched: {', '.join(left)}")
            break
        results = simulate_many(source, sizes, policy, min(prefetch, 1), pool=pool) if batch == 1 else [
            replay(source, s, policy, prefetch, batch, pool=pool) for s in sizes]
        curves[policy, prefetch, predictor, pool] = source, dict(zip(sizes, results, strict=True))
    return curves


def _candidates(curves: Curves, config: ModelConfig, hw: dict, tokens: int, total: int, precision: str,
                attention: str, group: int, batch: int) -> list[Candidate]:
    """The candidates of one expert and attention precision with `total` slots: for each curve, the largest
    uniform size that fits and the spread allocation (when it differs), under each miss handling."""
    K, E, L = config.top_k, config.num_experts, config.n_moe_layers
    uniform = max(s for s in tune_sizes(K, E) if s <= min(total // L, E))  # the largest simulated size that fits
    out = []
    for (policy, prefetch, predictor, pool), (source, curve) in curves.items():
        hits = {s: r["per_layer_hits"] for s, r in curve.items()}
        allocations = [[uniform] * L]
        spread = spread_slots(hits, total, K, E) if pool == "layer" else allocations[0]  # a pool: the sum counts
        if spread != allocations[0]:
            allocations.append(spread)
        for alloc in allocations:
            r = curve[alloc[0]] if len(set(alloc)) == 1 else replay(source, alloc, policy, prefetch, batch)
            for miss in ("fetch", "cpu", "auto"):
                secs = step_cost(config, hw, r, tokens, precision, attention, group, miss)
                out.append(Candidate(precision, attention, group, alloc, policy, prefetch, miss,
                                     r["hit_rate"], secs, batch, predictor, pool))
    return out


def levers(default: Candidate, out: list[Candidate]) -> list[tuple[str, Candidate]]:
    """From the default, the best candidate that changes one lever only: what each lever is worth."""
    keys = ("precision", "attention", "policy", "pool", "prefetch", "miss_policy")

    def uniform(c: Candidate) -> bool:
        return len(set(c.slots)) == 1

    def only(c: Candidate, lever: str) -> bool:
        if not all(getattr(c, k) == getattr(default, k) for k in keys if k != lever):
            return False
        return not uniform(c) if lever == "slots" else uniform(c)

    rows = []
    for label, lever in (("eviction policy", "policy"), ("slot pool", "pool"), ("uneven slots", "slots"),
                         ("prefetch", "prefetch"),
                         ("miss handling", "miss_policy"), ("int8 attention", "attention")):
        same = [c for c in out if only(c, lever)]
        same = [c for c in same if c.scored == default.scored] or same  # like with like where there is one
        if same:
            rows.append((label, min(same, key=lambda c: c.seconds_per_token)))
    for precision in PRECISIONS:  # capacity: what each other precision gives, all else as the default
        same = [c for c in out if only(c, "precision") and c.precision == precision != default.precision]
        if same:
            rows.append((f"precision {precision}", same[0]))
    return rows


def to_toml(data: dict) -> str:
    """A flat TOML writer for profiles: scalars, lists of numbers, one level of tables."""
    def value(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def size_text(n: int) -> str:
    """Bytes as a profile writes them: 1.500GiB, 8.500MiB."""
    return f"{n / 2**30:.3f}GiB" if n >= 2**30 else f"{n / 2**20:.3f}MiB"


def winner_profile(best: Candidate, base: Profile, budget: int, reserve: int, hw: dict, trace_name: str,
                   resident: bool = False) -> str:
    """The winner as a profile; `resident`: every expert fits, so the profile keeps them all resident (no slots,
    policy or prefetch, and no predicted speed)."""
    data = {
        "description": f"tuned on {trace_name}: predicted {best.tokens_per_s:.2f} tok/s"
                       + (f" over {best.batch} sequences (serve --max-batch {best.batch})" if best.batch > 1 else "")
                       + f", hit rate {100 * best.hit_rate:.1f}%"
                       + (", prefetch decided by cost (a predictor file with a calibration)" if best.decided else ""),
        "device": base.settings.get("device", "cuda"),
        "dtype": base.settings.get("dtype", "float16"),
        "expert_quant": best.precision,
        "attention_quant": best.attention,
        "group_size": best.group_size,
        "cache_experts": best.slots[0] if len(set(best.slots)) == 1 else best.slots,
        "prefetch": best.prefetch,
        **({"prefetch_width": best.width} if best.prefetch and not best.decided else {}),
        **({"predictor": best.predictor} if best.predictor else {}),
        "policy": best.policy,
        "slot_pool": best.pool,
        "miss_policy": best.miss_policy,
        "context": base.settings.get("context", 4096),
        "budget": {"device": size_text(budget), "device_reserve": size_text(reserve), "ram": "auto"},
        "hardware": {k: v for k, v in hw.items()},
    }
    if resident:
        for key in ("cache_experts", "prefetch", "prefetch_width", "predictor", "policy", "slot_pool", "miss_policy"):
            data.pop(key, None)
        data["description"] = f"tuned on {trace_name}: every expert fits the budget, all resident"
    return to_toml(data)
