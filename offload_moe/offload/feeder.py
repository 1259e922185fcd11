"""Speculative copies fed to a CUDA copy engine a chunk at a time, so that demand copies pass them and
stale ones stop (prefetch.py, rules 7 and 8).

A CUDA stream cannot take back a copy once enqueued, and the copy engine runs what is enqueued: a
demand copy enqueued behind a queue of speculative copies (or beside one, on another engine) waits
for them or shares the link with them, and a speculative copy the routing then leaves unused still
lands. So the speculative copies are not enqueued whole. Each is a job (one per slot, allocated with
the slots): its bytes are enqueued on the prefetch stream a chunk at a time by `pump`, which the host
calls at every point where it meets the copies (an issue, a wait, the decode step's syncs:
prefetch.Transfers spins on them pumping while a job is queued). In flight go as many chunks as keep the
link busy until the host's next pump: `window` of them, or more where the host has recently been away
longer (the longest recent gap between two pumps with jobs queued, at the link's speed). Hence
  * a demand copy issued now waits behind the chunks in flight (about one gap of the host's), not behind
    every queued copy;
  * a dropped job (`cancel`) stops at once: its bytes not yet enqueued are never moved;
  * a job whose expert is needed now (`hurry`) has its remaining bytes enqueued at once on the
    demand stream, as one copy, after the chunks already enqueued;
  * the slot's `ready` event is recorded after each chunk, so rule 1 (the next copy into the slot
    waits for this one) holds for whatever was enqueued; `queued(key)` says the job is not done.
One buffer per expert and one logical copy per miss: chunks are views of the two buffers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence

import torch

from .link import CHUNK_S

WINDOW = 3  # chunks in flight at least
RING = 32  # chunks in flight at most (events allocated once)
GAP_S = 0.02  # the time over which the longest recent gap between two pumps is forgotten
CHUNK_BYTES = 2 << 20  # before the link's speed is known (`set_speed`)

Key = tuple[int, int]  # (pool, slot)


class _Job:
    __slots__ = ("dst", "src", "done", "queued", "passed")

    def __init__(self) -> None:
        self.dst = self.src = None
        self.done = 0  # bytes enqueued on the link so far
        self.queued = False
        self.passed = False  # a demand copy was issued while it waited


class Feeder:
    """The prefetch stream's copies, a chunk at a time, into the slots of pools of `slots` sizes."""

    def __init__(self, cuda, copy, stream, demand, slots: Sequence[int], window: int = WINDOW,
                 chunk_s: float = CHUNK_S):
        """`copy(stream, pool, slot, dst, src, wait)` enqueues one copy into a slot on a stream and records the slot's
        `ready` event behind it, after the slot's readers and its copy before where `wait` (Transfers' `_slot_copy`:
        CUDA's, or the emulated link's)."""
        self.cuda, self.copy, self.stream, self.demand = cuda, copy, stream, demand
        self.window, self.chunk_s, self.chunk_bytes = window, chunk_s, CHUNK_BYTES
        self.bytes_per_s = 0.0  # the link's speed (`set_speed`; 0: unknown, `window` chunks in flight)
        self.jobs = [[_Job() for _ in range(n)] for n in slots]
        self.queue: deque[Key] = deque()  # jobs with bytes not yet enqueued, oldest first
        self.flying: deque[tuple[object, int]] = deque()  # (event, bytes) of the chunks enqueued, not landed
        self.in_flight = 0  # their bytes
        self.ring = [cuda.Event() for _ in range(max(RING, window))]  # one per chunk in flight, reused
        self.next_event = 0
        self.gap_s = 0.0  # the longest recent time between two pumps while jobs were queued
        self._last: float | None = None  # the latest pump's time, if it left jobs queued
        self.enqueued_bytes = 0  # chunks enqueued, for tests
        self.preempted = 0  # jobs a demand copy passed, each counted once (stats' `prefetch_preempted`)

    def set_speed(self, bytes_per_s: float) -> None:
        """Chunks of `chunk_s` (`link.CHUNK_S`) at the link's speed."""
        self.bytes_per_s = bytes_per_s
        self.chunk_bytes = max(4096, int(self.chunk_s * bytes_per_s))

    def add(self, pool: int, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue a speculative copy of `src` into slot `slot` of `pool` (flat uint8 buffers), then pump."""
        job = self.jobs[pool][slot]
        assert not job.queued, "one copy per slot at a time: the cache drops or finishes the one before"
        job.dst, job.src = dst.view(-1).view(torch.uint8), src.view(-1).view(torch.uint8)  # byte views, no copy
        job.done, job.queued, job.passed = 0, True, False
        self.queue.append((pool, slot))
        self.pump()

    def passed(self) -> None:
        """A demand copy was just enqueued: it goes before every job's rest."""
        for pool, slot in self.queue:
            job = self.jobs[pool][slot]
            self.preempted += not job.passed
            job.passed = True

    def queued(self, pool: int, slot: int) -> bool:
        """Whether the copy into this slot still has bytes not enqueued."""
        return self.jobs[pool][slot].queued

    def flying_bytes(self) -> int:
        """The chunks enqueued and not landed (at most: some may be partly moved)."""
        self._retire()
        return self.in_flight

    def rest_bytes(self) -> int:
        """The queued jobs' bytes not yet enqueued."""
        return sum(self.jobs[p][s].dst.numel() - self.jobs[p][s].done for p, s in self.queue)

    def busy(self) -> bool:
        self._retire()
        return bool(self.queue or self.flying)

    def pump(self) -> None:
        """Enqueue chunks while those in flight would not keep the link busy until the host comes back: fewer
        than `window`, or less link time than the longest recent gap between two pumps with jobs queued (a host
        that computes between them, as on a CPU device, needs more in flight than one that spins in its syncs)."""
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            self.gap_s = max(dt, self.gap_s * math.exp(-dt / GAP_S))
        self._retire()
        limit = max(self.window * self.chunk_bytes, self.gap_s * self.bytes_per_s)
        while self.queue and len(self.flying) < len(self.ring) and self.in_flight < limit:
            pool, slot = self.queue[0]
            job = self.jobs[pool][slot]
            self._enqueue(job, pool, slot, min(job.done + self.chunk_bytes, job.dst.numel()), self.stream)
            if job.done == job.dst.numel():
                self.queue.popleft()
                job.queued = False
        self._last = now if self.queue else None

    def cancel(self, pool: int, slot: int) -> bool:
        """Stop the copy into this slot if it still has bytes not enqueued (what was enqueued lands; the
        slot's `ready` event covers it). Whether it was stopped."""
        return self._dequeue(pool, slot) is not None

    def hurry(self, pool: int, slot: int) -> None:
        """The slot's expert is needed now: enqueue the rest of its copy at once, on the demand stream."""
        job = self._dequeue(pool, slot)
        if job is not None:
            self._enqueue(job, pool, slot, job.dst.numel(), self.demand, chunk=False)

    def flush(self) -> None:
        """Enqueue every queued job's rest on the prefetch stream (before a stream sync)."""
        while self.queue:
            pool, slot = self.queue[0]
            job = self._dequeue(pool, slot)
            self._enqueue(job, pool, slot, job.dst.numel(), self.stream, chunk=False)

    def _dequeue(self, pool: int, slot: int) -> _Job | None:
        """Take the slot's job out of the queue: its rest goes now or never. None: it had nothing left to enqueue."""
        job = self.jobs[pool][slot]
        if not job.queued:
            return None
        self.queue.remove((pool, slot))
        job.queued = False
        return job

    def _enqueue(self, job: _Job, pool: int, slot: int, end: int, stream, chunk: bool = True) -> None:
        """Bytes [job.done, end) of the job's copy on `stream` (prefetch.py, rule 1 before its first bytes, or
        on a stream other than the chunks': the slot's readers and the copy before, the chunks included)."""
        wait = job.done == 0 or stream is not self.stream
        self.copy(stream, pool, slot, job.dst[job.done : end], job.src[job.done : end], wait)
        if chunk:
            ev = self.ring[self.next_event]
            self.next_event = (self.next_event + 1) % len(self.ring)
            ev.record(stream)
            self.flying.append((ev, end - job.done))
            self.in_flight += end - job.done
        self.enqueued_bytes += end - job.done
        job.done = end

    def _retire(self) -> None:
        """Forget the chunks that have landed (in order: one stream)."""
        while self.flying and self.flying[0][0].query():
            self.in_flight -= self.flying.popleft()[1]
