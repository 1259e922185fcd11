"""Model families. Each module declares, and holds nothing else:
  MODEL_TYPES  {config.json `model_type`: its `architectures` names}
  config(c, path) -> ModelConfig, from the hub's `config.json` keys (old and new RoPE styles), with
               the variant of each shared piece that the family uses (norm, attention bias, QK-norm,
               router, shared expert, dense layers);
  DENSE        [(checkpoint-name regex, our name)] for the resident tensors, beyond `COMMON`; our name a format
               string of the groups, or a function of the config and them (Nemotron-H's norms);
  EXPERT       a regex whose groups are (layer, expert, checkpoint part), and PARTS, their names in
               ours: w1 (gate), w3 (up), w2 (down); or None (gpt-oss: fused experts only);
  FUSED        a regex for a layer's fused expert tensors (transformers 5's gate_up_proj, down_proj),
               or None: groups (layer, checkpoint part). Their layout is transformers 5's, gate_up_proj
               [E, 2I, D] (w1 rows, then w3) and down_proj [E, D, I], unless the family declares its own
               in FUSED_PARTS (gpt-oss: {checkpoint part: {our part: (index into one expert, transposed)}}).
A family may also declare, for checkpoints laid out otherwise (Qwen3.5-MoE's):
  PREFIXES     {a stored name's prefix: the prefix the tables read instead} (a wrapper's text model);
  SKIPPED      {regex: what it is} for tensors known and not run (a vision tower): never read, said once;
  JOINED       [(our name, its parts' names, join(config, *parts))], names with `{0}` for the layer: ours is
               made at load of the parts, which DENSE names (Qwen3.5's separate in_proj_qkv and in_proj_z).
A family that llama.cpp converts (a GGUF file, `weights/gguf.py`) also declares:
  GGUF_ARCH    {GGUF `general.architecture`: our model_type}, the names llama.cpp's converter writes;
  GGUF_DENSE   [(llama.cpp tensor-name regex, our name[, undo])] beyond `GGUF_COMMON` (the first match wins);
               `undo(config, tensor)`: what reverses the converter's change to that tensor (Qwen3-Next's norms
               stored as 1 + w, Mamba's A stored as -exp(A_log), ...);
  GGUF_PERMUTED  whether the converter interleaved wq/wk rows for its RoPE (the `llama` arch), undone at load.
  GGUF_EXPERT  a regex for one expert's tensor in files that predate stacked experts (groups: layer, part in
               `GGUF_PARTS`, expert), or None; every file stacks them in `GGUF_EXPERTS`.
and may declare:
  GGUF_PARTS   its own {llama.cpp part: ours} (relu2 experts: up is w1);
  GGUF_JOINED  as JOINED, for a tensor the converter split (DeepSeek's kv_b_proj in attn_k_b and attn_v_b);
  gguf_config(c, g)  what completes the config.json `c` from the file `g` (`g.meta(key)`: `{arch}.key`; its tensor
               names): the arch's own metadata keys (latent attention's sizes, the Mamba keys), a model_type.
The shared pieces live once, in `modeling/`; checkpoint reading, in `weights/checkpoint.py`.

Our names: `tok_embeddings`, `norm`, `output`, `layers.N.attention_norm`, `layers.N.ffn_norm`,
`layers.N.attention.{wq,wk,wv,wo}` (with `.bias` where the family has one), `layers.N.attention.sinks` (gpt-oss),
`layers.N.attention.{q_norm,k_norm}`, linear attention's `layers.N.attention.{wqkvz,wba,conv,dt_bias,A_log,norm,wo}`
(Qwen3-Next), the short conv's `layers.N.attention.{wbcx,conv,wo}` (LFM2), Mamba-2's
`layers.N.attention.{wzxbcdt,conv,dt_bias,A_log,skip,norm,wo}` (Nemotron-H), latent attention's
`layers.N.attention.{wq_a,q_norm,wq_b,wkv_a,kv_norm,wkv_b}`
beside its wq or wo, `layers.N.gate` (the router; `.e_score_correction_bias` for
the sigmoid router, `.bias` for gpt-oss's), `layers.N.shared.{w1,w2,w3}`
and `layers.N.shared_gate` (a resident shared expert), `layers.N.mlp.{w1,w2,w3}` (a dense layer);
experts are `(layer, expert)` with parts w1, w3 [I, D] and w2 [D, I] (relu2 experts: no w3) (and biases b1, b3
[I], b2 [D] where the family has them; an MXFP4 checkpoint's `w1_blocks`, `w1_scales`, ... in `mxfp4.py`'s layout).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..config import ModelConfig, check_numbers, read_json
from ..errors import UserError
from . import (
    deepseek,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    lfm2_moe,
    minimax_m2,
    mixtral,
    nemotron_h,
    olmoe,
    phimoe,
    qwen3_5_moe,
    qwen3_next,
    qwen_moe,
)

FAMILIES: tuple[ModuleType, ...] = (mixtral, qwen_moe, olmoe, phimoe, glm4_moe, deepseek, gpt_oss, glm4_moe_lite,
                                    minimax_m2, qwen3_next, lfm2_moe, qwen3_5_moe, nemotron_h)

# names that every family here shares (the Llama layout), checkpoint regex -> ours
L = r"model\.layers\.(\d+)\."
COMMON = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.(weight|bias)", "norm.{0}"),
    (r"lm_head\.(weight|bias)", "output.{0}"),
    (L + r"input_layernorm\.(weight|bias)", "layers.{0}.attention_norm.{1}"),
    (L + r"post_attention_layernorm\.(weight|bias)", "layers.{0}.ffn_norm.{1}"),
    (L + r"self_attn\.([qkvo])_proj\.(weight|bias)", "layers.{0}.attention.w{1}.{2}"),
    (L + r"self_attn\.([qk])_norm\.weight", "layers.{0}.attention.{1}_norm.weight"),
]


# GGUF: llama.cpp's names that every family here shares (`gguf.TENSOR_NAMES`), regex -> ours
B = r"blk\.(\d+)\."
GGUF_COMMON = [
    (r"token_embd\.weight", "tok_embeddings.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
    (B + r"attn_norm\.weight", "layers.{0}.attention_norm.weight"),
    (B + r"ffn_norm\.weight", "layers.{0}.ffn_norm.weight"),
    (B + r"attn_([qkv])\.(weight|bias)", "layers.{0}.attention.w{1}.{2}"),
    (B + r"attn_output\.weight", "layers.{0}.attention.wo.weight"),
    (B + r"attn_([qk])_norm\.weight", "layers.{0}.attention.{1}_norm.weight"),
    (B + r"ffn_gate_inp\.weight", "layers.{0}.gate.weight"),
    (B + r"exp_probs_b\.bias", "layers.{0}.gate.e_score_correction_bias"),  # the sigmoid router's choice bias
    # a shared expert's and a dense layer's gated MLP (relu2 families name theirs in GGUF_DENSE, which comes first)
    (B + r"ffn_gate_shexp\.weight", "layers.{0}.shared.w1.weight"),
    (B + r"ffn_up_shexp\.weight", "layers.{0}.shared.w3.weight"),
    (B + r"ffn_down_shexp\.weight", "layers.{0}.shared.w2.weight"),
    (B + r"ffn_gate\.weight", "layers.{0}.mlp.w1.weight"),
    (B + r"ffn_up\.weight", "layers.{0}.mlp.w3.weight"),
    (B + r"ffn_down\.weight", "layers.{0}.mlp.w2.weight"),
]
# a layer's experts stacked in one tensor per part: gate and up [E, I, D], down [E, D, I], biases [E, I] and [E, D]
# (gpt-oss); or gate and up fused, [E, 2I, D] (gate rows first: the converter's --fuse-gate-up-exps)
GGUF_EXPERTS = B + r"ffn_(gate_up|gate|up|down)_exps\.(weight|bias)"
GGUF_PARTS = {"gate": "w1", "up": "w3", "down": "w2"}
# GGUF metadata, the key after `{arch}.` -> the config.json key that the family's `config` reads
GGUF_CONFIG = {
    "embedding_length": "hidden_size", "block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.clamp_kqv": "clip_qkv", "attention.sliding_window": "sliding_window", "rope.freq_base": "rope_theta",
    "feed_forward_length": "intermediate_size", "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size", "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok", "expert_weights_norm": "norm_topk_prob",
    "expert_weights_scale": "routed_scaling_factor", "expert_shared_count": "n_shared_experts",
    "expert_group_count": "n_group", "expert_group_used_count": "topk_group",
    "leading_dense_block_count": "first_k_dense_replace", "attention.q_lora_rank": "q_lora_rank",
    "attention.kv_lora_rank": "kv_lora_rank", "attention.layer_norm_epsilon": "layer_norm_epsilon",
}


def gguf_family(arch: str, path: Path) -> tuple[ModuleType, str]:
    """The family and model_type of a GGUF's `general.architecture`; any other is refused, as a config.json's."""
    for family in FAMILIES:
        if arch in getattr(family, "GGUF_ARCH", {}):
            return family, family.GGUF_ARCH[arch]
    names = ", ".join(f"{a} ({t})" for f in FAMILIES for a, t in getattr(f, "GGUF_ARCH", {}).items())
    raise UserError(f"{path} says general.architecture {arch!r}: offload_moe does not read it from a GGUF "
                    f"(supported: {names})")


def supported() -> dict[str, tuple[str, ...]]:
    """Every model_type the engine implements, with its architectures."""
    return {t: a for f in FAMILIES for t, a in f.MODEL_TYPES.items()}


def family_of(c: dict, path: Path) -> ModuleType:
    """The family of a config.json, by `model_type` (and `architectures`); one with neither key
    (hand-written) is taken as Mixtral. Anything else is refused with the supported list."""
    model_type = None if c.get("model_type") is None else str(c["model_type"])
    arch = c.get("architectures") or []
    arch = [str(a).encode("unicode_escape").decode() for a in (arch if isinstance(arch, list) else [arch])]  # one line
    for family in FAMILIES:
        for t, names in family.MODEL_TYPES.items():
            if model_type in (None, t) and set(arch) <= set(names) and (model_type or arch):
                return family
    if model_type is None and not arch:
        return mixtral
    says = [f"model_type {model_type!r}"] if model_type is not None else []
    if arch:
        says.append(f"architectures {', '.join(arch)}")
    names = ", ".join(f"{t} ({', '.join(a)})" for t, a in supported().items())
    raise UserError(f"{path} says {' and '.join(says)}: offload_moe does not implement it (supported: {names})")


def from_hf_config(path: Path) -> ModelConfig:
    """`config.json` as the hub has it: `config_of` its content."""
    return config_of(read_json(path), path)[1]


def config_of(c: dict, path: Path, family: ModuleType | None = None) -> tuple[ModuleType, ModelConfig]:
    """A hub config's family (by the architecture check, unless given) and its ModelConfig, from the family's
    reader after the type check of the keys every family reads. A value of a type a reader cannot take is a
    one-line error, not a traceback."""
    family = family or family_of(c, path)
    check_numbers(c, path)
    try:
        return family, family.config(c, path)
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError, IndexError) as e:  # a table for a number
        raise UserError(f"{path}: a value has the wrong type or range ({type(e).__name__}: {e})") from None
