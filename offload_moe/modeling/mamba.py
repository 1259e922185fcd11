"""Mamba-2 (Nemotron-H): in place of attention on `ModelConfig.mamba_layers`.

wzxbcdt projects x to the gate z [Hd], the conv's input xBC (x [Hd], B and C [G*N]) and the time step dt (one per
head); xBC passes a causal depthwise conv (taps W, a bias) with SiLU. Then the selective state space per head h,
its state S [N, P] (B and C shared by the H/G heads of a group; A = -exp(A_log) and the skip `skip` per head):

    dt <- clamp(softplus(dt + dt_bias));  S <- exp(dt A) S + dt B x^T;  y = C^T S + skip x

and the output, a gated RMSNorm over groups of Hd/G channels of y * silu(z), through wo, as transformers'
`NemotronHMamba2Mixer` (its gated norm with norm_before_gate false).

A sequence keeps, per layer, the conv's last W-1 inputs and S (`layers.KVCache.conv`, `.recurrent`: a fixed size,
whatever its length). A prompt (T > 1) runs the scan in its chunked form (`chunked_scan`, the state space
duality: chunks of `mamba_chunk` tokens, attention-like within a chunk, one state pass per chunk); a decode
step, the recurrent form (`_step`), for one sequence or for B together over the pool's slots. The two agree to
float32 rounding.

Legend: T tokens, D dim, H heads, P head dim, Hd = H*P, G groups, N state size, C conv channels (Hd + 2GN), W conv
taps, B sequences decoding together, n chunks, c chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import KVCache, Linear, StateMixer


class Mamba2(StateMixer):
    """The single-sequence `forward` and the batched `decode_ragged` (`layers.StateMixer`) of `layers.Attention`
    (RoPE unused)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.H, self.P, self.G, self.N = c.mamba_heads, c.mamba_head_dim, c.mamba_groups, c.mamba_state
        self.chunk, self.dt_min, self.dt_max, self.eps = c.mamba_chunk, c.mamba_dt_min, c.mamba_dt_max, c.norm_eps
        Cc = c.mamba_conv_dims
        self.wzxbcdt = Linear(c.dim, c.mamba_in_rows, bias=c.mamba_bias)
        self.conv = nn.Conv1d(Cc, Cc, c.mamba_conv_kernel, groups=Cc, bias=c.mamba_conv_bias)  # weight [C, 1, W]
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.skip = nn.Parameter(torch.empty(self.H))  # the checkpoint's `D`
        self.norm = nn.Parameter(torch.empty(c.mamba_inner))  # the gated norm's weight
        self.wo = Linear(c.mamba_inner, c.dim, bias=c.mamba_bias)

    def forward(self, x: torch.Tensor, layer: int, kv: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, D], the next T tokens of kv's sequence: its state in, its state out. -> [T, D]"""
        conv, S = kv.conv[layer], kv.recurrent[layer]  # [C, W-1], [H, N, P]
        if x.shape[0] == 1:
            return self._step(x, conv[None], S[None])
        z, xbc, dt = self._project(x)  # [T, Hd], [T, C], [T, H]
        seq = torch.cat([conv, xbc.t()], dim=1)  # [C, W-1+T]
        conv.copy_(seq[:, seq.shape[1] - conv.shape[1]:])
        xbc = F.silu(F.conv1d(seq[None], self.conv.weight, self.conv.bias, groups=seq.shape[0])[0]).t()  # [T, C]
        xs, B, C = self._split(xbc)  # [T, H, P], [T, H, N] x 2, float32
        y = chunked_scan(xs, self._dt(dt), -self.A_log.float().exp(), B, C, S, self.chunk)  # [T, H, P]
        return self._out(y + self.skip.float()[:, None] * xs, z)

    def _step(self, x: torch.Tensor, conv: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """One token of each of B sequences, x [B, D], their conv inputs [B, C, W-1] and states [B, H, N, P]
        updated in place (one sequence alone: B = 1). -> [B, D]"""
        z, xbc, dt = self._project(x)  # [B, Hd], [B, C], [B, H]
        seq = torch.cat([conv, xbc[:, :, None]], dim=2)  # [B, C, W]
        conv.copy_(seq[:, :, 1:])
        xbc = (seq * self.conv.weight[:, 0]).sum(-1)  # [B, C]: the conv's one output per channel
        if self.conv.bias is not None:
            xbc = xbc + self.conv.bias
        xs, B, C = self._split(F.silu(xbc))  # [B, H, P], [B, H, N] x 2
        dt = self._dt(dt)  # [B, H]
        S.mul_((dt * -self.A_log.float().exp()).exp()[..., None, None])
        S.add_(B[..., None] * (dt[..., None] * xs)[..., None, :])  # [B, H, N, 1] x [B, H, 1, P]
        y = (C[..., None, :] @ S).squeeze(-2)  # [B, H, 1, N] @ [B, H, N, P] -> [B, H, P]
        return self._out(y + self.skip.float()[:, None] * xs, z)

    def _project(self, x: torch.Tensor):
        """x [T, D] -> z [T, Hd], xBC [T, C], dt [T, H]."""
        Hd = self.H * self.P
        return self.wzxbcdt(x).split([Hd, Hd + 2 * self.G * self.N, self.H], dim=-1)

    def _split(self, xbc: torch.Tensor):
        """The conv's output [T, C] -> x [T, H, P], and B, C [T, H, N] (each group's for its H/G heads), float32."""
        T, H, G, N = xbc.shape[0], self.H, self.G, self.N
        xs, B, C = xbc.float().split([H * self.P, G * N, G * N], dim=-1)
        B, C = (t.view(T, G, N).repeat_interleave(H // G, dim=1) for t in (B, C))
        return xs.view(T, H, self.P), B, C

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        """The time step [T, H]: softplus(dt + dt_bias) in float32, clamped to the config's limits."""
        return F.softplus(dt.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [T, H, P] in float32 and the gate z [T, Hd] -> the gated group RMSNorm of y * silu(z), through wo."""
        T = y.shape[0]
        g = (y.reshape(T, -1) * F.silu(z.float())).view(T, self.G, -1)  # [T, G, Hd/G]
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.wo((self.norm.float() * g.view(T, -1)).to(z.dtype))


def chunked_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 S: torch.Tensor, chunk: int) -> torch.Tensor:
    """T tokens of one sequence through the selective scan in chunks of `chunk`, from its state S [H, N, P]
    (updated in place): x [T, H, P], dt [T, H], A [H], B, C [T, H, N] (float32), as transformers'
    `mamba2_chunk_scan` (the skip term not included). Within a chunk the outputs are one masked product, the
    decay between each pair of tokens times C_l . B_s; the chunks then run one after the other, each reading
    the state the previous ones left. -> y [T, H, P]"""
    T, H, P = x.shape
    pad = (-T) % chunk  # zero tokens at the end: dt 0, so they neither decay nor write; their outputs are dropped
    x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    dt = F.pad(dt, (0, 0, 0, pad))
    n = (T + pad) // chunk
    xdt = (x * dt[..., None]).permute(1, 0, 2).reshape(H, n, chunk, P)  # [H, n, c, P]
    B, C = (t.permute(1, 0, 2).reshape(H, n, chunk, -1) for t in (B, C))  # [H, n, c, N]
    a = (dt * A).t().reshape(H, n, chunk).cumsum(-1)  # [H, n, c]: the log decay from the chunk's start to each token
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).triu(1)
    decay = (a[..., :, None] - a[..., None, :]).masked_fill(later, float("-inf")).exp()  # [H, n, c, c]
    y = ((C @ B.transpose(-1, -2)) * decay) @ xdt  # [H, n, c, P]: within each chunk
    to_end = (a[..., -1:] - a).exp()[..., None]  # [H, n, c, 1]: each token's decay to its chunk's end
    writes = (B * to_end).transpose(-1, -2) @ xdt  # [H, n, N, P]: what each chunk adds to the state
    from_start = a.exp()[..., None]  # [H, n, c, 1]
    chunk_decay = a[..., -1].exp()[..., None, None]  # [H, n, 1, 1]
    state = S
    for i in range(n):
        y[:, i] += (C[:, i] @ state) * from_start[:, i]  # what the state before the chunk gives
        state = state * chunk_decay[:, i] + writes[:, i]
    S.copy_(state)
    return y.reshape(H, n * chunk, P)[:, :T].transpose(0, 1)  # [T, H, P]
