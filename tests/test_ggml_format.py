"""GGUF experts kept in the file's types (`formats/ggml.py`): every type decodes as gguf-py decodes it, bit for bit;
a file whose experts mix types by part and by layer (as llama.cpp's Q4_K_M does) keeps each part's bytes, gives the
logits of the model gguf-py decodes, offloaded == resident == computed on the CPU from RAM, and survives `convert`;
`plan` has its column; another --expert-quant converts explicitly."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from families import make_family, reference
from ggml_blocks import blocks
from gguf import GGMLQuantizationType as Q
from gguf_files import as_decoded, write_gguf

from offload_moe.engine import Engine
from offload_moe.formats import cpu_kernels
from offload_moe.formats.cpu_kernels import ggml_linear, library
from offload_moe.formats.ggml import DECODERS, GGUFFormat, dequantize, row_bytes
from offload_moe.options import EngineOptions

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]
@pytest.mark.parametrize("kind", list(DECODERS), ids=lambda k: k.name)
def test_every_type_decodes_as_gguf_py_bit_for_bit(kind):
    rng = np.random.default_rng(int(kind))
    data = blocks(kind, 6, 512, rng)
    want = torch.from_numpy(gguf.quants.dequantize(data, kind))
    got = dequantize(torch.from_numpy(data), kind, 512)
    assert want.isfinite().all() and torch.equal(got, want)


@pytest.mark.skipif(library() is None, reason="the CPU kernels are not built here")
@pytest.mark.parametrize("kind", [k for k in DECODERS if k not in (Q.Q2_K, Q.Q3_K)], ids=lambda k: k.name)
def test_the_c_kernel_multiplies_as_the_decoded_weights(kind):
    """One token times a matrix, the weights decoded inside the kernel's dot products: the product of gguf-py's
    weights to float32 rounding (sums in another order); rows of several super-blocks."""
    rng = np.random.default_rng(int(kind))
    data = torch.from_numpy(blocks(kind, 96, 768, rng))
    x = torch.randn(1, 768, generator=torch.Generator().manual_seed(0))
    want = x @ torch.from_numpy(gguf.quants.dequantize(data.numpy(), kind)).T
    got = ggml_linear(x, data, kind, 768)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_an_expert_of_mixed_types_in_one_buffer():
    """gate Q4_K, up Q5_0, down Q6_K: one buffer of the parts' bytes, computing w2 . silu(w1 x) * w3 x on the
    weights gguf-py decodes."""
    from offload_moe.config import ModelConfig

    c = ModelConfig(dim=256, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=128, ffn_dim=512, num_experts=2, top_k=1,
                    vocab_size=8)
    rng = np.random.default_rng(0)
    kinds = (Q.Q4_K, Q.Q5_0, Q.Q6_K)
    raw = {p: blocks(k, n, K, rng) for p, k, (n, K) in zip(("w1", "w3", "w2"), kinds, ((512, 256), (512, 256),
                                                                                         (256, 512)), strict=True)}
    fmt = GGUFFormat(c, [kinds])
    assert fmt.nbytes == sum(-(-a.nbytes // 64) * 64 for a in raw.values())  # each part on a 64-byte boundary
    buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    fmt.pack({p: (k, torch.from_numpy(raw[p])) for p, k in zip(("w1", "w3", "w2"), kinds, strict=True)}, buf)
    w = {p: torch.from_numpy(gguf.quants.dequantize(raw[p], k)) for p, k in zip(("w1", "w3", "w2"), kinds,
                                                                                 strict=True)}
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    want = F.linear(F.silu(F.linear(x, w["w1"])) * F.linear(x, w["w3"]), w["w2"])
    # within float32's summation order (the CPU's GEMM is oneDNN's or MKL's: gemm.py), relative to the largest
    torch.testing.assert_close(fmt.forward(x, fmt.views(buf)), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# per layer: the gate and up projections' type, the down projection's (llama.cpp's mixes vary down by layer)
MIX = {0: (Q.Q4_0, Q.Q5_1), 1: (Q.Q4_1, Q.Q8_0)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny Qwen3-MoE as a GGUF whose experts mix types by part and by layer (the rest Q8_0), and the model gguf-py
    decodes from it."""
    root = tmp_path_factory.mktemp("mixed")
    model = reference(make_family(root / "src", "qwen3_moe", seed=4), "qwen3_moe")
    llama = {f"blk.{i}.ffn_{p}_exps.weight": down if p == "down" else up
             for i, (up, down) in MIX.items() for p in ("gate", "up", "down")}
    hf = {f"model.layers.{i}.mlp.experts.{p}": down if p == "down_proj" else up
          for i, (up, down) in MIX.items() for p in ("gate_up_proj", "down_proj")}
    path = write_gguf(model, "qwen3_moe", root / "mixed.gguf", Q.Q8_0, qtypes=llama)
    with torch.no_grad():
        want = as_decoded(copy.deepcopy(model), Q.Q8_0, hf)(torch.tensor([PROMPT])).logits[0]
    return path, want


def load(path, **options) -> Engine:
    return Engine.load(path, EngineOptions(prefetch=0, progress=False, **options))


def test_mixed_types_keep_the_files_bytes_and_give_the_decoded_models_logits(mixed):
    path, want = mixed
    engine = load(path)
    fmt, c = engine.cache.fmt, engine.config
    assert isinstance(fmt, GGUFFormat) and fmt.name == "gguf-Q4_0+Q4_1+Q5_1+Q8_0"
    assert fmt.kinds == [(up, up, down) for up, down in MIX.values()]
    D, I = c.dim, c.ffn_dim  # each row's bytes are its file bytes, 64-aligned; the buffer is the largest row's
    rows = [sum(-(-n * row_bytes(k, K) // 64) * 64 for k, (n, K) in zip(kinds, ((I, D), (I, D), (D, I)), strict=True))
            for kinds in fmt.kinds]
    assert fmt.nbytes == max(rows) and rows[0] != rows[1]
    got = engine.score(PROMPT)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    alone = engine.generate(PROMPT, 5, keep_logits=True)
    for options in (dict(cache_experts=c.top_k, prefetch=1), dict(cache_experts=c.top_k, miss_policy="cpu")):
        out = Engine.load(path, EngineOptions(progress=False, **options)).generate(PROMPT, 5, keep_logits=True)
        assert torch.equal(out.logits, alone.logits) and out.stats["misses"] > 0
        assert out.stats["expert_format"] == fmt.name and out.stats["bytes_per_expert"] == fmt.nbytes


def test_convert_keeps_the_types_and_another_quant_is_asked_for(mixed, tmp_path, capsys):
    path, _ = mixed
    code, out, err = run_cli(capsys, "convert", "--model", str(path), "--out", str(tmp_path / "packed"), "--dtype",
                             "float32")
    assert code == 0, err
    assert "as gguf-Q4_0+Q4_1+Q5_1+Q8_0" in out
    index = json.loads((tmp_path / "packed" / "packed.json").read_text())
    assert index["gguf_types"] == [[up.name, up.name, down.name] for up, down in MIX.values()]
    assert torch.equal(load(tmp_path / "packed").score(PROMPT), load(path).score(PROMPT))
    assert load(path, expert_quant="int8").cache.fmt.name == "int8-g32"  # asked for: converted, not kept
    code, out, err = run_cli(capsys, "plan", "--config", str(path), "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["formats"]["gguf"] == "gguf-Q4_0+Q4_1+Q5_1+Q8_0"
    assert plan["bytes_per_expert"]["gguf"] == load(path).cache.fmt.nbytes


@pytest.mark.skipif(cpu_kernels.library() is None, reason="CPU kernels not built here")
@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_a_prompts_c_decode_gives_gguf_pys_weights(kind):
    """A prompt's GGUF matrix decoded to float32 in one C pass (`cpu_kernels.ggml_dequant`) gives gguf-py's weights
    (within float32 rounding of the scale products)."""
    raw = blocks(kind, 48, 512, np.random.default_rng(int(kind)))
    want = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    got = torch.empty(48, 512)
    assert cpu_kernels.ggml_dequant(torch.from_numpy(raw), kind, 512, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
