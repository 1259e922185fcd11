"""The tuner's pure parts: slot spreading (exact knapsack), the cost model, the profile it writes."""

from __future__ import annotations

import itertools
import json
import tomllib

import numpy as np
import pytest
import torch

from offload_moe.formats.registry import bytes_per_expert
from offload_moe.planning.costs import MIXTRAL_8X7B, step_seconds
from offload_moe.planning.trace import Trace
from offload_moe.planning.tune import spread_slots, to_toml, tune

HW = {"h2d_bytes_per_s": 25e9, "device_bytes_per_s": 800e9, "cpu_bytes_per_s": 40e9}
MIXTRAL = {"config": json.dumps(MIXTRAL_8X7B.to_dict())}  # the model shape a recorded trace carries


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
                 np.full((tokens, 32, 2), -1, np.int32), 8, 2, 32, "random", dict(MIXTRAL))


def test_calibrate_measures_each_expert_format_on_the_cpu():
    """One expert's decode forward per format, as weights per second, on the device and the CPU (one
    measurement on a CPU device); the figures survive a profile's TOML and `hardware_of`."""
    from offload_moe.planning.calibrate import calibrate
    from offload_moe.planning.costs import hardware_of, rate_key
    from offload_moe.profiles import Profile

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
    from offload_moe.planning.costs import rate_key

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
    from offload_moe.planning.costs import rate_key

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
    from offload_moe.planning.costs import hardware_of, rate_notes
    from offload_moe.profiles import load_profile

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

    from offload_moe.planning.batch_replay import simulate_batch
    from offload_moe.planning.trace import save_trace

    trace, B = random_trace(96), 4
    budget, reserve, context = 20 * 2**30, 2**30, 4096  # 15.5 GiB for int4 slots of 2.95 GiB a layer: 5; 14.0: 4
    _, _, alone = tune(trace, MIXTRAL_8X7B, budget, HW, reserve, context, policies=("lru",), log=lambda _: None)
    _, _, batched = tune(trace, MIXTRAL_8X7B, budget, HW, reserve, context, policies=("lru",), log=lambda _: None,
                         batch=B)
    int4 = bytes_per_expert(MIXTRAL_8X7B, "int4", 64, torch.float16)

    def uniform(cands):
        return max(c.slots[0] for c in cands if (c.precision, c.attention, len(set(c.slots))) == ("int4", "none", 1))

    assert uniform(alone) == 5 and uniform(batched) == 4
    c = next(c for c in batched if (c.precision, c.attention, c.slots, c.pool, c.prefetch, c.miss_policy) ==
             ("int4", "none", [4] * 32, "layer", 0, "fetch"))
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


# -- scoring the winner on held-out routing (validate.py) ----------------------------------------

def shifting_trace(head: int = 192, tail: int = 64) -> Trace:
    """Mixtral's shape. In the head even layers cycle through all 8 experts in pairs and odd layers keep
    experts 0-1 (slots spread 8/2 hit nearly always); in the tail it is the other way round (4-5 kept)."""
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int32)
    experts = np.empty((head + tail, 32, 2), np.int32)
    cycle = pairs[np.arange(head + tail) % 4]  # [T, K]
    experts[:head, 0::2], experts[:head, 1::2] = cycle[:head, None], pairs[0]
    experts[head:, 0::2], experts[head:, 1::2] = pairs[2], cycle[head:, None]
    shape = experts.shape
    return Trace(experts, np.full(shape, 0.5, np.float32), np.full(shape, -1, np.int32), 8, 2, 32, "shifting",
                 dict(MIXTRAL))


def test_split_falls_between_prompts_or_forwards_and_slices_them_consistently():
    from offload_moe.planning.trace import slice_trace
    from offload_moe.planning.validate import split_point

    rng = np.random.default_rng(1)
    for _ in range(20):
        sizes = np.concatenate([[rng.integers(20, 120)] + [1] * int(rng.integers(0, 40)) for _ in range(6)])
        trace = random_trace(int(sizes.sum()))
        trace.tensors["forward_tokens"] = sizes.astype(np.int64)
        fraction = float(rng.uniform(0.1, 0.5))
        cut, kind = split_point(trace, fraction)
        ends = np.cumsum(sizes)
        assert kind == "forward passes" and cut in ends[:-1]  # never inside a forward
        T = trace.num_tokens
        assert abs((T - cut) - fraction * T) == np.abs((T - ends[:-1]) - fraction * T).min()  # the nearest one
        head, tail = slice_trace(trace, 0, cut), slice_trace(trace, cut, T)
        np.testing.assert_array_equal(np.concatenate([head.tensors["forward_tokens"], tail.tensors["forward_tokens"]]),
                                      sizes)
        assert head.tensors["forward_tokens"].sum() == head.num_tokens == cut
        np.testing.assert_array_equal(tail.experts, trace.experts[cut:])
    # prompts come first; a cut inside a forward drops forward_tokens rather than mislabel it
    trace = random_trace(300)
    trace.tensors.update(prompt_lengths=np.array([100, 100, 100]), forward_tokens=np.array([150, 150]))
    assert split_point(trace, 0.25) == (200, "prompts")
    assert set(slice_trace(trace, 200, 300).tensors) == {"prompt_lengths"}
    assert split_point(random_trace(100), 0.25) == (75, "tokens")


def test_held_out_tail_that_routes_differently_scores_lower():
    from offload_moe.planning.validate import scores, validation_split

    trace = shifting_trace()
    split = validation_split(trace, "t", None)
    assert (split.fit.num_tokens, split.held_out.num_tokens) == (192, 64)
    best, default, _ = tune(split.fit, MIXTRAL_8X7B, 20 * 2**30, HW, 2**30, policies=("lru",), log=lambda _: None,
                            pools=("layer",))
    assert best.slots[0::2] == [8] * 16 and max(best.slots[1::2]) < 8  # spread by the head's hit curves
    s = scores(split, MIXTRAL_8X7B, HW, best, default)
    fit, held = s["fitted"]["best"], s["held_out"]["best"]
    assert fit["hit_rate"] > 0.95 and held["hit_rate"] < 0.6 and held["tokens_per_s"] < 0.8 * fit["tokens_per_s"]
    # on the tail the spread hits no more than the uniform default, and its 10x lead is gone
    held_default = s["held_out"]["default"]
    assert held["hit_rate"] <= held_default["hit_rate"] and s["fitted"]["default"]["hit_rate"] < 0.55
    assert fit["tokens_per_s"] > 10 * s["fitted"]["default"]["tokens_per_s"]
    # what lead is left is the winner's miss handling (cpu), not its slots: the timed replay runs CPU misses beside
    # the link (the cost model, which scored this before, added them to the compute, and the lead was under 1.2x)
    assert held["tokens_per_s"] < 2 * held_default["tokens_per_s"]


def test_tune_cli_prints_and_writes_both_figures(tmp_path, capsys):
    from conftest import run_cli

    from offload_moe.planning.trace import save_trace

    path, short, other = tmp_path / "t.trace", tmp_path / "short.trace", tmp_path / "o.trace"
    save_trace(path, shifting_trace())
    save_trace(short, random_trace(100))
    code, out, err = run_cli(capsys, "tune", "--trace", str(path), "--budget", "20GB", "--reserve", "1GB", "--json",
                             "--out", str(tmp_path / "p.toml"))
    assert code == 0, err
    d = json.loads(out)
    assert d["fitted"]["tokens"] == 192 and d["held_out"]["tokens"] == 64
    assert {"hit_rate", "tokens_per_s"} <= set(d["held_out"]["best"]) | set(d["held_out"]["default"])
    assert d["held_out"]["best"]["hit_rate"] < d["fitted"]["best"]["hit_rate"]
    header = (tmp_path / "p.toml").read_text().split("\ndescription")[0]
    assert "scored on the last 64" in header and "held out (64 tokens)" in header
    assert tomllib.loads((tmp_path / "p.toml").read_text())["expert_quant"] == d["best"]["precision"]
    # a tail under 64 tokens: said, and fitted on everything
    code, out, err = run_cli(capsys, "tune", "--trace", str(short), "--budget", "20GB")
    assert code == 0, err
    assert "held-out tail 25 (each needs 64); fitted and scored on all 100 tokens" in out
    assert "held out (" not in out and "fitted (100 tokens)" in out
    # --validate: fitted on the whole trace, scored on the other
    save_trace(other, random_trace(80))
    code, out, err = run_cli(capsys, "tune", "--trace", str(path), "--budget", "20GB", "--validate", str(other),
                             "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["fitted"]["tokens"], d["held_out"]["tokens"]) == (256, 80) and "#" in d["profile"]


def test_tune_cli_validate_refuses_a_trace_of_another_shape(tmp_path, capsys):
    from conftest import run_cli

    from offload_moe.planning.trace import save_trace

    path, other = tmp_path / "t.trace", tmp_path / "o.trace"
    save_trace(path, random_trace())
    t = random_trace()
    save_trace(other, Trace(t.experts[:, :16], t.weights[:, :16], t.predicted[:, :16], 8, 2, 16, "half"))
    code, out, err = run_cli(capsys, "tune", "--trace", str(path), "--budget", "20GB", "--validate", str(other))
    assert code == 1 and "Traceback" not in err
    assert "has 16 layers x 8 experts, top-2; --trace" in err and "32 x 8, top-2: they must match" in err
    code, _, err = run_cli(capsys, "tune", "--trace", str(path), "--budget", "20GB", "--validate", str(path),
                           "--holdout", "0.2")
    assert code == 1 and "not both" in err


def test_holdout_0_tunes_and_scores_on_the_whole_trace(tmp_path, capsys):
    from dataclasses import asdict

    from conftest import run_cli

    from offload_moe.planning.trace import save_trace

    trace, path = shifting_trace(), tmp_path / "t.trace"
    save_trace(path, trace)
    best, default, _ = tune(trace, MIXTRAL_8X7B, 20 * 2**30, HW, 2**30, log=lambda _: None)
    code, out, err = run_cli(capsys, "tune", "--trace", str(path), "--budget", "20GB", "--reserve", "1GB",
                             "--holdout", "0", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["best"] == asdict(best) and d["default"] == asdict(default)
    assert d["held_out"] is None and d["fitted"]["tokens"] == 256 and "--holdout 0" in err
