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
save_pretrained writes them one by one (`EXPERT`): both are read.

GGUF: llama.cpp's `qwen35moe` arch: Qwen3-Next's changes (`qwen3_next.py`: norms as 1 + w, A = -exp(A_log), the
conv squeezed, Mamba's keys; in_proj_qkv as `attn_qkv`, in_proj_z as `attn_gate`, in_proj_b and in_proj_a as
`ssm_beta` and `ssm_alpha`), the multimodal RoPE's sections in `rope.dimension_sections`, the multi-token-prediction
layer as a last block (`nextn_predict_layers`: not read), and the value heads reordered from grouped per key head
to tiled (each key head's first value head, then each one's second, ...: ggml's broadcast) in every tensor that
has them (the v rows of attn_qkv and of the conv, attn_gate, ssm_beta, ssm_alpha, A, dt_bias, ssm_out's
columns): put back here, then joined as the hub's parts are."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from . import qwen3_next, qwen_moe
from .qwen3_next import a_log, ba, qkvz

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


P = "layers.{0}.attention."
JOINED = [
    (P + "wqkvz.weight", (P + "in_proj_qkv.weight", P + "in_proj_z.weight"), qkvz),
    (P + "wba.weight", (P + "in_proj_b.weight", P + "in_proj_a.weight"), ba),
]


def _grouped(c: ModelConfig, t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Value heads (of `size` along `dim`) from the converter's tiled order back to grouped per key head."""
    r = c.linear_v_heads // c.linear_k_heads
    return t.unflatten(dim, (r, c.linear_k_heads, size)).transpose(dim, dim + 1).flatten(dim, dim + 2)


def _v_rows(c: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """attn_qkv's or the conv's rows: q and k as they are, the v rows grouped again."""
    qk = 2 * c.linear_k_heads * c.linear_k_dim
    return torch.cat([t[:qk], _grouped(c, t[qk:], 0, c.linear_v_dim)])


def _v_heads(c: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    return _grouped(c, t, 0, c.linear_v_dim)


def _heads(c: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    return _grouped(c, t, 0, 1)


def _v_columns(c: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    return _grouped(c, t, 1, c.linear_v_dim)


def _a_log(c: ModelConfig, a: torch.Tensor) -> torch.Tensor:
    return a_log(c, _heads(c, a))


B = qwen3_next.B
GGUF_ARCH = {"qwen35moe": "qwen3_5_moe"}
GGUF_DENSE = [
    *qwen3_next.GGUF_NORMS,
    (B + r"attn_qkv\.weight", P + "in_proj_qkv.weight", _v_rows),
    (B + r"attn_gate\.weight", P + "in_proj_z.weight", _v_heads),
    (B + r"ssm_beta\.weight", P + "in_proj_b.weight", _heads),
    (B + r"ssm_alpha\.weight", P + "in_proj_a.weight", _heads),
    (B + r"ssm_conv1d\.weight", P + "conv.weight", _v_rows),
    (B + r"ssm_dt\.bias", P + "dt_bias", _heads),
    (B + r"ssm_a", P + "A_log", _a_log),
    (B + r"ssm_norm\.weight", P + "norm.weight"),
    (B + r"ssm_out\.weight", P + "wo.weight", _v_columns),
    *qwen_moe.GGUF_DENSE,
]
GGUF_JOINED = JOINED
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def gguf_config(c: dict, g) -> None:
    """Qwen3-Next's keys, and the multimodal RoPE's sections (a fourth, always 0, is ggml's)."""
    qwen3_next.gguf_config(c, g)
    c["rope_parameters"] = {"rope_type": "default", "mrope_section": list(g.need("rope.dimension_sections"))[:3]}


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
