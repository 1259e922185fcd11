"""gpt-oss (OpenAI, `GptOssForCausalLM`: gpt-oss-20b, gpt-oss-120b): a router with a bias whose softmax runs
over the top-k logits only (the softmax router renormalised: the same weights), experts with biases and a
clamped SwiGLU (`swiglu_limit`, `formats.base.clamped_swiglu`), q/k/v/o biases (`attention_bias`), a learned
sink logit per head (`self_attn.sinks`), a sliding window (`sliding_window`, 128) on the layers that
`layer_types` calls sliding (every other one) and full attention on the rest, YaRN RoPE.

The experts of a layer are fused: `gate_up_proj` [E, D, 2I], gate and up in alternate columns (gate
even, up odd), with `gate_up_proj_bias` [E, 2I]; `down_proj` [E, I, D] with `down_proj_bias` [E, D]. The
official checkpoints store both weights as MXFP4 (`quantization_config.quant_method` "mxfp4"):
`*_blocks` [E, N, K/32, 16] uint8 and `*_scales` [E, N, K/32] uint8, output-major (N = 2I interleaved
rows for gate_up, N = D for down), which `mxfp4.py` keeps as they are; the BF16 variants hold the plain
tensors. FUSED_PARTS says which of our parts each one holds (checkpoint.py reads it).

GGUF: llama.cpp's `gpt-oss` arch. Its converter splits gate_up apart (gate the even rows, up the odd ones, each
expert's [I, D] as ours; their biases alike), transposes the BF16 weights, keeps MXFP4 as ggml's MXFP4 (decoded
as read, by gguf-py, and kept as our MXFP4 format: `Checkpoint.mxfp4_experts`), and names the sinks `attn_sinks`,
the post-attention norm `post_attention_norm`. The file has no SwiGLU limit (llama.cpp's is 7, the hub's) and no
YaRN `truncate` (false in the hub's config)."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need
from ..errors import UserError
from ..formats.base import SWIGLU_ALPHA as ALPHA

MODEL_TYPES = {"gpt_oss": ("GptOssForCausalLM",)}

L = r"model\.layers\.(\d+)\."
DENSE = [
    (L + r"mlp\.router\.(weight|bias)", "layers.{0}.gate.{1}"),
    (L + r"self_attn\.sinks", "layers.{0}.attention.sinks"),
]
EXPERT = None  # no per-expert tensors: a layer's experts are fused
PARTS: dict[str, str] = {}
FUSED = r"model\.layers\.(\d+)\.mlp\.experts\.((?:gate_up|down)_proj(?:_bias|_blocks|_scales)?)"
ALL, EVEN, ODD = slice(None), slice(0, None, 2), slice(1, None, 2)
# fused checkpoint part -> {our part: (index into one expert's slice, transposed)}: gate in the even columns
# (MXFP4: rows) of gate_up, up in the odd ones; the plain weights are [in, out], hence transposed
FUSED_PARTS = {
    "gate_up_proj": {"w1": ((ALL, EVEN), True), "w3": ((ALL, ODD), True)},
    "down_proj": {"w2": ((), True)},
    "gate_up_proj_bias": {"b1": ((EVEN,), False), "b3": ((ODD,), False)},
    "down_proj_bias": {"b2": ((), False)},
    "gate_up_proj_blocks": {"w1_blocks": ((EVEN,), False), "w3_blocks": ((ODD,), False)},
    "gate_up_proj_scales": {"w1_scales": ((EVEN,), False), "w3_scales": ((ODD,), False)},
    "down_proj_blocks": {"w2_blocks": ((), False)},
    "down_proj_scales": {"w2_scales": ((), False)},
}
LAYER_TYPES = ("sliding_attention", "full_attention")

GGUF_ARCH = {"gpt-oss": "gpt_oss"}
B = r"blk\.(\d+)\."
GGUF_DENSE = [
    (B + r"post_attention_norm\.weight", "layers.{0}.ffn_norm.weight"),
    (B + r"attn_sinks\.weight", "layers.{0}.attention.sinks"),
    (B + r"attn_output\.bias", "layers.{0}.attention.wo.bias"),
    (B + r"ffn_gate_inp\.bias", "layers.{0}.gate.bias"),
]
GGUF_PERMUTED = False
GGUF_EXPERT = None  # llama.cpp's files of this family all stack the experts


def gguf_config(c: dict, g) -> None:
    """YaRN without truncation, as the hub's config.json says."""
    if "rope_scaling" in c:
        c["rope_scaling"]["truncate"] = False


def config(c: dict, path: Path) -> ModelConfig:
    n_layers = int(need(c, path, "num_hidden_layers"))
    # transformers' default when the key is absent: sliding on even layers, full on odd ones
    types = c.get("layer_types") or [LAYER_TYPES[i % 2] for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= set(LAYER_TYPES):
        raise UserError(f"{path}: layer_types must give {n_layers} of {', '.join(LAYER_TYPES)}")
    quant = c.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "mxfp4":
        raise UserError(f"{path}: quantization_config {quant.get('quant_method')!r} is not supported (mxfp4 is)")
    if float(c.get("swiglu_alpha", ALPHA)) != ALPHA:
        raise UserError(f"{path}: swiglu_alpha {c['swiglu_alpha']} (the experts' activation takes {ALPHA})")
    bias = bool(c.get("attention_bias", True))
    return hf_common(
        c, path, family="gpt_oss", ffn_dim=int(need(c, path, "intermediate_size")),
        num_experts=int(need(c, path, "num_local_experts", "num_experts")), norm_topk_prob=True,
        qkv_bias=bias, o_bias=bias, attention_sinks=True, router_bias=True, expert_bias=True,
        swiglu_limit=float(c.get("swiglu_limit", 7.0)),
        sliding_window=int(c.get("sliding_window") or 128),  # transformers' default
        window_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
    )
