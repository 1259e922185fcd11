"""LFM2-MoE (Liquid AI's LFM2-8B-A1B, `Lfm2MoeForCausalLM`): a hybrid. Most layers (`layer_types` "conv")
are gated short convolutions (`modeling/shortconv.py`: B, C and x' from one projection, a causal depthwise
conv of `conv_L_cache` taps over B * x', C gating its output), keeping the conv's last inputs per sequence
instead of a KV cache; the others ("full_attention") are GQA with per-head QK-norm and RoPE. The first
`num_dense_layers` layers have a dense MLP (`intermediate_size`); the others experts of
`moe_intermediate_size`, routed by the sigmoid router: experts chosen by sigmoid(logits) + `expert_bias`
(a correction for the choice only: DeepSeek-V3's `e_score_correction_bias`, one group), weighted by the
unbiased sigmoid, renormalised (`norm_topk_prob`) and times `routed_scaling_factor`, as transformers'
`Lfm2MoeTopKRouter` (which renormalises over the sum + 1e-6: `router_norm_eps`).

The hub's config.json says `norm_eps` (not rms_norm_eps); `tie_embedding`, when present, wins over
tie_word_embeddings (true by default), as transformers reads it.

GGUF: llama.cpp's `lfm2moe` arch. The layers' kinds are in `attention.head_count_kv`, one count a layer (0 on the
conv layers); the converter squeezes the conv's [D, 1, L] to [D, L] (read back as ours) and names the final norm
(the hub's `embedding_norm`) `token_embd_norm`. It writes no conv biases (its squeeze fails on them: LFM2-8B-A1B
has none) and no routed_scaling_factor (LFM2-8B-A1B's is 1, as here by default)."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need
from ..errors import UserError

MODEL_TYPES = {"lfm2_moe": ("Lfm2MoeForCausalLM",)}

L = r"model\.layers\.(\d+)\."
DENSE = [
    (r"model\.embedding_norm\.weight", "norm.weight"),
    (L + r"operator_norm\.weight", "layers.{0}.attention_norm.weight"),
    (L + r"ffn_norm\.weight", "layers.{0}.ffn_norm.weight"),
    (L + r"self_attn\.out_proj\.weight", "layers.{0}.attention.wo.weight"),
    (L + r"self_attn\.([qk])_layernorm\.weight", "layers.{0}.attention.{1}_norm.weight"),
    (L + r"conv\.in_proj\.(weight|bias)", "layers.{0}.attention.wbcx.{1}"),
    (L + r"conv\.conv\.(weight|bias)", "layers.{0}.attention.conv.{1}"),
    (L + r"conv\.out_proj\.(weight|bias)", "layers.{0}.attention.wo.{1}"),
    (L + r"feed_forward\.(w[123])\.weight", "layers.{0}.mlp.{1}.weight"),
    (L + r"feed_forward\.gate\.weight", "layers.{0}.gate.weight"),
    (L + r"feed_forward\.expert_bias", "layers.{0}.gate.e_score_correction_bias"),
]
EXPERT = L + r"feed_forward\.experts\.(\d+)\.(w[123])\.weight"
PARTS = {"w1": "w1", "w3": "w3", "w2": "w2"}
# transformers 5's in-memory layout, should a checkpoint hold it: gate_up_proj [E, 2I, D], down_proj [E, D, I]
FUSED = L + r"feed_forward\.experts\.(gate_up_proj|down_proj)"
LAYER_TYPES = ("conv", "full_attention")

GGUF_ARCH = {"lfm2moe": "lfm2_moe"}
B = r"blk\.(\d+)\."
GGUF_DENSE = [
    (r"token_embd_norm\.weight", "norm.weight"),
    (B + r"shortconv\.in_proj\.weight", "layers.{0}.attention.wbcx.weight"),
    (B + r"shortconv\.conv\.weight", "layers.{0}.attention.conv.weight"),
    (B + r"shortconv\.out_proj\.weight", "layers.{0}.attention.wo.weight"),
]
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def gguf_config(c: dict, g) -> None:
    """The layers' kinds from the per-layer KV heads; the hub's names of the rest."""
    kv = g.need("attention.head_count_kv")
    c |= {"layer_types": [LAYER_TYPES[n > 0] for n in kv], "num_key_value_heads": max(kv),
          "num_experts": c.get("num_local_experts"), "num_dense_layers": c.pop("first_k_dense_replace", 0),
          "conv_L_cache": g.need("shortconv.l_cache"), "norm_eps": c.get("rms_norm_eps", 1e-5)}


def config(c: dict, path: Path) -> ModelConfig:
    n_layers = int(need(c, path, "num_hidden_layers"))
    types = c.get("layer_types")
    if types is None and c.get("full_attn_idxs") is not None:  # LFM2's older key: the attention layers
        types = [LAYER_TYPES[i in c["full_attn_idxs"]] for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= set(LAYER_TYPES):
        raise UserError(f"{path}: layer_types must give {n_layers} of {', '.join(LAYER_TYPES)}")
    if not c.get("use_expert_bias", True):
        raise UserError(f"{path}: use_expert_bias false (a router without its choice bias) is not implemented")
    dense = int(c.get("num_dense_layers", 2))
    return hf_common(
        c, path, family="lfm2_moe", ffn_dim=int(need(c, path, "moe_intermediate_size")),
        num_experts=int(need(c, path, "num_experts")), norm_eps=float(c.get("norm_eps", 1e-5)),
        tie_word_embeddings=bool(c.get("tie_embedding", c.get("tie_word_embeddings", True))),
        qk_norm="head", router="sigmoid", norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)), router_norm_eps=1e-6,
        dense_ffn_dim=int(c.get("intermediate_size") or 0), dense_layers=tuple(range(min(dense, n_layers))),
        conv_layers=tuple(i for i, t in enumerate(types) if t == "conv"),
        conv_kernel=int(c.get("conv_L_cache", 3)), conv_bias=bool(c.get("conv_bias", False)), sliding_window=None,
    )
