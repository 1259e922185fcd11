"""Nemotron-H, the hybrid of Mamba-2, attention without RoPE, relu2 experts and dense MLPs, one piece a layer
(`modeling/mamba.py`): a prompt prefilled whole, in pieces and token by token (the SSM state carried across
chunks), its state in the pool and the memory plan, the config's keys, relu2 experts in every format. Logits
against transformers, offloading, batching, int8/int4, convert and the rest come with the other families
(tests/families.py)."""

from __future__ import annotations

import json

import pytest
import torch
from families import check_prefill_three_ways, make_family

from offload_moe.config import ModelConfig
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.formats.base import DenseFormat
from offload_moe.formats.int4 import Int4Format
from offload_moe.formats.int8 import Int8Format
from offload_moe.modeling.layers import KVPool
from offload_moe.models import from_hf_config
from offload_moe.options import EngineOptions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("nemotron_h") / "m", "nemotron_h", seed=3)


def test_prefill_whole_equals_pieces_and_token_by_token_and_transformers(ckpt):
    """A 40-token prompt at once (five chunks of 8), in pieces of 7 (each from the state so far, chunks that
    straddle the pieces) and token by token (the recurrent form): within 1e-4; against transformers within 1e-3."""
    check_prefill_three_ways(ckpt, "nemotron_h", 40, 7)


def test_the_layers_state_and_memory_plan(ckpt):
    """The pattern ME*E-ME: Mamba on 0 and 5, attention on 2 (the only KV cache), experts on 1, 3 and 6 (the
    cache's rows), a dense MLP on 4; each Mamba layer's conv inputs and SSM state in the pool, zeroed on reuse."""
    c = Engine.load(ckpt, EngineOptions(prefetch=0, progress=False)).config
    assert c.mamba_layers == (0, 5) and c.moe_layers == (1, 3, 6) and c.dense_layers == (4,)
    assert c.n_attention_layers == 1 and c.rotary_dim == 0 and c.expert_parts == ("w1", "w2")
    pool = KVPool(c, 32, 3, torch.device("cpu"), torch.float32)
    assert [t.shape[2] for t in pool.k] == [0, 0, 32, 0, 0, 0, 0]
    assert tuple(pool.conv[0].shape) == (3, 128 + 2 * 2 * 16, 3) and tuple(pool.recurrent[5].shape) == (3, 8, 16, 16)
    state = 2 * ((128 + 64) * 3 * 4 + 8 * 16 * 16 * 4)  # two layers: the conv's last 3 inputs, the SSM state
    assert c.state_bytes(4) == state and c.kv_bytes(32, 4) == 2 * 2 * 32 * 16 * 4 + state
    assert pool.nbytes == 3 * c.kv_bytes(32, 4)
    pool.recurrent[5].fill_(1.0)
    pool.seqs[1].reset()
    assert pool.recurrent[5][1].abs().sum() == 0 and pool.recurrent[5][0].abs().sum() > 0


def test_config_keys(ckpt, tmp_path):
    """The hub's pattern or transformers 5's `layers_block_type` (old names too) give the same config; a pattern
    that does not fit, a latent MoE or another activation is refused in one line."""
    hub = json.loads((ckpt / "config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hub))
    want = from_hf_config(path)
    types = ["mamba", "moe", "attention", "moe", "mlp", "mamba", "moe"]
    written = {k: v for k, v in hub.items() if k not in ("hybrid_override_pattern", "num_hidden_layers")}
    path.write_text(json.dumps(written | {"layers_block_type": types}))
    assert from_hf_config(path) == want
    for bad, says in (({"hybrid_override_pattern": "ME*X"}, "hybrid_override_pattern"),
                      ({"num_hidden_layers": 9}, "num_hidden_layers is 9"),
                      ({"moe_latent_size": 32}, "moe_latent_size"), ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
                      ({"time_step_limit": 0.1}, "time_step_limit"), ({"mamba_num_heads": 7}, "Mamba layers")):
        path.write_text(json.dumps(hub | bad))
        with pytest.raises(UserError, match=says):
            from_hf_config(path)


@pytest.mark.parametrize("I", [32, 64])
def test_relu2_experts_in_every_format(I):
    """w2 . relu(w1 . x)^2 with no w3, packed in each format: the dense format exactly, int8 and int4 (kernels where
    they run, I = 32 leaves w13 in blocks of 32 rows: not the CPU int4 kernel's 64) as their own dequantized path
    and close to it; and fewer bytes than a gated expert."""
    c = ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32, ffn_dim=I, num_experts=2, top_k=1,
                    vocab_size=8, ffn_act="relu2")
    g = torch.Generator().manual_seed(0)
    parts = {"w1": torch.randn(I, 64, generator=g) / 8, "w2": torch.randn(64, I, generator=g) / 8}
    x = torch.randn(3, 64, generator=g)
    want = torch.relu(x @ parts["w1"].T).square() @ parts["w2"].T
    for fmt, tol in ((DenseFormat(c, torch.float32), 1e-6), (Int8Format(c, torch.float32, 32), 0.02),
                     (Int4Format(c, torch.float32, 32), 0.2)):
        buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
        fmt.pack(parts, buf)
        views = fmt.views(buf)
        for rows in (x[:1], x):
            got = fmt.forward(rows, views)
            assert ((got - want[: len(rows)]).abs().max() / want.abs().max()).item() < tol, fmt.name
            if hasattr(fmt, "forward_dequant"):
                ref = fmt.forward_dequant(rows, views)
                assert ((got - ref).abs().max() / want.abs().max()).item() < 0.02, fmt.name
    gated = DenseFormat(ModelConfig(**{**c.to_dict(), "ffn_act": "swiglu"}), torch.float32)
    assert DenseFormat(c, torch.float32).nbytes * 3 == gated.nbytes * 2
