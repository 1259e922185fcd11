"""LFM2's gated short convolution: in place of attention on `ModelConfig.conv_layers`.

wbcx projects x to three gates B, C and the input x' (D each, in that order); B * x' passes a causal depthwise
conv of W taps (`conv_kernel`, no activation), and C gates its output before wo:

    y = wo(C * conv(B * x'))

as transformers' `Lfm2MoeShortConv`. A sequence keeps, per layer, the conv's last W-1 inputs B * x'
(`layers.KVCache.conv`: a fixed size, whatever its length); a prompt (T > 1) convolves them with its own
inputs at once, a decode step takes the one output per channel, for one sequence or for B together over
the pool's slots.

Legend: T tokens, D dim, W conv taps, B sequences decoding together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import KVCache, KVPool, Linear


class ShortConv(nn.Module):
    """The single-sequence `forward` and the batched `decode_ragged` of `layers.Attention` (RoPE unused)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.dim
        self.wbcx = Linear(D, 3 * D, bias=config.conv_bias)
        self.conv = nn.Conv1d(D, D, config.conv_kernel, groups=D, bias=config.conv_bias)  # weight [D, 1, W]
        self.wo = Linear(D, D, bias=config.conv_bias)

    def forward(self, x: torch.Tensor, layer: int, kv: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, D], the next T tokens of kv's sequence: its conv inputs in, its conv inputs out. -> [T, D]"""
        state = kv.conv[layer]  # [D, W-1]
        if x.shape[0] == 1:
            return self._step(x, state[None])
        b, c, u = self.wbcx(x).chunk(3, dim=-1)  # [T, D] each
        seq = torch.cat([state, (b * u).t()], dim=1)  # [D, W-1+T]
        state.copy_(seq[:, seq.shape[1] - state.shape[1]:])
        y = F.conv1d(seq[None], self.conv.weight, self.conv.bias, groups=seq.shape[0])[0]  # [D, T]
        return self.wo(c * y.t())

    def decode_ragged(self, x: torch.Tensor, layer: int, pool: KVPool, rows: torch.Tensor, pos: torch.Tensor,
                      span: int, cos: torch.Tensor, sin: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """One new token for each of B sequences: x [B, D], token b of pool slot rows[b], each with its own
        slot's conv inputs; `block`: the same slots as a slice when consecutive (updated in place through a
        view), else gathered and written back. -> [B, D]"""
        if block is not None:
            return self._step(x, pool.conv[layer][block])
        state = pool.conv[layer][rows]  # [B, D, W-1]
        out = self._step(x, state)
        pool.conv[layer][rows] = state
        return out

    def _step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token of each of B sequences, x [B, D], their conv inputs [B, D, W-1] updated in place. -> [B, D]"""
        b, c, u = self.wbcx(x).chunk(3, dim=-1)  # [B, D] each
        seq = torch.cat([state, (b * u)[:, :, None]], dim=2)  # [B, D, W]
        state.copy_(seq[:, :, 1:])
        y = (seq * self.conv.weight[:, 0]).sum(-1)  # [B, D]: the conv's one output per channel
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return self.wo(c * y)
