"""The load plan: every setting of a run worked out once, before any weight is read.

    options = merge_options(options, profile, overrides)   # defaults < profile < options < overrides
    plan = plan_load(checkpoint, options)                   # checks, formats, slots, memory: or a UserError

`plan_load` is the only place where settings are resolved: the device and dtype, the context, the experts'
format (the same function `convert`, `tune` and the GPU check call), the int8 groups of the attention and
head, the slots per layer, the memory plan and whether it fits, the store (in RAM or tiered over storage,
pinned or not), the prefetch lead and widths and the predictor. `Engine.load` builds from the plan and
decides nothing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError
from .formats.base import DenseFormat, ExpertFormat
from .formats.ggml import GGUFFormat, kinds_from_names
from .formats.int4_layouts import int4_layout_for
from .formats.registry import expert_format, format_for, load_quant, parse_format_name, resolve_group_size
from .memory import MemoryPlan, auto_slots, check_fits, check_kv_in_ram, plan_memory, resident_bytes
from .offload.predictors import FILE_NAME as PREDICTOR_FILE
from .options import EngineOptions, check_options, set_fields
from .profiles import Profile
from .threads import physical_cores
from .weights.checkpoint import Checkpoint
from .weights.packed import packed_attention_group

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def merge_options(options: EngineOptions | None, profile: Profile | None, overrides: dict
                  ) -> tuple[EngineOptions, set[str]]:
    """Each setting from the last of: EngineOptions' defaults, the profile (its settings and budgets), the
    fields of `options` that differ from the defaults, the keyword `overrides`; checked. A field of `options`
    left at its default keeps the profile's value; to force a default over a profile, pass it in `overrides`.
    Also the names of the fields the caller set (`options` and `overrides`)."""
    unknown = set(overrides) - set(EngineOptions.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(sorted(unknown))}")
    out = EngineOptions()
    if profile is not None:
        budgets = {"device_budget": profile.device_budget, "device_reserve": profile.device_reserve,
                   "ram_budget": profile.ram_budget}
        out = replace(out, **profile.settings, **budgets)
    given = set(set_fields(options)) if options is not None else set()
    if options is not None:
        out = replace(out, **set_fields(options))
    return check_options(replace(out, **overrides)), given | set(overrides)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on cuda, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def group_size_for(config: ModelConfig, options: EngineOptions) -> int:
    """The quantization group size of a run that quantizes at load: the one asked for, checked against the
    inputs it quantizes, or the automatic one (`resolve_group_size`)."""
    return resolve_group_size(config, options.group_size, experts=options.expert_quant in ("int8", "int4"),
                              attention=options.attention_quant == "int8", head=options.head_quant == "int8")


def expert_format_for(ckpt: Checkpoint, options: EngineOptions, dtype: torch.dtype,
                      device: torch.device | None = None) -> ExpertFormat:
    """The experts' packed format: a packed folder's own, else the one asked for (an MXFP4 checkpoint's stay
    MXFP4 and a GGUF file's quantized ones keep their types unless another quantization is asked for:
    `load_quant`, `kept_gguf`).

    int4 experts take the code layout of the compute device (`format_for`): torch's CUDA tiles
    (`int4-gG-cuda`) where its int4 kernel runs, else the CPU kernel's order (`int4-gG`). A packed folder keeps
    the layout it was written in: when that is not the device's, its experts run the dequantizing path,
    which is correct but slower, and a note on stderr says how to convert."""
    device = device or torch.device("cpu")
    if ckpt.packed_index is None:
        return kept_gguf(ckpt, options.expert_quant) or format_for(
            ckpt.config, load_quant(options.expert_quant, ckpt.mxfp4_experts), dtype, options.group_size, device,
            attention=options.attention_quant == "int8", head=options.head_quant == "int8")
    name = ckpt.packed_index["format"]
    if name.startswith("gguf-"):
        return GGUFFormat(ckpt.config, kinds_from_names(ckpt.packed_index.get("gguf_types"), ckpt.path))
    parsed = parse_format_name(name)
    if parsed is not None:
        quant, group, layout = parsed
        if quant == "int4" and layout != (want := int4_layout_for(device)):
            print(f"note: {ckpt.path} holds int4 experts in the {layout} layout ({name}); on {device} they run the "
                  f"dequantizing path (correct, slower); `convert --layout {want}` writes the layout of this "
                  "device's kernel", file=sys.stderr)
        return expert_format(quant, ckpt.config, dtype, group, layout)
    fmt = DenseFormat(ckpt.config, dtype)
    if fmt.name != name:
        raise UserError(f"{ckpt.path} holds {name} experts; run it with --dtype "
                        f"{ {'fp16': 'float16', 'bf16': 'bfloat16', 'fp32': 'float32'}[name]} (or convert again)")
    return fmt


def kept_gguf(ckpt: Checkpoint, quant: str) -> GGUFFormat | None:
    """A GGUF file's experts in the file's own types (`formats.ggml`), where none other is asked for (`quant`
    none) and they are quantized (float ones take the compute dtype); experts with biases (gpt-oss's) are
    decoded as before. None: the asked format applies."""
    kinds = ckpt.gguf_expert_kinds() if quant == "none" and not ckpt.config.expert_bias else None
    return None if kinds is None else GGUFFormat(ckpt.config, kinds)


def attention_group(ckpt: Checkpoint, options: EngineOptions) -> int | None:
    """The group size of int8 attention weights, or None when they stay in the compute dtype: a packed
    folder's own choice, else the one asked for."""
    if ckpt.packed_index is not None:
        return packed_attention_group(ckpt.packed_index)
    return None if options.attention_quant == "none" else group_size_for(ckpt.config, options)


def head_group(ckpt: Checkpoint, options: EngineOptions) -> int | None:
    """The group size of an int8 LM head, or None when it stays in the compute dtype. A packed folder's
    experts and attention keep their own group sizes: its head is checked alone."""
    if options.head_quant == "none":
        return None
    if ckpt.packed_index is not None:
        return resolve_group_size(ckpt.config, options.group_size, experts=False, head=True)
    return group_size_for(ckpt.config, options)


def resolve_slots(cache_experts: int | list[int] | None, n_layers: int, num_experts: int, top_k: int) -> list[int]:
    """Slots per layer from one count or a per-layer list; checked against top-k and the expert count."""
    if cache_experts is None:
        return [num_experts] * n_layers
    slots = [cache_experts] * n_layers if isinstance(cache_experts, int) else list(cache_experts)
    if len(slots) != n_layers:
        raise UserError(f"cache slots: {len(slots)} counts given for {n_layers} layers with experts")
    for layer, n in enumerate(slots):
        if n < top_k:
            raise UserError(
                f"cache slots: layer {layer} has {n} slots, fewer than top-k ({top_k}): a token needs {top_k} "
                "experts resident at once (the card profiles' counts are Mixtral-8x7B's: `python run.py plan "
                "--config MODEL` prints the slots each card leaves for this model; pass them with --cache-experts)"
            )
    return [min(n, num_experts) for n in slots]


def prefetch_widths(options: EngineOptions, top_k: int, slots: list[int]) -> list[int]:
    """Experts prefetched per row and token: --prefetch-width (0: top-k), at most the row's slots (a prefetch fills
    at most them)."""
    return [min(options.prefetch_width or top_k, n) for n in slots]


def predictor_for(name: str, model_dir: Path) -> str:
    """`auto`: the model folder's predictor file when there is one, else the router."""
    if name != "auto":
        return name
    found = Path(model_dir) / PREDICTOR_FILE
    return str(found) if found.is_file() else "router"


@dataclass
class LoadPlan:
    """What `Engine.load` builds, every choice made. `options` are the merged, checked settings the plan came
    from (policy, miss_policy, seed, max_batch and progress are used as they are)."""

    options: EngineOptions
    device: torch.device
    dtype: torch.dtype
    context: int  # KV-cache length per sequence, clipped to the model's own
    expert_format: ExpertFormat
    attention_group: int | None  # int8 attention projections' group size; None: in `dtype`
    head_group: int | None  # int8 LM head's group size; None: in `dtype`
    slots: list[int]  # expert slots per layer with experts
    pool: str  # layer: each layer its slots; global: their sum shared by every layer (all resident: layer)
    memory: MemoryPlan
    pin: bool  # the host store is pinned (a CUDA device reads it)
    tiered: bool  # the experts do not fit the RAM budget: a RAM cache over the checkpoint on storage
    lead: int  # rows ahead at which experts are predicted and prefetched; 0: no prefetch
    widths: list[int]  # experts prefetched per row and token
    predictor: str  # router, or a predictor file
    threads: int  # CPU threads of torch's ops and the C kernels



def plan_load(ckpt: Checkpoint, options: EngineOptions, auto: bool = False) -> LoadPlan:
    """Every setting of a run on `ckpt`, checked, before any tensor data is read. `options`: merged and checked
    (`merge_options`); `auto`: size the slots from the device memory free now (profile auto, no slots given)."""
    c = ckpt.config
    device = resolve_device(options.device)
    if options.link_gbs is not None and device.type != "cpu":
        raise UserError(f"--link-gbs emulates a link on a CPU device; {device} has its own (drop --link-gbs)")
    dtype = resolve_dtype(options.dtype, device)
    context = min(options.context, c.max_context)
    fmt = expert_format_for(ckpt, options, dtype, device)
    attn, head = attention_group(ckpt, options), head_group(ckpt, options)
    dense = resident_bytes(c, dtype, attn, head, device)
    if auto:
        slots, budget = auto_slots(c, dtype, fmt.nbytes, context, device, options.device_reserve, dense,
                                   options.max_batch)
        options = replace(options, cache_experts=slots, device_budget=budget)
    slots = resolve_slots(options.cache_experts, c.n_moe_layers, c.num_experts, c.top_k)
    pin = device.type == "cuda"  # the host store is pinned (registered exactly: memory.pinned bytes)
    cached = any(n < c.num_experts for n in slots)
    pool = options.slot_pool if cached else "layer"
    memory = plan_memory(c, dtype, fmt.nbytes, slots, context, options.device_budget, options.device_reserve,
                         options.ram_budget, dense, pin=pin, sequences=options.max_batch, pool=pool)
    check_fits(memory)  # before anything is loaded: with --max-batch, the KV pool too
    if device.type == "cpu":
        check_kv_in_ram(memory)
    # with every layer's experts resident there is nothing to prefetch; a row predicted from itself would
    # evict its own experts, so the lead stops one short of the layer count
    lead = min(options.prefetch, c.n_moe_layers - 1) if cached else 0
    widths = prefetch_widths(options, c.top_k, slots)
    return LoadPlan(options, device, dtype, context, fmt, attn, head, slots, pool, memory, pin,
                    tiered=not memory.experts_in_ram, lead=lead, widths=widths,
                    predictor=predictor_for(options.predictor, ckpt.path), threads=options.threads or physical_cores())
