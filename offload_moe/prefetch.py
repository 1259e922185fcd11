"""Moving expert bytes to the device, and guessing which experts the next layers will want.

Stream and event rules (CUDA). There are two streams: the compute stream (torch's current
stream) and one side stream for host-to-device expert copies. Each slot owns two events,
created once:
  ready[l][s]  recorded on the side stream right after the copy into slot s of layer l.
  free[l][s]   recorded on the compute stream right after the last kernel that reads slot s
               has been enqueued (`mark_free`).
  1. A copy into a slot first makes the side stream wait for that slot's `free` event, so it
     never overwrites weights that a queued kernel is still going to read.
  2. Before compute reads a slot whose copy may be in flight, the compute stream waits for the
     slot's `ready` event (`wait_ready`). If the copy has not finished, the host also waits on
     it, and that time is counted as compute stalled on a copy (`copy_wait_s`). Experts that
     are already resident are computed first, so the wait falls where it hides the most.
  3. A copy's source is a pinned host buffer. The all-in-RAM store never rewrites one; the tiered
     store (RAM cache over storage) gets the slot's `ready` event with `done()` and does not
     reuse that RAM buffer before the event has completed.
  4. Nothing else synchronises. The per-layer `.tolist()` of router choices (in `model.py`) is
     the one sync of the decode step: residency is decided on the host.
On a CPU device there is no side stream: copies run inline, in the same order, so the results
are identical to the CUDA path and to a run without prefetch.

Prediction (`Prefetcher`): while layer l runs, the routers of layers l+1 .. l+N are applied to
the hidden state entering layer l (after each target layer's own ffn norm). For one token the
top-k experts of each target layer are prefetched; for a prompt, the experts chosen by the most
tokens, up to that layer's slot count.

Legend: T tokens, D dim, E experts, K top-k, N prefetch depth.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch


class Transfers:
    """Host-to-device copies of whole experts, with per-slot events on CUDA."""

    def __init__(self, device: torch.device, slots: Sequence[int]):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.ready = [[torch.cuda.Event() for _ in range(n)] for n in slots]
            self.free = [[torch.cuda.Event() for _ in range(n)] for n in slots]
            self.in_flight = [[False] * n for n in slots]

    def copy(self, dst: torch.Tensor, src: torch.Tensor, layer: int, slot: int) -> torch.cuda.Event | None:
        """Copy one expert into a slot; return the event after which `src` may be reused (None: now)."""
        if not self.cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[layer][slot])  # rule 1
            dst.copy_(src, non_blocking=True)
            self.ready[layer][slot].record(self.stream)
        self.in_flight[layer][slot] = True
        return self.ready[layer][slot]

    def wait_ready(self, layer: int, slot: int) -> float:
        """Order compute after the slot's copy (rule 2); return host seconds spent waiting."""
        if not self.cuda or not self.in_flight[layer][slot]:
            return 0.0
        ev = self.ready[layer][slot]
        waited = 0.0
        if not ev.query():
            t0 = time.perf_counter()
            ev.synchronize()  # SYNC: compute needs this expert and its copy is still in flight
            waited = time.perf_counter() - t0
        torch.cuda.current_stream().wait_event(ev)
        self.in_flight[layer][slot] = False
        return waited

    def mark_free(self, layer: int, slot: int) -> None:
        if self.cuda:
            self.free[layer][slot].record(torch.cuda.current_stream())

    def synchronize(self) -> None:
        if self.cuda:
            self.stream.synchronize()  # SYNC: end of load/warm-up, not on the decode path


class Prefetcher:
    """Speculative prefetch: apply the next N layers' routers to the current hidden state."""

    def __init__(self, model, cache, depth: int):
        self.model, self.cache, self.depth = model, cache, depth

    def __call__(self, layer: int, h: torch.Tensor) -> None:
        """`h` [T, D] is the hidden state entering `layer`; prefetch for layers after it."""
        targets = range(layer + 1, min(layer + 1 + self.depth, self.model.config.n_layers))
        if self.depth == 0 or not targets:
            return
        K = self.model.config.top_k
        T = h.shape[0]
        store = self.cache.store
        # storage reads (tiered store only) run one layer ahead of the copies
        deeper = not store.in_ram and targets.stop < self.model.config.n_layers
        layers = range(targets.start, targets.stop + 1) if deeper else targets
        picks = [self.model.predict(j, h) for j in layers]  # N(+1) x [T, K]
        if T == 1:
            chosen = torch.stack(picks).view(len(picks), K).tolist()  # SYNC: prediction to host, [N, K]
            for j, experts in zip(layers, chosen, strict=True):
                store.prefetch(j, experts)  # non-blocking reads from storage (a no-op when all is in RAM)
            for j, experts in zip(targets, chosen, strict=False):
                self.cache.prefetch(j, experts)
            return
        E = self.model.config.num_experts
        counts = torch.stack([torch.bincount(p.view(-1), minlength=E) for p in picks])  # [N, E]
        order = counts.argsort(dim=-1, descending=True, stable=True).tolist()  # SYNC: prediction to host
        used = (counts > 0).sum(-1).tolist()
        for j, ranked, n in zip(targets, order, used, strict=False):
            self.cache.prefetch(j, ranked[: min(n, self.cache.slots[j])])
