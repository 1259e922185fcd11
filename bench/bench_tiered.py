"""Tiered expert store (RAM cache over storage): storage read throughput and buffer() latency.

    python bench/bench_tiered.py [--dir DIR] [--budget-mib 175] [--threads 4] [--hf]

A random-weight Mixtral (hidden 512, FFN 1792, 8 layers, 8 experts, top-2, float32: 64 experts
of 10.5 MiB, 672 MiB) is written and converted to a packed folder (in DIR, reused when present;
a temporary folder otherwise), and read through a RAM budget of a quarter of that. Figures:
  blocking read    buffer() misses in a cyclic order (LRU over fewer slots than experts: every
                   access misses), read by the calling thread: MB/s and per-miss latency.
  prefetch read    prefetch() of batches of experts not in RAM, read by the thread pool.
  RAM hit          buffer()+done() of a resident expert.
for O_DIRECT reads and for buffered reads with DONTNEED (and, with --hf, for the safetensors
checkpoint that the packed folder came from). `measure_store(path, budget)` returns the figures
as a dict, for reuse by the decode comparison.

Keeping the page cache out: before each measurement experts.bin is fsynced and dropped from the
page cache (posix_fadvise DONTNEED), the store reads with O_DIRECT (or drops each range after
reading), and mincore reports what the file has in the page cache afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.demo import write_random_checkpoint  # noqa: E402
from offload_moe.formats.base import DenseFormat  # noqa: E402
from offload_moe.offload.tiered import TieredStore  # noqa: E402
from offload_moe.weights.checkpoint import Checkpoint  # noqa: E402
from offload_moe.weights.convert import convert  # noqa: E402
from offload_moe.weights.packed import DATA, INDEX  # noqa: E402
from offload_moe.weights.sources import open_source, page_cache_bytes

SHAPE = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1792, num_experts=8, top_k=2,
                    vocab_size=32000, max_context=4096)
MB = 1e6


def _storage_files(path: Path) -> list[Path]:
    """The files the experts are read from: experts.bin, or the safetensors shards."""
    return [path / DATA] if (path / INDEX).exists() else sorted(path.glob("*.safetensors"))


def _drop_page_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a fresh conversion) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_store(path: str | Path, budget: int, direct: bool = True, threads: int = 4) -> dict:
    """Read throughput and buffer() latency of a TieredStore over `path` with a RAM budget of `budget` bytes.

    Returns: layout, o_direct, ram_slots, expert_bytes, blocking_mb_s, miss_ms (median),
    prefetch_mb_s, hit_us (median), page_cache_before_mib, page_cache_after_mib.
    """
    path = Path(path)
    files = _storage_files(path)
    _drop_page_cache(files)
    ckpt = Checkpoint(path)
    c = ckpt.config
    before = sum(page_cache_bytes(f) for f in files)
    fmt = DenseFormat(c, ckpt.dtype)
    store = TieredStore(c, fmt, open_source(ckpt, fmt, direct=direct), budget, threads=threads, progress=False)
    keys = [(layer, e) for layer in range(c.n_layers) for e in range(c.num_experts)]
    if store.ram_slots >= len(keys):
        raise ValueError(f"a budget of {budget} bytes holds every expert: nothing would be read from storage")

    # blocking misses: start after the experts the construction fill left in RAM and go round
    order = keys[store.ram_slots :] + keys[: store.ram_slots]
    store.reset_counters()
    miss_s = []
    for layer, e in order:
        t0 = time.perf_counter()
        store.buffer(layer, e)
        store.done(layer, e)
        miss_s.append(time.perf_counter() - t0)
    blocking = store.counters
    assert blocking.ram_misses == len(order), blocking

    # prefetch: batches of experts not in RAM, read by the pool; the wall time of each batch counts
    store.reset_counters()
    t0 = time.perf_counter()
    batch = max(1, store.ram_slots // 2)
    for start in range(0, len(order), batch):
        for layer, e in order[start : start + batch]:
            store.prefetch(layer, [e])
        store.wait_prefetches()
    prefetch_s = time.perf_counter() - t0
    prefetched = store.counters

    # RAM hits: the last expert read is resident
    layer, e = order[-1]
    hit_s = []
    for _ in range(2000):
        t0 = time.perf_counter()
        store.buffer(layer, e)
        store.done(layer, e)
        hit_s.append(time.perf_counter() - t0)
    store.close()
    return {
        "layout": ckpt.layout,
        "o_direct": store.direct,
        "ram_slots": store.ram_slots,
        "expert_bytes": store.nbytes,
        "blocking_mb_s": blocking.bytes_read / MB / blocking.read_wait_s,
        "miss_ms": 1e3 * statistics.median(miss_s),
        "prefetch_mb_s": prefetched.bytes_read / MB / prefetch_s,
        "prefetch_reads": prefetched.prefetch_reads,
        "hit_us": 1e6 * statistics.median(hit_s),
        "page_cache_before_mib": before / 2**20,
        "page_cache_after_mib": sum(page_cache_bytes(f) for f in files) / 2**20,
    }


def _checkpoints(root: Path) -> tuple[Path, Path]:
    hf, packed = root / "hf", root / "packed"
    if not (hf / "config.json").exists():
        print(f"writing a random {SHAPE.n_layers * SHAPE.num_experts * SHAPE.expert_params * 4 / 2**20:.0f} MiB "
              f"checkpoint to {hf} ...", flush=True)
        write_random_checkpoint(hf, SHAPE, torch.float32, layers_per_shard=2)
    if not (packed / INDEX).exists():
        print(f"converting to {packed} ...", flush=True)
        convert(hf, packed, DenseFormat(SHAPE, torch.float32), torch.float32, progress=False)
    return hf, packed


def _report(name: str, r: dict) -> None:
    print(f"{name:<34} {r['blocking_mb_s']:8.0f} {r['miss_ms']:9.1f} {r['prefetch_mb_s']:9.0f} {r['hit_us']:7.1f} "
          f"{r['page_cache_after_mib']:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="keep the checkpoints here (reused when present)")
    ap.add_argument("--budget-mib", type=float, default=175)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--hf", action="store_true", help="also read the safetensors checkpoint (slow: mmap faults)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf, packed = _checkpoints(args.dir or Path(tmp))
        budget = int(args.budget_mib * 2**20)
        total = SHAPE.n_layers * SHAPE.num_experts * SHAPE.expert_params * 4
        runs = [("packed, O_DIRECT", packed, True), ("packed, buffered + DONTNEED", packed, False)]
        if args.hf:
            runs.append(("safetensors (mmap + madvise/fadvise)", hf, False))
        results = [(name, measure_store(p, budget, direct, args.threads)) for name, p, direct in runs]
    first = results[0][1]
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} CPUs, shape D={SHAPE.dim} "
          f"I={SHAPE.ffn_dim} L={SHAPE.n_layers} E={SHAPE.num_experts} float32: {total / 2**20:.0f} MiB of experts, "
          f"{first['expert_bytes'] / 2**20:.1f} MiB each; RAM budget {args.budget_mib:.0f} MiB = {first['ram_slots']} "
          f"slots; {args.threads} reader threads")
    print(f"O_DIRECT on this filesystem: {'yes' if first['o_direct'] else 'no (EINVAL): buffered + DONTNEED'}")
    print("page cache: each file is fsynced and dropped (DONTNEED) before a run; O_DIRECT reads bypass it, buffered "
          "reads drop their range after reading; 'cache after' is what mincore finds in the page cache afterwards")
    print(f"{'store':<34} {'blk MB/s':>8} {'miss ms':>9} {'pf MB/s':>9} {'hit us':>7} {'cache MiB':>9}")
    for name, r in results:
        _report(name, r)


if __name__ == "__main__":
    main()
