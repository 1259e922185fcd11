"""Every setting that shapes a run, listed once: `EngineOptions`.

Each field carries its default, its help and its check (type, range, choices). The profile keys
(`profiles.py`) and the CLI's engine flags (`cli/args.py`) are generated from these fields, and
`check_options` applies the checks to whatever the settings came from (defaults, a profile, the
Python API, flags) before `plan.plan_load` works anything out. A bad value is a `UserError` that
names the key the user wrote. Torch-free: the CLI parses (and `--help` prints) without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields

from .errors import UserError
from .offload.eviction import ONLINE_POLICIES, POOLS

DTYPE_NAMES = ("float32", "float16", "bfloat16")
EXPERT_QUANTS = ("none", "int8", "int4", "mxfp4")  # mxfp4: `formats.mxfp4.Mxfp4Format`
ATTENTION_QUANTS = ("none", "int8")
HEAD_QUANTS = ("none", "int8")
GROUP_SIZES = (32, 64, 128)
INT4_LAYOUTS = ("cpu", "cuda")  # code orders of the int4 format; see `formats.int4.Int4Format`
MISS_POLICIES = ("fetch", "cpu", "auto")  # a decode miss: copy and wait, compute on the CPU, or the faster one
DEFAULT_RESERVE = int(1.5 * 2**30)  # CUDA context, activations, allocator slack on a real card
CARDS = ("24gb", "16gb", "12gb")  # the card profiles `plan` reads by default

_UNITS = {"": 1, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes from "24GB", "1.5GiB", "800MB" or a number; GB and GiB both mean 2**30, as cards are sold."""
    if isinstance(text, bool):
        raise UserError(f"cannot read the size {text!r} (write e.g. 24GB, 1.5GiB or 800MB)")
    if isinstance(text, int | float):
        if not 0 <= text < float("inf"):
            raise UserError(f"a size is 0 or more bytes, got {text}")
        return int(text)
    if not isinstance(text, str):
        raise UserError(f"cannot read the size {text!r} (write e.g. 24GB, 1.5GiB or 800MB)")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise UserError(f"cannot read the size {text!r} (write e.g. 24GB, 1.5GiB or 800MB)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


# Checks: value -> value (normalised), or ValueError with the reason; `check_options` adds the key.

def _int(v, low: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    if low is not None and v < low:
        raise ValueError(f"expected {low} or more, got {v}")
    return v


def above_zero(v) -> float:
    """A finite number above 0."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
        raise ValueError(f"expected a number above 0, got {v!r}")
    return float(v)


def int_at_least(low: int) -> Callable:
    return lambda v: _int(v, low)


def one_of(choices: tuple) -> Callable:
    def check(v):
        if v not in choices or isinstance(v, bool):
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {v!r}")
        return v
    return check


def optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def device_name(v) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", v):
        raise ValueError(f"expected cpu, cuda, cuda:N or auto, got {v!r}")
    return v


def slot_counts(v) -> int | list[int]:
    """One count for every layer with experts, or one count per layer."""
    if isinstance(v, list) and v:
        return [_int(n, 1) for n in v]
    try:
        return _int(v, 1)
    except ValueError:
        raise ValueError(f"expected a count of slots (1 or more) or a list of counts per layer, got {v!r}") from None


def size(v) -> int:
    try:
        return parse_size(v)
    except UserError as e:
        raise ValueError(str(e)) from None


def text(v) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def flag(v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def option(default, help: str, check: Callable, *, profile: str | None = "", cli: bool = True,
           shown: str | None = None, metavar: str | None = None, choices: tuple | None = None):
    """A field of EngineOptions. `profile`: its key in a profile ("" the field's own name at the top level,
    "budget.X" in the [budget] table, None not a profile key); `cli`: an engine flag (--field-name);
    `shown`: the default as help prints it; `choices`: the flag's argparse choices."""
    return field(default=default, metadata={"help": help, "check": check, "profile": profile, "cli": cli,
                                            "shown": shown, "metavar": metavar, "choices": choices})


@dataclass
class EngineOptions:
    """Everything that shapes a run. These defaults are the CLI's and the profiles' defaults."""

    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when there is one)", device_name)
    dtype: str = option("auto", "compute dtype", one_of(("auto", *DTYPE_NAMES)),
                        shown="auto: float16 on cuda, float32 on cpu", choices=(*DTYPE_NAMES, "auto"))
    cache_experts: int | list[int] | None = option(
        None, "expert cache slots per layer: one count, or one per layer as 4,4,6,...", optional(slot_counts),
        shown="all experts resident", metavar="K")
    prefetch: int = option(
        1, "predict each layer's experts N layers ahead (layer 0 from the previous token) and prefetch them (at "
        "most MoE layers - 1; a calibrated predictor file's deeper leads are decided too, into the link's gaps); "
        "0 turns it off", int_at_least(0), metavar="N")
    predictor: str = option(
        "auto", "what predicts: router (the layer's own router on the earlier hidden state), a file written by "
        "train-predictor, or auto (the model folder's predictor.safetensors when there is one, else router)", text,
        metavar="P")
    prefetch_width: int = option(0, "experts prefetched per layer and token, best first, at most its slots; 0: top-k",
                                 int_at_least(0), metavar="W")
    policy: str = option("learned", "eviction policy (README: eviction policies; lru: the classic baseline)",
                         one_of(ONLINE_POLICIES), choices=ONLINE_POLICIES)
    slot_pool: str = option(
        "global", "layer: each layer keeps its own --cache-experts slots; global: their sum is one pool in which any "
        "layer's expert may evict any other layer's (by --policy)", one_of(POOLS), choices=POOLS)
    miss_policy: str = option(
        "fetch", "a decode-step miss: fetch (copy it, wait), cpu (compute it on the CPU from RAM while the copy "
        "runs), auto (whichever measures faster)", one_of(MISS_POLICIES), choices=MISS_POLICIES)
    expert_quant: str = option(
        "none", "quantize the experts at load; a packed --model keeps its own, none keeps an MXFP4 checkpoint's "
        "experts MXFP4 and a GGUF file's quantized ones in their types", one_of(EXPERT_QUANTS), choices=EXPERT_QUANTS)
    attention_quant: str = option(
        "none", "quantize the attention projections at load (they stay resident: int8 frees device memory for "
        "expert slots); a packed --model keeps its own", one_of(ATTENTION_QUANTS), choices=ATTENTION_QUANTS)
    head_quant: str = option(
        "none", "quantize the LM head (output matrix) at load to int8, group-wise like the attention (a packed "
        "--model's too): a CPU decode lever, the one-token C kernel reads a quarter of float32's bytes (batched "
        "steps and long scores widen it in an fp32 scratch of its size); on CUDA it is rebuilt in a scratch as "
        "large as the fp16 matrix, so it saves no device memory there", one_of(HEAD_QUANTS), choices=HEAD_QUANTS)
    group_size: int | None = option(
        None, "quantization group size", optional(one_of(GROUP_SIZES)), choices=GROUP_SIZES,
        shown="auto: 64 where it divides every quantized input (the experts' D and I, the attention's D and H*hd, "
              "the head's D when int8), else the largest of 32, 64, 128 that does")
    context: int = option(4096, "KV-cache length to preallocate (clipped to the model's own)", int_at_least(1))
    threads: int | None = option(
        None, "CPU threads for torch's ops and the C kernels (one count for both)", optional(int_at_least(1)),
        shown="the physical cores this process may use (its CPU affinity, its cgroup's quota)", metavar="N")
    seed: int = option(0, "seed of the random eviction policy", int_at_least(0), profile=None, cli=False)
    progress: bool = option(True, "a progress bar while experts load (on stderr, where it is a terminal)", flag,
                           profile=None, cli=False)
    device_budget: int | None = option(None, "bytes the engine may place on the device (checked at load)",
                                       optional(size), profile="budget.device", cli=False)
    device_reserve: int = option(DEFAULT_RESERVE, "kept free on the device for the CUDA context and activations",
                                 size, profile="budget.device_reserve", cli=False)
    ram_budget: int | None = option(
        None, "RAM for the experts, e.g. 16GB, or auto; when they need more, they stream from storage through a "
        "RAM cache of this size", optional(size), profile="budget.ram", shown="auto, 80%% of the available RAM",
        metavar="SIZE")
    link_gbs: float | None = option(
        None, "emulate a host-to-device link of X GB/s on a CPU device: expert copies run on a thread, each taking "
        "bytes / X of wall time, demand copies ahead of speculative ones (README: emulated link); not on cuda",
        optional(above_zero), profile=None, shown="none: copies run inline", metavar="X")
    max_batch: int = option(1, "sequences whose KV cache is allocated and planned (serve --max-batch; `Scheduler`)",
                            int_at_least(1), profile=None, cli=False)


OPTIONS = {f.name: f for f in fields(EngineOptions)}


def default_of(name: str):
    f = OPTIONS[name]
    return f.default if f.default is not MISSING else f.default_factory()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(name: str, value, where: str = ""):
    """One option's value checked and normalised; a bad one is a UserError naming `where` (the profile key or
    flag the user wrote; default: --name)."""
    try:
        return OPTIONS[name].metadata["check"](value)
    except ValueError as e:
        raise UserError(f"{where or flag_name(name)}: {e}") from None


def check_options(options: EngineOptions, where: dict[str, str] | None = None) -> EngineOptions:
    """Every field checked (`where` names the source of a field the user set: a profile key); the same options
    back, normalised."""
    where = where or {}
    for name in OPTIONS:
        setattr(options, name, check_value(name, getattr(options, name), where.get(name, "")))
    return options


def set_fields(options: EngineOptions) -> dict:
    """The fields of `options` that differ from EngineOptions' defaults: what a caller set."""
    return {name: getattr(options, name) for name in OPTIONS if getattr(options, name) != default_of(name)}
