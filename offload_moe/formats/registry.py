"""Choosing an expert format: by the name a user or `packed.json` gives (`expert_format`, `parse_format_name`,
`load_quant`), its bytes per expert for memory planning, and the quantization group size that fits a model
(`resolve_group_size`: the asked one, checked, or `auto_group_size`).
"""

from __future__ import annotations

import re

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..options import EXPERT_QUANTS, GROUP_SIZES
from .base import DenseFormat, ExpertFormat
from .int4 import Int4Format
from .int4_layouts import int4_layout_for
from .int8 import Int8Format
from .mxfp4 import Mxfp4Format

DEFAULT_GROUP_SIZE = 64  # the group size when none is asked for and it divides every quantized input


def expert_format(name: str, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64,
                  layout: str = "cpu") -> ExpertFormat:
    """The expert format called `name`: "none" (dense, in the compute dtype), "int8", "int4" or "mxfp4" (its
    blocks of 32 whatever `group_size`); `layout` ("cpu" or "cuda", see `Int4Format`) applies to int4 only."""
    if name == "none":
        return DenseFormat(config, compute_dtype)
    if name == "mxfp4":
        return Mxfp4Format(config, compute_dtype)
    if name == "int8":
        return Int8Format(config, compute_dtype, group_size)
    if name == "int4":
        return Int4Format(config, compute_dtype, group_size, layout)
    raise UserError(f"unknown expert quantization {name!r} (use {', '.join(EXPERT_QUANTS)})")


def format_for(config: ModelConfig, quant: str, compute_dtype: torch.dtype, group_size: int | None = None,
               device: torch.device | None = None, layout: str | None = None, attention: bool = False,
               head: bool = False) -> ExpertFormat:
    """The expert format that a load, `convert`, `calibrate`, `tune` or the timed replay uses for experts in
    `quant`: its group size `group_size` checked, or the automatic one, against every input quantized with it
    (`resolve_group_size`; `attention`, `head`: those are int8 too), and int4's code layout `layout`, else the
    one `device`'s kernel reads (`int4_layout_for`; the CPU's by default)."""
    group = resolve_group_size(config, group_size, experts=quant in ("int8", "int4"), attention=attention, head=head)
    if layout is None:
        layout = int4_layout_for(device or torch.device("cpu")) if quant == "int4" else "cpu"
    return expert_format(quant, config, compute_dtype, group, layout)


def parse_format_name(name: str) -> tuple[str, int, str] | None:
    """(quantization, group size, layout) of a quantized format's name as `packed.json` records it
    (`int8-g64`, `int4-g64`, `int4-g64-cuda`, `mxfp4`), or None for a dense one (fp16, bf16, fp32)."""
    if name == "mxfp4":
        return "mxfp4", 32, "cpu"
    if not name.startswith("int"):
        return None
    m = re.fullmatch(r"(int8|int4)-g(\d+)(-cuda)?", name)
    if m is None or (m[1] == "int8" and m[3]):
        raise UserError(f"packed.json: unknown expert format {name!r}; convert the model again")
    return m[1], int(m[2]), "cuda" if m[3] else "cpu"


def load_quant(quant: str, mxfp4_checkpoint: bool) -> str:
    """The expert format a load (or `convert`) asked for as `quant` makes of a checkpoint: "none" (no
    quantization at load) keeps an MXFP4 checkpoint's experts as they are, "mxfp4"; the rest as asked."""
    return "mxfp4" if quant == "none" and mxfp4_checkpoint else quant


def bytes_per_expert(config: ModelConfig, quant: str, group_size: int | None = None,
                     dtype: torch.dtype = torch.float16) -> int:
    """`format_for(...).nbytes`, for memory planning (the same in either int4 layout); `dtype` matters for "none"
    only."""
    return format_for(config, quant, dtype, group_size).nbytes


def quantized_inputs(config: ModelConfig, experts: bool = True, attention: bool = False,
                     head: bool = False) -> list[tuple[str, int]]:
    """(what, size) of every input dimension that a group must divide: the experts' (D for w1 w3, I for
    w2) when they are quantized, the attention projections' (`ModelConfig.attention_inputs`) when they are,
    the LM head's (D) when it is."""
    sizes = [("model dim", config.dim), ("expert ffn dim", config.ffn_dim)] if experts else []
    if attention:
        sizes += [("attention input size", n) for n in config.attention_inputs]
    if head:
        sizes.append(("model dim", config.dim))
    return sizes


def dividing_group_sizes(config: ModelConfig, experts: bool = True, attention: bool = False,
                         head: bool = False) -> list[int]:
    """The allowed group sizes that divide every quantized input (all of them when nothing is quantized)."""
    sizes = quantized_inputs(config, experts, attention, head)
    return [g for g in GROUP_SIZES if all(n % g == 0 for _, n in sizes)]


def auto_group_size(config: ModelConfig, experts: bool = True, attention: bool = False,
                    head: bool = False) -> int | None:
    """DEFAULT_GROUP_SIZE where it divides every quantized input, else the largest allowed size that does,
    else None (this model's weights cannot be group-quantized)."""
    ok = dividing_group_sizes(config, experts, attention, head)
    return DEFAULT_GROUP_SIZE if DEFAULT_GROUP_SIZE in ok else max(ok, default=None)


def resolve_group_size(config: ModelConfig, requested: int | None, experts: bool = True,
                       attention: bool = False, head: bool = False) -> int:
    """The group size to quantize with: `requested` when given (checked), else `auto_group_size`. A size
    that does not divide an input, or a model that no allowed size divides, is a one-line UserError that
    names the sizes that would work. With nothing quantized the group size is unused: returned unchecked."""
    if not experts and not attention and not head:
        return DEFAULT_GROUP_SIZE if requested is None else requested
    inputs = quantized_inputs(config, experts, attention, head)
    ok = dividing_group_sizes(config, experts, attention, head)
    listed = ", ".join(dict.fromkeys(f"{what} {n}" for what, n in inputs))
    if not ok:
        raise UserError(f"no quantization group size ({', '.join(map(str, GROUP_SIZES))}) divides the quantized "
                        f"inputs ({listed}): quantize nothing here (--expert-quant none, --attention-quant none, "
                        "--head-quant none)")
    if requested is None:
        return auto_group_size(config, experts, attention, head)
    if requested not in GROUP_SIZES:
        raise UserError(f"quantization group size must be one of {GROUP_SIZES}, got {requested}")
    bad = [(what, n) for what, n in inputs if n % requested]
    if bad:
        what, n = bad[0]
        raise UserError(f"quantization group size {requested} does not divide the {what} {n}: use "
                        f"{' or '.join(map(str, ok))} (sizes that divide {listed}), or leave the size out "
                        "(--group-size, a profile's group_size) to get one of them")
    return requested
