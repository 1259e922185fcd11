"""`batch_sim`: replaying a trace as batched forwards gives the engine's own counts, and at batch 1
exactly what `simulate` gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from offload_moe.batch import Scheduler
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.offload.eviction import POLICIES
from offload_moe.options import EngineOptions
from offload_moe.planning.batch_replay import batch_forwards, recorded_forwards, replay_forwards, simulate_batch
from offload_moe.planning.replay import simulate
from offload_moe.planning.trace import Trace

KEYS = ("hits", "misses", "per_layer_hits", "prefetch_copies", "prefetch_hits")


def random_trace(T=60, L=3, K=2, E=8, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    # skewed routing, so that caches matter: experts drawn from a per-layer Zipf-like law
    p = 1.0 / np.arange(1, E + 1)
    p /= p.sum()
    ex = np.stack([[rng.choice(E, K, replace=False, p=p) for _ in range(L)] for _ in range(T)]).astype(np.int32)
    pred = np.stack([[rng.choice(E, K, replace=False, p=p) for _ in range(L)] for _ in range(T)]).astype(np.int32)
    pred[:, 0] = -1
    return Trace(ex, np.full(ex.shape, 0.5, np.float32), pred, E, K, L, "test")


def test_batch_forwards():
    assert batch_forwards(7, 1) == [[t] for t in range(7)]
    assert batch_forwards(7, 2) == [[0, 4], [1, 5], [2, 6], [3]]
    assert sum(len(f) for f in batch_forwards(100, 8)) == 100
    with pytest.raises(UserError):
        batch_forwards(5, 0)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prefetch", [0, 1])
def test_batch_one_is_simulate(policy, prefetch):
    trace = random_trace()
    for slots in (2, 3, 5):
        want = simulate(trace, slots, policy, prefetch)
        got = simulate_batch(trace, slots, policy, 1, prefetch)
        assert {k: got[k] for k in KEYS} == {k: want[k] for k in KEYS}, (slots,)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_batch_larger_than_the_slots(policy):
    """Four streams' union exceeds top-k slots: split into groups as the engine does, never stuck."""
    trace = random_trace(T=80, K=2, E=8, seed=1)
    one = simulate_batch(trace, 2, policy, 1, 1)
    four = simulate_batch(trace, 2, policy, 4, 1)
    assert four["forwards"] == 20
    assert four["accesses"] < one["accesses"] == 80 * 3 * 2  # shared experts are accessed once per forward
    full = simulate_batch(trace, 8, policy, 4, 0)
    assert full["misses"] == len({(layer, e) for layer in range(3) for e in trace.experts[:, layer].ravel()})


@pytest.mark.parametrize("slots,policy,prefetch,pool", [
    (2, "lru", 1, "layer"), (3, "lfu", 0, "layer"), (4, "fifo", 1, "layer"), (2, "lru", 0, "layer"),
    (2, "lru", 1, "global"), (2, "learned", 1, "global"), (3, "predicted", 2, "global"), (2, "arc", 0, "global"),
])
def test_replay_of_the_engines_forwards_equals_its_counts(ckpts, slots, policy, prefetch, pool):
    """The Scheduler's real forwards (chunked prefills, batched decodes of 1-3 sequences) replayed from the
    trace give exactly the engine's live hits, misses and prefetch counts, per layer or in a shared pool."""
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=slots, policy=policy, prefetch=prefetch,
                                                      slot_pool=pool, progress=False))
    engine.start_trace()
    recorder = engine.model.recorder.recorder
    sched = Scheduler(engine, max_batch=3, prefill_chunk=4)
    jobs = [([1, 415, 2936, 9060, 285, 1142], 8), ([1, 851], 5), ([1, 22557, 28725], 9), ([1], 6)]
    for step in range(100):
        if step < len(jobs):
            sched.add(*jobs[step])
        if step >= len(jobs) and not sched.busy:
            break
        sched.step()
    trace = engine.stop_trace()
    forwards = recorded_forwards(trace)
    assert [len(f) for f in forwards] == [chunk[0].shape[0] for chunk in recorder._chunks]
    assert max(len(f) for f in forwards) > 1
    got = replay_forwards(trace, forwards, slots, policy, min(prefetch, 1), pool=pool)
    table = engine.cache.table
    assert got["per_layer_hits"] == table.hits
    assert got["per_layer_misses"] == table.misses
    assert got["prefetch_copies"] == sum(table.prefetch_copies)
    assert got["prefetch_hits"] == sum(table.prefetch_hits)


def test_simulate_command_batch(tmp_path, capsys):
    from conftest import run_cli

    from offload_moe.planning.trace import save_trace

    path = tmp_path / "t.safetensors"
    save_trace(path, random_trace(T=90, seed=2))
    code, out, _ = run_cli(capsys, "simulate", "--trace", str(path), "--slots", "2,4", "--batch", "3", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["batch"] == 3 and all(r["forwards"] == 30 for r in got["results"])
    lru = next(r for r in got["results"] if r["policy"] == "lru" and r["slots"] == 2)
    assert lru["hits"] == simulate_batch(random_trace(T=90, seed=2), 2, "lru", 3, pool=got["pool"])["hits"]
    code, out, _ = run_cli(capsys, "simulate", "--trace", str(path), "--batch", "3", "--prefetch", "1")
    assert code == 0 and "batch 3: the trace as 3 streams stepped together, 30 forwards" in out
    code, _, err = run_cli(capsys, "simulate", "--trace", str(path), "--batch", "0")
    assert code == 1 and "--batch must be 1 or more" in err


def test_recorded_forwards_survive_the_file(tmp_path):
    from offload_moe.planning.trace import TraceRecorder, load_trace, save_trace

    rec = TraceRecorder(1, 2, 4, "m")
    for T in (3, 1, 2):
        rec.add(0, torch.zeros(T, 2, dtype=torch.long) + torch.tensor([0, 1]), torch.full((T, 2), 0.5))
    save_trace(tmp_path / "t", rec.finish())
    back = load_trace(tmp_path / "t")
    assert recorded_forwards(back) == [[0, 1, 2], [3], [4, 5]]
    with pytest.raises(UserError, match="forward_tokens"):
        recorded_forwards(random_trace())
