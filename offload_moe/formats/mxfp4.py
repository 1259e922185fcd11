"""MXFP4 experts, kept as MXFP4: gpt-oss's checkpoints store their experts so (OCP Microscaling FP4), and
the store holds, copies and computes from those very bytes: no re-quantization at load.

Encoding (as gpt-oss's `*_blocks` and `*_scales`, read the way transformers' integrations/mxfp4.py reads
them): a block is 32 consecutive inputs of one output row, 16 bytes holding two FP4 (E2M1) codes each,
element 2j in the low nibble of byte j and element 2j + 1 in the high one, plus one scale byte s (E8M0),
2**(s - 127). A code's bit 8 is the sign, its low 3 bits index FP4 = [0, .5, 1, 1.5, 2, 3, 4, 6]. A weight
is FP4[code] * 2**(s - 127): 4.25 bits per weight.

`Mxfp4Format`'s buffer (a `group.GroupQuantFormat`: per matrix, its parts on 64-byte boundaries), the
checkpoint's bytes moved, never changed (blocks and rows stay whole):
  w13 blocks uint8 [D/32, 2I, 16] and scales uint8 [D/32, 2I]: block-major (all rows' first blocks, then
      their second, ...), w1's I rows before w3's (the checkpoint interleaves gate and up rows);
  w2 blocks uint8 [I/32, D, 16] and scales uint8 [I/32, D];
  then, where the family has them (gpt-oss does), the biases in float32.
gpt-oss-20b's expert (D = I = 2880): 13,253,760 bytes, against 49,783,680 in bf16.

Compute: a matrix's weights are decoded by one gather through a 256-entry table that maps a byte to its two
values (`dequantize`), into the format's scratch buffer (float32 on the CPU, the compute dtype on
a device), so nothing of a weight's size is allocated per call. On the CPU, for up to MXFP4_BMM_MAX_TOKENS
tokens (`mxfp4_bmm_linear`), the block-major layout makes the decoded blocks G contiguous [N, 32] matrices:
one batched matmul gives each block's partial sums, which the scales then weigh (the int8 format's
`int8_bmm_linear` does the same), instead of a pass that scales every weight. Elsewhere (a device, a prompt)
the weights are decoded in [N, K] order, scaled, and `F.linear` runs. Not a fused kernel: the CPU decodes
each weight on every use, which bench/bench_quant_kernels.py measures beside int4's kernel.

`quantize` (for `--expert-quant mxfp4` on other checkpoints, and the tests' MXFP4 files): each block's
scale is the smallest power of two that brings its largest magnitude within 6, each value rounds to the
nearest FP4 value (ties to the smaller magnitude). Bound: every weight decodes within max(|w|, scale) / 4
of its value (FP4's gaps are a quarter of their magnitude above 1, and 0.5 below).

Legend: N output rows, K input columns, G blocks per row (K / 32), T tokens.
"""

from __future__ import annotations

import functools

import torch

from ..config import ModelConfig
from .group import GroupQuantFormat

BLOCK = 32  # values per scale
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0-7; codes 8-15 are their negatives
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive FP4 magnitudes
SCALE_BIAS = 127  # E8M0: scale 2**(s - 127)


# up to this many tokens the CPU weighs block partial sums (`mxfp4_bmm_linear`); above, decoding [N, K] once wins
# (the measured crossover: BENCHMARKS.md, "Kernel choices")
MXFP4_BMM_MAX_TOKENS = 4


@functools.cache
def _pair_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256] items of twice `dtype`'s width, item b holding the two values of byte b (low nibble first) in
    `dtype`: one gather decodes a byte into its two weights; the table (1 or 2 KiB) stays in the L1 cache."""
    b = torch.arange(256)
    values = torch.tensor(FP4 + tuple(-v for v in FP4), dtype=torch.float32)
    pairs = torch.stack((values[b & 15], values[b >> 4]), dim=-1).to(dtype)  # [256, 2]
    wide = {2: torch.int32, 4: torch.int64}[dtype.itemsize]
    return pairs.contiguous().view(wide).view(256).to(device)


def _decode(blocks: torch.Tensor, out: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The unscaled values of blocks [..., 16] uint8 (any strides), in their order, into `out` (its dtype;
    32 values a block); `index`: an int32 buffer of one element a byte (default: a new one). -> [2n] of n bytes"""
    n = blocks.numel()
    if index is None:
        index = torch.empty(n, dtype=torch.int32, device=blocks.device)
    idx = index[:n].view(blocks.shape).copy_(blocks).view(-1)  # the bytes, widened for the gather
    table = _pair_table(blocks.device, out.dtype)
    return torch.index_select(table, 0, idx, out=out[: 2 * n].view(table.dtype)).view(out.dtype)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """The weights [N, K] of MXFP4 blocks [N, G, 16] uint8 (or [N, K/2]) and scales [N, G] uint8, either
    possibly strided views (the format's block-major parts, transposed), in `out`'s dtype and memory (at
    least N*K elements; default: a new float32 tensor); `index` as `_decode`'s."""
    N, G = scales.shape
    if out is None:
        out = torch.empty(N * G * BLOCK, dtype=torch.float32, device=blocks.device)
    w = _decode(blocks.view(N, G, 16), out, index).view(N, G, BLOCK)
    w.mul_(torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1))  # exact powers of two, one rounding to out's dtype
    return w.view(N, G * BLOCK)


def mxfp4_bmm_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, scratch: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
    """x [T, K] times a block-major MXFP4 matrix, blocks [G, N, 16] and scales [G, N], in float32: the
    unscaled values decoded into `scratch` as G contiguous [N, 32] matrices, one batched matmul with x's
    blocks [G, 32, T] -> partial sums [G, N, T], weighed by the scales and summed over G. -> [T, N]"""
    (G, N), T = scales.shape, x.shape[0]
    values = _decode(blocks, scratch, index).view(G, N, BLOCK)
    part = torch.bmm(values, x.float().view(T, G, BLOCK).permute(1, 2, 0))  # [G, N, T]
    y = (part * torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1)).sum(0)  # [N, T]
    return y.T.to(x.dtype)


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
        self._index: dict[torch.device, torch.Tensor] = {}  # per device: a matrix's bytes, widened

    def index(self, device: torch.device) -> torch.Tensor:
        """The int32 buffer `_decode` widens a matrix's bytes into, one per device, allocated at first use (I*D
        elements: w13 holds I*D bytes of codes)."""
        if device not in self._index:
            self._index[device] = torch.empty(self.I * self.D, dtype=torch.int32, device=device)
        return self._index[device]

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        if "w1_blocks" not in parts:
            return super().pack(parts, out)
        (b13, s13), (b2, s2), _, *biases = self.views(out)
        for rows, name in ((slice(None, self.I), "w1"), (slice(self.I, None), "w3")):
            b13[:, rows].copy_(parts[f"{name}_blocks"].transpose(0, 1))  # [I, G, 16] -> [G, I, 16]
            s13[:, rows].copy_(parts[f"{name}_scales"].T)
        b2.copy_(parts["w2_blocks"].transpose(0, 1))
        s2.copy_(parts["w2_scales"].T)
        self._pack_biases(parts, biases)

    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        return [(torch.uint8, (K // BLOCK, N, 16)), (torch.uint8, (K // BLOCK, N))]

    def _store(self, w: torch.Tensor, dst: tuple) -> None:
        blocks, scales = quantize(w)  # [N, G, 16], [N, G]
        dst[0].copy_(blocks.transpose(0, 1))
        dst[1].copy_(scales.T)

    def _dequant(self, mat: tuple, out: torch.Tensor) -> torch.Tensor:
        blocks, scales = mat
        return dequantize(blocks.transpose(0, 1), scales.T, out, self.index(out.device))

    def _linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        if cpu and x.shape[0] <= MXFP4_BMM_MAX_TOKENS:
            return mxfp4_bmm_linear(x, *mat, self.scratch(x.device, torch.float32), self.index(x.device))
        return self._dequant_linear(x, mat, cpu)


def parts_for(fmt, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert's parts (`Checkpoint.expert`) as `fmt.pack` takes them: an MXFP4 checkpoint's blocks and
    scales as they are for `Mxfp4Format`, dequantized to float32 weights w1, w3, w2 for the other formats
    (int8, int4, dense: `--expert-quant` converts MXFP4 so); anything else unchanged."""
    if isinstance(fmt, Mxfp4Format) or "w1_blocks" not in parts:
        return parts
    weights = {w: dequantize(parts[f"{w}_blocks"], parts[f"{w}_scales"]) for w in ("w1", "w3", "w2")}
    return {k: v for k, v in parts.items() if k not in Mxfp4Format.RAW} | weights
