"""The two code orders of int4 experts and the kernels that read them.

  "cpu"   row blocks of 64 (the AVX-512 int4 CPU kernel's order; blocks of 32 where rows do not
          allow 64): `pack_nibbles`, read by `_weight_int4pack_mm_for_cpu` (`int4_cpu_kernel_linear`)
          where this process's kernel reads that order (`cpu_int4_kernel_reads_blocks_of_64`).
  "cuda"  the m16n8k16 tiles of torch's CUDA int4 kernel (tinygemm): `tile_int4`, read by
          `_weight_int4pack_mm` (`int4_cuda_kernel_linear`) where a once-per-device probe finds that
          kernel and our tiles agree (`cuda_int4_kernel_runs`).
Both are written by us with torch ops, the same on every machine (a packed folder stores them);
`int4.Int4Format` holds the scales and zeros beside them and falls back to dequantizing.

Legend: T tokens, N output rows, K input columns, G groups per row, B row block, t inner k-tiles.
"""

from __future__ import annotations

import functools
import sys

import torch

from ..errors import UserError


def int4_cuda_kernel_linear(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] times an int4 matrix in the "cuda" layout -> [T, N] in x's dtype, by torch's CUDA int4
    kernel (tinygemm). It takes bf16 activations only (`_weight_int4pack_mm_cuda` checks A is bf16) and
    returns bf16, so x is cast to bf16 and the result back: for fp16 compute that costs bf16's
    precision on the output (~0.4%), far below int4's own error. The kernel dequantizes each code in
    registers as (q - 8) * scale + zero in bf16 and accumulates in fp32: it reads half a byte per
    weight plus 4 bytes of scale and zero per group (0.56 bytes per weight at group 64), against 2 for
    fp16 weights and 12.5 for the dequantizing path (see `Int4Format`)."""
    xb = x.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int4pack_mm(xb, codes, group_size, sz).to(x.dtype)


def cuda_inner_k_tiles(K: int) -> int:
    """Inner k-tiles of the "cuda" layout for K inputs: 8 (16-byte loads, torchao's and gpt-fast's
    default) where K is a multiple of 128, else 4 or 2 (K is a multiple of 32, the smallest group)."""
    return next(t for t in (8, 4, 2) if K % (16 * t) == 0)


def cuda_tile_shape(N: int, K: int) -> tuple[int, int, int, int]:
    """Shape of the int32 codes of a [N, K] matrix in the "cuda" layout: [N/8, K/(16t), 32, t/2]."""
    if N % 8 or K % 32:
        raise UserError(f"the CUDA int4 layout needs rows a multiple of 8 and inputs a multiple of 32, got {N} x {K}")
    t = cuda_inner_k_tiles(K)
    return N // 8, K // (16 * t), 32, t // 2


def int4_converter_bytes(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> the uint8 [N, K/2] that torch's `_convert_weight_to_int4pack` takes (torch >= 2.5):
    byte j of a row holds code 2j in its high nibble and code 2j + 1 in its low one, as torchao packs
    them (`q[:, ::2] << 4 | q[:, 1::2]`). Only the GPU checks need it: `tile_int4` goes straight from q."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def tile_int4(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Codes [N, K] (< 16) -> int32 [N/8, K/(16t), 32, t/2] in the layout of torch's CUDA int4 kernel,
    equal to `_convert_weight_to_int4pack(int4_converter_bytes(q), t)` (its `matrix_to_m16n8k16_Bint4_layout`
    in aten/src/ATen/native/cuda/int4mm.cu; tested against a transcription of that loop on the CPU and
    against torch's own converter on a GPU), computed with torch ops on q's device.

    The kernel feeds m16n8k16 tensor-core tiles: 8 rows (n) by 16 inputs (k) per tile, each of a warp's
    32 lanes holding row n = lane // 4 and inputs k = 2 (lane % 4) + {0, 1, 8, 9} of a k-tile. One
    int32 holds a lane's 8 codes of two consecutive k-tiles; t k-tiles (t/2 words) lie back to back
    per lane. With k = 16 (k-tile) + 8 b + 2 c + d, lane = 4 n' + c, and `a` the k-tile within the
    pair: the word's byte 2d + a holds b = 0 in its low nibble and b = 1 in its high one. Bytes are
    assembled as uint8 and viewed as int32 in memory order (little-endian, as CUDA devices and the
    hosts that drive them are)."""
    if sys.byteorder != "little":
        raise UserError("the CUDA int4 layout is built on little-endian hosts only")
    N, K = q.shape
    J = inner_k_tiles // 2
    KO = K // (16 * inner_k_tiles)
    v = q.to(torch.uint8).view(N // 8, 8, KO, J, 2, 2, 4, 2)  # [n tile, n', k super-tile, word, a, b, c, d]
    v = v.permute(0, 2, 1, 6, 3, 7, 4, 5)  # [N/8, KO, n', c, word, d, a, b]
    words = (v[..., 0] | (v[..., 1] << 4)).contiguous()  # [N/8, KO, n', c, word, byte = 2d + a]
    return words.view(N // 8, KO, 32, J, 4).view(torch.int32).view(N // 8, KO, 32, J)


def untile_int4(codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The inverse of `tile_int4`: int32 [N/8, K/(16t), 32, t/2] -> codes [N, K] as floats in `out`
    (its dtype), in place the way `unpack_nibbles` does it: each byte widened into its low-nibble
    position, the high nibble split off by floor division, no temporary of the matrix's size."""
    NT, KO, _, J = codes.shape
    N, K = NT * 8, KO * J * 32
    b = codes.view(torch.uint8).view(NT, KO, 8, 4, J, 2, 2)  # [N/8, KO, n', c, word, d, a]
    w = out[: N * K].view(NT, 8, KO, J, 2, 2, 4, 2).permute(0, 2, 1, 6, 3, 7, 4, 5)  # [N/8, KO, n', c, word, d, a, b]
    low, high = w[..., 0], w[..., 1]
    low.copy_(b)  # the whole byte, 0..255
    torch.div(low, 16, rounding_mode="floor", out=high)
    low.add_(high, alpha=-16)
    return out[: N * K].view(N, K)


def cuda_int4_kernel_runs(device: torch.device) -> bool:
    """Whether torch's CUDA int4 kernel runs on `device` and reads `tile_int4`'s layout (checked once per
    device, at load: see `_probe_cuda_int4_kernel`). False off CUDA, on ROCm (whose tiles are 16 rows),
    before compute capability 8.0 (the kernel is built for sm_80 and later) and wherever the probe fails;
    there the "cpu" layout and the dequantizing path run, as before this kernel was used."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe_cuda_int4_kernel(index)


@functools.cache
def _probe_cuda_int4_kernel(index: int) -> bool:
    device = torch.device("cuda", index)
    if torch.version.hip is not None or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    g = torch.Generator().manual_seed(0)
    N, K, gs = 16, 256, 64
    try:
        for t in (2, 4, 8):  # our tiles are torch's, for every inner k-tile count a shape may use
            q = torch.randint(0, 16, (N, K), generator=g).to(torch.uint8)
            theirs = torch.ops.aten._convert_weight_to_int4pack(int4_converter_bytes(q).to(device), t)
            if not torch.equal(tile_int4(q, t).to(device), theirs):
                return False
        q = torch.randint(0, 16, (N, K), generator=g).to(torch.uint8)
        scales = (torch.rand(N, K // gs, generator=g) * 0.1 + 0.01).to(torch.bfloat16)  # as the kernel reads them
        zeros = (torch.randn(N, K // gs, generator=g) * 0.1).to(torch.bfloat16)
        sz = torch.stack((scales.T, zeros.T), dim=-1).contiguous().to(device)  # [G, N, 2]
        x = torch.randn(3, K, generator=g)
        y = int4_cuda_kernel_linear(x.to(device), tile_int4(q, cuda_inner_k_tiles(K)).to(device), sz, gs)
        w = (q.float().view(N, -1, gs) - 8) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)  # [N, G, gs]
        ref = x @ w.view(N, K).T  # [3, N]: the kernel must decode (q - 8) * scale + zero
        return bool(((y.float().cpu() - ref).abs().max() / ref.abs().max()) < 2e-2)
    except (RuntimeError, NotImplementedError):
        return False


def int4_layout_for(device: torch.device) -> str:
    """The int4 layout an engine on `device` packs: "cuda" where torch's CUDA int4 kernel runs and reads
    our tiles (`cuda_int4_kernel_runs`), else "cpu" (the CPU kernel's order; on other GPUs the
    dequantizing path)."""
    return "cuda" if cuda_int4_kernel_runs(device) else "cpu"


def int4_cpu_kernel_linear(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] (any float dtype) times an int4 matrix -> [T, N] in x's dtype, by torch's CPU int4 kernel
    in bf16 (the one dtype it vectorizes)."""
    xb = x.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, codes, group_size, sz).to(x.dtype)


def row_block(N: int) -> int:
    """Rows per block of the int4 code layout: 64 (the AVX-512 kernel's) where N allows, else 32."""
    return 64 if N % 64 == 0 else 32


def pack_nibbles(q: torch.Tensor, block: int) -> torch.Tensor:
    """Codes [N, K] (< 16) -> bytes [N, K/2] in the CPU int4 kernel's order: row blocks of `block`, each
    stored k-major as [K, block/2] bytes, byte j holding row j (low nibble) and row j + block/2 (high).
    With block 64 that is torch's AVX-512 order, with 32 its AVX2 order."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N // block, 2, block // 2, K)  # [N/B, low|high, B/2, K]
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)  # [N/B, K, B/2] -> [N, K/2]


def unpack_nibbles(codes: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: bytes [N, K/2] -> codes [N, K] as floats, written into `out`
    (its dtype) in place: each byte widened into its low row, the high nibble split off by floor
    division, so no temporary of the matrix's size is made (byte values are exact in bf16 too)."""
    N, K = codes.shape[0], codes.shape[1] * 2
    b = codes.view(N // block, K, block // 2)  # [N/B, K, B/2]
    w = out[: N * K].view(N // block, block, K)  # [N/B, B, K]: rows j (low nibbles), j + B/2 (high)
    low, high = w[:, : block // 2], w[:, block // 2 :]  # [N/B, B/2, K] each
    low.copy_(b.transpose(1, 2))  # the whole byte, 0..255
    torch.div(low, 16, rounding_mode="floor", out=high)
    low.add_(high, alpha=-16)
    return w.view(N, K)


@functools.cache
def cpu_int4_kernel_reads_blocks_of_64() -> bool:
    """Whether this process's CPU int4 kernel reads our code order, i.e. torch's own packing of a probe
    equals `pack_nibbles(probe, 64)`: true for AVX-512 builds; AVX2 packs blocks of 32, ARM otherwise."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except RuntimeError:
        return False
    return torch.equal(packed, pack_nibbles(probe, 64))
