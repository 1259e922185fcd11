"""GLM-4.5 and GLM-4.5-Air (Zhipu AI, `Glm4MoeForCausalLM`): the sigmoid router of DeepSeek-V3
(`transformer.sigmoid_topk`: sigmoid scores, `e_score_correction_bias` for the choice only, group-limited
top-k over `n_group` / `topk_group`, renormalised by `norm_topk_prob`, times `routed_scaling_factor`),
one resident shared expert without a gate (`n_shared_experts` x `moe_intermediate_size`), dense MLP
layers first (`first_k_dense_replace`, `intermediate_size`), q/k/v biases (`attention_bias`; no
bias on o), optional per-head QK-norm (`use_qk_norm`), and partial RoPE (`partial_rotary_factor`,
0.5 when absent, as transformers: the first half of each head's dims turn).

The hub's checkpoints also hold the multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`,
`num_nextn_predict_layers`): its tensors are not read (transformers ignores them too).

GGUF: llama.cpp's `glm4moe` arch; its converter keeps the multi-token-prediction layer as the last block
(`nextn_predict_layers`: not read), names the post-attention norm `post_attention_norm`, and gives the rotary dims
as `rope.dimension_count` (head_dim x partial_rotary_factor)."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need

MODEL_TYPES = {"glm4_moe": ("Glm4MoeForCausalLM",)}

L = r"model\.layers\.(\d+)\.mlp\."
DENSE = [
    (L + r"gate\.weight", "layers.{0}.gate.weight"),
    (L + r"gate\.e_score_correction_bias", "layers.{0}.gate.e_score_correction_bias"),
    (L + r"shared_experts\.gate_proj\.weight", "layers.{0}.shared.w1.weight"),
    (L + r"shared_experts\.up_proj\.weight", "layers.{0}.shared.w3.weight"),
    (L + r"shared_experts\.down_proj\.weight", "layers.{0}.shared.w2.weight"),
    (L + r"gate_proj\.weight", "layers.{0}.mlp.w1.weight"),
    (L + r"up_proj\.weight", "layers.{0}.mlp.w3.weight"),
    (L + r"down_proj\.weight", "layers.{0}.mlp.w2.weight"),
]
EXPERT = L + r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# transformers 5's in-memory layout, should a checkpoint hold it: gate_up_proj [E, 2I, D], down_proj [E, D, I]
FUSED = r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)"

GGUF_ARCH = {"glm4moe": "glm4_moe"}
B = r"blk\.(\d+)\."
# the router's choice bias, the shared expert and the dense layers' MLP: GGUF_COMMON's names
GGUF_DENSE = [(B + r"post_attention_norm\.weight", "layers.{0}.ffn_norm.weight")]
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def gguf_config(c: dict, g) -> None:
    """The rotary share from the rotary dims, QK-norm from its tensors."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    c["partial_rotary_factor"] = g.need("rope.dimension_count") / head_dim
    c["use_qk_norm"] = any(name.endswith(".attn_q_norm.weight") for name in g.tensors)


def config(c: dict, path: Path) -> ModelConfig:
    n_layers = int(need(c, path, "num_hidden_layers"))
    first_dense = min(int(c.get("first_k_dense_replace", 1)), n_layers)
    rope = c.get("rope_parameters") or {}
    partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    moe_ffn = int(need(c, path, "moe_intermediate_size"))
    return hf_common(
        c, path, family="glm4_moe", ffn_dim=moe_ffn,
        num_experts=int(need(c, path, "n_routed_experts", "num_local_experts", "num_experts")),
        qkv_bias=bool(c.get("attention_bias", False)), o_bias=False,
        qk_norm="head" if c.get("use_qk_norm") else "none",
        router="sigmoid", norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        n_group=int(c.get("n_group") or 1), topk_group=int(c.get("topk_group") or 1),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        shared_ffn_dim=moe_ffn * int(c.get("n_shared_experts", 1) or 0), shared_gate=False,
        dense_ffn_dim=int(c.get("intermediate_size") or 0), dense_layers=tuple(range(first_dense)),
        partial_rotary_factor=float(partial), sliding_window=None,
    )
