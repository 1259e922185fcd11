"""Weight-only group quantization of experts (int8, int4), in torch alone.

Why: a quantized expert is 1.9x (int8) or 3.6x (int4) smaller than fp16, so more experts stay resident
and a cache miss copies fewer bytes. Each format packs one expert into one contiguous byte buffer (see
`expert_store.py`): for w13 (w1 and w3 fused, [2I, D]) and w2 ([D, I]) the codes, then the per-group
scales and zeros, every part on a 64-byte boundary, so that a miss stays one `copy_`.

Convention (both widths): a group is `group_size` consecutive inputs of one output row; its codes q
are unsigned, 0 <= q < 2**bits, and decode as w ~ (q - 2**(bits-1)) * scale + zero, i.e. `zero` is the
value of the middle code. That is exactly the convention of torch's int4 CPU kernel, and for int8 the
stored signed byte q - 128 times the scale is what `_weight_int8pack_mm` would compute; no conversion
at run time. Scales and zeros are stored as bf16 in both formats: the int4 CPU kernel reads bf16, bf16
keeps fp32's exponent range (no underflow for tiny groups) and `quantize` makes the bound below hold
for the stored, rounded values.

Layout: a fixed function of the shapes and of the format's name, the same on every machine, because
`packed.py` stores these bytes and another machine may load them. int4 has two code layouts, each its
own format name (see `Int4Format`): `int4-gG`, in the order of torch's AVX-512 int4 CPU kernel (row
blocks of 64; see `pack_nibbles`), and `int4-gG-cuda`, in the tiles of torch's CUDA int4 kernel (see
`tile_int4`). Both are written by us with torch ops, not by torch's converters, whose CPU order
depends on the CPU it runs on (blocks of 32 with AVX2) and whose CUDA one needs a GPU: any machine can
pack and unpack either layout, and a process checks once that the kernel it would use reads ours.

Kernels (best of many runs on a shared 2-core AVX-512 VM, 2 threads, D=512, I=1792, T=1; dense fp32
0.86 ms; bench/bench_quant_kernels.py prints the whole table):
- one token on the CPU, int8 and int4 (the "cpu" layout, row blocks of 64): the whole expert in one call of
  the C kernels (`cpu_kernels.py`) where they are built; the torch paths below otherwise, and for prompts.
- int4 on CPU: `_weight_int4pack_mm_for_cpu`, where the host's kernel reads our order (checked once per
  process against `_convert_weight_to_int4pack_for_cpu`: AVX-512 builds) and D is a multiple of 64.
  It is vectorized for bf16 activations only (in fp32 and fp16 it runs a scalar loop, 15-75x slower),
  so the activations are cast to bf16 and the result back: ~0.5% error (max, relative), far below
  int4's own ~15%, for 0.32 ms, against 4.6 ms for dequantizing. Elsewhere (AVX2, ARM) and for
  T > INT4_KERNEL_MAX_TOKENS the dequantizing path runs.
- int8 on CPU, T <= INT8_BMM_MAX_TOKENS: group by group (`int8_bmm_linear`): the codes, stored
  group-major [G, N, gs], are widened to fp32 in one contiguous pass into a scratch buffer and one
  batched matmul takes all groups; 2.0 ms at T=1 and 2.5 ms at T=16, against 2.1-2.9 and 4.4-4.9 ms
  for dequantizing. torch's `_weight_int8pack_mm` has one scale per output channel only, so a
  grouped matmul is one call per group: 1.6-1.8 ms at T=1 in bf16 (its one vectorized dtype), 4.4 ms
  at T=16, 3.5-5.8 ms at T=1 in fp32 and fp16; not used. int8 stays slower than dense fp32 on a CPU:
  widening the codes costs more than reading fp32 weights; its gain is capacity.
- int4 on CUDA: torch's `_weight_int4pack_mm` (tinygemm) on the `int4-gG-cuda` layout, where it runs
  (compute capability 8.0 and later, not ROCm, checked once per device by a probe against torch's
  own converter and a dequantized matmul: `cuda_int4_kernel_runs`), for up to
  INT4_CUDA_KERNEL_MAX_TOKENS tokens. It reads 0.56 bytes per weight (codes and group-64 scales),
  against 2 for fp16 weights. It takes bf16 activations only, so x is cast and the result cast back.
  The engine packs that layout whenever its device runs the kernel (`int4_layout_for`), on the device
  at load as it quantizes; the packed bytes still land in the expert's one host buffer.
- Elsewhere on a device (int8, int4 where the kernel does not run, int4 in the other layout, many
  tokens): dequantize into the compute dtype, then `F.linear`, in a scratch buffer per (device, dtype)
  allocated once (Mixtral: w13, 235 MB in fp16): the device reserve must hold it; calls allocate only
  scale-sized temporaries. Device traffic per weight in fp16, with the matmul's read: int8 5 bytes (one
  fused pass, `int8_dequant`); int4 about 12.5 (codes unpacked in three passes, then one fused scale
  and shift, `_int4_scale_shift`), down from 13 and 22.5 with unfused passes. torch's
  `_weight_int8pack_mm` has one scale per output channel and no zeros, so it does not fit a grouped
  format (one call per group); int8's gain on a GPU is capacity, not speed.
- The CPU dequantizing path runs in fp32 whatever the compute dtype: fp16/bf16 elementwise ops and
  matmuls are slower than fp32 on CPUs without native support.

Legend: T tokens, D dim, I ffn dim, N output rows, K input columns, G groups per row (K / group size),
B int4 row block.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import UserError
from ..options import INT4_LAYOUTS
from . import cpu_kernels
from .base import ALIGN, DenseFormat, ExpertFormat, activation
from .cpu_kernels import ExpertKernel
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

EXPERT_QUANTS = ("none", "int8", "int4", "mxfp4")  # mxfp4: `mxfp4.Mxfp4Format`
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.bfloat16  # scales and zeros in every packed format
INT8_BMM_MAX_TOKENS = 16  # up to this many tokens, the CPU's int8 path goes group by group (`int8_bmm_linear`)
INT4_KERNEL_MAX_TOKENS = 128  # above this, dequantizing + fp32 matmul wins over the int4 CPU kernel


def quantize(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group quantization of w [rows, cols] along cols: q uint8 [rows, cols] (one code a byte,
    0 <= q < 2**bits), scales and zeros [rows, G] in `scale_dtype`, w ~ (q - 2**(bits-1)) * scale + zero.

    Rounding: each group's zero is its ideal middle value lo + (hi - lo) * 2**(bits-1) / (2**bits - 1),
    rounded to `scale_dtype`; the scale is then the smallest step that reaches both lo and hi from that
    rounded zero, rounded up to `scale_dtype`, so the code range covers the whole group whatever the
    rounding; q = round-half-even((w - zero) / scale) + 2**(bits-1), clamped.

    Error bound: every element of a group decodes within scale/2 of its value (scale as stored), up to
    fp32 rounding (~1e-7 relative). The stored scale is at least (hi - lo) / (2**bits - 1), larger only
    by the rounding of the zero and of the scale itself to `scale_dtype`: under 1.2% with bf16 for
    groups that straddle 0, as trained weights do (a group far from 0, say all in [1, 1.01], loses
    more, its zero rounding coarsely).
    """
    if bits not in (4, 8):
        raise UserError(f"quantize: bits must be 4 or 8, got {bits}")
    rows, cols = w.shape
    check_groups(group_size, cols, "quantize: input columns")
    top, mid = (1 << bits) - 1, 1 << (bits - 1)  # largest code, code of `zero`
    wg = w.reshape(rows, cols // group_size, group_size).float()  # [rows, G, gs]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [rows, G]
    zeros = (lo + (hi - lo) * (mid / top)).to(scale_dtype)
    z = zeros.float()
    need = torch.maximum((z - lo) / mid, (hi - z) / (top - mid))  # [rows, G], step reaching lo and hi
    scales = need.to(scale_dtype)
    scales = torch.where(scales.float() < need, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    scales = scales.clamp_min(torch.finfo(scale_dtype).tiny)  # a constant group: any positive step is exact
    q = (wg - z.unsqueeze(-1)).div_(scales.float().unsqueeze(-1)).round_().add_(mid).clamp_(0, top)  # [rows, G, gs]
    return q.to(torch.uint8).view(rows, cols), scales, zeros  # [rows, cols], [rows, G], [rows, G]


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The float32 weights [rows, cols] that `quantize`'s (q, scales, zeros) stand for."""
    rows, cols = q.shape
    qg = q.reshape(rows, cols // group_size, group_size).float()  # [rows, G, gs]
    w = (qg - (1 << (bits - 1))) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)  # [rows, G, gs]
    return w.view(rows, cols)  # [rows, cols]


class GroupQuantFormat(ABC):
    """What int8, int4 and MXFP4 (`mxfp4.py`) share: validation, the buffer plan, pack and the activation
    (`formats.activation`) and biases around the linears. The biases, where the family has them (b13 =
    [b1; b3] [2I] and b2 [D], gpt-oss), lie after both matrices in float32 (a few KiB; exact for any
    checkpoint dtype), and are added in place to each linear's output, in its dtype.

    A subclass says how one matrix [N, K] lies in the buffer (`_parts`, `_store`), how to rebuild its
    weights (`_dequant`) and how to multiply by it (`_linear`, kernel or `_dequant_linear`)."""

    bits: int

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64):
        D, I = config.dim, config.ffn_dim
        check_groups(group_size, D, "model dim")
        check_groups(group_size, I, "expert ffn dim")
        self.D, self.I, self.group_size, self.compute_dtype = D, I, group_size, compute_dtype
        self.name = f"int{self.bits}-g{group_size}"
        self.act = activation(config)
        self._plan: list[list[tuple[int, torch.dtype, tuple[int, ...]]]] = []  # per matrix: (offset, dtype, shape)
        offset = 0
        for N, K in ((2 * I, D), (D, I)):  # w13, w2
            parts = []
            for dtype, shape in self._parts(N, K):
                parts.append((offset, dtype, shape))
                offset += _aligned(math.prod(shape) * dtype.itemsize)
            self._plan.append(parts)
        self._bias_plan = []  # (offset, length) of b13 and b2, float32
        if config.expert_bias:
            for n in (2 * I, D):
                self._bias_plan.append((offset, n))
                offset += _aligned(4 * n)
        self.nbytes = offset  # a multiple of ALIGN, so that experts laid end to end stay aligned
        self._largest = max(2 * I * D, D * I)  # elements of the larger matrix
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.kernel: ExpertKernel | None = None  # one token on the CPU: one C call (cpu_kernels.py) where set

    def scratch(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The dequantization buffer for (device, dtype): as large as the larger matrix, allocated at
        first use, then reused by every call, so computing from quantized bytes allocates nothing of
        a weight's size on the hot path. Calls on one device run one after another on one stream, so
        a buffer is never rewritten while a matmul still reads it."""
        key = (device, dtype)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(self._largest, dtype=dtype, device=device)
        return self._scratch[key]

    def views(self, buf: torch.Tensor) -> tuple:
        """(w13 parts, w2 parts, on_cpu), then b13 and b2 where the family has biases: on_cpu, read once per
        buffer, lets the CPU kernels run."""
        w13, w2 = (
            tuple(buf[o : o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape) for o, dtype, shape in parts)
            for parts in self._plan
        )  # each part [bytes] -> its `_parts` dtype and shape
        biases = tuple(buf[o : o + 4 * n].view(torch.float32) for o, n in self._bias_plan)  # b13 [2I], b2 [D]
        return w13, w2, buf.device.type == "cpu", *biases

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        w13, w2, _, *biases = self.views(out)
        self._store(torch.cat((parts["w1"], parts["w3"])), w13)  # [2I, D]
        self._store(parts["w2"], w2)  # [D, I]
        self._pack_biases(parts, biases)

    def _pack_biases(self, parts: dict[str, torch.Tensor], biases: list[torch.Tensor]) -> None:
        if biases:
            b13, b2 = biases
            b13[: self.I].copy_(parts["b1"])
            b13[self.I :].copy_(parts["b3"])
            b2.copy_(parts["b2"])

    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        if self.kernel is not None and views[2] and self.kernel.runs(x):
            return self.kernel(x, views)
        return self._ffn(x, views, self._linear)

    def forward_dequant(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        """`forward` with the kernels off: the reference that the kernel paths are tested against."""
        return self._ffn(x, views, self._dequant_linear)

    def _ffn(self, x: torch.Tensor, views: tuple, linear) -> torch.Tensor:
        w13, w2, cpu, *biases = views
        h = linear(x, w13, cpu)  # [T, 2I], a new tensor in x's dtype
        a, b = (h.add_(biases[0]) if biases else h).chunk(2, dim=-1)  # 2 x [T, I]
        y = linear(self.act(a, b), w2, cpu)  # [T, D]
        return y.add_(biases[1]) if biases else y

    def _dequant_linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        return dequant_linear(x, self._dequant(mat, self.scratch(x.device, torch.float32 if cpu else x.dtype)))

    @abstractmethod
    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each part of one matrix [N, K], in buffer order."""

    @abstractmethod
    def _store(self, w: torch.Tensor, dst: tuple) -> None:
        """Quantize one matrix w [N, K] into its views `dst`."""

    @abstractmethod
    def _dequant(self, mat: tuple, out: torch.Tensor) -> torch.Tensor:
        """One matrix's weights [N, K], from its views, written into `out` (a scratch buffer; its dtype)."""

    @abstractmethod
    def _linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        """x [T, K] times one matrix -> [T, N], by a kernel where one applies, else `_dequant_linear`."""


class Int8Format(GroupQuantFormat):
    """One byte a weight. Per matrix: codes int8 [G, N, gs] (q - 128, group-major so that each group is
    a contiguous [N, gs] operand of `int8_bmm_linear`'s batched matmul), scales bf16 [G, N], zeros
    bf16 [G, N]."""

    bits = 8

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64):
        super().__init__(config, compute_dtype, group_size)
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
    into `w` first and the pass runs in place (codes are exact in every float dtype)."""
    G, N, gs = codes.shape
    w = torch.empty(N, G, gs, dtype=dtype, device=codes.device) if out is None else out[: N * G * gs].view(N, G, gs)
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
    each group's sum of x. At decode sizes on the CPU this is the fastest int8 path (see the module
    docstring); its [G, T, N] partial sums grow with T."""
    T, (G, N, gs) = x.shape[0], codes.shape
    wide = codes.float() if scratch is None else scratch[: G * N * gs].view(G, N, gs).copy_(codes)  # [G, N, gs]
    xg = x.float().view(T, G, gs).transpose(0, 1)  # [T, K] -> [G, T, gs]
    part = torch.bmm(xg, wide.transpose(1, 2))  # [G, T, gs] @ [G, gs, N] -> [G, T, N]
    y = (part * s.float().unsqueeze(1)).sum(0)  # scales [G, 1, N]; sum over groups -> [T, N]
    return y.addmm_(xg.sum(-1).T, z.float()).to(x.dtype)  # + [T, G] @ [G, N]


def dequant_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] times dequantized weights w [N, K] (fp32 on the CPU, see above) -> [T, N] in x's dtype."""
    return F.linear(x.to(w.dtype), w).to(x.dtype)


INT8_PART_DTYPES = {"codes": torch.int8, "scales": SCALE_DTYPE, "zeros": SCALE_DTYPE}


def int8_part_shapes(N: int, K: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of an int8 matrix [N, K] in `int8_store`'s layout: codes [G, N, gs], scales and zeros [G, N]."""
    G = K // group_size
    return {"codes": (G, N, group_size), "scales": (G, N), "zeros": (G, N)}


# Above this many tokens, dequantizing + F.linear (a tensor-core GEMM) beats torch's CUDA int4 kernel, which is
# built for decode. Not measured here: torchao's HQQ README (A6000, 4096 x 4096, group 128) has the kernel at
# 0.25 ms against 0.27 for dequantize + matmul at 128 rows, 0.52 against 0.33 at 256; gpu_check prints both.
INT4_CUDA_KERNEL_MAX_TOKENS = 128


class Int4Format(GroupQuantFormat):
    """Half a byte a weight, the codes in one of two layouts (`layout`, part of the format's name):

    - "cpu", named `int4-gG`: codes uint8 [N, K/2], two a byte in the AVX-512 int4 CPU kernel's order
      (see `pack_nibbles`). I is a multiple of 32 (the smallest group), so w13's 2I rows come in blocks
      of 64; w2's D rows do too unless D is an odd multiple of 32, and then in blocks of 32, with the
      kernel off.
    - "cuda", named `int4-gG-cuda`: codes int32 [N/8, K/(16t), 32, t/2] in the tiles that torch's CUDA
      int4 kernel `_weight_int4pack_mm` reads (see `tile_int4`), t = `cuda_inner_k_tiles(K)`; the same
      bytes as `_convert_weight_to_int4pack` writes, but made by torch ops, so that any device packs
      them and any device can unpack them (the CPU-miss path, the dequantizing fallback). Unpacking
      the tiles on a CPU is a fine-grained shuffle: measured 48 ms for a D=512, I=1792 expert on the
      busy 2-core dev VM, against 14 ms to dequantize the CPU layout and 0.11 ms for its CPU kernel.

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
        self.cpu_kernel = layout == "cpu" and cpu_int4_kernel_reads_blocks_of_64() and self.D % 64 == 0
        if layout == "cpu" and row_block(2 * self.I) == row_block(self.D) == 64:  # the C kernel reads blocks of 64
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
    so the pass computes in fp32 and rounds once to q's dtype (rounding the shifted zero to fp16 or
    bf16 first would bias whole groups: measured 1.5x the error of the unfused passes)."""
    s, z = sz[..., 0].float(), sz[..., 1].float()  # [G, N]
    return torch.addcmul((z - 8 * s).T.unsqueeze(-1), q, s.T.unsqueeze(-1), out=q)  # [N, G, 1] broadcast


def expert_format(name: str, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64,
                  layout: str = "cpu") -> ExpertFormat:
    """The expert format called `name`: "none" (dense, in the compute dtype), "int8", "int4" or "mxfp4" (its
    blocks of 32 whatever `group_size`); `layout` ("cpu" or "cuda", see `Int4Format`) applies to int4 only."""
    if name == "none":
        return DenseFormat(config, compute_dtype)
    if name == "mxfp4":
        from .mxfp4 import Mxfp4Format  # mxfp4.py builds on this module

        return Mxfp4Format(config, compute_dtype)
    if name == "int8":
        return Int8Format(config, compute_dtype, group_size)
    if name == "int4":
        return Int4Format(config, compute_dtype, group_size, layout)
    raise UserError(f"unknown expert quantization {name!r} (use {', '.join(EXPERT_QUANTS)})")


def parse_format_name(name: str) -> tuple[str, int, str] | None:
    """(quantization, group size, layout) of a quantized format's name as `packed.json` records it
    (`int8-g64`, `int4-g64`, `int4-g64-cuda`, `mxfp4`), or None for a dense one (fp16, bf16, fp32)."""
    if name == "mxfp4":
        return "mxfp4", 32, "cpu"
    if not name.startswith("int"):
        return None
    m = re.fullmatch(r"(int8|int4)-g(\d+)(-cuda)?", name)
    if m is None or (m[1] == "int8" and m[3]):
        raise UserError(f"packed.json: unknown expert format {name!r}; convert the model again")
    return m[1], int(m[2]), "cuda" if m[3] else "cpu"


def load_quant(quant: str, mxfp4_checkpoint: bool) -> str:
    """The expert format a load (or `convert`) asked for as `quant` makes of a checkpoint: "none" (no
    quantization at load) keeps an MXFP4 checkpoint's experts as they are, "mxfp4"; the rest as asked."""
    return "mxfp4" if quant == "none" and mxfp4_checkpoint else quant


def bytes_per_expert(config: ModelConfig, name: str, group_size: int = 64, dtype: torch.dtype = torch.float16) -> int:
    """`expert_format(name, ...).nbytes`, for memory planning; `dtype` matters for "none" only."""
    return expert_format(name, config, dtype, group_size).nbytes


DEFAULT_GROUP_SIZE = 64  # the group size when none is asked for and it divides every quantized input


def quantized_inputs(config: ModelConfig, experts: bool = True, attention: bool = False,
                     head: bool = False) -> list[tuple[str, int]]:
    """(what, size) of every input dimension that a group must divide: the experts' (D for w1 w3, I for
    w2) when they are quantized, the attention projections' (`ModelConfig.attention_inputs`) when they are,
    the LM head's (D) when it is."""
    sizes = [("model dim", config.dim), ("expert ffn dim", config.ffn_dim)] if experts else []
    if attention:
        sizes += [("attention input size", n) for n in config.attention_inputs]
    if head:
        sizes.append(("model dim", config.dim))
    return sizes


def dividing_group_sizes(config: ModelConfig, experts: bool = True, attention: bool = False,
                         head: bool = False) -> list[int]:
    """The allowed group sizes that divide every quantized input (all of them when nothing is quantized)."""
    sizes = quantized_inputs(config, experts, attention, head)
    return [g for g in GROUP_SIZES if all(n % g == 0 for _, n in sizes)]


def auto_group_size(config: ModelConfig, experts: bool = True, attention: bool = False,
                    head: bool = False) -> int | None:
    """DEFAULT_GROUP_SIZE where it divides every quantized input, else the largest allowed size that does,
    else None (this model's weights cannot be group-quantized)."""
    ok = dividing_group_sizes(config, experts, attention, head)
    return DEFAULT_GROUP_SIZE if DEFAULT_GROUP_SIZE in ok else max(ok, default=None)


def resolve_group_size(config: ModelConfig, requested: int | None, experts: bool = True,
                       attention: bool = False, head: bool = False) -> int:
    """The group size to quantize with: `requested` when given (checked), else `auto_group_size`. A size
    that does not divide an input, or a model that no allowed size divides, is a one-line UserError that
    names the sizes that would work. With nothing quantized the group size is unused: returned unchecked."""
    if not experts and not attention and not head:
        return DEFAULT_GROUP_SIZE if requested is None else requested
    inputs = quantized_inputs(config, experts, attention, head)
    ok = dividing_group_sizes(config, experts, attention, head)
    listed = ", ".join(dict.fromkeys(f"{what} {n}" for what, n in inputs))
    if not ok:
        raise UserError(f"no quantization group size ({', '.join(map(str, GROUP_SIZES))}) divides the quantized "
                        f"inputs ({listed}): quantize nothing here (--expert-quant none, --attention-quant none, "
                        "--head-quant none)")
    if requested is None:
        return auto_group_size(config, experts, attention, head)
    if requested not in GROUP_SIZES:
        raise UserError(f"quantization group size must be one of {GROUP_SIZES}, got {requested}")
    bad = [(what, n) for what, n in inputs if n % requested]
    if bad:
        what, n = bad[0]
        raise UserError(f"quantization group size {requested} does not divide the {what} {n}: use "
                        f"{' or '.join(map(str, ok))} (sizes that divide {listed}), or leave the size out "
                        "(--group-size, a profile's group_size) to get one of them")
    return requested


def check_groups(group_size: int, size: int, what: str) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"quantization group size must be one of {GROUP_SIZES}, got {group_size}")
    if size % group_size:
        raise UserError(f"{what} {size} is not a multiple of the quantization group size {group_size}")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN

