"""Expert formats: how one expert's weights lie in one contiguous byte buffer, so that one copy
moves it. A leaf of the load path (config -> formats -> checkpoint readers -> stores).

An `ExpertFormat` says how an expert's weights lie in its buffer (`pack`), how to see them
without copying (`views`, computed once per buffer) and how to run the expert on those views
(`forward`). The dense format here stores [w1; w3] fused as w13 [2I, D] followed by w2 [D, I];
quantized formats live in `int8.py`, `int4.py` and `mxfp4.py` (on `group.py`) and follow the same three methods.

Every format computes w2 . act(w1 . x, w3 . x), where `activation(config)` picks act once per format:
silu(gate) * up, or gpt-oss's `clamped_swiglu`; where the family has expert biases (b1, b3 [I], b2 [D],
gpt-oss) they lie in the same buffer, after the weights, and join the linears; `views` gives them after
the weights' views only then, so a family without them runs the code it ran before.

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

ALIGN = 64  # bytes; every part of a packed expert starts on this boundary
SWIGLU_ALPHA = 1.702  # gpt-oss's sigmoid slope (transformers' swiglu_alpha; the MXFP4 kernels fix it too)
Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU, every family's but gpt-oss: silu(gate) * up. [T, I] x 2 -> [T, I]"""
    return F.silu(gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation, as transformers' GptOssExperts: gate clamped above at `limit`, up to
    [-limit, limit], then (up + 1) * gate * sigmoid(1.702 gate). [T, I] x 2 -> [T, I]"""
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * SWIGLU_ALPHA))


def activation(config: ModelConfig) -> Activation:
    """The experts' activation of this family: `silu_glu`, or `clamped_swiglu` at its `swiglu_limit`."""
    return silu_glu if config.swiglu_limit is None else partial(clamped_swiglu, limit=config.swiglu_limit)


def bias_parts(config: ModelConfig) -> dict[str, int]:
    """The expert biases a family has, with their lengths: b1, b3 [I] and b2 [D] (gpt-oss), or none."""
    return {"b1": config.ffn_dim, "b3": config.ffn_dim, "b2": config.dim} if config.expert_bias else {}


class ExpertFormat(Protocol):
    name: str
    nbytes: int  # size of one packed expert

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None: ...
    def views(self, buf: torch.Tensor) -> tuple: ...
    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor: ...


class DenseFormat:
    """Unquantized expert in `dtype`: w13 [2I, D] then w2 [D, I] (then, where the family has them, the
    biases b13 = [b1; b3] [2I] and b2 [D], in `dtype` too), one buffer."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        self.name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        self.dtype = dtype
        self.D, self.I = config.dim, config.ffn_dim
        self.bias = config.expert_bias
        self.act = activation(config)
        # one token on the CPU in fp32: one C call for the whole expert (cpu_kernels.py), else the torch ops below
        self.kernel = ExpertKernel("dense", self.D, self.I, 1, config.swiglu_limit) if dtype == torch.float32 else None
        self.nbytes = (3 * self.D * self.I + (2 * self.I + self.D) * self.bias) * dtype.itemsize

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        w13, w2, *biases = self.views(out)
        w13[: self.I].copy_(parts["w1"])
        w13[self.I :].copy_(parts["w3"])
        w2.copy_(parts["w2"])
        if biases:
            b13, b2 = biases
            b13[: self.I].copy_(parts["b1"])
            b13[self.I :].copy_(parts["b3"])
            b2.copy_(parts["b2"])

    def views(self, buf: torch.Tensor) -> tuple:
        """(w13 [2I, D], w2 [D, I]), then b13 [2I] and b2 [D] where the family has biases: views of the buffer."""
        flat = buf.view(self.dtype)  # [3*I*D (+ 2I + D)]
        ID, I, D = self.I * self.D, self.I, self.D
        w13, w2 = flat[: 2 * ID].view(2 * I, D), flat[2 * ID : 3 * ID].view(D, I)
        return (w13, w2, flat[3 * ID : 3 * ID + 2 * I], flat[3 * ID + 2 * I :]) if self.bias else (w13, w2)

    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        if self.kernel is not None and self.kernel.runs(x) and views[0].device.type == "cpu":
            return self.kernel(x, views)
        w13, w2, b13, b2 = views if self.bias else (*views, None, None)
        a, b = F.linear(x, w13, b13).chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
        return F.linear(self.act(a, b), w2, b2)  # [T, D]
