"""Expert formats: how one expert's weights lie in one contiguous byte buffer, so that one copy
moves it. A leaf of the load path (config -> formats -> checkpoint readers -> stores).

An `ExpertFormat` says how an expert's weights lie in its buffer (`pack`), how to see them
without copying (`views`, computed once per buffer, given the buffer's row: a GGUF file's types may differ by
layer) and how to run the expert on those views (`forward`). The dense format here stores [w1; w3] fused as w13
[2I, D] (relu2 experts: w1 alone, [I, D]) followed by w2 [D, I]; quantized formats live in `int8.py`, `int4.py`
and `mxfp4.py` (on `group.py`), GGUF's own types in `ggml.py`, and follow the same three methods.

Every format computes w2 . act(w13 . x), where `activation(config)` picks act once per format: silu(gate) * up,
gpt-oss's `clamped_swiglu`, or Nemotron-H's relu(up)^2 (`relu2`: no gate, so w13 is w1 alone); where the family
has expert biases (b1, b3 [I], b2 [D], gpt-oss) they lie in the same buffer, after the weights, and join the
linears; `views` gives them after the weights' views only then, so a family without them runs the code it ran
before.

Legend: T tokens, D dim, I ffn dim (per expert).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .cpu_kernels import ExpertKernel
from .gemm import linear

ALIGN = 64  # bytes; every part of a packed expert starts on this boundary
SWIGLU_ALPHA = 1.702  # gpt-oss's sigmoid slope (transformers' swiglu_alpha; the MXFP4 kernels fix it too)
Activation = Callable[[torch.Tensor], torch.Tensor]


def silu_glu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU, most families': silu(gate) * up, h = [gate, up]. [T, 2I] -> [T, I]"""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def clamped_swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation, as transformers' GptOssExperts, h = [gate, up]: gate clamped above at `limit`,
    up to [-limit, limit], then (up + 1) * gate * sigmoid(1.702 gate). [T, 2I] -> [T, I]"""
    gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * SWIGLU_ALPHA))


def relu2(h: torch.Tensor) -> torch.Tensor:
    """Nemotron-H's ungated activation: relu(up)^2, h = up. [T, I] -> [T, I]"""
    return F.relu(h).square()


def activation(config: ModelConfig) -> Activation:
    """The experts' activation of this family: `silu_glu`, `clamped_swiglu` at its `swiglu_limit`, or `relu2`."""
    if config.ffn_act == "relu2":
        return relu2
    return silu_glu if config.swiglu_limit is None else partial(clamped_swiglu, limit=config.swiglu_limit)


def up_parts(config: ModelConfig) -> tuple[str, ...]:
    """The parts that w13 stacks, in order: w1 and w3, or w1 alone (relu2)."""
    return tuple(p for p in config.expert_parts if p != "w2")


def bias_parts(config: ModelConfig) -> dict[str, int]:
    """The expert biases a family has, with their lengths: b1, b3 [I] and b2 [D] (gpt-oss), or none."""
    return {"b1": config.ffn_dim, "b3": config.ffn_dim, "b2": config.dim} if config.expert_bias else {}


class ExpertFormat(Protocol):
    name: str
    nbytes: int  # size of one packed expert

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None: ...
    def views(self, buf: torch.Tensor, row: int = 0) -> tuple: ...  # row: the layer's, where its layout differs
    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor: ...


class DenseFormat:
    """Unquantized expert in `dtype`: w13 [2I, D] (relu2: [I, D]) then w2 [D, I] (then, where the family has them,
    the biases b13 = [b1; b3] [2I] and b2 [D], in `dtype` too), one buffer."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        self.name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        self.dtype = dtype
        self.D, self.I = config.dim, config.ffn_dim
        self.up = up_parts(config)
        self.bias = config.expert_bias
        self.act = activation(config)
        # one token on the CPU in fp32: one C call for the whole expert (cpu_kernels.py; SwiGLU), else the torch ops
        gated = len(self.up) == 2
        self.kernel = (ExpertKernel("dense", self.D, self.I, 1, config.swiglu_limit)
                       if dtype == torch.float32 and gated else None)
        self.nbytes = (config.ffn_mats * self.D * self.I + (2 * self.I + self.D) * self.bias) * dtype.itemsize

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        w13, w2, *biases = self.views(out)
        for i, part in enumerate(self.up):
            w13[i * self.I : (i + 1) * self.I].copy_(parts[part])
        w2.copy_(parts["w2"])
        if biases:
            b13, b2 = biases
            b13[: self.I].copy_(parts["b1"])
            b13[self.I :].copy_(parts["b3"])
            b2.copy_(parts["b2"])

    def views(self, buf: torch.Tensor, row: int = 0) -> tuple:
        """(w13 [2I, D] (relu2: [I, D]), w2 [D, I]), then b13 [2I] and b2 [D] where the family has biases: views of
        the buffer."""
        flat = buf.view(self.dtype)  # [3*I*D (+ 2I + D)], relu2 [2*I*D]
        I, D, n = self.I, self.D, len(self.up)
        w13, w2 = flat[: n * I * D].view(n * I, D), flat[n * I * D : (n + 1) * I * D].view(D, I)
        end = (n + 1) * I * D
        return (w13, w2, flat[end : end + 2 * I], flat[end + 2 * I :]) if self.bias else (w13, w2)

    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        if self.kernel is not None and self.kernel.runs(x) and views[0].device.type == "cpu":
            return self.kernel(x, views)
        w13, w2, b13, b2 = views if self.bias else (*views, None, None)
        return linear(self.act(linear(x, w13, b13)), w2, b2)  # [T, 2I or I] -> [T, I] -> [T, D]
