"""GLM-4.7-Flash (models/glm4_moe_lite.py): its config in both forms (the hub's `first_k_dense_replace`,
transformers 5's `mlp_layer_types` and `rope_parameters`, dense layers anywhere), the multi-token-prediction
layer left unread, and the configs refused. Logits against transformers at every cache size are
tests/test_families.py's; int4, convert, the tiered store and `--miss-policy cpu`, tests/test_family_features.py's;
batched == alone, tests/test_batch.py's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from families import VOCAB, make_family

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.models import from_hf_config
from offload_moe.options import EngineOptions

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("glm-lite") / "glm4_moe_lite", "glm4_moe_lite", seed=31)


def load(path) -> Engine:
    return Engine.load(path, EngineOptions(prefetch=0, progress=False))


def test_the_hub_config_reads_as_deepseek_v3s_shape(glm):
    c = from_hf_config(glm / "config.json")
    assert "mlp_layer_types" not in json.loads((glm / "config.json").read_text())
    assert (c.family, c.router, c.n_group, c.topk_group, c.routed_scaling_factor) == ("glm4_moe_lite", "sigmoid", 4, 2,
                                                                                      1.8)
    assert (c.dense_layers, c.kv_lora_rank, c.q_lora_rank, c.rotary_dim, c.rope_interleave) == ((0,), 32, 32, 8, True)
    assert (c.head_dim, c.v_head_dim, c.n_kv_heads, c.shared_ffn_dim, c.kv_dims) == (24, 16, 4, 32, (1, 40, 0))


def test_transformers_form_with_dense_layers_anywhere_matches_transformers(tmp_path):
    """save_pretrained's config (`mlp_layer_types`, `rope_parameters`) as written, a dense layer in the middle."""
    torch.manual_seed(3)
    cfg = transformers.Glm4MoeLiteConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        mlp_layer_types=["sparse", "dense", "sparse"], rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    model = transformers.Glm4MoeLiteForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    engine = load(tmp_path)
    assert engine.config.dense_layers == (1,) and engine.config.rope_theta == 5e4
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(engine.score(PROMPT), want, rtol=0, atol=1e-4)


def test_the_multi_token_prediction_layer_is_not_read(glm, tmp_path):
    """The hub's layer num_hidden_layers (the MTP module) sits in a shard of its own here, and that shard is not
    a safetensors file at all: loading and running never open it."""
    path = tmp_path / "with-mtp"
    shutil.copytree(glm, path)
    mtp = ["model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.hnorm.weight",
           "model.layers.3.self_attn.kv_b_proj.weight", "model.layers.3.mlp.gate.weight",
           "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.3.mlp.experts.0.gate_proj.weight",
           "model.layers.3.mlp.shared_experts.up_proj.weight", "model.layers.3.shared_head.head.weight"]
    (path / "mtp.safetensors").write_bytes(b"not read")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(mtp, "mtp.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(load(path).score(PROMPT), load(glm).score(PROMPT))


@pytest.mark.parametrize("change,says", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported with latent attention"),
    ({"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types must list 'dense' or 'sparse' for each of 3 layers"),
    ({"mlp_layer_types": ["dense", "moe", "sparse"]}, "mlp_layer_types must list"),
    ({"topk_method": "greedy"}, "glm4_moe_lite routes with topk_method noaux_tc"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_configs_refused(glm, tmp_path, change, says):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(json.loads((glm / "config.json").read_text()) | change))
    with pytest.raises(UserError, match=says):
        from_hf_config(path)
