"""The Mixtral model: resident attention, norms and routers; experts served by the expert cache.

Legend for shape comments: T tokens, D dim, H query heads, G kv heads, hd head dim,
E experts, K top-k, C KV-cache length, V vocabulary.
"""

from __future__ import annotations

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
        # in float32, as the reference implementation, then back to the activation dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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


def rope_tables(hd: int, theta: float, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, hd] in float32 (rotate-halves convention: frequency i turns dims i and i + hd/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # [len, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [len, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, hd] (any leading axes, e.g. heads); cos, sin [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, layer: int, kv: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        H, G, hd = self.n_heads, self.n_kv, self.hd
        q = self.wq(x).view(T, H, hd).transpose(0, 1)  # [T, H*hd] -> [H, T, hd]
        k = self.wk(x).view(T, G, hd).transpose(0, 1)  # [T, G*hd] -> [G, T, hd]
        v = self.wv(x).view(T, G, hd).transpose(0, 1)  # [T, G*hd] -> [G, T, hd]
        q, k = apply_rope(q, cos, sin).to(x.dtype), apply_rope(k, cos, sin).to(x.dtype)
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


class Block(nn.Module):
    """One decoder layer's resident weights. The experts are not here: the cache holds them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.gate = nn.Linear(config.dim, config.num_experts, bias=False)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # set by the engine: the expert cache, the prefetcher and an optional routing recorder
        self.cache = None
        self.prefetcher = None
        self.recorder = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, last_only: bool = False) -> torch.Tensor:
        """tokens [T] at positions kv.pos .. kv.pos+T-1; returns logits [T, V] (or [1, V])."""
        T = tokens.shape[0]
        cos, sin = self.rope
        cos, sin = cos[kv.pos : kv.pos + T], sin[kv.pos : kv.pos + T]  # [T, hd]
        h = self.tok_embeddings(tokens)  # [T, D]
        for i, blk in enumerate(self.layers):
            if self.prefetcher is not None:
                self.prefetcher(i, h)
            if self.recorder is not None:
                self.recorder.enter(i, h)
            h = h + blk.attention(blk.attention_norm(h), i, kv, cos, sin)
            h = h + self.moe(i, blk, blk.ffn_norm(h))
        kv.pos += T
        if last_only:
            h = h[-1:]
        return self.output(self.norm(h)).float()  # [T, V]

    def route(self, blk: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router: softmax over all experts in float32, keep the top k, renormalise. [T, K] each."""
        probs = F.softmax(F.linear(x, blk.gate.weight).float(), dim=-1)  # [T, E]
        weights, idx = torch.topk(probs, self.config.top_k, dim=-1)  # [T, K]
        return (weights / weights.sum(-1, keepdim=True)).to(x.dtype), idx

    def predict(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Speculative routing: `layer`'s router applied to an earlier hidden state h [T, D]. [T, K]"""
        blk = self.layers[layer]
        logits = F.linear(blk.ffn_norm(h), blk.gate.weight)  # [T, E]
        return torch.topk(logits, self.config.top_k, dim=-1).indices  # [T, K]

    def moe(self, layer: int, blk: Block, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] normed hidden state. Each (token, rank) output lands in its own row of
        `out` [T, K, D], summed in rank order: the result does not depend on which experts were
        resident or in what order they were computed. Kernels go in the order of prefetch.py's
        rules 3 and 4: resident experts first, each expert still in flight waited for just before
        its own kernel; the hidden state leaves for the CPU before any device expert is launched."""
        T, K = x.shape[0], self.config.top_k
        weights, idx = self.route(blk, x)
        chosen = idx.tolist()  # SYNC: the experts' residency is decided on the host
        if self.recorder is not None:
            self.recorder.chosen(layer, idx, weights)
        cache, fmt = self.cache, self.cache.fmt
        if T == 1:
            experts = chosen[0]
            slots, on_cpu, late = cache.acquire(layer, experts, decode=True)
            if any(on_cpu):
                cache.transfers.to_host(x)  # rule 4: on its way before the device experts are launched
            outs: list[torch.Tensor | None] = [None] * K
            for k in _resident_first(late, on_cpu):
                if late[k]:
                    cache.wait(layer, slots[k])
                outs[k] = fmt.forward(x, cache.views[layer][slots[k]])
            if any(on_cpu):
                x_host = cache.transfers.host_x()
                missed = [k for k in range(K) if on_cpu[k]]
                ys = torch.cat([cache.cpu_forward(layer, experts[k], x_host) for k in missed])  # [n, D]
                for k, y in zip(missed, cache.transfers.to_device(ys), strict=True):
                    outs[k] = y.view(1, -1)
            out = torch.stack(outs, dim=1)  # K x [1, D] -> [1, K, D]
            cache.release(layer, slots)
        else:
            out = x.new_empty(T, K, x.shape[1])  # [T, K, D]
            for group in self._groups(layer, chosen):
                slots, _, late = cache.acquire(layer, group)
                for k in _resident_first(late):
                    if late[k]:
                        cache.wait(layer, slots[k])
                    rows, ranks = (idx == group[k]).nonzero(as_tuple=True)
                    out[rows, ranks] = fmt.forward(x[rows], cache.views[layer][slots[k]])
                cache.release(layer, slots)
        return (out * weights.unsqueeze(-1)).sum(dim=1)  # [T, K, D] -> [T, D]

    def _groups(self, layer: int, chosen: list[list[int]]) -> list[list[int]]:
        """The distinct experts of a prompt, resident ones first, in groups that fit the layer's slots."""
        table = self.cache.table
        needed = sorted({e for row in chosen for e in row})
        needed.sort(key=lambda e: table.slot(layer, e) < 0)
        n = self.cache.slots[layer]
        return [needed[i : i + n] for i in range(0, len(needed), n)]


def _resident_first(late: list[bool], skip: list[bool] | None = None) -> list[int]:
    """Indices of the experts to compute on the device: those resident now, then those in flight."""
    keep = [k for k in range(len(late)) if skip is None or not skip[k]]
    return [k for k in keep if not late[k]] + [k for k in keep if late[k]]
