"""The engine and the simulator agree: a recorded trace replayed with the same slots and policy
gives exactly the engine's live hit and miss counts, per layer."""

from __future__ import annotations

import numpy as np
import pytest

from offload_moe.engine import Engine, EngineOptions
from offload_moe.simulate import simulate
from offload_moe.trace import load_trace, save_trace


@pytest.mark.parametrize("slots,policy,prefetch", [(2, "lru", 0), (3, "lru", 1), (3, "lfu", 0), (2, "fifo", 1),
                                                   ([2, 4, 3], "lru", 1)])
def test_replaying_the_trace_gives_the_live_counts(ckpts, tmp_path, slots, policy, prefetch):
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=slots, policy=policy, prefetch=prefetch))
    engine.start_trace("base")
    stats = engine.generate([1], max_new_tokens=40).stats  # a one-token prompt: every step is one token
    path = tmp_path / "run.trace"
    save_trace(path, engine.stop_trace())
    trace = load_trace(path)
    assert trace.experts.shape == (40, 3, 2)  # the prompt token and 39 generated ones went through the model
    replay = simulate(trace, slots, policy, prefetch=prefetch)
    assert replay["per_layer_hits"] == stats["per_layer_hits"]
    assert replay["per_layer_misses"] == stats["per_layer_misses"]
    if prefetch:
        assert replay["prefetch_copies"] == stats["prefetch_copies"]
        assert replay["prefetch_recall"] == pytest.approx(stats["prefetch_recall"])
        assert replay["prefetch_precision"] == pytest.approx(stats["prefetch_precision"])


def test_trace_records_choices_weights_and_one_layer_ahead_predictions(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(prefetch=0))
    engine.start_trace()
    engine.generate([1, 415, 2936, 9060], max_new_tokens=5)
    trace = engine.stop_trace()
    assert trace.experts.shape == (8, 3, 2)  # 4 prompt tokens + 4 decode steps
    assert (trace.predicted[:, 0] == -1).all() and (trace.predicted[:, 1:] >= 0).all()
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, rtol=1e-5)
    assert (trace.weights[..., 0] >= trace.weights[..., 1]).all()  # rank order
    assert "config" in trace.metadata
