"""Qwen3.5 / Qwen3.6 MoE (Qwen3.6-35B-A3B, `Qwen3_5MoeForConditionalGeneration`): Qwen3-Next's hybrid
(`qwen3_next.py`: Gated DeltaNet on three layers in four, gated attention with QK-norm and partial RoPE 0.25 on
the others, zero-centred RMSNorms, a softmax router over 256 experts top-8 plus a gated shared expert), with:

- the hub's checkpoint is the vision-language wrapper: config.json nests the text model's keys under
  `text_config` (model_type `qwen3_5_moe_text`; a text model saved alone, `Qwen3_5MoeForCausalLM`, has them at
  the top), and its tensors sit under `model.language_model.` (`PREFIXES`; `lm_head` at the top). Only the text
  model runs: the vision tower (`model.visual.*`) and the multi-token-prediction layer (`mtp.*`) are skipped
  without being read (`SKIPPED`), said once on stderr;
- linear attention's projections come apart, `in_proj_qkv` (every q head, every k head, every v head), `in_proj_z`,
  `in_proj_b`, `in_proj_a` (one row block per value head each): `JOINED` puts them together at load in
  Qwen3-Next's grouped order (per key head its q, k, then the v and z of its Hv/Hk value heads, as transformers'
  `repeat_interleave` pairs them), so the same `modeling/deltanet.py` runs both;
- the router always renormalises its top-k (no `norm_topk_prob`), and no layer is dense;
- RoPE is interleaved multimodal RoPE (`mrope_section`, `mrope_interleaved`): each rotary frequency takes its
  angle from the temporal, height or width position stream. For text the three streams are the same position
  (transformers' `get_rope_index` without images, and its text model's broadcast of position_ids), so every
  frequency turns by that position and it is plain RoPE over the rotary dims (`head_dim` x
  `partial_rotary_factor`), whatever the sections (tests/test_qwen3_5_moe.py checks the tables against
  transformers', tests/test_families.py the logits of a model with sections 2, 1, 1). A
  config that would not reduce so (a scaled `rope_type`, sections that are not three counts) is refused.

The hub's experts are fused (`mlp.experts.gate_up_proj` [E, 2I, D], `down_proj` [E, D, I], `FUSED`); transformers'
save_pretrained writes them one by one (`EXPERT`): both are read."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from . import qwen3_next, qwen_moe

MODEL_TYPES = {t: ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM")
               for t in ("qwen3_5_moe", "qwen3_5_moe_text")}

PREFIXES = {"model.language_model.": "model."}  # the VL wrapper's text model, read under the names below
SKIPPED = {r"model\.visual\..*": "the vision tower", r"mtp\..*": "the multi-token-prediction layer"}

A = r"model\.layers\.(\d+)\.linear_attn\."
DENSE = [
    (A + r"in_proj_(qkv|z|b|a)\.weight", "layers.{0}.attention.in_proj_{1}.weight"),  # parts: JOINED below
    *[(pattern, ours) for pattern, ours in qwen3_next.DENSE if "in_proj" not in pattern],
]
EXPERT, PARTS, FUSED = qwen_moe.EXPERT, qwen_moe.PARTS, qwen3_next.FUSED


def _qkvz(c: ModelConfig, qkv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """in_proj_qkv [2 Hk dk + Hv dv, D] and in_proj_z [Hv dv, D] -> wqkvz, grouped per key head."""
    Hk, dk, D = c.linear_k_heads, c.linear_k_dim, c.dim
    r_dv = c.linear_v_heads // Hk * c.linear_v_dim  # the value dims of one key head's value heads
    q, k, v = qkv.split([Hk * dk, Hk * dk, Hk * r_dv])
    return torch.cat([q.view(Hk, dk, D), k.view(Hk, dk, D), v.view(Hk, r_dv, D), z.view(Hk, r_dv, D)], 1).flatten(0, 1)


def _ba(c: ModelConfig, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """in_proj_b, in_proj_a [Hv, D] -> wba, grouped per key head: its value heads' b, then their a."""
    Hk, D = c.linear_k_heads, c.dim
    return torch.cat([b.view(Hk, -1, D), a.view(Hk, -1, D)], 1).flatten(0, 1)


P = "layers.{0}.attention."
JOINED = [
    (P + "wqkvz.weight", (P + "in_proj_qkv.weight", P + "in_proj_z.weight"), _qkvz),
    (P + "wba.weight", (P + "in_proj_b.weight", P + "in_proj_a.weight"), _ba),
]


def config(c: dict, path: Path) -> ModelConfig:
    t = c.get("text_config") or c  # the VL wrapper's, or a text model's own
    if not isinstance(t, dict):
        raise UserError(f"{path}: text_config must be an object")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    section = rope.get("mrope_section", [11, 11, 10])  # transformers' default
    if kind != "default" or not (isinstance(section, list) and len(section) == 3
                                 and all(isinstance(n, int) and n >= 0 for n in section)):
        raise UserError(f"{path}: multimodal RoPE reduces to plain RoPE for text only with rope_type default and "
                        f"three mrope_section counts (this has {kind!r}, {section!r})")
    if not t.get("attn_output_gate", True):
        raise UserError(f"{path}: attn_output_gate false is not implemented (gated attention is)")
    return qwen3_next.hybrid(t, path, "qwen3_5_moe", norm_topk_prob=True)
