"""The engine and the simulator agree: a recorded trace replayed with the same slots and policy
gives exactly the engine's live hit and miss counts, per layer."""

from __future__ import annotations

import numpy as np
import pytest

from offload_moe.cli.entry import main
from offload_moe.engine import Engine
from offload_moe.options import EngineOptions
from offload_moe.planning.replay import simulate
from offload_moe.planning.trace import load_trace, save_trace


@pytest.fixture(scope="module")
def learned(ckpts, tmp_path_factory) -> dict[int, str]:
    """Learned predictors for the base model, one and two layers ahead, fitted on a trace with hidden states."""
    engine = Engine.load(ckpts["base"], EngineOptions(prefetch=0))
    engine.start_trace("base", hidden=True)
    engine.generate([1, 415, 2936], max_new_tokens=60)
    folder = tmp_path_factory.mktemp("predictors")
    save_trace(folder / "h.trace", engine.stop_trace())
    out = {}
    for lead in (1, 2):
        out[lead] = str(folder / f"lead{lead}.pred")
        assert main(["train-predictor", str(folder / "h.trace"), "--out", out[lead], "--lead", str(lead),
                     "--steps", "30", "--holdout", "0", "--json"]) == 0
    return out


@pytest.mark.parametrize("slots,policy,prefetch,predictor,width,pool", [
    (2, "lru", 0, "router", 0, "layer"), (3, "lru", 1, "router", 0, "layer"), (3, "lfu", 0, "router", 0, "layer"),
    (2, "fifo", 1, "router", 0, "layer"), ([2, 4, 3], "lru", 1, "router", 0, "layer"),
    (3, "lru", 1, "router", 2, "layer"), (3, "lru", 2, "router", 0, "layer"), (3, "lru", 1, "learned", 0, "layer"),
    ([2, 4, 3], "fifo", 2, "learned", 3, "layer"), (3, "random", 1, "learned", 2, "layer"),
    (3, "lrfu", 1, "router", 0, "layer"), (2, "arc", 1, "learned", 0, "layer"), (3, "arc", 0, "router", 0, "layer"),
    (3, "learned", 1, "router", 0, "layer"), (2, "predicted", 1, "router", 0, "layer"),
    (2, "lru", 0, "router", 0, "global"), (3, "lru", 1, "router", 0, "global"),
    ([2, 4, 3], "learned", 1, "learned", 0, "global"), (2, "lrfu", 2, "learned", 0, "global"),
    (3, "arc", 1, "router", 0, "global"), (2, "least-stale", 1, "router", 0, "global"),
    (2, "predicted", 2, "learned", 0, "global"), (3, "random", 0, "router", 0, "global"),
    (2, "lfu", 1, "router", 2, "global"),
])
def test_replaying_the_trace_gives_the_live_counts(ckpts, learned, tmp_path, slots, policy, prefetch, predictor,
                                                   width, pool):
    """For every predictor, lead and width, policy and slot pool: the recorded predictions replayed give the live
    counts, per layer."""
    predictor = learned[prefetch] if predictor == "learned" else predictor
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=slots, policy=policy, prefetch=prefetch,
                                                      predictor=predictor, prefetch_width=width, slot_pool=pool))
    engine.start_trace("base")
    stats = engine.generate([1], max_new_tokens=40).stats  # a one-token prompt: every step is one token
    path = tmp_path / "run.trace"
    save_trace(path, engine.stop_trace())
    trace = load_trace(path)
    assert trace.experts.shape == (40, 3, 2)  # the prompt token and 39 generated ones went through the model
    replay = simulate(trace, slots, policy, prefetch=min(prefetch, 1), pool=pool)  # the recorded predictions
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
    # layer 0 is predicted from the previous token's last layer: for the first decode step from the prompt's last
    # token, not inside the prompt (one forward); the other layers from the layer before, for every token
    assert (trace.predicted[:4, 0] == -1).all() and (trace.predicted[4:, 0] >= 0).all()
    assert (trace.predicted[:, 1:] >= 0).all() and trace.metadata["prefetch_lead"] == "1"
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, rtol=1e-5)
    assert (trace.weights[..., 0] >= trace.weights[..., 1]).all()  # rank order
    assert "config" in trace.metadata


def test_a_trace_carries_the_engines_predictions_at_any_residency(ckpts, learned):
    """With every expert resident the engine has no prefetcher, yet its trace records what its predictor (here a
    learned one, at its lead) would prefetch: the very predictions a run at 3 slots records and prefetches, so
    `simulate --prefetch 1` replays the engine as it runs, and the trace says the engine prefetches."""
    traces = []
    for slots in (None, 3):
        engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=slots, prefetch=1, predictor=learned[1]))
        assert (engine.model.prefetcher is None) == (slots is None)
        engine.start_trace("base")
        engine.generate([1, 415], max_new_tokens=12)
        traces.append(engine.stop_trace())
    full, cached = traces
    np.testing.assert_array_equal(full.experts, cached.experts)  # offloading changes no bit
    np.testing.assert_array_equal(full.predicted, cached.predicted)
    assert full.metadata["prefetch"] == full.metadata["prefetch_lead"] == "1"
    off = Engine.load(ckpts["base"], EngineOptions(prefetch=0, predictor=learned[1]))
    off.start_trace("base")
    off.generate([1, 415], max_new_tokens=4)
    assert off.stop_trace().metadata["prefetch"] == "0"  # prefetch off: the router one layer ahead, as before
