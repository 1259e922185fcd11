"""Phi-3.5-MoE (Microsoft): LayerNorm with bias (also the final norm), attention biases
(`attention_bias`), an optional head bias (`lm_head_bias`), Mixtral's tensor names, and the
sparsemixer router: at inference each of its two picks is the best remaining logit, weighted
by a softmax over the logits within a relative `router_jitter_noise` band of it (no
renormalisation). Its `longrope` RoPE scaling is read in config.py.

GGUF: llama.cpp's `phimoe` arch (Phi3's converter): the LongRoPE factors are tensors (`rope_factors_short`,
`rope_factors_long`), read into the config; the file keeps no short_mscale / long_mscale but llama.cpp's own
`rope.scaling.attn_factor`, sqrt(1 + ln(max / original) / ln(original)), taken as both (Phi-3.5-MoE's config
says 1.243 for both, the file 1.19: such a file runs as llama.cpp runs it, its attention a little sharper than
the hub's model's). llama.cpp runs the router as a softmax top-2; the file has Phi's weights, and its
`router_jitter_noise` is not in it: the sparsemixer runs with 0.01, Phi-3.5-MoE's."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need
from ..errors import UserError

MODEL_TYPES = {"phimoe": ("PhimoeForCausalLM", "PhiMoEForCausalLM")}  # transformers', the hub's

DENSE = [(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{0}.gate.weight")]
EXPERT = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight"
PARTS = {"w1": "w1", "w2": "w2", "w3": "w3"}
FUSED = None

GGUF_ARCH = {"phimoe": "phimoe"}
B = r"blk\.(\d+)\."
GGUF_DENSE = [
    (r"output_norm\.bias", "norm.bias"),
    (r"output\.bias", "output.bias"),
    (B + r"attn_norm\.bias", "layers.{0}.attention_norm.bias"),
    (B + r"ffn_norm\.bias", "layers.{0}.ffn_norm.bias"),
    (B + r"attn_output\.bias", "layers.{0}.attention.wo.bias"),
]
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def gguf_config(c: dict, g) -> None:
    """The head's bias from its tensor; LongRoPE from the factor tensors and the file's attention factor."""
    c["lm_head_bias"] = "output.bias" in g.tensors
    if "rope_factors_long.weight" in g.tensors:
        mscale = g.need("rope.scaling.attn_factor")
        c["rope_scaling"] = {"type": "longrope", "short_mscale": mscale, "long_mscale": mscale,
                             "original_max_position_embeddings": g.need("rope.scaling.original_context_length")}
        for kind in ("short", "long"):
            c["rope_scaling"][f"{kind}_factor"] = g.tensor(f"rope_factors_{kind}.weight").dequantize().tolist()


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
