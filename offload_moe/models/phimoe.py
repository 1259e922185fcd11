"""Phi-3.5-MoE (Microsoft): LayerNorm with bias (also the final norm), attention biases
(`attention_bias`), an optional head bias (`lm_head_bias`), Mixtral's tensor names, and the
sparsemixer router: at inference each of its two picks is the best remaining logit, weighted
by a softmax over the logits within a relative `router_jitter_noise` band of it (no
renormalisation). Its `longrope` RoPE scaling is read in config.py."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need
from ..errors import UserError

MODEL_TYPES = {"phimoe": ("PhimoeForCausalLM", "PhiMoEForCausalLM")}  # transformers', the hub's

DENSE = [(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{0}.gate.weight")]
EXPERT = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight"
PARTS = {"w1": "w1", "w2": "w2", "w3": "w3"}
FUSED = None


def config(c: dict, path: Path) -> ModelConfig:
    top_k = int(need(c, path, "num_experts_per_tok"))
    if top_k != 2:
        raise UserError(f"{path}: Phi-3.5-MoE's sparsemixer router picks 2 experts; this config asks for {top_k}")
    bias = bool(c.get("attention_bias", False))
    return hf_common(c, path, family="phimoe", ffn_dim=int(need(c, path, "intermediate_size")),
                     num_experts=int(need(c, path, "num_local_experts", "num_experts")), norm="layer",
                     qkv_bias=bias, o_bias=bias, router="sparsemixer",
                     router_jitter=float(c.get("router_jitter_noise", 0.01)), norm_topk_prob=False,
                     lm_head_bias=bool(c.get("lm_head_bias", False)))
