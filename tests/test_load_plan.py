"""The load plan: every bad option or profile value is one `error:` line naming the key, before any tensor data
is read; a good one plans what the engine then builds."""

from __future__ import annotations

import pytest
from conftest import run_cli

from offload_moe.demo import resolve_model
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.options import OPTIONS, EngineOptions
from offload_moe.plan import merge_options, plan_load
from offload_moe.profiles import BUDGET_KEYS, ENGINE_KEYS, load_profile
from offload_moe.weights.checkpoint import Checkpoint


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Reading any tensor data fails the test: the errors under test must come first."""
    def read(*_args, **_kwargs):
        raise AssertionError("tensor data was read before the error")

    monkeypatch.setattr(Checkpoint, "read", read)


@pytest.mark.parametrize("toml,key", [
    ('policy = "belady"', "policy"),  # an offline bound, not an eviction policy the engine can run
    ('policy = "mru"', "policy"),
    ('cache_experts = "four"', "cache_experts"),
    ("cache_experts = 2.5", "cache_experts"),
    ("cache_experts = [2, 0]", "cache_experts"),
    ('context = "4k"', "context"),
    ("context = 0", "context"),
    ("prefetch = -1", "prefetch"),
    ('dtype = "fp8"', "dtype"),
    ("group_size = 48", "group_size"),
    ("device = 3", "device"),
    ('miss_policy = "never"', "miss_policy"),
    ('budget = "24GB"', "budget"),
    ('[budget]\ndevice = "lots"', "budget.device"),
    ('[budget]\nram = -5', "budget.ram"),
    ('[budget]\ndevices = "24GB"', "devices"),
    ('[hardware]\nh2d_bytes_per_s = "fast"', "hardware.h2d_bytes_per_s"),
])
def test_a_bad_profile_value_is_one_line_naming_the_key(tmp_path, capsys, no_tensor_reads, toml, key):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml + "\n")
    code, out, err = run_cli(capsys, "generate", "--model", "demo", "--profile", str(bad), "--max-new-tokens", "1")
    assert code == 1 and out == ""
    assert err.startswith(f"error: profile {bad}: ") and key in err and len(err.strip().splitlines()) == 1, err


def test_tune_refuses_a_hardware_string_before_reading_the_trace(tmp_path, capsys):
    bad = tmp_path / "hw.toml"
    bad.write_text('[budget]\ndevice = "24GB"\n[hardware]\ncpu_bytes_per_s = "40e9"\n')
    code, _, err = run_cli(capsys, "tune", "--trace", str(tmp_path / "missing.trace"), "--profile", str(bad))
    assert code == 1 and "hardware.cpu_bytes_per_s" in err and "positive number" in err


@pytest.mark.parametrize("overrides,key", [
    ({"policy": "belady"}, "--policy"),
    ({"cache_experts": 2.5}, "--cache-experts"),
    ({"context": "4k"}, "--context"),
    ({"prefetch_width": -1}, "--prefetch-width"),
    ({"max_batch": 0}, "--max-batch"),
    ({"ram_budget": "lots"}, "--ram-budget"),
    ({"prefetch_depth": 2}, "prefetch_depth"),  # not an option at all
])
def test_the_python_api_checks_the_same_way(no_tensor_reads, overrides, key):
    with pytest.raises(UserError, match=key):
        Engine.load(resolve_model("demo"), **overrides)
    if key.startswith("--"):  # the same value set on an EngineOptions
        with pytest.raises(UserError, match=key):
            Engine.load(resolve_model("demo"), EngineOptions(**overrides))


def test_profile_keys_are_the_options_fields():
    """One list: every profile key is an EngineOptions field, and so is every [budget] key."""
    assert set(ENGINE_KEYS.values()) | set(BUDGET_KEYS.values()) <= set(OPTIONS)
    assert {"cache_experts", "policy", "expert_quant", "context"} <= set(ENGINE_KEYS)
    assert set(BUDGET_KEYS) == {"device", "device_reserve", "ram"}


def test_the_plan_holds_every_choice_and_reads_no_tensor(tmp_path, no_tensor_reads):
    profile = tmp_path / "p.toml"
    profile.write_text('device = "cpu"\nexpert_quant = "int4"\ncache_experts = 3\nprefetch = 1\n'
                       '[budget]\nram = "64MB"\n')
    options, given = merge_options(EngineOptions(prefetch_width=4), load_profile(str(profile)), {"context": 64})
    assert given == {"prefetch_width", "context"}
    plan = plan_load(Checkpoint(resolve_model("demo")), options)
    assert plan.device.type == "cpu" and plan.context == 64 and plan.slots == [3] * 4
    assert plan.expert_format.name.startswith("int4-g") and plan.widths == [3] * 4 and plan.lead == 1
    assert plan.memory.ram == 64 * 2**20 and not plan.tiered and not plan.pin
    assert plan.predictor.endswith("predictor.safetensors")  # auto: the demo ships its learned predictor


def test_with_every_expert_resident_nothing_is_prefetched(no_tensor_reads):
    options, _ = merge_options(None, None, {"prefetch": 2})
    assert plan_load(Checkpoint(resolve_model("demo")), options).lead == 0
