"""Record, simulate, tune, then run the tuned profile: the profiling workflow as a user runs it."""

from __future__ import annotations

import json
import tomllib

from conftest import run_cli as run

from offload_moe.offload.eviction import ONLINE_POLICIES, POOLS


def test_record_simulate_tune_and_generate_with_the_tuned_profile(ckpts, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def fib(n):"}\n{"prompt": "class Stack:"}\n')
    trace = tmp_path / "run.trace"
    code, out, err = run(capsys, "profile", "--model", str(ckpts["base"]), "--prompts", str(prompts),
                         "--max-new-tokens", "12", "--cache-experts", "3", "--trace-out", str(trace), "--json")
    assert code == 0, err
    recorded = json.loads(out)
    assert recorded["trace_tokens"] > 24

    code, out, err = run(capsys, "simulate", "--trace", str(trace), "--slots", "2,3,4", "--policy", "lru,lfu",
                         "--prefetch", "1", "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert {(r["policy"], r["slots"]) for r in results} >= {("lru", 2), ("lfu", 4), ("belady", 3)}
    for slots in (2, 3, 4):
        best = max(r["hit_rate"] for r in results if r["slots"] == slots)
        assert [r for r in results if r["slots"] == slots and r["policy"] == "belady"][0]["hit_rate"] == best

    profile = tmp_path / "tuned.toml"
    # every expert fits 8.5 MB (int4): said, with no predicted speed, and the profile keeps them all resident
    code, out, err = run(capsys, "tune", "--trace", str(trace), "--budget", "8.5MB", "--reserve", "0",
                         "--context", "256", "--out", str(profile))
    assert code == 0, err
    assert "every expert fits the 8.500MiB budget" in out and "tok/s" not in out
    tuned = tomllib.loads(profile.read_text())
    assert "cache_experts" not in tuned and "policy" not in tuned and tuned["expert_quant"] == "int4"
    code, out, err = run(capsys, "tune", "--trace", str(trace), "--budget", "8.2MB", "--reserve", "0",
                         "--context", "256", "--out", str(profile))
    assert code == 0, err
    assert "default" in out and "best" in out and "eviction policy" in out and "slot pool" in out
    tuned = tomllib.loads(profile.read_text())
    assert tuned["policy"] in ONLINE_POLICIES and tuned["slot_pool"] in POOLS and "hardware" in tuned

    # the profile's own budget is checked: its float16 dense weights and slots fit 8.2 MB
    code, out, err = run(capsys, "generate", "--model", str(ckpts["base"]), "--profile", str(profile), "--device",
                         "cpu", "--context", "256", "--prompt", "x", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    stats = json.loads(out)["stats"]
    assert stats["miss_policy"] == tuned["miss_policy"]
    # the depth in effect: the profile's, or 0 where every expert it asks for is resident (nothing to prefetch)
    all_resident = tuned["cache_experts"] == 8 if isinstance(tuned["cache_experts"], int) else min(
        tuned["cache_experts"]) == 8
    assert stats["prefetch_depth"] == (0 if all_resident else tuned["prefetch"])
    assert (stats["predictor"] is None) == (stats["prefetch_depth"] == 0)


def test_profile_records_the_decode_its_sampling_flags_make(ckpts, tmp_path, capsys):
    """Greedy by default; with --temperature the routing of a sampled decode (seeded: the same trace twice), the
    one a predictor should be fitted on where the model is served that way. A bad flag is refused before the load."""
    import numpy as np

    from offload_moe.planning.trace import load_trace

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def fib(n):\n")

    def record(name: str, *flags: str) -> np.ndarray:
        code, _, err = run(capsys, "profile", "--model", str(ckpts["base"]), "--prompts", str(prompts),
                           "--max-new-tokens", "16", "--trace-out", str(tmp_path / name), *flags)
        assert code == 0, err
        return load_trace(tmp_path / name).experts  # [T, L, K]

    greedy, sampled = record("greedy"), record("sampled", "--temperature", "1.5", "--seed", "1")
    assert np.array_equal(sampled, record("again", "--temperature", "1.5", "--seed", "1"))
    assert not np.array_equal(greedy, sampled)
    code, _, err = run(capsys, "profile", "--model", str(ckpts["base"]), "--prompts", str(prompts), "--trace-out",
                       str(tmp_path / "bad"), "--temperature", "-1")
    assert code == 1 and "--temperature" in err and not (tmp_path / "bad").exists()


def test_profiling_commands_refuse_bad_input(ckpts, tmp_path, capsys):
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"not a trace")
    assert run(capsys, "simulate", "--trace", str(bad))[0] == 1
    code, _, err = run(capsys, "tune", "--trace", str(bad), "--budget", "24GB")
    assert code == 1 and "error:" in err
    code, _, err = run(capsys, "profile", "--model", str(ckpts["base"]), "--prompts", str(tmp_path / "none.txt"),
                       "--trace-out", str(tmp_path / "t"))
    assert code == 1 and "cannot read" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no prompt field"}\n')
    code, _, err = run(capsys, "profile", "--model", str(ckpts["base"]), "--prompts", str(empty),
                       "--trace-out", str(tmp_path / "t"))
    assert code == 1 and "'prompt' field" in err


def test_calibrate_prints_a_hardware_table(capsys):
    code, out, _ = run(capsys, "calibrate", "--device", "cpu", "--dim", "256", "--ffn", "512")
    assert code == 0
    hw = tomllib.loads(out)["hardware"]
    assert hw["h2d_bytes_per_s"] > 0 and hw["cpu_bytes_per_s"] > 0
    assert all(hw[f"{where}_weights_per_s_{p}"] > 0 for where in ("device", "cpu") for p in ("none", "int8", "int4"))
