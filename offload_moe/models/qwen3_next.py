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
(transformers ignores them too).

GGUF: llama.cpp's `qwen3next` arch. Its converter stores the zero-centred norms as 1 + w, A_log as
A = -exp(A_log), the conv squeezed to [C, L] (each undone here), names the post-attention norm
`post_attention_norm`, and gives the linear attention's sizes as Mamba's keys (`ssm.state_size` the key head dim,
`ssm.group_count` the key heads, `ssm.time_step_rank` the value heads, `ssm.inner_size` all value dims). It
splits in_proj_qkvz into `attn_qkv` (every q head, every k head, every v head) and `attn_gate` (z), joined again
here in the grouped order; older files keep it whole, as the hub's (`ssm_in`)."""

from __future__ import annotations

from pathlib import Path

import torch

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


def qkvz(c: ModelConfig, qkv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """in_proj_qkv [2 Hk dk + Hv dv, D] (every q head, every k head, every v head) and in_proj_z [Hv dv, D] -> wqkvz,
    grouped per key head (its q, k, then the v and z of its Hv/Hk value heads)."""
    Hk, dk, D = c.linear_k_heads, c.linear_k_dim, c.dim
    r_dv = c.linear_v_heads // Hk * c.linear_v_dim  # the value dims of one key head's value heads
    q, k, v = qkv.split([Hk * dk, Hk * dk, Hk * r_dv])
    return torch.cat([q.view(Hk, dk, D), k.view(Hk, dk, D), v.view(Hk, r_dv, D), z.view(Hk, r_dv, D)], 1).flatten(0, 1)


def ba(c: ModelConfig, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """in_proj_b, in_proj_a [Hv, D] -> wba, grouped per key head: its value heads' b, then their a."""
    Hk, D = c.linear_k_heads, c.dim
    return torch.cat([b.view(Hk, -1, D), a.view(Hk, -1, D)], 1).flatten(0, 1)


def centred(c: ModelConfig, w: torch.Tensor) -> torch.Tensor:
    """A norm's weight that the converter stored as 1 + w: ours applies 1 + w itself."""
    return w - 1


def a_log(c: ModelConfig, a: torch.Tensor) -> torch.Tensor:
    """A_log from the converter's A = -exp(A_log)."""
    return torch.log(-a)


GGUF_ARCH = {"qwen3next": "qwen3_next"}
B, P = r"blk\.(\d+)\.", "layers.{0}.attention."
GGUF_NORMS = [  # every norm but linear attention's gated one, stored as 1 + w
    (r"output_norm\.weight", "norm.weight", centred),
    (B + r"attn_norm\.weight", "layers.{0}.attention_norm.weight", centred),
    (B + r"post_attention_norm\.weight", "layers.{0}.ffn_norm.weight", centred),
    (B + r"attn_([qk])_norm\.weight", P + "{1}_norm.weight", centred),
]
GGUF_DENSE = [
    *GGUF_NORMS,
    (B + r"ssm_in\.weight", P + "wqkvz.weight"),
    (B + r"attn_qkv\.weight", P + "in_proj_qkv.weight"),  # wqkvz's parts: GGUF_JOINED
    (B + r"attn_gate\.weight", P + "in_proj_z.weight"),
    (B + r"ssm_ba\.weight", P + "wba.weight"),
    (B + r"ssm_conv1d\.weight", P + "conv.weight"),
    (B + r"ssm_dt\.bias", P + "dt_bias"),
    (B + r"ssm_a", P + "A_log", a_log),
    (B + r"ssm_norm\.weight", P + "norm.weight"),
    (B + r"ssm_out\.weight", P + "wo.weight"),
    *qwen_moe.GGUF_DENSE,
]
GGUF_JOINED = [(P + "wqkvz.weight", (P + "in_proj_qkv.weight", P + "in_proj_z.weight"), qkvz)]
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def gguf_config(c: dict, g) -> None:
    """The linear attention's sizes from Mamba's keys, the rotary share from the rotary dims."""
    v_heads = g.need("ssm.time_step_rank")
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    c |= {"linear_conv_kernel_dim": g.need("ssm.conv_kernel"), "linear_key_head_dim": g.need("ssm.state_size"),
          "linear_num_key_heads": g.need("ssm.group_count"), "linear_num_value_heads": v_heads,
          "linear_value_head_dim": g.need("ssm.inner_size") // v_heads,
          "full_attention_interval": g.meta("full_attention_interval") or 4,
          "partial_rotary_factor": g.need("rope.dimension_count") / head_dim}


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
