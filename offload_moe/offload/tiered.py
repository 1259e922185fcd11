"""Three-tier expert store: device cache <- host RAM cache <- storage (NVMe), for models whose
experts do not fit in RAM.

`TieredStore` has the interface the device cache uses on `ExpertStore` (`buffer`, `done`,
`prefetch`, `num_experts`, `in_ram`), so it can be swapped in.

Tiers
  device   `cache.ExpertCache` slots, filled from `buffer(row, expert)`.
  RAM      `ram_slots` expert slots, allocated once as one `[ram_slots, stride]` uint8 tensor
           (stride = the expert's bytes rounded up to 4096, the tensor started on a 4096
           boundary), pinned with `cudaHostRegister` when `pin`. Replacement is LRU over the
           slots. At construction the slots are filled with the first experts in (row, expert)
           order, so the first tokens do not all come from storage (`progress` shows that load).
  storage  a source (`weights/sources.py`): a packed folder's `experts.bin`, or any other checkpoint layout.

Reads come from a source (`weights/sources.py`: a packed folder's experts.bin with O_DIRECT, or a
checkpoint's tensors packed on the fly), which also keeps the page-cache rule there: storage
reads must not leave the model in the page cache.

Slot reuse rule (who waits for what)
  - `buffer()` hands a slot out and counts a user; the slot is not reused until `done()`.
  - `done(row, expert, event)` gets the CUDA event recorded after the device copy out of the
    slot; the slot is not reused until `event.query()` reports it complete. (The device cache
    passes a slot's `ready` event, which it records again for later copies on the same in-order
    stream: a later completion implies ours, so the test only errs on the side of waiting.)
  - A slot being filled by storage is never evicted.
  - `prefetch()` only takes slots that are free now: it never waits and never evicts an entry
    in use, in flight to the device, or being read.
  - A blocking `buffer()` miss takes the least recently used free slot. If none is free it
    synchronizes with the device copy out of the least recently used slot not in use (the one
    place this module syncs with the device); if every slot is in use or being read it waits
    for a read to finish (and takes that slot, losing the prefetch); if every slot is in use it
    raises `UserError` (the engine holds one buffer at a time, so one slot is enough).
  Worker threads only fill slots they were given; the table is changed under one lock. A failed
  worker read is kept and raised as `UserError` by the next `buffer()` of that expert.

Memory: the RAM budget covers the slots (`ram_slots * stride`) and 4 KiB of alignment; there are
no staging buffers. Resident memory stays within the budget plus the process's baseline before
the store was made (Python, torch, the checkpoint's dense weights) plus a few MB of thread
stacks and bookkeeping; `tests/test_tiered.py` measures it (packed, 64 MiB budget: RSS grew
63.2 MiB, 2.4 MiB more than the slots; it allows 16 MiB).
Memory-mapped checkpoints add the expert being packed (its raw bytes, mapped until the read
ends) and the pages left mapped named above. On CUDA the slots are pinned by registering them, not
through torch's pinned allocator, which rounds each allocation up to a power of two (up to
twice the budget).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..formats.base import ExpertFormat
from ..progress import progress_bar
from ..weights.packed import ALIGN, aligned
from .store import register_host, unregister_host

Key = tuple[int, int]  # (row, expert)

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class TierCounters:
    """Raw counts since construction or `reset_counters` (the construction fill is not counted)."""

    bytes_read: int = 0  # from storage
    read_wait_s: float = 0.0  # time `buffer` blocked on storage (or on a busy RAM tier)
    ram_hits: int = 0
    ram_misses: int = 0  # includes prefetch_late
    prefetch_reads: int = 0  # storage reads started by `prefetch` that completed
    prefetch_late: int = 0  # misses that found their prefetch still reading (part of the wait hidden)


class _Slot:
    """One RAM slot: which expert it holds, whether storage is filling it, who still reads it."""

    __slots__ = ("key", "reading", "users", "event")

    def __init__(self) -> None:
        self.key: Key | None = None
        self.reading = False
        self.users = 0
        self.event = None  # torch.cuda.Event of the last device copy out of this slot


def ram_tier_layout(ram_budget: int, nbytes: int, count: int) -> tuple[int, int]:
    """(RAM slots, stride) of a tiered store with this budget, for `count` experts of `nbytes` each:
    the stride is nbytes rounded up to 4096, the slots as many as the budget holds after 4096 bytes of
    alignment (at most `count`; 0 when none fits). The store allocates, and pins on CUDA, exactly
    slots * stride + ALIGN bytes (`ram_tier_allocation`)."""
    stride = aligned(nbytes)
    return max(0, min((ram_budget - ALIGN) // stride, count)), stride


def ram_tier_allocation(ram_budget: int, nbytes: int, count: int) -> int:
    """The bytes a tiered store with this budget allocates (and registers when pinned)."""
    slots, stride = ram_tier_layout(ram_budget, nbytes, count)
    return slots * stride + ALIGN


def _release(pool: ThreadPoolExecutor, source, pinned: torch.Tensor | None) -> None:
    """Finalizer: stop the readers, close files, unpin the slots (it holds them until unpinned)."""
    pool.shutdown(wait=True)
    source.close()
    if pinned is not None:
        unregister_host(pinned)


class TieredStore:
    """Experts in a bounded RAM cache over storage; see the module docstring for the rules."""

    in_ram = False  # RAM holds only some experts: the device cache must never alias these buffers

    def __init__(self, config: ModelConfig, fmt: ExpertFormat, source, ram_budget: int, pin: bool = False,
                 threads: int = 4, progress: bool = True):
        """`source` (`weights.sources.open_source`) reads an expert from storage into a RAM slot; the store
        owns it from here on and closes it (also when this constructor fails)."""
        try:
            self._setup(config, fmt, source, ram_budget, pin, threads)
        except BaseException:
            source.close()
            raise
        try:
            self._fill(progress)
        except BaseException:
            self.close()
            raise
        self.reset_counters()

    def _setup(self, c: ModelConfig, fmt: ExpertFormat, source, ram_budget: int, pin: bool, threads: int) -> None:
        self.fmt, self.nbytes = fmt, fmt.nbytes
        self.num_layers, self.num_experts = c.n_moe_layers, c.num_experts  # rows: the layers with experts
        self.total_bytes = c.n_moe_layers * c.num_experts * fmt.nbytes
        if threads < 1:
            raise UserError(f"the tiered store needs at least 1 reader thread, got {threads}")
        self.ram_slots, self.stride = ram_tier_layout(int(ram_budget), fmt.nbytes, c.n_moe_layers * c.num_experts)
        if self.ram_slots < 1:
            raise UserError(f"a RAM budget of {ram_budget} bytes ({_mib(ram_budget)}) holds no expert: one RAM "
                            f"slot takes {self.stride} bytes plus {ALIGN} for alignment (no staging buffers), "
                            f"so the budget must be at least {self.stride + ALIGN} bytes")
        if pin and not torch.cuda.is_available():
            raise UserError("pinned RAM slots need CUDA; pass pin=False on a machine without it")
        self.ram_bytes = self.ram_slots * self.stride
        self._source = source
        self.direct = source.direct

        raw = torch.empty(self.ram_bytes + ALIGN, dtype=torch.uint8)
        start = -raw.data_ptr() % ALIGN
        self._ram = raw[start : start + self.ram_bytes].view(self.ram_slots, self.stride)  # [slots, stride]
        self._buffers = [self._ram[i, : self.nbytes] for i in range(self.ram_slots)]
        self.pinned_bytes = 0  # registered with cudaHostRegister: the slots and the alignment, exactly
        if pin:
            self.pinned_bytes = register_host(raw)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiered-read")
        self._finalizer = weakref.finalize(self, _release, self._pool, self._source, raw if pin else None)

        self._cond = threading.Condition()  # guards everything below and the counters
        self._slots = [_Slot() for _ in range(self.ram_slots)]
        self._where: dict[Key, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.ram_slots))  # least recent first
        self._errors: dict[Key, UserError] = {}
        self.counters = TierCounters()

    def _fill(self, progress: bool) -> None:
        """Read the first `ram_slots` experts in (row, expert) order, in parallel; raise the first failure."""
        keys = [(row, e) for row in range(self.num_layers) for e in range(self.num_experts)][: self.ram_slots]
        with self._cond:
            futures = [self._pool.submit(self._read, self._claim(key), key, False) for key in keys]
        with progress_bar(what="loading experts into RAM", total=len(keys) * self.nbytes, unit="B",
                          enabled=progress) as bar:
            for future in as_completed(futures):
                future.result()
                bar.update(self.nbytes)
        with self._cond:
            if self._errors:
                raise next(iter(self._errors.values()))

    def reset_counters(self) -> None:
        with self._cond:
            self.counters = TierCounters()

    def buffer(self, row: int, expert: int) -> torch.Tensor:
        """The expert's bytes (uint8 [nbytes] in RAM), read from storage first on a miss (blocking).

        Valid until the matching `done(row, expert, event)`; a slot is never reused before that.
        """
        key = (row, expert)
        t0 = time.perf_counter()
        missed = False
        while True:
            event, claimed = None, None
            with self._cond:
                if key in self._errors:
                    raise self._errors.pop(key)
                i = self._where.get(key)
                if i is not None and not self._slots[i].reading:
                    return self._hand_out(i, missed, t0)
                if not missed:
                    missed = True
                    self.counters.ram_misses += 1
                    self.counters.prefetch_late += int(i is not None)
                if i is not None:  # a worker is reading it
                    self._cond.wait()
                    continue
                claimed = self._claim(key)
                if claimed is None:
                    event = self._oldest_pending_event()
                    if event is None:
                        if not any(s.reading for s in self._slots):
                            raise UserError(f"all {self.ram_slots} RAM slots are held by buffer() calls without "
                                            f"done(); expert {key} has no room (raise the RAM budget)")
                        self._cond.wait()  # every free-able slot is being read: wait for a read to finish
                        continue
            if event is not None:
                event.synchronize()  # SYNC: every RAM slot is in use, being read, or a device copy's source
            else:
                self._read(claimed, key, False)  # in this thread; the next turn hands it out or raises

    def done(self, row: int, expert: int, event: torch.cuda.Event | None = None) -> None:
        """The caller is finished with `buffer(row, expert)`; with CUDA, once `event` has completed."""
        key = (row, expert)
        with self._cond:
            i = self._where.get(key)
            if i is None or self._slots[i].users == 0:
                raise RuntimeError(f"done{key} without a matching buffer{key}")
            slot = self._slots[i]
            slot.users -= 1
            if event is not None:
                slot.event = event

    def prefetch(self, row: int, experts: list[int]) -> None:
        """Start reading the listed experts into free RAM slots; never blocks, never evicts a busy slot."""
        with self._cond:
            for e in experts:
                key = (row, e)
                i = self._where.get(key)
                if i is not None:
                    if not self._slots[i].reading:
                        self._lru.move_to_end(i)  # wanted soon: keep it away from eviction
                    continue
                if key in self._errors:  # already failed: the next buffer() raises it
                    continue
                i = self._claim(key)
                if i is None:
                    return
                self._pool.submit(self._read, i, key, True)

    def wait_prefetches(self) -> None:
        """Block until no storage read is in flight (for tests, benchmarks and shutdown)."""
        with self._cond:
            self._cond.wait_for(lambda: not any(s.reading for s in self._slots))

    def close(self) -> None:
        """Finish the reads in flight, stop the reader threads, close files and unpin the RAM slots."""
        self._finalizer()

    # -- slot table (callers hold self._cond) ------------------------------------------------
    def _claim(self, key: Key) -> int | None:
        """Give `key` the least recently used free slot, marked as being read; None if none is free."""
        for i in self._lru:
            slot = self._slots[i]
            if slot.reading or slot.users:
                continue
            if slot.event is not None:
                if not slot.event.query():  # a device copy still reads this slot
                    continue
                slot.event = None
            if slot.key is not None:
                del self._where[slot.key]
            slot.key, slot.reading = key, True
            self._where[key] = i
            self._lru.move_to_end(i)
            return i
        return None

    def _oldest_pending_event(self):
        """The event of the least recently used slot that only waits for its device copy."""
        for i in self._lru:
            slot = self._slots[i]
            if not slot.reading and not slot.users and slot.event is not None:
                return slot.event
        return None

    def _hand_out(self, i: int, missed: bool, t0: float) -> torch.Tensor:
        self._slots[i].users += 1
        self._lru.move_to_end(i)
        if missed:
            self.counters.read_wait_s += time.perf_counter() - t0
        else:
            self.counters.ram_hits += 1
        return self._buffers[i]

    # -- storage reads (worker threads, or the caller on a blocking miss) ----------------------
    def _read(self, i: int, key: Key, prefetched: bool) -> None:
        """Fill slot i with `key`; on failure free the slot and keep the error for `buffer(key)`."""
        try:
            n = self._source.read(key, self._ram[i])
        except Exception as e:
            err = e if isinstance(e, UserError) else UserError(f"cannot read {self._source.describe(key)}: {e}")
            with self._cond:
                slot = self._slots[i]
                slot.key, slot.reading = None, False
                del self._where[key]
                self._lru.move_to_end(i, last=False)
                self._errors[key] = err
                self._cond.notify_all()
            return
        with self._cond:
            self._slots[i].reading = False
            self.counters.bytes_read += n
            self.counters.prefetch_reads += prefetched
            self._cond.notify_all()
