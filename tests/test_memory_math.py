"""Memory math against the public configs (issue 11, section 5; issue 12: DeepSeek-V2-Lite, GLM-4.5-Air): the
fields of each hub config.json that the memory math reads, written here as literals; the parameter totals
against the published ones, the bytes per expert of the engine's own formats, the KV cache per token (for
DeepSeek's latent attention, against the per-head keys and values it replaces), the expert slots per layer
that `plan` finds on the 24, 16 and 12 GB card profiles (dense fp16 resident + KV cache for 4096 tokens +
1.5 GiB reserve), and whether every expert fits 64 GB of RAM.

Sources (the hub's config.json of each model; every figure below was checked against a copy found in
public code, cited per model):"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli as run

from offload_moe.formats.registry import expert_format
from offload_moe.memory import card_plan
from offload_moe.models import from_hf_config
from offload_moe.profiles import load_profile

CONFIGS = {
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json; corroborated by a Qwen3-30B-A3B-derived
    # config (same vocab, widths, heads, moe_intermediate_size 768, top-8) and the model card (48 layers,
    # 32 q / 4 kv heads, 128 experts, 8 active, no shared expert, 30.5B total)
    "Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        "tie_word_embeddings": False, "attention_bias": False, "max_position_embeddings": 40960,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "sliding_window": None, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645},
    # https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json; the same fields appear in several
    # test fixtures in public code (hidden 2048, 24 layers, 16/16 heads, moe_intermediate_size 1408, 60 experts,
    # top-4, shared_expert_intermediate_size 5632, vocab 151936, untied); q/k/v biases are Qwen2-MoE's
    # architecture (no config key); 14.3B total per the model card
    "Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
        "num_experts_per_tok": 4, "norm_topk_prob": False, "decoder_sparse_step": 1, "vocab_size": 151936,
        "tie_word_embeddings": False, "max_position_embeddings": 8192, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06, "sliding_window": 32768, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151643},
    # https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json; corroborated by NVIDIA's Megatron
    # Bridge OLMoE page (16 layers, hidden 2048, expert FFN 1024, 16/16 heads, 64 experts, top-8, vocab 50,304,
    # QK norm, RoPE base 10000) and transformers' OlmoeConfig; 6.9B total per the paper (arXiv 2409.02060)
    "OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 1024,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "vocab_size": 50304,
        "tie_word_embeddings": False, "attention_bias": False, "clip_qkv": None, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "pad_token_id": 1, "eos_token_id": 50279},
    # https://huggingface.co/microsoft/Phi-3.5-MoE-instruct/blob/main/config.json (transcribed field by field in
    # a public fine-tuning write-up: attention_bias true, hidden 4096, intermediate 6400, lm_head_bias true,
    # 32 layers, 32/8 heads, 16 local experts, top-2, vocab 32064, sliding_window 131072, untied); LayerNorm is
    # the architecture's. Its longrope rope_scaling (64 short and 64 long factors) is left out: it sizes nothing.
    # 41.9B total per the model card.
    "Phi-3.5-MoE-instruct": {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 6400,
        "num_local_experts": 16, "num_experts_per_tok": 2, "vocab_size": 32064, "tie_word_embeddings": False,
        "attention_bias": True, "lm_head_bias": True, "router_jitter_noise": 0.01,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "sliding_window": 131072,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "bos_token_id": 1, "eos_token_id": 32000},
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json; every field below as a public
    # dump of DeepSeek-V2-Lite-Chat's config (loaded by transformers 5.7) lists it, and the same widths, expert
    # counts, 6 of 64 routed + 2 shared, first_k_dense_replace 1, softmax scoring and norm_topk_prob false in a
    # public audit of the official config; 15.7B total per the DeepSeek-V2 paper (arXiv 2405.04434, V2-Lite)
    "DeepSeek-V2-Lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
        "topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "tie_word_embeddings": False, "attention_bias": False,
        "max_position_embeddings": 163840, "rope_theta": 10000, "rope_scaling": {
            "type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096}, "rms_norm_eps": 1e-06, "bos_token_id": 100000,
        "eos_token_id": 100001},
    # https://huggingface.co/zai-org/GLM-4.5-Air/blob/main/config.json; the fields below as a public conversion
    # script's copy of the 106B config lists them (hidden 4096, intermediate 10944, moe_intermediate_size 1408,
    # 46 layers, 96 / 8 heads of 128, 128 routed experts top-8, 1 shared, first_k_dense_replace 1, attention_bias
    # true, no QK-norm, vocab 151552, untied), partial_rotary_factor 0.5 as transformers' Glm4MoeConfig; 106B total
    # per the model card. The multi-token-prediction layer (num_nextn_predict_layers) is not counted: not read.
    "GLM-4.5-Air": {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 4096,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 46, "n_routed_experts": 128,
        "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 1, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5, "vocab_size": 151552,
        "attention_bias": True, "use_qk_norm": False, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0, "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "rope_theta": 1000000, "rms_norm_eps": 1e-05, "num_nextn_predict_layers": 1,
        "eos_token_id": [151329, 151336, 151338]},
}
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
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(CONFIGS[name]))
    return path


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
    mixtral = tmp_path / "mixtral.json"
    mixtral.write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6}))
    code, out, err = run(capsys, "plan", "--config", str(mixtral))
    assert code == 0, err
    assert "fp16 336.00 MiB" in out and "int4-g64 94.50 MiB" in out and "parameters 46.70B" in out
    plan = card_plan(from_hf_config(mixtral))
    for card in plan["cards"]:
        assert card["slots"]["int4"] == load_profile(card["profile"]).settings["cache_experts"]
        assert not card["fits"]["none"]
    code, out, _ = run(capsys, "plan", "--config", str(config_file(tmp_path, "Qwen3-30B-A3B")), "--profile", "24gb",
                       "--context", "32768")
    assert code == 0 and "32768" in out and "16gb" not in out
    code, _, err = run(capsys, "plan", "--config", str(mixtral), "--profile", "cpu")
    assert code == 1 and "no device budget" in err
