"""int8 attention projections: wq wk wv wo (latent attention: wq or wq_a wq_b, wkv_a, wo) kept resident as
int8 (`Int8Linear`, in `int8.Int8Format`'s matrix layout and kernels) to free device memory for expert slots;
and the int8 LM head (the output matrix: on the CPU a decode step's largest read). Their bytes: `sizes.py`.

Legend: T tokens, N output rows, K input columns.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .group import check_groups, quantize
from .int8 import INT8_PART_DTYPES, int8_linear, int8_part_shapes, int8_store


class Int8Scratch:
    """The buffer that `Int8Linear`s widen or rebuild their matrix in, one per (device, dtype), of
    `numel` elements (the largest matrix among the layers that share it), allocated at first use
    and reused by every later call: no weight-sized allocation per call. The layers that share one
    run one after another on one stream, so it is never rewritten while a matmul still reads it."""

    def __init__(self, numel: int):
        self.numel = numel
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.numel, dtype=dtype, device=device)
        return self.buffers[key]


class Int8Linear(nn.Module):
    """A resident linear layer (attention's wq wk wv wo, the LM head) with int8 weights: `Int8Format`'s matrix
    layout and paths, held in three buffers, so that a state dict carries it. Each call widens (CPU,
    `int8_bmm_linear`) or rebuilds (elsewhere, fp32 on the CPU for many tokens) its matrix in
    `scratch`, which `int8_attention` shares among all the model's projections (default: its own,
    of this matrix's size, as the head's)."""

    PARTS = tuple(INT8_PART_DTYPES)

    def __init__(self, in_features: int, out_features: int, group_size: int, scratch: Int8Scratch | None = None,
                 bias: bool = False):
        super().__init__()
        check_groups(group_size, in_features, "attention input size")
        for part, shape in int8_part_shapes(out_features, in_features, group_size).items():
            self.register_buffer(part, torch.empty(shape, dtype=INT8_PART_DTYPES[part]))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # kept in the compute dtype
        if scratch is not None and scratch.numel < in_features * out_features:
            raise ValueError(f"an Int8Scratch of {scratch.numel} elements cannot hold a {out_features}x{in_features} "
                             "matrix")
        self.scratch = scratch or Int8Scratch(in_features * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu = x.device.type == "cpu"
        buf = self.scratch.get(x.device, torch.float32 if cpu else x.dtype)  # fp32 on the CPU, as Int8Format
        y = int8_linear(x, self.codes, self.scales, self.zeros, cpu, buf)
        return y if self.bias is None else y + self.bias


def int8_parts(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """`Int8Linear`'s buffers for the weight w [N, K], quantized on w's device."""
    out = {part: torch.empty(shape, dtype=INT8_PART_DTYPES[part], device=w.device)
           for part, shape in int8_part_shapes(*w.shape, group_size).items()}
    int8_store(*quantize(w, 8, group_size), *out.values())
    return out


# those a layer has (the short conv's and Mamba-2's in projections too); wkv_b stays dense, and linear attention's
# wba (small: two values per head)
ATTENTION_WEIGHTS = ("wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "wqkvz", "wbcx", "wzxbcdt")
ATTENTION_SUFFIXES = tuple(f"attention.{w}.weight" for w in ATTENTION_WEIGHTS)  # their names in a state dict


def check_int8_attention(config: ModelConfig, group_size: int) -> None:
    """Refuse a group size that does not divide the attention projections' inputs
    (`ModelConfig.attention_inputs`), before anything is built or written."""
    for size in config.attention_inputs:
        check_groups(group_size, size, "attention input size")


def int8_attention(model: nn.Module, group_size: int) -> None:
    """Swap every layer's attention projections for `Int8Linear`s of the same shape (on the model's
    device, usually `meta`, before the state dict is assigned), all sharing one `Int8Scratch` sized to
    the largest projection (Mixtral: wq or wo, 4096 x 4096: 32 MiB in fp16, 64 MiB in fp32 on the CPU)."""
    linears = [(blk.attention, name, getattr(blk.attention, name)) for blk in model.layers
               for name in ATTENTION_WEIGHTS if hasattr(blk.attention, name)]
    scratch = Int8Scratch(max(lin.in_features * lin.out_features for _, _, lin in linears))
    for attention, name, lin in linears:
        with lin.weight.device:
            setattr(attention, name, Int8Linear(lin.in_features, lin.out_features, group_size, scratch,
                                                bias=lin.bias is not None))


def int8_attention_state(name: str, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """The state-dict entries of `Int8Linear` that replace the weight `name` ([N, K]): an attention
    projection's, or the head's."""
    prefix = name.removesuffix("weight")
    return {prefix + part: v for part, v in int8_parts(w, group_size).items()}


def int8_head(model: nn.Module, group_size: int) -> None:
    """Swap the LM head (`model.output`) for an `Int8Linear` of the same shape, on the model's device (before
    the state dict is assigned), with its own scratch: allocated at first use, which a decode step on the CPU
    (one row, the C kernel) never makes; B rows of a batched step on the CPU (`int8_bmm_linear`), a long
    `score` or any call on another device fill it: V*D elements, fp32 on the CPU (Mixtral: 500 MiB),
    the compute dtype elsewhere."""
    lin = model.output
    with lin.weight.device:
        model.output = Int8Linear(lin.in_features, lin.out_features, group_size, bias=lin.bias is not None)
