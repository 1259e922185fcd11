"""Block-FP8 checkpoints (weights/fp8.py): a tiny MiniMax-M2 written by transformers, its 2-D weights (not the
embedding, the LM head or the routers) quantized here to float8_e4m3fn in blocks of [24, 40] (partial blocks at
the edges of every such tensor: 32 and 64 rows, 32 and 64 columns), the scales in a shard of their own, as the
hub's files are laid out. The oracle: transformers on the same weights dequantized by the plain formula
(each value times its block's scale). Also: offloaded == resident, int8 experts and their error report,
`convert`, `plan`, and the broken scales refused through the command line in one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli as run
from families import make_family, reference
from safetensors.torch import load_file, save_file

from offload_moe.engine import Engine
from offload_moe.options import EngineOptions
from offload_moe.weights.checkpoint import Checkpoint

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]
IDS = ",".join(map(str, PROMPT))
BLOCK = (24, 40)  # rows, columns
FP8_MAX = 448.0  # float8_e4m3fn's largest value
KEPT = ("embed_tokens", "lm_head", "gate")  # stored as they are (DeepSeek's and MiniMax's files do so)
QUANT = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
         "weight_block_size": list(BLOCK), "modules_to_not_convert": ["lm_head", "gate"]}


def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> float8_e4m3fn [N, K] and float32 scales [ceil(N/bn), ceil(K/bk)], each block's largest
    magnitude at FP8's largest value."""
    (N, K), (bn, bk) = w.shape, BLOCK
    rows, cols = -(-N // bn), -(-K // bk)
    blocks = F.pad(w.float(), (0, cols * bk - K, 0, rows * bn - N)).view(rows, bn, cols, bk)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).reshape(rows * bn, cols * bk)[:N, :K]
    return q.to(torch.float8_e4m3fn), scale


def plain_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Every value times its block's scale, the scales expanded to the weight's shape."""
    (N, K), (bn, bk) = q.shape, BLOCK
    return q.float() * scale.repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]


def write(path, config: dict, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> dict:
    """The FP8 folder, its plain-dequantized float32 twin (no quantization_config) and their pieces."""
    root = tmp_path_factory.mktemp("fp8")
    source = make_family(root / "source", "minimax_m2", seed=41)
    config = json.loads((source / "config.json").read_text())
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors |= load_file(shard)
    weights, scales, plain = {}, {}, {}
    for name, w in tensors.items():
        if w.dim() == 2 and not any(f".{k}." in f".{name}" for k in KEPT):
            weights[name], scales[name + "_scale_inv"] = to_fp8(w)
            plain[name] = plain_dequantize(weights[name], scales[name + "_scale_inv"])
        else:
            weights[name] = plain[name] = w
    assert sum(w.dtype == torch.float8_e4m3fn for w in weights.values()) == 4 * 2 + 3 * 8 * 2
    write(root / "fp8", config | {"quantization_config": QUANT},
          {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": scales})
    write(root / "plain", config, {"model.safetensors": plain})
    return {"fp8": root / "fp8", "plain": root / "plain", "weights": weights, "scales": scales, "config": config}


def load(path, **options) -> Engine:
    return Engine.load(path, EngineOptions(**{"prefetch": 0, "progress": False, "dtype": "float32"} | options))


def test_logits_and_greedy_tokens_match_transformers_on_the_dequantized_weights(fp8):
    engine = load(fp8["fp8"])
    got = engine.generate(PROMPT, 8, keep_logits=True)
    ref = reference(fp8["plain"], "minimax_m2")
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT + got.tokens[:-1]])).logits[0, len(PROMPT) - 1:]
        prompt_logits = ref(torch.tensor([PROMPT])).logits[0]
    assert got.tokens == want.argmax(-1).tolist()
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-3)
    torch.testing.assert_close(engine.score(PROMPT), prompt_logits, rtol=0, atol=1e-3)
    # FP8 moved the model (0.03 measured): the comparison is not of the float32 weights transformers wrote
    assert (load(fp8["fp8"].parent / "source").score(PROMPT) - prompt_logits).abs().max() > 1e-2


def test_every_read_is_dequantized_and_the_scales_are_consumed(fp8):
    ckpt = Checkpoint(fp8["fp8"])
    assert ckpt.fp8.block == BLOCK and len(ckpt.fp8.scales) == len(fp8["scales"])
    w = fp8["weights"]
    s = fp8["scales"]
    name = "model.layers.1.self_attn.k_proj.weight"  # [32, 64]: a partial block in both directions
    assert torch.equal(ckpt.dense("layers.1.attention.wk.weight"), plain_dequantize(w[name], s[name + "_scale_inv"]))
    expert = "model.layers.0.block_sparse_moe.experts.5.w2.weight"
    assert torch.equal(ckpt.expert(0, 5)["w2"], plain_dequantize(w[expert], s[expert + "_scale_inv"]))
    assert torch.equal(ckpt.dense("layers.0.gate.weight"), w["model.layers.0.block_sparse_moe.gate.weight"])


def test_offloaded_equals_resident(fp8):
    resident = load(fp8["fp8"]).generate(PROMPT, 8, keep_logits=True)
    got = load(fp8["fp8"], cache_experts=2, prefetch=1).generate(PROMPT, 8, keep_logits=True)
    assert torch.equal(got.logits, resident.logits) and got.tokens == resident.tokens
    assert got.stats["misses"] > 0


def test_int8_experts_report_their_error_and_convert_writes_the_same(fp8, tmp_path, capsys):
    engine = load(fp8["fp8"], expert_quant="int8")
    err = capsys.readouterr().err
    m = re.search(r"FP8 experts as int8-g32: relative error ([\d.]+)% against the FP8 weights \(mean of 4 experts; "
                  r"largest ([\d.]+)%\)", err)
    assert m, err
    assert 0 < float(m[1]) <= float(m[2]) < 1.0  # int8 groups of 32: about 0.4% here
    logits = engine.score(PROMPT)
    want = load(fp8["fp8"]).score(PROMPT)
    assert 0 < ((logits - want).abs().max() / want.abs().max()).item() < 0.02

    out = tmp_path / "packed"
    code, _, err = run(capsys, "convert", "--model", str(fp8["fp8"]), "--out", str(out), "--experts", "int8",
                       "--dtype", "float32")
    assert code == 0, err
    assert m[0] in err  # the same sample, the same figures
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(load(out).score(PROMPT), logits, rtol=0, atol=1e-4)


def test_plan_reads_the_folder_as_its_dequantized_twin(fp8, capsys):
    code, out, err = run(capsys, "plan", "--config", str(fp8["fp8"]), "--json")
    assert code == 0, err
    code, twin, err = run(capsys, "plan", "--config", str(fp8["plain"]), "--json")
    assert code == 0 and json.loads(out) == json.loads(twin)


@pytest.mark.parametrize("damage,says", [
    ("shape", r"model\.layers\.0\.self_attn\.q_proj\.weight_scale_inv has shape \[3, 3\]; "
              r"model\.layers\.0\.self_attn\.q_proj\.weight \[64, 64\] in blocks of \[24, 40\] needs \[3, 2\]"),
    ("missing", r"model\.layers\.0\.self_attn\.q_proj\.weight is float8_e4m3fn with no "
                r"model\.layers\.0\.self_attn\.q_proj\.weight_scale_inv"),
    ("nan", r"model\.layers\.0\.self_attn\.q_proj\.weight_scale_inv holds NaN or infinite values"),
])
def test_broken_scales_are_one_line_errors(fp8, tmp_path, capsys, damage, says):
    path = tmp_path / damage
    shutil.copytree(fp8["fp8"], path)
    scales = dict(fp8["scales"])
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    if damage == "shape":
        scales[key] = torch.ones(3, 3)
    elif damage == "missing":
        del scales[key]
    else:
        scales[key] = scales[key].clone().index_fill_(0, torch.tensor([1]), float("nan"))
    save_file(scales, path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in scales or k in fp8["weights"]}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, "generate", "--model", str(path), "--device", "cpu", "--prompt-ids", IDS,
                       "--max-new-tokens", "1")
    assert code == 1 and re.search(says, err) and err.count("\n") == 1, err
    if damage == "missing":  # the same tensor in modules_to_not_convert: read as stored, the FP8 values alone
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"]["modules_to_not_convert"].append("model.layers.0.self_attn.q_proj")
        (path / "config.json").write_text(json.dumps(config))
        assert torch.equal(Checkpoint(path).dense("layers.0.attention.wq.weight"),
                           fp8["weights"]["model.layers.0.self_attn.q_proj.weight"].float())
        assert load(path).score(PROMPT).isfinite().all()
