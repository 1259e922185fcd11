"""The C expert kernels (cpu_kernels.py): each format's kernel against its torch path, with gpt-oss's biases
and clamped SwiGLU too, in each build this CPU runs (avx512, avx2: OFFLOAD_MOE_ISA); the fallback (OFFLOAD_MOE_ISA=none,
an ISA the CPU lacks, a failed compilation, formats and shapes the kernels do not read); a whole model's decode
with and without them."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from offload_moe.config import ModelConfig
from offload_moe.engine import Engine
from offload_moe.formats import cpu_kernels
from offload_moe.formats.int8 import int8_bmm_linear
from offload_moe.formats.int8_linear import int8_parts
from offload_moe.formats.registry import expert_format
from offload_moe.generate import generate_tokens
from offload_moe.options import EngineOptions
from offload_moe.sampling import Sampling

D, I = 128, 384  # multiples of every group size; 2I and D of the int4 layout's row block (64)
PLAIN = ModelConfig(dim=D, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64, ffn_dim=I, num_experts=2, top_k=1,
                    vocab_size=16)
GPT_OSS = ModelConfig(dim=D, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64, ffn_dim=I, num_experts=2, top_k=1,
                      vocab_size=16, expert_bias=True, swiglu_limit=0.05)  # a limit the random weights reach
# max |kernel - torch path| / max |torch path|, one token, worst of the cases here: fp32 0 to 1e-6 (summation
# order); int8 (int16 activations) 7.6e-5; int4 (int8 activations, against torch's bf16 kernel) 6.6e-2
BOUND = {"none": 1e-5, "int8": 2e-4, "int4": 0.1}

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None, reason="CPU kernels not built here (gcc, AVX-512)")


@contextmanager
def forced_isa(isa: str = "none"):
    """The kernels of `isa` (none: the torch path everywhere), by the env switch, as a user forces them."""
    saved = os.environ.get(cpu_kernels.ENV_SWITCH)
    os.environ[cpu_kernels.ENV_SWITCH] = isa
    cpu_kernels.library.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            del os.environ[cpu_kernels.ENV_SWITCH]
        else:
            os.environ[cpu_kernels.ENV_SWITCH] = saved
        cpu_kernels.library.cache_clear()


def packed_expert(fmt, config: ModelConfig, seed: int = 0) -> tuple:
    """A random expert of `config`'s shape packed in `fmt`: its views."""
    g = torch.Generator().manual_seed(seed)
    I, D = config.ffn_dim, config.dim  # noqa: E741
    shapes = {"w1": (I, D), "w3": (I, D), "w2": (D, I)}
    if config.expert_bias:
        shapes |= {"b1": (I,), "b3": (I,), "b2": (D,)}
    parts = {k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()}
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(parts, buf)
    return fmt.views(buf)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("config", [PLAIN, GPT_OSS], ids=["silu", "gpt-oss"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("name", ["none", "int8", "int4"])
def test_kernel_matches_the_torch_path(name, group_size, config, isa):
    if name == "none" and group_size != 32:
        pytest.skip("dense: no groups")
    if not cpu_kernels.runs(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    fmt = expert_format(name, config, torch.float32, group_size)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        views = packed_expert(fmt, config, seed)
        with forced_isa(isa):
            assert fmt.kernel.runs(x) and bool(cpu_kernels.library().okm_vectorized()) == (isa == "avx512")
            y = fmt.forward(x, views)
        with forced_isa():
            assert not fmt.kernel.runs(x)
            ref = fmt.forward(x, views)
        assert y.shape == ref.shape == (1, D) and y.dtype == torch.float32
        assert max_rel(y, ref) < BOUND[name]
        if config.swiglu_limit is not None and name == "none":  # the clamp bites on these weights
            assert torch.nn.functional.linear(x, views[0], views[2]).abs().max() > config.swiglu_limit


@needs_kernels
def test_other_dtypes_tokens_and_formats_take_the_torch_path():
    x1, x3 = torch.randn(1, D), torch.randn(3, D)
    assert not expert_format("int8", PLAIN, torch.float32).kernel.runs(x3)  # a prompt: torch's matmuls
    assert expert_format("none", PLAIN, torch.bfloat16).kernel is None  # bf16 weights: fp32 kernel only
    assert expert_format("int4", PLAIN, torch.float32, layout="cuda").kernel is None
    odd = ModelConfig(dim=96, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=48, ffn_dim=I, num_experts=2, top_k=1,
                      vocab_size=16)  # D an odd multiple of 32: int4 rows in blocks of 32
    assert expert_format("int4", odd, torch.float32, 32).kernel is None
    assert expert_format("mxfp4", PLAIN, torch.float32).kernel is None
    fmt = expert_format("int8", PLAIN, torch.bfloat16)  # bf16 activations: the kernel computes in fp32, casts back
    views = packed_expert(fmt, PLAIN)
    y = fmt.forward(x1.bfloat16(), views)
    assert y.dtype == torch.bfloat16 and max_rel(y, fmt.forward_dequant(x1.bfloat16(), views)) < 1e-2


def test_a_failed_compilation_falls_back_with_a_note(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.c"
    broken.write_text("int okm_vectorized(void) { return }\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path / "cache"))
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
        assert "CPU kernels unavailable" in capsys.readouterr().err
        fmt = expert_format("int8", PLAIN, torch.float32)
        x = torch.randn(1, D)
        assert not fmt.kernel.runs(x)
        views = packed_expert(fmt, PLAIN)
        assert max_rel(fmt.forward(x, views), fmt.forward_dequant(x, views)) < 1e-5  # torch's path
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()


def decode_logits(path, quant: str) -> tuple[list[int], torch.Tensor]:
    engine = Engine.load(path, EngineOptions(expert_quant=quant, group_size=32, prefetch=0, context=64,
                                             progress=False))
    steps = generate_tokens(engine, [1, 415, 2936, 9060], 8, Sampling(), keep_logits=True)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value.tokens, done.value.logits


@needs_kernels
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_whole_model_decode_keeps_its_logits(ckpts, quant):
    """Every decode step's logits with the kernels against the torch path's: fp32 the same greedy tokens
    (1e-5 relative), int8 within 1e-3, int4 within test_quant_engine's int4 logit bound (0.06)."""
    tokens, logits = decode_logits(ckpts["base"], quant)
    with forced_isa():
        ref_tokens, ref = decode_logits(ckpts["base"], quant)
    error = max_rel(logits, ref)
    assert error <= {"none": 1e-5, "int8": 1e-3, "int4": 0.06}[quant]
    if quant == "none":
        assert tokens == ref_tokens


@needs_kernels
def test_int8_linear_kernel_matches_the_torch_path():
    """One token through an int8 resident linear (attention's `Int8Linear`): the C kernel against torch's
    group-by-group path; a row count the kernel does not take (not a multiple of 16) is left to torch."""
    parts = int8_parts(torch.randn(192, D, generator=torch.Generator().manual_seed(3)) * 0.02, 32)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(4))
    y = cpu_kernels.int8_linear(x, *parts.values())
    assert y.shape == (1, 192) and max_rel(y, int8_bmm_linear(x, *parts.values())) < 2e-4
    assert cpu_kernels.int8_linear(x, *int8_parts(torch.randn(40, D), 32).values()) is None


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_prompt_dequantizing_kernels_match_the_torch_decode(isa, name):
    """A prompt's matrices decoded to fp32 in one C pass (`int8_dequant`, `int4_dequant`) give the torch path's
    weights exactly: w13 [128, 96] and w2 [96, 64], whose int4 rows come in blocks of 64 and of 32."""
    if not cpu_kernels.runs(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    config = ModelConfig(dim=96, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=48, ffn_dim=64, num_experts=2,
                         top_k=1, vocab_size=16)
    fmt = expert_format(name, config, torch.float32, group_size=32)
    for mat in packed_expert(fmt, config)[:2]:
        with forced_isa(isa):
            fast = fmt._dequant(mat, torch.empty(128 * 96)).clone()
        with forced_isa():
            ref = fmt._dequant(mat, torch.empty(128 * 96))
        assert torch.equal(fast, ref)
