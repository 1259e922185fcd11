"""A decode step's attention half of a layer in one C call (`formats/decode_step.c`): norm, q/k/v, per-head
q/k norms, RoPE, the ring cache's write, attention, the output projection and residual, the FFN's norm and the
router's logits, for one token of one sequence on the CPU in float32; and the final norm with the LM head.

Why: at one token these are some 40 torch calls a layer, each a few microseconds of dispatch for less
arithmetic (issue 25: the small shape's decode was dispatch-bound against llama.cpp, which runs a token as one
graph). `Transformer.forward` takes this path for a layer where `DecodeStep` holds one (`build`, at load,
after the weights are in place: the step keeps their addresses); the rest of the layer (routing, experts,
shared experts, dense MLP) stays in torch. A layer takes it when its attention is plain GQA (`Attention`)
with RMSNorm and the family's options the C code covers: q/k/v and o biases, per-head q/k norms, partial or no
RoPE, a sliding window's ring; projections fp32 or int8 (`Int8Linear`, rows in multiples of 16). Output gates,
sinks, clamps, whole-projection q/k norms, latent attention and the state mixers keep the torch path, as does
every layer when the kernels are not built (`cpu_kernels.library`), the device is not the CPU, or the compute
dtype is not float32. The results match the torch path up to float32 summation order
(tests/test_decode_step.py).

Legend: D dim, H query heads, G kv heads, hd head dim, r rotary dims, C ring length, E experts.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..formats import cpu_kernels
from ..formats.int8_linear import Int8Linear
from .layers import Attention, RMSNorm

_p, _i = ctypes.c_void_p, ctypes.c_int


class OkmMat(ctypes.Structure):  # decode_step.c's OkmMat
    _fields_ = [("w", _p), ("codes", _p), ("s", _p), ("z", _p), ("b", _p), ("N", _i), ("K", _i), ("gs", _i)]


class OkmLayer(ctypes.Structure):  # decode_step.c's OkmLayer
    _fields_ = [("norm1", _p), ("norm2", _p), ("q_norm", _p), ("k_norm", _p), ("wq", OkmMat), ("wk", OkmMat),
                ("wv", OkmMat), ("wo", OkmMat), ("router", OkmMat), ("D", _i), ("H", _i), ("G", _i), ("hd", _i),
                ("r", _i), ("plus_one", _i), ("eps", ctypes.c_float)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _mat(linear: nn.Module, bias: torch.Tensor | None = None) -> OkmMat | None:
    """A projection as the C code reads it, or None where it cannot (another dtype, int8 rows not in 16s)."""
    if isinstance(linear, Int8Linear):
        G, N, gs = linear.codes.shape
        if N % 16 or gs % 32:
            return None
        return OkmMat(None, _ptr(linear.codes), _ptr(linear.scales), _ptr(linear.zeros), _ptr(linear.bias), N,
                      G * gs, gs)
    w = linear.weight
    if w.dtype != torch.float32 or not w.is_contiguous():
        return None
    b = linear.bias if bias is None else bias
    return OkmMat(_ptr(w), None, None, None, _ptr(b), w.shape[0], w.shape[1], 0)


def _plain_rms(norm: nn.Module | None) -> bool:
    return isinstance(norm, RMSNorm) and norm.weight.dtype == torch.float32


class DecodeStep:
    """The C step's per-layer descriptions (`OkmLayer`, None where a layer keeps the torch path) and the
    scratch it writes; `__call__` runs one layer."""

    def __init__(self, layers: list[OkmLayer | None], head: OkmMat | None, norm: nn.Module, tensors: list,
                 length: int, rope: tuple):
        self.layers, self.head, self.norm, self._keep = layers, head, norm, tensors  # _keep: what they point at
        lib = cpu_kernels.library()
        self.lib = lib
        self.cos, self.sin = rope  # [length, r], contiguous
        floats = [lib.okm_step_floats(L.D, L.H, L.G, L.hd, length) for L in layers if L is not None]
        floats += [lib.okm_step_floats(head.K, 0, 0, 0, 0)] if head is not None else []
        self.work = torch.empty(max(floats), dtype=torch.float32)

    @classmethod
    def build(cls, model: nn.Module) -> DecodeStep | None:
        """The step for `model` (a Transformer with its weights and RoPE tables in place), or None where no layer
        can take it (see the module docstring)."""
        if cpu_kernels.library() is None or model.rope[0].device.type != "cpu":
            return None
        keep: list[torch.Tensor] = [*model.output.parameters(), *model.output.buffers(), model.norm.weight]
        layers = [cls._layer(model, blk, keep) for blk in model.layers]
        head = _mat(model.output) if _plain_rms(model.norm) else None
        if not any(layers) and head is None:
            return None
        return cls(layers, head, model.norm, keep, max(model.rope[0].shape[0], 1),
                   tuple(t.contiguous() for t in model.rope))

    @staticmethod
    def _layer(model: nn.Module, blk: nn.Module, keep: list) -> OkmLayer | None:
        c, a = model.config, blk.attention
        if type(a) is not Attention or a.gated or a.clip is not None or a.sinks is not None or a.qk_norm == "full":
            return None
        if not (_plain_rms(blk.attention_norm) and (blk.ffn_norm is None or _plain_rms(blk.ffn_norm))):
            return None
        if a.qk_norm == "head" and not (_plain_rms(a.q_norm) and _plain_rms(a.k_norm)):
            return None
        mats = [_mat(m) for m in (a.wq, a.wk, a.wv, a.wo)]
        router = OkmMat()  # N = 0: no router (a dense layer's MLP)
        if hasattr(blk, "gate"):
            # the sigmoid and grouped-softmax routers take their logits without the gate's bias (`route`)
            plain = c.router not in ("sigmoid", "grouped_softmax")
            router = _mat(blk.gate) if plain else OkmMat(_ptr(blk.gate.weight), None, None, None, None,
                                                           *blk.gate.weight.shape, 0)
            if blk.gate.weight.dtype != torch.float32:
                router = None
        if any(m is None for m in mats) or router is None:
            return None
        if len({(m.w is None, m.gs) for m in mats[:3]}) > 1:
            return None  # wq, wk, wv share one quantized input: all fp32, or all int8 in one group size
        qn = kn = None
        if a.qk_norm == "head":
            qn, kn = a.q_norm.weight, a.k_norm.weight
        keep += [t for t in (*blk.parameters(), *blk.buffers())]
        norm2 = None if blk.ffn_norm is None else blk.ffn_norm.weight  # None: attention alone (Nemotron-H)
        return OkmLayer(_ptr(blk.attention_norm.weight), _ptr(norm2), _ptr(qn), _ptr(kn), *mats, router,
                        c.dim, a.n_heads, a.n_kv, a.hd, model.rope[0].shape[1], int(blk.attention_norm.plus_one),
                        blk.attention_norm.eps)

    def __call__(self, i: int, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Layer i's attention half for h [1, D] at position `pos`, keys and values k, v [G, C, hd] (its ring):
        (h after attention [1, D], the FFN's normed input [1, D] (a layer without an FFN: unset), the router's logits
        [1, E] or None); None: the layer keeps the torch path."""
        L = self.layers[i]
        if L is None or not (k.is_contiguous() and v.is_contiguous()):
            return None
        h = h.contiguous()
        out, x = torch.empty_like(h), torch.empty_like(h)
        logits = torch.empty(1, L.router.N, dtype=torch.float32) if L.router.N else None
        self.lib.okm_attention_step(ctypes.addressof(L), h.data_ptr(), out.data_ptr(), x.data_ptr(),
                                    _ptr(logits), k.data_ptr(), v.data_ptr(), k.shape[1], pos,
                                    self.cos[pos].data_ptr(), self.sin[pos].data_ptr(), self.work.data_ptr())
        return out, x, logits

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """The LM head's logits [1, V] of h [1, D] (the final norm, then the head, fp32 or int8), or None: the
        torch path (no plain RMSNorm, or a head the C code does not read)."""
        W = self.head
        if W is None:
            return None
        h = h.contiguous()
        out = torch.empty(1, W.N, dtype=torch.float32)
        self.lib.okm_head_step(ctypes.addressof(W), self.norm.weight.data_ptr(), self.norm.eps,
                               int(self.norm.plus_one), h.data_ptr(), out.data_ptr(), self.work.data_ptr())
        return out
