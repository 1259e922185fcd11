"""The tuner's pure parts: slot spreading (exact knapsack), the cost model, the profile it writes."""

from __future__ import annotations

import itertools
import tomllib

import pytest

from offload_moe.tune import MIXTRAL_8X7B, spread_slots, to_toml, token_seconds

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
