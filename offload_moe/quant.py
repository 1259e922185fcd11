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

Layout: a fixed function of the shapes, the same on every machine, because `packed.py` stores these
bytes and another machine may load them. The int4 codes are in the order of torch's AVX-512 int4 CPU
kernel (row blocks of 64; see `_pack_nibbles`), written by us, not by torch's converter, whose order
depends on the CPU it runs on (blocks of 32 with AVX2).

Kernels (best of many runs on a shared 2-core AVX-512 VM, 2 threads, D=512, I=1792, T=1; dense fp32
0.86 ms; bench/bench_quant_kernels.py prints the whole table):
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
- CUDA (and any other device): dequantize into the compute dtype, then `F.linear`. torch's CUDA int4
  kernel needs `_convert_weight_to_int4pack`'s tiled layout, which only a CUDA call produces; the
  buffer is packed on the host before any device sees it, so that layout cannot live in it. The
  matrix is rebuilt in place in a scratch buffer per (device, dtype), allocated once (Mixtral: w13,
  235 MB in fp16): the device reserve must hold it; calls allocate only scale-sized temporaries.
- The CPU dequantizing path runs in fp32 whatever the compute dtype: fp16/bf16 elementwise ops and
  matmuls are slower than fp32 on CPUs without native support.

Legend: T tokens, D dim, I ffn dim, N output rows, K input columns, G groups per row (K / group size),
B int4 row block.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import UserError
from .expert_store import ALIGN, DenseFormat, ExpertFormat

EXPERT_QUANTS = ("none", "int8", "int4")
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
    _check_groups(group_size, cols, "quantize: input columns")
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


class _GroupQuantFormat(ABC):
    """What int8 and int4 share: validation, the buffer plan, pack and the SwiGLU around the linears.

    A subclass says how one matrix [N, K] lies in the buffer (`_parts`, `_store`), how to rebuild its
    weights (`_dequant`) and how to multiply by it (`_linear`, kernel or `_dequant_linear`)."""

    bits: int

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64):
        D, I = config.dim, config.ffn_dim
        _check_groups(group_size, D, "model dim")
        _check_groups(group_size, I, "expert ffn dim")
        self.D, self.I, self.group_size, self.compute_dtype = D, I, group_size, compute_dtype
        self.name = f"int{self.bits}-g{group_size}"
        self._plan: list[list[tuple[int, torch.dtype, tuple[int, ...]]]] = []  # per matrix: (offset, dtype, shape)
        offset = 0
        for N, K in ((2 * I, D), (D, I)):  # w13, w2
            parts = []
            for dtype, shape in self._parts(N, K):
                parts.append((offset, dtype, shape))
                offset += _aligned(math.prod(shape) * dtype.itemsize)
            self._plan.append(parts)
        self.nbytes = offset  # a multiple of ALIGN, so that experts laid end to end stay aligned
        self._largest = max(2 * I * D, D * I)  # elements of the larger matrix
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

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
        """(w13 parts, w2 parts, on_cpu): on_cpu, read once per buffer, lets the CPU kernels run."""
        w13, w2 = (
            tuple(buf[o : o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape) for o, dtype, shape in parts)
            for parts in self._plan
        )  # each part [bytes] -> its `_parts` dtype and shape
        return w13, w2, buf.device.type == "cpu"

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        w13, w2, _ = self.views(out)
        for w, dst in ((torch.cat((parts["w1"], parts["w3"])), w13), (parts["w2"], w2)):  # [2I, D], [D, I]
            self._store(*quantize(w, self.bits, self.group_size), dst)

    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        w13, w2, cpu = views
        a, b = self._linear(x, w13, cpu).chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
        return self._linear(F.silu(a) * b, w2, cpu)  # [T, D]

    def forward_dequant(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        """`forward` with the kernels off: the reference that the kernel paths are tested against."""
        w13, w2, cpu = views
        a, b = self._dequant_linear(x, w13, cpu).chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
        return self._dequant_linear(F.silu(a) * b, w2, cpu)  # [T, D]

    def _dequant_linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        return dequant_linear(x, self._dequant(mat, self.scratch(x.device, torch.float32 if cpu else x.dtype)))

    @abstractmethod
    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each part of one matrix [N, K], in buffer order."""

    @abstractmethod
    def _store(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dst: tuple) -> None:
        """Write `quantize`'s output for one matrix into its views `dst`."""

    @abstractmethod
    def _dequant(self, mat: tuple, out: torch.Tensor) -> torch.Tensor:
        """One matrix's weights [N, K], from its views, written into `out` (a scratch buffer; its dtype)."""

    @abstractmethod
    def _linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        """x [T, K] times one matrix -> [T, N], by a kernel where one applies, else `_dequant_linear`."""


class Int8Format(_GroupQuantFormat):
    """One byte a weight. Per matrix: codes int8 [G, N, gs] (q - 128, group-major so that each group is
    a contiguous [N, gs] operand of `int8_bmm_linear`'s batched matmul), scales bf16 [G, N], zeros
    bf16 [G, N]."""

    bits = 8

    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        G = K // self.group_size
        return [(torch.int8, (G, N, self.group_size)), (SCALE_DTYPE, (G, N)), (SCALE_DTYPE, (G, N))]

    def _store(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dst: tuple) -> None:
        int8_store(q, scales, zeros, *dst)

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
    """The weights [N, K] in `dtype` of an int8 matrix in `int8_store`'s layout, in `out` when given."""
    G, N, gs = codes.shape
    w = torch.empty(N, G, gs, dtype=dtype, device=codes.device) if out is None else out[: N * G * gs].view(N, G, gs)
    w.transpose(0, 1).copy_(codes)
    w.mul_(s.T.unsqueeze(-1).to(dtype)).add_(z.T.unsqueeze(-1).to(dtype))  # scales, zeros [N, G, 1]
    return w.view(N, G * gs)  # [N, K]


def int8_linear(x: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, cpu: bool,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] times an int8 matrix -> [T, N]: on the CPU at decode sizes group by group
    (`int8_bmm_linear`), else dequantize (into `scratch`, an fp32 buffer on the CPU, when given)."""
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


class Int8Scratch:
    """The buffer that `Int8Linear`s widen or rebuild their matrix in, one per (device, dtype), of
    `numel` elements (the largest matrix among the layers that share it), allocated at first use
    and reused by every later call: no weight-sized allocation per call. The layers that share one
    run one after another on one stream, so it is never rewritten while a matmul still reads it."""

    def __init__(self, numel: int):
        self.numel = numel
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.numel, dtype=dtype, device=device)
        return self.buffers[key]


class Int8Linear(nn.Module):
    """A resident linear layer (attention's wq wk wv wo) with int8 weights: `Int8Format`'s matrix
    layout and paths, held in three buffers, so that a state dict carries it. Each call widens (CPU,
    `int8_bmm_linear`) or rebuilds (elsewhere, fp32 on the CPU for many tokens) its matrix in
    `scratch`, which `int8_attention` shares among all the model's projections (default: its own,
    of this matrix's size)."""

    PARTS = tuple(INT8_PART_DTYPES)

    def __init__(self, in_features: int, out_features: int, group_size: int, scratch: Int8Scratch | None = None):
        super().__init__()
        _check_groups(group_size, in_features, "attention input size")
        for part, shape in int8_part_shapes(out_features, in_features, group_size).items():
            self.register_buffer(part, torch.empty(shape, dtype=INT8_PART_DTYPES[part]))
        if scratch is not None and scratch.numel < in_features * out_features:
            raise ValueError(f"an Int8Scratch of {scratch.numel} elements cannot hold a {out_features}x{in_features} "
                             "matrix")
        self.scratch = scratch or Int8Scratch(in_features * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu = x.device.type == "cpu"
        buf = self.scratch.get(x.device, torch.float32 if cpu else x.dtype)  # fp32 on the CPU, as Int8Format
        return int8_linear(x, self.codes, self.scales, self.zeros, cpu, buf)


def int8_parts(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """`Int8Linear`'s buffers for the weight w [N, K], quantized on w's device."""
    out = {part: torch.empty(shape, dtype=INT8_PART_DTYPES[part], device=w.device)
           for part, shape in int8_part_shapes(*w.shape, group_size).items()}
    int8_store(*quantize(w, 8, group_size), *out.values())
    return out


ATTENTION_QUANTS = ("none", "int8")
ATTENTION_WEIGHTS = ("wq", "wk", "wv", "wo")
ATTENTION_SUFFIXES = tuple(f"attention.{w}.weight" for w in ATTENTION_WEIGHTS)  # their names in a state dict


def check_int8_attention(config: ModelConfig, group_size: int) -> None:
    """Refuse a group size that does not divide the attention projections' inputs (D for wq wk wv,
    H*hd for wo), before anything is built or written."""
    for size in (config.dim, config.n_heads * config.head_dim):
        _check_groups(group_size, size, "attention input size")


def int8_attention(model: nn.Module, group_size: int) -> None:
    """Swap every layer's attention projections for `Int8Linear`s of the same shape (on the model's
    device, usually `meta`, before the state dict is assigned), all sharing one `Int8Scratch` sized to
    the largest projection (Mixtral: wq or wo, 4096 x 4096: 32 MiB in fp16, 64 MiB in fp32 on the CPU)."""
    linears = [(blk.attention, name, getattr(blk.attention, name)) for blk in model.layers
               for name in ATTENTION_WEIGHTS]
    scratch = Int8Scratch(max(lin.in_features * lin.out_features for _, _, lin in linears))
    for attention, name, lin in linears:
        with lin.weight.device:
            setattr(attention, name, Int8Linear(lin.in_features, lin.out_features, group_size, scratch))


def int8_attention_state(name: str, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """The state-dict entries of `Int8Linear` that replace the attention weight `name` ([N, K])."""
    prefix = name.removesuffix("weight")
    return {prefix + part: v for part, v in int8_parts(w, group_size).items()}


def attention_bytes(config: ModelConfig, quant: str, group_size: int, dtype: torch.dtype) -> int:
    """Bytes of all layers' attention projections, dense in `dtype` or int8 with bf16 scales and zeros."""
    n = config.attention_params
    if quant == "none":
        return n * dtype.itemsize
    return n + 2 * SCALE_DTYPE.itemsize * n // group_size


def dense_bytes(config: ModelConfig, dtype: torch.dtype, attention: str = "none", group_size: int = 64) -> int:
    """The resident weights: everything in `dtype` but the attention projections, which may be int8."""
    return (config.dense_params - config.attention_params) * dtype.itemsize + attention_bytes(
        config, attention, group_size, dtype)


class Int4Format(_GroupQuantFormat):
    """Half a byte a weight. Per matrix: codes uint8 [N, K/2], two a byte in the AVX-512 int4 kernel's
    order (see `_pack_nibbles`), then scales and zeros interleaved, bf16 [G, N, 2], as that kernel reads
    them. I is a multiple of 32 (the smallest group), so w13's 2I rows come in blocks of 64; w2's D rows
    do too unless D is an odd multiple of 32, and then in blocks of 32, with the kernel off."""

    bits = 4

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64):
        super().__init__(config, compute_dtype, group_size)
        self.cpu_kernel = _cpu_int4_kernel_reads_blocks_of_64() and self.D % 64 == 0

    def _parts(self, N: int, K: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        return [(torch.uint8, (N, K // 2)), (SCALE_DTYPE, (K // self.group_size, N, 2))]

    def _store(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dst: tuple) -> None:
        codes, sz = dst
        codes.copy_(_pack_nibbles(q, _row_block(q.shape[0])))
        sz[..., 0].copy_(scales.T)  # [N, G] -> [G, N]
        sz[..., 1].copy_(zeros.T)

    def _dequant(self, mat: tuple, out: torch.Tensor) -> torch.Tensor:
        codes, sz = mat
        G, N, _ = sz.shape
        w = _unpack_nibbles(codes, _row_block(N), out).view(N, G, self.group_size)  # [N, K] -> [N, G, gs]
        s, z = (sz[..., i].T.unsqueeze(-1).to(out.dtype) for i in (0, 1))  # [N, G, 1]
        return w.sub_(8).mul_(s).add_(z).view(N, -1)  # [N, K]

    def _linear(self, x: torch.Tensor, mat: tuple, cpu: bool) -> torch.Tensor:
        if cpu and self.cpu_kernel and x.shape[0] <= INT4_KERNEL_MAX_TOKENS:
            return int4_cpu_kernel_linear(x, *mat, self.group_size)
        return self._dequant_linear(x, mat, cpu)


def int4_cpu_kernel_linear(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] (any float dtype) times an int4 matrix -> [T, N] in x's dtype, by torch's CPU int4 kernel
    in bf16 (the one dtype it vectorizes)."""
    xb = x.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, codes, group_size, sz).to(x.dtype)


def _row_block(N: int) -> int:
    """Rows per block of the int4 code layout: 64 (the AVX-512 kernel's) where N allows, else 32."""
    return 64 if N % 64 == 0 else 32


def _pack_nibbles(q: torch.Tensor, block: int) -> torch.Tensor:
    """Codes [N, K] (< 16) -> bytes [N, K/2] in the CPU int4 kernel's order: row blocks of `block`, each
    stored k-major as [K, block/2] bytes, byte j holding row j (low nibble) and row j + block/2 (high).
    With block 64 that is torch's AVX-512 order, with 32 its AVX2 order."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N // block, 2, block // 2, K)  # [N/B, low|high, B/2, K]
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)  # [N/B, K, B/2] -> [N, K/2]


def _unpack_nibbles(codes: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """The inverse of `_pack_nibbles`: bytes [N, K/2] -> codes [N, K] as floats, written into `out`
    (its dtype) in place: each byte widened into its low row, the high nibble split off by floor
    division, so no temporary of the matrix's size is made (byte values are exact in bf16 too)."""
    N, K = codes.shape[0], codes.shape[1] * 2
    b = codes.view(N // block, K, block // 2)  # [N/B, K, B/2]
    w = out[: N * K].view(N // block, block, K)  # [N/B, B, K]: rows j (low nibbles), j + B/2 (high)
    low, high = w[:, : block // 2], w[:, block // 2 :]  # [N/B, B/2, K] each
    low.copy_(b.transpose(1, 2))  # the whole byte, 0..255
    high.copy_(low).div_(16, rounding_mode="floor")
    low.add_(high, alpha=-16)
    return w.view(N, K)


@functools.cache
def _cpu_int4_kernel_reads_blocks_of_64() -> bool:
    """Whether this process's CPU int4 kernel reads our code order, i.e. torch's own packing of a probe
    equals `_pack_nibbles(probe, 64)`: true for AVX-512 builds; AVX2 packs blocks of 32, ARM otherwise."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except RuntimeError:
        return False
    return torch.equal(packed, _pack_nibbles(probe, 64))


def expert_format(name: str, config: ModelConfig, compute_dtype: torch.dtype, group_size: int = 64) -> ExpertFormat:
    """The expert format called `name`: "none" (dense, in the compute dtype), "int8" or "int4"."""
    if name == "none":
        return DenseFormat(config, compute_dtype)
    formats = {"int8": Int8Format, "int4": Int4Format}
    if name not in formats:
        raise UserError(f"unknown expert quantization {name!r} (use {', '.join(EXPERT_QUANTS)})")
    return formats[name](config, compute_dtype, group_size)


def bytes_per_expert(config: ModelConfig, name: str, group_size: int = 64, dtype: torch.dtype = torch.float16) -> int:
    """`expert_format(name, ...).nbytes`, for memory planning; `dtype` matters for "none" only."""
    return expert_format(name, config, dtype, group_size).nbytes


def _check_groups(group_size: int, size: int, what: str) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"quantization group size must be one of {GROUP_SIZES}, got {group_size}")
    if size % group_size:
        raise UserError(f"{what} {size} is not a multiple of the quantization group size {group_size}")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN

