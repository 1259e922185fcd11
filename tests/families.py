"""Tiny random checkpoints of every family, written by transformers' own classes (the oracle) and
laid out as the hub has them: per-expert tensors, sharded, a hub-style config.json (`num_experts`
for Qwen and OLMoE, `num_local_experts` for Phi, `n_routed_experts` and a top-level
`partial_rotary_factor` for GLM-4.5, a top-level `rope_theta`; `hub_config` says each family's)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from offload_moe.engine import Engine
from offload_moe.options import EngineOptions

VOCAB = 320
FAMILIES = {
    # name: (config class, model class, kwargs)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=2, clip_qkv=4.0)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)),
    # the sigmoid router with 4 groups of 4 experts, 2 kept; a dense first layer; partial rotary; QK-norm
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5)),
    # latent attention with q straight from x; the softmax router, group-limited (4 groups of 4, 2 kept), not
    # renormalised, scaled; a dense first layer; YaRN with unequal mscales (the softmax scale takes mscale_all_dim)
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings":
                         64, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})),
    # latent attention through q_lora_rank, interleaved rope; the sigmoid router with groups; a dense first layer
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    # GLM-4.7-Flash: DeepSeek-V3's latent attention (q through q_lora_rank, interleaved rope) and sigmoid router
    # (4 groups of 4, 2 kept), GLM's keys; a dense first layer
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=1.8, mlp_layer_types=["dense", "sparse", "sparse"])),
    # MiniMax-M2: the sigmoid router without groups or scaling, RMSNorm of the whole q and k projections, partial
    # RoPE (rotary_dim 8 of 16), Mixtral's expert names
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # sliding (window 4) and full layers, sinks, biases everywhere, YaRN on a 64-token original context, the
    # clamped SwiGLU at a limit these small activations reach, fused interleaved experts
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=4, swiglu_limit=0.3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})),
    # the hybrid: linear attention (2 key heads, 4 value heads) on layers 0 and 2, gated attention with partial
    # rotary on layer 1; a gated shared expert
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=4, norm_topk_prob=True, full_attention_interval=2, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)),
    # the hybrid: short convs (3 taps, with biases) on layers 0 and 2, attention with QK-norm on layer 1; a dense
    # first layer; the sigmoid router with its choice bias (`expert_bias`), renormalised and scaled
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, num_dense_layers=1, conv_bias=True,
        conv_L_cache=3, routed_scaling_factor=1.5, layer_types=["conv", "full_attention", "conv"])),
    # Qwen3.5-MoE: the same hybrid in the vision-language wrapper (a one-block vision tower, not run), the text
    # model's keys under text_config; multimodal RoPE over 8 rotary dims of 32 (sections 2, 1, 1)
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", dict(
        text_config=dict(
            hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=4,
            full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_conv_kernel_dim=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                           num_position_embeddings=16, patch_size=4))),
    # Nemotron-H: every kind of layer of the hub's pattern (Mamba-2 with 2 groups, MoE, attention without RoPE, a
    # dense MLP), relu2 experts without a gate, the sigmoid router with 2 groups of 4, one kept; chunks of 8 tokens
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe", "mlp", "linear_attention", "moe"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, ssm_state_size=16, mamba_num_heads=8,
        mamba_head_dim=16, n_groups=2, conv_kernel=4, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=1.5)),
}


def make_family(path: Path, family: str, seed: int = 0, tokenizer: str | None = None, **overrides) -> Path:
    """`tokenizer`: also a tokenizer.json with its tokenizer_config.json and generation_config.json, in
    one of hf_tokenizer.add_tokenizer's styles (e.g. 'chatml'); `overrides`: config keys instead of FAMILIES'."""
    cfg_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if "text_config" in kwargs:  # a vision-language wrapper: the text model's keys (and the overrides) go there
        cfg = getattr(transformers, cfg_cls)(**(kwargs | {"text_config": kwargs["text_config"] | common | overrides}))
    else:
        cfg = getattr(transformers, cfg_cls)(**common, **(kwargs | overrides))
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms away from 1, biases away from 0, routers sharper: so that bugs show
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Qwen3-Next's norms apply 1 + w (but linear attention's gated one): the same scales
                zero_centred = family in ("qwen3_next", "qwen3_5_moe") and "linear_attn" not in name
                p.uniform_(0.5, 1.5).sub_(1 if zero_centred and "visual" not in name else 0)
            elif name.endswith("bias"):
                p.uniform_(-0.3, 0.3)
            elif (name.endswith("gate.weight") and "shared" not in name) or name.endswith("router.weight"):
                p.mul_(20)
            elif name.endswith("sinks"):  # gpt-oss: sinks that take a real share of each softmax
                p.uniform_(-1.0, 1.5)
            elif name.endswith("A_log"):  # linear attention: decays of 0.75 to 0.97 a token, so the state carries
                p.uniform_(-3.0, -1.0)
            elif name.endswith("mixer.D"):  # Mamba's skip, away from 1
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():  # the sigmoid router's choice bias: it must change choices
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.uniform_(-0.3, 0.3)
    model.save_pretrained(path, max_shard_size="100KB")
    hub_config(path / "config.json", family)
    if tokenizer is not None:
        from hf_tokenizer import add_tokenizer

        add_tokenizer(path, tokenizer)
    return path


def hub_config(path: Path, family: str) -> None:
    """transformers 5 writes `rope_parameters` and, for Qwen3, `num_local_experts`: the hub's files say
    `rope_theta` at the top and `num_experts` (Phi: `num_local_experts`); GLM-4.5's, `partial_rotary_factor` at
    the top; DeepSeek's, a `rope_scaling` with `type`, the router's `topk_method` and `scoring_func`, and no
    `head_dim` (transformers derives it); GLM-4.7-Flash's (zai-org/GLM-4.7-Flash), `first_k_dense_replace` for
    `mlp_layer_types`, `topk_method`, a top-level `partial_rotary_factor`, `num_nextn_predict_layers` and no
    `rope_interleave` (true by default); MiniMax-M2's, `rotary_dim` for the partial RoPE and the keys of its
    variant (`qk_norm_type`, `scoring_func`, `attn_type_list`, ...); gpt-oss's, a `rope_scaling` with
    `rope_type` and no `swiglu_alpha`; Qwen3-Next's, `full_attention_interval` instead of `layer_types`, and
    `partial_rotary_factor` at the top; LFM2-MoE's, `tie_embedding`; Qwen3.5-MoE's, a few more keys in
    `text_config`."""
    c = json.loads(path.read_text())
    if family == "qwen3_5_moe":  # Qwen/Qwen3.6-35B-A3B's text_config: also these keys; rope_parameters as written
        c["text_config"] |= {"full_attention_interval": 2, "partial_rotary_factor": 0.25, "attn_output_gate": True,
                             "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
                             "mamba_ssm_dtype": "float32"}
        path.write_text(json.dumps(c, indent=2))
        return
    rope = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        c["rope_scaling"] = {"type": rope["rope_type"]} | {k: v for k, v in rope.items()
                                                         if k not in ("rope_type", "rope_theta")}
    if family.startswith("deepseek"):
        del c["head_dim"], c["qk_head_dim"]
        v3 = family == "deepseek_v3"
        c |= {"scoring_func": "sigmoid" if v3 else "softmax", "moe_layer_freq": 1}
        c.setdefault("topk_method", "noaux_tc")
    if family == "minimax_m2":  # MiniMaxAI/MiniMax-M2's: `rotary_dim`, and its keys for the variant it is
        c |= {"rotary_dim": int(c["head_dim"] * rope["partial_rotary_factor"]), "qk_norm_type": "per_layer",
              "use_qk_norm": True, "scoring_func": "sigmoid", "use_routing_bias": True, "shared_intermediate_size": 0,
              "attn_type_list": [1] * c["num_hidden_layers"]}
    elif "partial_rotary_factor" in rope:
        c["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        c["num_experts"] = c.pop("num_local_experts", c.get("num_experts"))
    if family == "glm4_moe_lite":
        types = c.pop("mlp_layer_types")
        del c["qk_head_dim"], c["rope_interleave"]
        c |= {"first_k_dense_replace": types.index("sparse"), "topk_method": "noaux_tc", "partial_rotary_factor": 1.0,
              "num_nextn_predict_layers": 1}
    if family == "qwen3_next":  # the hub's: the layers by `full_attention_interval` (every other one here)
        assert c.pop("layer_types") == ["linear_attention", "full_attention"] * (c["num_hidden_layers"] // 2) + [
            "linear_attention"] * (c["num_hidden_layers"] % 2)
        c["full_attention_interval"] = 2
    if family == "nemotron_h":  # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B's: the layers as a pattern, the Mamba keys
        c["hybrid_override_pattern"] = c.pop("layers_block_type")  # (mamba_*) and num_hidden_layers
        c["hybrid_override_pattern"] = "".join({"linear_attention": "M", "moe": "E", "full_attention": "*",
                                                "mlp": "-"}[t] for t in c["hybrid_override_pattern"])
        c |= {"num_hidden_layers": len(c["hybrid_override_pattern"]), "mamba_n_groups": c.pop("n_groups"),
              "mamba_d_conv": c.pop("conv_kernel"), "mamba_chunk_size": c.pop("chunk_size"),
              "time_step_limit": [0.0, float("inf")]}
    if family == "lfm2_moe":  # the key transformers' reader takes first (`tie_embedding`)
        c["tie_embedding"] = c.pop("tie_word_embeddings")
    if family == "gpt_oss":  # the hub's: `rope_type` in rope_scaling, no swiglu_alpha, experts_per_token too
        c["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        del c["swiglu_alpha"]
        c["experts_per_token"] = c["num_experts_per_tok"]
    path.write_text(json.dumps(c, indent=2))


def reference(path: Path, family: str):
    _, model_cls, _ = FAMILIES[family]
    return getattr(transformers, model_cls).from_pretrained(path, dtype=torch.float32).eval()


def check_prefill_three_ways(path: Path, family: str, tokens: int, piece: int) -> None:
    """A prompt of `tokens` ids scored at once, in pieces of `piece` (each from the state the earlier ones left)
    and token by token: within 1e-4 of each other, within 1e-3 of transformers; a reset sequence starts from no
    state, so scoring it again gives the same logits exactly. For the families whose layers keep a state."""
    ids = [(7 * i + 3) % VOCAB for i in range(tokens)]
    engine = Engine.load(path, EngineOptions(prefetch=0, progress=False))
    whole = engine.score(ids)  # [T, V]
    engine.kv.reset()
    pieces = torch.cat([engine.model(torch.tensor(ids[i : i + piece]), engine.kv) for i in range(0, tokens, piece)])
    engine.kv.reset()
    steps = torch.cat([engine.model(torch.tensor([t]), engine.kv) for t in ids])
    assert (pieces - whole).abs().max() < 1e-4 and (steps - whole).abs().max() < 1e-4
    with torch.no_grad():
        want = reference(path, family)(torch.tensor([ids])).logits[0]
    assert (whole - want).abs().max() < 1e-3
    engine.kv.reset()
    torch.testing.assert_close(engine.score(ids), whole, rtol=0, atol=0)

