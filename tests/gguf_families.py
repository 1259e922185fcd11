"""GGUF files of the other families' tiny checkpoints (`families.py`), written as llama.cpp's converter
(convert_hf_to_gguf.py, its classes in `conversion/`) writes them from the hub-style folder: the folder's tensors
under the hub's names, changed as the converter changes them (the split kv_b_proj, -exp(A_log), norms stored as
1 + w, the V heads reordered, ...), each layer's experts stacked, then renamed by gguf-py's own name map
(`gguf.get_tensor_name_map`); the converter's metadata keys. `gguf_files.py` writes the first four families'."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from conftest import halves_to_interleaved
from gguf import GGMLQuantizationType as Q
from gguf_files import quantized
from safetensors.torch import load_file

ARCH = {"deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "glm4_moe_lite": "deepseek2", "glm4_moe": "glm4moe",
        "gpt_oss": "gpt-oss", "minimax_m2": "minimax-m2", "lfm2_moe": "lfm2moe",
        "qwen3_next": "qwen3next", "qwen3_5_moe": "qwen35moe", "nemotron_h": "nemotron_h_moe",
        "phimoe": "phimoe"}
EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(\w+)\.weight")


def hub_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors under the hub's names, float32, each layer's experts stacked per part (`X.experts.w1`)
    as the converter stacks them."""
    t = {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for name in [n for n in t if EXPERT.fullmatch(n)]:
        m = EXPERT.fullmatch(name)
        stacks.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = t.pop(name)
    return t | {name: torch.stack([e[i] for i in range(len(e))]) for name, e in stacks.items()}


class Meta:
    """The converter's metadata calls, in order; a later call of a key replaces the earlier one (as its
    set_gguf_parameters overrides its parent's)."""

    def __init__(self):
        self.calls: dict[str, tuple] = {}

    def __getattr__(self, method: str):
        return lambda *args: self.calls.__setitem__(method, args)

    def write(self, w: gguf.GGUFWriter) -> None:
        for method, args in self.calls.items():
            getattr(w, method)(*args)


def base_meta(c: dict, meta: Meta) -> None:
    """TextModel.set_gguf_parameters: the keys every arch's file has."""
    meta.add_block_count(c["num_hidden_layers"])
    meta.add_context_length(c["max_position_embeddings"])
    meta.add_embedding_length(c["hidden_size"])
    if c.get("intermediate_size"):
        meta.add_feed_forward_length(c["intermediate_size"])
    meta.add_head_count(c["num_attention_heads"])
    meta.add_head_count_kv(c.get("num_key_value_heads", c["num_attention_heads"]))
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn":
        meta.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        meta.add_rope_scaling_factor(rope["factor"])
        meta.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "beta_fast" in rope:
            meta.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
            meta.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    meta.add_rope_freq_base(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    if (eps := c.get("rms_norm_eps", c.get("norm_eps"))) is not None:
        meta.add_layer_norm_rms_eps(eps)
    if (eps := c.get("layer_norm_epsilon")) is not None:
        meta.add_layer_norm_eps(eps)
    if (n := c.get("num_local_experts", c.get("num_experts"))) is not None:
        meta.add_expert_count(n)
    meta.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("n_group") is not None:
        meta.add_expert_group_count(c["n_group"])
        meta.add_expert_group_used_count(c["topk_group"])
    if (score := c.get("scoring_func")) is not None:
        meta.add_expert_gating_func(gguf.ExpertGatingFuncType[score.upper()])
    if c.get("head_dim") is not None:
        meta.add_key_length(c["head_dim"])
        meta.add_value_length(c["head_dim"])
    meta.add_bos_token_id(c["bos_token_id"])
    meta.add_eos_token_id(c["eos_token_id"])


def deepseek2(c: dict, t: dict, meta: Meta, split_kv_b: bool = True) -> dict:
    """DeepseekV2Model (and Glm4MoeLiteModel): MLA as MQA, kv_b_proj split in k_b (transposed) and v_b (older
    converters: kept); the multi-token-prediction layer kept by GLM-4.7-Flash's (as a block past the last)."""
    L, H, R, rope = c["num_hidden_layers"], c["num_attention_heads"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    nope, v = c["qk_nope_head_dim"], c["v_head_dim"]
    nextn = c.get("num_nextn_predict_layers", 0) if c["model_type"] == "glm4_moe_lite" else 0
    base_meta(c | {"num_key_value_heads": 1, "head_dim": None, "num_hidden_layers": L + nextn}, meta)
    meta.add_leading_dense_block_count(c.get("first_k_dense_replace", 1))
    if c.get("q_lora_rank"):
        meta.add_q_lora_rank(c["q_lora_rank"])
    meta.add_kv_lora_rank(R)
    meta.add_key_length(R + rope)
    meta.add_value_length(R)
    meta.add_key_length_mla(nope + rope)
    meta.add_value_length_mla(v)
    meta.add_expert_feed_forward_length(c["moe_intermediate_size"])
    meta.add_expert_count(c["n_routed_experts"])
    meta.add_expert_shared_count(c.get("n_shared_experts", 0))
    meta.add_expert_weights_scale(c["routed_scaling_factor"])
    if c.get("norm_topk_prob"):
        meta.add_expert_weights_norm(True)
    meta.add_rope_dimension_count(rope)
    if (m := (c.get("rope_scaling") or {}).get("mscale_all_dim")) is not None:
        meta.add_rope_scaling_yarn_log_mul(0.1 * m)
    if nextn:
        meta.add_nextn_predict_layers(nextn)
    for name in [n for n in t if n.endswith("kv_b_proj.weight") and split_kv_b]:
        k_b, v_b = t.pop(name).view(H, nope + v, R).split([nope, v], dim=1)
        t[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2)
        t[name.replace("kv_b_proj", "v_b_proj")] = v_b
    return t


def glm4moe(c: dict, t: dict, meta: Meta) -> dict:
    """Glm4MoeModel: the multi-token-prediction layer kept as the last block (the tiny checkpoint has none: its
    tensors here are layer L-1's, with the nextn ones beside, as the hub's files have them)."""
    L, nextn = c["num_hidden_layers"], c.get("num_nextn_predict_layers", 1)
    base_meta(c | {"num_hidden_layers": L + nextn}, meta)
    meta.add_rope_dimension_count(int(c["head_dim"] * c["partial_rotary_factor"]))
    meta.add_expert_count(c["n_routed_experts"])
    meta.add_expert_feed_forward_length(c["moe_intermediate_size"])
    meta.add_expert_shared_count(c["n_shared_experts"])
    meta.add_leading_dense_block_count(c["first_k_dense_replace"])
    meta.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    meta.add_expert_weights_scale(c["routed_scaling_factor"])
    meta.add_expert_weights_norm(c["norm_topk_prob"])
    meta.add_nextn_predict_layers(nextn)
    last = f"model.layers.{L - 1}."
    mtp = {f"model.layers.{L}." + k[len(last):]: v for k, v in t.items() if k.startswith(last)}
    return t | mtp | {f"model.layers.{L}.{k}.weight": torch.ones(c["hidden_size"]) for k in ("enorm", "hnorm")}


def gpt_oss(c: dict, t: dict, meta: Meta) -> dict:
    """GptOssModel, BF16 path: gate_up_proj [E, D, 2I] transposed, gate its even rows and up its odd ones (its
    bias alike), down_proj transposed; sinks as a weight."""
    base_meta(c, meta)
    meta.add_sliding_window(c["sliding_window"])
    meta.add_expert_feed_forward_length(c["intermediate_size"])
    for name in list(t):
        p = name.rpartition(".")[0]
        if name.endswith("sinks"):
            t[name + ".weight"] = t.pop(name)
        elif name.endswith("gate_up_proj"):
            w = t.pop(name).transpose(-1, -2)
            t[p + ".gate_proj.weight"], t[p + ".up_proj.weight"] = w[:, ::2], w[:, 1::2]
        elif name.endswith("gate_up_proj_bias"):
            b = t.pop(name)
            t[p + ".gate_proj.bias"], t[p + ".up_proj.bias"] = b[..., ::2], b[..., 1::2]
        elif name.endswith("down_proj"):
            t[p + ".down_proj.weight"] = t.pop(name).transpose(-1, -2)
        elif name.endswith("down_proj_bias"):
            t[p + ".down_proj.bias"] = t.pop(name)
    return t


def minimax_m2(c: dict, t: dict, meta: Meta) -> dict:
    base_meta(c, meta)
    meta.add_expert_feed_forward_length(c["intermediate_size"])
    meta.add_rope_dimension_count(c["rotary_dim"])
    return t


def lfm2moe(c: dict, t: dict, meta: Meta) -> dict:
    """LFM2MoeModel: the KV heads per layer (0 on the conv ones), the conv squeezed to [D, L], the experts as
    `layers.N.feed_forward.experts.w1`."""
    base_meta(c | {"num_key_value_heads": [c["num_key_value_heads"] if kind == "full_attention" else 0
                                           for kind in c["layer_types"]]}, meta)
    meta.add_expert_feed_forward_length(c["moe_intermediate_size"])
    meta.add_leading_dense_block_count(c["num_dense_layers"])
    meta.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    meta.add_vocab_size(c["vocab_size"])
    meta.add_shortconv_l_cache(c["conv_L_cache"])
    renamed = {}
    for name, tensor in t.items():
        if "conv.conv" in name:
            tensor = tensor.squeeze(1)
        renamed[name.replace("expert_bias", "expert_bias.bias").removeprefix("model." if ".experts." in name else "")
                ] = tensor
    return renamed


def qwen3next(c: dict, t: dict, meta: Meta, split_qkvz: bool = True) -> dict:
    """Qwen3NextModel: norms but linear attention's as 1 + w, A = -exp(A_log), the conv squeezed, in_proj_qkvz split
    in qkv (every q, every k, every v) and z (older converters: kept whole, `ssm_in`); Mamba's keys."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    Hk, Hv, dk, dv = (c[f"linear_{k}"] for k in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim"))
    base_meta(c, meta)
    meta.add_expert_feed_forward_length(c["moe_intermediate_size"])
    meta.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    meta.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
    meta.add_ssm_state_size(dk)
    meta.add_ssm_group_count(Hk)
    meta.add_ssm_time_step_rank(Hv)
    meta.add_ssm_inner_size(dv * Hv)
    meta.add_full_attention_interval(c.get("full_attention_interval", 4))
    meta.add_rope_dimension_count(int(head_dim * c.get("partial_rotary_factor", 0.25)))
    out = {}
    for name, w in t.items():
        if name.endswith(".A_log"):
            w = -torch.exp(w)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif "conv1d" in name:
            w = w.squeeze()
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            w = w + 1
        if "in_proj_qkvz" in name and split_qkvz:  # per key head [q, k, v, z] -> all q, all k, all v; all z
            q, k, v, z = w.T.reshape(c["hidden_size"], Hk, -1).split([dk, dk, Hv // Hk * dv, Hv // Hk * dv], -1)
            qkv = torch.cat([x.reshape(c["hidden_size"], -1) for x in (q, k, v)], -1).T
            out[name.replace("in_proj_qkvz", "in_proj_qkv")], out[name.replace("in_proj_qkvz", "in_proj_z")] = (
                qkv, z.reshape(c["hidden_size"], -1).T)
        else:
            out[name] = w
    return out


def qwen35moe(c: dict, t: dict, meta: Meta) -> dict:
    """Qwen3_5MoeTextModel: the text model's tensors (`language_model.` dropped, the vision tower's skipped), the
    value heads reordered from grouped per key head to tiled, then Qwen3-Next's changes; the multimodal RoPE's
    sections, the multi-token-prediction layer as a last block."""
    L, Hk, Hv = c["num_hidden_layers"], c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv, r = c["linear_key_head_dim"], c["linear_value_head_dim"], Hv // Hk

    def tiled(w: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        return w.unflatten(dim, (Hk, r, size)).transpose(dim, dim + 1).flatten(dim, dim + 2)

    text = {}
    for name, w in t.items():
        if "visual." in name:
            continue
        name = name.replace("language_model.", "")
        if ".in_proj_qkv." in name or ".conv1d." in name:
            w = w.squeeze()
            w = torch.cat([w[:2 * Hk * dk], tiled(w[2 * Hk * dk:], 0, dv)])
        elif ".in_proj_z." in name:
            w = tiled(w, 0, dv)
        elif ".in_proj_b." in name or ".in_proj_a." in name or name.endswith((".A_log", ".dt_bias")):
            w = tiled(w, 0, 1)
        elif ".linear_attn.out_proj." in name:
            w = tiled(w, 1, dv)
        text[name] = w
    nextn = c.get("mtp_num_hidden_layers", 0)
    out = qwen3next(c | {"num_hidden_layers": L + nextn}, text, meta)
    meta.add_rope_dimension_sections([*c["rope_parameters"]["mrope_section"], 0])
    meta.add_nextn_predict_layers(nextn)
    return out


def nemotron_h_moe(c: dict, t: dict, meta: Meta) -> dict:
    """NemotronHModel (MoE): Mamba's keys, per-layer KV heads and expert sizes; A = -exp(A_log) and D as [H, 1], the
    norm as [groups, inner / groups], the conv squeezed, the experts as `model.layers.N.mlp.experts.up_proj`, the
    attention's q/k rows interleaved (LlamaModel.permute); the context length 2**20 (no RoPE)."""
    pattern, H = c["hybrid_override_pattern"], c["mamba_num_heads"]
    base_meta(c | {"head_dim": None, "num_key_value_heads": [c["num_key_value_heads"] if k == "*" else 0
                                                              for k in pattern]}, meta)
    meta.add_vocab_size(c["vocab_size"])
    meta.add_rope_dimension_count(c["head_dim"])
    meta.add_ssm_conv_kernel(c["mamba_d_conv"])
    meta.add_ssm_state_size(c["ssm_state_size"])
    meta.add_ssm_group_count(c["mamba_n_groups"])
    meta.add_ssm_inner_size(H * c["mamba_head_dim"])
    meta.add_ssm_time_step_rank(H)
    meta.add_rope_scaling_finetuned(False)
    meta.add_context_length(2**20)
    meta.add_key_length(c["head_dim"])
    meta.add_value_length(c["head_dim"])
    meta.add_feed_forward_length([c["moe_intermediate_size"] if k == "E" else 0 for k in pattern])
    meta.add_expert_feed_forward_length(c["moe_intermediate_size"])
    meta.add_expert_shared_feed_forward_length(c["moe_shared_expert_intermediate_size"])
    meta.add_expert_count(c["n_routed_experts"])
    meta.add_expert_shared_count(c.get("n_shared_experts", 1))
    meta.add_expert_weights_norm(c.get("norm_topk_prob", True))
    meta.add_expert_weights_scale(c["routed_scaling_factor"])
    out = {}
    for name, w in t.items():
        if name.endswith("mixer.dt_bias"):
            name = name.replace("dt_bias", "dt.bias")
        elif name.endswith("mixer.conv1d.weight"):
            w = w.squeeze()
        elif name.endswith(("mixer.A_log", "mixer.D")):
            w = (-torch.exp(w) if name.endswith("A_log") else w).reshape(-1, 1)
        elif name.endswith("mixer.norm.weight"):
            w = w.reshape(c["mamba_n_groups"], -1)
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            w = halves_to_interleaved(w, c["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
        if ".experts." in name:
            name = name.replace("backbone.", "model.").replace(".mixer.", ".mlp.")
        out[name] = w
    return out


def phimoe(c: dict, t: dict, meta: Meta) -> dict:
    """PhiMoeModel (Phi3MiniModel's keys, not TextModel's): the LongRoPE factors as tensors and llama.cpp's
    attention factor for them (not the config's mscales)."""
    rope, D, H = c["rope_scaling"], c["hidden_size"], c["num_attention_heads"]
    meta.add_context_length(c["max_position_embeddings"])
    meta.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    meta.add_embedding_length(D)
    meta.add_feed_forward_length(c["intermediate_size"])
    meta.add_block_count(c["num_hidden_layers"])
    meta.add_head_count(H)
    meta.add_head_count_kv(c["num_key_value_heads"])
    meta.add_layer_norm_rms_eps(c["rms_norm_eps"])
    meta.add_rope_dimension_count(D // H)
    meta.add_rope_freq_base(c["rope_theta"])
    meta.add_sliding_window(c.get("sliding_window") or 0)
    meta.add_expert_used_count(c["num_experts_per_tok"])
    meta.add_expert_count(c["num_local_experts"])
    original = rope["original_max_position_embeddings"]
    scale = c["max_position_embeddings"] / original
    meta.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    return t | {f"rope_factors_{k}.weight": torch.tensor(rope[f"{k}_factor"]) for k in ("long", "short")}


CONVERT = {"deepseek2": deepseek2, "glm4moe": glm4moe, "gpt-oss": gpt_oss, "minimax-m2": minimax_m2, "lfm2moe": lfm2moe,
           "qwen3next": qwen3next, "qwen35moe": qwen35moe, "nemotron_h_moe": nemotron_h_moe,
           "phimoe": phimoe}


def write_family(folder: Path, family: str, path: Path, qtype: Q = Q.F32, decoded: bool = False,
                 fuse_gate_up: bool = False, **options) -> Path:
    """The family's GGUF at `path`: the matrices the converter quantizes in `qtype` (in F16 where their rows do not
    fill the type's blocks, as the converter falls back), or, `decoded`, as gguf-py decodes them (F32);
    `fuse_gate_up`: each layer's gate and up experts in one tensor, gate rows first (--fuse-gate-up-exps)."""
    arch = ARCH[family]
    c = json.loads((folder / "config.json").read_text())
    c = c | c.get("text_config", {})
    meta = Meta()
    t = CONVERT[arch](c, hub_tensors(folder), meta, **options)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], 99)
    w = gguf.GGUFWriter(path, arch)
    meta.write(w)
    if c.get("tie_word_embeddings", c.get("tie_embedding")):
        t.pop("lm_head.weight", None)
    t = {names.get_name(name.replace("e_score_correction_bias", "e_score_correction.bias"),
                        try_suffixes=(".weight", ".bias")): tensor for name, tensor in t.items()}
    assert None not in t
    for gate in [name for name in t if fuse_gate_up and name.endswith("ffn_gate_exps.weight")]:
        t[gate.replace("gate_exps", "gate_up_exps")] = torch.cat([t.pop(gate), t.pop(gate.replace("gate", "up"))], 1)
    for new, tensor in t.items():
        data = tensor.contiguous().numpy()
        kind = qtype if qtype != Q.F32 and quantized(new, data) else Q.F32
        try:
            raw = gguf.quants.quantize(data, kind)
        except gguf.QuantError:  # rows shorter than a block
            kind, raw = Q.F16, gguf.quants.quantize(data, Q.F16)
        if decoded:
            w.add_tensor(new, np.ascontiguousarray(gguf.quants.dequantize(raw, kind)).astype(np.float32))
        else:
            w.add_tensor(new, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
