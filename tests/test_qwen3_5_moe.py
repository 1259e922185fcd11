"""Qwen3.5 / Qwen3.6 MoE (models/qwen3_5_moe.py): the VL wrapper's config and names, the text model saved alone,
the hub's fused experts, the vision tower and the MTP layer left unread (said once), the separate linear attention
projections joined at load, the configs refused, and the public config's state and KV. Logits and greedy tokens
against transformers' Qwen3_5MoeForConditionalGeneration (multimodal RoPE, sections 2, 1, 1), offloaded ==
resident, int4, convert and the rest are tests/test_families.py's and tests/test_family_features.py's; batched ==
alone, tests/test_batch.py's."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers
from families import VOCAB, make_family
from safetensors import safe_open
from safetensors.torch import save_file

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.modeling.layers import rope_tables
from offload_moe.models import from_hf_config
from offload_moe.models.public import public_config
from offload_moe.options import EngineOptions

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("qwen3_5") / "qwen3_5_moe", "qwen3_5_moe", seed=41)


def load(path) -> Engine:
    return Engine.load(path, EngineOptions(prefetch=0, progress=False))


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_the_hub_config_reads_the_text_model(qwen):
    raw = json.loads((qwen / "config.json").read_text())
    assert raw["model_type"] == "qwen3_5_moe" and raw["text_config"]["model_type"] == "qwen3_5_moe_text"
    c = from_hf_config(qwen / "config.json")
    assert (c.family, c.linear_layers, c.head_dim, c.rotary_dim, c.norm, c.qk_norm) == (
        "qwen3_5_moe", (0, 2), 32, 8, "rms_plus_one", "head")
    assert (c.attention_output_gate, c.norm_topk_prob, c.shared_gate, c.shared_ffn_dim, c.dense_layers) == (
        True, True, True, 32, ())
    assert (c.linear_k_heads, c.linear_v_heads, c.linear_k_dim, c.linear_v_dim) == (2, 4, 16, 16)


def test_the_text_model_saved_alone_matches_transformers(tmp_path):
    """Qwen3_5MoeForCausalLM as save_pretrained writes it: its keys at the top of config.json (model_type
    qwen3_5_moe_text), its tensors under `model.`, 4 value heads to each of 2 key heads."""
    torch.manual_seed(7)
    cfg = transformers.Qwen3_5MoeTextConfig(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=8, linear_key_head_dim=8,
        linear_value_head_dim=8, full_attention_interval=2)
    model = transformers.Qwen3_5MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # decays that carry the state along
                p.uniform_(-3.0, -1.0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3_5MoeForCausalLM"]
    engine = load(tmp_path)
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(engine.score(PROMPT), want, rtol=0, atol=1e-4)


def test_the_hub_s_fused_experts_read_alike(qwen, tmp_path):
    """The hub stores each layer's experts fused (gate_up_proj [E, 2I, D], down_proj [E, D, I]) in one file."""
    path = tmp_path / "fused"
    path.mkdir()
    shutil.copy(qwen / "config.json", path / "config.json")
    flat, experts = {}, {}
    for key, t in tensors(qwen).items():
        if m := re.fullmatch(r"model\.language_model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", key):
            experts.setdefault(int(m[1]), {}).setdefault(m[3], {})[int(m[2])] = t
        else:
            flat[key] = t
    for layer, parts in experts.items():
        E = len(parts["gate_proj"])
        stack = {part: torch.stack([parts[part][e] for e in range(E)]) for part in parts}
        prefix = f"model.language_model.layers.{layer}.mlp.experts."
        flat[prefix + "gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        flat[prefix + "down_proj"] = stack["down_proj"]
    save_file(flat, str(path / "model.safetensors"))
    assert torch.equal(load(path).score(PROMPT), load(qwen).score(PROMPT))


def test_the_vision_tower_and_mtp_layer_are_not_read_and_said_once(qwen, tmp_path, capfd):
    """Their tensors sit in a shard of their own here, and that shard is not a safetensors file at all."""
    path = tmp_path / "with-mtp"
    shutil.copytree(qwen, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    visual = [k for k in index["weight_map"] if k.startswith("model.visual.")]
    assert len(visual) > 10
    mtp = ["mtp.fc.weight", "mtp.layers.0.mlp.experts.0.gate_proj.weight", "mtp.norm.weight"]
    (path / "unread.safetensors").write_bytes(b"not read")
    index["weight_map"] |= dict.fromkeys(visual + mtp, "unread.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    capfd.readouterr()
    got = load(path).score(PROMPT)
    err = capfd.readouterr().err
    assert err.count("not read: the vision tower") == 1 and "the multi-token-prediction layer (3 tensors)" in err
    assert torch.equal(got, load(qwen).score(PROMPT))


@pytest.mark.parametrize("change,says", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "mrope_section": [2, 1, 1]}},
     "reduces to plain RoPE for text only with rope_type default"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2]}},
     r"three mrope_section counts \(this has 'default', \[2, 2\]\)"),
    ({"attn_output_gate": False}, "attn_output_gate false is not implemented"),
    ({"layer_types": ["linear_attention", "full_attention"]}, "layer_types must give 3 of"),
])
def test_configs_refused(qwen, tmp_path, change, says):
    raw = json.loads((qwen / "config.json").read_text())
    raw["text_config"] |= change
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=says):
        from_hf_config(path)


def test_the_public_config_s_state_and_kv():
    """Qwen3.6-35B-A3B: 10 attention layers of 2 kv heads x 256, 30 linear ones (16 key heads, 32 value heads of
    128, a 4-tap conv over 8192 channels)."""
    c = from_hf_config(public_config("Qwen/Qwen3.6-35B-A3B"))
    assert (c.n_layers, len(c.linear_layers), c.num_experts, c.top_k, c.rotary_dim) == (40, 30, 256, 8, 64)
    assert c.kv_bytes(1, 2) - c.state_bytes(2) == 10 * 2 * 2 * 256 * 2  # fp16 KV a token
    assert c.state_bytes(2) == 30 * (8192 * 3 * 2 + 32 * 128 * 128 * 4)  # 61.4 MiB a sequence


@pytest.mark.parametrize("section", [[11, 11, 10], [2, 1, 1], [8, 12, 12]])
def test_multimodal_rope_on_text_positions_is_plain_rope(section):
    """transformers' interleaved multimodal RoPE with its three position streams equal (text) gives our tables
    over the rotary dims (64 of 256, Qwen3.6-35B-A3B's), whatever the sections; with unequal streams it does not."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

    cfg = transformers.Qwen3_5MoeTextConfig(head_dim=256, rope_parameters={
        "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": section,
        "mrope_interleaved": True})
    rotary = Qwen3_5MoeTextRotaryEmbedding(cfg)
    c = from_hf_config(public_config("Qwen3.6-35B-A3B"))
    cos, sin = rope_tables(c.rotary_dim, c.rope_theta, 300, torch.device("cpu"))
    positions = torch.arange(300)[None, None].expand(3, 1, 300)  # [streams, batch, T]
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, want_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin[0], rtol=0, atol=1e-6)
    image_like, _ = rotary(torch.zeros(1), torch.stack([positions[0], positions[1] // 2, positions[2] % 7]))
    assert not torch.allclose(image_like[0], cos)


def test_parts_that_do_not_join_are_refused_by_name(qwen, tmp_path):
    path = tmp_path / "short-z"
    path.mkdir()
    shutil.copy(qwen / "config.json", path / "config.json")
    flat = tensors(qwen)
    z = "model.language_model.layers.2.linear_attn.in_proj_z.weight"
    flat[z] = flat[z][:32].clone()  # half its value heads
    save_file(flat, str(path / "model.safetensors"))
    with pytest.raises(UserError, match=r"tensor layers\.2\.attention\.wqkvz\.weight cannot be made of .*in_proj_z"):
        load(path)
