"""DeepSeek-V2 and -V3 (models/deepseek.py, mla.py): the grouped softmax router against transformers'
DeepseekV2TopkRouter, the configs and resident tensors, the latent KV cache (what it stores, its bytes),
decode in the absorbed form against the expanded prefill, batched decode over a pool's latent rows, the
multi-token-prediction layer left unread, and the configs refused. Logits against transformers at every
cache size are tests/test_families.py's; the commands, tests/test_family_features.py's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from families import make_family, reference
from safetensors.torch import save_file
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.modeling.layers import KVPool
from offload_moe.modeling.mla import LatentAttention
from offload_moe.modeling.transformer import grouped_softmax_topk
from offload_moe.models import from_hf_config
from offload_moe.options import EngineOptions
from offload_moe.weights.checkpoint import Checkpoint

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]
FAMILIES = ["deepseek_v2", "deepseek_v3"]


def halves(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1), (x2, x3), ... -> x0, x2, ..., x1, x3, ...: transformers' V2 keeps k_pe interleaved."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deepseek")
    return {f: make_family(root / f, f, seed=20 + i) for i, f in enumerate(FAMILIES)}


def load(path, **options) -> Engine:
    return Engine.load(path, EngineOptions(prefetch=0, progress=False, **options))


@pytest.mark.parametrize("E,K,method,groups,keep,scale", [
    (16, 4, "group_limited_greedy", 4, 2, 2.0), (16, 4, "greedy", 1, 1, 1.0), (64, 6, "greedy", 1, 1, 1.0),
    (32, 6, "group_limited_greedy", 8, 3, 16.0)])
def test_grouped_softmax_topk_matches_transformers(E, K, method, groups, keep, scale):
    cfg = transformers.DeepseekV2Config(hidden_size=32, n_routed_experts=E, num_experts_per_tok=K, topk_method=method,
                                        n_group=groups, topk_group=keep, routed_scaling_factor=scale)
    router = DeepseekV2TopkRouter(cfg)
    g = torch.Generator().manual_seed(E + K + groups)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 32, generator=g))
        logits, want_w, want_i = router(torch.randn(64, 32, generator=g))
    w, i = grouped_softmax_topk(logits, K, groups, keep, False, scale)
    assert w.dtype == torch.float32
    # transformers' top-k is unsorted: compare per token as sets, weights matched by expert
    order, want_order = i.argsort(-1), want_i.argsort(-1)
    assert torch.equal(i.gather(1, order), want_i.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=0, atol=1e-6)
    assert (w[:, :-1] >= w[:, 1:]).all()  # rank order


def test_groups_change_the_choice_and_norm_topk_prob_renormalises_unscaled():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 3
    _, grouped = grouped_softmax_topk(logits, 4, 4, 2, False, 1.0)
    _, greedy = grouped_softmax_topk(logits, 4, 1, 1, False, 1.0)
    assert not torch.equal(grouped.sort(-1)[0], greedy.sort(-1)[0])
    assert all(len({int(e) // 4 for e in grouped[t]}) <= 2 for t in range(64))
    w, i = grouped_softmax_topk(logits, 4, 1, 1, True, 16.0)  # DeepSeek's code: renormalised, not scaled
    chosen = logits.softmax(-1).gather(1, i)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_config_resident_tensors_and_softmax_scale(ds, family):
    ckpt = Checkpoint(ds[family])
    c = ckpt.config
    v3 = family == "deepseek_v3"
    assert (c.kv_lora_rank, c.q_lora_rank, c.head_dim, c.qk_rope_head_dim, c.v_head_dim) == (32, 32 if v3 else 0,
                                                                                             24, 8, 16)
    assert (c.router, c.n_group, c.topk_group, c.norm_topk_prob) == (("sigmoid", 4, 2, True) if v3 else
                                                                    ("grouped_softmax", 4, 2, False))
    assert (c.dense_layers, c.shared_ffn_dim, c.rope_interleave, c.rotary_dim) == ((0,), 32 if v3 else 64, True, 8)
    shapes = ckpt.expected_dense()
    assert ("layers.1.attention.wq_b.weight" in shapes) == v3 and ("layers.1.attention.wq.weight" in shapes) != v3
    assert shapes["layers.1.attention.wkv_b.weight"] == (4 * (16 + 16), 32)
    ref = reference(ds[family], family)
    n_ref = sum(p.numel() for n, p in ref.state_dict().items() if ".experts." not in n)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == c.dense_params == n_ref
    engine = load(ds[family])
    # V2's YaRN: the softmax scale takes mscale(factor, mscale_all_dim) squared
    assert engine.model.layers[1].attention.scale == pytest.approx(ref.model.layers[1].self_attn.scaling, rel=1e-12)
    assert (engine.model.layers[1].attention.scale == pytest.approx(24 ** -0.5)) == v3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cache_holds_the_latent_and_the_roped_key(ds, family):
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (the normed latent and
    the roped shared key, as transformers caches them), not per-head keys and values."""
    engine = load(ds[family], context=64)
    c, kv = engine.config, engine.kv
    assert [tuple(t.shape) for t in kv.k] == [(1, 64, 32 + 8)] * 3 and sum(t.numel() for t in kv.v) == 0
    assert kv.nbytes == c.kv_bytes(64, 4) == 3 * (32 + 8) * 64 * 4
    full = 3 * 4 * (24 + 16) * 64 * 4  # per-head keys (nope + rope) and values: what an expanded cache would hold
    assert full == 4 * kv.nbytes
    engine.score(PROMPT)
    with torch.no_grad():
        cache = reference(ds[family], family)(torch.tensor([PROMPT]), use_cache=True).cache
    T = len(PROMPT)
    for layer in range(3):
        latent, k_pe = cache.layers[layer].keys[0, 0], cache.layers[layer].values[0, 0]  # [T, R], [T, dr]
        if family == "deepseek_v2":  # its complex-pair rotation leaves k_pe interleaved; ours is in halves
            k_pe = halves(k_pe)
        torch.testing.assert_close(kv.k[layer][0, :T], torch.cat([latent, k_pe], -1), rtol=0, atol=1e-6)
        assert not kv.k[layer][0, T:].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_absorbed_equals_the_expanded_prefill(ds, family, monkeypatch):
    """Token by token, decode never expands the cache (the expanded path would raise) and its logits are
    those of the whole sequence scored in one expanded pass; a prompt in chunks too."""
    engine = load(ds[family], context=64)
    model, kv = engine.model, engine.kv
    ids = PROMPT + [5, 77, 140, 9, 300, 41]
    whole = engine.score(ids)
    kv.reset()
    chunks = [model(torch.tensor(PROMPT[i : i + 3]), kv) for i in range(0, len(PROMPT), 3)]  # 3, 3, 3, 1
    torch.testing.assert_close(torch.cat(chunks), whole[: len(PROMPT)], rtol=0, atol=1e-5)

    def expanded(*_):
        raise AssertionError("decode expanded the cache")

    monkeypatch.setattr(LatentAttention, "_expanded", expanded)
    steps = [model(torch.tensor([t]), kv)[0] for t in ids[len(PROMPT):]]
    torch.testing.assert_close(torch.stack(steps), whole[len(PROMPT):], rtol=0, atol=1e-5)
    # the two forms of one layer on the same rows agree to rounding
    attn = model.layers[1].attention
    g = torch.Generator().manual_seed(0)
    q_nope, q_pe, rows = torch.randn(4, 1, 16, generator=g), torch.randn(4, 1, 8, generator=g), torch.randn(9, 40,
                                                                                                         generator=g)
    monkeypatch.undo()
    torch.testing.assert_close(attn._absorbed(q_nope, q_pe, rows[None], None), attn._expanded(q_nope, q_pe, rows, 8),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_decode_over_latent_rows(ds, family):
    """forward_batch over a pool: slots that are not consecutive (rows gathered) and consecutive (a view), each
    sequence at its own position, equal each sequence alone."""
    engine = load(ds[family], cache_experts=4, context=64)
    model, c = engine.model, engine.config
    pool = KVPool(c, 64, 3, engine.device, engine.dtype)
    prompts = {0: PROMPT, 1: [1, 5, 6], 2: [1, 40, 41, 42, 43, 44, 45]}
    nxt = {0: 12, 1: 250, 2: 3}
    for slot, p in prompts.items():
        model(torch.tensor(p), pool.seqs[slot])
    alone = {s: engine.score(p + [nxt[s]])[-1] for s, p in prompts.items()}
    gathered = model.forward_batch(torch.tensor([nxt[0], nxt[2]]), pool, [0, 2])
    torch.testing.assert_close(gathered, torch.stack([alone[0], alone[2]]), rtol=0, atol=1e-5)
    assert [s.pos for s in pool.seqs] == [len(PROMPT) + 1, 3, 8]
    more = {0: 7, 1: nxt[1], 2: 9}
    view = model.forward_batch(torch.tensor([more[0], more[1], more[2]]), pool, [0, 1, 2])
    want = [engine.score(PROMPT + [nxt[0], more[0]])[-1], alone[1], engine.score(prompts[2] + [nxt[2], more[2]])[-1]]
    torch.testing.assert_close(view, torch.stack(want), rtol=0, atol=1e-5)


def test_the_multi_token_prediction_layer_is_not_read(ds, tmp_path):
    """V3's hub checkpoints hold layer num_hidden_layers (the MTP module, with experts): loading leaves it alone."""
    path = tmp_path / "with-mtp"
    shutil.copytree(ds["deepseek_v3"], path)
    mtp = {"model.layers.3.eh_proj.weight": torch.randn(64, 128), "model.layers.3.enorm.weight": torch.ones(64),
           "model.layers.3.self_attn.kv_b_proj.weight": torch.randn(128, 32),
           "model.layers.3.mlp.gate.weight": torch.randn(16, 64),
           "model.layers.3.mlp.experts.0.gate_proj.weight": torch.randn(5, 7),
           "model.layers.3.shared_head.head.weight": torch.randn(320, 64)}
    save_file(mtp, path / "mtp.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(mtp, "mtp.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(load(path).score(PROMPT), load(ds["deepseek_v3"]).score(PROMPT))


def test_predict_is_the_router(ds):
    engine = load(ds["deepseek_v2"], dtype="bfloat16")
    model = engine.model
    h = torch.randn(12, 64, dtype=torch.bfloat16)
    for row, layer in enumerate(model.rows):
        blk = model.layers[layer]
        assert torch.equal(model.predict(row, h), model.route(blk, blk.ffn_norm(h))[1])


@pytest.mark.parametrize("change,says", [
    ({"topk_method": "noaux_tc"}, "deepseek_v2 routes with topk_method greedy or group_limited_greedy"),
    ({"scoring_func": "sigmoid"}, "scoring_func softmax"),
    ({"attention_bias": True}, "attention_bias"),
    ({"qk_rope_head_dim": 7}, "rope dims must be even"),
])
def test_configs_refused(ds, tmp_path, change, says):
    c = json.loads((ds["deepseek_v2"] / "config.json").read_text()) | change
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c))
    with pytest.raises(UserError, match=says):
        from_hf_config(path)

