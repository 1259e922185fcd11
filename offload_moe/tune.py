"""Cost model, hardware calibration and the offload-policy tuner.

The cost model predicts the time of one decode token from a simulated cache run. Decode is
memory-bound, so every time is bytes over a measured bandwidth:
  compute  = (dense bytes + L*K expert bytes) / device bandwidth
  copy     = expert bytes / host-to-device bandwidth          (one miss or one prefetch)
  cpu      = expert bytes / CPU bandwidth                     (one miss computed on the CPU)
With m demand misses and p prefetch copies per token (from the simulator):
  fetch: t = max(compute + m*copy, (m + p)*copy)    a demand miss stalls; prefetches overlap compute,
                                                   but the link carries every copy
  cpu:   t = max(compute + m*cpu,  (m + p)*copy)    the miss runs on the CPU; its copy still happens
  auto:  the faster of the two per miss (min(copy, cpu) in the first term)
The tuner searches expert precision (which sets how many slots fit the budget), attention precision
(int8 attention frees device memory for slots and reads fewer bytes per token), prefetch depth,
miss handling, eviction policy, and slots per layer (uniform, or spread by per-layer hit curves),
and reports the best against the uniform-LRU default, one lever at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import UserError
from .profiles import DEFAULT_RESERVE, Profile, gib, parse_size
from .quant import ATTENTION_QUANTS, bytes_per_expert, dense_bytes
from .simulate import simulate, simulate_many
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
    seconds_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return 1 / self.seconds_per_token

    def describe(self) -> str:
        s = self.slots
        slots = str(s[0]) if len(set(s)) == 1 else f"{min(s)}-{max(s)} (sum {sum(s)})"
        return (f"{self.precision:<5} attn {self.attention:<4} slots {slots:<14} {self.policy:<6} "
                f"prefetch {self.prefetch} miss {self.miss_policy:<5} hit {100 * self.hit_rate:5.1f}%  "
                f"{self.tokens_per_s:7.2f} tok/s")


def token_seconds(config: ModelConfig, expert_bytes: int, hw: dict, misses: float, prefetches: float,
                  miss_policy: str, attention: str = "none", group_size: int = 64) -> float:
    """Predicted seconds per decode token (see the module docstring)."""
    dense = dense_bytes(config, torch.float16, attention, group_size)  # fp16 resident weights
    compute = (dense + config.n_layers * config.top_k * expert_bytes) / hw["device_bytes_per_s"]
    copy = expert_bytes / hw["h2d_bytes_per_s"]
    cpu = expert_bytes / hw["cpu_bytes_per_s"]
    per_miss = {"fetch": copy, "cpu": cpu, "auto": min(copy, cpu)}[miss_policy]
    return max(compute + misses * per_miss, (misses + prefetches) * copy)


def spread_slots(hits: dict[int, list[int]], total: int, top_k: int, num_experts: int) -> list[int]:
    """Slots per layer maximising total hits for `total` slots; hits[s][l] = layer l's hits with s slots.

    Layer caches are independent, so this is a knapsack over layers (exact dynamic programming).
    """
    L = len(hits[top_k])
    choices = range(top_k, num_experts + 1)
    total = min(total, L * num_experts)
    best = {0: (0, [])}  # slots used -> (hits, allocation so far)
    for layer in range(L):
        nxt: dict[int, tuple[int, list[int]]] = {}
        for used, (h, alloc) in best.items():
            for s in choices:
                u = used + s
                if u > total:
                    break
                cand = (h + hits[s][layer], alloc + [s])
                if u not in nxt or cand[0] > nxt[u][0]:
                    nxt[u] = cand
        best = nxt
    if not best:
        raise UserError(f"the budget gives {total} slots, fewer than top-k ({top_k}) per layer")
    return max(best.values(), key=lambda v: v[0])[1]


def tune(trace: Trace, config: ModelConfig, budget: int, hw: dict, reserve: int = int(DEFAULT_RESERVE),
         context: int = 4096, policies=("lru", "lfu", "fifo", "random"), log=print) -> tuple[Candidate, Candidate,
                                                                                          list[Candidate]]:
    """Search the offload settings for `trace` on a device of `budget` bytes. Returns (best, default, all)."""
    if trace.num_layers != config.n_layers or trace.num_experts != config.num_experts:
        raise UserError(f"the trace has {trace.num_layers} layers x {trace.num_experts} experts; the model shape has "
                        f"{config.n_layers} x {config.num_experts}")
    T = trace.experts.shape[0]
    K, E, L = config.top_k, config.num_experts, config.n_layers
    curves: dict[tuple[str, int], dict[int, dict]] = {}  # (policy, prefetch) -> slots -> result
    for policy in policies:
        for prefetch in (0, 1) if (trace.predicted >= 0).any() else (0,):
            sizes = list(range(K, E + 1))
            curves[policy, prefetch] = dict(zip(sizes, simulate_many(trace, sizes, policy, prefetch), strict=True))

    out: list[Candidate] = []
    group = next((g for g in (64, 128, 32) if config.dim % g == 0 and config.ffn_dim % g == 0), None)
    for attention, precision in [(a, p) for a in ATTENTION_QUANTS for p in PRECISIONS]:
        if (precision != "none" or attention != "none") and group is None:
            log(f"  {precision:<5} attn {attention:<4} skipped: no group size divides D={config.dim} and "
                f"I={config.ffn_dim}")
            continue
        free = budget - reserve - dense_bytes(config, torch.float16, attention, group or 64) - config.kv_bytes(
            context, 2)
        nbytes = bytes_per_expert(config, precision, group or 64, torch.float16)
        total = int(free // nbytes)
        if total < K * L:
            log(f"  {precision:<5} attn {attention:<4} does not fit: {gib(max(free, 0))} left for experts holds "
                f"{max(total, 0)} slots, top-k needs {K * L}")
            continue
        uniform = min(total // L, E)
        for (policy, prefetch), curve in curves.items():
            hits = {s: r["per_layer_hits"] for s, r in curve.items()}
            allocations = [[uniform] * L]
            spread = spread_slots(hits, total, K, E)
            if spread != allocations[0]:
                allocations.append(spread)
            for alloc in allocations:
                r = curve[alloc[0]] if len(set(alloc)) == 1 else simulate(trace, alloc, policy, prefetch)
                misses = r["misses"] / T
                prefetches = r["prefetch_copies"] / T
                for miss in ("fetch", "cpu", "auto"):
                    secs = token_seconds(config, nbytes, hw, misses, prefetches, miss, attention, group or 64)
                    out.append(Candidate(precision, attention, group or 64, alloc, policy, prefetch, miss,
                                         r["hit_rate"], secs))
    if not out:
        dense = dense_bytes(config, torch.float16, "int8" if group else "none", group or 64)
        raise UserError(f"nothing fits a {gib(budget)} device: dense weights and KV cache take at least "
                        f"{gib(dense + config.kv_bytes(context, 2))} plus {gib(reserve)} reserve")
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
              repeats: int = 5) -> dict:
    """Measure host-to-device, device and CPU bandwidths the way decode uses them (one expert's GEMVs)."""
    hw = {}
    w = torch.randn(2 * ffn, dim, dtype=dtype)  # one expert's w13, the largest GEMV of decode
    x = torch.randn(1, dim, dtype=dtype)
    src = w.pin_memory() if device.type == "cuda" else w
    dst = torch.empty_like(w, device=device)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # SYNC: timing
            times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = w.numel() * w.element_size()
    hw["h2d_bytes_per_s"] = nbytes / best(lambda: dst.copy_(src, non_blocking=True))
    xd = x.to(device)
    hw["device_bytes_per_s"] = nbytes / best(lambda: F.linear(xd, dst))
    hw["cpu_bytes_per_s"] = nbytes / best(lambda: F.linear(x, w))
    hw["measured_on"] = f"{time.strftime('%Y-%m-%d')} {device} {str(dtype).removeprefix('torch.')} D={dim} I={ffn}"
    return hw


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
        "description": f"tuned on {trace_name}: predicted {best.tokens_per_s:.2f} tok/s, hit rate "
                       f"{100 * best.hit_rate:.1f}%",
        "device": base.settings.get("device", "cuda"),
        "dtype": base.settings.get("dtype", "float16"),
        "expert_quant": best.precision,
        "attention_quant": best.attention,
        "group_size": best.group_size,
        "cache_experts": best.slots[0] if len(set(best.slots)) == 1 else best.slots,
        "prefetch": best.prefetch,
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
        return ModelConfig(**json.loads(raw))
    return MIXTRAL_8X7B


def write_profile(path: str, text: str) -> None:
    target = Path(path)
    if not target.parent.exists():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)
