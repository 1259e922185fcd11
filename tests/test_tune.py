"""The tuner's pure parts: slot spreading (exact knapsack), the cost model, the profile it writes."""

from __future__ import annotations

import itertools
import tomllib

import numpy as np
import pytest

from offload_moe.trace import Trace
from offload_moe.tune import MIXTRAL_8X7B, spread_slots, to_toml, token_seconds, tune

HW = {"h2d_bytes_per_s": 25e9, "device_bytes_per_s": 800e9, "cpu_bytes_per_s": 40e9}


def test_spread_slots_is_the_exact_optimum():
    # hits[s][layer] for 3 layers, slots 2..4: layer 1 gains most from extra slots
    hits = {2: [10, 10, 10], 3: [11, 18, 12], 4: [12, 25, 13]}
    best = spread_slots(hits, total=8, top_k=2, num_experts=4)
    brute = max((a for a in itertools.product(range(2, 5), repeat=3) if sum(a) <= 8),
                key=lambda a: sum(hits[s][i] for i, s in enumerate(a)))
    assert best == list(brute) == [2, 4, 2]


def test_spread_slots_refuses_a_budget_below_top_k():
    from offload_moe.errors import UserError

    with pytest.raises(UserError):
        spread_slots({2: [1, 1]}, total=3, top_k=2, num_experts=2)


def test_cost_model_orders_the_levers():
    fp16 = MIXTRAL_8X7B.expert_params * 2
    int4 = fp16 // 4
    # fewer misses is faster; a smaller expert is cheaper to copy; the CPU wins for a slow link
    assert token_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, "fetch") < token_seconds(MIXTRAL_8X7B, fp16, HW, 20, 0, "fetch")
    assert token_seconds(MIXTRAL_8X7B, int4, HW, 10, 0, "fetch") < token_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, "fetch")
    slow_link = dict(HW, h2d_bytes_per_s=4e9)
    assert token_seconds(MIXTRAL_8X7B, fp16, slow_link, 10, 0, "cpu") < token_seconds(
        MIXTRAL_8X7B, fp16, slow_link, 10, 0, "fetch")
    assert token_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, "auto") == min(
        token_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, m) for m in ("fetch", "cpu"))
    # with no misses a token costs its compute: dense + 64 experts read at device bandwidth
    compute = (MIXTRAL_8X7B.dense_params * 2 + 64 * fp16) / HW["device_bytes_per_s"]
    assert token_seconds(MIXTRAL_8X7B, fp16, HW, 0, 0, "fetch") == pytest.approx(compute)


def test_profile_writer_round_trips_through_tomllib():
    data = {"description": 'a "quoted" name', "cache_experts": [2, 3, 4], "prefetch": 1, "policy": "lru",
            "budget": {"device": "24.00GiB"}, "hardware": {"h2d_bytes_per_s": 2.5e10}}
    assert tomllib.loads(to_toml(data)) == data


def test_int8_attention_buys_expert_slots_and_reads_fewer_bytes():
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(64 * 32)]).reshape(64, 32, 2)  # [T*L, K] -> [T, L, K]
    trace = Trace(experts.astype(np.int32), np.full((64, 32, 2), 0.5, np.float32), np.full((64, 32, 2), -1, np.int32),
                  8, 2, 32, "random")
    _, _, out = tune(trace, MIXTRAL_8X7B, 24 * 2**30, HW, policies=("lru",), log=lambda *_: None)
    slots = {a: max(sum(c.slots) for c in out if c.precision == "int4" and c.attention == a) for a in ("none", "int8")}
    # Mixtral's attention: 2.5 GiB in fp16, 1.3 GiB in int8: room for 13 more int4 experts (94.5 MiB)
    assert slots["int8"] - slots["none"] == 13
    fp16 = MIXTRAL_8X7B.expert_params * 2
    assert token_seconds(MIXTRAL_8X7B, fp16, HW, 0, 0, "fetch", "int8") < token_seconds(
        MIXTRAL_8X7B, fp16, HW, 0, 0, "fetch", "none")
