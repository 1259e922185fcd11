"""OLMoE (AllenAI, OLMoE-1B-7B): RMSNorm of the whole q and k projections (not per head) before
RoPE, optional clamping of q, k and v (`clip_qkv`), softmax router, top-k not renormalised by
default, 64 experts with 8 chosen."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need

MODEL_TYPES = {"olmoe": ("OlmoeForCausalLM",)}

DENSE = [(r"model\.layers\.(\d+)\.mlp\.gate\.weight", "layers.{0}.gate.weight")]
EXPERT = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
FUSED = None

GGUF_ARCH = {"olmoe": "olmoe"}
GGUF_DENSE: list = []
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def config(c: dict, path: Path) -> ModelConfig:
    bias = bool(c.get("attention_bias", False))
    clip = c.get("clip_qkv")
    return hf_common(c, path, family="olmoe", ffn_dim=int(need(c, path, "intermediate_size")),
                     num_experts=int(need(c, path, "num_experts", "num_local_experts")), qkv_bias=bias, o_bias=bias,
                     qk_norm="full", clip_qkv=None if clip is None else float(clip),
                     norm_topk_prob=bool(c.get("norm_topk_prob", False)))
