"""DeepSeek-V2 / V2-Lite (`DeepseekV2ForCausalLM`) and DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head
latent attention (`modeling/mla.py`; q straight from x, or through `q_lora_rank` when set; YaRN RoPE whose
`mscale_all_dim` also scales the softmax; the rotary dims interleaved, always in V2, by `rope_interleave`
in V3), a resident shared expert without gate (`n_shared_experts` x `moe_intermediate_size`), dense MLP
layers first (`first_k_dense_replace`; then every `moe_layer_freq`-th layer has experts, as DeepSeek's
own code), and the router:
  V2  softmax in float32, top-k `greedy` or `group_limited_greedy` (the best `topk_group` of `n_group`
      groups, each scored by its best expert); renormalised by `norm_topk_prob`, else times
      `routed_scaling_factor` (`transformer.grouped_softmax_topk`);
  V3  GLM-4.5's sigmoid router (`transformer.sigmoid_topk`, `noaux_tc`).
The tensor names beside the attention's are GLM-4.5's. V3's hub checkpoints also hold the
multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`): it is not read.

GGUF: llama.cpp's `deepseek2` arch, for V2, V3 and GLM-4.7-Flash alike (read as V3: the same model under other
keys); `expert_gating_func` tells the router, or where a file lacks it (V2's first files, and GLM-4.7-Flash's,
whose config.json has no `scoring_func`) the router's choice bias does (`exp_probs_b`: V3's sigmoid router; none:
V2's softmax); the group count tells V2's top-k method; `expert_weights_norm` is written only when true. The
converter writes latent attention as the MQA that llama.cpp runs: `head_count_kv` 1, `key_length` kv_lora_rank +
rope dims, the heads' sizes in `key_length_mla` and `value_length_mla` (older files: in key_length and
value_length); it splits kv_b_proj into `attn_k_b` (each head's nope rows, transposed) and `attn_v_b`, joined again
here (older files keep `attn_kv_b`). YaRN's `yarn_log_multiplier` is 0.1 x mscale_all_dim; the file has no other
mscale (llama.cpp takes them equal, as the hub's models have them)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig, hf_common, need
from ..errors import UserError
from . import glm4_moe

MODEL_TYPES = {"deepseek_v2": ("DeepseekV2ForCausalLM",), "deepseek_v3": ("DeepseekV3ForCausalLM",)}

EXPERT, PARTS, FUSED = glm4_moe.EXPERT, glm4_moe.PARTS, glm4_moe.FUSED
A = r"model\.layers\.(\d+)\.self_attn\."
DENSE = glm4_moe.DENSE + [  # q_proj and o_proj are COMMON's wq and wo
    (A + r"q_a_proj\.weight", "layers.{0}.attention.wq_a.weight"),
    (A + r"q_a_layernorm\.weight", "layers.{0}.attention.q_norm.weight"),
    (A + r"q_b_proj\.weight", "layers.{0}.attention.wq_b.weight"),
    (A + r"kv_a_proj_with_mqa\.weight", "layers.{0}.attention.wkv_a.weight"),
    (A + r"kv_a_layernorm\.weight", "layers.{0}.attention.kv_norm.weight"),
    (A + r"kv_b_proj\.weight", "layers.{0}.attention.wkv_b.weight"),
]

GGUF_ARCH = {"deepseek2": "deepseek_v2"}
B, P = glm4_moe.B, "layers.{0}.attention."
GGUF_DENSE = [  # with GGUF_COMMON's router bias, shared expert and dense MLP
    (B + r"attn_q_a\.weight", P + "wq_a.weight"),
    (B + r"attn_q_a_norm\.weight", P + "q_norm.weight"),
    (B + r"attn_q_b\.weight", P + "wq_b.weight"),
    (B + r"attn_kv_a_mqa\.weight", P + "wkv_a.weight"),
    (B + r"attn_kv_a_norm\.weight", P + "kv_norm.weight"),
    (B + r"attn_kv_b\.weight", P + "wkv_b.weight"),
    (B + r"attn_([kv])_b\.weight", P + "w{1}_b.weight"),  # wkv_b's parts: GGUF_JOINED
]
GGUF_PERMUTED = False  # V2's rope pairs are interleaved already, as llama.cpp turns them
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def _kv_b(c: ModelConfig, k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [H, kv_lora_rank, nope] and attn_v_b [H, v, kv_lora_rank] -> kv_b_proj [H (nope + v), kv_lora_rank]."""
    return torch.cat([k_b.transpose(1, 2), v_b], 1).flatten(0, 1)


GGUF_JOINED = [(P + "wkv_b.weight", (P + "wk_b.weight", P + "wv_b.weight"), _kv_b)]


def gguf_config(c: dict, g) -> None:
    """A `deepseek2` file's: the router (V2's or V3's), the heads' sizes, YaRN's mscales."""
    gating = g.meta("expert_gating_func")  # 1 softmax, 2 sigmoid
    sigmoid = gating == 2 if gating else any(name.endswith(".exp_probs_b.bias") for name in g.tensors)
    rope = g.need("rope.dimension_count")
    key = g.meta("attention.key_length_mla") or g.need("attention.key_length")
    c.pop("head_dim", None)  # key_length: the MQA's (kv_lora_rank + rope), or the heads' in older files
    c |= {"model_type": "deepseek_v3" if sigmoid else "deepseek_v2", "qk_rope_head_dim": rope,
          "qk_nope_head_dim": key - rope,
          "v_head_dim": g.meta("attention.value_length_mla") or g.need("attention.value_length"),
          "scoring_func": "sigmoid" if sigmoid else "softmax", "norm_topk_prob": bool(c.get("norm_topk_prob")),
          "topk_method": "noaux_tc" if sigmoid else "group_limited_greedy" if c.get("n_group", 1) > 1 else "greedy"}
    c["architectures"] = list(MODEL_TYPES[c["model_type"]])
    if (log_mul := g.meta("rope.scaling.yarn_log_multiplier")) is not None and "rope_scaling" in c:
        c["rope_scaling"] |= {"mscale": log_mul * 10, "mscale_all_dim": log_mul * 10}


TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",),
                "glm4_moe_lite": ("noaux_tc",)}
SCORING = {"deepseek_v2": "softmax", "deepseek_v3": "sigmoid", "glm4_moe_lite": "sigmoid"}


def config(c: dict, path: Path) -> ModelConfig:
    v3 = c.get("model_type") == "deepseek_v3" or "DeepseekV3ForCausalLM" in (c.get("architectures") or [])
    n_layers = int(need(c, path, "num_hidden_layers"))
    first = int(c.get("first_k_dense_replace", 3 if v3 else 0) or 0)
    freq = int(c.get("moe_layer_freq") or 1)
    dense = tuple(i for i in range(n_layers) if i < first or i % freq)
    if v3:
        return latent_moe(c, path, "deepseek_v3", dense, rope_interleave=bool(c.get("rope_interleave", True)))
    return latent_moe(c, path, "deepseek_v2", dense, rope_interleave=True)


def latent_moe(c: dict, path: Path, family: str, dense_layers: tuple[int, ...], **variant) -> ModelConfig:
    """DeepSeek's layout, under the keys its hub configs (and GLM-4.7-Flash's) share: latent attention,
    `n_routed_experts` and `n_shared_experts` of `moe_intermediate_size`, the dense MLP's `intermediate_size`,
    and `family`'s router (V2's softmax one, or the sigmoid one), checked against `topk_method` and
    `scoring_func`; `variant`: further ModelConfig fields (rope_interleave)."""
    method = c.get("topk_method") or TOPK_METHODS[family][0]
    scoring = c.get("scoring_func") or SCORING[family]
    if method not in TOPK_METHODS[family] or scoring != SCORING[family]:
        raise UserError(f"{path}: {family} routes with topk_method {' or '.join(TOPK_METHODS[family])} and "
                        f"scoring_func {SCORING[family]}; this config says {method!r} and {scoring!r}")
    if c.get("attention_bias"):
        raise UserError(f"{path}: attention_bias (biased latent attention projections) is not implemented")
    sigmoid = scoring == "sigmoid"
    grouped = method != "greedy"
    nope, rope = int(need(c, path, "qk_nope_head_dim")), int(need(c, path, "qk_rope_head_dim"))
    moe_ffn = int(need(c, path, "moe_intermediate_size"))
    heads = int(need(c, path, "num_attention_heads"))
    return hf_common(
        c, path, family=family, ffn_dim=moe_ffn,
        num_experts=int(need(c, path, "n_routed_experts", "num_local_experts", "num_experts")),
        n_kv_heads=heads, head_dim=nope + rope, kv_lora_rank=int(need(c, path, "kv_lora_rank")),
        q_lora_rank=int(c.get("q_lora_rank") or 0), qk_rope_head_dim=rope, v_head_dim=int(need(c, path, "v_head_dim")),
        router="sigmoid" if sigmoid else "grouped_softmax", norm_topk_prob=bool(c.get("norm_topk_prob", sigmoid)),
        n_group=int(c.get("n_group") or 1) if grouped else 1,
        topk_group=int(c.get("topk_group") or 1) if grouped else 1,
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        shared_ffn_dim=moe_ffn * int(c.get("n_shared_experts") or 0), shared_gate=False,
        dense_ffn_dim=int(c.get("intermediate_size") or 0), dense_layers=dense_layers, sliding_window=None,
        **variant,
    )
