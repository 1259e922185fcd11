"""Expert formats: how one expert's weights lie in one contiguous byte buffer, so that one copy
moves it. A leaf of the load path (config -> formats -> checkpoint readers -> stores).

An `ExpertFormat` says how an expert's weights lie in its buffer (`pack`), how to see them
without copying (`views`, computed once per buffer) and how to run the expert on those views
(`forward`). The dense format here stores [w1; w3] fused as w13 [2I, D] followed by w2 [D, I];
quantized formats live in `quant.py` and follow the same three methods.

Legend: T tokens, D dim, I ffn dim (per expert).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig

ALIGN = 64  # bytes; every part of a packed expert starts on this boundary


class ExpertFormat(Protocol):
    name: str
    nbytes: int  # size of one packed expert

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None: ...
    def views(self, buf: torch.Tensor) -> tuple: ...
    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor: ...


class DenseFormat:
    """Unquantized expert in `dtype`: w13 [2I, D] then w2 [D, I], one buffer."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        self.name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        self.dtype = dtype
        self.D, self.I = config.dim, config.ffn_dim
        self.nbytes = 3 * self.D * self.I * dtype.itemsize

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        flat = out.view(self.dtype)  # [3*I*D]
        ID = self.I * self.D
        flat[:ID].view(self.I, self.D).copy_(parts["w1"])
        flat[ID : 2 * ID].view(self.I, self.D).copy_(parts["w3"])
        flat[2 * ID :].view(self.D, self.I).copy_(parts["w2"])

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = buf.view(self.dtype)  # [3*I*D]
        ID = self.I * self.D
        return flat[: 2 * ID].view(2 * self.I, self.D), flat[2 * ID :].view(self.D, self.I)

    def forward(self, x: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w13, w2 = views
        a, b = F.linear(x, w13).chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
        return F.linear(F.silu(a) * b, w2)  # [T, D]
