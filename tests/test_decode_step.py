"""The attention half of a decode step's layer in one C call (modeling/decode_step.py) against the torch path it
replaces: every decode step's logits and the greedy tokens, per family option the C code covers (biases, per-head
q/k norms, partial and no RoPE, the sigmoid router, dense layers, a sliding window's ring, int8 projections), in
each kernel build this CPU runs; and the layers it must leave to torch."""

from __future__ import annotations

import pytest
import torch
from families import make_family
from test_cpu_kernels import forced_isa, max_rel, needs_kernels

from offload_moe.engine import Engine
from offload_moe.formats import cpu_kernels
from offload_moe.generate import generate_tokens
from offload_moe.options import EngineOptions
from offload_moe.sampling import Sampling

PROMPT = [1, 41, 29, 96, 7]


def decode(engine: Engine, tokens: int = 10) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and every step's logits [tokens, V] from a fresh sequence."""
    steps = generate_tokens(engine, PROMPT, tokens, Sampling(), keep_logits=True)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value.tokens, done.value.logits


def both_paths(path, **options) -> tuple[Engine, tuple, tuple]:
    """The engine, and its decode with the C step and with the torch path (the step switched off)."""
    engine = Engine.load(path, EngineOptions(prefetch=0, context=64, progress=False, **options))
    fused = decode(engine)
    step, engine.model.decode_step = engine.model.decode_step, None
    plain = decode(engine)
    engine.model.decode_step = step
    return engine, fused, plain


def taken(engine: Engine) -> list[bool]:
    """Which layers take the C step, then whether the head does."""
    step = engine.model.decode_step
    return [] if step is None else [layer is not None for layer in (*step.layers, step.head)]


@needs_kernels
@pytest.mark.parametrize("family,layers", [
    ("qwen3_moe", [True, True, True]),  # per-head q/k norms
    ("qwen2_moe", [True, True, True, True]),  # q/k/v biases, a dense MLP layer, a shared expert
    ("glm4_moe", [True, True, True, True]),  # partial rotary, q/k norms, biases, the sigmoid router, a dense layer
    ("nemotron_h", [False, False, True, False, False, False, False, True]),  # no RoPE; Mamba, FFN layers: torch
    ("olmoe", [False, False, True]),  # clamped q/k/v and whole-projection norms: the head alone
    ("phimoe", []),  # LayerNorm, a head with a bias after it: none taken
])
def test_families_keep_their_logits(tmp_path, family, layers):
    engine, (tokens, logits), (ref_tokens, ref) = both_paths(make_family(tmp_path / family, family))
    assert taken(engine) == layers
    assert tokens == ref_tokens
    assert max_rel(logits, ref) < 1e-5


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("name,attention", [("base", "none"), ("base", "int8"), ("window", "none")])
def test_mixtral_in_each_build(ckpts, isa, name, attention):
    """fp32 and int8 projections and head (int16 activations, as `Int8Linear`'s kernel), and a sliding window of 5
    that the 10 steps wrap (the ring's slots are overwritten, attention over exactly the last 5 positions)."""
    if not cpu_kernels.runs(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    with forced_isa(isa):
        engine, (tokens, logits), (ref_tokens, ref) = both_paths(ckpts[name], attention_quant=attention,
                                                                 head_quant=attention, group_size=32)
    assert all(taken(engine))
    assert tokens == ref_tokens
    assert max_rel(logits, ref) < (1e-5 if attention == "none" else 1e-4)


def test_without_kernels_there_is_no_step(ckpts):
    with forced_isa("none"):
        engine = Engine.load(ckpts["base"], EngineOptions(prefetch=0, context=64, progress=False))
    assert engine.model.decode_step is None


def test_other_dtypes_keep_the_torch_path(ckpts):
    engine = Engine.load(ckpts["base"], EngineOptions(prefetch=0, context=64, progress=False, dtype="bfloat16"))
    assert engine.model.decode_step is None
