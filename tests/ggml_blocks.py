"""Blocks of GGUF's quantized types to test and measure with (tests/test_ggml_format.py,
bench/bench_quant_kernels.py): numpy and gguf-py only."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from offload_moe.formats.ggml import row_bytes

# where each block's fp16 fields lie, for the types without a quantizer in gguf-py (random bytes elsewhere)
HALVES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def blocks(kind: Q, rows: int, K: int, rng) -> np.ndarray:
    """[rows, K/bs*ts] bytes of type `kind`: gguf-py's quantizer where it has one, else random blocks whose fp16
    fields are finite."""
    if kind not in HALVES:
        return gguf.quants.quantize(rng.standard_normal((rows, K)).astype(np.float32), kind)
    data = rng.integers(0, 256, (rows, row_bytes(kind, K)), dtype=np.uint8)
    view = data.reshape(-1, gguf.GGML_QUANT_SIZES[kind][1])  # the blocks: writing them writes data
    for at in HALVES[kind]:
        view[:, at:at + 2] = rng.uniform(-0.1, 0.1, len(view)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data
