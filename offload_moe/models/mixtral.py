"""Mixtral (Mistral AI): RMSNorm, GQA attention without biases, softmax router whose top-k is
renormalised, SwiGLU experts. Two checkpoint layouts: the hub's (per-expert
`block_sparse_moe.experts.E.w1`, or transformers-5's fused `mlp.experts.gate_up_proj`) and the
original release's (`params.json`, read in `weights/checkpoint.py` with the ORIGINAL_* tables)."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, hf_common, need

MODEL_TYPES = {"mixtral": ("MixtralForCausalLM",)}

DENSE = [(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight", "layers.{0}.gate.weight")]
EXPERT = r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight"
PARTS = {"w1": "w1", "w2": "w2", "w3": "w3"}
# transformers 5 writes a layer's experts fused: gate_up_proj [E, 2I, D] (w1 rows, then w3), down_proj [E, D, I]
FUSED = r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)"

# GGUF (llama.cpp): Mixtral is its `llama` arch; the converter interleaves wq/wk rows (LlamaModel.permute)
GGUF_ARCH = {"llama": "mixtral"}
GGUF_DENSE: list = []
GGUF_PERMUTED = True
# files written before llama.cpp stacked each layer's experts (b2589, April 2024), e.g. the first Mixtral GGUFs
GGUF_EXPERT = r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight"

# the original release: params.json + consolidated.NN.pt
ORIGINAL_DENSE = [
    (r"(tok_embeddings|norm|output)\.weight", "{0}.weight"),
    (r"layers\.(\d+)\.(attention_norm|ffn_norm)\.weight", "layers.{0}.{1}.weight"),
    (r"layers\.(\d+)\.attention\.(w[qkvo])\.weight", "layers.{0}.attention.{1}.weight"),
    (r"layers\.(\d+)\.(?:block_sparse_moe|feed_forward)\.gate\.weight", "layers.{0}.gate.weight"),
]
ORIGINAL_STACKED = r"layers\.(\d+)\.block_sparse_moe\.(w[123])"  # [E*I, D] per part
ORIGINAL_EXPERT = r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight"


def config(c: dict, path: Path) -> ModelConfig:
    return hf_common(c, path, family="mixtral", ffn_dim=int(need(c, path, "intermediate_size")),
                     num_experts=int(need(c, path, "num_local_experts")), norm_topk_prob=True)
