"""Qwen3-Next (Qwen3-Next-80B-A3B, `Qwen3NextForCausalLM`): a hybrid. Three layers in four
(`full_attention_interval`, or `layer_types`) are Gated DeltaNet linear attention (`modeling/deltanet.py`:
`linear_num_key_heads` x `linear_key_head_dim`, `linear_num_value_heads` x `linear_value_head_dim`, a causal
conv of `linear_conv_kernel_dim` taps), keeping a fixed-size state per sequence instead of a KV cache; the
others are gated attention: wq gives each head's queries and an output gate, per-head QK-norm, partial RoPE
(`partial_rotary_factor`, 0.25, top-level in the hub's config.json). Every RMSNorm but linear attention's
gated one stores its weights centred on zero, applied as 1 + w (`rms_plus_one`). The MoE is Qwen2-MoE's:
a softmax router (top-k renormalised by `norm_topk_prob`), a resident shared expert scaled by a sigmoid
gate, dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so.

The hub's checkpoints also hold a multi-token-prediction layer (`mtp.*`): its tensors are not read
(transformers ignores them too)."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need
from ..errors import UserError
from . import qwen_moe

MODEL_TYPES = {"qwen3_next": ("Qwen3NextForCausalLM",)}

A = r"model\.layers\.(\d+)\.linear_attn\."
DENSE = [
    (A + r"in_proj_qkvz\.weight", "layers.{0}.attention.wqkvz.weight"),
    (A + r"in_proj_ba\.weight", "layers.{0}.attention.wba.weight"),
    (A + r"conv1d\.weight", "layers.{0}.attention.conv.weight"),
    (A + r"(dt_bias|A_log)", "layers.{0}.attention.{1}"),
    (A + r"norm\.weight", "layers.{0}.attention.norm.weight"),
    (A + r"out_proj\.weight", "layers.{0}.attention.wo.weight"),
    *qwen_moe.DENSE,
]
EXPERT = qwen_moe.EXPERT
PARTS = qwen_moe.PARTS
# transformers 5's in-memory layout, should a checkpoint hold it: gate_up_proj [E, 2I, D], down_proj [E, D, I]
FUSED = r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)"
LAYER_TYPES = ("linear_attention", "full_attention")


def config(c: dict, path: Path) -> ModelConfig:
    n_layers = int(need(c, path, "num_hidden_layers"))
    return hybrid(c, path, "qwen3_next", norm_topk_prob=bool(c.get("norm_topk_prob", True)),
                  dense_ffn_dim=int(c.get("intermediate_size") or 0), dense_layers=qwen_moe.dense_layers(c, n_layers))


def hybrid(c: dict, path: Path, family: str, **moe) -> ModelConfig:
    """The hybrid's config (Qwen3-Next's keys; Qwen3.5-MoE's text config has the same), with the family's
    `moe` fields: norm_topk_prob and the dense layers."""
    n_layers = int(need(c, path, "num_hidden_layers"))
    interval = int(c.get("full_attention_interval") or 4)  # transformers' default
    types = c.get("layer_types") or [LAYER_TYPES[(i + 1) % interval == 0] for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= set(LAYER_TYPES):
        raise UserError(f"{path}: layer_types must give {n_layers} of {', '.join(LAYER_TYPES)}")
    if c.get("use_sliding_window"):
        raise UserError(f"{path}: use_sliding_window is not implemented")
    rope = c.get("rope_parameters") or {}
    partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    bias = bool(c.get("attention_bias", False))
    return hf_common(
        c, path, family=family, ffn_dim=int(need(c, path, "moe_intermediate_size")),
        num_experts=int(need(c, path, "num_experts", "num_local_experts")),
        norm="rms_plus_one", qkv_bias=bias, o_bias=bias, qk_norm="head", attention_output_gate=True,
        partial_rotary_factor=float(partial), shared_ffn_dim=shared, shared_gate=shared > 0,
        linear_layers=tuple(i for i, t in enumerate(types) if t == "linear_attention"),
        linear_k_heads=int(c.get("linear_num_key_heads", 16)), linear_v_heads=int(c.get("linear_num_value_heads", 32)),
        linear_k_dim=int(c.get("linear_key_head_dim", 128)), linear_v_dim=int(c.get("linear_value_head_dim", 128)),
        linear_conv_kernel=int(c.get("linear_conv_kernel_dim", 4)), sliding_window=None, **moe,
    )
