"""The tuner's pure parts: slot spreading (exact knapsack), the cost model, the profile it writes."""

from __future__ import annotations

import itertools
import tomllib

import numpy as np
import pytest
import torch

from offload_moe.quant import bytes_per_expert
from offload_moe.trace import Trace
from offload_moe.tune import MIXTRAL_8X7B, spread_slots, step_seconds, to_toml, tune

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
    assert step_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, "fetch") < step_seconds(MIXTRAL_8X7B, fp16, HW, 20, 0, "fetch")
    assert step_seconds(MIXTRAL_8X7B, int4, HW, 10, 0, "fetch") < step_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, "fetch")
    slow_link = dict(HW, h2d_bytes_per_s=4e9)
    assert step_seconds(MIXTRAL_8X7B, fp16, slow_link, 10, 0, "cpu") < step_seconds(
        MIXTRAL_8X7B, fp16, slow_link, 10, 0, "fetch")
    assert step_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, "auto") == min(
        step_seconds(MIXTRAL_8X7B, fp16, HW, 10, 0, m) for m in ("fetch", "cpu"))
    # with no misses a token costs its compute: dense + 64 experts read at device bandwidth
    compute = (MIXTRAL_8X7B.dense_params * 2 + 64 * fp16) / HW["device_bytes_per_s"]
    assert step_seconds(MIXTRAL_8X7B, fp16, HW, 0, 0, "fetch") == pytest.approx(compute)


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
    assert step_seconds(MIXTRAL_8X7B, fp16, HW, 0, 0, "fetch", "int8") < step_seconds(
        MIXTRAL_8X7B, fp16, HW, 0, 0, "fetch", "none")


def random_trace(tokens: int = 64) -> Trace:
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(tokens * 32)]).reshape(tokens, 32, 2)
    return Trace(experts.astype(np.int32), np.full((tokens, 32, 2), 0.5, np.float32),
                 np.full((tokens, 32, 2), -1, np.int32), 8, 2, 32, "random")


def test_calibrate_measures_each_expert_format_on_the_cpu():
    """One expert's decode forward per format, as weights per second, on the device and the CPU (one
    measurement on a CPU device); the figures survive a profile's TOML and `hardware_of`."""
    from offload_moe.profiles import Profile
    from offload_moe.tune import calibrate, hardware_of, rate_key

    hw = calibrate(torch.device("cpu"), dim=128, ffn=256, dtype=torch.float32, repeats=1)
    for precision in ("none", "int8", "int4"):
        for where in ("device", "cpu"):
            assert hw[rate_key(where, precision)] > 0
        assert hw[rate_key("device", precision)] == hw[rate_key("cpu", precision)]
    assert {"h2d_bytes_per_s", "device_bytes_per_s", "cpu_bytes_per_s"} <= set(hw)
    assert "D=128 I=256" in hw["measured_on"] and "fp32 int8-g64 int4-g64" in hw["measured_on"]
    table = tomllib.loads(to_toml({"hardware": hw}))["hardware"]
    assert hardware_of(Profile("p", {}, hardware=table)) == hw


def test_cost_model_reads_measured_rates():
    from offload_moe.tune import rate_key

    int4 = bytes_per_expert(MIXTRAL_8X7B, "int4")
    measured = dict(HW, **{rate_key("device", "int4"): 2e11, rate_key("cpu", "int4"): 5e9})
    dense = MIXTRAL_8X7B.dense_params * 2 / HW["device_bytes_per_s"]
    per_expert = MIXTRAL_8X7B.expert_params / 2e11  # not int4's bytes over the bandwidth
    assert step_seconds(MIXTRAL_8X7B, int4, measured, 0, 0, "fetch", precision="int4") == pytest.approx(
        dense + 64 * per_expert)
    cpu_miss = MIXTRAL_8X7B.expert_params / 5e9
    assert step_seconds(MIXTRAL_8X7B, int4, measured, 1, 0, "cpu", precision="int4") == pytest.approx(
        dense + 64 * per_expert + cpu_miss)
    # without a precision, or for a precision the profile has no figure for: bytes over bandwidth, as before
    assert step_seconds(MIXTRAL_8X7B, int4, measured, 0, 0, "fetch") == step_seconds(
        MIXTRAL_8X7B, int4, HW, 0, 0, "fetch", precision="int4")


def test_tuner_prefers_the_format_the_measured_rates_favour():
    """A budget where every format caches every expert (misses are the first use of each), so compute
    decides: by bytes int4 wins; where the profile says int4 runs slowly on the device (a dequantizing path), the tuner
    follows the figures. Without figures it says that it falls back to bytes."""
    from offload_moe.tune import rate_key

    trace = random_trace()
    logged: list[str] = []
    best, _, _ = tune(trace, MIXTRAL_8X7B, 200 * 2**30, HW, policies=("lru",), log=logged.append)
    assert best.precision == "int4" and best.slots == [8] * 32
    assert any("falls back" in line and "int4" in line for line in logged)
    rates = {"none": 8e11, "int8": 1.2e12, "int4": 1e11}  # weights per second: int4 rebuilt in fp16, 8x slower
    measured = dict(HW, **{rate_key(w, p): r for p, r in rates.items() for w in ("device", "cpu")})
    logged.clear()
    best, _, everything = tune(trace, MIXTRAL_8X7B, 200 * 2**30, measured, policies=("lru",), log=logged.append)
    assert best.precision == "int8" and not any("falls back" in line for line in logged)
    fastest = {p: min(c.seconds_per_token for c in everything if c.precision == p) for p in rates}
    assert fastest["int8"] < fastest["none"] < fastest["int4"]


def test_card_profiles_hold_no_unmeasured_compute_rates():
    """No card was measured for them: the tuner must say it falls back, not read invented figures."""
    from offload_moe.profiles import load_profile
    from offload_moe.tune import hardware_of, rate_notes

    for name in ("24gb", "16gb", "12gb"):
        hw = hardware_of(load_profile(name))
        assert not any(k.endswith(("_weights_per_s_none", "_weights_per_s_int8", "_weights_per_s_int4")) for k in hw)
        assert len(rate_notes(hw)) == 2  # device and CPU


def test_tuning_for_a_batch_replays_b_streams_and_prices_the_whole_step(tmp_path, capsys):
    """--batch B: each candidate's hits and copies are batch_sim's replay of the trace as B streams (the
    engine's eviction rule); the step computes the union of the B tokens' experts per layer (more than
    one token's L*K, fewer than B times that), costs `step_seconds` of those per-step counts, and its
    tokens/s count all B; the KV cache of B sequences comes off the budget (fewer slots fit)."""
    from conftest import run_cli

    from offload_moe.batch_sim import simulate_batch
    from offload_moe.trace import save_trace

    trace, B = random_trace(96), 4
    budget, reserve, context = 20 * 2**30, 2**30, 4096  # 15.5 GiB for int4 slots of 2.95 GiB a layer: 5; 14.0: 4
    _, _, alone = tune(trace, MIXTRAL_8X7B, budget, HW, reserve, context, policies=("lru",), log=lambda _: None)
    _, _, batched = tune(trace, MIXTRAL_8X7B, budget, HW, reserve, context, policies=("lru",), log=lambda _: None,
                         batch=B)
    int4 = bytes_per_expert(MIXTRAL_8X7B, "int4", 64, torch.float16)

    def uniform(cands):
        return max(c.slots[0] for c in cands if (c.precision, c.attention, len(set(c.slots))) == ("int4", "none", 1))

    assert uniform(alone) == 5 and uniform(batched) == 4
    c = next(c for c in batched if (c.precision, c.attention, c.slots, c.prefetch, c.miss_policy) ==
             ("int4", "none", [4] * 32, 0, "fetch"))
    r = simulate_batch(trace, 4, "lru", B)
    steps = r["forwards"]
    assert steps == 96 // B and c.batch == B and c.hit_rate == r["hit_rate"]
    experts = r["accesses"] / steps
    assert 32 * 2 < experts < B * 32 * 2
    want = step_seconds(MIXTRAL_8X7B, int4, HW, r["misses"] / steps, 0, "fetch", precision="int4", experts=experts)
    assert c.seconds_per_step == pytest.approx(want) and c.tokens_per_s == pytest.approx(B / want)
    assert "ms per step of 4" in c.describe()
    path = tmp_path / "t.trace"
    save_trace(path, trace)
    code, out, err = run_cli(capsys, "tune", "--trace", str(path), "--budget", "20GB", "--reserve", "1GB", "--batch",
                             "4")
    assert code == 0, err
    assert "batch 4" in out and "over 4 sequences (serve --max-batch 4)" in out
    code, _, err = run_cli(capsys, "tune", "--trace", str(path), "--budget", "20GB", "--batch", "0")
    assert code == 1 and "--batch must be 1 or more" in err
