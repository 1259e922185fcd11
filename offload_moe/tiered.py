"""Three-tier expert store: device cache <- host RAM cache <- storage (NVMe), for models whose
experts do not fit in RAM.

`TieredStore` has the interface the device cache uses on `ExpertStore` (`buffer`, `done`,
`prefetch`, `num_experts`, `in_ram`), so it can be swapped in.

Tiers
  device   `cache.ExpertCache` slots, filled from `buffer(layer, expert)`.
  RAM      `ram_slots` expert slots, allocated once as one `[ram_slots, stride]` uint8 tensor
           (stride = the expert's bytes rounded up to 4096, the tensor started on a 4096
           boundary), pinned with `cudaHostRegister` when `pin`. Replacement is LRU over the
           slots. At construction the slots are filled with the first experts in (layer, expert)
           order, so the first tokens do not all come from storage (`progress` shows that load).
  storage  a packed folder's `experts.bin` (see packed.py), or any other checkpoint layout.

Read path
  Packed folder: a worker (or, on a blocking miss, the caller) reads the expert with `os.preadv`
  straight into its RAM slot: the slots are 4096-aligned and their stride is a multiple of 4096,
  and experts.bin places each expert at a 4096-aligned offset with its padding written, so every
  read qualifies for O_DIRECT as is and needs no staging buffer or second copy. The crc32 in the
  index is checked on the first read of each expert; a mismatch is a `UserError` naming the
  expert and its byte range, and the slot is freed, never handed out. Rereads of an expert that
  passed are not checked again (the file does not change under a running engine, and zlib's
  ~2.5 GB/s on one core would otherwise cap a blocking miss below NVMe speed).
  Other layouts (Hugging Face safetensors, original .pt): `checkpoint.expert()` gives the raw
  tensors, memory-mapped by safetensors/torch, and `fmt.pack` writes them into the slot. These
  reads run one at a time (see the page-cache rule); `convert` to a packed folder for speed.

Page-cache rule: storage reads must not leave the model in the page cache, where it would
quietly hold the RAM this store is budgeted to save (and make benchmarks measure RAM, not
storage). experts.bin is opened with O_DIRECT; where the filesystem refuses it (EINVAL at open
or at the first read, e.g. tmpfs) reads go through the page cache with readahead off
(`POSIX_FADV_RANDOM`: a read caches exactly its range, not the next expert's first megabytes)
and each read range is dropped with `posix_fadvise(DONTNEED)` right after. For memory-mapped
checkpoints `posix_fadvise` alone does nothing, because the kernel keeps pages that are mapped
(measured: the whole model stayed cached and counted in RSS). So after packing, the pages lying
wholly inside the expert's tensors are unmapped with `madvise(MADV_DONTNEED)` (only inside a
private, file-backed mapping of that shard, found in /proc/self/maps, where a dropped page is
simply read again from the file), and then the shard's unmapped pages are dropped with
`posix_fadvise(DONTNEED)` over the whole file: faults on a mapping make the kernel read ahead
(read_ahead_kb) before and after the expert, and those pages are cached too. With one mapped
read at a time this cannot discard pages another read is about to use. Pages outside the
expert's tensors are never unmapped (a page someone wrote to in a private mapping would lose
the write), so some stay mapped and cached: the partial pages at each end, and neighbours that
the kernel's fault-around (64 KiB each side) mapped from what it had read ahead. A neighbour
inside another expert is unmapped when that expert is read, so this stays below ~400 KiB per
expert (measured: 4 MiB after reading a 216 MiB model, 26 MiB after 672 MiB in 4 shards). Off
Linux, mapped checkpoints keep their pages until the kernel reclaims them: convert to a packed
folder there.
`page_cache_bytes(path)` measures what a file has in the page cache.

Slot reuse rule (who waits for what)
  - `buffer()` hands a slot out and counts a user; the slot is not reused until `done()`.
  - `done(layer, expert, event)` gets the CUDA event recorded after the device copy out of the
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

import ctypes
import errno
import mmap
import os
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import UserError
from .expert_store import ExpertFormat, _Progress, register_host, unregister_host
from .packed import ALIGN, DATA

Key = tuple[int, int]  # (layer, expert)

_LINUX = sys.platform.startswith("linux")
_FADVISE = hasattr(os, "posix_fadvise")  # not on macOS: there the page cache keeps what was read
_PAGE = mmap.PAGESIZE
if _LINUX:  # madvise on memory that Python did not map itself (torch/safetensors mmaps): through libc
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


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


class _PackedSource:
    """experts.bin of a packed folder, read with O_DIRECT where the filesystem allows it."""

    def __init__(self, checkpoint: Checkpoint, fmt: ExpertFormat, direct: bool):
        index = checkpoint.packed_index
        if index["format"] != fmt.name or index["bytes_per_expert"] != fmt.nbytes:
            raise UserError(f"{checkpoint.path}: experts were packed as {index['format']}; this run wants "
                            f"{fmt.name} (pass the matching --dtype/--expert-quant, or convert again)")
        self.path = checkpoint.path / DATA
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"{self.path} is missing: convert the model again") from None
        self.entries: dict[Key, tuple[int, int, int]] = {}  # (row, expert) -> where
        row_of = checkpoint.config.row_of
        for layer, e, offset, n, crc in index["experts"]:
            if offset + n > size:
                raise UserError(f"{self.path} is truncated: expert ({layer}, {e}) ends at byte {offset + n}, "
                                f"the file has {size}")
            self.entries[(row_of[layer], e)] = (offset, n, crc)
        self.verified: set[Key] = set()
        aligned = all(offset % ALIGN == 0 for offset, _, _ in self.entries.values())
        self.fd, self.direct = self._open(direct and aligned and hasattr(os, "O_DIRECT"))

    def _open(self, direct: bool) -> tuple[int, bool]:
        """Open with O_DIRECT if asked and the filesystem takes it (tried on a real read), else buffered."""
        if direct:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise UserError(f"cannot open {self.path}: {e.strerror}") from None
            else:
                probe = mmap.mmap(-1, ALIGN)  # page-aligned
                try:
                    os.preadv(fd, [probe], min(offset for offset, _, _ in self.entries.values()))
                    return fd, True
                except OSError as e:
                    os.close(fd)
                    if e.errno != errno.EINVAL:
                        raise UserError(f"cannot read {self.path}: {e.strerror}") from None
                finally:
                    probe.close()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"cannot open {self.path}: {e.strerror}") from None
        if _FADVISE:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # read exactly the expert: no readahead past it
        return fd, False

    def describe(self, key: Key) -> str:
        offset, n, _ = self.entries[key]
        return f"{self.path}: expert {key} (bytes {offset}..{offset + n})"

    def read(self, key: Key, slot: torch.Tensor) -> int:
        """Fill `slot` (uint8 [stride], 4096-aligned) with the expert's bytes; return bytes read."""
        offset, n, crc = self.entries[key]
        length = _aligned(n) if self.direct else n
        view = memoryview(slot.numpy())[:length]
        got = 0
        while got < n:
            r = os.preadv(self.fd, [view[got:]], offset + got)
            if r == 0:
                break
            got += r
        if got < n:
            raise UserError(f"{self.describe(key)}: the file ends after {got} of its bytes (truncated?)")
        if not self.direct and _FADVISE:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        if key not in self.verified:
            if zlib.crc32(view[:n]) != crc:
                raise UserError(f"{self.describe(key)} fails its checksum: the file is damaged; convert again")
            self.verified.add(key)
        return n

    def close(self) -> None:
        os.close(self.fd)
        self.fd = -1  # a read after close fails (EBADF) rather than read a file that reused the number


class _MappedSource:
    """A checkpoint in a non-packed layout: each expert's raw tensors packed into its slot.

    One expert at a time: faults on the checkpoint's mapping trigger the kernel's readahead, which
    caches pages beyond the expert (read_ahead_kb around and after each fault). After each expert,
    the shard's unmapped cached pages are dropped as a whole, which with a single reader cannot
    throw away pages that another read is about to use.
    """

    def __init__(self, checkpoint: Checkpoint, fmt: ExpertFormat):
        self.checkpoint, self.fmt = checkpoint, fmt
        self.lock = threading.Lock()
        self.fds: dict[str, int] = {}
        self.direct = False

    def describe(self, key: Key) -> str:
        return f"{self.checkpoint.path}: expert {key}"

    def read(self, key: Key, slot: torch.Tensor) -> int:
        layer = self.checkpoint.config.moe_layers[key[0]]
        with self.lock:
            parts = self.checkpoint.expert(layer, key[1])
            self.fmt.pack(parts, slot[: self.fmt.nbytes])
            if _LINUX:
                files = [str(self.checkpoint.expert_sources[(layer, key[1], part)][0].resolve()) for part in parts]
                self._drop_pages(list(zip(files, parts.values(), strict=True)))
        return sum(t.numel() * t.element_size() for t in parts.values())

    def _drop_pages(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Unmap the pages wholly inside these tensors, then drop the shards' unmapped pages from the cache."""
        for address, length in _mapped_spans(tensors):
            start = -(-address // _PAGE) * _PAGE
            end = (address + length) // _PAGE * _PAGE
            if end > start and _madvise(start, end - start, mmap.MADV_DONTNEED) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"madvise: {os.strerror(err)}")
        for path in {path for path, _ in tensors}:
            fd = self.fds.get(path)
            if fd is None:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _mapped_spans(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """(address, length) of each tensor that lies in a private mapping of its file.

    A tensor that is not memory-mapped (copied by its reader) is left out: it has no pages to unmap,
    and unmapping anonymous memory would zero it.
    """
    spans = []
    for path, t in tensors:
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        spans.append((path, t.data_ptr(), extent * t.element_size()))
    wanted = {path for path, _, _ in spans}
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) < 6 or fields[5] not in wanted or "p" not in fields[1]:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            found += [(address, length) for path, address, length in spans
                      if path == fields[5] and lo <= address and address + length <= hi]
    return found


def page_cache_bytes(path: str | Path) -> int:
    """How much of a file the page cache holds (Linux `mincore` over a fresh mapping, which reads
    nothing): how tests and benchmarks check the page-cache rule."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
        pages = (ctypes.c_ubyte * (-(-size // _PAGE)))()
        rc = libc.mincore(address, size, pages)
        err = ctypes.get_errno()
        libc.munmap(address, size)
    finally:
        os.close(fd)
    if rc != 0:
        raise OSError(err, f"mincore {path}: {os.strerror(err)}")
    return sum(p & 1 for p in pages) * _PAGE


def ram_tier_layout(ram_budget: int, nbytes: int, count: int) -> tuple[int, int]:
    """(RAM slots, stride) of a tiered store with this budget, for `count` experts of `nbytes` each:
    the stride is nbytes rounded up to 4096, the slots as many as the budget holds after 4096 bytes of
    alignment (at most `count`; 0 when none fits). The store allocates, and pins on CUDA, exactly
    slots * stride + ALIGN bytes (`ram_tier_allocation`)."""
    stride = _aligned(nbytes)
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

    def __init__(self, checkpoint: Checkpoint, fmt: ExpertFormat, ram_budget: int, pin: bool = False,
                 threads: int = 4, progress: bool = True, direct: bool = True):
        """`direct=False` turns O_DIRECT off (buffered reads + DONTNEED), to compare the two."""
        c = checkpoint.config
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
        if checkpoint.layout == "packed":
            self._source: _PackedSource | _MappedSource = _PackedSource(checkpoint, fmt, direct)
        else:
            self._source = _MappedSource(checkpoint, fmt)
        self.direct = self._source.direct

        raw = torch.empty(self.ram_bytes + ALIGN, dtype=torch.uint8)
        start = -raw.data_ptr() % ALIGN
        self._ram = raw[start : start + self.ram_bytes].view(self.ram_slots, self.stride)  # [slots, stride]
        self._buffers = [self._ram[i, : self.nbytes] for i in range(self.ram_slots)]
        self.pinned_bytes = 0  # registered with cudaHostRegister: the slots and the alignment, exactly
        if pin:
            try:
                self.pinned_bytes = register_host(raw)
            except BaseException:
                self._source.close()
                raise
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiered-read")
        self._finalizer = weakref.finalize(self, _release, self._pool, self._source, raw if pin else None)

        self._cond = threading.Condition()  # guards everything below and the counters
        self._slots = [_Slot() for _ in range(self.ram_slots)]
        self._where: dict[Key, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.ram_slots))  # least recent first
        self._errors: dict[Key, UserError] = {}
        self.counters = TierCounters()
        try:
            self._fill(progress)
        except BaseException:
            self.close()
            raise
        self.reset_counters()

    def _fill(self, progress: bool) -> None:
        """Read the first `ram_slots` experts in (layer, expert) order, in parallel; raise the first failure."""
        keys = [(layer, e) for layer in range(self.num_layers) for e in range(self.num_experts)][: self.ram_slots]
        bar = _Progress("experts into RAM", len(keys) * self.nbytes, enabled=progress)
        with self._cond:
            futures = [self._pool.submit(self._read, self._claim(key), key, False) for key in keys]
        for future in as_completed(futures):
            future.result()
            bar.advance(self.nbytes)
        bar.close()
        with self._cond:
            if self._errors:
                raise next(iter(self._errors.values()))

    def reset_counters(self) -> None:
        with self._cond:
            self.counters = TierCounters()

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's bytes (uint8 [nbytes] in RAM), read from storage first on a miss (blocking).

        Valid until the matching `done(layer, expert, event)`; a slot is never reused before that.
        """
        key = (layer, expert)
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

    def done(self, layer: int, expert: int, event: torch.cuda.Event | None = None) -> None:
        """The caller is finished with `buffer(layer, expert)`; with CUDA, once `event` has completed."""
        key = (layer, expert)
        with self._cond:
            i = self._where.get(key)
            if i is None or self._slots[i].users == 0:
                raise RuntimeError(f"done{key} without a matching buffer{key}")
            slot = self._slots[i]
            slot.users -= 1
            if event is not None:
                slot.event = event

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading the listed experts into free RAM slots; never blocks, never evicts a busy slot."""
        with self._cond:
            for e in experts:
                key = (layer, e)
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
