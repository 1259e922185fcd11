"""MXFP4 experts, kept as MXFP4: gpt-oss's checkpoints store their experts so (OCP Microscaling FP4), and
the store holds, copies and computes from those very bytes: no re-quantization at load.

Encoding (as gpt-oss's `*_blocks` and `*_scales`, read the way transformers' integrations/mxfp4.py reads
them): a block is 32 consecutive inputs of one output row, 16 bytes holding two FP4 (E2M1) codes each,
element 2j in the low nibble of byte j and element 2j + 1 in the high one, plus one scale byte s (E8M0),
2**(s - 127). A code's bit 8 is the sign, its low 3 bits index FP4 = [0, .5, 1, 1.5, 2, 3, 4, 6]. A weight
is FP4[code] * 2**(s - 127): 4.25 bits per weight.

`Mxfp4Format`'s buffer (a `quant.GroupQuantFormat`: per matrix, its parts on 64-byte boundaries):
  w13 blocks uint8 [2I, D/2] and scales uint8 [2I, D/32]: w1's I rows, then w3's (the checkpoint
      interleaves gate and up rows, 2i and 2i + 1; rows are whole blocks, so taking them apart moves
      bytes and changes no code);
  w2 blocks uint8 [D, I/2] and scales uint8 [D, I/32];
  then, where the family has them (gpt-oss does), the biases in float32.
gpt-oss-20b's expert (D = I = 2880): 13,253,760 bytes, against 49,800,960 in bf16.

Compute (CPU and device alike): each matrix is decoded into the format's scratch buffer (float32 on the
CPU, the compute dtype on a device) by one gather through a 256-entry table that maps a byte to its two
values (`dequantize`), scaled per block in place, then one `F.linear`; nothing of a weight's size is
allocated per call. Not a fused kernel: the CPU pays for decoding each weight on every use, which
bench/bench_quant_kernels.py measures beside int4's kernel.

`quantize` (for `--expert-quant mxfp4` on other checkpoints, and the tests' MXFP4 files): each block's
scale is the smallest power of two that brings its largest magnitude within 6, each value rounds to the
nearest FP4 value (ties to the smaller magnitude). Bound: every weight decodes within max(|w|, scale) / 4
of its value (FP4's gaps are a quarter of their magnitude above 1, and 0.5 below).

Legend: N output rows, K input columns, G blocks per row (K / 32), T tokens.
"""

from __future__ import annotations

import functools

import torch

from .config import ModelConfig
from .quant import GroupQuantFormat

BLOCK = 32  # values per scale
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0-7; codes 8-15 are their negatives
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive FP4 magnitudes
SCALE_BIAS = 127  # E8M0: scale 2**(s - 127)


@functools.cache
def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256] integers of twice `dtype`'s width, each holding the two values of a byte (low nibble first) in
    `dtype`: one gather decodes a byte into its two weights."""
    codes = torch.arange(256)
    values = torch.tensor(FP4 + tuple(-v for v in FP4), dtype=torch.float32)
    pairs = torch.stack((values[codes & 15], values[codes >> 4]), dim=-1).to(dtype)  # [256, 2]
    wide = {2: torch.int32, 4: torch.int64}[dtype.itemsize]
    return pairs.contiguous().view(wide).view(256).to(device)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """The weights [N, K] of MXFP4 blocks [N, K/2] (or [N, G, 16]) uint8 and scales [N, G] uint8, in
    `out`'s dtype and memory (at least N*K elements; default: a new float32 tensor). `index`, an int32
    buffer of at least N*K/2 elements, holds the bytes widened for the gather (default: a new one)."""
    N, G = scales.shape
    K = G * BLOCK
    if out is None:
        out = torch.empty(N * K, dtype=torch.float32, device=blocks.device)
    table = _byte_table(blocks.device, out.dtype)
    w = out[: N * K]
    idx = blocks.reshape(-1).to(torch.int32) if index is None else index[: N * K // 2].copy_(blocks.reshape(-1))
    torch.index_select(table, 0, idx, out=w.view(table.dtype))  # byte j -> weights 2j, 2j + 1
    factor = torch.exp2(scales.float() - SCALE_BIAS)  # [N, G], exact powers of two
    w.view(N, G, BLOCK).mul_(factor.unsqueeze(-1))  # in float32, rounded once to out's dtype
    return w.view(N, K)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (K a multiple of 32) -> blocks uint8 [N, K/32, 16] and scales uint8 [N, K/32], the layout of
    gpt-oss's checkpoints (see the module docstring for the rounding and its bound)."""
    N, K = w.shape
    wg = w.float().contiguous().view(N, K // BLOCK, BLOCK)  # [N, G, 32]
    mant, exp = torch.frexp(wg.abs().amax(dim=-1) / FP4[-1])  # amax / 6 = mant * 2**exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)  # the smallest power of two >= amax / 6
    exp = torch.where(mant == 0, -SCALE_BIAS, exp).clamp(-SCALE_BIAS, SCALE_BIAS)  # an all-zero block: any scale
    scaled = wg / torch.exp2(exp.float()).unsqueeze(-1)  # |scaled| <= 6
    mids = torch.tensor(MIDPOINTS, device=w.device)
    codes = torch.bucketize(scaled.abs(), mids).to(torch.uint8) | ((scaled < 0).to(torch.uint8) << 3)  # [N, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [N, G, 16]: element 2j low, 2j + 1 high
    return blocks, (exp + SCALE_BIAS).to(torch.uint8)


class Mxfp4Format(GroupQuantFormat):
    """Experts as MXFP4, named "mxfp4" (see the module docstring). `pack` takes a checkpoint's MXFP4 parts
    as they are (`w1_blocks` [I, D/32, 16], `w1_scales` [I, D/32], likewise w3 and w2, and the biases), or
    float weights, which it quantizes (`quantize`)."""

    bits = 4
    RAW = ("w1_blocks", "w1_scales", "w3_blocks", "w3_scales", "w2_blocks", "w2_scales")

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype):
        super().__init__(config, compute_dtype, BLOCK)
        self.name = "mxfp4"
        self._index: dict[torch.device, torch.Tensor] = {}  # per device: the bytes of a matrix, widened

    def index(self, device: torch.device) -> torch.Tensor:
        """The int32 buffer `dequantize` widens a matrix's bytes into, one per device, allocated at first use
        (I*D elements: both matrices hold that many bytes of codes)."""
        if device not in self._index:
            self._index[device] = torch.empty(self.I * self.D, dtype=torch.int32, device=device)
        return self._index[device]

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        if "w1_blocks" not in parts:
            return super().pack(parts, out)
        (b13, s13), (b2, s2), _, *biases = self.views(out)
        for rows, name in ((slice(None, self.I), "w1"), (slice(self.I, None), "w3")):
            b13[rows].copy_(parts[f"{name}_blocks"].reshape(self.I, -1))
            s13[rows].copy_(parts[f"{name}_scales"])
        b2.copy_(parts["w2_blocks"].reshape(b2.shape))
        s2.copy_(parts["w2_scales"])
        self._pack_biases(parts, biases)

    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        return [(torch.uint8, (N, K // 2)), (torch.uint8, (N, K // BLOCK))]

    def _store(self, w: torch.Tensor, dst: tuple) -> None:
        blocks, scales = quantize(w)
        dst[0].copy_(blocks.view(dst[0].shape))
        dst[1].copy_(scales)

    def _dequant(self, mat: tuple, out: torch.Tensor) -> torch.Tensor:
        blocks, scales = mat
        return dequantize(blocks, scales, out, self.index(out.device))

    def _linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        return self._dequant_linear(x, mat, cpu)


def parts_for(fmt, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert's parts (`Checkpoint.expert`) as `fmt.pack` takes them: an MXFP4 checkpoint's blocks and
    scales as they are for `Mxfp4Format`, dequantized to float32 weights w1, w3, w2 for the other formats
    (int8, int4, dense: `--expert-quant` converts MXFP4 so); anything else unchanged."""
    if isinstance(fmt, Mxfp4Format) or "w1_blocks" not in parts:
        return parts
    weights = {w: dequantize(parts[f"{w}_blocks"], parts[f"{w}_scales"]) for w in ("w1", "w3", "w2")}
    return {k: v for k, v in parts.items() if k not in Mxfp4Format.RAW} | weights
