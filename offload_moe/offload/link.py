"""An emulated host-to-device link for a CPU device (`--link-gbs`): the `torch.cuda` calls that
`prefetch.Transfers` makes, backed by a worker thread, so the CUDA code path runs and its waits,
overlap and link time become measurable on any machine.

The link is one copy engine of `bytes_per_s`. Its schedule is kept in modelled wall time
(`time.perf_counter`) by whoever issues or drops a copy, under one lock:
  * two in-order streams: the demand stream's head is served before the prefetch stream's whenever
    it can start (its events have completed); otherwise the prefetch head is;
  * a copy lasts bytes / bytes_per_s, in chunks of at most `chunk_s`: a demand copy issued while a
    speculative one is on the link waits for the current chunk only, then passes it (the speculative
    copy resumes after the demand queue is empty: one buffer, one logical copy);
  * a copy starts once the events its stream waited for have completed (prefetch.py, rule 1);
  * a queued or started speculative copy may be dropped (`drop`): it leaves the link at once and its
    events complete then.
With `chunk_s` None it is a copy engine as CUDA's instead: a copy runs whole once started, none is dropped,
and the demand stream's head goes first only between copies; prefetch.Transfers then feeds it speculative
copies a chunk at a time (feeder.py), as on CUDA, so the feeder's rules are measured on any machine.
Each issue or drop commits the schedule up to now and projects it forward with the copies known,
giving every queued copy a start and an end; an event has completed when its copy's bytes have been
moved and its end has passed. The worker thread moves the bytes of each copy (one `copy_`) when the
schedule says it starts, in start order, and the host sleeps out the rest in `Event.synchronize`,
so how late the thread wakes (the GIL, a loaded machine) never slows the modelled link: it only
delays an event whose bytes have not moved yet. Compute on the CPU is synchronous with the host:
the compute stream's events complete when recorded, and its waits are host waits.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from contextlib import contextmanager

import torch

# link time of one chunk: how long a demand copy may wait behind a started speculative one (2.5 MB at PCIe 4.0's
# 25 GB/s; the schedule takes a step per copy, not per chunk, so a small one costs nothing)
CHUNK_S = 0.1e-3


class _Copy:
    """One copy on the link: its buffers, what it waits for, and its place in the schedule."""

    __slots__ = ("dst", "src", "after", "issued", "left", "start", "end", "started", "finished", "moved", "demand",
                 "passed")

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, after: list, issued: float, seconds: float,
                 demand: bool):
        self.dst, self.src, self.after, self.issued, self.demand = dst, src, after, issued, demand
        self.left = seconds  # link seconds not yet committed
        self.start = self.end = None  # committed, else projected (None: not yet projected)
        self.started = False  # its first chunk is committed
        self.finished = False  # its last chunk is committed (or it was dropped)
        self.moved = False  # its bytes have been copied (or never will be: dropped before starting)
        self.passed = False  # a speculative copy that a demand copy has passed


class LinkStream:
    """An in-order queue of copies on the link (the demand or the prefetch stream), or the compute stream."""

    def __init__(self, link: EmulatedLink | None, demand: bool):
        self.link, self.demand = link, demand
        self.queue: deque[_Copy] = deque()  # issued, not finished
        self.last: _Copy | None = None  # the latest copy issued on it
        self.after: list[_Copy] = []  # what the next copy waits for (`wait_event` since the last copy)

    def wait_event(self, ev: LinkEvent) -> None:
        if self.link is None:  # the compute stream: the host itself waits
            ev.synchronize()
        elif ev.copy is not None and not ev.copy.finished:
            self.after.append(ev.copy)

    def record_event(self, ev: LinkEvent) -> None:
        ev.copy = self.last if self.link is not None else None

    def synchronize(self) -> None:
        if self.last is not None:
            LinkEvent(self.link, self.last).synchronize()


class LinkEvent:
    """Completes when the copy it was last recorded after has completed (its bytes moved, its end passed)."""

    def __init__(self, link: EmulatedLink, copy: _Copy | None = None):
        self.link, self.copy = link, copy

    def record(self, stream: LinkStream) -> None:
        stream.record_event(self)

    def query(self) -> bool:
        c = self.copy
        self.link.check()
        return c is None or (c.moved and c.end is not None and time.perf_counter() >= c.end)

    def synchronize(self) -> None:
        c, link = self.copy, self.link
        if c is None:
            return
        with link.cond:
            while not c.moved:
                link.cond.wait()
        link.check()
        while (left := c.end - time.perf_counter()) > 0:  # the bytes are there: the rest of the modelled copy
            time.sleep(left)


class EmulatedLink:
    """The `torch.cuda` object of `Transfers` on a CPU device with an emulated link of `bytes_per_s`."""

    def __init__(self, bytes_per_s: float, chunk_s: float | None = CHUNK_S):
        """`chunk_s` None: a copy engine as CUDA's, which runs a copy whole once started and takes none back
        (`drop` refuses); the streams' heads are chosen between copies, demand first."""
        if not bytes_per_s > 0:
            raise ValueError(f"the link's speed must be above 0 bytes/s, got {bytes_per_s}")
        self.bytes_per_s, self.chunk_s = float(bytes_per_s), chunk_s
        self.takes_back = chunk_s is not None
        self.cond = threading.Condition()
        self.compute = LinkStream(None, demand=False)
        self.streams: list[LinkStream] = []  # demand first: the order the link serves them in
        self.t = time.perf_counter()  # the schedule is committed up to here (a chunk may end after now)
        self.pending: list[_Copy] = []  # copies whose bytes the worker has still to move
        self.busy_s = 0.0  # link seconds committed since `reset_counts`
        self.preempted = 0  # speculative copies that a demand copy passed, each counted once
        self._closed = False
        self.error: Exception | None = None  # a copy the worker failed, raised by the next wait (`check`)
        self._worker = threading.Thread(target=self._move, name="emulated-link", daemon=True)
        self._worker.start()

    # -- the torch.cuda calls Transfers makes -----------------------------------------------------
    def Stream(self, device=None, priority: int = 0) -> LinkStream:  # noqa: N802 (torch.cuda's name)
        s = LinkStream(self, demand=priority < 0)
        self.streams.append(s)
        self.streams.sort(key=lambda x: not x.demand)
        return s

    def Event(self) -> LinkEvent:  # noqa: N802
        return LinkEvent(self)

    def current_stream(self, device=None) -> LinkStream:
        return self.compute

    @contextmanager
    def stream(self, s: LinkStream):
        yield  # a copy names its stream (`copy`); stream waits and records name theirs

    # -- copies -------------------------------------------------------------------------------------
    def copy(self, stream: LinkStream, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Issue dst.copy_(src) on `stream` after the events it waited for; it takes bytes / bytes_per_s."""
        nbytes = dst.numel() * dst.element_size()
        with self.cond:
            now = time.perf_counter()
            self._commit(now)
            c = _Copy(dst, src, stream.after, now, nbytes / self.bytes_per_s, stream.demand)
            stream.after = []
            if stream.demand:
                for queued in self._prefetch_queue():
                    self.preempted += not queued.passed
                    queued.passed = True
            stream.queue.append(c)
            stream.last = c
            self.pending.append(c)
            self._project()
            self.cond.notify_all()

    def drop(self, ev: LinkEvent) -> bool:
        """Drop the speculative copy `ev` was recorded after, if it has not finished: it leaves the link now,
        its events complete (its bytes moved or never moved). Returns whether it was dropped."""
        c = ev.copy
        with self.cond:
            now = time.perf_counter()
            self._commit(now)
            if c is None or c.finished or c.demand or not self.takes_back:
                return False
            for s in self.streams:
                if c in s.queue:
                    s.queue.remove(c)
            c.finished, c.end, c.left = True, now, 0.0
            if c in self.pending:  # not started: nothing will move
                self.pending.remove(c)
                c.moved = True
            self._project()
            self.cond.notify_all()
            return True

    def seconds(self, nbytes: int) -> float:
        """Link time of a copy of `nbytes`."""
        return nbytes / self.bytes_per_s

    def backlog_s(self, demand: bool = False) -> float:
        """Link seconds ahead of a copy issued now: the chunk on the link, then the demand queue's copies, and
        for a speculative copy (`demand` False) the prefetch queue's too."""
        with self.cond:
            now = time.perf_counter()
            self._commit(now)
            ahead = max(self.t - now, 0.0)
            for s in self.streams:
                if s.demand or not demand:
                    ahead += sum(c.left for c in s.queue)
            return ahead

    def reset_counts(self) -> None:
        with self.cond:
            self._commit(time.perf_counter())
            self.busy_s, self.preempted = 0.0, 0

    def busy_until_now(self) -> float:
        """Link seconds committed since `reset_counts`, the schedule committed up to now."""
        with self.cond:
            self._commit(time.perf_counter())
            return self.busy_s

    def check(self) -> None:
        """Raise a copy the worker failed (as CUDA reports a failed copy at the next sync)."""
        if self.error is not None:
            raise RuntimeError(f"the emulated link failed a copy: {self.error}") from self.error

    def close(self) -> None:
        with self.cond:
            self._closed = True
            self.cond.notify_all()

    # -- the schedule (under the lock) --------------------------------------------------------------
    def _prefetch_queue(self):
        return (c for s in self.streams if not s.demand for c in s.queue)

    def _commit(self, until: float) -> None:
        """Commit the schedule's chunks that start before `until` (the last may end after it)."""
        self.t = self._serve(self.t, until, commit=True)

    def _project(self) -> None:
        """Project every queued copy's start and end, as if no other copy came."""
        self._serve(self.t, float("inf"), commit=False)

    def _serve(self, t: float, until: float, commit: bool) -> float:
        """Run the link from t: at each chunk, the first stream (demand first) whose head can start by then;
        when none can, the earliest that can start later. Committing, the chunks are the link's and the
        finished copies leave their queues; else starts and ends are projected. Returns where it stopped."""
        queues = [s.queue for s in self.streams]
        at = [0] * len(queues)  # projection: each queue's head, without popping
        left: dict[int, float] = {}  # projection: the copies' seconds still to run
        done: set[int] = set()  # projection: the copies it finished
        while t < until:
            heads = [q[i] if i < len(q) else None for q, i in zip(queues, at, strict=True)]
            ready = [self._can_start(c, done) if c is not None else None for c in heads]
            k = next((k for k, r in enumerate(ready) if r is not None and r <= t), None)
            if k is None:
                later = [r for r in ready if r is not None]
                if not later:
                    return until if commit else t
                t = min(min(later), until) if commit else min(later)
                continue
            c = heads[k]
            remaining = c.left if commit else left.get(id(c), c.left)
            if not c.started and (commit or id(c) not in left):  # its first chunk
                c.start, c.started = t, commit
            first = [r for h, r in zip(heads[:k], ready[:k], strict=True) if h is not None]  # heads served before it
            step = self._run(t, remaining, first, until)
            t += step
            remaining -= step
            if commit:
                c.left = remaining
                self.busy_s += step
            else:
                left[id(c)] = remaining
            if remaining <= 1e-12:
                c.end = t
                if commit:
                    c.finished = True
                    queues[k].popleft()
                else:
                    done.add(id(c))
                    at[k] += 1
        return t

    def _run(self, t: float, remaining: float, before: list[float | None], until: float) -> float:
        """How long the copy chosen at t runs before the link chooses again: to its end, or to the first chunk
        boundary at or after `until` or the moment a stream served before it can start its head (`before`: when
        each such head can start; a demand copy then passes it). Whole chunks at a time, so the schedule costs a
        step per copy, not per chunk."""
        if self.chunk_s is None:  # a CUDA copy engine: to the copy's end
            return remaining
        stop = until
        for r in before:
            if r is None:  # a head waiting on a copy this pass has not placed: look again after each chunk
                return min(remaining, self.chunk_s)
            stop = min(stop, r)
        if stop >= t + remaining:
            return remaining
        return min(remaining, max(1, math.ceil((stop - t) / self.chunk_s)) * self.chunk_s)

    @staticmethod
    def _can_start(c: _Copy, done: set[int]) -> float | None:
        """When `c` can start (its issue, the ends of the copies it waits for), or None while one of those
        has no end yet in this pass."""
        start = c.issued
        for a in c.after:
            if not (a.finished or id(a) in done):
                return None
            start = max(start, a.end)
        return start

    # -- the worker ---------------------------------------------------------------------------------
    def _move(self) -> None:
        """Move each copy's bytes when its (projected) start comes, in start order."""
        cond = self.cond
        cond.acquire()
        try:
            while not self._closed:
                if not self.pending:
                    cond.wait()
                    continue
                c = min(self.pending, key=lambda x: x.start)
                wait = c.start - time.perf_counter()
                if wait > 0:
                    cond.wait(wait)  # woken early when the schedule changes
                    continue
                self.pending.remove(c)
                cond.release()
                try:
                    with torch.inference_mode():  # as the issuing thread's copy_ would run (a decode's views)
                        c.dst.copy_(c.src)
                except Exception as exc:  # kept for the host's next wait, which raises it: no wait hangs
                    self.error = exc
                finally:
                    cond.acquire()
                c.moved = True
                cond.notify_all()
        finally:
            cond.release()
