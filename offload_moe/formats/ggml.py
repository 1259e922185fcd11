"""GGUF experts kept as the file holds them (`GGUFFormat`): each part's ggml blocks, byte for byte, decoded by torch
ops on whatever device computes (`dequantize`).

Why: a Q4_K_M file is 0.56-0.82 bytes a weight; decoded to fp16 at load it would take 2, more RAM than the
users who download it have, and re-quantizing it into our int4/int8 formats would add a second rounding to the
first. Kept as it is, the expert cache holds exactly the file's weights at the file's size, and a miss is still one
copy of one contiguous buffer.

Mixed types: llama.cpp's mixes give an expert's parts their own types (Q4_K_M: gate and up Q4_K, down Q6_K in some
layers and Q4_K in others), so the layout is per layer: a row's part types fix where each part lies in the buffer
(`views(buf, row)`), every buffer is as large as the largest row's.

Computing: one token on the CPU, a part's bytes go straight into the C kernel (`cpu_kernels.ggml_linear`: Q8_0,
Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K decoded inside float32 dot products); several tokens on the CPU in float32, those
types decoded in one C pass (`cpu_kernels.ggml_dequant`) and multiplied; elsewhere (Q2_K/Q3_K, a GPU) the part is
decoded by torch ops (`dequantize`) and multiplied. The decoders follow gguf-py's numpy ones
(`gguf.quants`, llama.cpp's reference) step for step in float32, so a weight decodes to the same float32 value:
tests/test_ggml_format.py checks each type bit for bit. They allocate weight-sized temporaries per call
(unpacked codes, the float32 weights).

Legend: T tokens, D dim, I ffn dim, N output rows, K input columns, n blocks, bs a block's weights, ts its bytes.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ..config import ModelConfig
from ..errors import UserError
from .base import ALIGN, activation
from .cpu_kernels import ggml_dequant, ggml_linear
from .gemm import linear

QK_K = 256  # weights in a k-quant super-block
FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes [n, 2] -> their fp16 value as float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


@functools.cache
def _shifts(shifts: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The shifts as a [len, 1] tensor on `device`, made once: no host-to-device copy on the hot path."""
    return torch.tensor(shifts, dtype=dtype, device=device).view(-1, 1)


def _bits(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """b [n, ..., m] uint8 -> [n, ..., len(shifts), m]: each byte's field at each shift, masked."""
    return (b.unsqueeze(-2) >> _shifts(shifts, b.device)) & mask


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _bits(b[:, 2:], (0, 4), 0x0F).reshape(len(b), -1).to(torch.int8) - 8  # [n, 32]
    return _f16(b[:, :2]) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _bits(b[:, 4:], (0, 4), 0x0F).reshape(len(b), -1).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5(b: torch.Tensor, offset: int) -> torch.Tensor:
    """Q5_0 (offset 2: d, then the high bits) and Q5_1 (offset 4: d, m): the 5-bit codes [n, 32], uint8."""
    qh = b[:, offset : offset + 4].contiguous().view(torch.int32)  # [n, 1], little-endian as the file
    high = ((qh >> _shifts(tuple(range(32)), b.device, torch.int32).view(-1)) & 1).to(torch.uint8)  # [n, 32]
    low = _bits(b[:, offset + 4 :], (0, 4), 0x0F).reshape(len(b), -1)
    return low | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _q5(b, 4).float() + _f16(b[:, 2:4])


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n, -1, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8], (0, 4), 0x0F).reshape(n, 16)
    high = _bits(scales[:, 8:], (0, 2, 4, 6), 0x03).reshape(n, 16)
    dl = (d * ((low | (high << 4)).to(torch.int8) - 32).float()).view(n, 16, 1)
    ql = _bits(qs.reshape(n, -1, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, -1, 32), tuple(range(8)), 1).reshape(n, 16, 16) ^ 1  # offset 4 where the bit is 0
    return (dl * (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()).reshape(n, QK_K)


def _scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's 8 six-bit scales and mins from their 12 bytes [n, 12] -> [n, 8] each."""
    d, m, md = scales.view(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q45_k(b: torch.Tensor, high_bits: bool) -> torch.Tensor:
    n = len(b)
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min(b[:, 4:16])
    dl = (d * sc.float()).view(n, -1, 1)
    ml = (dmin * mn.float()).view(n, -1, 1)
    qs = b[:, 48:] if high_bits else b[:, 16:]
    q = _bits(qs.reshape(n, -1, 32), (0, 4), 0x0F).reshape(n, -1, 32)  # [n, 8, 32]
    if high_bits:  # Q5_K: the fifth bit of each code
        q = q | (_bits(b[:, 16:48].reshape(n, -1, 32), tuple(range(8)), 1).reshape(n, -1, 32) << 4)
    return (dl * q.float() - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = _bits(ql.reshape(n, -1, 64), (0, 4), 0x0F).reshape(n, -1, 32)
    high = _bits(qh.reshape(n, -1, 32), (0, 2, 4, 6), 0x03).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, -1).float()
    return (dl * q).reshape(n, QK_K)


DECODERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q2_K: _q2_k,
            Q.Q3_K: _q3_k, Q.Q4_K: lambda b: _q45_k(b, False), Q.Q5_K: lambda b: _q45_k(b, True), Q.Q6_K: _q6_k}
NATIVE = (*FLOATS, *DECODERS)  # the types an expert part may keep


def row_bytes(kind: Q, K: int) -> int:
    """Bytes of one row of K weights of type `kind`."""
    bs, ts = GGML_QUANT_SIZES[kind]
    if K % bs:
        raise UserError(f"a row of {K} weights is not whole {kind.name} blocks of {bs}")
    return K // bs * ts


def dequantize(raw: torch.Tensor, kind: Q, K: int) -> torch.Tensor:
    """A matrix's bytes [N, K/bs*ts] (uint8, any device) of type `kind` -> its weights [N, K], float32 (F16 and
    BF16 as stored)."""
    N = raw.shape[0]
    if kind in FLOATS:
        return raw.view(FLOATS[kind]).view(N, K)
    bs, ts = GGML_QUANT_SIZES[kind]
    return DECODERS[kind](raw.reshape(-1, ts)).view(N, K)  # [N*K/bs, ts] -> [N*K/bs, bs] -> [N, K]


def kinds_from_names(rows, where) -> list[tuple[Q, ...]]:
    """`GGUFFormat.kinds` from their names (a packed folder's `gguf_types`: [["Q4_K", "Q4_K", "Q6_K"], ...])."""
    try:
        return [tuple(Q[name] for name in row) for row in rows]
    except (KeyError, TypeError):
        raise UserError(f"{where}: packed.json's gguf_types {str(rows)[:80]} are not GGUF type names; convert the "
                        "model again") from None


class GGUFFormat:
    """Experts in their GGUF types (see the module docstring): per row (layer with experts) a type for each part,
    `kinds[row]` in `config.expert_parts` order (w1, w3, w2; relu2: w1, w2); each part's bytes as the file's
    [N, K/bs*ts], on ALIGN boundaries, in that order. `pack` takes the raw parts (`Checkpoint.expert_raw`)."""

    def __init__(self, config: ModelConfig, kinds: list[tuple[Q, ...]]):
        if config.expert_bias:
            raise UserError("GGUF experts with biases (gpt-oss) are decoded at load, not kept in their types")
        self.parts = config.expert_parts
        self.shapes = config.ffn_shapes()
        self.kinds = kinds
        self.act = activation(config)
        self._layouts = {k: self._layout(k) for k in set(kinds)}  # part types -> [(offset, bytes)] per part
        self.nbytes = max(off + n for layout in self._layouts.values() for off, n in layout[-1:])
        self.nbytes = -(-self.nbytes // ALIGN) * ALIGN  # experts laid end to end stay aligned
        self.name = "gguf-" + "+".join(sorted({k.name for row in kinds for k in row}))
        self._scratch: torch.Tensor | None = None  # float32, a prompt's decoded part on the CPU (`_linear`)

    def _layout(self, kinds: tuple[Q, ...]) -> list[tuple[int, int]]:
        if len(kinds) != len(self.parts) or not set(kinds) <= set(NATIVE):
            raise UserError(f"GGUF expert parts {[k.name for k in kinds]} are not {len(self.parts)} of "
                            f"{', '.join(k.name for k in NATIVE)}")
        out, offset = [], 0
        for part, kind in zip(self.parts, kinds, strict=True):
            N, K = self.shapes[part]
            n = N * row_bytes(kind, K)
            out.append((offset, n))
            offset = -(-(offset + n) // ALIGN) * ALIGN
        return out

    def views(self, buf: torch.Tensor, row: int = 0) -> tuple:
        """((kind, bytes [N, K/bs*ts], K) per part in `parts` order) for an expert of row `row`."""
        kinds = self.kinds[row]
        out = []
        for part, kind, (offset, n) in zip(self.parts, kinds, self._layouts[kinds], strict=True):
            N, K = self.shapes[part]
            out.append((kind, buf[offset : offset + n].view(N, -1), K))
        return tuple(out)

    def pack(self, parts: dict[str, tuple[Q, torch.Tensor]], out: torch.Tensor) -> None:
        """parts: {part: (kind, bytes [N, K/bs*ts])}, as the file holds them."""
        kinds = tuple(parts[p][0] for p in self.parts)
        if kinds not in self._layouts:
            raise UserError(f"an expert's GGUF types {[k.name for k in kinds]} are not its layer's")
        for part, (offset, n) in zip(self.parts, self._layouts[kinds], strict=True):
            out[offset : offset + n].copy_(parts[part][1].reshape(-1))

    def weights(self, views: tuple, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each part's weights [N, K] in `dtype`, decoded from `views`."""
        return [dequantize(raw, kind, K).to(dtype) for kind, raw, K in views]

    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        return self._ffn(x, views, self._linear)

    def forward_dequant(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        """`forward` with the kernel off: the reference it is tested against."""
        return self._ffn(x, views, _decoded_linear)

    def _ffn(self, x: torch.Tensor, views: tuple, linear) -> torch.Tensor:
        *up, w2 = views
        h = torch.cat([linear(x, part) for part in up], dim=-1)  # [T, 2I] (relu2: [T, I])
        return linear(self.act(h), w2)  # [T, D]

    def _linear(self, x: torch.Tensor, part: tuple) -> torch.Tensor:
        """x [T, K] times one part (kind, bytes, K) -> [T, N]: one token on the CPU by the C kernel where it reads
        the type (`cpu_kernels.ggml_linear`); several in float32 on the CPU decoded by one C pass
        (`cpu_kernels.ggml_dequant`) into a scratch buffer of the largest part, allocated once (a fresh [N, K]
        tensor a call spent most of its time faulting pages in), then multiplied; else decoded by torch ops."""
        kind, raw, K = part
        if kind not in FLOATS and (y := ggml_linear(x, raw, kind, K)) is not None:
            return y.to(x.dtype)
        if x.dtype == torch.float32 and kind not in FLOATS and x.device.type == "cpu":
            if self._scratch is None:
                self._scratch = torch.empty(max(N * K for N, K in self.shapes.values()), dtype=torch.float32)
            w = self._scratch[: raw.shape[0] * K].view(raw.shape[0], K)  # [N, K]
            if ggml_dequant(raw, kind, K, w):
                return linear(x, w)
        return _decoded_linear(x, part)


def _decoded_linear(x: torch.Tensor, part: tuple) -> torch.Tensor:
    """x [T, K] times one part, decoded by `dequantize`: [T, N]."""
    kind, raw, K = part
    return linear(x, dequantize(raw, kind, K).to(x.dtype))
