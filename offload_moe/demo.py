"""The embedded models, and a writer of random-weight Mixtral-layout checkpoints.

`demo` is the small MoE trained on Python's standard library that ships in the package
(`data/tiny-moe`, made by tools/train_tiny_moe.py): real text, real routing, no download.
`demo-fine` is its fine-grained twin (`data/tiny-moe-fine`: 32 experts of a quarter the size, top-4,
same corpus, tokenizer and script), the shape of recent MoEs, for cache and prefetch studies.
`demo-random` is a Mixtral-layout checkpoint with random weights and Mixtral's real 32000-piece
tokenizer, made once in a cache folder: the vocabulary and shapes the trained one cannot show.
The same writer makes the benchmark and GPU-check checkpoints (any Mixtral shape).
`find_model` turns a model as the user names it (these names, a folder or file, a hub id) into a local path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import UserError
from .tokenizer import BUNDLED
from .weights.hub import ModelRef, locate

DEMO_CONFIG = ModelConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16, ffn_dim=384, num_experts=8,
                          top_k=2, vocab_size=32000, max_context=4096)
TRAINED_DEMOS = {"demo": Path(__file__).parent / "data" / "tiny-moe",
                 "demo-fine": Path(__file__).parent / "data" / "tiny-moe-fine"}
DEMO_NAMES = (*TRAINED_DEMOS, "demo-random")


def cache_dir() -> Path:
    return Path(os.environ.get("OFFLOAD_MOE_CACHE", Path.home() / ".cache" / "offload_moe"))


def write_random_checkpoint(path: str | Path, c: ModelConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            layers_per_shard: int = 0) -> Path:
    """Write a Hugging Face layout checkpoint with random weights (std 0.02, norms 1), atomically.

    layers_per_shard > 0 writes one safetensors shard per that many layers and an index, so a
    large checkpoint is never whole in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def layer_tensors(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        t = {
            p + "input_layernorm.weight": torch.ones(c.dim, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(c.dim, dtype=dtype),
            p + "self_attn.q_proj.weight": rand(c.n_heads * c.head_dim, c.dim),
            p + "self_attn.k_proj.weight": rand(c.n_kv_heads * c.head_dim, c.dim),
            p + "self_attn.v_proj.weight": rand(c.n_kv_heads * c.head_dim, c.dim),
            p + "self_attn.o_proj.weight": rand(c.dim, c.n_heads * c.head_dim),
            p + "block_sparse_moe.gate.weight": rand(c.num_experts, c.dim),
        }
        for e in range(c.num_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            t |= {q + "w1.weight": rand(c.ffn_dim, c.dim), q + "w3.weight": rand(c.ffn_dim, c.dim),
                  q + "w2.weight": rand(c.dim, c.ffn_dim)}
        return t

    head = {"model.embed_tokens.weight": rand(c.vocab_size, c.dim), "model.norm.weight": torch.ones(c.dim, dtype=dtype)}
    if not c.tie_word_embeddings:
        head["lm_head.weight"] = rand(c.vocab_size, c.dim)
    if layers_per_shard <= 0:
        tensors = dict(head)
        for i in range(c.n_layers):
            tensors |= layer_tensors(i)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        groups = [list(range(i, min(i + layers_per_shard, c.n_layers))) for i in range(0, c.n_layers, layers_per_shard)]
        n = len(groups) + 1
        weight_map = {}
        for s, layers in enumerate([None, *groups]):
            name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            tensors = head if layers is None else {k: v for i in layers for k, v in layer_tensors(i).items()}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, name)
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(c.to_hf_config(dtype), indent=2))
    shutil.copy(BUNDLED, tmp / "tokenizer.model")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def random_demo_model() -> Path:
    """The random-weight demo checkpoint, made on first use."""
    path = cache_dir() / "demo-random"
    if not (path / "config.json").exists():
        write_random_checkpoint(path, DEMO_CONFIG)
    return path


def find_model(name: str | Path, revision: str | None = None, files: list[str] | None = None) -> ModelRef:
    """A model as the user names it, wherever a model is taken: one of the embedded names, else a folder, a GGUF
    file or a hub id (`weights.hub.locate`, which `files` and `revision` are for)."""
    name = str(name)
    if name in DEMO_NAMES:
        if revision is not None:
            raise UserError(f"a revision applies to a hub id, not to the embedded model {name}")
        return ModelRef(TRAINED_DEMOS[name] if name in TRAINED_DEMOS else random_demo_model(), name)
    return locate(name, revision, files)


def resolve_model(name: str | Path, revision: str | None = None) -> Path:
    """The local path of a model as the user names it (`find_model`)."""
    return find_model(name, revision).path
