"""Nemotron-H MoE (NVIDIA-Nemotron-3-Nano-30B-A3B, `NemotronHForCausalLM`): a hybrid whose layers are each one
piece with one pre-norm, as the hub's `hybrid_override_pattern` spells them (transformers 5 writes the same as
`layers_block_type`: M linear_attention, E moe, * full_attention, - mlp):

  M  Mamba-2 (`modeling/mamba.py`): `mamba_num_heads` x `mamba_head_dim`, B and C in `n_groups` groups of
     `ssm_state_size`, a causal conv of `conv_kernel` taps with a bias, a gated group RMSNorm; a state per sequence
  *  GQA attention without RoPE (the Mamba layers carry position), no biases
  E  routed experts with relu2 and no gate (up_proj, down_proj: our w1, w2), routed by the sigmoid router with
     its correction bias and groups (`n_group`, `topk_group`, `norm_topk_prob`, `routed_scaling_factor`), and a
     resident shared expert of `moe_shared_expert_intermediate_size`, relu2 too
  -  a dense relu2 MLP of `intermediate_size`

Our layer i is the pattern's i: M and * are `mixer_only` (attention_norm, then the mixer), E and - `ffn_only`
(ffn_norm, then the experts or MLP). transformers' NemotronHRMSNorm multiplies its weight in float32 before the
cast back, ours in the activation dtype (Llama's): the same in float32, a rounding apart in bfloat16.

Refused: a latent MoE (`moe_latent_size`, Nemotron-3-Super's experts in a smaller space) and activations other
than silu (Mamba) and relu2 (MLPs). A multi-token-prediction layer (`mtp.*`) is not read.

GGUF: llama.cpp's `nemotron_h_moe` arch. A layer's kind is the kind of its tensors (`ssm_in` M, `attn_q` *,
`ffn_up_exps` E, `ffn_up` -; the per-layer `head_count_kv` and `feed_forward_length` leave the dense MLP's out);
the Mamba sizes are Mamba's keys (`ssm.time_step_rank` the heads, `ssm.inner_size` all their dims,
`ssm.group_count`, `ssm.state_size`, `ssm.conv_kernel`). The converter stores A as -exp(A_log), A and D as
[H, 1], the norm as [groups, inner / groups], the conv squeezed, and interleaves the attention's q/k rows as
Llama's (harmless without RoPE): each undone here. The folded multi-token-prediction block (`nextn_predict_layers`)
is not read."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ModelConfig, hf_common, need
from ..errors import UserError
from .qwen3_next import a_log

MODEL_TYPES = {"nemotron_h": ("NemotronHForCausalLM",)}

PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}  # transformers' older names


def _norm(c: ModelConfig, layer: str) -> str:
    """A layer's one norm: ffn_norm before an FFN alone, else attention_norm."""
    return f"layers.{layer}.{'ffn_norm' if int(layer) in c.ffn_only else 'attention_norm'}.weight"


L = r"backbone\.layers\.(\d+)\."
M = L + r"mixer\."
DENSE = [
    (r"backbone\.embeddings\.weight", "tok_embeddings.weight"),
    (r"backbone\.norm_f\.weight", "norm.weight"),
    (L + r"norm\.weight", _norm),
    (M + r"in_proj\.(weight|bias)", "layers.{0}.attention.wzxbcdt.{1}"),
    (M + r"conv1d\.(weight|bias)", "layers.{0}.attention.conv.{1}"),
    (M + r"(dt_bias|A_log)", "layers.{0}.attention.{1}"),
    (M + r"D", "layers.{0}.attention.skip"),
    (M + r"norm\.weight", "layers.{0}.attention.norm"),
    (M + r"out_proj\.(weight|bias)", "layers.{0}.attention.wo.{1}"),
    (M + r"([qkv])_proj\.weight", "layers.{0}.attention.w{1}.weight"),
    (M + r"o_proj\.weight", "layers.{0}.attention.wo.weight"),
    (M + r"up_proj\.weight", "layers.{0}.mlp.w1.weight"),
    (M + r"down_proj\.weight", "layers.{0}.mlp.w2.weight"),
    (M + r"gate\.(weight|e_score_correction_bias)", "layers.{0}.gate.{1}"),
    (M + r"shared_experts\.up_proj\.weight", "layers.{0}.shared.w1.weight"),
    (M + r"shared_experts\.down_proj\.weight", "layers.{0}.shared.w2.weight"),
]
EXPERT = M + r"experts\.(\d+)\.(up_proj|down_proj)\.weight"
PARTS = {"up_proj": "w1", "down_proj": "w2"}
# transformers 5's in-memory layout, should a checkpoint hold it: up_proj [E, I, D], down_proj [E, D, I]
FUSED = M + r"experts\.(up_proj|down_proj)"
FUSED_PARTS = {"up_proj": {"w1": ((), False)}, "down_proj": {"w2": ((), False)}}
SKIPPED = {r"mtp\..*": "the multi-token-prediction layers"}

GGUF_ARCH = {"nemotron_h_moe": "nemotron_h"}
B, P = r"blk\.(\d+)\.", "layers.{0}.attention."


def _flat(c: ModelConfig, norm: torch.Tensor) -> torch.Tensor:
    return norm.flatten()


GGUF_DENSE = [
    (B + r"attn_norm\.weight", _norm),
    (B + r"ssm_in\.(weight|bias)", P + "wzxbcdt.{1}"),
    (B + r"ssm_conv1d\.(weight|bias)", P + "conv.{1}"),
    (B + r"ssm_dt\.bias", P + "dt_bias"),
    (B + r"ssm_a", P + "A_log", a_log),
    (B + r"ssm_d", P + "skip"),
    (B + r"ssm_norm\.weight", P + "norm", _flat),
    (B + r"ssm_out\.(weight|bias)", P + "wo.{1}"),
    (B + r"ffn_up\.weight", "layers.{0}.mlp.w1.weight"),
    (B + r"ffn_down\.weight", "layers.{0}.mlp.w2.weight"),
    (B + r"ffn_up_shexp\.weight", "layers.{0}.shared.w1.weight"),
    (B + r"ffn_down_shexp\.weight", "layers.{0}.shared.w2.weight"),
]
GGUF_PARTS = {"up": "w1", "down": "w2"}
GGUF_PERMUTED = True
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts
GGUF_KINDS = {"ssm_in.weight": "M", "attn_q.weight": "*", "ffn_up_exps.weight": "E", "ffn_up.weight": "-"}


def gguf_config(c: dict, g) -> None:
    """The layer pattern from each layer's tensors, the Mamba keys, the dense MLP's size from its tensor."""
    pattern = ""
    for i in range(c["num_hidden_layers"]):
        kind = next((k for name, k in GGUF_KINDS.items() if f"blk.{i}.{name}" in g.tensors), None)
        if kind is None:
            raise UserError(f"{g.path}: layer {i} has none of {', '.join(GGUF_KINDS)}: not a layer of Nemotron-H")
        pattern += kind
    heads, dense = g.need("ssm.time_step_rank"), pattern.find("-")
    c |= {"hybrid_override_pattern": pattern, "num_key_value_heads": max(g.need("attention.head_count_kv")),
          "mamba_num_heads": heads, "mamba_head_dim": g.need("ssm.inner_size") // heads,
          "n_groups": g.need("ssm.group_count"), "ssm_state_size": g.need("ssm.state_size"),
          "conv_kernel": g.need("ssm.conv_kernel"), "n_routed_experts": c.get("num_local_experts"),
          "moe_shared_expert_intermediate_size": c.pop("shared_expert_intermediate_size", 0),
          "intermediate_size": g.tensor(f"blk.{dense}.ffn_up.weight").shape[0] if dense >= 0 else 0,
          "use_conv_bias": any(name.endswith(".ssm_conv1d.bias") for name in g.tensors),
          "use_bias": any(name.endswith(".ssm_in.bias") for name in g.tensors)}


def layer_types(c: dict, path: Path) -> list[str]:
    """The layers' kinds, from the hub's `hybrid_override_pattern` or transformers 5's `layers_block_type`."""
    pattern = c.get("hybrid_override_pattern")
    if isinstance(pattern, str) and pattern and set(pattern) <= set(PATTERN):
        types = [PATTERN[ch] for ch in pattern]
    elif pattern is not None:
        raise UserError(f"{path}: hybrid_override_pattern must be a string of {', '.join(PATTERN)}, got {pattern!r}")
    else:
        types = c.get("layers_block_type") or c.get("layer_types")
        if not isinstance(types, list) or not types:
            raise UserError(f"{path}: needs hybrid_override_pattern (or layers_block_type)")
        types = [LEGACY.get(t, t) for t in types]
        if not set(types) <= set(PATTERN.values()):
            raise UserError(f"{path}: layers_block_type must be of {', '.join(PATTERN.values())}")
    n = c.get("num_hidden_layers")
    if n is not None and n != len(types):
        raise UserError(f"{path}: num_hidden_layers is {n}, but the layer pattern has {len(types)}")
    return types


def config(c: dict, path: Path) -> ModelConfig:
    types = layer_types(c, path)
    if c.get("moe_latent_size") is not None:
        raise UserError(f"{path}: moe_latent_size (experts in a latent space, Nemotron-3-Super) is not implemented")
    for key, want in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
        if c.get(key, want) != want:
            raise UserError(f"{path}: {key} {c[key]!r} is not implemented (only {want})")
    limit = c.get("time_step_limit", c.get("mamba_dt_limit")) or (0.0, math.inf)
    if not (isinstance(limit, list | tuple) and len(limit) == 2):
        raise UserError(f"{path}: time_step_limit must be [min, max], got {limit!r}")
    low, high = (float(v["__float__"] if isinstance(v, dict) else v) for v in limit)  # transformers 5 writes inf so
    kinds = {kind: tuple(i for i, t in enumerate(types) if t == kind) for kind in PATTERN.values()}
    return hf_common(
        c | {"num_hidden_layers": len(types)}, path, family="nemotron_h",
        ffn_dim=int(need(c, path, "moe_intermediate_size")),
        num_experts=int(need(c, path, "n_routed_experts", "num_local_experts")),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), partial_rotary_factor=0.0, ffn_act="relu2",
        router="sigmoid", n_group=int(c.get("n_group") or 1), topk_group=int(c.get("topk_group") or 1),
        norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        shared_ffn_dim=int(c.get("moe_shared_expert_intermediate_size") or 0),
        dense_ffn_dim=int(c.get("intermediate_size") or 0), dense_layers=kinds["mlp"],
        mamba_layers=kinds["linear_attention"], mixer_only=kinds["linear_attention"] + kinds["full_attention"],
        ffn_only=kinds["moe"] + kinds["mlp"],
        mamba_heads=int(need(c, path, "mamba_num_heads")), mamba_head_dim=int(need(c, path, "mamba_head_dim")),
        mamba_groups=int(need(c, path, "n_groups", "mamba_n_groups")),
        mamba_state=int(need(c, path, "ssm_state_size")),
        mamba_conv_kernel=int(c.get("conv_kernel", c.get("mamba_d_conv", 4))),
        mamba_chunk=int(c.get("chunk_size", c.get("mamba_chunk_size", 128))),
        mamba_bias=bool(c.get("use_bias", False)),
        mamba_conv_bias=bool(c.get("use_conv_bias", c.get("mamba_conv_bias", True))),
        mamba_dt_min=low, mamba_dt_max=None if math.isinf(high) else high, sliding_window=None,
    )
