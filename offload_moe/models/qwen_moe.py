"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, -235B-A22B).

Qwen2-MoE: q/k/v biases, a resident shared expert (`shared_expert_intermediate_size`) scaled by
a sigmoid gate, top-k not renormalised by default. Qwen3-MoE: no biases, RMSNorm of each head of
q and k before RoPE, no shared expert, top-k renormalised. Both: softmax router, experts of
`moe_intermediate_size`, dense MLP layers (`intermediate_size`) where `mlp_only_layers` or
`decoder_sparse_step` say so."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need
from ..errors import UserError

MODEL_TYPES = {"qwen2_moe": ("Qwen2MoeForCausalLM",), "qwen3_moe": ("Qwen3MoeForCausalLM",)}

L = r"model\.layers\.(\d+)\.mlp\."
DENSE = [
    (L + r"gate\.weight", "layers.{0}.gate.weight"),
    (L + r"shared_expert\.gate_proj\.weight", "layers.{0}.shared.w1.weight"),
    (L + r"shared_expert\.up_proj\.weight", "layers.{0}.shared.w3.weight"),
    (L + r"shared_expert\.down_proj\.weight", "layers.{0}.shared.w2.weight"),
    (L + r"shared_expert_gate\.weight", "layers.{0}.shared_gate.weight"),
    (L + r"gate_proj\.weight", "layers.{0}.mlp.w1.weight"),
    (L + r"up_proj\.weight", "layers.{0}.mlp.w3.weight"),
    (L + r"down_proj\.weight", "layers.{0}.mlp.w2.weight"),
]
EXPERT = L + r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
FUSED = None

GGUF_ARCH = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
B = r"blk\.(\d+)\."
GGUF_DENSE = [
    (B + r"ffn_gate_inp_shexp\.weight", "layers.{0}.shared_gate.weight"),
]
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def dense_layers(c: dict, n_layers: int) -> tuple[int, ...]:
    """Layers with a dense MLP instead of experts, as transformers decides them."""
    only = {int(i) for i in c.get("mlp_only_layers") or []}
    step = int(c.get("decoder_sparse_step") or 1)
    return tuple(i for i in range(n_layers) if i in only or (i + 1) % step)


def config(c: dict, path: Path) -> ModelConfig:
    qwen3 = c.get("model_type") == "qwen3_moe" or "Qwen3MoeForCausalLM" in (c.get("architectures") or [])
    n_layers = int(need(c, path, "num_hidden_layers"))
    shared = 0 if qwen3 else int(c.get("shared_expert_intermediate_size") or 0)
    if c.get("use_sliding_window"):
        raise UserError(f"{path}: use_sliding_window (a window on some layers only) is not implemented")
    return hf_common(
        c, path, family="qwen3_moe" if qwen3 else "qwen2_moe",
        ffn_dim=int(need(c, path, "moe_intermediate_size")),
        num_experts=int(need(c, path, "num_experts", "num_local_experts")),
        qkv_bias=bool(c.get("attention_bias", False)) if qwen3 else bool(c.get("qkv_bias", True)),
        o_bias=bool(c.get("attention_bias", False)) if qwen3 else False,
        qk_norm="head" if qwen3 else "none",
        norm_topk_prob=bool(c.get("norm_topk_prob", qwen3)),
        shared_ffn_dim=shared, shared_gate=shared > 0,
        dense_ffn_dim=int(c.get("intermediate_size") or 0), dense_layers=dense_layers(c, n_layers),
        sliding_window=None,
    )
