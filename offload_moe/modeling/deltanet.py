"""Gated DeltaNet linear attention (Qwen3-Next): in place of attention on `ModelConfig.linear_layers`.

Each layer projects x to q, k (Hk heads of dk), v and z (Hv heads of dv) through wqkvz, and to b, a (one per
value head) through wba; both in Qwen3-Next's grouped order, per key head its q, k, then the v and z of its
Hv/Hk value heads (its b then its a). q, k and v side by side pass a causal depthwise conv (kernel taps)
with SiLU. Then the gated delta rule per value head, its state S [dk, dv] (q and k L2-normed, q times
1/sqrt(dk), each key head serving Hv/Hk value heads):

    S <- exp(g) S;  S <- S + k (beta (v - k^T S))^T;  o = q^T S,  with beta = sigmoid(b),
    g = -exp(A_log) softplus(a + dt_bias)

and the output, RMSNorm(o) * silu(z) per value head, through wo.

A sequence keeps, per layer, the conv's last kernel-1 inputs and S (`layers.KVCache.conv`, `.recurrent`:
a fixed size, whatever its length). A prompt (T > 1) runs the delta rule in its chunked form (`chunked`,
transformers' `torch_chunk_gated_delta_rule`: chunks of 64 tokens, a triangular solve within each and one
state update per chunk); a decode step, the recurrent form (`recurrent_step`), for one sequence or for B
together over the pool's slots. The two agree to float32 rounding.

Legend: T tokens, D dim, Hk key heads, Hv value heads, dk key dims, dv value dims, C conv channels (q, k, v:
2 Hk dk + Hv dv), W conv taps, B sequences decoding together, S pool slots, n chunks, c chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import KVCache, Linear, RMSNorm, StateMixer

CHUNK = 64  # tokens per chunk of the chunked delta rule, as transformers
L2_EPS = 1e-6  # q and k are L2-normed with this epsilon, as transformers (after the FLA library)


class GatedDeltaNet(StateMixer):
    """The single-sequence `forward` and the batched `decode_ragged` (`layers.StateMixer`) of `layers.Attention`
    (RoPE unused)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.k_heads, self.v_heads = c.linear_k_heads, c.linear_v_heads
        self.k_dim, self.v_dim = c.linear_k_dim, c.linear_v_dim
        Kd, Vd, C = c.linear_key_dims, c.linear_value_dims, c.conv_dims
        self.wqkvz = Linear(c.dim, 2 * Kd + 2 * Vd, bias=False)
        self.wba = Linear(c.dim, 2 * c.linear_v_heads, bias=False)
        self.conv = nn.Conv1d(C, C, c.linear_conv_kernel, groups=C, bias=False)  # weight [C, 1, W]
        self.dt_bias = nn.Parameter(torch.empty(c.linear_v_heads))
        self.A_log = nn.Parameter(torch.empty(c.linear_v_heads))
        self.norm = RMSNorm(c.linear_v_dim, c.norm_eps)  # plain weights, whatever the family's other norms
        self.wo = Linear(Vd, c.dim, bias=False)

    def forward(self, x: torch.Tensor, layer: int, kv: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, D], the next T tokens of kv's sequence: its state in, its state out. -> [T, D]"""
        T = x.shape[0]
        conv, S = kv.conv[layer], kv.recurrent[layer]  # [C, W-1], [Hv, dk, dv]
        if T == 1:
            return self._step(x, conv[None], S[None])
        qkv, z, b, a = self._project(x)  # [T, C], [T, Hv, dv], [T, Hv], [T, Hv]
        seq = torch.cat([conv, qkv.t()], dim=1)  # [C, W-1+T]
        conv.copy_(seq[:, seq.shape[1] - conv.shape[1]:])
        mixed = F.silu(F.conv1d(seq[None], self.conv.weight, groups=seq.shape[0])[0]).t()  # [T, C]
        q, k, v, g, beta = self._heads(mixed, b, a)  # [Hv, T, dk], [Hv, T, dk], [Hv, T, dv], [Hv, T] x 2
        return self._out(chunked(q, k, v, g, beta, S).transpose(0, 1), z)  # [Hv, T, dv] -> [T, Hv, dv]

    def _step(self, x: torch.Tensor, conv: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """One token of each of B sequences, x [B, D], their conv inputs [B, C, W-1] and states [B, Hv, dk, dv]
        updated in place (one sequence alone: B = 1). -> [B, D]"""
        qkv, z, b, a = self._project(x)  # [B, C], [B, Hv, dv], [B, Hv], [B, Hv]
        seq = torch.cat([conv, qkv[:, :, None]], dim=2)  # [B, C, W]
        conv.copy_(seq[:, :, 1:])
        mixed = F.silu((seq * self.conv.weight[:, 0]).sum(-1))  # [B, C]: the conv's one output per channel
        q, k, v, g, beta = self._heads(mixed, b, a)  # [Hv, B, dk], [Hv, B, dk], [Hv, B, dv], [Hv, B] x 2
        o = recurrent_step(S, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g.t(), beta.t())
        return self._out(o, z)  # o [B, Hv, dv]

    def _project(self, x: torch.Tensor):
        """x [T, D] -> qkv [T, C] (every q, then every k, then every v), z [T, Hv, dv], b, a [T, Hv]: out of
        the grouped order of wqkvz and wba."""
        T, Hk, dk, dv = x.shape[0], self.k_heads, self.k_dim, self.v_dim
        r = self.v_heads // Hk  # value heads per key head
        q, k, v, z = self.wqkvz(x).view(T, Hk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = self.wba(x).view(T, Hk, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
        return qkv, z.reshape(T, self.v_heads, dv), b.reshape(T, -1), a.reshape(T, -1)

    def _heads(self, mixed: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
        """The conv's output mixed [T, C] and b, a [T, Hv] -> the delta rule's inputs in float32, value heads
        first: q (L2-normed, times 1/sqrt(dk)), k (L2-normed) [Hv, T, dk] (each key head repeated for its
        value heads), v [Hv, T, dv], the log decay g and the write strength beta [Hv, T]."""
        T, Hk, Hv, dk = mixed.shape[0], self.k_heads, self.v_heads, self.k_dim
        q, k, v = mixed.float().split([Hk * dk, Hk * dk, Hv * self.v_dim], dim=-1)
        q, k = (_l2norm(t.reshape(T, Hk, dk)) for t in (q, k))
        q, k = (t.repeat_interleave(Hv // Hk, dim=1).transpose(0, 1) for t in (q * dk ** -0.5, k))  # [Hv, T, dk]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [T, Hv]
        beta = b.sigmoid().float()
        return q, k, v.reshape(T, Hv, self.v_dim).transpose(0, 1), g.t(), beta.t()

    def _out(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o [T, Hv, dv] in float32 and the gate z [T, Hv, dv] -> RMSNorm(o) * silu(z) through wo: [T, D]."""
        o = o.to(z.dtype)
        gated = (self.norm(o) * F.silu(z.float())).to(z.dtype)  # [T, Hv, dv]
        return self.wo(gated.flatten(1))


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def recurrent_step(S: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                   beta: torch.Tensor) -> torch.Tensor:
    """One token of each of B sequences through the gated delta rule, their states S [B, Hv, dk, dv] updated
    in place: q, k [B, Hv, dk], v [B, Hv, dv], g, beta [B, Hv] (float32). -> o [B, Hv, dv]"""
    S.mul_(g.exp()[..., None, None])
    remembered = torch.einsum("bhk,bhkv->bhv", k, S)  # what S already gives for k
    S.add_(k[..., None] * ((v - remembered) * beta[..., None])[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q, S)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            S: torch.Tensor) -> torch.Tensor:
    """T tokens of one sequence through the gated delta rule in chunks of CHUNK, from its state S [Hv, dk, dv]
    (updated in place): q, k [Hv, T, dk], v [Hv, T, dv], g, beta [Hv, T] (float32), as transformers'
    `torch_chunk_gated_delta_rule`. Within a chunk the T sequential updates are one triangular solve (the
    UT transform: the values each token writes, less what the earlier tokens of its chunk already wrote);
    the chunks then run one after the other, each reading the state the previous ones left. -> [Hv, T, dv]"""
    H, T, _ = k.shape
    pad = (-T) % CHUNK  # zero tokens at the end: they write nothing (beta 0) and their outputs are dropped
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // CHUNK
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (t.view(H, n, CHUNK, -1) for t in (q, k, k_beta, v_beta))  # [Hv, n, c, d]
    g = g.view(H, n, CHUNK).cumsum(-1)  # [Hv, n, c]: the log decay from the chunk's start to each token
    later = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=k.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(later, float("-inf")).exp()  # [Hv, n, c, c]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # its strictly lower part, with a unit diagonal
    intra = (q @ k.transpose(-1, -2)) * decay  # [Hv, n, c, c]: causal, the token itself included
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)  # [Hv, n, c, dv]
    k_decayed = torch.linalg.solve_triangular(system, k_beta * g.exp()[..., None], upper=False, unitriangular=True)
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]  # decayed to the chunk's end
    chunk_decay = g[..., -1].exp()[..., None, None]  # [Hv, n, 1, 1]
    out = torch.empty_like(v_beta)  # [Hv, n, c, dv]
    state = S
    for i in range(n):
        v_new = new_values[:, i] - k_decayed[:, i] @ state  # [Hv, c, dv]
        out[:, i] = q[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    S.copy_(state)
    return out.view(H, n * CHUNK, -1)[:, :T]
