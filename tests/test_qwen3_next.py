"""Qwen3-Next, the hybrid (`modeling/deltanet.py`): the gated delta rule against transformers' own torch forms,
prefill in chunks against decode token by token, the per-sequence state in the pool (slots reused), and the state
in the memory plan. Logits against transformers, offloading, int8/int4, convert, traces and the rest come with
the other families (tests/families.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli as run
from families import check_prefill_three_ways, make_family
from test_batch import alone, batched, check_same
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from offload_moe.engine import Engine
from offload_moe.modeling.deltanet import _l2norm, chunked, recurrent_step
from offload_moe.modeling.layers import KVPool
from offload_moe.models import from_hf_config
from offload_moe.models.public import public_config
from offload_moe.options import EngineOptions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("qwen3_next") / "m", "qwen3_next", seed=3)


def test_the_delta_rule_s_two_forms_match_transformers_and_each_other():
    """150 tokens (three chunks, the last padded) from a state, 2 key heads serving 4 value heads."""
    g = torch.Generator().manual_seed(0)
    T, Hk, Hv, dk, dv = 150, 2, 4, 16, 8
    q, k = torch.randn(1, T, Hk, dk, generator=g), torch.randn(1, T, Hk, dk, generator=g)
    v = torch.randn(1, T, Hv, dv, generator=g)
    decay = -torch.rand(1, T, Hv, generator=g) * 0.3
    beta = torch.rand(1, T, Hv, generator=g)
    S0 = torch.randn(1, Hv, dk, dv, generator=g)
    args = dict(g=decay, beta=beta, initial_state=S0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    want, want_S = torch_chunk_gated_delta_rule(q, k, v, **args)  # [1, T, Hv, dv], [1, Hv, dk, dv]
    want_rec, want_rec_S = torch_recurrent_gated_delta_rule(q, k, v, **args)

    # ours take value heads first, q and k L2-normed (q times 1/sqrt(dk)) and repeated per value head
    qh, kh = (_l2norm(t[0]).repeat_interleave(Hv // Hk, dim=1).transpose(0, 1) for t in (q, k))  # [Hv, T, dk]
    qh = qh * dk ** -0.5
    vh, gh, bh = v[0].transpose(0, 1), decay[0].t(), beta[0].t()
    S = S0[0].clone()
    out = chunked(qh, kh, vh, gh, bh, S).transpose(0, 1)  # [T, Hv, dv]
    torch.testing.assert_close(out, want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(S, want_S[0], rtol=0, atol=1e-5)

    S_rec = S0.clone()
    steps = [recurrent_step(S_rec, qh[:, t][None], kh[:, t][None], vh[:, t][None], gh[:, t][None], bh[:, t][None])
             for t in range(T)]  # [1, Hv, dv] each
    rec = torch.cat(steps)  # [T, Hv, dv]
    torch.testing.assert_close(rec, want_rec[0], rtol=0, atol=1e-5)
    assert (rec - out).abs().max() < 1e-4 and (S_rec[0] - S).abs().max() < 1e-4


def test_prefill_in_chunks_equals_token_by_token_and_transformers(ckpt):
    """A 70-token prompt at once (the chunked rule: two chunks, the last padded), in pieces of 25 (each from the
    state so far), and token by token (the recurrent rule, the conv one step at a time): within 1e-4; against
    transformers within 1e-3."""
    check_prefill_three_ways(ckpt, "qwen3_next", 70, 25)


def test_batched_equals_alone_with_slots_reused(ckpt):
    """Four sequences through two pool slots: each slot's state is reset for the next sequence that takes it;
    top-k expert slots (misses), prefetch, prompts prefilled in chunks of 3."""
    jobs = [([1, 17, 33, 250, 4, 99, 180, 7], 5, 0), ([1, 5, 6], 4, 0), ([1, 40, 41, 42, 43], 4, 1),
            ([9, 8], 5, 2)]
    c = Engine.load(ckpt, EngineOptions(prefetch=0, progress=False)).config
    engine = Engine.load(ckpt, EngineOptions(cache_experts=c.top_k, prefetch=1, progress=False))
    refs = alone(engine, jobs)
    sched, ids, _ = batched(engine, jobs, max_batch=2, prefill_chunk=3)
    check_same(sched, ids, refs)
    assert max(sched.batch_sizes) == 2 and sum(engine.cache.table.misses) > 0


def test_the_state_in_the_pool_and_the_memory_plan(ckpt, tmp_path, capsys):
    c = Engine.load(ckpt, EngineOptions(prefetch=0, progress=False)).config
    assert c.linear_layers == (0, 2) and c.n_attention_layers == 1 and c.norm == "rms_plus_one"
    pool = KVPool(c, 32, 3, torch.device("cpu"), torch.float32)
    assert [tuple(t.shape) for t in pool.k] == [(3, 2, 0, 16), (3, 2, 32, 16), (3, 2, 0, 16)]  # no KV rows there
    assert tuple(pool.conv[0].shape) == (3, 128, 3) and pool.conv[1] is None  # q, k, v: 2*32 + 64 channels
    assert tuple(pool.recurrent[2].shape) == (3, 4, 16, 16) and pool.recurrent[2].dtype == torch.float32
    state = 2 * (128 * 3 * 4 + 4 * 16 * 16 * 4)  # two layers: the conv's inputs in float32, the state in float32
    assert c.state_bytes(4) == state and c.kv_bytes(32, 4) == 2 * 2 * 32 * 16 * 4 + state
    assert pool.nbytes == 3 * c.kv_bytes(32, 4)

    # Qwen3-Next-80B-A3B: 80B parameters; 12 attention layers of 2 kv heads x 256, 36 linear ones
    path = public_config("Qwen3-Next-80B-A3B-Instruct")  # shipped: offload_moe/data/configs
    big = from_hf_config(path)
    assert big.n_moe_layers * big.num_experts * big.expert_params + big.dense_params == pytest.approx(80e9, rel=0.01)
    assert big.kv_bytes(1, 2) - big.state_bytes(2) == 12 * 2 * 2 * 256 * 2  # fp16 KV a token
    assert big.state_bytes(2) == 36 * (8192 * 3 * 2 + 32 * 128 * 128 * 4)  # 73.7 MiB a sequence
    code, out, err = run(capsys, "plan", "--config", str(path), "--max-batch", "4", "--context", "4096", "--json")
    assert code == 0, err
    assert all(card["kv"] == 4 * big.kv_bytes(4096, 2) for card in json.loads(out)["cards"])
