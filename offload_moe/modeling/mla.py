"""Multi-head latent attention (DeepSeek-V2, -V3): every head's keys and values come from one latent
per token, c_kv = kv_norm(x wkv_a) of kv_lora_rank values, through wkv_b; RoPE turns a separate
qk_rope_head_dim slice of q and one key slice k_pe shared by all heads. The KV cache holds just
the latent and the roped k_pe per token and layer (`ModelConfig.kv_dims`), not per-head keys and
values: 576 values a token for DeepSeek-V2-Lite's 16 heads against 16 x (192 + 128) = 5120.

A prompt (several new tokens) expands the cached latents to per-head keys and values, as
transformers does. Decode uses the absorbed form and never expands the cache: q_nope goes through
wkv_b's key part into the latent space, attends over the cached rows [latent, k_pe] as one key
shared by every head, and the attended latent goes out through wkv_b's value part.

Legend: T tokens, D dim, H heads, R kv_lora_rank, Q q_lora_rank, dn qk_nope_head_dim, dr
qk_rope_head_dim, dv v_head_dim, C cache length, N cached positions read, S pool slots, B sequences
decoding together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale
from .layers import KVCache, KVPool, Linear, RMSNorm, apply_rope

# DeepSeek's q_a_layernorm and kv_a_layernorm keep their class default, not the config's rms_norm_eps
LATENT_NORM_EPS = 1e-6


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(q/k head dim), times YaRN's mscale(factor, mscale_all_dim) squared when the RoPE is YaRN
    with an mscale_all_dim (DeepSeek's long-context checkpoints), as DeepSeek and transformers."""
    scale = config.head_dim ** -0.5
    s = config.rope_scaling
    if s is not None and s["type"] == "yarn" and s["mscale_all_dim"]:
        scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
    return scale


class LatentAttention(nn.Module):
    """MLA with the single-sequence `forward` and the batched `decode_ragged` of `layers.Attention`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        H, R = c.n_heads, c.kv_lora_rank
        self.n_heads, self.rank, self.rope_dim = H, R, c.qk_rope_head_dim
        self.nope_dim, self.v_dim = c.head_dim - c.qk_rope_head_dim, c.v_head_dim
        self.q_lora = c.q_lora_rank > 0
        if self.q_lora:
            self.wq_a = Linear(c.dim, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = Linear(c.q_lora_rank, H * c.head_dim, bias=False)
        else:
            self.wq = Linear(c.dim, H * c.head_dim, bias=False)
        self.wkv_a = Linear(c.dim, R + c.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(R, LATENT_NORM_EPS)
        self.wkv_b = Linear(R, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = Linear(H * self.v_dim, c.dim, bias=False)
        self.scale = softmax_scale(c)
        self.interleaved = c.rope_interleave

    def forward(self, x: torch.Tensor, layer: int, kv: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, D] at positions kv.pos .. kv.pos+T-1 (cos, sin [T, dr]). No sliding window here, so
        position p lives in cache row p. -> [T, D]"""
        T = x.shape[0]
        q_nope, q_pe, latent = self._project(x, cos, sin)
        start = kv.pos
        cache = kv.k[layer][0]  # [C, R+dr]
        cache[start : start + T] = latent
        if T == 1:
            return self.wo(self._absorbed(q_nope, q_pe, cache[None, : start + 1], None))
        return self.wo(self._expanded(q_nope, q_pe, cache[: start + T], start))

    def decode_ragged(self, x: torch.Tensor, layer: int, pool: KVPool, rows: torch.Tensor, pos: torch.Tensor,
                      span: int, cos: torch.Tensor, sin: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """One new token for each of B sequences, as `Attention.decode_ragged`: x [B, D], token b of pool
        slot rows[b] at position pos[b]; each reads its own slot's rows up to `span`, the rest masked. -> [B, D]"""
        q_nope, q_pe, latent = self._project(x, cos, sin)  # the B tokens as T = B
        cache = pool.k[layer][:, 0]  # [S, C, R+dr]
        cache[rows, pos] = latent
        keys = cache[block, :span] if block is not None else cache[rows, :span]  # [B, N, R+dr]
        mask = (torch.arange(span, device=x.device)[None, :] <= pos[:, None])[:, None, :]  # [B, 1, N]
        return self.wo(self._absorbed(q_nope, q_pe, keys, mask))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q_nope [H, T, dn], q_pe [H, T, dr] and the cache rows [T, R+dr] (the normed latent, then k_pe) of
        x [T, D], with RoPE at the tokens' positions (cos, sin [T, dr])."""
        T = x.shape[0]
        H, R = self.n_heads, self.rank
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora else self.wq(x)  # [T, H*(dn+dr)]
        q_nope, q_pe = q.view(T, H, -1).transpose(0, 1).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.wkv_a(x).split([R, self.rope_dim], dim=-1)  # [T, R], [T, dr]
        q_pe = apply_rope(self._halves(q_pe), cos, sin).to(x.dtype)
        k_pe = apply_rope(self._halves(k_pe), cos, sin).to(x.dtype)
        return q_nope, q_pe, torch.cat([self.kv_norm(c_kv), k_pe], dim=-1)

    def _halves(self, x: torch.Tensor) -> torch.Tensor:
        """Interleaved rotary dims (x0, x1), (x2, x3), ... in rotate-halves order (x0, x2, ..., x1, x3, ...),
        as transformers' DeepSeek-V3 does; q and k take the same order, so their products are DeepSeek's."""
        return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2) if self.interleaved else x

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """q_nope [H, B, dn], q_pe [H, B, dr]: one token of each of B sequences; keys [B, N, R+dr] the cached
        rows each reads (mask [B, 1, N] or None). Every head attends over the same rows: the heads ride
        along the query axis. -> [B, H*dv]"""
        H, B, R, dn = self.n_heads, q_nope.shape[1], self.rank, self.nope_dim
        w = self.wkv_b.weight.view(H, dn + self.v_dim, R)  # [H, dn+dv, R]: per head, its key rows then value rows
        q_lat = torch.einsum("hbd,hdr->bhr", q_nope, w[:, :dn])  # [B, H, R]
        q = torch.cat([q_lat, q_pe.transpose(0, 1)], dim=-1)  # [B, H, R+dr]
        out = F.scaled_dot_product_attention(q, keys, keys[..., :R], attn_mask=mask, scale=self.scale)  # [B, H, R]
        return torch.einsum("bhr,hvr->bhv", out, w[:, dn:]).reshape(B, H * self.v_dim)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
        """Several new tokens at positions start .. start+T-1 (q_nope [H, T, dn], q_pe [H, T, dr]) over the
        cache rows of positions 0 .. start+T-1 (rows [N, R+dr]), expanded to per-head keys and values;
        causal by position. -> [T, H*dv]"""
        H, T, N, R = self.n_heads, q_nope.shape[1], rows.shape[0], self.rank
        kv = self.wkv_b(rows[:, :R]).view(N, H, -1).transpose(0, 1)  # [H, N, dn+dv]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, rows[:, R:].expand(H, N, self.rope_dim)], dim=-1)  # [H, N, dn+dr]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [H, T, dn+dr]
        mask = torch.arange(N, device=q.device)[None, :] <= torch.arange(start, start + T, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [H, T, dv]
        return out.transpose(0, 1).reshape(T, H * self.v_dim)
