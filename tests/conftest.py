"""Tiny checkpoints built in the test session: Hugging Face layout by transformers (the oracle),
and the original Mistral layout written from the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from mistral_common import __file__ as _mc_file  # noqa: E402

TOKENIZER = Path(_mc_file).parent / "data" / "tokenizer.model.v1"

SHAPES = {
    # name: MixtralConfig kwargs
    "base": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2),
    "top3": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=6, head_dim=12, num_local_experts=6, num_experts_per_tok=3,
                 tie_word_embeddings=True, rope_theta=10000.0),
    "window": dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
}


def make_hf(path: Path, shape: str = "base", seed: int = 0, vocab: int = 32000, **extra) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=vocab, max_position_embeddings=256, **SHAPES[shape], **extra)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 and routers sharper, so that bugs show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("gate.weight"):
                p.mul_(20)
    model.save_pretrained(path, max_shard_size="200KB" if shape == "base" else "5GB")
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    return path


def hf_model(path: Path):
    return transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    # [H*hd, D] -> [H, 2, hd/2, D] -> [H, hd/2, 2, D] -> [H*hd, D]
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_original(src: Path, dst: Path, per_expert_names: bool = False) -> Path:
    """The same weights in the original release layout: params.json + two consolidated.NN.pt files."""
    model = hf_model(src)
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    E, I = c.num_local_experts, c.intermediate_size
    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "attention.wq.weight"] = halves_to_interleaved(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[q + "attention.wk.weight"] = halves_to_interleaved(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        gate_up = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2I, D]
        down = sd[p + "mlp.experts.down_proj"]  # [E, D, I]
        gate = sd[p + "mlp.gate.weight"]
        if per_expert_names:
            out[q + "feed_forward.gate.weight"] = gate
            for e in range(E):
                out[q + f"feed_forward.experts.{e}.w1.weight"] = gate_up[e, :I].clone()
                out[q + f"feed_forward.experts.{e}.w3.weight"] = gate_up[e, I:].clone()
                out[q + f"feed_forward.experts.{e}.w2.weight"] = down[e].clone()
        else:
            out[q + "block_sparse_moe.gate.weight"] = gate
            out[q + "block_sparse_moe.w1"] = gate_up[:, :I].reshape(E * I, -1).clone()  # [E*I, D]
            out[q + "block_sparse_moe.w3"] = gate_up[:, I:].reshape(E * I, -1).clone()  # [E*I, D]
            out[q + "block_sparse_moe.w2"] = down.transpose(1, 2).reshape(E * I, -1).clone()  # [E, I, D] -> [E*I, D]
    dst.mkdir(parents=True, exist_ok=True)
    keys = sorted(out)
    half = len(keys) // 2
    torch.save({k: out[k] for k in keys[:half]}, dst / "consolidated.00.pt")
    torch.save({k: out[k] for k in keys[half:]}, dst / "consolidated.01.pt")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "head_dim": c.head_dim,
              "hidden_dim": I, "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
              "norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size, "rope_theta": c.rope_parameters["rope_theta"],
              "moe": {"num_experts": E, "num_experts_per_tok": c.num_experts_per_tok}}
    if c.sliding_window:
        params["sliding_window"] = c.sliding_window
    (dst / "params.json").write_text(json.dumps(params))
    shutil.copy(TOKENIZER, dst / "tokenizer.model")
    return dst


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """run.py's main in this process: (exit code, stdout, stderr)."""
    from offload_moe.cli.entry import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    paths = {name: make_hf(root / name, name, seed=i) for i, name in enumerate(SHAPES)}
    paths["original"] = write_original(paths["base"], root / "original")
    paths["original-named"] = write_original(paths["top3"], root / "original-named", per_expert_names=True)
    return paths


@pytest.fixture(autouse=True)
def _demo_cache(tmp_path_factory, monkeypatch):
    """Keep the demo checkpoint out of the user's home during tests."""
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path_factory.getbasetemp() / "omcache"))
