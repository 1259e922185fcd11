"""Weight-only group quantization, in torch alone: the convention, `quantize` and `dequantize`, and
`GroupQuantFormat`, the base of the int8 (`int8.py`), int4 (`int4.py`) and MXFP4 (`mxfp4.py`) expert formats.

Why: a quantized expert is smaller than fp16 (1 + 4/gs bytes a weight in int8, 1/2 + 4/gs in int4,
against 2), so more experts stay resident and a cache miss copies fewer bytes. Each format packs one
expert into one contiguous byte buffer (see `offload/store.py`): for w13 (w1 and w3 fused, [2I, D]; relu2: w1) and
w2 ([D, I]) the codes, then the per-group scales and zeros, every part on a 64-byte boundary, so that a
miss stays one `copy_`.

Convention (both widths): a group is `group_size` consecutive inputs of one output row; its codes q
are unsigned, 0 <= q < 2**bits, and decode as w ~ (q - 2**(bits-1)) * scale + zero, i.e. `zero` is the
value of the middle code. That is exactly the convention of torch's int4 CPU kernel, and for int8 the
stored signed byte q - 128 times the scale is what `_weight_int8pack_mm` would compute; no conversion
at run time. Scales and zeros are stored as bf16 in both formats: the int4 CPU kernel reads bf16, bf16
keeps fp32's exponent range (no underflow for tiny groups) and `quantize` makes its bound hold for the
stored, rounded values.

Layout: a fixed function of the shapes and of the format's name, the same on every machine, because
`weights/packed.py` stores these bytes and another machine may load them (int4's two code orders:
`int4_layouts.py`).

The dequantizing path (every format's fallback where no kernel applies, `GroupQuantFormat._dequant_linear`):
rebuild the matrix in the compute dtype, then `F.linear`, in a scratch buffer per (device, dtype)
allocated once (Mixtral: w13, 235 MB in fp16): the device reserve must hold it; calls allocate only
scale-sized temporaries. On the CPU it runs in fp32 whatever the compute dtype: fp16/bf16 elementwise
ops and matmuls are slower than fp32 on CPUs without native support. Which kernel runs when, and the
measurements behind each choice: `int8.py`, `int4.py`, `mxfp4.py`, BENCHMARKS.md ("Kernel choices").

Legend: T tokens, D dim, I ffn dim, N output rows, K input columns, G groups per row (K / group size).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..options import GROUP_SIZES
from .base import ALIGN, activation, up_parts
from .cpu_kernels import ExpertKernel
from .gemm import linear

SCALE_DTYPE = torch.bfloat16  # scales and zeros in every packed format


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


def dequant_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] times dequantized weights w [N, K] (fp32 on the CPU, see above) -> [T, N] in x's dtype."""
    return linear(x.to(w.dtype), w).to(x.dtype)


def check_groups(group_size: int, size: int, what: str) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"quantization group size must be one of {GROUP_SIZES}, got {group_size}")
    if size % group_size:
        raise UserError(f"{what} {size} is not a multiple of the quantization group size {group_size}")


class GroupQuantFormat(ABC):
    """What int8, int4 and MXFP4 (`mxfp4.py`) share: validation, the buffer plan, pack and the activation
    (`base.activation`) and biases around the linears. The biases, where the family has them (b13 =
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
        self.up = up_parts(config)
        up = len(self.up) * I  # w13's rows
        self._plan: list[list[tuple[int, torch.dtype, tuple[int, ...]]]] = []  # per matrix: (offset, dtype, shape)
        offset = 0
        for N, K in ((up, D), (D, I)):  # w13, w2
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
        self._largest = max(up * D, D * I)  # elements of the larger matrix
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

    def views(self, buf: torch.Tensor, row: int = 0) -> tuple:
        """(w13 parts, w2 parts, on_cpu), then b13 and b2 where the family has biases: on_cpu, read once per
        buffer, lets the CPU kernels run."""
        w13, w2 = (
            tuple(buf[o : o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape) for o, dtype, shape in parts)
            for parts in self._plan
        )  # each part [bytes] -> its `_parts` dtype and shape
        biases = tuple(buf[o : o + 4 * n].view(torch.float32) for o, n in self._bias_plan)  # b13 [2I], b2 [D]
        return w13, w2, buf.device.type == "cpu", *biases

    def weights(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 weights w13 [2I, D] (relu2: [I, D]) and w2 [D, I] that a packed buffer stands for, as new
        tensors: what a conversion's error is measured on (`weights.fp8.report_error`)."""
        w13, w2, *_ = self.views(buf)
        return tuple(self._dequant(mat, torch.empty(self._largest, dtype=torch.float32, device=buf.device))
                     for mat in (w13, w2))

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        w13, w2, _, *biases = self.views(out)
        self._store(torch.cat([parts[p] for p in self.up]), w13)  # [2I, D] (relu2: [I, D])
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
        h = linear(x, w13, cpu)  # [T, 2I] (relu2: [T, I]), a new tensor in x's dtype
        y = linear(self.act(h.add_(biases[0]) if biases else h), w2, cpu)  # [T, D]
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


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
