"""GLM-4.7-Flash (Zhipu AI, `Glm4MoeLiteForCausalLM`): DeepSeek-V3's architecture (`deepseek.latent_moe`):
latent attention with q through `q_lora_rank` and RoPE on the `qk_rope_head_dim` slice in interleaved
pairs (`rope_interleave`, default true), the sigmoid router with `e_score_correction_bias` and groups
(`transformer.sigmoid_topk`), a resident shared expert, DeepSeek's tensor names; under GLM's config keys:
the dense layers are those `mlp_layer_types` calls "dense" (transformers 5 writes it), else the first
`first_k_dense_replace` (the hub's key; 1 when absent, as transformers' default); RoPE turns all of
`qk_rope_head_dim` (a `partial_rotary_factor` below 1 is refused: transformers' tables would not fit it).

The hub's checkpoints also hold the multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`,
`num_nextn_predict_layers`): it is not read."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, need
from ..errors import UserError
from . import deepseek

MODEL_TYPES = {"glm4_moe_lite": ("Glm4MoeLiteForCausalLM",)}

DENSE, EXPERT, PARTS, FUSED = deepseek.DENSE, deepseek.EXPERT, deepseek.PARTS, deepseek.FUSED
MLP_LAYER_TYPES = ("dense", "sparse")


def config(c: dict, path: Path) -> ModelConfig:
    n_layers = int(need(c, path, "num_hidden_layers"))
    types = c.get("mlp_layer_types")
    if types is None:
        first = int(c.get("first_k_dense_replace", 1) or 0)
        types = ["dense"] * first + ["sparse"] * (n_layers - first)
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= set(MLP_LAYER_TYPES):
        raise UserError(f"{path}: mlp_layer_types must list 'dense' or 'sparse' for each of {n_layers} layers")
    rope = c.get("rope_parameters") or {}
    partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UserError(f"{path}: partial_rotary_factor {partial} is not supported with latent attention (1.0 is)")
    dense = tuple(i for i, t in enumerate(types) if t == "dense")
    return deepseek.latent_moe(c, path, "glm4_moe_lite", dense, rope_interleave=bool(c.get("rope_interleave", True)))
