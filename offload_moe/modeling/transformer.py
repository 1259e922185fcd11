"""The model: resident attention, norms, routers, shared experts and dense layers (`modeling/layers.py`);
routed experts served by the expert cache. One class for every family: `ModelConfig` says which
variant of each piece a layer has.

Layers with experts are the cache's rows: `row_of[layer]` (-1 for a dense layer); the prefetcher,
the routing trace and the cache count in rows.

Legend for shape comments: T tokens, D dim, E experts, K top-k, V vocabulary, B sequences decoding
together (a batch step: T = B, one token each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .decode_step import DecodeStep
from .deltanet import GatedDeltaNet
from .layers import MLP, Attention, KVCache, KVPool, Linear, make_norm
from .mamba import Mamba2
from .mla import LatentAttention
from .shortconv import ShortConv

ROUTER_BIAS = "gate.e_score_correction_bias"  # the sigmoid router's choice bias [E]: resident, kept in float32


class Block(nn.Module):
    """One decoder layer's resident weights. The routed experts are not here: the cache holds them. A layer of one
    piece (Nemotron-H) has no attention (`ffn_only`: attention and attention_norm None) or no FFN (`mixer_only`:
    ffn_norm None, nor anything after it)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.attention_norm = self.attention = self.ffn_norm = None
        if layer not in c.ffn_only:
            self.attention_norm = make_norm(c, c.dim)
            if layer in c.linear_layers:  # linear attention, under the same name: the same calls
                self.attention = GatedDeltaNet(c)
            elif layer in c.conv_layers:  # LFM2's short conv, likewise
                self.attention = ShortConv(c)
            elif layer in c.mamba_layers:  # Nemotron-H's Mamba-2, likewise
                self.attention = Mamba2(c)
            else:
                self.attention = LatentAttention(c) if c.kv_lora_rank else Attention(c)
        if layer in c.mixer_only:
            return
        self.ffn_norm = make_norm(c, c.dim)
        relu2 = c.ffn_act == "relu2"
        if layer in c.dense_layers:
            self.mlp = MLP(c.dim, c.dense_ffn_dim, relu2)
            return
        self.gate = Linear(c.dim, c.num_experts, bias=c.router_bias)
        if c.router == "sigmoid":
            self.gate.register_buffer("e_score_correction_bias", torch.empty(c.num_experts, dtype=torch.float32))
        if c.shared_ffn_dim:
            self.shared = MLP(c.dim, c.shared_ffn_dim, relu2)
        if c.shared_gate:
            self.shared_gate = Linear(c.dim, 1, bias=False)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = make_norm(c, c.dim)
        self.output = Linear(c.dim, c.vocab_size, bias=c.lm_head_bias)
        self.rows = c.moe_layers  # row -> layer
        self.row_of = [-1] * c.n_layers  # layer -> row
        for r, layer in enumerate(self.rows):
            self.row_of[layer] = r
        # set by the engine: the expert cache, the prefetcher and an optional routing recorder
        self.cache = None
        self.prefetcher = None
        self.recorder = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decode_step: DecodeStep | None = None  # set at load, once the weights are in place

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, last_only: bool = False) -> torch.Tensor:
        """tokens [T] at positions kv.pos .. kv.pos+T-1; returns logits [T, V] (or [1, V])."""
        T = tokens.shape[0]
        cos, sin = self.rope
        cos, sin = cos[kv.pos : kv.pos + T], sin[kv.pos : kv.pos + T]  # [T, hd]
        step = None
        if T == 1 and self.decode_step is not None:  # one C call a layer for its attention half (decode_step.py)
            step = lambda i, h: self.decode_step(i, h, kv.k[i], kv.v[i], kv.pos)  # noqa: E731
        h = self._blocks(self.tok_embeddings(tokens), lambda blk, i, x: blk.attention(x, i, kv, cos, sin), T == 1,
                         step)
        kv.pos += T
        if last_only:
            h = h[-1:]
        if step is not None and (logits := self.decode_step.logits(h)) is not None:
            return logits  # [1, V]
        return self.output(self.norm(h)).float()  # [T, V]

    @torch.inference_mode()
    def forward_batch(self, tokens: torch.Tensor, pool: KVPool, rows: list[int]) -> torch.Tensor:
        """One decode step of B sequences: tokens [B], token b the next of the sequence in pool slot
        rows[b], each at its own position. Attention is per sequence (`decode_ragged`); the MoE layers
        see the B tokens as one decode pass (`_decode_experts`), so the union of the batch's experts is
        acquired once per step and each expert computed for the rows that chose it. Returns logits [B, V]."""
        seqs = [pool.seqs[r] for r in rows]
        positions = [s.pos for s in seqs]
        span = max(min(p + 1, pool.length) for p in positions)  # the longest cached span, on the host
        pos = torch.tensor(positions, device=tokens.device)  # [B]
        rows_t = torch.tensor(rows, device=tokens.device)  # [B]
        cos, sin = self.rope[0][pos], self.rope[1][pos]  # [B, hd]
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        block = slice(rows[0], rows[0] + len(rows)) if consecutive else None

        def attend(blk: Block, i: int, x: torch.Tensor) -> torch.Tensor:
            return blk.attention.decode_ragged(x, i, pool, rows_t, pos, span, cos, sin, block)

        h = self._blocks(self.tok_embeddings(tokens), attend, decode=True)
        for s in seqs:
            s.pos += 1
        return self.output(self.norm(h)).float()  # [B, V]

    def _blocks(self, h: torch.Tensor, attend, decode: bool, step=None) -> torch.Tensor:
        """h [T, D] through every layer; `attend(blk, layer, x)` is the attention of the normed x; `decode`:
        the T tokens are one decode step (of one sequence, or of B together), else a prompt; `step(layer, h)`:
        where it returns (h after attention, the FFN's normed input, the router's logits or None), the layer's
        attention half in one call (`DecodeStep`), else None and the torch path."""
        for i, blk in enumerate(self.layers):
            row = self.row_of[i]
            if row >= 0 and self.recorder is not None:  # first: a new forward's row 0 takes the carried predictions
                self.recorder.enter(row, h, decode)
            if row >= 0 and self.prefetcher is not None and self.prefetcher.input == "hidden":
                self.prefetcher(row, h, decode)
            done = None if step is None else step(i, h)
            if done is not None:
                h, x, logits = done
            else:
                if blk.attention is not None:
                    h = h + attend(blk, i, blk.attention_norm(h))
                x, logits = (None if blk.ffn_norm is None else blk.ffn_norm(h)), None
            if blk.ffn_norm is None:  # a mixer alone
                continue
            if row < 0:
                h = h + blk.mlp(x)
                continue
            if self.recorder is not None:
                self.recorder.router_input(row, x, decode)
            if self.prefetcher is not None and self.prefetcher.input == "router_input":
                self.prefetcher(row, x, decode)  # its copies still go after this row's demand copies
            out = self.moe(row, blk, x, decode, logits)
            if self.config.shared_ffn_dim:
                shared = blk.shared(x)  # [T, D]
                out = out + (torch.sigmoid(blk.shared_gate(x)) * shared if self.config.shared_gate else shared)
            h = h + out
        return h

    def route(self, blk: Block, x: torch.Tensor, logits: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's weights and experts, [T, K] each, in rank order: softmax over all experts in
        float32 then top-k (renormalised when the family says so), Phi's sparsemixer, or the sigmoid
        router (DeepSeek-V3, GLM-4.5: `sigmoid_topk`) or DeepSeek-V2's (`grouped_softmax_topk`), both with
        logits in float32 as transformers'. `logits` [T, E]: the router's, computed already (`DecodeStep`)."""
        c = self.config
        if c.router in ("sigmoid", "grouped_softmax"):
            if logits is None:
                logits = F.linear(x.float(), blk.gate.weight.float())  # [T, E]
            if c.router == "sigmoid":
                weights, idx = sigmoid_topk(logits, blk.gate.e_score_correction_bias, c.top_k, c.n_group,
                                            c.topk_group, c.norm_topk_prob, c.routed_scaling_factor,
                                            c.router_norm_eps)
            else:
                weights, idx = grouped_softmax_topk(logits, c.top_k, c.n_group, c.topk_group, c.norm_topk_prob,
                                                    c.routed_scaling_factor)
            return weights.to(x.dtype), idx
        if logits is None:
            logits = F.linear(x, blk.gate.weight, blk.gate.bias)  # [T, E]
        if self.config.router == "sparsemixer":
            weights, idx = sparsemixer(logits, self.config.router_jitter)
            return weights.to(x.dtype), idx
        # gpt-oss's router (a softmax over the top-k logits) is this one renormalised: the same weights
        probs = F.softmax(logits.float(), dim=-1)  # [T, E]
        weights, idx = torch.topk(probs, self.config.top_k, dim=-1)  # [T, K]
        if self.config.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), idx

    def predict(self, row: int, h: torch.Tensor) -> torch.Tensor:
        """Speculative routing: row `row`'s router applied to an earlier hidden state h [T, D]. [T, K]
        (The top-k logits: what the softmax and sparsemixer routers pick; the sigmoid and grouped_softmax
        routers' own choice, bias and groups included.)"""
        blk = self.layers[self.rows[row]]
        if self.config.router in ("sigmoid", "grouped_softmax"):
            return self.route(blk, blk.ffn_norm(h))[1]
        return torch.topk(self.router_scores(row, h), self.config.top_k, dim=-1).indices  # [T, K]

    def router_scores(self, row: int, h: torch.Tensor) -> torch.Tensor:
        """What row `row`'s router ranks experts by, from a hidden state h [T, D] -> [T, E]: the logits with
        the router's bias (softmax, sparsemixer, grouped_softmax), or sigmoid(logits) + the correction bias
        (sigmoid). Groups are not applied: for ranking experts beyond the router's own top-k."""
        blk = self.layers[self.rows[row]]
        if self.config.router == "sigmoid":
            logits = F.linear(blk.ffn_norm(h).float(), blk.gate.weight.float())  # [T, E]
            return logits.sigmoid() + blk.gate.e_score_correction_bias.float()
        return F.linear(blk.ffn_norm(h), blk.gate.weight, blk.gate.bias)  # [T, E], the router's bias too

    def moe(self, row: int, blk: Block, x: torch.Tensor, decode: bool, logits: torch.Tensor | None = None
            ) -> torch.Tensor:
        """x [T, D] normed hidden state entering row `row`'s experts: one decode step (`decode`, T = 1 or
        B sequences' tokens: `_decode_experts`) or a prompt. Each (token, rank) output lands in its own
        row of `out` [T, K, D], summed in rank order: the result does not depend on which experts were
        resident, where they were computed or in what order. Kernels go in the order of prefetch.py's
        rule 3: resident experts first, each expert still in flight waited for just before its own kernel."""
        T, K = x.shape[0], self.config.top_k
        weights, idx = self.route(blk, x, logits)  # logits [T, E]: computed already, or None
        chosen = self.cache.transfers.host_list(idx)  # SYNC: the experts' residency is decided on the host
        if self.recorder is not None:
            self.recorder.chosen(row, idx, weights)
        self.cache.routed(row, chosen)  # speculative copies this routing does not use are dropped (prefetch.py)
        if decode:
            out = self._decode_experts(row, x, chosen)
        else:  # a prompt: its misses are fetched (a prompt's expert serves many rows; the copy pays off)
            cache, fmt = self.cache, self.cache.fmt
            out = x.new_empty(T, K, x.shape[1])  # [T, K, D]
            for group in self._groups(row, {e for tok in chosen for e in tok}):
                slots, _, late = cache.acquire(row, group)
                for k in _resident_first(late):
                    if late[k]:
                        cache.wait(row, slots[k])
                    toks, ranks = (idx == group[k]).nonzero(as_tuple=True)
                    out[toks, ranks] = fmt.forward(x[toks], cache.views[row][slots[k]])
                cache.release(row, slots)
        return (out * weights.unsqueeze(-1)).sum(dim=1)  # [T, K, D] -> [T, D]

    def _decode_experts(self, row: int, x: torch.Tensor, chosen: list[list[int]]) -> torch.Tensor:
        """A decode step's experts: x [T, D] (T = 1, or the B tokens of a batched step), chosen [T][K] ->
        [T, K, D]. The step's distinct experts are acquired once, in groups only where they outnumber the
        row's slots (one token: its K in rank order, else ascending with the resident ones first, the
        order `batch_replay` replays); each is computed for the rows that chose it. Misses that the cache
        computes on the CPU (miss policy cpu, or auto when the CPU is faster) run from host RAM for their
        rows after every device expert is launched, the hidden state sent to the host before (rule 4)."""
        T, K = len(chosen), self.config.top_k
        cache, fmt = self.cache, self.cache.fmt
        where: dict[int, list[int]] = {}  # expert -> the flat positions t*K + k that chose it
        for t, tok in enumerate(chosen):
            for k, e in enumerate(tok):
                where.setdefault(e, []).append(t * K + k)
        groups = [chosen[0]] if T == 1 else self._groups(row, where)
        # a step's misses are exactly the experts not resident now: group 1 holds every resident one
        send = cache.cpu_cheaper and any(cache.table.slot(row, e) < 0 for e in where)
        flat: list[torch.Tensor | None] = [None] * (T * K)  # [D] per (token, rank)
        missed: list[int] = []
        for group in groups:
            slots, on_cpu, late = cache.acquire(row, group, decode=True)
            if send:
                cache.transfers.to_host(x)  # rule 4: on its way before the device experts are launched
                send = False
            for k in _resident_first(late, on_cpu):
                if late[k]:
                    cache.wait(row, slots[k])
                e = group[k]
                _place(flat, where[e], fmt.forward(_rows(x, where[e], K), cache.views[row][slots[k]]))
            missed += [e for e, cpu in zip(group, on_cpu, strict=True) if cpu]
            cache.release(row, slots)
        if missed:
            x_host = cache.transfers.host_x()
            ys = torch.cat([cache.cpu_forward(row, e, _rows(x_host, where[e], K)) for e in missed])  # [n, D]
            _place(flat, [p for e in missed for p in where[e]], cache.transfers.to_device(ys))
        return torch.stack(flat).view(T, K, -1)  # T*K x [D] -> [T, K, D]

    def _groups(self, row: int, experts) -> list[list[int]]:
        """Distinct experts, ascending, resident ones first, in groups that fit the row's slots."""
        table = self.cache.table
        needed = sorted(experts)
        needed.sort(key=lambda e: table.slot(row, e) < 0)
        n = self.cache.slots[row]
        return [needed[i : i + n] for i in range(0, len(needed), n)]


def _rows(x: torch.Tensor, positions: list[int], K: int) -> torch.Tensor:
    """The rows of x [T, D] of the tokens at flat positions t*K + k (distinct tokens): [n, D]."""
    if x.shape[0] == 1:
        return x
    if len(positions) == 1:
        t = positions[0] // K
        return x[t : t + 1]  # a view
    return x[[p // K for p in positions]]


def _place(flat: list, positions: list[int], y: torch.Tensor) -> None:
    """Row i of y [n, D] is the output at flat position positions[i]."""
    for p, row in zip(positions, y, strict=True):
        flat[p] = row


def _resident_first(late: list[bool], skip: list[bool] | None = None) -> list[int]:
    """Indices of the experts to compute on the device: those resident now, then those in flight."""
    keep = [k for k in range(len(late)) if skip is None or not skip[k]]
    return [k for k in keep if not late[k]] + [k for k in keep if late[k]]


def sigmoid_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                 renormalise: bool, scale: float, eps: float = 1e-20) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router (GLM-4.5's too), in transformers' order of operations: scores = sigmoid(logits);
    the choice is made on scores + bias (`e_score_correction_bias`), within the best `topk_group` of
    `n_group` equal groups of experts (a group scored by the sum of its best 2 biased scores); the weights
    are the unbiased scores of the chosen, renormalised (over their sum + `eps`: 1e-20, LFM2-MoE's 1e-6) when
    `renormalise`, times `scale`.
    logits [T, E] (float32) -> weights [T, K] float32, experts [T, K] in rank order (best biased first)."""
    T, E = logits.shape
    scores = logits.float().sigmoid()
    choice = scores + bias.float()  # [T, E]
    if n_group > 1:
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, n_group]
        keep = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = torch.topk(choice, top_k, dim=-1)[1]  # [T, K]
    weights = scores.gather(1, idx)
    if renormalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights * scale, idx


def grouped_softmax_topk(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, renormalise: bool,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's router: scores = softmax(logits); `greedy` is one group, `group_limited_greedy` keeps the
    best `topk_group` of `n_group` equal groups of experts (a group scored by its best expert) and picks the
    top-k among them. The weights are the scores, renormalised (+1e-20) when `renormalise`, else times
    `scale`, as DeepSeek's own code (transformers' port ignores norm_topk_prob and always scales: the two
    agree on every public V2 config, which sets it false). logits [T, E] (float32) -> weights [T, K]
    float32, experts [T, K] in rank order."""
    T, E = logits.shape
    scores = logits.float().softmax(dim=-1)  # [T, E]
    choice = scores
    if n_group > 1:
        group_scores = scores.view(T, n_group, E // n_group).amax(dim=-1)  # [T, n_group]
        keep = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = scores.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), 0.0)  # softmax scores are > 0
    weights, idx = torch.topk(choice, top_k, dim=-1)  # [T, K]
    if renormalise and top_k > 1:
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), idx
    return weights * scale, idx


def sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's router at inference: two picks, each the best remaining logit, weighted by the
    softmax over the logits within a relative band 2*eps of it ((best - l) / max(|l|, best) <= 2 eps).
    logits [T, E] -> weights, experts [T, 2]."""
    weights, picks = [], []
    scores = logits
    for _ in range(2):
        best, pick = scores.max(dim=-1, keepdim=True)  # [T, 1]
        factor = logits.abs().clamp(min=best)
        gated = scores.masked_fill((best - logits) / factor > 2 * eps, float("-inf"))
        weights.append(torch.softmax(gated, dim=-1).gather(-1, pick))
        picks.append(pick)
        scores = torch.scatter(scores, -1, pick, float("-inf"))  # the next pick is another expert
    return torch.cat(weights, dim=-1), torch.cat(picks, dim=-1)
