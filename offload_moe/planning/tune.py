"""Cost model, hardware calibration and the offload-policy tuner.

The cost model predicts the time of one decode step from a simulated cache run: one token's, or, with
a batch of B sequences decoding together (`--batch`), one step of all B (`batch_sim`'s replay: each
layer acquires the union of the B tokens' experts once, so more distinct experts per step, shared
by the rows that chose them). Decode is memory-bound; copies are bytes over the measured link
bandwidth, and an expert's compute is what `calibrate` measured for its format (one expert's decode
forward, as weights per second; an expert's weights are read once however many rows chose it):
  compute  = dense bytes / device bandwidth + X * expert_s      (expert_s = expert weights / measured rate;
                                                                 X = experts computed per step, L*K for one token)
  copy     = expert bytes / host-to-device bandwidth          (one miss or one prefetch)
  cpu      = expert weights / measured CPU rate               (one miss computed on the CPU)
A format's kernel decides its rate, not its bytes: int4 read as 0.56 bytes per weight by a real int4
kernel is fast, int4 rebuilt in fp16 (about 12.5 bytes of traffic per weight) is slower than fp16
itself. Where a profile's [hardware] has no measured rate for a format (`device_weights_per_s_int4`,
`cpu_weights_per_s_int4`, ...), the expert costs its bytes over the device (or CPU) bandwidth, the
assumption of a kernel that reads each byte once, and the tuner says so in its output.
With m demand misses and p prefetch copies per step (from the simulator):
  fetch: t = max(compute + m*copy, (m + p)*copy)    a demand miss stalls; prefetches overlap compute,
                                                   but the link carries every copy
  cpu:   t = max(compute + m*cpu,  (m + p)*copy)    the miss runs on the CPU; its copy still happens
  auto:  the faster of the two per miss (min(copy, cpu) in the first term)
and B / t tokens per second (aggregate over the batch). The KV cache of B sequences comes off the budget.
The tuner searches expert precision (which sets how many slots fit the budget), attention precision
(int8 attention frees device memory for slots and reads fewer bytes per token), prefetch depth,
miss handling, eviction policy, and slots per layer (uniform, or spread by per-layer hit curves),
and reports the best against the uniform-LRU default, one lever at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import UserError
from ..formats.int4_layouts import int4_layout_for
from ..formats.registry import auto_group_size, bytes_per_expert, expert_format
from ..formats.sizes import dense_bytes
from ..memory import gib
from ..options import ATTENTION_QUANTS, DEFAULT_RESERVE, parse_size
from ..profiles import Profile
from .batch_replay import simulate_batch
from .replay import simulate, simulate_many
from .trace import Trace

MIXTRAL_8X7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                           num_experts=8, top_k=2, vocab_size=32000)
PRECISIONS = ("none", "int8", "int4")
DEFAULT_HARDWARE = {"h2d_bytes_per_s": 25e9, "device_bytes_per_s": 800e9, "cpu_bytes_per_s": 40e9}


@dataclass
class Candidate:
    precision: str
    attention: str
    group_size: int
    slots: list[int]
    policy: str
    prefetch: int
    miss_policy: str
    hit_rate: float
    seconds_per_step: float  # one decode step of `batch` sequences
    batch: int = 1
    predictor: str = ""  # a train-predictor file whose predictions were replayed; "": the trace's recorded ones

    @property
    def seconds_per_token(self) -> float:
        return self.seconds_per_step / self.batch

    @property
    def tokens_per_s(self) -> float:
        """Aggregate over the batch."""
        return self.batch / self.seconds_per_step

    def describe(self) -> str:
        s = self.slots
        slots = str(s[0]) if len(set(s)) == 1 else f"{min(s)}-{max(s)} (sum {sum(s)})"
        return (f"{self.precision:<5} attn {self.attention:<4} slots {slots:<14} {self.policy:<6} "
                f"prefetch {self.prefetch}{' ' + Path(self.predictor).name if self.predictor else ''} "
                f"miss {self.miss_policy:<5} hit {100 * self.hit_rate:5.1f}%  "
                f"{self.tokens_per_s:7.2f} tok/s" + (f" ({1e3 * self.seconds_per_step:.2f} ms per step of {self.batch})"
                                                     if self.batch > 1 else ""))


def rate_key(where: str, precision: str) -> str:
    """The [hardware] key of a measured expert compute rate: where is "device" or "cpu"."""
    return f"{where}_weights_per_s_{precision}"


def expert_seconds(config: ModelConfig, expert_bytes: int, hw: dict, precision: str | None) -> tuple[float, float]:
    """(device, CPU) seconds of one expert's decode forward in `precision`: its weights over the rate
    `calibrate` measured for that format, else (no precision, or no such figure) its bytes over the
    device or CPU bandwidth."""
    rates = [hw.get(rate_key(where, precision)) if precision else None for where in ("device", "cpu")]
    return tuple(config.expert_params / rate if rate else expert_bytes / hw[f"{where}_bytes_per_s"]
                 for rate, where in zip(rates, ("device", "cpu"), strict=True))


def rate_notes(hw: dict, precisions=PRECISIONS) -> list[str]:
    """What the cost model assumes for lack of measured rates: one line per place, empty when none."""
    notes = []
    for where, bandwidth in (("device", "device_bytes_per_s"), ("cpu", "cpu_bytes_per_s")):
        missing = [p for p in precisions if not hw.get(rate_key(where, p))]
        if missing:
            keys = ", ".join(rate_key(where, p) for p in missing)
            notes.append(f"cost model: no measured {where} compute rate for {', '.join(missing)} ({keys}): falls back "
                         f"to their bytes over {bandwidth}, as if each format's kernel read its bytes once "
                         "(run `python run.py calibrate` on the target and put its [hardware] in the profile)")
    return notes


def step_seconds(config: ModelConfig, expert_bytes: int, hw: dict, misses: float, prefetches: float,
                 miss_policy: str, attention: str = "none", group_size: int = 64, precision: str | None = None,
                 experts: float | None = None) -> float:
    """Predicted seconds of one decode step with `misses` and `prefetches` copies (see the module docstring):
    `experts` computed in it (default L*K, one token's); `precision` ("none", "int8", "int4") selects the
    measured compute rates of `hw` (see `expert_seconds`)."""
    dense = dense_bytes(config, torch.float16, attention, group_size)  # fp16 resident weights
    expert_s, cpu = expert_seconds(config, expert_bytes, hw, precision)
    experts = config.n_moe_layers * config.top_k if experts is None else experts
    compute = dense / hw["device_bytes_per_s"] + experts * expert_s
    copy = expert_bytes / hw["h2d_bytes_per_s"]
    per_miss = {"fetch": copy, "cpu": cpu, "auto": min(copy, cpu)}[miss_policy]
    return max(compute + misses * per_miss, (misses + prefetches) * copy)


def replay(trace: Trace, slots: int | list[int], policy: str, prefetch: int, batch: int, predictor: str = "") -> dict:
    """One cache configuration run over `trace`: token by token, or as `batch` streams (`batch_sim`); with
    prefetch (its lead; any > 0 replays the predictions) those the trace recorded, or `predictor`'s."""
    if predictor:
        from ..offload.predictors import replayed

        trace = replayed(trace, predictor, trace.top_k)
    prefetch = min(prefetch, 1)
    if batch == 1:
        return simulate(trace, slots, policy, prefetch)
    return simulate_batch(trace, slots, policy, batch, prefetch)


def prediction_options(trace: Trace, predictors: Sequence[str]) -> list[tuple[int, str, Trace]]:
    """(prefetch lead, predictor file or "", the trace with those predictions) for each way to prefetch: none,
    the recorded predictions (when there are some), and each predictor file's (at the engine's width, top-k)."""
    from ..offload.predictors import replayed

    out = [(0, "", trace)]
    if (trace.predicted >= 0).any():
        out.append((int(trace.metadata.get("prefetch_lead", 1)), "", trace))
    for path in predictors:
        variant = replayed(trace, path, trace.top_k)
        out.append((int(variant.metadata["prefetch_lead"]), path, variant))
    return out


def step_cost(config: ModelConfig, hw: dict, r: dict, tokens: int, precision: str, attention: str, group_size: int,
              miss_policy: str) -> float:
    """Predicted seconds of one decode step from `replay`'s counts `r` over a trace of `tokens` tokens (a step
    is one token, or one forward of the batch), for experts in `precision`."""
    steps = r.get("forwards", tokens)
    nbytes = bytes_per_expert(config, precision, group_size, torch.float16)
    return step_seconds(config, nbytes, hw, r["misses"] / steps, r["prefetch_copies"] / steps, miss_policy,
                        attention, group_size, precision, r["accesses"] / steps)


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
         context: int = 4096, policies=("lru", "lfu", "fifo", "random"), log=print, batch: int = 1,
         predictors: Sequence[str] = ()) -> tuple[Candidate, Candidate, list[Candidate]]:
    """Search the offload settings for `trace` on a device of `budget` bytes, for `batch` sequences decoding
    together (the trace replayed as B streams, `batch_sim.simulate_batch`; their KV cache off the budget);
    prefetch: none, the trace's recorded predictions, and each of `predictors` (train-predictor files, each
    with its own lead: the depth). Returns (best, default, all)."""
    if batch < 1:
        raise UserError("--batch must be 1 or more")
    if trace.num_layers != config.n_moe_layers or trace.num_experts != config.num_experts:
        raise UserError(f"the trace has {trace.num_layers} layers x {trace.num_experts} experts; the model shape has "
                        f"{config.n_moe_layers} x {config.num_experts}")
    T = trace.experts.shape[0]
    K, E, L = config.top_k, config.num_experts, config.n_moe_layers

    curves: dict[tuple[str, int, str], tuple[Trace, dict[int, dict]]] = {}  # (policy, lead, predictor) -> slots
    for policy in policies:
        for prefetch, predictor, source in prediction_options(trace, predictors):
            sizes = tune_sizes(K, E)
            results = simulate_many(source, sizes, policy, min(prefetch, 1)) if batch == 1 else [
                replay(source, s, policy, prefetch, batch) for s in sizes]
            curves[policy, prefetch, predictor] = source, dict(zip(sizes, results, strict=True))

    for note in rate_notes(hw):
        log(note)
    out: list[Candidate] = []
    for attention, precision in [(a, p) for a in ATTENTION_QUANTS for p in PRECISIONS]:
        group = auto_group_size(config, experts=precision != "none", attention=attention != "none")
        if group is None:  # the engine's own choice when no --group-size is given; None: no allowed size divides
            log(f"  {precision:<5} attn {attention:<4} skipped: no group size divides D={config.dim}, "
                f"I={config.ffn_dim} and the attention inputs {', '.join(map(str, config.attention_inputs))}")
            continue
        free = budget - reserve - dense_bytes(config, torch.float16, attention, group or 64) - config.kv_bytes(
            context, 2) * batch
        nbytes = bytes_per_expert(config, precision, group or 64, torch.float16)
        total = int(free // nbytes)
        if total < K * L:
            log(f"  {precision:<5} attn {attention:<4} does not fit: {gib(max(free, 0))} left for experts holds "
                f"{max(total, 0)} slots, top-k needs {K * L}")
            continue
        uniform = max(s for s in tune_sizes(K, E) if s <= min(total // L, E))  # the largest simulated size that fits
        for (policy, prefetch, predictor), (source, curve) in curves.items():
            hits = {s: r["per_layer_hits"] for s, r in curve.items()}
            allocations = [[uniform] * L]
            spread = spread_slots(hits, total, K, E)
            if spread != allocations[0]:
                allocations.append(spread)
            for alloc in allocations:
                r = curve[alloc[0]] if len(set(alloc)) == 1 else replay(source, alloc, policy, prefetch, batch)
                for miss in ("fetch", "cpu", "auto"):
                    secs = step_cost(config, hw, r, T, precision, attention, group or 64, miss)
                    out.append(Candidate(precision, attention, group or 64, alloc, policy, prefetch, miss,
                                         r["hit_rate"], secs, batch, predictor))
    if not out:
        dense = dense_bytes(config, torch.float16, "int8" if group else "none", group or 64)
        raise UserError(f"nothing fits a {gib(budget)} device: dense weights and KV cache take at least "
                        f"{gib(dense + config.kv_bytes(context, 2) * batch)} plus {gib(reserve)} reserve")
    best = min(out, key=lambda c: c.seconds_per_token)
    default = next((c for c in out if c.policy == "lru" and c.prefetch == 0 and c.miss_policy == "fetch"
                    and len(set(c.slots)) == 1 and c.precision == best.precision and c.attention == "none"), best)
    return best, default, out


def levers(default: Candidate, out: list[Candidate]) -> list[tuple[str, Candidate]]:
    """From the default, the best candidate that changes one lever only: what each lever is worth."""
    keys = ("precision", "attention", "policy", "prefetch", "miss_policy")

    def uniform(c: Candidate) -> bool:
        return len(set(c.slots)) == 1

    def only(c: Candidate, lever: str) -> bool:
        if not all(getattr(c, k) == getattr(default, k) for k in keys if k != lever):
            return False
        return not uniform(c) if lever == "slots" else uniform(c)

    rows = []
    for label, lever in (("eviction policy", "policy"), ("uneven slots", "slots"), ("prefetch", "prefetch"),
                         ("miss handling", "miss_policy"), ("int8 attention", "attention")):
        same = [c for c in out if only(c, lever)]
        if same:
            rows.append((label, min(same, key=lambda c: c.seconds_per_token)))
    for precision in PRECISIONS:  # capacity: what each other precision gives, all else as the default
        same = [c for c in out if only(c, "precision") and c.precision == precision != default.precision]
        if same:
            rows.append((f"precision {precision}", same[0]))
    return rows


def calibrate(device: torch.device, dim: int = 4096, ffn: int = 14336, dtype: torch.dtype = torch.float16,
              repeats: int = 5, formats=PRECISIONS) -> dict:
    """Measure what the cost model needs, the way decode uses it, on one expert of shape (dim, ffn):
    - h2d_bytes_per_s: its w13's bytes copied from pinned RAM to the device;
    - device_bytes_per_s, cpu_bytes_per_s: the dense w13 GEMV (one token) on the device and on the CPU;
    - device_weights_per_s_P and cpu_weights_per_s_P for each expert format P in `formats` (none,
      int8, int4): one whole expert's decode forward (one token), packed as the engine packs it for
      `device` (int4 in the layout of the device's kernel, group 64 where it divides), on the device
      from a device buffer, and on the CPU from the host buffer (what a CPU-computed miss runs),
      as weights per second. On a CPU device the two are one measurement.
    `measured_on` says when, where, the dtype, the shape and the formats measured."""

    def best(fn, on: torch.device = device) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if on.type == "cuda":
                torch.cuda.synchronize(on)  # SYNC: timing
            times.append(time.perf_counter() - t0)
        return min(times)

    hw = _bandwidths(device, dim, ffn, dtype, best)
    config = replace(MIXTRAL_8X7B, dim=dim, ffn_dim=ffn)
    group = next((g for g in (64, 128, 32) if dim % g == 0 and ffn % g == 0), None)
    names = []
    for precision in formats:
        if precision != "none" and group is None:
            continue  # no group size divides the shape: no quantized format to measure
        layout = int4_layout_for(device) if precision == "int4" else "cpu"
        fmt = expert_format(precision, config, dtype, group or 64, layout)
        names.append(fmt.name)
        device_s, cpu_s = _expert_forward_seconds(fmt, device, dim, ffn, dtype, best)
        hw[rate_key("device", precision)] = config.expert_params / device_s
        hw[rate_key("cpu", precision)] = config.expert_params / cpu_s
    hw["measured_on"] = (f"{time.strftime('%Y-%m-%d')} {device} {str(dtype).removeprefix('torch.')} D={dim} I={ffn} "
                         f"formats {' '.join(names)}")
    return hw


def _bandwidths(device: torch.device, dim: int, ffn: int, dtype: torch.dtype, best) -> dict:
    """Link, device and CPU bandwidths on one expert's w13, the largest GEMV of decode."""
    w = torch.randn(2 * ffn, dim, dtype=dtype)
    x = torch.randn(1, dim, dtype=dtype)
    src = w.pin_memory() if device.type == "cuda" else w
    dst = torch.empty_like(w, device=device)
    xd = x.to(device)
    nbytes = w.numel() * w.element_size()
    return {"h2d_bytes_per_s": nbytes / best(lambda: dst.copy_(src, non_blocking=True)),
            "device_bytes_per_s": nbytes / best(lambda: F.linear(xd, dst)),
            "cpu_bytes_per_s": nbytes / best(lambda: F.linear(x, w), torch.device("cpu"))}


def _expert_forward_seconds(fmt, device: torch.device, dim: int, ffn: int, dtype: torch.dtype, best
                            ) -> tuple[float, float]:
    """(device, CPU) seconds of one expert's forward for one token in `fmt`: random std-0.02 weights
    packed where the engine packs them (quantized on a CUDA device) into a host buffer; on the device
    from a copy of it, on the CPU from the host buffer itself."""
    pack_on = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    parts = {k: (torch.randn(*shape, generator=g) * 0.02).to(pack_on)
             for k, shape in {"w1": (ffn, dim), "w3": (ffn, dim), "w2": (dim, ffn)}.items()}
    host = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(parts, host)
    del parts
    x = torch.randn(1, dim, generator=g).to(dtype)
    views = fmt.views(host)
    cpu_s = best(lambda: fmt.forward(x, views), torch.device("cpu"))
    if device.type == "cpu":
        return cpu_s, cpu_s
    xd, views_dev = x.to(device), fmt.views(host.to(device))
    return best(lambda: fmt.forward(xd, views_dev)), cpu_s


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


def _size_text(n: int) -> str:
    return f"{n / 2**30:.3f}GiB" if n >= 2**30 else f"{n / 2**20:.3f}MiB"


def winner_profile(best: Candidate, base: Profile, budget: int, reserve: int, hw: dict, trace_name: str) -> str:
    data = {
        "description": f"tuned on {trace_name}: predicted {best.tokens_per_s:.2f} tok/s"
                       + (f" over {best.batch} sequences (serve --max-batch {best.batch})" if best.batch > 1 else "")
                       + f", hit rate {100 * best.hit_rate:.1f}%",
        "device": base.settings.get("device", "cuda"),
        "dtype": base.settings.get("dtype", "float16"),
        "expert_quant": best.precision,
        "attention_quant": best.attention,
        "group_size": best.group_size,
        "cache_experts": best.slots[0] if len(set(best.slots)) == 1 else best.slots,
        "prefetch": best.prefetch,
        **({"predictor": best.predictor} if best.predictor else {}),
        "policy": best.policy,
        "miss_policy": best.miss_policy,
        "context": base.settings.get("context", 4096),
        "budget": {"device": _size_text(budget), "device_reserve": _size_text(reserve), "ram": "auto"},
        "hardware": {k: v for k, v in hw.items()},
    }
    return to_toml(data)


def hardware_of(profile: Profile | None) -> dict:
    hw = dict(DEFAULT_HARDWARE)
    if profile is not None and profile.hardware:
        hw.update({k: float(v) if k != "measured_on" else v for k, v in profile.hardware.items()})
    return hw


def budget_of(text: str | None, profile: Profile | None) -> int:
    if text:
        return parse_size(text)
    if profile is not None and profile.device_budget:
        return profile.device_budget
    raise UserError("give the device memory with --budget (e.g. 24GB) or a profile that has [budget] device")


def model_shape(trace: Trace) -> ModelConfig:
    """The model shape recorded in the trace, or Mixtral-8x7B's when the trace has none."""
    raw = trace.metadata.get("config") if trace.metadata else None
    if raw:
        return ModelConfig.from_dict(json.loads(raw))
    return MIXTRAL_8X7B


def write_profile(path: str, text: str) -> None:
    target = Path(path)
    if not target.parent.exists():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)
