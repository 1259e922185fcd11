"""Pinned host memory: both expert stores allocate exactly what they hold (no power-of-two rounding by
torch's pinned allocator), register exactly that with cudaHostRegister, unregister it on release, and the
memory plan's `pinned` figure equals it. cudart is faked on the CPU; on a GPU gpu_check prints the real one."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from offload_moe.config import ModelConfig
from offload_moe.demo import write_random_checkpoint
from offload_moe.formats.base import DenseFormat
from offload_moe.formats.registry import expert_format
from offload_moe.memory import plan_memory
from offload_moe.offload.store import ExpertStore
from offload_moe.offload.tiered import TieredStore
from offload_moe.weights.checkpoint import Checkpoint
from offload_moe.weights.convert import convert
from offload_moe.weights.sources import open_source

# 3 x 8 experts whose size (3 * 64 * 160 * 4 = 122880 bytes, int4 below) is no power of two
SHAPE = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=160, num_experts=8, top_k=2,
                    vocab_size=256)


class FakeCudart:
    """torch.cuda.cudart()'s two calls, recorded: registered (ptr, bytes) and unregistered ptrs."""

    class cudaError:  # noqa: N801 (cudart's name)
        success = 0

    def __init__(self):
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:  # noqa: N802
        self.registered.append((ptr, nbytes))
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def cudart(monkeypatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pinned")
    hf = write_random_checkpoint(root / "hf", SHAPE, torch.float32)
    packed = root / "packed"
    convert(hf, packed, DenseFormat(SHAPE, torch.float32), torch.float32, progress=False)
    return hf, packed


def _plan(nbytes: int, ram_budget: int | None, pin: bool = True):
    return plan_memory(SHAPE, torch.float32, nbytes, [2] * SHAPE.n_layers, 64, None, 0, ram_budget, pin=pin)


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_all_in_ram_store_allocates_and_pins_exactly_what_it_holds(ckpt, cudart, quant):
    fmt = expert_format(quant, SHAPE, torch.float32, 32)
    exact = SHAPE.n_layers * SHAPE.num_experts * fmt.nbytes
    assert exact & (exact - 1)  # not a power of two: a rounding allocator would show
    ck = Checkpoint(ckpt[0])
    store = ExpertStore(ck.config, fmt, open_source(ck, fmt, direct=False), pin=True, progress=False)
    storage = store.layers[0].untyped_storage()
    assert storage.nbytes() == exact  # one allocation, no rounding
    assert all(layer.untyped_storage().data_ptr() == storage.data_ptr() for layer in store.layers)
    assert cudart.registered == [(storage.data_ptr(), exact)]
    assert store.pinned_bytes == exact
    plan = _plan(fmt.nbytes, ram_budget=exact)
    assert plan.experts_in_ram and plan.pinned == store.pinned_bytes
    assert _plan(fmt.nbytes, ram_budget=exact, pin=False).pinned == 0
    ptr = storage.data_ptr()
    del store, storage
    gc.collect()
    assert cudart.unregistered == [ptr]  # released with the store


def test_unpinned_store_registers_nothing(ckpt, cudart):
    ck, fmt = Checkpoint(ckpt[0]), DenseFormat(SHAPE, torch.float32)
    store = ExpertStore(ck.config, fmt, open_source(ck, fmt, direct=False), pin=False, progress=False)
    assert store.pinned_bytes == 0 and cudart.registered == []
    assert store.layers[0].untyped_storage().nbytes() == SHAPE.n_layers * SHAPE.num_experts * store.nbytes


@pytest.mark.parametrize("slots", [1, 5])
def test_tiered_store_pins_its_slots_and_alignment_as_planned(ckpt, cudart, monkeypatch, slots):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # TieredStore refuses pin=True without it
    fmt = DenseFormat(SHAPE, torch.float32)
    stride = -(-fmt.nbytes // 4096) * 4096
    budget = slots * stride + 4096 + stride // 2  # half a slot more than `slots` need: not used
    ck = Checkpoint(ckpt[1])
    store = TieredStore(ck.config, fmt, open_source(ck, fmt), budget, pin=True, progress=False)
    assert store.ram_slots == slots
    allocated = store._ram.untyped_storage().nbytes()
    assert allocated == slots * stride + 4096  # the slots and the alignment pad, no rounding
    assert cudart.registered == [(store._ram.untyped_storage().data_ptr(), allocated)]
    assert store.pinned_bytes == allocated
    plan = _plan(fmt.nbytes, ram_budget=budget)
    assert not plan.experts_in_ram and plan.pinned == store.pinned_bytes
    store.close()
    assert cudart.unregistered == [cudart.registered[0][0]]
