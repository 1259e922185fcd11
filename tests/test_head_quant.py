"""The int8 LM head (--head-quant int8): greedy tokens and logits against the float32 head, tied embeddings,
the memory plan, a packed folder, the CLI and its group-size errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf
from conftest import run_cli as run

from offload_moe.demo import resolve_model
from offload_moe.engine import Engine
from offload_moe.formats.int8_linear import Int8Linear
from offload_moe.formats.registry import expert_format
from offload_moe.formats.sizes import int8_bytes
from offload_moe.options import EngineOptions
from offload_moe.weights.convert import convert

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28740, 28734, 6211, 12, 77]
# max |logit - float32-head logit| / max |float32-head logit|, default group (64), over the prompt's scored
# logits and 8 greedy decode steps (the one-token C kernel where it runs): measured 0.0043-0.0061 on "base",
# the tied "base" and the demo on 2026-12-01 (group 32: 0.0032-0.0054); the bound leaves margin
BOUND = 0.015


@pytest.fixture(scope="module")
def models(ckpts, tmp_path_factory) -> dict:
    tied = make_hf(tmp_path_factory.mktemp("tied") / "tied", "base", seed=5, tie_word_embeddings=True)
    return {"base": (ckpts["base"], PROMPT), "tied": (tied, PROMPT), "demo": (resolve_model("demo"), "def fib(n):")}


def error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("name", ["base", "tied", "demo"])
def test_int8_head_keeps_greedy_tokens_and_logits_close(models, name):
    path, prompt = models[name]
    dense = Engine.load(path, EngineOptions(progress=False))
    quant = Engine.load(path, EngineOptions(head_quant="int8", progress=False))
    assert isinstance(quant.model.output, Int8Linear) and quant.head_format == "int8-g64"
    assert isinstance(dense.model.output, torch.nn.Linear) and dense.head_format == "float32"
    assert quant.model.tok_embeddings.weight.dtype == torch.float32  # the embedding stays dense, tied or not
    ids = dense.encode(prompt)
    assert 0 < error(quant.score(ids), dense.score(ids)) <= BOUND
    want = dense.generate(prompt, 8, keep_logits=True)
    got = quant.generate(prompt, 8, keep_logits=True)
    assert got.tokens == want.tokens
    assert 0 < error(got.logits, want.logits) <= BOUND
    c = dense.config
    head = c.vocab_size * c.dim
    saved = (0 if c.tie_word_embeddings else head * 4) - int8_bytes(head, 64)  # a tied head is an extra int8 copy
    assert dense.plan.dense - quant.plan.dense == saved
    assert (saved > 0) != c.tie_word_embeddings


def test_a_packed_folder_quantizes_its_dense_head_at_load(ckpts, tmp_path):
    out = tmp_path / "packed"
    convert(ckpts["base"], out, expert_format("int8", Engine.load(ckpts["base"]).config, torch.float32, 32),
            torch.float32, progress=False)
    packed = Engine.load(out, EngineOptions(head_quant="int8", group_size=32, progress=False))
    direct = Engine.load(ckpts["base"], EngineOptions(expert_quant="int8", head_quant="int8", group_size=32,
                                                      progress=False))
    assert packed.head_format == direct.head_format == "int8-g32"
    assert torch.equal(packed.score(PROMPT), direct.score(PROMPT))


def test_head_quant_from_the_cli_and_its_group_size_errors(ckpts, capsys):
    base = ["generate", "--model", str(ckpts["base"]), "--prompt-ids", "1,415,2936", "--max-new-tokens", "3",
            "--greedy", "--json", "--head-quant", "int8"]
    code, stdout, err = run(capsys, *base)
    assert code == 0, err
    assert json.loads(stdout)["stats"]["head_format"] == "int8-g64"
    code, _, err = run(capsys, *base, "--group-size", "128")  # the model dim is 64
    assert code == 1 and "does not divide the model dim 64" in err and "Traceback" not in err
    code, _, err = run(capsys, *base[:2], str(ckpts["top3"]), *base[3:])  # dim 48: no group size divides it
    assert code == 1 and "--head-quant none" in err and "Traceback" not in err
