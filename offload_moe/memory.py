"""Memory planning: what a run places on the device and in RAM, added up before anything is allocated.

`plan_memory` adds the resident weights, the expert slots, the KV cache and the reserve on the device, and
the host expert store in RAM; `check_fits` refuses a plan over its budget, with the numbers; `auto_slots`
sizes the cache from the memory free now; `resident_bytes` is the resident weights in the formats a run
holds them in. `card_plan` is the same arithmetic for the `plan` command's table of cards.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .config import ModelConfig
from .errors import UserError
from .formats.base import ExpertFormat
from .formats.registry import auto_group_size, expert_format
from .formats.sizes import dense_bytes
from .offload.tiered import ram_tier_allocation
from .options import CARDS, DEFAULT_RESERVE, EXPERT_QUANTS
from .profiles import load_profile


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def resident_bytes(config: ModelConfig, dtype: torch.dtype, attention_group: int | None = None,
                   head_group: int | None = None, device: torch.device | None = None) -> int:
    """The resident weights' bytes: in `dtype`, int8 attention where `attention_group` is set, an int8 head
    where `head_group` is (its int8 bytes in place of its dense ones; off the CPU, plus the scratch it is
    rebuilt in: `device` matters for the head only)."""
    dense = dense_bytes(config, dtype, "none" if attention_group is None else "int8", attention_group or 64)
    if head_group is not None:
        dense += dense_bytes(config, dtype, head="int8", group_size=head_group) - dense_bytes(config, dtype)
        dense += config.vocab_size * config.dim * dtype.itemsize if device is not None and device.type != "cpu" else 0
    return dense


@dataclass
class MemoryPlan:
    dense: int
    expert_bytes: int
    slots: list[int]
    kv: int
    reserve: int
    host_store: int
    device_budget: int | None
    ram_budget: int | None
    ram: int = 0  # RAM for the experts: ram_budget, or RAM_HEADROOM of the RAM available when planned
    pin: bool = False  # a CUDA device reads the host store: it is pinned (page-locked)
    host_experts: int = 0  # experts in the host store (layers x experts), for the tiered store's slots
    sequences: int = 1  # sequences whose KV cache `kv` holds (serve --max-batch: a pool of them)
    pool: str = "layer"  # the slots: each layer its own, or (global) their sum shared by every layer

    @property
    def device_total(self) -> int:
        return self.dense + self.expert_bytes * sum(self.slots) + self.kv + self.reserve

    @property
    def experts_in_ram(self) -> bool:
        """Every expert fits the RAM for experts; else the store is tiered (a RAM cache over storage)."""
        return self.host_store <= self.ram

    @property
    def host_ram(self) -> int:
        """RAM the expert store allocates: every expert, or the tiered store's slots and alignment."""
        if self.experts_in_ram:
            return self.host_store
        return ram_tier_allocation(self.ram, self.expert_bytes, self.host_experts)

    @property
    def pinned(self) -> int:
        """Host RAM the expert store pins (registers with cudaHostRegister), exactly: `host_ram` on CUDA, else 0."""
        return self.host_ram if self.pin else 0

    def describe(self) -> str:
        seqs = f" ({self.sequences} sequences)" if self.sequences > 1 else ""
        shared = " (one pool shared by every layer)" if self.pool == "global" else ""
        return (f"dense {gib(self.dense)} + {sum(self.slots)} expert slots{shared} x "
                f"{self.expert_bytes / 2**20:.1f} MiB "
                f"= {gib(self.expert_bytes * sum(self.slots))} + KV cache{seqs} {gib(self.kv)} + reserve "
                f"{gib(self.reserve)} = {gib(self.device_total)}")


def plan_memory(config: ModelConfig, dtype: torch.dtype, expert_bytes: int, slots: list[int], context: int,
                device_budget: int | None, reserve: int, ram_budget: int | None,
                dense_bytes: int | None = None, pin: bool = False, sequences: int = 1, pool: str = "layer"
                ) -> MemoryPlan:
    """`dense_bytes`: the resident weights when some are quantized (default: all in `dtype`); `pin`: the
    host store is pinned (a CUDA device); `sequences`: the KV cache holds that many sequences of `context`
    tokens (a batch); `pool`: the slots per layer, or (global) their sum shared by every layer (the same bytes).
    Without a RAM budget, the RAM for experts is RAM_HEADROOM of the RAM available now."""
    ram = ram_budget if ram_budget is not None else int(psutil.virtual_memory().available * RAM_HEADROOM)
    return MemoryPlan(
        dense=resident_bytes(config, dtype) if dense_bytes is None else dense_bytes,
        expert_bytes=expert_bytes,
        slots=slots,
        kv=config.kv_bytes(context, dtype.itemsize) * sequences,
        reserve=reserve if device_budget is not None else 0,
        host_store=config.n_moe_layers * config.num_experts * expert_bytes,
        device_budget=device_budget,
        ram_budget=ram_budget,
        ram=ram,
        pin=pin,
        host_experts=config.n_moe_layers * config.num_experts,
        sequences=sequences,
        pool=pool,
    )


def check_fits(plan: MemoryPlan) -> None:
    if plan.device_budget is not None and plan.device_total > plan.device_budget:
        raise UserError(f"the profile does not fit the device: {plan.describe()} > budget {gib(plan.device_budget)}")


def check_kv_in_ram(plan: MemoryPlan, available: int | None = None) -> None:
    """On the CPU the KV cache (of every sequence) lies in RAM beside the experts' store: refuse a plan whose KV
    cache does not fit the RAM available now less the store, before anything is allocated."""
    available = psutil.virtual_memory().available if available is None else available
    left = available - plan.host_ram
    if plan.kv > left:
        seqs = f" of {plan.sequences} sequences" if plan.sequences > 1 else ""
        raise UserError(f"the KV cache{seqs} needs {gib(plan.kv)} of RAM; {gib(max(left, 0))} is left beside the "
                        f"experts' {gib(plan.host_ram)}: lower --max-batch or --context")


RAM_HEADROOM = 0.8  # share of the available RAM that `auto` lets the expert store take


def auto_slots(config: ModelConfig, dtype: torch.dtype, expert_bytes: int, context: int, device: torch.device,
               reserve: int = DEFAULT_RESERVE, dense_bytes: int | None = None, sequences: int = 1
               ) -> tuple[list[int], int | None]:
    """Slots per layer that the free device memory holds beside the KV cache of `sequences`, and that budget
    (None on the CPU: all resident)."""
    if device.type != "cuda":
        return [config.num_experts] * config.n_moe_layers, None
    free, _ = torch.cuda.mem_get_info(device)
    per_layer, base = slots_that_fit(config, dtype, expert_bytes, free, context, reserve, dense_bytes, sequences)
    if per_layer < config.top_k:
        need = base.device_total + expert_bytes * config.n_moe_layers * config.top_k
        raise UserError(f"--profile auto: {gib(free)} free on {device}, but {config.top_k} slots per layer need "
                        f"{gib(need)} ({base.describe()} plus the slots); try quantized experts or a shorter context")
    return [min(int(per_layer), config.num_experts)] * config.n_moe_layers, free


def slots_that_fit(config: ModelConfig, dtype: torch.dtype, expert_bytes: int, budget: int, context: int,
                   reserve: int, dense_bytes: int | None = None, sequences: int = 1) -> tuple[int, MemoryPlan]:
    """Expert slots per layer with experts that a device of `budget` bytes holds beside the resident weights,
    the KV cache of `sequences` x `context` tokens and `reserve` (not capped at the expert count; under top-k,
    no run fits), and the plan without slots."""
    base = plan_memory(config, dtype, expert_bytes, [0], context, budget, reserve, 0, dense_bytes,
                       sequences=sequences)
    return int(max(budget - base.device_total, 0) // (expert_bytes * config.n_moe_layers)), base


_PLAN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "auto": torch.float16}


def card_plan(config: ModelConfig, profiles=CARDS, context: int | None = None, default_context: int = 4096,
              batch: int = 1, kept: ExpertFormat | None = None) -> dict:
    """The memory math of `config` on the cards that `profiles` describe (their budget, reserve, dtype and
    context; `context` overrides theirs, `default_context` stands in where a profile has none): parameters,
    bytes per expert in fp16/int8/int4 (the engine's own formats, at the group size the engine would pick),
    the host RAM for every expert, and per card the expert slots per layer beside the dense weights (kept in
    the profile's dtype), the KV cache of `batch` sequences (serve --max-batch) and the reserve, capped at
    the expert count; `fits`: at least top-k. `kept`: the format a GGUF file's experts keep (`formats.ggml`), a
    column "gguf" beside the others."""
    if batch < 1:
        raise UserError("--max-batch must be 1 or more")
    group = auto_group_size(config)  # None: no group size divides D and I, so no quantized formats
    precisions = [p for p in EXPERT_QUANTS if p == "none" or group is not None]
    fmt = {p: expert_format(p, config, torch.float16, group or 64) for p in precisions} | ({"gguf": kept} if kept
                                                                                             else {})
    rows = config.n_moe_layers * config.num_experts
    out = {
        "model": {"family": config.family, "layers": config.n_layers, "moe_layers": config.n_moe_layers,
                  "experts": config.num_experts, "top_k": config.top_k, "dim": config.dim, "ffn_dim": config.ffn_dim},
        "params": {"experts": rows * config.expert_params, "dense": config.dense_params,
                   "total": rows * config.expert_params + config.dense_params},
        # fp16: a token's keys and values over every layer, and the fixed state a sequence keeps whatever its length
        "kv_per_token": config.kv_bytes(1, 2) - config.state_bytes(2), "state_per_sequence": config.state_bytes(2),
        "group_size": group,
        "formats": {p: f.name for p, f in fmt.items()},
        "bytes_per_expert": {p: f.nbytes for p, f in fmt.items()},
        "host_bytes": {p: rows * f.nbytes for p, f in fmt.items()},
        "batch": batch,
        "cards": [],
    }
    for name in profiles:
        prof = load_profile(name)
        if prof.device_budget is None:
            raise UserError(f"profile {name!r} gives no device budget ([budget] device = ...): it is not a card")
        dtype = _PLAN_DTYPES.get(prof.settings.get("dtype", "auto"), torch.float16)
        ctx = min(context or int(prof.settings.get("context", default_context)), config.max_context)
        dense = resident_bytes(config, dtype)
        slots, base = {}, None
        for p, f in fmt.items():
            n, base = slots_that_fit(config, dtype, f.nbytes, prof.device_budget, ctx, prof.device_reserve, dense,
                                     batch)
            slots[p] = min(n, config.num_experts)
        out["cards"].append({
            "profile": prof.name, "budget": prof.device_budget, "reserve": prof.device_reserve, "context": ctx,
            "dtype": str(dtype).removeprefix("torch."), "dense": base.dense, "kv": base.kv,
            "free": max(prof.device_budget - base.device_total, 0), "slots": slots,
            "fits": {p: n >= config.top_k for p, n in slots.items()},
        })
    return out


def format_card_plan(plan: dict, source: str = "") -> str:
    """`card_plan`'s numbers as the `plan` command prints them."""
    m, P = plan["model"], plan["params"]
    mib = {p: n / 2**20 for p, n in plan["bytes_per_expert"].items()}
    lines = [
        f"{source + ': ' if source else ''}{m['family']}, {m['layers']} layers ({m['moe_layers']} with experts) x "
        f"{m['experts']} experts, top-{m['top_k']}, D={m['dim']}, I={m['ffn_dim']}",
        f"parameters {P['total'] / 1e9:.2f}B: experts {P['experts'] / 1e9:.2f}B, dense {P['dense'] / 1e9:.2f}B",
        "bytes per expert: " + ", ".join(f"{plan['formats'][p]} {mib[p]:.2f} MiB ({n:,} B)"
                                         for p, n in plan["bytes_per_expert"].items()),
        "every expert in host RAM: " + ", ".join(f"{plan['formats'][p]} {gib(n)}"
                                                 for p, n in plan["host_bytes"].items()),
    ]
    state = plan["state_per_sequence"]
    per_seq = (f"; recurrent state (linear attention, conv, Mamba): {state / 2**20:.2f} MiB a sequence, any length"
               if state else "")
    lines.append(f"KV cache (fp16): {plan['kv_per_token'] / 2**10:.1f} KiB a token{per_seq}")
    if plan["group_size"] is None:
        lines.append("no quantization group size (32, 64, 128) divides D and I: fp16 experts only")
    heads = "".join(f"{plan['formats'][p]:>11}" for p in plan["formats"])
    what = "the KV cache" + (" and state" if state else "")
    kv = what if plan["batch"] == 1 else f"{what} of {plan['batch']} sequences (--max-batch)"
    lines += ["", f"expert slots per layer on the card (of {m['experts']}; '-': fewer than top-k = {m['top_k']} fit), "
                  f"beside the dense weights, {kv} and the reserve:",
              f"{'profile':<9}{'card':>10}{'dense':>11}{'context':>9}{'KV+state' if state else 'KV cache':>11}"
              f"{'reserve':>11}{'left':>11}"
              + heads]
    for c in plan["cards"]:
        cells = "".join(f"{(str(n) if c['fits'][p] else '-') + (' (all)' if n == m['experts'] else ''):>11}"
                        for p, n in c["slots"].items())
        lines.append(f"{c['profile']:<9}{gib(c['budget']):>10}{gib(c['dense']):>11}{c['context']:>9}{gib(c['kv']):>11}"
                     f"{gib(c['reserve']):>11}{gib(c['free']):>11}{cells}")
    return "\n".join(lines)
