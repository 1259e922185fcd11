"""TieredStore (RAM cache over storage): the same bytes as the all-in-RAM store in any access order,
resident memory within the budget, the page cache left alone, damaged files refused, and the slot
reuse rule (a slot waits for `done` and for its device copy's event)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from offload_moe.config import ModelConfig
from offload_moe.demo import write_random_checkpoint
from offload_moe.errors import UserError
from offload_moe.formats.base import DenseFormat
from offload_moe.offload.store import ExpertStore
from offload_moe.offload.tiered import TieredStore
from offload_moe.weights.checkpoint import Checkpoint
from offload_moe.weights.convert import convert
from offload_moe.weights.packed import DATA
from offload_moe.weights.sources import open_source, page_cache_bytes

ROOT = Path(__file__).resolve().parent.parent
# 64 experts of 3.4 MiB (fp32): 216 MiB of experts, so a 54 MiB budget holds a quarter of them
BIG = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=1152, num_experts=8, top_k=2,
                  vocab_size=512)
SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, num_experts=4, top_k=2,
                    vocab_size=256)
OVERHEAD = 16 * 2**20  # stated RSS overhead over the budget: thread stacks, bookkeeping, allocator slack


def in_ram(ck: Checkpoint, fmt) -> ExpertStore:
    """The all-in-RAM store, as the engine makes it."""
    return ExpertStore(ck.config, fmt, open_source(ck, fmt, direct=False, drop_pages=False), progress=False)


def _make(root: Path, config: ModelConfig) -> tuple[Path, Path]:
    hf = write_random_checkpoint(root / "hf", config, torch.float32)
    packed = root / "packed"
    convert(hf, packed, DenseFormat(config, torch.float32), torch.float32, progress=False)
    return hf, packed


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    return _make(tmp_path_factory.mktemp("tiered-big"), BIG)


@pytest.fixture(scope="module")
def big_ref(big) -> ExpertStore:
    return in_ram(Checkpoint(big[0]), DenseFormat(BIG, torch.float32))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    return _make(tmp_path_factory.mktemp("tiered-small"), SMALL)


@pytest.fixture(scope="module")
def small_ref(small) -> ExpertStore:
    return in_ram(Checkpoint(small[0]), DenseFormat(SMALL, torch.float32))


def _store(path: Path, config: ModelConfig, budget: int, **kw) -> TieredStore:
    ck, fmt = Checkpoint(path), DenseFormat(config, torch.float32)
    direct = kw.pop("direct", True)
    return TieredStore(config, fmt, open_source(ck, fmt, direct=direct), budget, progress=False, **kw)


def _slots_budget(config: ModelConfig, slots: int) -> int:
    """A budget that holds exactly `slots` experts (stride rounded to 4096, plus the alignment pad)."""
    stride = -(-DenseFormat(config, torch.float32).nbytes // 4096) * 4096
    return slots * stride + 4096


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _cache_droppable(folder: Path) -> bool:
    """Whether this filesystem's page cache can be dropped at all (not on tmpfs, where it is the storage)."""
    probe = folder / "droppable.probe"
    probe.write_bytes(os.urandom(1 << 20))
    _drop_cache(probe)
    droppable = page_cache_bytes(probe) == 0
    probe.unlink()
    return droppable


def _check_random_order(store: TieredStore, ref: ExpertStore, passes: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    keys = [(layer, e) for layer in range(store.num_layers) for e in range(store.num_experts)]
    for _ in range(passes):
        rng.shuffle(keys)
        for layer, e in keys:
            if rng.random() < 0.4:
                store.prefetch(rng.randrange(store.num_layers), rng.sample(range(store.num_experts), 2))
            assert torch.equal(store.buffer(layer, e), ref.buffer(layer, e)), (layer, e)
            store.done(layer, e)


@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
def test_random_access_matches_all_in_ram(big, big_ref, direct):
    _drop_cache(big[1] / DATA)
    store = _store(big[1], BIG, big_ref.total_bytes // 4, direct=direct)
    assert store.total_bytes == big_ref.total_bytes
    assert 1 <= store.ram_slots <= BIG.n_layers * BIG.num_experts // 4
    _check_random_order(store, big_ref, passes=2 if direct else 1)
    c = store.counters
    assert c.ram_misses > c.ram_hits > 0 and c.prefetch_reads > 0
    assert c.bytes_read >= (c.ram_misses - c.prefetch_late) * store.nbytes
    store.wait_prefetches()
    store.close()
    if not direct and _cache_droppable(big[1].parent):  # buffered reads are dropped right after
        assert page_cache_bytes(big[1] / DATA) <= 8 * 2**20


def test_plain_safetensors_checkpoint_gives_the_same_bytes(big, big_ref):
    """The mapped path: same bytes, and the shard's pages neither stay mapped (RSS) nor cached."""
    data = big[0] / "model.safetensors"
    _drop_cache(data)
    proc = psutil.Process()
    base = proc.memory_info().rss
    store = _store(big[0], BIG, 64 * 2**20)
    assert not store.direct
    peak = base
    rng = random.Random(1)
    keys = [(layer, e) for layer in range(BIG.n_layers) for e in range(BIG.num_experts)]
    rng.shuffle(keys)
    for layer, e in keys:
        store.prefetch((layer + 1) % BIG.n_layers, rng.sample(range(BIG.num_experts), 2))
        assert torch.equal(store.buffer(layer, e), big_ref.buffer(layer, e)), (layer, e)
        store.done(layer, e)
        peak = max(peak, proc.memory_info().rss)
    store.wait_prefetches()
    growth, cached = peak - base, page_cache_bytes(data)
    print(f"\nhf: budget 64 MiB, slots {store.ram_bytes / 2**20:.1f} MiB, RSS growth {growth / 2**20:.1f} MiB, "
          f"page cache after {cached / 2**20:.1f} MiB")
    assert growth <= 64 * 2**20 + OVERHEAD + 3 * BIG.dim * BIG.ffn_dim * 4  # + the expert being packed
    if _cache_droppable(big[0].parent):  # pages that fault-around mapped next to the tensors stay (tiered.py)
        assert cached <= 16 * 2**20
    store.close()


def _write_original(hf: Path, dst: Path) -> Path:
    """The same experts in the original release layout: params.json and one consolidated.00.pt with the
    experts stacked per layer ([E*I, D]; w2's block is the transpose). wq/wk keep HF's RoPE order: only
    the experts are compared here."""
    src = Checkpoint(hf)
    c = src.config
    out = {name: src.dense(name).clone() for name in src.expected_dense()}
    for layer in range(c.n_layers):
        experts = [src.expert(layer, e) for e in range(c.num_experts)]
        for part in ("w1", "w3"):
            out[f"layers.{layer}.block_sparse_moe.{part}"] = torch.cat([x[part] for x in experts])
        out[f"layers.{layer}.block_sparse_moe.w2"] = torch.cat([x["w2"].t() for x in experts])
        out[f"layers.{layer}.block_sparse_moe.gate.weight"] = out.pop(f"layers.{layer}.gate.weight")
    dst.mkdir()
    torch.save(out, dst / "consolidated.00.pt")
    params = {"dim": c.dim, "n_layers": c.n_layers, "head_dim": c.head_dim, "hidden_dim": c.ffn_dim,
              "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "vocab_size": c.vocab_size,
              "moe": {"num_experts": c.num_experts, "num_experts_per_tok": c.top_k}}
    (dst / "params.json").write_text(json.dumps(params))
    return dst


def test_original_layout_gives_the_same_bytes(small, small_ref, tmp_path):
    """Consolidated .pt (torch.load mmap, stacked and transposed experts): the same bytes."""
    original = _write_original(small[0], tmp_path / "original")
    store = _store(original, SMALL, _slots_budget(SMALL, 3))
    _check_random_order(store, small_ref, passes=2, seed=2)
    assert store.counters.ram_misses > 0
    store.close()


_RSS_CHILD = """
import json, random, sys
import psutil, torch
from offload_moe.weights.checkpoint import Checkpoint
from offload_moe.offload.store import ExpertStore
from offload_moe.formats.base import DenseFormat
from offload_moe.weights.sources import open_source
from offload_moe.offload.tiered import TieredStore

path, kind, budget, passes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ckpt = Checkpoint(path)
c = ckpt.config
fmt = DenseFormat(c, torch.float32)
proc = psutil.Process()
base = peak = proc.memory_info().rss
if kind == "tiered":
    store = TieredStore(c, fmt, open_source(ckpt, fmt), budget, progress=False)
    held, direct = store.ram_slots * store.stride, store.direct
else:
    store = ExpertStore(c, fmt, open_source(ckpt, fmt, direct=False, drop_pages=False), progress=False)
    held, direct = store.total_bytes, None
rng = random.Random(0)
keys = [(layer, e) for layer in range(c.n_layers) for e in range(c.num_experts)]
for _ in range(passes):
    rng.shuffle(keys)
    for layer, e in keys:
        store.prefetch((layer + 1) % c.n_layers, rng.sample(range(c.num_experts), 2))
        int(store.buffer(layer, e)[::4096].sum())
        store.done(layer, e)
        peak = max(peak, proc.memory_info().rss)
with open("/proc/self/status") as f:  # VmHWM: this process image's true peak (ru_maxrss spans the exec)
    peak = max([peak] + [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")])
print(json.dumps({"base": base, "peak": peak, "held": held, "direct": direct}))
"""


def _rss_run(path: Path, kind: str, budget: int, passes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), kind, str(budget), str(passes)], env=env,
                         check=True, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


def test_resident_memory_stays_within_budget(big):
    """A fresh process reads every expert three times: RSS grows by the budget, not by the model."""
    budget, data = 64 * 2**20, big[1] / DATA
    _drop_cache(data)
    r = _rss_run(big[1], "tiered", budget, passes=3)
    growth = r["peak"] - r["base"]
    cached = page_cache_bytes(data)
    a = _rss_run(big[1], "all", budget, passes=1)  # after the page-cache check: it reads through the cache
    all_growth = a["peak"] - a["base"]
    print(f"\npacked: budget {budget / 2**20:.0f} MiB, slots {r['held'] / 2**20:.1f} MiB, O_DIRECT {r['direct']}, "
          f"RSS growth {growth / 2**20:.1f} MiB (base {r['base'] / 2**20:.0f} MiB), allowed "
          f"{(budget + OVERHEAD) / 2**20:.0f} MiB, page cache after {cached / 2**20:.1f} MiB\n"
          f"all-in-RAM ExpertStore: RSS growth {all_growth / 2**20:.1f} MiB for {a['held'] / 2**20:.0f} MiB of experts")
    assert r["held"] <= budget
    assert growth <= budget + OVERHEAD
    if _cache_droppable(big[1].parent):  # the reads did not park the model in the page cache
        assert cached <= 8 * 2**20
    assert all_growth >= 0.95 * a["held"] >= 3 * budget


def test_prefetch_then_buffer_is_a_hit_without_wait(small, small_ref):
    store = _store(small[1], SMALL, _slots_budget(SMALL, 2))  # the fill holds (0, 0) and (0, 1)
    store.prefetch(1, [3])
    store.wait_prefetches()
    c = store.counters
    assert (c.prefetch_reads, c.bytes_read, c.ram_hits, c.ram_misses) == (1, store.nbytes, 0, 0)
    assert torch.equal(store.buffer(1, 3), small_ref.buffer(1, 3))
    store.done(1, 3)
    assert (c.ram_hits, c.ram_misses, c.read_wait_s) == (1, 0, 0.0)
    assert torch.equal(store.buffer(1, 2), small_ref.buffer(1, 2))  # a miss, read in this thread
    store.done(1, 2)
    assert c.ram_misses == 1 and c.read_wait_s > 0 and c.bytes_read == 2 * store.nbytes
    store.reset_counters()
    assert store.counters.ram_hits == 0
    store.close()


def _corrupt(packed: Path, dst: Path, layer: int, expert: int) -> tuple[Path, int]:
    folder = shutil.copytree(packed, dst)
    entry = next(x for x in json.loads((folder / "packed.json").read_text())["experts"] if x[:2] == [layer, expert])
    middle = entry[2] + entry[3] // 2
    with open(folder / DATA, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0xFF]))
    return folder, entry[2]


def test_corrupt_expert_is_refused_when_read(small, small_ref, tmp_path):
    folder, offset = _corrupt(small[1], tmp_path / "bad", 1, 2)
    store = _store(folder, SMALL, _slots_budget(SMALL, 2))
    with pytest.raises(UserError, match=rf"expert \(1, 2\) \(bytes {offset}\.\..*checksum"):
        store.buffer(1, 2)
    store.prefetch(1, [2, 3])  # a worker's failure surfaces on the next buffer() of that expert
    store.wait_prefetches()
    with pytest.raises(UserError, match=r"expert \(1, 2\).*checksum"):
        store.buffer(1, 2)
    assert torch.equal(store.buffer(1, 3), small_ref.buffer(1, 3))  # the others still read fine
    store.done(1, 3)
    store.close()
    folder, _ = _corrupt(small[1], tmp_path / "bad-first", 0, 0)  # read by the fill at construction
    with pytest.raises(UserError, match=r"expert \(0, 0\).*checksum"):
        _store(folder, SMALL, _slots_budget(SMALL, 2))


def test_truncated_or_missing_file_is_refused_at_construction(small, tmp_path):
    folder = shutil.copytree(small[1], tmp_path / "short")
    size = (folder / DATA).stat().st_size
    os.truncate(folder / DATA, size - 4096 - 100)
    with pytest.raises(UserError, match=r"truncated: expert \(1, 3\)"):
        _store(folder, SMALL, _slots_budget(SMALL, 2))
    (folder / DATA).unlink()
    with pytest.raises(UserError, match="missing"):
        _store(folder, SMALL, _slots_budget(SMALL, 2))


def test_budget_below_one_expert_is_refused(small):
    nbytes = DenseFormat(SMALL, torch.float32).nbytes
    with pytest.raises(UserError, match=rf"budget of {nbytes} bytes .* holds no expert.*at least"):
        _store(small[1], SMALL, nbytes)
    store = _store(small[1], SMALL, 10**9)  # more than the model: one slot per expert, no more
    assert store.ram_slots == SMALL.n_layers * SMALL.num_experts
    store.close()


class FakeEvent:
    """Stands in for the torch.cuda.Event of a device copy: `query` and `synchronize` only."""

    def __init__(self) -> None:
        self.complete, self.synced = False, 0

    def query(self) -> bool:
        return self.complete

    def synchronize(self) -> None:
        self.synced += 1
        self.complete = True


def test_slot_reuse_waits_for_done_and_device_copies(small, small_ref):
    store = _store(small[1], SMALL, _slots_budget(SMALL, 2))  # the fill holds (0, 0) and (0, 1)
    events = {}
    for e in (0, 1):
        store.buffer(0, e)
        events[e] = FakeEvent()
        store.done(0, e, events[e])
    store.prefetch(0, [2])  # both slots are sources of device copies in flight: nothing is taken
    store.wait_prefetches()
    assert store.counters.prefetch_reads == 0
    events[1].complete = True
    store.prefetch(0, [2])  # takes (0, 1)'s slot, although (0, 0) is older
    store.wait_prefetches()
    assert store.counters.prefetch_reads == 1
    assert torch.equal(store.buffer(0, 2), small_ref.buffer(0, 2))
    events[2] = FakeEvent()
    store.done(0, 2, events[2])
    assert (store.counters.ram_hits, store.counters.ram_misses) == (3, 0)

    held = store.buffer(0, 0)  # a hit: in use from here on
    assert torch.equal(held, small_ref.buffer(0, 0))
    assert torch.equal(store.buffer(1, 0), small_ref.buffer(1, 0))  # no free slot: waits for (0, 2)'s copy
    assert (events[0].synced, events[2].synced) == (0, 1)
    assert torch.equal(held, small_ref.buffer(0, 0))  # the slot in use was not touched
    with pytest.raises(UserError, match="held by buffer"):
        store.buffer(1, 1)  # both slots in use
    store.done(0, 0)
    store.done(1, 0)
    with pytest.raises(RuntimeError, match="without a matching buffer"):
        store.done(1, 0)
    assert torch.equal(store.buffer(1, 1), small_ref.buffer(1, 1))
    store.done(1, 1)
    store.close()
