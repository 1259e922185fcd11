"""The stream and event rules of prefetch.py, on real decode steps: on the CPU through a fake of
torch.cuda (tests/fake_cuda.py), on a GPU (skipped without one) with torch.cuda._sleep to widen
the races."""

from __future__ import annotations

import pytest
import torch
from fake_cuda import FakeCuda

from offload_moe.batch import Scheduler
from offload_moe.engine import Engine
from offload_moe.offload.predictors import targets_of
from offload_moe.offload.prefetch import Transfers
from offload_moe.options import EngineOptions

PROMPT = [1, 415, 2936, 9060, 285, 1142]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_streams_and_events_belong_to_the_engines_device():
    fake = FakeCuda()
    device = torch.device("cuda:1")
    t = Transfers(device, [2, 2], cuda=fake)
    dst, src = torch.zeros(2, 8), torch.ones(2, 8)
    t.copy(dst[0], src[0], 0, 0, demand=True)
    t.copy(dst[1], src[1], 1, 1, demand=False)
    t.wait_ready(0, 0)
    t.mark_free(0, 0)
    t.to_host(torch.ones(1, 8))
    t.host_x()
    devices = [e[-1] for e in fake.log if e[0] in ("stream", "current_stream")]
    assert len(devices) == 5 and all(d == device for d in devices), devices


def test_a_copy_waits_for_the_slots_readers_and_for_the_copy_before_it():
    fake = FakeCuda(copy_ticks=40)
    t = Transfers(torch.device("cuda:0"), [1], cuda=fake)
    dst = torch.zeros(4)
    t.copy(dst, torch.full((4,), 1.0), 0, 0, demand=False)  # a prefetch, in flight
    t.copy(dst, torch.full((4,), 2.0), 0, 0, demand=True)  # the prefetched expert evicted before use
    first, second = [e for e in fake.log if e[0] == "copy"]
    assert (first[1], second[1]) == ("prefetch", "demand")
    assert second[3] >= first[4]  # the second write lands after the first
    t.wait_ready(0, 0)
    fake.compute.tail = fake.clock + 500  # a long kernel reads the slot
    t.mark_free(0, 0)
    t.copy(dst, torch.full((4,), 3.0), 0, 0, demand=True)
    assert [e for e in fake.log if e[0] == "copy"][-1][3] >= fake.clock + 400  # not before the reader is done
    assert dst.eq(3.0).all()


def _instrumented(ckpt, **options) -> tuple[Engine, FakeCuda, dict]:
    """An engine on the CPU whose transfers run through the fake, with kernels and acquires logged."""
    engine = Engine.load(ckpt, EngineOptions(progress=False, **options))
    cache = engine.cache
    fake = FakeCuda(copy_ticks=60)
    cache.transfers = Transfers(engine.device, [len(m) for m in cache.mem], cuda=fake)  # slots per pool
    where = {id(v): (layer, s) for layer, row in enumerate(cache.views) for s, v in enumerate(row)}
    ready = {id(ev): (layer, s) for layer, row in enumerate(cache.transfers.ready) for s, ev in enumerate(row)}
    fmt, forward, acquire = cache.fmt, cache.fmt.forward, cache.acquire

    def logged_forward(x, views):
        fake.log.append(("kernel", *where.get(id(views), ("cpu", None))))
        return forward(x, views)

    def logged_acquire(layer, experts, decode=False):
        fake.log.append(("acquire", layer, len(x := experts), decode))
        got = acquire(layer, x, decode)
        fake.log.append(("acquired", layer, *got))
        return got

    fmt.forward, cache.acquire = logged_forward, logged_acquire
    return engine, fake, ready


def _steps(log: list[tuple]) -> list[list[tuple]]:
    """The log cut at each acquire: one list per (layer, group) of entries from its acquire on."""
    cuts = [i for i, e in enumerate(log) if e[0] == "acquire"] + [len(log)]
    return [log[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


@pytest.mark.parametrize("prefetch", [1, 2])
def test_demand_copies_go_first_and_resident_experts_are_computed_before_any_wait(ckpts, prefetch):
    ref = Engine.load(ckpts["base"], EngineOptions(cache_experts=3, prefetch=prefetch, slot_pool="layer",
                                                   policy="lru", progress=False))
    want = ref.generate(PROMPT, 12, keep_logits=True)
    engine, fake, ready = _instrumented(ckpts["base"], cache_experts=3, prefetch=prefetch, slot_pool="layer",
                                        policy="lru")
    got = engine.generate(PROMPT, 12, keep_logits=True)
    assert torch.equal(got.logits, want.logits)  # the fake changes the order of nothing that computes
    mixed = 0
    for step in _steps(fake.log):
        layer = step[0][1]
        _, _, slots, on_cpu, late = next(e for e in step if e[0] == "acquired")
        end = next(i for i, e in enumerate(step) if e[0] == "acquired")
        copies = [(e[1], ready[id(e[2])]) for e in step[:end] if e[0] == "copy"]
        kinds = [kind for kind, _ in copies]
        # rule 2: this layer's demand copies, on their own stream, before the prefetches planned at its entry
        assert kinds == sorted(kinds), kinds  # "demand" < "prefetch"
        assert all(dst[0] == layer for kind, dst in copies if kind == "demand")
        predicted_here = {row for row, _ in targets_of(layer, prefetch, engine.config.n_moe_layers)}
        assert all(dst[0] in predicted_here for kind, dst in copies if kind == "prefetch")
        # rule 3: every resident expert's kernel is launched before the first wait for a copy
        rest = step[end:]
        kernels = [i for i, e in enumerate(rest) if e[0] == "kernel"]
        waits = [i for i, e in enumerate(rest) if e[0] in ("host_wait", "stream_wait")]
        resident = [i for i in kernels if not late[slots.index(rest[i][2])]]
        if waits and resident:
            mixed += 1
            assert max(resident) < min(waits)
        for i in waits:  # each wait is for the expert whose kernel comes next
            if rest[i][0] == "stream_wait":
                nxt = next(e for e in rest[i:] if e[0] == "kernel")
                assert ready[id(rest[i][2])] == (layer, nxt[2])
    assert mixed > 0  # the interesting case happened
    assert got.stats["copy_wait_s"] > 0 and got.stats["demand_during_prefetch"] > 0


def test_missed_experts_computed_on_the_cpu_overlap_the_device_experts(ckpts):
    ref = Engine.load(ckpts["base"], EngineOptions(cache_experts=3, prefetch=1, slot_pool="layer", policy="lru",
                                                   progress=False))
    want = ref.generate(PROMPT, 12, keep_logits=True)
    engine, fake, ready = _instrumented(ckpts["base"], cache_experts=3, prefetch=1, miss_policy="cpu",
                                        slot_pool="layer", policy="lru")
    host = engine.cache.transfers.host_event
    got = engine.generate(PROMPT, 12, keep_logits=True)
    assert torch.equal(got.logits, want.logits)
    checked = 0
    for step in _steps(fake.log):
        _, layer, slots, on_cpu, late = next(e for e in step if e[0] == "acquired")
        if not any(on_cpu):
            continue
        sent = next(i for i, e in enumerate(step) if e[0] == "record" and e[2] is host)
        waited = next(i for i, e in enumerate(step) if e[0] == "host_wait" and e[1] is host)
        device = [i for i, e in enumerate(step) if e[0] == "kernel" and e[1] == layer]
        cpu = [i for i, e in enumerate(step) if e[0] == "kernel" and e[1] == "cpu"]
        # rule 4: the hidden state leaves before any device expert; the host waits for it after them
        assert all(sent < i < waited for i in device) and all(i > waited for i in cpu)
        # the missed experts' copies, for later tokens, are not demand copies: nothing waits for them
        missed = {(layer, s) for s, cpu in zip(slots, on_cpu, strict=True) if cpu}
        assert all(e[1] == "prefetch" for e in step if e[0] == "copy" and ready[id(e[2])] in missed)
        checked += bool(device)
    assert checked > 0 and got.stats["cpu_misses"] > 0


def test_a_batched_step_computes_its_misses_on_the_cpu_after_the_device_experts(ckpts):
    """A decode step of three sequences under miss policy cpu, 2 slots: each layer's union of experts
    outnumbers the slots, so it is acquired in groups; every miss of the layer is computed on the CPU
    for the rows that chose it, after all of the layer's device experts (rule 4), and the logits equal
    the fetch policy's batched run bit for bit."""
    jobs = [([1, 415, 2936, 9060, 285], 8), ([1, 851, 4300], 8), ([1, 22557, 28725, 910], 8)]

    def run(engine):
        sched = Scheduler(engine, max_batch=3)
        ids = [sched.add(p, n, keep_logits=True) for p, n in jobs]
        while sched.busy:
            sched.step()
        return [sched.result(rid).logits for rid in ids], sched

    ref = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, prefetch=1, slot_pool="layer", policy="lru",
                                                   progress=False))
    want, _ = run(ref)
    engine, fake, ready = _instrumented(ckpts["base"], cache_experts=2, prefetch=1, miss_policy="cpu",
                                        slot_pool="layer", policy="lru")
    host = engine.cache.transfers.host_event
    got, sched = run(engine)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert max(sched.batch_sizes) == 3
    # one layer of one step: from its first acquire to the next layer's (a decode layer's groups stay together)
    cuts, last = [], None
    for i, e in enumerate(fake.log):
        if e[0] == "acquire":
            if not (e[3] and last == (e[1], True)):
                cuts.append(i)
            last = (e[1], e[3])
    checked = 0
    for a, b in zip(cuts, cuts[1:] + [len(fake.log)], strict=True):
        step = fake.log[a:b]
        got_ = [e for e in step if e[0] == "acquired"]
        if not step[0][3] or len(got_) < 2 or not any(cpu for e in got_ for cpu in e[3]):
            continue  # a prefill, or a layer whose union fits its slots, or without misses
        layer = step[0][1]
        sent = next(i for i, e in enumerate(step) if e[0] == "record" and e[2] is host)
        waited = next(i for i, e in enumerate(step) if e[0] == "host_wait" and e[1] is host)
        device = [i for i, e in enumerate(step) if e[0] == "kernel" and e[1] == layer]
        cpu = [i for i, e in enumerate(step) if e[0] == "kernel" and e[1] == "cpu"]
        assert sent < min(device) and max(device) < waited < min(cpu)
        assert len(cpu) == sum(cpu for e in got_ for cpu in e[3])  # one CPU forward per missed expert
        # each group's missed experts' copies are not demand copies (a group's demand copies: prefetches of its
        # hits not yet on the link, hurried)
        starts = [i for i, e in enumerate(step) if e[0] == "acquire"] + [len(step)]
        for a_, b_ in zip(starts, starts[1:], strict=False):
            group = next(e for e in step[a_:b_] if e[0] == "acquired")
            missed = {(layer, s) for s, cpu in zip(group[2], group[3], strict=True) if cpu}
            assert all(e[1] == "prefetch" for e in step[a_:b_] if e[0] == "copy" and ready[id(e[2])] in missed)
        checked += 1
    assert checked > 0 and engine.cache.counters.cpu_misses > 0


def test_a_pool_shared_by_the_layers_keeps_the_rules(ckpts):
    """One pool for every layer (the default): every copy goes to a slot of it, a copy into a slot lands after
    the copy before it there (rule 1), and the logits are the per-layer caches' bit for bit."""
    ref = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, prefetch=1, slot_pool="layer", policy="lru",
                                                   progress=False))
    want = ref.generate(PROMPT, 12, keep_logits=True)
    engine, fake, ready = _instrumented(ckpts["base"], cache_experts=2, prefetch=1, slot_pool="global")
    got = engine.generate(PROMPT, 12, keep_logits=True)
    assert torch.equal(got.logits, want.logits)
    copies = [e for e in fake.log if e[0] == "copy"]
    assert len(engine.cache.mem) == 1 and copies and {ready[id(e[2])][0] for e in copies} == {0}
    before: dict[int, tuple] = {}
    for e in copies:
        slot = ready[id(e[2])][1]
        assert slot not in before or e[3] >= before[slot][4]
        before[slot] = e
    assert got.stats["slot_pool"] == "global" and got.stats["copy_wait_s"] > 0


# -- on a GPU -----------------------------------------------------------------------------------------
@gpu
def test_gpu_a_copy_never_overwrites_a_slot_a_queued_kernel_reads():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    t = Transfers(device, [1])
    dst = torch.ones(2**20, device=device)
    src = torch.full((2**20,), 2.0).pin_memory()
    with torch.cuda.device(device):
        torch.cuda._sleep(200_000_000)  # the reader is late
        seen = dst.clone()
        t.mark_free(0, 0)
        t.copy(dst, src, 0, 0, demand=True)
        torch.cuda.synchronize(device)
    assert seen.eq(1.0).all() and dst.eq(2.0).all()


@gpu
def test_gpu_compute_reads_a_slot_only_after_its_copy():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    t = Transfers(device, [1])
    dst = torch.zeros(2**20, device=device)
    src = torch.full((2**20,), 3.0).pin_memory()
    with torch.cuda.device(device):
        with torch.cuda.stream(t.prefetch):
            torch.cuda._sleep(200_000_000)  # the copy is late
        t.copy(dst, src, 0, 0, demand=False)
        t.wait_ready(0, 0)
        seen = dst.clone()
        torch.cuda.synchronize(device)
    assert seen.eq(3.0).all()


@gpu
@pytest.mark.parametrize("miss_policy", ["fetch", "cpu"])
def test_gpu_engine_on_every_device_matches_the_cpu(ckpts, miss_policy):
    want = Engine.load(ckpts["base"], EngineOptions(device="cpu", progress=False)).generate(PROMPT, 8,
                                                                                           keep_logits=True)
    for i in range(torch.cuda.device_count()):
        engine = Engine.load(ckpts["base"], EngineOptions(device=f"cuda:{i}", dtype="float32", cache_experts=2,
                                                          prefetch=1, miss_policy=miss_policy, progress=False))
        got = engine.generate(PROMPT, 8, keep_logits=True)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-3, atol=1e-3)
