"""The feeder (offload/feeder.py): on CUDA, speculative copies go to the link a chunk at a time, so a demand
copy passes them, a dropped one stops, and a hurried one finishes on the demand stream. Through the fake of
torch.cuda (tests/fake_cuda.py): each chunk is one fake copy of `copy_ticks`."""

from __future__ import annotations

import time

import pytest
import torch
from fake_cuda import FakeCuda
from test_transfer_rules import PROMPT, _instrumented

from offload_moe.engine import Engine
from offload_moe.offload.prefetch import Transfers
from offload_moe.options import EngineOptions

N = 64  # floats per expert: 256 bytes, 16 chunks of 16


def _transfers(slots: int = 2, ticks: int = 10) -> tuple[Transfers, FakeCuda]:
    fake = FakeCuda(copy_ticks=ticks)
    t = Transfers(torch.device("cuda:0"), [slots], cuda=fake)
    t.feeder.chunk_bytes = 16
    return t, fake


def _copies(fake: FakeCuda, stream: str | None = None) -> list[tuple]:
    return [e for e in fake.log if e[0] == "copy" and stream in (None, e[1])]


def test_a_speculative_copy_goes_a_chunk_at_a_time_and_all_of_it_lands():
    t, fake = _transfers()
    dst, src = torch.zeros(N), torch.arange(N, dtype=torch.float32)
    t.copy(dst, src, 0, 0, demand=False)
    assert len(_copies(fake)) == t.feeder.window  # a window's worth, not the whole copy
    t.wait_ready(0, 0)
    assert torch.equal(dst, src)
    assert t.feeder.enqueued_bytes == 4 * N and not t.feeder.busy()


def test_a_window_of_chunks_at_most_is_in_flight():
    t, fake = _transfers()
    t.copy(torch.zeros(N), torch.ones(N), 0, 0, demand=False)
    for _ in range(200):  # the host comes by many times while the copy runs
        t.feeder.pump()
        flying = [c for c in _copies(fake) if c[4] > fake.clock]
        assert len(flying) <= t.feeder.window  # the link's speed unknown: the window alone
    assert not t.feeder.queue and t.feeder.enqueued_bytes == 4 * N


def test_a_host_that_comes_back_late_keeps_more_in_flight():
    """The link stays busy until the next pump: after a gap of 10 ms with a copy queued, 10 ms of link time goes
    in flight (a host that computes between pumps); time the feeder had nothing queued is no gap."""
    t, fake = _transfers(slots=2, ticks=10**6)  # nothing lands during the test
    t.measured(16_000.0)  # 16 bytes a millisecond
    t.feeder.chunk_bytes = 16
    time.sleep(0.02)  # idle: not a gap
    t.copy(torch.zeros(N), torch.ones(N), 0, 0, demand=False)
    assert len(t.feeder.flying) == t.feeder.window
    time.sleep(0.01)
    t.feeder.pump()
    assert t.feeder.gap_s >= 0.01 and 10 <= len(t.feeder.flying) <= min(16, t.feeder.gap_s * 1000 + 1)


def test_a_demand_copy_waits_for_a_window_of_chunks_not_for_the_queued_copies():
    t, fake = _transfers(slots=4, ticks=10)
    for s in range(3):  # three experts' prefetches queued: 48 chunks
        t.copy(torch.zeros(N), torch.ones(N), 0, s, demand=False)
    issued = fake.clock
    dst = torch.zeros(N)
    t.copy(dst, torch.full((N,), 2.0), 0, 3, demand=True)
    (demand,) = _copies(fake, "demand")
    assert demand[3] <= issued + (t.feeder.window + 1) * 10  # behind the chunks in flight only
    assert t.feeder.queue and t.preempted == 3  # the prefetches go on after it, each passed once
    t.copy(torch.zeros(N), torch.ones(N), 0, 3, demand=True)
    assert t.preempted == 3
    t.synchronize()
    assert dst.eq(2.0).all()


def test_a_dropped_copy_stops_and_the_next_copy_into_its_slot_waits_for_what_was_enqueued():
    t, fake = _transfers(slots=1)
    dst = torch.zeros(N)
    t.copy(dst, torch.ones(N), 0, 0, demand=False)
    sent = t.feeder.enqueued_bytes
    assert t.drop(0, 0) and not t.in_flight[0][0]
    for _ in range(50):
        t.feeder.pump()
    assert t.feeder.enqueued_bytes == sent  # nothing more of it goes
    last = max(c[4] for c in _copies(fake, "prefetch"))
    t.copy(dst, torch.full((N,), 3.0), 0, 0, demand=True)
    assert _copies(fake, "demand")[-1][3] >= last  # rule 1: after the chunks that did go
    t.wait_ready(0, 0)
    assert dst.eq(3.0).all()
    assert not t.drop(0, 0)  # a demand copy is never dropped


def test_a_copy_needed_now_finishes_on_the_demand_stream_after_its_chunks():
    t, fake = _transfers(slots=2)
    dst, src = torch.zeros(N), torch.arange(N, dtype=torch.float32)
    t.copy(dst, src, 0, 1, demand=False)  # a window of its chunks goes at once
    t.copy(torch.zeros(N), torch.ones(N), 0, 0, demand=False)  # queued behind it
    t.wait_ready(0, 1)
    (rest,) = _copies(fake, "demand")  # its rest in one copy
    assert rest[3] >= max(c[4] for c in _copies(fake, "prefetch") if c[2] is t.ready[0][1])
    assert torch.equal(dst, src) and t.feeder.queued(0, 0)  # the other job was passed
    t.synchronize()
    assert max(c[4] for c in _copies(fake, "prefetch")) > rest[4]


def test_the_store_reuses_a_source_only_once_the_whole_copy_is_on_the_link():
    t, _ = _transfers(slots=1)
    src = torch.ones(N)
    landed = t.copy(torch.zeros(N), src, 0, 0, demand=False)
    assert not landed.query()  # chunks still to go: the source is still read
    landed.synchronize()
    assert landed.query() and not t.feeder.queued(0, 0)


def test_the_host_feeds_the_link_while_it_waits_for_the_device():
    t, fake = _transfers(slots=1)
    t.copy(torch.zeros(N), torch.ones(N), 0, 0, demand=False)
    sent = t.feeder.enqueued_bytes
    fake.compute.tail = fake.clock + 1000  # a long kernel computes the routing
    assert t.host_list(torch.tensor([1, 2])) == [1, 2]
    assert t.feeder.enqueued_bytes == 4 * N > sent and fake.clock >= fake.compute.tail


def test_the_backlog_counts_the_bytes_not_yet_on_the_link():
    t, fake = _transfers(slots=2, ticks=1000)
    t.measured(1000.0)
    t.feeder.chunk_bytes = 16  # `measured` sizes chunks for a real link
    t.copy(torch.zeros(N), torch.ones(N), 0, 0, demand=False)
    assert abs(t.backlog_s() - 4 * N / 1000.0) < 1e-9  # a speculative copy waits for all of it
    assert abs(t.backlog_s(demand=True) - 3 * 16 / 1000.0) < 1e-9  # a demand copy for the chunks in flight


def test_an_engine_whose_prefetches_go_in_small_chunks_computes_the_same(ckpts):
    ref = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, prefetch=1, slot_pool="layer", policy="lru",
                                                   progress=False))
    want = ref.generate(PROMPT, 12, keep_logits=True)
    engine, fake, _ = _instrumented(ckpts["base"], cache_experts=2, prefetch=1, slot_pool="layer", policy="lru")
    engine.cache.transfers.feeder.chunk_bytes = 256  # an expert in several chunks
    got = engine.generate(PROMPT, 12, keep_logits=True)
    assert torch.equal(got.logits, want.logits)
    assert engine.cache.fmt.nbytes > 256 and _copies(fake, "prefetch")
    assert engine.cache.counters.prefetch_dropped > 0  # routing left some unused before they were all on the link


def test_a_tiered_store_under_fed_copies_computes_the_same(ckpts):
    """Experts streamed from storage through a RAM tier of a quarter of them, copied through the fake in small
    chunks: the store gets `_Landed` for a speculative copy and queries and waits on it (the order itself is
    the test above; the fake moves bytes at once), and the logits are the resident run's."""
    ref = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, prefetch=1, progress=False))
    want = ref.generate(PROMPT, 8, keep_logits=True)
    experts = 3 * 8 * 3 * 64 * 96 * 4  # layers x experts x (w1, w2, w3) bytes, float32
    engine, _, _ = _instrumented(ckpts["base"], cache_experts=2, prefetch=1, ram_budget=experts // 4)
    engine.cache.transfers.feeder.chunk_bytes = 4096
    got = engine.generate(PROMPT, 8, keep_logits=True)
    assert torch.equal(got.logits, want.logits)
    assert got.stats["experts_in_ram"] is False and got.stats["bytes_read_from_storage"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_demand_copy_lands_while_a_big_prefetch_is_still_being_fed():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    t = Transfers(device, [2])
    t.feeder.chunk_bytes = 1 << 20
    big = torch.zeros(64 << 20, dtype=torch.uint8, device=device)
    small = torch.zeros(1 << 20, dtype=torch.uint8, device=device)
    t.copy(big, torch.ones(64 << 20, dtype=torch.uint8).pin_memory(), 0, 0, demand=False)
    t.copy(small, torch.full((1 << 20,), 2, dtype=torch.uint8).pin_memory(), 0, 1, demand=True)
    t.wait_ready(0, 1)  # spins feeding the prefetch meanwhile, a window at a time
    torch.cuda.synchronize(device)
    assert small.eq(2).all() and t.feeder.queued(0, 0)  # landed with most of the prefetch not yet on the link
    assert t.drop(0, 0) and not t.feeder.queued(0, 0)
    t.synchronize()
    assert big[: t.feeder.enqueued_bytes].eq(1).all() and big[t.feeder.enqueued_bytes :].eq(0).all()
