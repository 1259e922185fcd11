"""int8 group quantization: `Int8Format` (experts) and the matrix functions it shares with `int8_linear.Int8Linear`
(attention projections, the LM head): the layout (`int8_store`, `int8_part_shapes`), the dequantizing pass
(`int8_dequant`) and the matmul (`int8_linear`).

Which path multiplies by an int8 matrix:
- one token on the CPU: the C kernel (`cpu_kernels.py`: the whole expert in one call, or `cpu_kernels.int8_linear`
  for one matrix) where it is built; the torch paths below otherwise.
- the CPU, T <= INT8_BMM_MAX_TOKENS: group by group (`int8_bmm_linear`): the codes, stored group-major
  [G, N, gs], are widened to fp32 in one contiguous pass into a scratch buffer and one batched matmul
  takes all groups.
- elsewhere (a device, more tokens): dequantize (`int8_dequant`, one fused pass; on the CPU in fp32 one C pass,
  `cpu_kernels.int8_dequant`, where the kernels are built) into the scratch buffer, then `F.linear` (`group.py`).
torch's `_weight_int8pack_mm` has one scale per output channel and no zeros, so a grouped matrix would be
one call per group: not used. int8 stays slower than dense fp32 on a CPU (widening the codes costs more
than reading fp32 weights) and is not faster on a GPU: its gain is capacity. The measurements:
BENCHMARKS.md, "Kernel choices".

Legend: T tokens, N output rows, K input columns, G groups per row (K / group size).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from . import cpu_kernels
from .cpu_kernels import ExpertKernel
from .group import SCALE_DTYPE, GroupQuantFormat, dequant_linear, quantize

INT8_BMM_MAX_TOKENS = 16  # up to this many tokens, the CPU's int8 path goes group by group (`int8_bmm_linear`)
INT8_PART_DTYPES = {"codes": torch.int8, "scales": SCALE_DTYPE, "zeros": SCALE_DTYPE}


class Int8Format(GroupQuantFormat):
    """One byte a weight. Per matrix: codes int8 [G, N, gs] (q - 128, group-major so that each group is
    a contiguous [N, gs] operand of `int8_bmm_linear`'s batched matmul), scales bf16 [G, N], zeros
    bf16 [G, N]."""

    bits = 8

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64):
        super().__init__(config, compute_dtype, group_size)
        if len(self.up) == 2:  # the C kernel computes SwiGLU
            self.kernel = ExpertKernel("int8", self.D, self.I, group_size, config.swiglu_limit)

    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        G = K // self.group_size
        return [(torch.int8, (G, N, self.group_size)), (SCALE_DTYPE, (G, N)), (SCALE_DTYPE, (G, N))]

    def _store(self, w: torch.Tensor, dst: tuple) -> None:
        int8_store(*quantize(w, 8, self.group_size), *dst)

    def _dequant(self, mat: tuple, out: torch.Tensor) -> torch.Tensor:
        return int8_dequant(*mat, out.dtype, out)

    def _linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        return int8_linear(x, *mat, cpu, self.scratch(x.device, torch.float32 if cpu else x.dtype))


def int8_part_shapes(N: int, K: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of an int8 matrix [N, K] in `int8_store`'s layout: codes [G, N, gs], scales and zeros [G, N]."""
    G = K // group_size
    return {"codes": (G, N, group_size), "scales": (G, N), "zeros": (G, N)}


def int8_store(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, codes: torch.Tensor, s: torch.Tensor,
               z: torch.Tensor) -> None:
    """`quantize`'s int8 output for one matrix [N, K] into its layout: codes [G, N, gs], s and z [G, N]."""
    G, N, gs = codes.shape
    codes.copy_((q ^ 0x80).view(torch.int8).view(N, G, gs).transpose(0, 1))  # q - 128, [N, K] -> [G, N, gs]
    s.copy_(scales.T)  # [N, G] -> [G, N]
    z.copy_(zeros.T)


def int8_dequant(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The weights [N, K] in `dtype` of an int8 matrix in `int8_store`'s layout, in `out` when given.

    One fused pass, w = codes * scale + zero (`addcmul`): it reads 1 byte and writes `dtype`'s size per
    weight, so with the matmul's read of the result an fp16 dequantizing forward moves 5 bytes per
    weight (the three passes it replaced, widen, scale, shift, moved 13), against 2 for an fp16 expert
    and 1 for an int8 kernel. The scales and zeros are passed as fp32 (G*N elements, small): the pass
    computes in fp32 and rounds once to `dtype`; CUDA casts the codes and the result inside the kernel.
    The CPU would cast the codes to fp32 in a temporary of the matrix's size, so there they are widened
    into `w` first and the pass runs in place (codes are exact in every float dtype); in fp32 with the C kernels
    built, one C pass does both (`cpu_kernels.int8_dequant`, the same values)."""
    G, N, gs = codes.shape
    w = torch.empty(N, G, gs, dtype=dtype, device=codes.device) if out is None else out[: N * G * gs].view(N, G, gs)
    if cpu_kernels.int8_dequant(codes, s, z, w):  # on the CPU in float32: one pass in C
        return w.view(N, G * gs)
    wt = w.transpose(0, 1)  # [G, N, gs], the codes' order
    src = wt.copy_(codes) if codes.device.type == "cpu" else codes
    torch.addcmul(z.float().unsqueeze(-1), src, s.float().unsqueeze(-1), out=wt)
    return w.view(N, G * gs)  # [N, K]


def int8_linear(x: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, cpu: bool,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] times an int8 matrix -> [T, N]: on the CPU one token by the C kernel where it runs
    (`cpu_kernels.int8_linear`), else at decode sizes group by group (`int8_bmm_linear`), else dequantize
    (into `scratch`, an fp32 buffer on the CPU, when given)."""
    if cpu and x.shape[0] == 1 and (y := cpu_kernels.int8_linear(x, codes, s, z)) is not None:
        return y
    if cpu and x.shape[0] <= INT8_BMM_MAX_TOKENS:
        return int8_bmm_linear(x, codes, s, z, scratch)
    return dequant_linear(x, int8_dequant(codes, s, z, torch.float32 if cpu else x.dtype, scratch))


def int8_bmm_linear(x: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                    scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] times an int8 matrix, group by group, in fp32: the codes widened in their stored
    order (one contiguous pass into `scratch`, an fp32 buffer, when given; no transposed copy), one
    batched matmul over the groups, then each group's scale on its partial sums and the zeros times
    each group's sum of x. At decode sizes on the CPU this is the fastest int8 torch path (see the module
    docstring); its [G, T, N] partial sums grow with T."""
    T, (G, N, gs) = x.shape[0], codes.shape
    wide = codes.float() if scratch is None else scratch[: G * N * gs].view(G, N, gs).copy_(codes)  # [G, N, gs]
    xg = x.float().view(T, G, gs).transpose(0, 1)  # [T, K] -> [G, T, gs]
    part = torch.bmm(xg, wide.transpose(1, 2))  # [G, T, gs] @ [G, gs, N] -> [G, T, N]
    y = (part * s.float().unsqueeze(1)).sum(0)  # scales [G, 1, N]; sum over groups -> [T, N]
    return y.addmm_(xg.sum(-1).T, z.float()).to(x.dtype)  # + [T, G] @ [G, N]
