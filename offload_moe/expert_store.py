"""Host-side expert store: every expert packed as one contiguous byte buffer, so one copy moves it.

An `ExpertFormat` says how an expert's weights lie in its buffer (`pack`), how to see them
without copying (`views`, computed once per buffer) and how to run the expert on those views
(`forward`). The dense format here stores [w1; w3] fused as w13 [2I, D] followed by w2 [D, I];
quantized formats live in `quant.py` and follow the same three methods.

Legend: T tokens, D dim, I ffn dim (per expert), E experts, L layers.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import UserError

ALIGN = 64  # bytes; every part of a packed expert starts on this boundary


class ExpertFormat(Protocol):
    name: str
    nbytes: int  # size of one packed expert

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None: ...
    def views(self, buf: torch.Tensor) -> tuple: ...
    def forward(self, x: torch.Tensor, views: tuple) -> torch.Tensor: ...


class DenseFormat:
    """Unquantized expert in `dtype`: w13 [2I, D] then w2 [D, I], one buffer."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        self.name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        self.dtype = dtype
        self.D, self.I = config.dim, config.ffn_dim
        self.nbytes = 3 * self.D * self.I * dtype.itemsize

    def pack(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        flat = out.view(self.dtype)  # [3*I*D]
        ID = self.I * self.D
        flat[:ID].view(self.I, self.D).copy_(parts["w1"])
        flat[ID : 2 * ID].view(self.I, self.D).copy_(parts["w3"])
        flat[2 * ID :].view(self.D, self.I).copy_(parts["w2"])

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = buf.view(self.dtype)  # [3*I*D]
        ID = self.I * self.D
        return flat[: 2 * ID].view(2 * self.I, self.D), flat[2 * ID :].view(self.D, self.I)

    def forward(self, x: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w13, w2 = views
        a, b = F.linear(x, w13).chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
        return F.linear(F.silu(a) * b, w2)  # [T, D]


def register_host(t: torch.Tensor) -> int:
    """Pin the memory of the contiguous CPU tensor `t` for device copies, exactly its bytes, with
    `cudaHostRegister`; return them. torch's pinned allocator (`pin_memory=True`) would round each
    block up to a power of two: Mixtral's fp16 experts would pin 128 GiB instead of 84. The memory
    must stay allocated until `unregister_host(t)`: hold `t` (e.g. in a `weakref.finalize`)."""
    nbytes = t.numel() * t.element_size()
    cudart = torch.cuda.cudart()
    if cudart.cudaHostRegister(t.data_ptr(), nbytes, 0) != cudart.cudaError.success:
        raise UserError(f"cannot pin {nbytes / 2**20:.1f} MiB of RAM for the experts (cudaHostRegister failed): "
                        "lower the RAM budget (--ram-budget)")
    return nbytes


def unregister_host(t: torch.Tensor) -> None:
    """Undo `register_host(t)`; `t` may be freed afterwards."""
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class ExpertStore:
    """All experts of a model in host RAM, [L] x [E, bytes]: one exact allocation of L * E * bytes,
    registered (pinned) with `register_host` when a CUDA device will read it, unregistered when the
    store is collected or closed. `pinned_bytes` says how much it pinned."""

    def __init__(self, checkpoint: Checkpoint, fmt: ExpertFormat, pin: bool = False, progress: bool = True,
                 pack_device: torch.device | None = None):
        c = checkpoint.config
        self.fmt = fmt
        self.nbytes = fmt.nbytes
        # one row per layer with experts (dense layers have none)
        self._mem = torch.empty((c.n_moe_layers, c.num_experts, fmt.nbytes), dtype=torch.uint8)  # [R, E, bytes]
        self.layers = list(self._mem.unbind(0))  # [R] x [E, bytes], views
        self.pinned_bytes = register_host(self._mem) if pin else 0
        self._finalizer = weakref.finalize(self, unregister_host, self._mem) if pin else None
        if checkpoint.layout == "packed":  # the bytes are ready: read them in, checking checksums
            from .packed import load_packed_experts

            load_packed_experts(checkpoint.path, checkpoint.packed_index, c, fmt, self.layers, progress)
            return
        bar = _Progress("experts", c.n_moe_layers * c.num_experts * fmt.nbytes, enabled=progress)
        for layer, buf in zip(c.moe_layers, self.layers, strict=True):
            for e in range(c.num_experts):
                fmt.pack(expert_parts(checkpoint, layer, e, fmt, pack_device), buf[e])
                bar.advance(fmt.nbytes)
        bar.close()

    in_ram = True  # every expert is in RAM: a layer's buffers can serve as its slots on the CPU

    @property
    def num_experts(self) -> int:
        return self.layers[0].shape[0]

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self.layers[layer][expert]

    def done(self, layer: int, expert: int, event=None) -> None:
        """Nothing to release: these buffers are never rewritten (the tiered store's are)."""

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Nothing to read ahead: every expert is already in RAM."""

    @property
    def total_bytes(self) -> int:
        return sum(b.numel() for b in self.layers)

    def close(self) -> None:
        """Unpin the experts now (otherwise when the store is collected)."""
        if self._finalizer is not None:
            self._finalizer()


def expert_parts(checkpoint: Checkpoint, layer: int, expert: int, fmt: ExpertFormat,
                 pack_device: torch.device | None) -> dict[str, torch.Tensor]:
    """One expert's weights, moved to `pack_device` when quantizing: a GPU quantizes a Mixtral
    expert in milliseconds, a CPU in seconds. The packed bytes still land in host RAM."""
    parts = checkpoint.expert(layer, expert)
    if pack_device is None or isinstance(fmt, DenseFormat):
        return parts
    return {k: v.to(pack_device) for k, v in parts.items()}


class _Progress:
    """A one-line progress bar on stderr, for loads above 256 MB when stderr is a terminal."""

    def __init__(self, what: str, total: int, enabled: bool = True):
        self.what, self.total, self.done = what, total, 0
        self.on = enabled and total > 256 * 2**20 and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.on and (now - self.last > 0.2 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9) / 2**20
            pct = 100 * self.done / self.total
            print(f"\rloading {self.what}: {pct:5.1f}% {self.done / 2**30:6.2f} GiB {rate:7.0f} MiB/s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.on:
            print(file=sys.stderr)
