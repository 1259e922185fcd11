"""Profiles: the shipped files parse, fit their cards for Mixtral-8x7B, and a misfit is refused with numbers."""

from __future__ import annotations

import pytest
import torch

from offload_moe.errors import UserError
from offload_moe.formats.registry import bytes_per_expert
from offload_moe.memory import check_fits, plan_memory
from offload_moe.options import parse_size
from offload_moe.planning.costs import MIXTRAL_8X7B
from offload_moe.profiles import available_profiles, load_profile


def mixtral_plan(profile_name: str, quant: str | None = None):
    p = load_profile(profile_name)
    s = p.settings
    dtype = getattr(torch, s.get("dtype", "float16"))
    nbytes = bytes_per_expert(MIXTRAL_8X7B, quant or s.get("expert_quant", "none"), s.get("group_size", 64), dtype)
    slots = [s.get("cache_experts", MIXTRAL_8X7B.num_experts)] * MIXTRAL_8X7B.n_layers
    return plan_memory(MIXTRAL_8X7B, dtype, nbytes, slots, s.get("context", 4096), p.device_budget,
                       p.device_reserve, p.ram_budget)


def test_every_target_has_a_profile():
    assert {"24gb", "16gb", "12gb", "cpu"} <= set(available_profiles())


@pytest.mark.parametrize("name,slots", [("24gb", 6), ("16gb", 3), ("12gb", 2)])
def test_card_profiles_fit_mixtral_with_int4_experts(name, slots):
    plan = mixtral_plan(name)
    check_fits(plan)
    assert plan.slots[0] == slots
    # one more slot per layer would not fit: the profile uses its card
    bigger = plan_memory(MIXTRAL_8X7B, torch.float16, plan.expert_bytes, [slots + 1] * 32, 4096,
                         plan.device_budget, plan.reserve, None)
    with pytest.raises(UserError, match="does not fit the device"):
        check_fits(bigger)


def test_fp16_experts_on_a_24gb_card_are_refused_with_the_numbers():
    with pytest.raises(UserError) as err:
        check_fits(mixtral_plan("24gb", quant="none"))
    text = str(err.value)
    assert "192 expert slots x 336.0 MiB" in text and "budget 24.00 GiB" in text


def test_sizes_parse_and_bad_sizes_are_refused():
    assert parse_size("24GB") == 24 * 2**30 == parse_size("24 GiB")
    assert parse_size("1.5GB") == int(1.5 * 2**30) and parse_size("800MB") == 800 * 2**20
    with pytest.raises(UserError, match="cannot read the size"):
        parse_size("lots")


def test_a_broken_profile_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("cache_experts = [1, 2\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text("cache_expert = 4\n")
    with pytest.raises(UserError, match="unknown key"):
        load_profile(str(typo))


def test_explicit_engine_options_override_only_what_they_set(tmp_path):
    """Settings: EngineOptions defaults < the profile < the fields an explicit EngineOptions sets < keyword
    overrides. An explicit EngineOptions used to drop the whole profile, budgets included."""
    from offload_moe.config import ModelConfig
    from offload_moe.demo import write_random_checkpoint
    from offload_moe.engine import Engine
    from offload_moe.options import EngineOptions

    shape = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, num_experts=4,
                        top_k=2, vocab_size=256)
    path = write_random_checkpoint(tmp_path / "ckpt", shape, torch.float32)
    profile = tmp_path / "p.toml"
    profile.write_text('device = "cpu"\ncache_experts = 3\nprefetch = 0\npolicy = "lfu"\ncontext = 64\n'
                       '[budget]\ndevice = "1GB"\ndevice_reserve = "1MB"\nram = "512MB"\n')
    engine = Engine.load(path, EngineOptions(cache_experts=2, policy="fifo", progress=False), profile=str(profile))
    o = engine.options
    assert (o.cache_experts, o.policy) == (2, "fifo")  # set explicitly
    assert (o.prefetch, o.context, o.device) == (0, 64, "cpu")  # the profile's
    assert (o.device_budget, o.device_reserve, o.ram_budget) == (2**30, 2**20, 512 * 2**20)  # its budgets too
    assert engine.plan.device_budget == 2**30 and engine.plan.ram == 512 * 2**20
    assert engine.cache.slots == [2, 2]
    # a keyword override beats both, even when it names a default value
    o = Engine.load(path, EngineOptions(policy="fifo", progress=False), profile=str(profile), policy="lru",
                    prefetch=1).options
    assert (o.policy, o.prefetch, o.cache_experts) == ("lru", 1, 3)
    # an EngineOptions left at the defaults changes nothing the profile says
    o = Engine.load(path, EngineOptions(), profile=str(profile), progress=False).options
    assert (o.cache_experts, o.policy, o.device_budget) == (3, "lfu", 2**30)


def test_the_plan_counts_the_kv_cache_of_a_batch(tmp_path, capsys):
    """`plan --max-batch N` counts N sequences' KV cache on each card, and fewer slots fit beside it."""
    import json

    from conftest import run_cli

    from offload_moe.memory import card_plan

    one, eight = (card_plan(MIXTRAL_8X7B, ["24gb"], batch=b)["cards"][0] for b in (1, 8))
    assert one["kv"] == MIXTRAL_8X7B.kv_bytes(4096, 2) == 512 * 2**20 and eight["kv"] == 8 * one["kv"]
    assert eight["free"] == one["free"] - 7 * one["kv"]
    assert (one["slots"]["int4"], eight["slots"]["int4"]) == (6, 5)  # 19.0 and 15.5 GiB free, 2.95 GiB per slot
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6}))
    code, out, err = run_cli(capsys, "plan", "--config", str(config), "--profile", "24gb", "--max-batch", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["batch"] == 8 and json.loads(out)["cards"][0] == eight
    code, out, _ = run_cli(capsys, "plan", "--config", str(config), "--profile", "24gb", "--max-batch", "8")
    assert code == 0 and "KV cache of 8 sequences" in out
    code, _, err = run_cli(capsys, "plan", "--config", str(config), "--max-batch", "0")
    assert code == 1 and err.startswith("error: --max-batch")


def test_a_batch_whose_kv_cache_does_not_fit_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """A budget that fits one sequence's KV cache but not four: Engine.load with max_batch 4 (serve
    --max-batch 4) refuses before reading any weight, with the sequences in the numbers; with max_batch 3
    the engine allocates that pool, and a Scheduler of 3 decodes in it."""
    from conftest import run_cli

    from offload_moe import engine as engine_module
    from offload_moe.batch import Scheduler
    from offload_moe.demo import resolve_model
    from offload_moe.engine import Engine
    from offload_moe.options import EngineOptions

    demo = resolve_model("demo")
    base = Engine.load(demo, EngineOptions(cache_experts=2, context=128, progress=False))
    one = base.config.kv_bytes(128, 4)
    budget = base.plan.device_total + (1 << 20) + 2 * one + one // 2  # 3.5 sequences beside a 1 MiB reserve
    profile = tmp_path / "tight.toml"
    profile.write_text(f'device = "cpu"\ncache_experts = 2\ncontext = 128\n[budget]\ndevice = {budget}\n'
                       'device_reserve = "1MiB"\n')

    def no_loading(*args, **kw):
        raise AssertionError("weights were read before the plan was checked")

    with monkeypatch.context() as m:
        m.setattr(engine_module, "ExpertStore", no_loading)
        with pytest.raises(UserError, match=r"KV cache \(4 sequences\)"):
            Engine.load(demo, profile=str(profile), max_batch=4, progress=False)
        code, _, err = run_cli(capsys, "serve", "--model", "demo", "--profile", str(profile), "--max-batch", "4")
        assert code == 1 and err.count("\n") == 1 and "(4 sequences)" in err and "does not fit" in err
    engine = Engine.load(demo, profile=str(profile), max_batch=3, progress=False)
    assert engine.plan.kv == engine.pool.nbytes == 3 * one
    assert engine.device_bytes == base.device_bytes + 2 * one
    sched = Scheduler(engine, max_batch=3)
    assert sched.pool is engine.pool
    for prompt in ([1, 415, 2936], [1, 851], [1, 2255, 2872]):
        sched.add(prompt, 4)
    while sched.busy:
        sched.step()
    assert max(sched.batch_sizes) == 3
