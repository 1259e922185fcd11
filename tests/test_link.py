"""The emulated host-to-device link (`--link-gbs`, offload/link.py): the order of its copies, drops, waits
before use, and the engine's tokens and statistics over it. Orders are read from the link's schedule, not
from clocks, so a loaded machine changes no outcome."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli as cli

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.offload.eviction import SlotTable
from offload_moe.offload.link import EmulatedLink
from offload_moe.offload.prefetch import Transfers
from offload_moe.options import EngineOptions
from offload_moe.plan import merge_options, plan_load
from offload_moe.planning.timed import simulate_timed
from offload_moe.planning.trace import Trace
from offload_moe.weights.checkpoint import Checkpoint

PROMPT = "def read_config(path):"


def _transfers(seconds_per_copy: float, slots: int = 4) -> tuple[Transfers, torch.Tensor, torch.Tensor]:
    """Transfers over a link on which one copy of a [1024] float32 row lasts `seconds_per_copy`."""
    link = EmulatedLink(4096 / seconds_per_copy)
    t = Transfers(torch.device("cpu"), [slots], cuda=link)
    dst = torch.zeros(slots, 1024)
    src = torch.arange(slots * 1024, dtype=torch.float32).view(slots, 1024)
    return t, dst, src


def _copy_of(t: Transfers, slot: int):
    return t.ready[0][slot].copy


def test_a_demand_copy_passes_queued_and_started_speculative_copies():
    t, dst, src = _transfers(30.0)  # copies far longer than the test: nothing finishes meanwhile
    for s in range(3):
        t.copy(dst[s], src[s], 0, s, demand=False)
    t.copy(dst[3], src[3], 0, 3, demand=True)
    first, second, third = (_copy_of(t, s) for s in range(3))
    demand = _copy_of(t, 3)
    assert first.start <= demand.start and demand.end < first.end < second.end < third.end  # one chunk, then it
    assert demand.end - demand.start == pytest.approx(30.0, abs=0.01)  # one logical copy, whole
    # it starts at the first boundary of the started copy's chunks after its issue
    chunks = (demand.start - first.start) / t.link.chunk_s
    assert 0 <= demand.start - demand.issued < t.link.chunk_s and chunks == pytest.approx(round(chunks), abs=1e-6)
    assert t.link.preempted == 3
    assert t.backlog_s(demand=False) > t.backlog_s(demand=True) > 0
    t.link.close()


def test_a_copy_into_a_slot_waits_for_the_copy_before_it_and_a_dropped_one_frees_it():
    t, dst, src = _transfers(30.0, slots=2)
    t.copy(dst[0], src[0], 0, 0, demand=False)
    t.copy(dst[0], src[1], 0, 0, demand=True)  # the prefetched expert evicted before use (rule 1)
    second = _copy_of(t, 0)
    assert second.start >= second.after[0].end
    t.copy(dst[1], src[1], 0, 1, demand=False)
    assert t.drop(0, 1) and not t.in_flight[0][1]
    assert t.ready[0][1].query()  # a dropped copy's event completes at once
    assert not t.drop(0, 0)  # a demand copy is never dropped
    t.link.close()


def test_a_link_like_cudas_runs_copies_whole_and_the_feeder_gives_demand_first_and_stale_never():
    """chunk_s None: a copy engine as CUDA's (whole copies, none taken back). Enqueued whole, speculative copies
    hold a demand copy back until they end; fed a chunk at a time (the feeder, as on CUDA), a demand copy waits
    behind the chunks in flight only, and a dropped copy's rest never goes."""
    def over(feed: bool) -> Transfers:
        return Transfers(torch.device("cpu"), [4], cuda=EmulatedLink(4096 / 30.0, chunk_s=None), feed=feed)

    dst, src = torch.zeros(4, 1024), torch.ones(4, 1024)
    whole = over(False)
    assert whole.feeder is None and not whole.can_drop
    for s in range(3):
        whole.copy(dst[s], src[s], 0, s, demand=False)
    whole.copy(dst[3], src[3], 0, 3, demand=True)
    assert _copy_of(whole, 3).start >= _copy_of(whole, 0).end  # behind the started copy, whole
    assert not whole.drop(0, 1)  # nothing comes back
    whole.link.close()

    fed = over(True)
    fed.feeder.chunk_bytes = 512  # 8 chunks of 3.75 s a copy
    chunk_s = 512 / fed.link.bytes_per_s
    for s in range(3):
        fed.copy(dst[s], src[s], 0, s, demand=False)
    assert fed.feeder.queued(0, 0) and len(fed.feeder.flying) == 3  # a window of chunks on the link
    fed.copy(dst[3], src[3], 0, 3, demand=True)
    demand = _copy_of(fed, 3)
    assert demand.start - demand.issued <= 3 * chunk_s + 1e-6  # behind the window, not 90 s of copies
    assert fed.can_drop and fed.drop(0, 1) and not fed.feeder.queued(0, 1)
    assert fed.backlog_s() == pytest.approx(fed.link.backlog_s() + fed.feeder.rest_bytes() / fed.link.bytes_per_s)
    fed.link.close()


def test_a_copy_the_worker_fails_is_raised_at_the_next_wait_not_hung_on():
    t = Transfers(torch.device("cpu"), [1], cuda=EmulatedLink(1e9))
    t.copy(torch.zeros(4), torch.ones(5), 0, 0)  # shapes that do not match: the worker's copy_ raises
    with pytest.raises(RuntimeError, match="failed a copy"):
        t.wait_ready(0, 0)
    t.link.close()


def test_compute_waits_for_a_copy_before_use_and_reads_its_bytes():
    t, dst, src = _transfers(0.02)
    t.copy(dst[0], src[0], 0, 0, demand=False)
    t.copy(dst[1], src[1], 0, 1, demand=True)
    assert not t.ready[0][0].query()  # just issued: in flight
    waited = t.wait_ready(0, 0) + t.wait_ready(0, 1)
    assert waited > 0 and torch.equal(dst[:2], src[:2]) and t.ready[0][0].query()
    assert t.wait_ready(0, 0) == 0.0  # waited for once
    t.synchronize()
    assert t.link.busy_until_now() == pytest.approx(0.04, abs=1e-6)
    t.link.close()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_vacated_slot_takes_the_next_insertion_and_is_never_a_hit(compiled):
    table = SlotTable([3], 8, "lru", compiled=compiled)
    table.access_row(0, [0, 1])
    inserted, slots, _ = table.prefetch_row(0, [5])
    table.vacate(0, 5)
    assert table.slot(0, 5) < 0 and sorted(table.resident(0)) == [0, 1]
    hit, into, evicted = table.access_row(0, [5, 6])  # the hole first, then the least recently used
    assert hit == [False, False] and into[0] == slots[0] and evicted == [-1, 0]
    with pytest.raises(ValueError, match="not resident"):
        table.vacate(0, 7)


def _generate(**options):
    engine = Engine.load("demo", EngineOptions(progress=False, device="cpu", cache_experts=3, prefetch=1,
                                               policy="lru", **options))
    return engine, engine.generate(PROMPT, 10, keep_logits=True)


def test_the_engine_over_the_link_gives_the_inline_tokens_and_reports_the_link():
    _, want = _generate()
    engine, got = _generate(link_gbs=0.05)  # 384 KiB experts: about 8 ms a copy
    assert got.tokens == want.tokens and torch.equal(got.logits, want.logits)
    s, inline = got.stats, want.stats
    assert s["link_gbs"] == 0.05 and 0 < s["link_busy"] <= 1 and s["copy_wait_s"] > 0
    assert s["prefetch_dropped"] >= 0 and s["prefetch_preempted"] >= 0
    assert inline["link_gbs"] is None and inline["link_busy"] is None and inline["prefetch_dropped"] == 0
    # a dropped prefetch left no expert the table calls resident without its bytes: every resident one computes
    cache = engine.cache
    cache.transfers.synchronize()  # the last token's prefetches
    for row in range(len(cache.slots)):
        for e in cache.table.resident(row):
            s_ = cache.table.slot(row, e)
            assert torch.equal(cache.mem[cache.pool_of[row]][s_], cache.store.buffer(row, e))


def test_a_speculative_copy_the_routing_does_not_use_is_dropped_and_its_slot_emptied():
    engine = Engine.load("demo", EngineOptions(progress=False, device="cpu", cache_experts=3, prefetch=1,
                                               policy="lru", link_gbs=1e-4))  # seconds a copy: none lands here
    cache = engine.cache
    cache.prefetch(1, [0, 1])
    cache.routed(1, [[0, 5]])  # row 1 uses expert 0, not 1
    assert cache.table.slot(1, 0) >= 0 and cache.table.slot(1, 1) < 0
    assert cache.counters.prefetch_dropped == 1 and cache.transfers.link.preempted == 0
    cache.transfers.link.close()


def test_the_flag_is_refused_at_zero_and_on_cuda(capsys, monkeypatch):
    code, _, err = cli(capsys, "generate", "--device", "cpu", "--link-gbs", "0", "--max-new-tokens", "1")
    assert code == 1 and err.strip() == "error: --link-gbs: expected a number above 0, got 0.0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    options, _ = merge_options(EngineOptions(device="cuda", link_gbs=1.0), None, {})
    from offload_moe.demo import resolve_model

    with pytest.raises(UserError, match="--link-gbs emulates a link on a CPU device"):
        plan_load(Checkpoint(resolve_model("demo")), options)


def _trace(experts: list[int], predicted_row1: list[int]) -> Trace:
    """One token over two rows, top-1 of 4 experts: `experts` per row, and the prediction made for row 1."""
    ex = np.array([experts], np.int32)[..., None]  # [1, 2, 1]
    pred = np.array([[[-1, -1], predicted_row1]], np.int32)  # [1, 2, 2]
    return Trace(ex, np.ones(ex.shape, np.float32), pred, 4, 1, 2, "test")


def test_the_timed_replay_passes_and_drops_speculative_copies_as_the_emulated_link_does():
    # 1 token x 2 rows, top-1, 2 slots per row, copy 3 s, compute 1 s; at row 0 the prediction for row 1 is
    # experts 1 and 2 (row 1 uses 1, not 2). t0 r0 at 0: expert 0 misses (0-3); ends 4; prefetches 1 (3-6), 2 (6-9).
    # r1 at 4: expert 1 late (2 s), ends 7; the copy of expert 2 is dropped, its 3 s given back: the link is busy
    # 6 of 7 s, not 9 of 9 (first issued first served)
    trace = _trace([0, 1], [1, 2])
    r = simulate_timed(trace, 2, "lru", trace.predicted, 1, 3.0, 1.0)
    assert r["seconds_per_token"] == 7.0 and r["dropped"] == 1.0 and r["link_busy"] == pytest.approx(6 / 7)
    # a miss at row 1 passes the speculative copies: expert 3 at row 1 (a miss) while 1 and 2 are on their way
    # for it: both dropped at 4 (the routing does not use them), expert 3 copied 4-7, ends 8 (first issued first
    # served: 3 would wait for 1 and 2 until 9, land at 12, end 13)
    trace = _trace([0, 3], [1, 2])
    r = simulate_timed(trace, 2, "lru", trace.predicted, 1, 3.0, 1.0)
    assert r["seconds_per_token"] == 8.0 and r["dropped"] == 2.0
