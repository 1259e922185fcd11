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

from ..config import ModelConfig
from ..formats import gemm


class Linear(nn.Linear):
    """nn.Linear, its products of several tokens on the CPU by the faster of torch's GEMMs (`formats/gemm.py`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """`plus_one`: the weights are stored centred on zero and applied as 1 + w, and the product is taken in
    float32 before the cast back (Qwen3-Next's, after Gemma's); else w times the normed x in its dtype (Llama's)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32, as the reference implementations, then back to the activation dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def make_rms(config: ModelConfig, dim: int) -> RMSNorm:
    """The family's RMSNorm over `dim` (QK-norm's too): plain, or with zero-centred weights (`rms_plus_one`)."""
    return RMSNorm(dim, config.norm_eps, plus_one=config.norm == "rms_plus_one")


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """The family's RMSNorm (`make_rms`), or LayerNorm with a bias (Phi-3.5-MoE), over `dim`."""
    if config.norm == "layer":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return make_rms(config, dim)


def sequence_buffers(config: ModelConfig, length: int, lead: tuple[int, ...], device: torch.device,
                     dtype: torch.dtype) -> tuple[list, list, list, list]:
    """What `lead` sequences keep per layer (lead: () for one, (S,) for a pool), zeroed: keys and values
    [*lead, G, C_l, hd] (C_l = `ModelConfig.kv_length`: none in a linear attention or short conv layer), and a
    linear attention layer's state, None elsewhere: its conv's last inputs [*lead, conv_dims, kernel-1] in `dtype`
    and the delta rule's state [*lead, Hv, dk, dv] in float32 (`ModelConfig.state_bytes`); a short conv layer's,
    its conv's last inputs [*lead, D, conv_kernel-1] in `dtype` (recurrent None); a Mamba-2 layer's, its conv's
    last inputs [*lead, mamba_conv_dims, kernel-1] in `dtype` and its SSM state [*lead, heads, state, head dim] in
    float32."""
    heads, k, v = config.kv_dims
    lengths = [config.kv_length(i, length) for i in range(config.n_layers)]
    keys = [torch.zeros((*lead, heads, n, k), device=device, dtype=dtype) for n in lengths]
    values = [torch.zeros((*lead, heads, n, v), device=device, dtype=dtype) for n in lengths]
    linear = [i in config.linear_layers for i in range(config.n_layers)]
    conv = [torch.zeros((*lead, config.conv_dims, config.linear_conv_kernel - 1), device=device, dtype=dtype)
            if lin else None for lin in linear]
    for i in config.conv_layers:
        conv[i] = torch.zeros((*lead, config.dim, config.conv_kernel - 1), device=device, dtype=dtype)
    shape = (config.linear_v_heads, config.linear_k_dim, config.linear_v_dim)
    recurrent = [torch.zeros((*lead, *shape), device=device, dtype=torch.float32) if lin else None for lin in linear]
    for i in config.mamba_layers:
        conv[i] = torch.zeros((*lead, config.mamba_conv_dims, config.mamba_conv_kernel - 1), device=device,
                              dtype=dtype)
        recurrent[i] = torch.zeros((*lead, config.mamba_heads, config.mamba_state, config.mamba_head_dim),
                                   device=device, dtype=torch.float32)
    return keys, values, conv, recurrent


class KVCache:
    """Preallocated keys and values, one tensor per layer: k[layer], v[layer] [G, C_l, hd] (latent attention:
    one latent row per token as k [1, C_l, R + dr], and an empty v: `ModelConfig.kv_dims`).

    C_l is the context, or the layer's sliding window when that is shorter (`ModelConfig.kv_length`):
    position p lives in slot p % C_l, so the cache is a ring that holds exactly the last C_l positions.
    With a window on some layers only (gpt-oss: 128 on every other layer), those layers' rings hold just
    their window and the others the whole context, and the memory plan counts each layer's own length.

    A linear attention or Mamba-2 layer (`deltanet.py`, `mamba.py`) has no keys or values (C_l = 0) but a state
    of fixed size, conv[layer] and recurrent[layer] (`sequence_buffers`), which `reset` zeroes: a new sequence
    starts from none; a short conv layer (`shortconv.py`), conv[layer] alone. Elsewhere both are None (and a
    layer without attention holds empty keys and values).
    """

    def __init__(self, config: ModelConfig, length: int, device: torch.device, dtype: torch.dtype):
        windows = [config.window_of(i) for i in range(config.n_layers)]
        self._set(*sequence_buffers(config, length, (), device, dtype), windows)

    def _set(self, k: list, v: list, conv: list, recurrent: list, windows: list[int | None]) -> None:
        self.k, self.v, self.conv, self.recurrent, self.windows = k, v, conv, recurrent, windows
        self.length = max(t.shape[-2] for t in k)  # the positions the longest layer holds
        self.pos = 0  # tokens written so far

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.conv, *self.recurrent)
                   if t is not None)

    def reset(self) -> None:
        self.pos = 0
        for t in (*self.conv, *self.recurrent):
            if t is not None:
                t.zero_()

    @classmethod
    def over(cls, k: list, v: list, conv: list, recurrent: list, windows: list[int | None]) -> KVCache:
        """A KVCache on given per-layer tensors (one slot of a KVPool): no allocation."""
        kv = cls.__new__(cls)
        kv._set(k, v, conv, recurrent, windows)
        return kv


class KVPool:
    """Keys and values of S sequences at once, per layer k[layer], v[layer] [S, G, C_l, hd], and the linear
    attention layers' state conv[layer], recurrent[layer] [S, ...]: `seqs[s]` is slot s's own KVCache (its own
    rings, state and position) over its part, so a prompt is prefilled into a slot by the single-sequence
    forward, and `decode_ragged` reads every slot's layer at once (`k[layer]`, one contiguous block per layer)."""

    def __init__(self, config: ModelConfig, length: int, seqs: int, device: torch.device, dtype: torch.dtype):
        windows = [config.window_of(i) for i in range(config.n_layers)]
        self.k, self.v, self.conv, self.recurrent = sequence_buffers(config, length, (seqs,), device, dtype)
        self.length = max(t.shape[-2] for t in self.k)

        def slot(ts: list, s: int) -> list:
            return [None if t is None else t[s] for t in ts]

        self.seqs = [KVCache.over(slot(self.k, s), slot(self.v, s), slot(self.conv, s), slot(self.recurrent, s),
                                  windows) for s in range(seqs)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.conv, *self.recurrent)
                   if t is not None)


class StateMixer(nn.Module):
    """What a layer that keeps a conv's inputs and a recurrent state per sequence (Gated DeltaNet, Mamba-2) does for a
    batched decode step, around its own one-token `_step(x [B, D], conv [B, ...], state [B, ...]) -> [B, D]`, which
    updates both in place."""

    def decode_ragged(self, x: torch.Tensor, layer: int, pool: KVPool, rows: torch.Tensor, pos: torch.Tensor,
                      span: int, cos: torch.Tensor, sin: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """One new token for each of B sequences: x [B, D], token b of pool slot rows[b], each with its own
        slot's state; `block`: the same slots as a slice when consecutive (the state updated in place through
        a view), else gathered and written back. -> [B, D]"""
        if block is not None:
            return self._step(x, pool.conv[layer][block], pool.recurrent[layer][block])
        conv, state = pool.conv[layer][rows], pool.recurrent[layer][rows]  # [B, C, W-1], [B, ...]
        out = self._step(x, conv, state)
        pool.conv[layer][rows], pool.recurrent[layer][rows] = conv, state
        return out


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
    if r == 0:  # no RoPE (Nemotron-H's attention)
        return x
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


SINK_SCORES = 1 << 24  # scores (floats) one `attend` step with sinks may hold: 64 MiB in float32


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), where `mask` allows) v for q [..., R, hd] and k, v [..., S, hd] (any leading
    axes that broadcast; mask, bool, broadcasts to [..., R, S]); by SDPA, unless there are `sinks`.

    `sinks` (gpt-oss), one logit per row of q, broadcast to [..., R, 1]: a column that joins each row's
    softmax and takes no value, so a row's weights on the keys sum to less than 1, as transformers' eager
    attention computes it. SDPA has no such column, so these rows are computed here: the scores, the
    sink column, a float32 softmax, the sink dropped, the weights times v; in steps of rows that keep the
    scores under SINK_SCORES elements (a long prompt's [H, T, T] would not fit a card)."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    R, S = q.shape[-2], k.shape[-2]
    step = max(1, SINK_SCORES // max(1, S * q[..., :1, :1].numel()))
    outs = []
    for r in range(0, R, step):
        rows = slice(r, r + step)
        scores = torch.matmul(q[..., rows, :], k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [..., r, S]
        if mask is not None:
            scores = scores.masked_fill(~(mask[..., rows, :] if mask.shape[-2] > 1 else mask), float("-inf"))
        row_sinks = sinks[..., rows, :] if sinks.shape[-2] > 1 else sinks
        logits = torch.cat([scores, row_sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], dim=-1)
        weights = torch.softmax(logits.float(), dim=-1)[..., :-1].to(v.dtype)  # [..., r, S]
        outs.append(torch.matmul(weights, v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


class Attention(nn.Module):
    """GQA attention with the family's options: q/k/v and o biases, RMSNorm of q and k per head
    (Qwen3) or over the whole projection (OLMoE), clamping of q, k, v (OLMoE), a learned sink logit
    per head (gpt-oss, `attend`), a sliding window on all layers or some (`KVCache`), and an output
    gate (Qwen3-Next: wq gives each head's queries then its gate; the output times sigmoid(gate))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.qk_norm, self.clip, self.gated = c.qk_norm, c.clip_qkv, c.attention_output_gate
        self.wq = Linear(c.dim, c.n_heads * c.head_dim * (1 + self.gated), bias=c.qkv_bias)
        self.wk = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wv = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wo = Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)
        if c.qk_norm != "none":
            per_head = c.qk_norm == "head"
            self.q_norm = make_rms(c, c.head_dim if per_head else c.n_heads * c.head_dim)
            self.k_norm = make_rms(c, c.head_dim if per_head else c.n_kv_heads * c.head_dim)
        self.sinks = nn.Parameter(torch.empty(c.n_heads)) if c.attention_sinks else None  # [H]

    def forward(self, x: torch.Tensor, layer: int, kv: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        H, G, hd = self.n_heads, self.n_kv, self.hd
        q, k, v, gate = self._project(x, cos, sin)  # [H, T, hd], [G, T, hd], [G, T, hd], [T, H*hd] or None
        kc, vc = kv.k[layer], kv.v[layer]  # [G, C, hd], C this layer's length
        start, C = kv.pos, kc.shape[1]
        # grouped-query attention without repeating k/v: the H/G query heads that share a kv
        # head ride along the token axis. [H, T, hd] -> [G, H/G*T, hd]
        qg = q.reshape(G, H // G * T, hd)
        sinks = None if self.sinks is None else self.sinks.view(G, H // G, 1, 1).expand(G, H // G, T, 1)
        sinks = None if sinks is None else sinks.reshape(G, H // G * T, 1)  # one per row of qg
        if T == 1:
            kc[:, start % C] = k[:, 0]
            vc[:, start % C] = v[:, 0]
            n = min(start + 1, C)  # the ring holds exactly the positions this token may see
            out = attend(qg, kc[:, :n], vc[:, :n], None, sinks)  # [G, H/G, hd]
        else:
            out = self._prefill(qg, k, v, kc, vc, start, T, kv.windows[layer], sinks)  # [G, H/G*T, hd]
        out = out.reshape(H, T, hd).transpose(0, 1).reshape(T, H * hd)  # [H, T, hd] -> [T, H*hd]
        return self.wo(out if gate is None else out * torch.sigmoid(gate))

    def decode_ragged(self, x: torch.Tensor, layer: int, pool: KVPool, rows: torch.Tensor, pos: torch.Tensor,
                      span: int, cos: torch.Tensor, sin: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """One new token for each of B sequences: x [B, D], token b of pool slot rows[b] at position
        pos[b] (cos, sin [B, hd] at those positions); `span` = max(min(pos + 1, pool.length)), known on
        the host (N = min(span, C) for a layer whose ring is shorter). Each attends to its own slot's
        cached positions only: the slots are read up to the longest span and the rest of each masked,
        so a short sequence beside a long one sees exactly what it would alone. `block`: the same slots
        as a slice, when they are consecutive. -> [B, D]"""
        B = x.shape[0]
        H, G, hd = self.n_heads, self.n_kv, self.hd
        q, k, v, gate = self._project(x, cos, sin)  # [H, B, hd], [G, B, hd], [G, B, hd], [B, H*hd] or None
        kc, vc = pool.k[layer], pool.v[layer]  # [S, G, C, hd], C this layer's length
        C = kc.shape[2]
        ring = pos % C  # [B]
        kc[rows, :, ring] = k.transpose(0, 1)  # [B, G, hd]
        vc[rows, :, ring] = v.transpose(0, 1)
        n = torch.clamp(pos + 1, max=C)  # [B] cached positions each token sees (the ring holds just those)
        N = min(span, C)
        if block is not None:  # rows are consecutive slots: read a view, no copy of the cached keys
            keys, vals = kc[block, :, :N], vc[block, :, :N]  # [B, G, N, hd]
        else:
            keys, vals = kc[rows, :, :N], vc[rows, :, :N]  # [B, G, N, hd]
        mask = (torch.arange(N, device=x.device)[None, :] < n[:, None])[:, None, None, :]  # [B, 1, 1, N]
        qg = q.reshape(G, H // G, B, hd).permute(2, 0, 1, 3)  # [H, B, hd] -> [B, G, H/G, hd]
        sinks = None if self.sinks is None else self.sinks.view(1, G, H // G, 1)
        out = attend(qg, keys, vals, mask, sinks).reshape(B, H * hd)  # [B, G, H/G, hd] -> [B, H*hd]
        return self.wo(out if gate is None else out * torch.sigmoid(gate))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [H, T, hd], k, v [G, T, hd] of x [T, D], with the family's norms and clamps and RoPE at
        the tokens' positions (cos, sin [T, hd]); and the output gate [T, H*hd] (None without one)."""
        T = x.shape[0]
        H, G, hd = self.n_heads, self.n_kv, self.hd
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [T, H*hd] (gated: [T, H*2hd]), [T, G*hd], [T, G*hd]
        gate = None
        if self.gated:  # per head: its hd queries, then its hd gate values
            q, gate = q.view(T, H, 2 * hd).split(hd, dim=-1)
            q, gate = q.reshape(T, H * hd), gate.reshape(T, H * hd)
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
        return q, k, v, gate

    @staticmethod
    def _prefill(qg, k, v, kc, vc, start: int, T: int, window: int | None, sinks: torch.Tensor | None
                 ) -> torch.Tensor:
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
        out = attend(qg, keys, vals, mask, sinks)
        keep = min(T, C)  # write the last `keep` new positions into the ring
        ring_new = torch.arange(start + T - keep, start + T, device=k.device) % C
        kc[:, ring_new] = k[:, T - keep :]
        vc[:, ring_new] = v[:, T - keep :]
        return out


class MLP(nn.Module):
    """A resident MLP: a shared expert (Qwen2-MoE) or a dense layer's MLP, SwiGLU w2(silu(w1 x) * w3 x) or
    (`relu2`, Nemotron-H) w2(relu(w1 x)^2) with no w3. [T, D] -> [T, D]"""

    def __init__(self, dim: int, ffn: int, relu2: bool = False):
        super().__init__()
        self.w1 = Linear(dim, ffn, bias=False)  # gate (relu2: up)
        self.w3 = None if relu2 else Linear(dim, ffn, bias=False)  # up
        self.w2 = Linear(ffn, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.relu(self.w1(x)).square())
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
