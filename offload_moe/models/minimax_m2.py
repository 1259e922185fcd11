"""MiniMax-M2 (MiniMaxAI, `MiniMaxM2ForCausalLM`): Mixtral's layout and experts
(`block_sparse_moe.experts.E.w1/w2/w3`, or transformers 5's fused ones) with
  a sigmoid router: sigmoid of the logits in float32, `block_sparse_moe.e_score_correction_bias` added for
      the choice only, the chosen experts weighted by their unbiased scores renormalised; no groups and no
      scaling (`transformer.sigmoid_topk` with one group and a scale of 1);
  RMSNorm of the whole q and k projections before RoPE (`qk_norm` full, as OLMoE; the hub's `qk_norm_type`
      "per_layer");
  partial RoPE: the first `rotary_dim` dims of each head (the hub's key), or `partial_rotary_factor` (in
      `rope_parameters`, or at the top), in transformers' order of precedence.
Linear attention layers (`attn_type_list` 0, MiniMax-Text-01's), a shared expert (`shared_intermediate_size`)
and per-head QK-norm are refused. The hub's own files are block-FP8: read, dequantized at load (`weights/fp8.py`).

GGUF: llama.cpp's `minimax-m2` arch, Mixtral's stacked experts with the router's choice bias (`exp_probs_b`) and
the rotary dims as `rope.dimension_count`; no tensor is changed."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need
from ..errors import UserError
from . import mixtral

MODEL_TYPES = {"minimax_m2": ("MiniMaxM2ForCausalLM",)}

DENSE = mixtral.DENSE + [(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.e_score_correction_bias",
                          "layers.{0}.gate.e_score_correction_bias")]
EXPERT, PARTS, FUSED = mixtral.EXPERT, mixtral.PARTS, mixtral.FUSED

GGUF_ARCH = {"minimax-m2": "minimax_m2"}
GGUF_DENSE = []  # the router's choice bias (`exp_probs_b`) is in GGUF_COMMON
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def gguf_config(c: dict, g) -> None:
    c["rotary_dim"] = g.need("rope.dimension_count")


def config(c: dict, path: Path) -> ModelConfig:
    refused = {"attn_type_list": any(t != 1 for t in c.get("attn_type_list") or []),
               "scoring_func": c.get("scoring_func", "sigmoid") != "sigmoid",
               "use_routing_bias": c.get("use_routing_bias") is False,
               "use_qk_norm": c.get("use_qk_norm") is False,
               "qk_norm_type": c.get("qk_norm_type", "per_layer") != "per_layer",
               "shared_intermediate_size": bool(c.get("shared_intermediate_size"))}
    for key, bad in refused.items():
        if bad:
            raise UserError(f"{path}: {key} {c[key]!r} is not implemented for minimax_m2")
    n_heads = int(need(c, path, "num_attention_heads"))
    head_dim = int(c.get("head_dim") or int(need(c, path, "hidden_size")) // n_heads)
    partial = (c.get("rope_parameters") or c.get("rope_scaling") or {}).get("partial_rotary_factor")
    if partial is None:
        partial = c.get("partial_rotary_factor")
    if partial is None:
        partial = int(c["rotary_dim"]) / head_dim if c.get("rotary_dim") is not None else 1.0
    return hf_common(c, path, family="minimax_m2", ffn_dim=int(need(c, path, "intermediate_size")),
                     num_experts=int(need(c, path, "num_local_experts", "num_experts")), head_dim=head_dim,
                     qk_norm="full", router="sigmoid", norm_topk_prob=True, partial_rotary_factor=float(partial),
                     norm_eps=float(c.get("rms_norm_eps", 1e-6)), sliding_window=None)
