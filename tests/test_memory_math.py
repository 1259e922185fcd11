"""Memory math against the public configs that ship in `offload_moe/data/configs/` (issue 11, section 5; issue 12:
DeepSeek-V2-Lite, GLM-4.5-Air; their sources: SOURCES.md there): the parameter totals against the published
ones, the bytes per expert of the engine's own formats, the KV cache per token (for DeepSeek's latent attention,
against the per-head keys and values it replaces), the expert slots per layer that `plan` finds on the 24, 16
and 12 GB card profiles (dense fp16 resident + KV cache for 4096 tokens + 1.5 GiB reserve), and whether every
expert fits 64 GB of RAM. `plan --config NAME` reads them by name, offline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli as run

from offload_moe.formats.registry import expert_format
from offload_moe.memory import card_plan
from offload_moe.models import from_hf_config
from offload_moe.models.public import public_config, public_configs
from offload_moe.profiles import load_profile

NAMES = ("Qwen3-30B-A3B", "Qwen1.5-MoE-A2.7B", "OLMoE-1B-7B-0924", "Phi-3.5-MoE-instruct", "DeepSeek-V2-Lite",
         "GLM-4.5-Air")
CONFIGS = {name: public_config(name) for name in NAMES}
PUBLISHED_TOTAL = {"Qwen3-30B-A3B": 30.5e9, "Qwen1.5-MoE-A2.7B": 14.3e9, "OLMoE-1B-7B-0924": 6.9e9,
                   "Phi-3.5-MoE-instruct": 41.9e9, "DeepSeek-V2-Lite": 15.7e9, "GLM-4.5-Air": 106e9}
# bytes of one packed expert: fp16, int8 and int4 at group 64 (codes, then a bf16 scale and zero per group)
EXPERT_BYTES = {
    "Qwen3-30B-A3B": (9_437_184, 5_013_504, 2_654_208),
    "Qwen1.5-MoE-A2.7B": (17_301_504, 9_191_424, 4_866_048),
    "OLMoE-1B-7B-0924": (12_582_912, 6_684_672, 3_538_944),
    "Phi-3.5-MoE-instruct": (157_286_400, 83_558_400, 44_236_800),
    "DeepSeek-V2-Lite": (17_301_504, 9_191_424, 4_866_048),
    "GLM-4.5-Air": (34_603_008, 18_382_848, 9_732_096),
}
# KV cache bytes per token in fp16, all layers: 2 (k, v) x layers x kv heads x head dim x 2 bytes; DeepSeek's
# latent attention caches kv_lora_rank + qk_rope_head_dim per layer: (512 + 64) x 27 x 2
KV_PER_TOKEN = {"Qwen3-30B-A3B": 98_304, "Qwen1.5-MoE-A2.7B": 196_608, "OLMoE-1B-7B-0924": 131_072,
                "Phi-3.5-MoE-instruct": 131_072, "DeepSeek-V2-Lite": 31_104, "GLM-4.5-Air": 188_416}
# every expert in 64 GB (GiB) of host RAM, fp16 / int8 / int4
RAM_64GB = {"Qwen3-30B-A3B": (True, True, True), "Qwen1.5-MoE-A2.7B": (True, True, True),
            "OLMoE-1B-7B-0924": (True, True, True), "Phi-3.5-MoE-instruct": (False, True, True),
            "DeepSeek-V2-Lite": (True, True, True), "GLM-4.5-Air": (False, False, True)}
# expert slots per layer on the 24gb, 16gb and 12gb profiles, fp16 / int8 / int4 (capped at the expert count;
# under top-k nothing runs: Phi-3.5-MoE's fp16 on 12 GB)
SLOTS = {
    "Qwen3-30B-A3B": {"24gb": (45, 85, 128), "16gb": (26, 50, 94), "12gb": (17, 32, 61)},
    "Qwen1.5-MoE-A2.7B": {"24gb": (47, 60, 60), "16gb": (26, 50, 60), "12gb": (16, 30, 57)},
    "OLMoE-1B-7B-0924": {"24gb": (64, 64, 64), "16gb": (64, 64, 64), "12gb": (48, 64, 64)},
    "Phi-3.5-MoE-instruct": {"24gb": (4, 7, 14), "16gb": (2, 4, 8), "12gb": (1, 2, 5)},
    "DeepSeek-V2-Lite": {"24gb": (47, 64, 64), "16gb": (28, 53, 64), "12gb": (18, 35, 64)},
    "GLM-4.5-Air": {"24gb": (5, 10, 20), "16gb": (0, 0, 0), "12gb": (0, 0, 0)},  # 13.4 GiB of dense fp16
}
PRECISIONS = ("none", "int8", "int4")


def config_file(tmp_path, name):
    return CONFIGS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_and_bytes_per_expert_of_the_public_configs(tmp_path, name):
    c = from_hf_config(config_file(tmp_path, name))
    total = c.n_moe_layers * c.num_experts * c.expert_params + c.dense_params
    assert total == pytest.approx(PUBLISHED_TOTAL[name], rel=0.01)
    weights = c.expert_params  # 3 * D * I
    groups = weights // 64
    formula = (2 * weights, weights + 4 * groups, weights // 2 + 4 * groups)  # 2 bytes a weight; codes + bf16 pairs
    got = tuple(expert_format(p, c, torch.float16, 64).nbytes for p in PRECISIONS)
    assert got == formula == EXPERT_BYTES[name]


def test_the_readers_take_each_family_s_variants(tmp_path):
    q3, q15, olmoe, phi = (from_hf_config(config_file(tmp_path, n)) for n in list(CONFIGS)[:4])
    assert (q3.qk_norm, q3.shared_ffn_dim, q3.norm_topk_prob, q3.head_dim) == ("head", 0, True, 128)
    assert (q15.shared_ffn_dim, q15.shared_gate, q15.qkv_bias, q15.sliding_window) == (5632, True, True, None)
    assert (olmoe.qk_norm, olmoe.norm_topk_prob, olmoe.clip_qkv) == ("full", False, None)
    assert (phi.norm, phi.qkv_bias, phi.o_bias, phi.lm_head_bias, phi.router) == ("layer", True, True, True,
                                                                                     "sparsemixer")
    assert all(c.moe_layers == tuple(range(c.n_layers)) for c in (q3, q15, olmoe, phi))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_prints_the_slots_each_card_leaves(tmp_path, capsys, name):
    path = config_file(tmp_path, name)
    code, out, err = run(capsys, "plan", "--config", str(path), "--json")
    assert code == 0, err
    plan = json.loads(out)
    c = from_hf_config(path)
    assert tuple(plan["bytes_per_expert"][p] for p in PRECISIONS) == EXPERT_BYTES[name]
    assert plan["formats"] == {"none": "fp16", "int8": "int8-g64", "int4": "int4-g64", "mxfp4": "mxfp4"}
    assert [card["profile"] for card in plan["cards"]] == ["24gb", "16gb", "12gb"]
    for card in plan["cards"]:
        assert tuple(card["slots"][p] for p in PRECISIONS) == SLOTS[name][card["profile"]]
        assert card["fits"] == {p: n >= c.top_k for p, n in card["slots"].items()}
        # the same figure from the parts: the card, less the reserve, dense fp16 and the KV cache of 4096 tokens
        prof = load_profile(card["profile"])
        kv = KV_PER_TOKEN[name] * 4096
        free = max(prof.device_budget - prof.device_reserve - 2 * c.dense_params - kv, 0)  # GLM-4.5-Air on 16 GB: 0
        assert (card["context"], card["kv"], card["free"]) == (4096, kv, free)
        for p, nbytes in zip(PRECISIONS, EXPERT_BYTES[name], strict=True):
            assert card["slots"][p] == min(free // (nbytes * c.n_moe_layers), c.num_experts)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_per_token_and_every_expert_in_64gb_of_ram(tmp_path, name):
    c = from_hf_config(config_file(tmp_path, name))
    assert c.kv_bytes(1, 2) == KV_PER_TOKEN[name]
    plan = card_plan(c)
    assert tuple(plan["host_bytes"][p] <= 64 * 2**30 for p in PRECISIONS) == RAM_64GB[name]
    assert plan["host_bytes"]["int4"] == c.n_moe_layers * c.num_experts * EXPERT_BYTES[name][2]


def test_deepseek_v2_lite_latent_cache_against_full_keys_and_values(tmp_path):
    """MLA caches 576 values a token and layer where per-head keys (128 + 64) and values (128) of 16 heads would
    be 5120: 8.9 times less. At 4096 tokens, 121.5 MiB instead of 1.05 GiB; the rest of V2-Lite's plan: 26
    layers of 64 experts and 2 shared, 1.31B dense parameters (2.44 GiB in fp16)."""
    c = from_hf_config(config_file(tmp_path, "DeepSeek-V2-Lite"))
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.head_dim, c.v_head_dim, c.n_heads) == (512, 64, 192, 128, 16)
    full = c.n_layers * c.n_heads * (c.head_dim + c.v_head_dim) * 2  # bytes per token in fp16
    assert full == 276_480 and KV_PER_TOKEN["DeepSeek-V2-Lite"] == 31_104
    assert c.kv_bytes(4096, 2) == 121.5 * 2**20 and full * 4096 / 2**30 == pytest.approx(1.0547, abs=1e-4)
    assert (c.n_moe_layers, c.dense_layers, c.shared_ffn_dim, c.router, c.n_group) == (26, (0,), 2816,
                                                                                        "grouped_softmax", 1)
    assert c.dense_params == 1_311_632_896


def test_plan_text_and_the_mixtral_profiles(tmp_path, capsys):
    """The text table; and for Mixtral-8x7B the plan gives the int4 slot counts the card profiles ship."""
    mixtral = "mistralai/Mixtral-8x7B-v0.1"  # a hub id: the shipped config, by its name
    code, out, err = run(capsys, "plan", "--config", str(mixtral))
    assert code == 0, err
    assert "fp16 336.00 MiB" in out and "int4-g64 94.50 MiB" in out and "parameters 46.70B" in out
    plan = card_plan(from_hf_config(public_config(mixtral)))
    for card in plan["cards"]:
        assert card["slots"]["int4"] == load_profile(card["profile"]).settings["cache_experts"]
        assert not card["fits"]["none"]
    code, out, _ = run(capsys, "plan", "--config", str(config_file(tmp_path, "Qwen3-30B-A3B")), "--profile", "24gb",
                       "--context", "32768")
    assert code == 0 and "32768" in out and "16gb" not in out
    code, _, err = run(capsys, "plan", "--config", str(mixtral), "--profile", "cpu")
    assert code == 1 and "no device budget" in err


def test_every_shipped_config_reads_and_names_itself(capsys):
    """Each shipped file is a config the readers take, found by its name in any case, with or without the
    organisation; an unknown name lists them."""
    shipped = public_configs()
    assert {"Mixtral-8x7B-v0.1", "gpt-oss-20b", *NAMES} <= set(shipped)
    for name, path in shipped.items():
        assert from_hf_config(path).num_experts > 1
        assert public_config(name.upper()) == public_config(f"some-org/{name}") == path
    code, _, err = run(capsys, "plan", "--config", "No-Such-Model")
    assert code == 1 and "shipped public configs" in err and "Qwen3-30B-A3B" in err
