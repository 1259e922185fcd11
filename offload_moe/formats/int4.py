"""int4 group quantization of experts: `Int4Format`, its codes in one of the two layouts of `int4_layouts.py`,
and which kernel multiplies by them.

Which path multiplies by an int4 matrix:
- one token on the CPU, the "cpu" layout with row blocks of 64: the whole expert in one call of the C
  kernels (`cpu_kernels.py`) where they are built.
- the CPU, up to INT4_KERNEL_MAX_TOKENS tokens: torch's `_weight_int4pack_mm_for_cpu`, where the host's
  kernel reads our order (checked once per process against `_convert_weight_to_int4pack_for_cpu`:
  AVX-512 builds) and D is a multiple of 64. It is vectorized for bf16 activations only (in fp32 and
  fp16 it runs a scalar loop), so the activations are cast to bf16 and the result back: bf16's rounding,
  far below int4's own error. Elsewhere (AVX2, ARM) and for more tokens the dequantizing path runs.
- CUDA, up to INT4_CUDA_KERNEL_MAX_TOKENS tokens: torch's `_weight_int4pack_mm` (tinygemm) on the "cuda"
  layout, where it runs (compute capability 8.0 and later, not ROCm, checked once per device by a probe
  against torch's own converter and a dequantized matmul: `cuda_int4_kernel_runs`). It reads 0.56 bytes
  per weight (codes and group-64 scales), against 2 for fp16 weights, and takes bf16 activations only,
  so x is cast and the result cast back. The engine packs that layout whenever its device runs the kernel
  (`int4_layout_for`), on the device at load as it quantizes; the packed bytes still land in the expert's
  one host buffer.
- elsewhere (int4 where no kernel runs, the other layout, many tokens): dequantize into the scratch buffer
  and `F.linear` (`group.py`): codes unpacked in three passes, then one fused scale and shift
  (`_int4_scale_shift`), about 12.5 bytes of device traffic per weight in fp16 with the matmul's read,
  down from 22.5 with unfused passes; on the CPU in fp32, the "cpu" layout decodes in one C pass
  (`cpu_kernels.int4_dequant`, the same values) where the kernels are built.
The measurements behind these choices: BENCHMARKS.md, "Kernel choices".

Legend: T tokens, D dim, I ffn dim, N output rows, K input columns, G groups per row (K / group size).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..options import INT4_LAYOUTS
from . import cpu_kernels
from .cpu_kernels import ExpertKernel
from .group import SCALE_DTYPE, GroupQuantFormat, quantize
from .int4_layouts import (
    cpu_int4_kernel_reads_blocks_of_64,
    cuda_inner_k_tiles,
    cuda_int4_kernel_runs,
    cuda_tile_shape,
    int4_cpu_kernel_linear,
    int4_cuda_kernel_linear,
    pack_nibbles,
    row_block,
    tile_int4,
    unpack_nibbles,
    untile_int4,
)

INT4_KERNEL_MAX_TOKENS = 128  # above this, dequantizing + fp32 matmul wins over the int4 CPU kernel
# Above this many tokens, dequantizing + F.linear (a tensor-core GEMM) beats torch's CUDA int4 kernel, which is
# built for decode (not measured here: BENCHMARKS.md, "Kernel choices", cites torchao's figures; gpu_check prints both)
INT4_CUDA_KERNEL_MAX_TOKENS = 128


class Int4Format(GroupQuantFormat):
    """Half a byte a weight, the codes in one of two layouts (`layout`, part of the format's name):

    - "cpu", named `int4-gG`: codes uint8 [N, K/2], two a byte in the AVX-512 int4 CPU kernel's order
      (see `pack_nibbles`). I is a multiple of 32 (the smallest group), so w13's 2I rows come in blocks
      of 64 (relu2's I rows, of 64 or 32); w2's D rows do too unless D is an odd multiple of 32, and then in
      blocks of 32, with the kernel off.
    - "cuda", named `int4-gG-cuda`: codes int32 [N/8, K/(16t), 32, t/2] in the tiles that torch's CUDA
      int4 kernel `_weight_int4pack_mm` reads (see `tile_int4`), t = `cuda_inner_k_tiles(K)`; the same
      bytes as `_convert_weight_to_int4pack` writes, but made by torch ops, so that any device packs
      them and any device can unpack them (the CPU-miss path, the dequantizing fallback). Unpacking
      the tiles on a CPU is a fine-grained shuffle, several times slower than dequantizing the "cpu"
      layout (BENCHMARKS.md, "Kernel choices").

    Both then hold the scales and zeros interleaved, bf16 [G, N, 2], as both kernels read them, and both
    decode w = (q - 8) * scale + zero: a format is the same size in either layout."""

    bits = 4

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64, layout: str = "cpu"):
        if layout not in INT4_LAYOUTS:
            raise UserError(f"unknown int4 layout {layout!r} (use {', '.join(INT4_LAYOUTS)})")
        self.layout = layout  # before the buffer plan, which depends on it
        super().__init__(config, compute_dtype, group_size)
        if layout == "cuda":
            self.name += "-cuda"
        # torch's CPU kernel reads rows in blocks of 64: w2's D rows, and w13's (2I, or relu2's I, maybe 32 x odd)
        self.cpu_kernel = (layout == "cpu" and cpu_int4_kernel_reads_blocks_of_64() and self.D % 64 == 0
                           and row_block(len(self.up) * self.I) == 64)
        # the C kernel computes SwiGLU, and reads rows in blocks of 64
        if layout == "cpu" and len(self.up) == 2 and row_block(2 * self.I) == row_block(self.D) == 64:
            self.kernel = ExpertKernel("int4", self.D, self.I, group_size, config.swiglu_limit)
        self._cuda_kernel: dict[torch.device, bool] = {}  # per device: does torch's CUDA kernel run there

    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        sz = (SCALE_DTYPE, (K // self.group_size, N, 2))
        if self.layout == "cuda":
            return [(torch.int32, cuda_tile_shape(N, K)), sz]
        return [(torch.uint8, (N, K // 2)), sz]

    def _store(self, w: torch.Tensor, dst: tuple) -> None:
        q, scales, zeros = quantize(w, 4, self.group_size)
        codes, sz = dst
        if self.layout == "cuda":
            codes.copy_(tile_int4(q, cuda_inner_k_tiles(q.shape[1])))
        else:
            codes.copy_(pack_nibbles(q, row_block(q.shape[0])))
        sz[..., 0].copy_(scales.T)  # [N, G] -> [G, N]
        sz[..., 1].copy_(zeros.T)

    def _dequant(self, mat: tuple, out: torch.Tensor) -> torch.Tensor:
        codes, sz = mat
        G, N, _ = sz.shape
        w = out[: N * G * self.group_size].view(N, -1)  # [N, K]
        if self.layout == "cpu" and cpu_kernels.int4_dequant(codes, sz, w, row_block(N)):  # fp32 CPU: one C pass
            return w
        q = untile_int4(codes, out) if self.layout == "cuda" else unpack_nibbles(codes, row_block(N), out)
        return _int4_scale_shift(q.view(N, G, self.group_size), sz).view(N, -1)  # [N, G, gs] -> [N, K]

    def _linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        if cpu:
            if self.cpu_kernel and x.shape[0] <= INT4_KERNEL_MAX_TOKENS:
                return int4_cpu_kernel_linear(x, *mat, self.group_size)
        elif self.layout == "cuda" and x.shape[0] <= INT4_CUDA_KERNEL_MAX_TOKENS and self.cuda_kernel_on(x.device):
            return int4_cuda_kernel_linear(x, *mat, self.group_size)
        return self._dequant_linear(x, mat, cpu)

    def cuda_kernel_on(self, device: torch.device) -> bool:
        """Whether this format's matmuls on `device` run torch's CUDA int4 kernel (cached per device)."""
        if device not in self._cuda_kernel:
            self._cuda_kernel[device] = self.layout == "cuda" and cuda_int4_kernel_runs(device)
        return self._cuda_kernel[device]


def _int4_scale_shift(q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """Codes q [N, G, gs] (floats, in place) -> weights (q - 8) * scale + zero, as one fused pass
    q * scale + (zero - 8 * scale) (`addcmul`). The scale and the shifted zero stay fp32 ([N, G] only),
    so the pass computes in fp32 and rounds once to q's dtype: rounding the shifted zero to fp16 or
    bf16 first would bias whole groups (BENCHMARKS.md, "Kernel choices")."""
    s, z = sz[..., 0].float(), sz[..., 1].float()  # [G, N]
    return torch.addcmul((z - 8 * s).T.unsqueeze(-1), q, s.T.unsqueeze(-1), out=q)  # [N, G, 1] broadcast
