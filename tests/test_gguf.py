"""GGUF files (llama.cpp's), written here by gguf-py from the tiny transformers checkpoints (`gguf_files.py`):
the config from the metadata equals the config.json's; an F32 file gives transformers' logits; a Q8_0 file gives
those of the model gguf-py decodes (max |dlogit| <= 1e-3 x max |logit|); the k-quants decode as gguf-py decodes
them, an expert's slice alone; offloaded == resident; the CLI; the refusals."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_model, make_hf, run_cli
from families import make_family, reference
from ggml_blocks import blocks
from gguf import GGMLQuantizationType as Q
from gguf_families import write_family
from gguf_files import as_decoded, write_gguf

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.options import EngineOptions
from offload_moe.weights.checkpoint import Checkpoint
from offload_moe.weights.gguf import GGUFModel

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]
FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")
# Phi-3.5-MoE's LongRoPE on a 64-token original context (llama.cpp's converter takes no PhiMoE without it), its
# mscales llama.cpp's attention factor (the file keeps that one only)
PHI_MSCALE = (1 + math.log(256 / 64) / math.log(64)) ** 0.5
PHI_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8], "long_factor": [1.0, 1.5, 2.5, 4, 6, 9, 13, 18],
            "short_mscale": PHI_MSCALE, "long_mscale": PHI_MSCALE}
# the other families llama.cpp converts (`gguf_families.py`), each with what its file can say: DeepSeek's YaRN with
# mscale equal to mscale_all_dim (the file keeps the latter only, llama.cpp takes them equal, as the hub's models
# have them); gpt-oss's SwiGLU limit at 7 (llama.cpp's, not in the file); LFM2-MoE's convs without biases (the
# converter's squeeze fails on them) and its routed_scaling_factor 1 (not in the file: LFM2-8B-A1B's)
OTHERS = {"deepseek_v2": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                               "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                                               "mscale": 0.8, "mscale_all_dim": 0.8}),
          "deepseek_v3": {}, "glm4_moe_lite": {}, "glm4_moe": {}, "gpt_oss": dict(swiglu_limit=7.0),
          "minimax_m2": {}, "lfm2_moe": dict(conv_bias=False, routed_scaling_factor=1.0), "qwen3_next": {},
          "qwen3_5_moe": {}, "nemotron_h": {}, "phimoe": dict(rope_parameters=PHI_ROPE)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Each family's tiny checkpoint folder and its transformers model. Qwen2-MoE's without dense layers and with a
    shared expert of 64 (llama.cpp has no dense Qwen2-MoE layers, and Q8_0 needs rows of a multiple of 32)."""
    root = tmp_path_factory.mktemp("gguf-src")
    out = {"mixtral": make_hf(root / "mixtral", "base", vocab=320)}
    out["qwen3_moe"] = make_family(root / "qwen3_moe", "qwen3_moe", seed=1)
    out["qwen2_moe"] = make_family(root / "qwen2_moe", "qwen2_moe", seed=2, mlp_only_layers=[],
                                   shared_expert_intermediate_size=64)
    out["olmoe"] = make_family(root / "olmoe", "olmoe", seed=3)
    return {f: (path, hf_model(path) if f == "mixtral" else reference(path, f)) for f, path in out.items()}


def load(path, **options) -> Engine:
    return Engine.load(path, EngineOptions(prefetch=0, progress=False, **options))


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_gives_transformers_logits_and_the_folders_config(sources, family, tmp_path):
    """Mixtral's as a split set of three files (the first stands for the set)."""
    folder, model = sources[family]
    path = write_gguf(model, family, tmp_path / "m.gguf", split_max_tensors=12 if family == "mixtral" else 0)
    if family == "mixtral":
        assert path.name == "m-00001-of-00003.gguf"
    engine = load(path)
    assert engine.config == Checkpoint(folder).config
    got = engine.generate(PROMPT, 6, keep_logits=True)
    want = logits_of(model, PROMPT + got.tokens[:-1])[len(PROMPT) - 1:]
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-4)
    assert got.tokens == want.argmax(-1).tolist()
    if family == "mixtral":  # --expert-quant int8 quantizes the same weights as from the folder
        int8 = load(path, expert_quant="int8").score(PROMPT)
        assert torch.equal(int8, load(folder, expert_quant="int8").score(PROMPT))


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_gguf_equals_the_decoded_model_offloaded_or_not(sources, family, tmp_path):
    _, model = sources[family]
    path = write_gguf(model, family, tmp_path / "m.gguf", Q.Q8_0)
    want = logits_of(as_decoded(copy.deepcopy(model), Q.Q8_0), PROMPT)
    resident = load(path)
    got = resident.score(PROMPT)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    if family == "mixtral":  # the same file as llama.cpp wrote Mixtral before it stacked the experts
        legacy = write_gguf(model, family, tmp_path / "legacy.gguf", Q.Q8_0, per_expert=True)
        assert torch.equal(load(legacy).score(PROMPT), got)
    c = resident.config
    alone = resident.generate(PROMPT, 6, keep_logits=True)
    offloaded = Engine.load(path, EngineOptions(cache_experts=c.top_k, prefetch=1, progress=False))
    out = offloaded.generate(PROMPT, 6, keep_logits=True)
    assert torch.equal(out.logits, alone.logits) and out.stats["misses"] > 0


def converted(family: str, root, qtype: Q = Q.F32, **options):
    """The family's tiny checkpoint, its transformers model and its GGUF as llama.cpp's converter writes it."""
    folder = make_family(root / family, family, seed=5, **OTHERS[family])
    return reference(folder, family), write_family(folder, family, root / f"{family}.gguf", qtype, **options), folder


def rounded(value):
    """Floats (in lists and dicts too) to 6 significant digits: a float32's."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return {k: rounded(v) for k, v in value.items()} if isinstance(value, dict) else value


LEGACY = {"attn_kv_b": dict(split_kv_b=False), "ssm_in": dict(split_qkvz=False),
          "ffn_gate_up_exps": dict(fuse_gate_up=True)}


@pytest.mark.parametrize("family", [*OTHERS, "deepseek_v2 with attn_kv_b", "qwen3_next with ssm_in",
                                    "qwen3_next with ffn_gate_up_exps"])
def test_f32_gguf_of_every_other_family_gives_transformers_logits(family, tmp_path):
    """The config is the folder's (but what the file does not say: GLM-4.7-Flash is read as DeepSeek-V3, Nemotron-H's
    context is the converter's 2**20 and its scan's chunk ours; numbers as float32 keeps them), every tensor is
    the folder's (within float32's rounding of what the converter computed); and DeepSeek-V2 and Qwen3-Next also as
    older converters wrote them: kv_b_proj whole (`attn_kv_b`), in_proj_qkvz whole (`ssm_in`); and with each layer's
    gate and up experts fused (the converter's --fuse-gate-up-exps)."""
    family, _, legacy = family.partition(" with ")
    model, path, folder = converted(family, tmp_path, **LEGACY.get(legacy, {}))
    ours, hub = Checkpoint(path), Checkpoint(folder)
    unsaid = {"family", "max_context", "mamba_chunk"}
    assert {k: rounded(v) for k, v in asdict(ours.config).items() if k not in unsaid} == {
        k: rounded(v) for k, v in asdict(hub.config).items() if k not in unsaid}
    assert ours.expected_dense() == hub.expected_dense()
    for name in hub.expected_dense():
        torch.testing.assert_close(ours.dense(name), hub.dense(name), rtol=1e-6, atol=1e-6, msg=name)
    layer = hub.config.moe_layers[0]
    for part, t in hub.expert(layer, 1).items():
        assert torch.equal(ours.expert(layer, 1)[part], t), part
    got = load(path).generate(PROMPT, 6, keep_logits=True)
    want = logits_of(model, PROMPT + got.tokens[:-1])[len(PROMPT) - 1:]
    assert (got.logits - want).abs().max() <= 1e-3 * want.abs().max(), (got.logits - want).abs().max()
    assert got.tokens == want.argmax(-1).tolist()


@pytest.mark.parametrize("family, qtype", [("glm4_moe", Q.Q8_0), ("gpt_oss", Q.MXFP4)])
def test_quantized_gguf_equals_its_decoding_offloaded_or_not(family, qtype, tmp_path):
    """The experts in Q8_0 (GLM-4.5, kept in its type) or MXFP4 (gpt-oss's own type, kept as our MXFP4 format: the
    file's values encoded again, exactly): the logits of the file whose tensors are gguf-py's decoding of them (to
    float32 rounding: each format's kernels sum in their own order); offloaded == resident."""
    _, path, folder = converted(family, tmp_path, qtype)
    floats = write_family(folder, family, tmp_path / "decoded.gguf", qtype, decoded=True)
    resident = load(path)
    if qtype == Q.MXFP4:
        fmt, decoded = resident.cache.fmt, Checkpoint(floats)
        assert fmt.name == "mxfp4"
        layer = decoded.config.moe_layers[0]
        w13, w2 = fmt.weights(resident.cache.store.buffer(0, 1))
        parts = decoded.expert(layer, 1)
        assert torch.equal(w13, torch.cat((parts["w1"], parts["w3"])).float()) and torch.equal(w2, parts["w2"].float())
    alone = resident.generate(PROMPT, 6, keep_logits=True)
    want = load(floats).generate(PROMPT, 6, keep_logits=True)
    assert alone.tokens == want.tokens and (alone.logits - want.logits).abs().max() <= 1e-5 * want.logits.abs().max()
    offloaded = Engine.load(path, EngineOptions(cache_experts=resident.config.top_k, prefetch=1, progress=False))
    out = offloaded.generate(PROMPT, 6, keep_logits=True)
    assert torch.equal(out.logits, alone.logits) and out.stats["misses"] > 0


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16])
def test_half_types_are_read_as_stored(sources, qtype, tmp_path):
    _, model = sources["mixtral"]
    path = write_gguf(model, "mixtral", tmp_path / "m.gguf", qtype)
    half = torch.float16 if qtype == Q.F16 else torch.bfloat16
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim >= 2 and not name.endswith("mlp.gate.weight"):
                p.copy_(p.to(half).float())
    engine = load(path)
    assert engine.checkpoint.dtype == half
    torch.testing.assert_close(engine.score(PROMPT), logits_of(rounded, PROMPT), rtol=0, atol=1e-4)


def test_k_quants_decode_as_gguf_py_one_expert_at_a_time(tmp_path):
    """Q4_K, Q5_K and Q6_K (no quantizer in gguf-py): random blocks with finite scales (`ggml_blocks.blocks`), in a
    stacked [E, I, D] tensor; each expert's slice decodes as gguf-py decodes the whole tensor. Q4_0 and Q8_0 too,
    through gguf-py's quantizer."""
    rng = np.random.default_rng(0)
    E, I, D = 3, 4, 512
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    raw = {}
    for qtype in (Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0):
        raw[qtype.name] = blocks(qtype, E * I, D, rng).reshape(E, I, -1)
        w.add_tensor(f"{qtype.name}.weight", raw[qtype.name], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = GGUFModel(tmp_path / "k.gguf")
    for name, data in raw.items():
        want = gguf.quants.dequantize(data, Q[name])
        t = model.tensor(f"{name}.weight")
        assert t.shape == (E, I, D) and np.isfinite(want).all()
        for e in range(E):
            assert torch.equal(t[e], torch.from_numpy(want[e])), (name, e)


def test_cli_generate_plan_convert(sources, tmp_path, capsys):
    folder, model = sources["qwen3_moe"]
    path = write_gguf(model, "qwen3_moe", tmp_path / "q3.gguf", Q.Q8_0)
    code, out, err = run_cli(capsys, "generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)),
                             "--max-new-tokens", "5", "--cache-experts", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == load(path).generate(PROMPT, 5).tokens
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "Hello")
    assert code == 1 and "pass token ids (--prompt-ids)" in err
    code, out, err = run_cli(capsys, "plan", "--config", str(path), "--json")
    assert code == 0, err
    plan = json.loads(out)  # the folder's, and a column for the experts as the file holds them (Q8_0)
    assert plan["formats"].pop("gguf") == "gguf-Q8_0" and plan["bytes_per_expert"].pop("gguf") > 0
    for entry in (plan["host_bytes"], *(card[k] for card in plan["cards"] for k in ("slots", "fits"))):
        entry.pop("gguf")
    assert plan == json.loads(run_cli(capsys, "plan", "--config", str(folder), "--json")[1])
    code, _, err = run_cli(capsys, "convert", "--model", str(path), "--out", str(tmp_path / "packed"), "--experts",
                           "int8", "--dtype", "float32")
    assert code == 0, err
    packed = load(tmp_path / "packed")
    assert packed.config == load(path).config
    assert torch.equal(packed.score(PROMPT), load(path, expert_quant="int8").score(PROMPT))


def test_refusals_are_one_line(sources, tmp_path):
    _, model = sources["olmoe"]
    path = write_gguf(model, "olmoe", tmp_path / "o.gguf")
    bad = tmp_path / "bad.gguf"  # the same file under an architecture we do not read
    bad.write_bytes(path.read_bytes().replace(b"olmoe", b"mamba"))
    with pytest.raises(UserError, match=r"general.architecture 'mamba': offload_moe does not read it .*"
                                        r"llama \(mixtral\)"):
        Checkpoint(bad)
    # experts in a type we do not read: IQ4_NL's bytes (32 weights in 18 bytes) for the up projections
    E, I, D = model.config.num_experts, model.config.intermediate_size, model.config.hidden_size
    iq = {f"blk.{i}.ffn_up_exps.weight": (np.zeros((E, I, D // 32 * 18), np.uint8), Q.IQ4_NL) for i in range(2)}
    write_gguf(model, "olmoe", tmp_path / "iq.gguf", raw=iq)
    with pytest.raises(UserError, match=r"tensor type IQ4_NL is not read \(blk.0.ffn_up_exps.weight and 1 more"):
        Checkpoint(tmp_path / "iq.gguf")
    _, path, _ = converted("qwen3_next", tmp_path)  # an arch's own key missing (renamed here)
    bad.write_bytes(path.read_bytes().replace(b"qwen3next.ssm.time_step_rank", b"qwen3next.ssm.time_step_rXnk"))
    with pytest.raises(UserError, match=r"bad.gguf: metadata qwen3next.ssm.time_step_rank is missing$"):
        Checkpoint(bad)
    (tmp_path / "m-00002-of-00003.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="is part 2 of 3: give the first file, m-00001-of-00003.gguf"):
        Checkpoint(tmp_path / "m-00002-of-00003.gguf")


def test_names_are_those_of_gguf_pys_tables():
    """Every name the families map is one that gguf-py's tables give their architectures (`MODEL_TENSORS`)."""
    import re

    import gguf_families
    import gguf_files

    from offload_moe.models import FAMILIES, GGUF_COMMON, GGUF_EXPERTS

    arch_of = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}

    def names(archs) -> set[str]:
        return {gguf.TENSOR_NAMES[t].format(bid=0) + w for a in archs for t in gguf.MODEL_TENSORS[arch_of[a]]
                for w in (".weight", ".bias", "")}  # Mamba's A has no suffix

    read = [a for f in FAMILIES for a in getattr(f, "GGUF_ARCH", {})]
    assert set(read) == set(gguf_files.ARCH.values()) | set(gguf_families.ARCH.values())
    for family in FAMILIES:
        for pattern, *_ in getattr(family, "GGUF_DENSE", []):
            assert any(re.fullmatch(pattern, n) for n in names(family.GGUF_ARCH)), pattern
    for pattern, _ in GGUF_COMMON:
        assert any(re.fullmatch(pattern, n) for n in names(read)), pattern
    for arch in read:  # each arch's experts are stacked: up and down at least (relu2 experts have no gate)
        assert {m[2] for n in names([arch]) if (m := re.fullmatch(GGUF_EXPERTS, n))} >= {"up", "down"}, arch
