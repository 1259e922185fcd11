"""gpt-oss's MXFP4 experts, kept as MXFP4 (mxfp4.py): the encoding against transformers' own dequantization, the
rounding bound, the format's forward against the dense forward on the dequantized weights (CPU, and the device
code path run here), a tiny checkpoint in the official MXFP4 layout against transformers loading the same files,
`--expert-quant int4|int8` and `convert` on it; and the memory plans of gpt-oss-20b and -120b from their public
configs. (The BF16 layout's parity with transformers is in test_families.py, its features in
test_family_features.py: tests/families.py holds the tiny gpt_oss.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import run_cli
from families import make_family
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from offload_moe.config import ModelConfig
from offload_moe.engine import Engine
from offload_moe.formats.base import DenseFormat
from offload_moe.formats.mxfp4 import MXFP4_BMM_MAX_TOKENS, Mxfp4Format, dequantize, quantize
from offload_moe.formats.registry import expert_format
from offload_moe.memory import card_plan, plan_memory
from offload_moe.models import from_hf_config
from offload_moe.models.public import public_config
from offload_moe.options import EngineOptions
from offload_moe.profiles import load_profile
from offload_moe.weights.checkpoint import Checkpoint

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3, 18, 40, 41]


def write_mxfp4(src: Path, dst: Path) -> Path:
    """`src` (a BF16-layout gpt-oss folder) in the official MXFP4 layout: each expert's gate_up_proj and down_proj
    as `*_blocks` [E, N, K/32, 16] and `*_scales` [E, N, K/32] (N output rows, the weights transposed from
    transformers' [in, out]), everything else as it is, and a quantization_config naming mxfp4."""
    dst.mkdir()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors |= load_file(f)
    out = {}
    for key, t in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = zip(*(quantize(w.T) for w in t), strict=True)
            out[key + "_blocks"], out[key + "_scales"] = torch.stack(blocks), torch.stack(scales)
        else:
            out[key] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def mx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpt_oss")
    return write_mxfp4(make_family(root / "bf16", "gpt_oss", seed=7), root / "mxfp4")


def mxfp4_reference(path: Path):
    """transformers' GptOssForCausalLM on the MXFP4 files, dequantized to float32 (its CPU path)."""
    return transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()


def test_the_encoding_is_transformers_and_the_rounding_bound_holds():
    torch.manual_seed(0)
    w = torch.randn(3, 64, 96) * torch.logspace(-4, 1, 96)  # blocks of very different magnitudes
    w[0, 5] = 0  # an all-zero row
    blocks, scales = (torch.stack(t) for t in zip(*(quantize(e) for e in w), strict=True))
    assert blocks.shape == (3, 64, 3, 16) and blocks.dtype == scales.dtype == torch.uint8
    ours = torch.stack([dequantize(b, s) for b, s in zip(blocks, scales, strict=True)])  # [E, N, K]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    assert torch.equal(ours, theirs.transpose(1, 2)) and torch.equal(ours[0, 5], torch.zeros(96))
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    assert ((ours - w).abs() <= torch.maximum(w.abs(), scale) / 4).all()  # the documented bound
    amax, block_scale = w.abs().view(3, 64, 3, 32).amax(-1), scale[..., ::32]
    assert (amax <= 6 * block_scale).all() and (amax > 3 * block_scale)[amax > 0].all()  # the smallest unclipped scale
    half = dequantize(blocks[1], scales[1], torch.empty(64 * 96, dtype=torch.bfloat16))
    assert torch.equal(half.float(), ours[1])  # FP4 times a power of two is exact in bf16 at these scales


CONFIG = ModelConfig(dim=128, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64, ffn_dim=96, num_experts=2, top_k=1,
                     vocab_size=16, expert_bias=True, swiglu_limit=0.5)


def random_expert(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, I = CONFIG.dim, CONFIG.ffn_dim
    shapes = {"w1": (I, D), "w3": (I, D), "w2": (D, I), "b1": (I,), "b3": (I,), "b2": (D,)}
    return {k: torch.randn(*s, generator=g) * (0.1 if k.startswith("w") else 0.3) for k, s in shapes.items()}


def pack(fmt, parts: dict[str, torch.Tensor]) -> tuple:
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(parts, buf)
    return fmt.views(buf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_format_computes_the_dequantized_expert(dtype):
    """Mxfp4Format's forward (biases, clamped SwiGLU) equals the dense format's on the weights its codes stand for;
    the device path (views flagged off-CPU: decode in the compute dtype) too, here on the CPU and on meta."""
    fmt, parts = Mxfp4Format(CONFIG, dtype), random_expert()
    views = pack(fmt, parts)
    (b13, s13), (b2, s2), on_cpu, bias13, bias2 = views
    assert on_cpu and fmt.nbytes == 128 * 96 * 3 // 2 + 3 * 128 * 96 // 32 + 4 * (2 * 96 + 128)  # no padding here
    w13 = dequantize(b13.transpose(0, 1), s13.T)  # the format's block-major parts, as [N, G, 16] and [N, G]
    weights = {"w1": w13[:96], "w3": w13[96:], "w2": dequantize(b2.transpose(0, 1), s2.T)}
    ref_fmt = DenseFormat(CONFIG, torch.float32)
    for T in (1, MXFP4_BMM_MAX_TOKENS, 20):  # the CPU weighs block partial sums up to 16 tokens, decodes above
        x = torch.randn(T, 128)
        ref = ref_fmt.forward(x, pack(ref_fmt, parts | weights))
        assert ((fmt.forward(x, views) - ref).abs().max() / ref.abs().max()) < 1e-5  # in float32 on the CPU
        assert ((fmt.forward_dequant(x, views) - ref).abs().max() / ref.abs().max()) < 1e-5
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    device_path = fmt.forward(x.to(dtype), ((b13, s13), (b2, s2), False, bias13, bias2))
    assert device_path.dtype == dtype and ((device_path.float() - ref).abs().max() / ref.abs().max()) < tol
    meta = fmt.views(torch.empty(fmt.nbytes, dtype=torch.uint8, device="meta"))
    assert fmt.forward(torch.empty(3, 128, dtype=dtype, device="meta"), meta).shape == (3, 128)
    # against the float weights it was quantized from: FP4's own error (each weight within a quarter of its size
    # or of its block's scale; measured 12% of the largest output here)
    exact = ref_fmt.forward(x, pack(ref_fmt, parts))
    assert 0 < ((fmt.forward(x, views) - exact).abs().max() / exact.abs().max()) < 0.25


def test_an_mxfp4_checkpoint_runs_as_mxfp4_and_matches_transformers(mx):
    """The experts stay MXFP4 (13,253,760 bytes for gpt-oss-20b's; here the tiny shape's), and the logits equal
    transformers' on the same files: both compute with the very weights the codes stand for (exact in float32),
    so the tolerance is the float32 parity suite's 1e-4. Every cache size, with and without prefetch."""
    assert Checkpoint(mx).mxfp4
    ref = mxfp4_reference(mx)
    resident = Engine.load(mx, EngineOptions(prefetch=0, progress=False))
    assert resident.cache.fmt.name == "mxfp4" and resident.cache.fmt.nbytes == Mxfp4Format(resident.config,
                                                                                            torch.float32).nbytes
    got = resident.generate(PROMPT, 8, keep_logits=True)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT + got.tokens[:-1]])).logits[0, len(PROMPT) - 1 :]
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-4)
    assert got.tokens == want.argmax(-1).tolist()
    c = resident.config
    for slots in (c.top_k, c.num_experts - 1):
        for prefetch in (0, 1):
            engine = Engine.load(mx, EngineOptions(cache_experts=slots, prefetch=prefetch, progress=False))
            offloaded = engine.generate(PROMPT, 8, keep_logits=True)
            assert torch.equal(offloaded.logits, got.logits) and offloaded.stats["misses"] > 0


def test_expert_quant_converts_mxfp4_and_convert_keeps_it(mx, tmp_path, capsys):
    """--expert-quant int8/int4 quantize the dequantized MXFP4 weights (int8 within 1% of the MXFP4 logits, int4
    within its own ~10%); `convert` writes MXFP4 as it is (by default), which loads to the same logits and
    runs under a RAM tier; `convert --experts int4` converts."""
    base = Engine.load(mx, EngineOptions(prefetch=0, progress=False)).score(PROMPT)
    for quant, bound in (("int8", 0.01), ("int4", 0.1)):
        engine = Engine.load(mx, EngineOptions(prefetch=0, progress=False, expert_quant=quant))
        assert engine.cache.fmt.name == f"{quant}-g32"
        assert 0 < ((engine.score(PROMPT) - base).abs().max() / base.abs().max()) < bound
    out = tmp_path / "packed"
    code, stdout, err = run_cli(capsys, "convert", "--model", str(mx), "--out", str(out), "--dtype", "float32")
    assert code == 0, err
    assert json.loads((out / "packed.json").read_text())["format"] == "mxfp4" and "as mxfp4" in stdout
    packed = Engine.load(out, EngineOptions(prefetch=0, progress=False))
    assert packed.cache.fmt.name == "mxfp4" and torch.equal(packed.score(PROMPT), base)
    nbytes = packed.cache.fmt.nbytes
    tiered = Engine.load(out, EngineOptions(cache_experts=2, prefetch=1, progress=False, ram_budget=4096 * 8 + 4096))
    assert not tiered.plan.experts_in_ram and nbytes <= 4096
    assert torch.equal(tiered.generate(PROMPT, 6, keep_logits=True).logits,
                       packed.generate(PROMPT, 6, keep_logits=True).logits)
    code, _, err = run_cli(capsys, "convert", "--model", str(mx), "--out", str(tmp_path / "int4"), "--experts", "int4",
                           "--layout", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "int4" / "packed.json").read_text())["format"] == "int4-g32"


def test_batched_decode_equals_each_sequence_alone(mx):
    """Continuous batching on gpt-oss: decode_ragged with the sinks and each layer's own KV length (the sliding
    layers' rings of 4 wrap within these prompts) gives each sequence its tokens and logits run alone."""
    from test_batch import alone, batched, check_same

    jobs = [(PROMPT, 8, 0), ([1, 5, 6], 6, 1), ([1, 40, 41, 42, 43, 44, 45], 5, 1), ([9, 8], 7, 4)]
    engine = Engine.load(mx, EngineOptions(cache_experts=2, prefetch=1, progress=False, max_batch=4))
    refs = alone(engine, jobs)
    sched, ids, _ = batched(engine, jobs, max_batch=4, prefill_chunk=3)
    check_same(sched, ids, refs)
    assert max(sched.batch_sizes) >= 3


# the shipped public configs (offload_moe/data/configs/, sources there); the model card: 20.9B and 116.8B parameters
PUBLIC = {"gpt-oss-20b": (24, 32, 20.9e9), "gpt-oss-120b": (36, 128, 116.8e9)}
# one expert (D = I = 2880, with its biases): bf16, int8-g64, int4-g64, mxfp4
EXPERT_BYTES = {"none": 49_783_680, "int8": 26_472_960, "int4": 14_031_360, "mxfp4": 13_253_760}
# expert slots per layer on the 24, 16 and 12 GB profiles (fp16 dense, KV of 4096 tokens, 1.5 GiB reserve)
SLOTS = {
    "gpt-oss-20b": {"24gb": (17, 32, 32, 32), "16gb": (9, 18, 32, 32), "12gb": (6, 11, 22, 23)},
    "gpt-oss-120b": {"24gb": (11, 20, 39, 41), "16gb": (6, 11, 22, 23), "12gb": (3, 7, 13, 14)},
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_memory_plan_of_the_public_configs(tmp_path, name):
    layers, experts, published = PUBLIC[name]
    path = public_config(name)
    c = from_hf_config(path)
    assert (c.window_layers, c.attention_sinks, c.router_bias, c.expert_bias) == (tuple(range(0, layers, 2)), True,
                                                                                 True, True)
    total = c.n_moe_layers * c.num_experts * c.expert_params + c.dense_params
    assert total == pytest.approx(published, rel=0.001)
    # bytes per expert: 2 bytes a weight; int8/int4 codes with a bf16 scale and zero per 64; MXFP4's 4.25 bits;
    # the biases (2I + D) in the dtype (bf16) or float32
    weights, biases = 3 * 2880 * 2880, 2 * 2880 + 2880
    formula = {"none": 2 * (weights + biases), "int8": weights + 4 * weights // 64 + 4 * biases,
               "int4": weights // 2 + 4 * weights // 64 + 4 * biases,
               "mxfp4": weights // 2 + weights // 32 + 4 * biases}
    assert {q: expert_format(q, c, torch.bfloat16, 64).nbytes for q in EXPERT_BYTES} == formula == EXPERT_BYTES
    # KV: 8 heads x 64 dims x (k, v) x 2 bytes per layer and token; the sliding layers hold 128 tokens at most
    per_layer = 2 * 8 * 64 * 2
    assert c.kv_bytes(100, 2) == layers * 100 * per_layer
    assert c.kv_bytes(4096, 2) == layers // 2 * (4096 + 128) * per_layer
    assert c.kv_bytes(131072, 2) - c.kv_bytes(131071, 2) == layers // 2 * per_layer  # 12 or 18 KiB a token
    plan = card_plan(c)
    assert plan["formats"] == {"none": "fp16", "int8": "int8-g64", "int4": "int4-g64", "mxfp4": "mxfp4"}
    for card in plan["cards"]:
        assert tuple(card["slots"][q] for q in EXPERT_BYTES) == SLOTS[name][card["profile"]]
        prof = load_profile(card["profile"])
        free = prof.device_budget - prof.device_reserve - 2 * c.dense_params - c.kv_bytes(4096, 2)
        assert card["free"] == free and card["fits"] == {q: n >= 4 for q, n in card["slots"].items()}  # top-4
        assert all(card["slots"][q] == min(free // (n * layers), experts) for q, n in EXPERT_BYTES.items())
    # every expert in 64 GB of RAM: gpt-oss-20b in any format; -120b only as MXFP4 or int4,
    # and then only with the RAM budget at 64 GiB (the default 80% of it tiers the store)
    for q, n in EXPERT_BYTES.items():
        ram = plan_memory(c, torch.float16, n, [experts] * layers, 4096, None, 0, 64 * 2**30)
        assert ram.experts_in_ram == (name == "gpt-oss-20b" or q in ("int4", "mxfp4")), q
        assert plan["host_bytes"][q] == layers * experts * n
    tight = plan_memory(c, torch.float16, EXPERT_BYTES["mxfp4"], [experts] * layers, 4096, None, 0,
                        int(0.8 * 64 * 2**30))
    assert tight.experts_in_ram == (name == "gpt-oss-20b")
