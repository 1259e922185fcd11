"""Where expert bytes come from: a checkpoint on storage, read one expert at a time into a buffer
that a store gives (`read(key, out)`, key = (row, expert), a row per layer with experts). The
stores (`expert_store.ExpertStore`, `tiered.TieredStore`) are given a source and know nothing of
checkpoints; `open_source` makes the right one for a checkpoint.

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
  tensors, memory-mapped by safetensors/torch (block-FP8 weights dequantized to float32 copies), and
  `fmt.pack` writes them into the slot. These
  reads run one at a time (see the page-cache rule); `convert` to a packed folder for speed.

Page-cache rule: storage reads must not leave the model in the page cache, where it would
quietly hold the RAM this store is budgeted to save (and make benchmarks measure RAM, not
storage). experts.bin is opened with O_DIRECT; where the filesystem refuses it (EINVAL at open
or at the first read, e.g. tmpfs) reads go through the page cache with readahead off
(`POSIX_FADV_RANDOM`: a read caches exactly its range, not the next expert's first megabytes)
and each read range is dropped with `posix_fadvise(DONTNEED)` right after. For memory-mapped
checkpoints `posix_fadvise` alone does nothing, because the kernel keeps pages that are mapped
(BENCHMARKS.md, "Figures that left the code"). So after packing, the pages lying
wholly inside the expert's tensors are unmapped with `madvise(MADV_DONTNEED)` (only inside a
private, file-backed mapping of that shard, found in /proc/self/maps, where a dropped page is
simply read again from the file), and then the shard's unmapped pages are dropped with
`posix_fadvise(DONTNEED)` over the whole file: faults on a mapping make the kernel read ahead
(read_ahead_kb) before and after the expert, and those pages are cached too. With one mapped
read at a time this cannot discard pages another read is about to use. Pages outside the
expert's tensors are never unmapped (a page someone wrote to in a private mapping would lose
the write), so some stay mapped and cached: the partial pages at each end, and neighbours that
the kernel's fault-around (64 KiB each side) mapped from what it had read ahead. A neighbour
inside another expert is unmapped when that expert is read, so what stays is bounded by those two
ends and neighbours per expert, not by the model's size. Off
Linux, mapped checkpoints keep their pages until the kernel reclaims them: convert to a packed
folder there.
`page_cache_bytes(path)` measures what a file has in the page cache.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
import zlib
from pathlib import Path

import torch

from ..errors import UserError
from ..formats.base import DenseFormat, ExpertFormat
from ..formats.ggml import GGUFFormat
from ..formats.mxfp4 import parts_for
from .checkpoint import Checkpoint
from .fp8 import report_error
from .packed import ALIGN, DATA, aligned

Key = tuple[int, int]  # (row, expert)

_LINUX = sys.platform.startswith("linux")
_FADVISE = hasattr(os, "posix_fadvise")  # not on macOS: there the page cache keeps what was read
_PAGE = mmap.PAGESIZE
if _LINUX:  # madvise on memory that Python did not map itself (torch/safetensors mmaps): through libc
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def open_source(checkpoint: Checkpoint, fmt: ExpertFormat, direct: bool = True, drop_pages: bool = True,
                pack_device: torch.device | None = None) -> PackedSource | MappedSource:
    """The source of `checkpoint`'s experts in `fmt`: its experts.bin when it is a packed folder
    (`direct`: O_DIRECT where the store's buffers are 4096-aligned), else its tensors packed on the
    fly (`drop_pages`, `pack_device`: see MappedSource)."""
    if checkpoint.layout == "packed":
        return PackedSource(checkpoint, fmt, direct)
    return MappedSource(checkpoint, fmt, drop_pages, pack_device)


class PackedSource:
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
        length = aligned(n) if self.direct else n
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


class MappedSource:
    """A checkpoint in a non-packed layout: each expert's raw tensors packed into its slot.

    One expert at a time: faults on the checkpoint's mapping trigger the kernel's readahead, which
    caches pages beyond the expert (read_ahead_kb around and after each fault). After each expert,
    the shard's unmapped cached pages are dropped as a whole, which with a single reader cannot
    throw away pages that another read is about to use.
    """

    def __init__(self, checkpoint: Checkpoint, fmt: ExpertFormat, drop_pages: bool = True,
                 pack_device: torch.device | None = None):
        """`drop_pages`: follow the page-cache rule (a store that keeps every expert in RAM does not
        need to); `pack_device`: quantize there (a GPU quantizes a Mixtral expert in milliseconds, a
        CPU in seconds; the packed bytes still land in the host buffer)."""
        self.checkpoint, self.fmt = checkpoint, fmt
        self.drop_pages = drop_pages and _LINUX
        self.pack_device = None if isinstance(fmt, DenseFormat) else pack_device
        self.lock = threading.Lock()
        self.fds: dict[str, int] = {}
        self.direct = False
        if checkpoint.fp8 is not None:  # every path that packs a checkpoint's experts (load, tiers, convert) is here
            report_error(checkpoint, fmt)

    def describe(self, key: Key) -> str:
        return f"{self.checkpoint.path}: expert {key}"

    def read(self, key: Key, slot: torch.Tensor) -> int:
        layer = self.checkpoint.config.moe_layers[key[0]]
        with self.lock:
            if isinstance(self.fmt, GGUFFormat):  # the file's bytes as they are
                raw = self.checkpoint.expert_raw(layer, key[1])
                self.fmt.pack(raw, slot[: self.fmt.nbytes])
                return sum(t.numel() for _, t in raw.values())
            parts = self.checkpoint.expert(layer, key[1])
            if self.pack_device is not None:
                self.fmt.pack(parts_for(self.fmt, {k: v.to(self.pack_device) for k, v in parts.items()}),
                              slot[: self.fmt.nbytes])
            else:
                self.fmt.pack(parts_for(self.fmt, parts), slot[: self.fmt.nbytes])
            if self.drop_pages:
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
