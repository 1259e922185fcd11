"""The shared pieces every family is built from: norms, RoPE, the KV cache, attention, the dense MLP.
A family picks a variant of each through its `ModelConfig` (see `models/`).

Legend for shape comments: T tokens, D dim, H query heads, G kv heads, hd head dim, C KV-cache
length, I ffn dim, L layers, S sequence slots of a KVPool, B sequences decoding together, N the
longest of their cached spans.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32, as the reference implementations, then back to the activation dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """RMSNorm, or LayerNorm with a bias (Phi-3.5-MoE), over `dim`."""
    if config.norm == "layer":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


class KVCache:
    """Preallocated keys and values for every layer: [L, G, C, hd].

    C is the context, or the sliding window when that is shorter: position p lives in slot
    p % C, so the cache is a ring that holds exactly the last C positions.
    """

    def __init__(self, config: ModelConfig, length: int, device: torch.device, dtype: torch.dtype):
        window = config.sliding_window
        self.window = window
        self.length = min(length, window) if window else length
        shape = (config.n_layers, config.n_kv_heads, self.length, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens written so far

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self) -> None:
        self.pos = 0

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor, window: int | None) -> KVCache:
        """A KVCache on given tensors k, v [L, G, C, hd] (one slot of a KVPool): no allocation."""
        kv = cls.__new__(cls)
        kv.k, kv.v, kv.window, kv.length, kv.pos = k, v, window, k.shape[2], 0
        return kv


class KVPool:
    """Keys and values of S sequences at once, [L, S, G, C, hd]: `seqs[s]` is slot s's own KVCache
    (its own ring and position) over its part, so a prompt is prefilled into a slot by the single-
    sequence forward, and `Attention.decode_ragged` reads every slot's layer at once (`k[layer]`,
    [S, G, C, hd], one contiguous block per layer)."""

    def __init__(self, config: ModelConfig, length: int, seqs: int, device: torch.device, dtype: torch.dtype):
        window = config.sliding_window
        self.window = window
        self.length = min(length, window) if window else length
        shape = (config.n_layers, seqs, config.n_kv_heads, self.length, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.seqs = [KVCache.over(self.k[:, s], self.v[:, s], window) for s in range(seqs)]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def rope_tables(hd: int, theta: float, length: int, device: torch.device,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, hd] in float32 (rotate-halves convention: frequency i turns dims i and i + hd/2).
    `hd` is the rotary dims (`ModelConfig.rotary_dim`): with partial rotary (GLM-4.5) fewer than a head's.

    `scaling` yarn (gpt-oss, DeepSeek): `yarn_inv_freq`, cos and sin times the attention factor.
    `scaling` longrope (Phi-3.5): each frequency divided by its factor, and cos, sin times an mscale;
    the long factors and mscale when `length` exceeds the original context, else the short ones. The
    engine decides once, from the context it preallocates, so that the cached keys never mix the two;
    Phi-3.5's reference code switches per sequence length (transformers 5's Phimoe keeps the short
    factors, with the long mscale, past the original context): within it all agree."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    mscale = 1.0
    if scaling is not None and scaling["type"] == "yarn":
        inv_freq, mscale = yarn_inv_freq(inv_freq, hd, theta, scaling), scaling["attention_factor"]
    elif scaling is not None:
        long = length > scaling["original_max"]
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        inv_freq = inv_freq / factors
        mscale = scaling["long_mscale" if long else "short_mscale"]
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # [len, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [len, hd]
    return emb.cos() * mscale, emb.sin() * mscale


def yarn_inv_freq(inv_freq: torch.Tensor, hd: int, theta: float, s: dict) -> torch.Tensor:
    """YaRN (gpt-oss, DeepSeek): frequencies that turn fewer than `beta_slow` times over the original
    context are divided by `factor` (interpolated), those that turn more than `beta_fast` times are
    kept (extrapolated), with a linear ramp between; `truncate` rounds the ramp's ends outward."""
    def dim_of(rotations: float) -> float:  # the dim index whose frequency turns `rotations` times
        return hd * math.log(s["original_max"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(s["beta_fast"]), dim_of(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return inv_freq / s["factor"] * (1 - keep) + inv_freq * keep


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, hd] (any leading axes, e.g. heads); cos, sin [T, r]. Partial rotary (r < hd, GLM-4.5):
    the first r dims of each head turn (rotate-halves within them, as transformers), the rest pass."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """GQA attention with the family's options: q/k/v and o biases, RMSNorm of q and k per head
    (Qwen3) or over the whole projection (OLMoE), clamping of q, k, v (OLMoE)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.qk_norm, self.clip = c.qk_norm, c.clip_qkv
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)
        if c.qk_norm != "none":
            per_head = c.qk_norm == "head"
            self.q_norm = RMSNorm(c.head_dim if per_head else c.n_heads * c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim if per_head else c.n_kv_heads * c.head_dim, c.norm_eps)

    def forward(self, x: torch.Tensor, layer: int, kv: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        H, G, hd = self.n_heads, self.n_kv, self.hd
        q, k, v = self._project(x, cos, sin)  # [H, T, hd], [G, T, hd], [G, T, hd]
        start, C = kv.pos, kv.length
        kc, vc = kv.k[layer], kv.v[layer]  # [G, C, hd]
        # grouped-query attention without repeating k/v: the H/G query heads that share a kv
        # head ride along the token axis. [H, T, hd] -> [G, H/G*T, hd]
        qg = q.reshape(G, H // G * T, hd)
        if T == 1:
            kc[:, start % C] = k[:, 0]
            vc[:, start % C] = v[:, 0]
            n = min(start + 1, C)  # the ring holds exactly the positions this token may see
            out = F.scaled_dot_product_attention(qg, kc[:, :n], vc[:, :n])  # [G, H/G, hd]
        else:
            out = self._prefill(qg, k, v, kc, vc, start, T, kv.window)  # [G, H/G*T, hd]
        out = out.reshape(H, T, hd).transpose(0, 1).reshape(T, H * hd)  # [H, T, hd] -> [T, H*hd]
        return self.wo(out)

    def decode_ragged(self, x: torch.Tensor, layer: int, pool: KVPool, rows: torch.Tensor, pos: torch.Tensor,
                      span: int, cos: torch.Tensor, sin: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """One new token for each of B sequences: x [B, D], token b of pool slot rows[b] at position
        pos[b] (cos, sin [B, hd] at those positions); `span` N = max(min(pos + 1, C)), known on the host.
        Each attends to its own slot's cached positions only: the slots are read up to the longest
        span and the rest of each masked, so a short sequence beside a long one sees exactly what it
        would alone. `block`: the same slots as a slice, when they are consecutive. -> [B, D]"""
        B = x.shape[0]
        H, G, hd = self.n_heads, self.n_kv, self.hd
        q, k, v = self._project(x, cos, sin)  # [H, B, hd], [G, B, hd], [G, B, hd]
        C = pool.length
        kc, vc = pool.k[layer], pool.v[layer]  # [S, G, C, hd]
        ring = pos % C  # [B]
        kc[rows, :, ring] = k.transpose(0, 1)  # [B, G, hd]
        vc[rows, :, ring] = v.transpose(0, 1)
        n = torch.clamp(pos + 1, max=C)  # [B] cached positions each token sees (the ring holds just those)
        N = span
        if block is not None:  # rows are consecutive slots: read a view, no copy of the cached keys
            keys, vals = kc[block, :, :N], vc[block, :, :N]  # [B, G, N, hd]
        else:
            keys, vals = kc[rows, :, :N], vc[rows, :, :N]  # [B, G, N, hd]
        mask = (torch.arange(N, device=x.device)[None, :] < n[:, None])[:, None, None, :]  # [B, 1, 1, N]
        qg = q.reshape(G, H // G, B, hd).permute(2, 0, 1, 3)  # [H, B, hd] -> [B, G, H/G, hd]
        out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask)  # [B, G, H/G, hd]
        return self.wo(out.reshape(B, H * hd))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [H, T, hd], k, v [G, T, hd] of x [T, D], with the family's norms and clamps and RoPE at
        the tokens' positions (cos, sin [T, hd])."""
        T = x.shape[0]
        H, G, hd = self.n_heads, self.n_kv, self.hd
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [T, H*hd], [T, G*hd], [T, G*hd]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(T, H, hd)
        k = k.view(T, G, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.view(T, G, hd).transpose(0, 1)  # [H|G, T, hd]
        q, k = apply_rope(q, cos, sin).to(x.dtype), apply_rope(k, cos, sin).to(x.dtype)
        return q, k, v

    @staticmethod
    def _prefill(qg, k, v, kc, vc, start: int, T: int, window: int | None) -> torch.Tensor:
        """Several new tokens: attend to the cached positions and to each other, masked by position."""
        C = kc.shape[1]
        old = min(start, C)  # cached positions still held, oldest first: start-old .. start-1
        if old:
            ring = (torch.arange(start - old, start, device=kc.device)) % C
            keys = torch.cat([kc[:, ring], k], dim=1)  # [G, old+T, hd]
            vals = torch.cat([vc[:, ring], v], dim=1)
        else:
            keys, vals = k, v
        kpos = torch.arange(start - old, start + T, device=k.device)  # [old+T]
        qpos = torch.arange(start, start + T, device=k.device)  # [T]
        allowed = kpos[None, :] <= qpos[:, None]  # [T, old+T]
        if window:
            allowed &= kpos[None, :] > qpos[:, None] - window
        heads_per_kv = qg.shape[1] // T
        mask = allowed.repeat(heads_per_kv, 1)  # [H/G*T, old+T], rows follow qg's head-major order
        out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask)
        keep = min(T, C)  # write the last `keep` new positions into the ring
        ring_new = torch.arange(start + T - keep, start + T, device=k.device) % C
        kc[:, ring_new] = k[:, T - keep :]
        vc[:, ring_new] = v[:, T - keep :]
        return out


class MLP(nn.Module):
    """A resident SwiGLU MLP: a shared expert (Qwen2-MoE) or a dense layer's MLP. [T, D] -> [T, D]"""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn, bias=False)  # gate
        self.w3 = nn.Linear(dim, ffn, bias=False)  # up
        self.w2 = nn.Linear(ffn, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
