"""Bytes of the resident weights in each format: the attention projections and the LM head, dense in the
compute dtype or int8 (`int8_linear.Int8Linear`: codes with a bf16 scale and zero per group), and all the
resident (non-expert) weights of a model. The experts' bytes: `registry.bytes_per_expert`.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .group import SCALE_DTYPE


def int8_bytes(params: int, group_size: int) -> int:
    """Bytes of `params` weights as int8 codes with a bf16 scale and zero per group."""
    return params + 2 * SCALE_DTYPE.itemsize * params // group_size


def attention_bytes(config: ModelConfig, quant: str, group_size: int, dtype: torch.dtype) -> int:
    """Bytes of all layers' attention projections, dense in `dtype` or int8 with bf16 scales and zeros."""
    n = config.attention_params
    if quant == "none":
        return n * dtype.itemsize
    return int8_bytes(n, group_size)


def dense_bytes(config: ModelConfig, dtype: torch.dtype, attention: str = "none", group_size: int = 64,
                head: str = "none") -> int:
    """The resident weights: everything in `dtype` but the attention projections and the LM head, which may be
    int8 (a tied head is then an int8 copy beside the embedding, which stays in `dtype`)."""
    dense = config.dense_params - config.attention_params
    if head == "int8":
        untied = 0 if config.tie_word_embeddings else config.vocab_size * config.dim
        return (dense - untied) * dtype.itemsize + attention_bytes(config, attention, group_size, dtype) + int8_bytes(
            config.vocab_size * config.dim, group_size)
    return dense * dtype.itemsize + attention_bytes(config, attention, group_size, dtype)
