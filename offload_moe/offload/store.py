"""Host-side expert store: every expert of a model in RAM, each packed as one contiguous byte buffer
(see `formats/base.py`), filled from a source (`weights/sources.py`) and pinned exactly when a CUDA device reads it.

Legend: E experts, R rows (the layers with experts).
"""

from __future__ import annotations

import weakref

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..formats.base import ExpertFormat
from ..progress import progress_bar


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

    def __init__(self, config: ModelConfig, fmt: ExpertFormat, source, pin: bool = False, progress: bool = True):
        """`source` (`weights.sources.open_source`) reads each expert into its buffer; it is closed when done."""
        c = config
        self.fmt = fmt
        self.nbytes = fmt.nbytes
        # one row per layer with experts (dense layers have none)
        self._mem = torch.empty((c.n_moe_layers, c.num_experts, fmt.nbytes), dtype=torch.uint8)  # [R, E, bytes]
        self.layers = list(self._mem.unbind(0))  # [R] x [E, bytes], views
        self.pinned_bytes = register_host(self._mem) if pin else 0
        self._finalizer = weakref.finalize(self, unregister_host, self._mem) if pin else None
        try:
            with progress_bar(what="loading experts", total=c.n_moe_layers * c.num_experts * fmt.nbytes, unit="B",
                              enabled=progress) as bar:
                for row, buf in enumerate(self.layers):
                    for e in range(c.num_experts):
                        source.read((row, e), buf[e])
                        bar.update(fmt.nbytes)
        finally:
            source.close()

    in_ram = True  # every expert is in RAM: a layer's buffers can serve as its slots on the CPU

    @property
    def num_experts(self) -> int:
        return self.layers[0].shape[0]

    def buffer(self, row: int, expert: int) -> torch.Tensor:
        return self.layers[row][expert]

    def done(self, row: int, expert: int, event=None) -> None:
        """Nothing to release: these buffers are never rewritten (the tiered store's are)."""

    def prefetch(self, row: int, experts: list[int]) -> None:
        """Nothing to read ahead: every expert is already in RAM."""

    @property
    def total_bytes(self) -> int:
        return sum(b.numel() for b in self.layers)

    def close(self) -> None:
        """Unpin the experts now (otherwise when the store is collected)."""
        if self._finalizer is not None:
            self._finalizer()
