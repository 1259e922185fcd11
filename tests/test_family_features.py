"""Every feature, per family (issue 11, section 3): the offloaded cache with prefetch, int8/int4 experts
and int8 attention at the group size the engine picks, `convert` and the packed folder, the tiered
store (a RAM budget smaller than the experts), `--miss-policy cpu`, `--profile auto`, traces,
`simulate`, `tune` and the profile it writes, and perplexity; through the command line where a user
would. Plus a Qwen3-shaped model with many experts (E=128, K=8), so that nothing assumes Mixtral's
8 experts and top-2. Tiny checkpoints written by transformers (tests/families.py); runs on the CPU
(exact comparisons), also on a machine with a GPU."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
import transformers
from conftest import run_cli as run
from families import FAMILIES, VOCAB, hub_config, make_family, reference
from safetensors.torch import load_file

from offload_moe.config import ModelConfig
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.formats.registry import resolve_group_size
from offload_moe.offload.tiered import ram_tier_layout
from offload_moe.options import EngineOptions, default_of
from offload_moe.perplexity import perplexity
from offload_moe.planning.replay import default_slots
from offload_moe.planning.trace import load_trace
from offload_moe.planning.tune import TUNE_SIZES, spread_slots, tune_sizes
from offload_moe.weights.checkpoint import Checkpoint

PROMPT = [1, 17, 33, 250, 4, 99, 180, 7, 64, 3]
IDS = ",".join(map(str, PROMPT))
# max |logit - fp32 logit| / max |fp32 logit| with int4 experts and int8 attention at group 32 on these
# tiny random models: measured 0.0024 (phimoe) to 0.011 (qwen3_moe); the bound is the Mixtral tests' int4 one
INT4_BOUND = 0.06


@pytest.fixture(scope="module")
def fams(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("features")
    return {name: make_family(root / name, name, seed=10 + i, tokenizer="chatml") for i, name in enumerate(FAMILIES)}


def cpu(capsys, command: str, *args: str) -> tuple[int, str, str]:
    """run.py COMMAND on the CPU, whatever the machine has."""
    return run(capsys, command, "--device", "cpu", *args)


def gen(capsys, *args: str) -> dict:
    code, out, err = cpu(capsys, "generate", "--prompt-ids", IDS, "--max-new-tokens", "6", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offload_quantize_convert_and_tier_each_family(fams, family, tmp_path, capsys):
    path = fams[family]
    c = Checkpoint(path).config
    K, E, R = c.top_k, c.num_experts, c.n_moe_layers
    base = gen(capsys, "--model", str(path), "--prefetch", "0", "--logits-out", str(tmp_path / "base.st"))
    want = load_file(tmp_path / "base.st")["logits"]

    # top-k slots per layer, prefetch, misses computed on the CPU, and a RAM tier of a third of the experts
    stride = ram_tier_layout(0, 3 * c.dim * c.ffn_dim * 4, 1)[1]  # one fp32 expert in the tier
    ram = 4096 + stride * (R * E // 3)
    tiered = gen(capsys, "--model", str(path), "--cache-experts", str(K), "--prefetch", "1", "--miss-policy", "cpu",
                 "--ram-budget", str(ram), "--logits-out", str(tmp_path / "tiered.st"))
    s = tiered["stats"]
    assert tiered["tokens"] == base["tokens"]
    assert torch.equal(load_file(tmp_path / "tiered.st")["logits"], want)  # offloading changes no bit
    assert s["slots_per_layer"] == [K] * R and not s["experts_in_ram"] and s["misses"] > 0
    assert s["bytes_read_from_storage"] > 0 and s["prefetch_copies"] > 0

    # int4 experts and int8 attention at the group size the engine picks (D=64 and I=32 here: 32)
    quant = gen(capsys, "--model", str(path), "--cache-experts", str(K), "--expert-quant", "int4",
                "--attention-quant", "int8", "--logits-out", str(tmp_path / "int4.st"))
    assert quant["stats"]["expert_format"] == "int4-g32" and quant["stats"]["attention_format"] == "int8-g32"
    int4 = load_file(tmp_path / "int4.st")["logits"]
    assert 0 < rel_error(int4, want) <= INT4_BOUND
    code, _, err = cpu(capsys, "generate", "--model", str(path), "--prompt-ids", IDS, "--expert-quant", "int8",
                       "--group-size", "64", "--max-new-tokens", "1", "--json")
    assert code == 1 and f"does not divide the expert ffn dim {c.ffn_dim}: use 32" in err
    assert err.count("\n") == 1

    # convert (group size chosen the same way): the packed folder keeps the family, loads back as quantizing at load
    out = tmp_path / "packed"
    code, _, err = run(capsys, "convert", "--model", str(path), "--out", str(out), "--experts", "int4",
                       "--attention", "int8", "--layout", "cpu", "--dtype", "float32")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert Checkpoint(out).config == c
    packed = gen(capsys, "--model", str(out), "--cache-experts", str(K), "--logits-out", str(tmp_path / "packed.st"))
    assert packed["stats"]["expert_format"] == "int4-g32" and packed["stats"]["attention_format"] == "int8-g32"
    # the same codes; fp32 kernels may round a one-token step differently on other buffers (about 1e-7), and the
    # CPU kernels' quantized activations (cpu_kernels.py) can turn that into one quantization step (8.9e-5 measured)
    assert rel_error(load_file(tmp_path / "packed.st")["logits"], int4) < 1e-3 and packed["tokens"] == quant["tokens"]
    # the packed folder's experts.bin under a RAM tier (rows: the layers with experts, not all layers)
    nbytes = packed["stats"]["bytes_per_expert"]
    stride = ram_tier_layout(0, nbytes, 1)[1]
    tier = gen(capsys, "--model", str(out), "--cache-experts", str(K), "--miss-policy", "cpu",
               "--ram-budget", str(4096 + stride * (R * E // 3)), "--logits-out", str(tmp_path / "packed-tier.st"))
    assert not tier["stats"]["experts_in_ram"] and tier["tokens"] == packed["tokens"]
    assert torch.equal(load_file(tmp_path / "packed-tier.st")["logits"], load_file(tmp_path / "packed.st")["logits"])

    # a card profile (Mixtral's slot count, int4): with this model's slot count it runs, at this model's group size
    card = gen(capsys, "--model", str(path), "--profile", "24gb", "--device", "cpu", "--dtype", "float32",
               "--cache-experts", str(K))
    assert card["stats"]["expert_format"] == "int4-g32" and card["stats"]["slots_per_layer"] == [K] * R

    # --profile auto: on the CPU every expert stays resident
    auto = gen(capsys, "--model", str(path), "--profile", "auto", "--device", "cpu")
    assert auto["stats"]["slots_per_layer"] == [E] * R and auto["tokens"] == base["tokens"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trace_simulate_tune_and_the_tuned_profile_each_family(fams, family, tmp_path, capsys):
    path = fams[family]
    c = Checkpoint(path).config
    K, E, R = c.top_k, c.num_experts, c.n_moe_layers
    trace_path = tmp_path / "run.trace"
    code, out, err = cpu(capsys, "generate", "--model", str(path), "--prompt-ids", "1", "--max-new-tokens", "16",
                         "--cache-experts", str(K), "--prefetch", "1", "--trace-out", str(trace_path), "--json")
    assert code == 0, err
    live = json.loads(out)["stats"]
    trace = load_trace(trace_path)
    assert trace.experts.shape == (16, R, K) and (trace.num_experts, trace.top_k, trace.num_layers) == (E, K, R)
    assert ModelConfig.from_dict(json.loads(trace.metadata["config"])) == c  # the shape tune reads, family included

    # the replay gives the live counts (rows: the layers with experts), at the default cache sizes too
    policy = default_of("policy")  # the engine's, and the simulator's default pool is the engine's
    code, out, err = run(capsys, "simulate", "--trace", str(trace_path), "--slots", str(K), "--policy", policy,
                         "--prefetch", "1", "--json")
    assert code == 0, err
    got = next(r for r in json.loads(out)["results"] if r["policy"] == policy)
    assert (got["per_layer_hits"], got["per_layer_misses"]) == (live["per_layer_hits"], live["per_layer_misses"])
    code, out, err = run(capsys, "simulate", "--trace", str(trace_path), "--json")
    assert code == 0, err
    assert sorted({r["slots"] for r in json.loads(out)["results"]}) == default_slots(K, E)

    # profile: text prompts through the checkpoint's tokenizer.json
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\nWhy is the sky blue?\n")
    code, out, err = cpu(capsys, "profile", "--model", str(path), "--prompts", str(prompts), "--max-new-tokens", "4",
                         "--cache-experts", str(K), "--trace-out", str(tmp_path / "text.trace"), "--json")
    assert code == 0, err
    assert load_trace(tmp_path / "text.trace").experts.shape[1:] == (R, K) and json.loads(out)["skipped"] == []

    # tune reads the shape from the trace; its profile runs (here on the CPU)
    tuned = tmp_path / "tuned.toml"
    code, out, err = run(capsys, "tune", "--trace", str(trace_path), "--budget", "24GB", "--out", str(tuned))
    assert code == 0, err
    assert f"model {c.n_layers} layers ({R} with experts) x {E} experts" in out
    assert "group_size = 32" in tuned.read_text()  # the one that divides D=64 and I=32
    result = gen(capsys, "--model", str(path), "--profile", str(tuned), "--device", "cpu", "--dtype", "float32")
    assert len(result["tokens"]) == 6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_perplexity_each_family(fams, family):
    """Perplexity against transformers' own loss over one window, and offloaded == resident with sliding windows."""
    path = fams[family]
    ids = [1] + [int(t) for t in torch.randint(3, VOCAB, (23,), generator=torch.Generator().manual_seed(5))]
    resident = Engine.load(path, EngineOptions(device="cpu", prefetch=0, progress=False))
    ppl, n = perplexity(resident, ids, len(ids), len(ids) - 1)
    with torch.no_grad():
        loss = reference(path, family)(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert n == len(ids) - 1 and ppl == pytest.approx(math.exp(loss), rel=1e-4)
    c = resident.config
    offloaded = Engine.load(path, EngineOptions(device="cpu", cache_experts=c.top_k, prefetch=1, progress=False))
    assert perplexity(offloaded, ids, 8, 4) == perplexity(resident, ids, 8, 4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_perplexity_command_each_family(fams, family, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Hello, world! " * 3)
    path, K = fams[family], Checkpoint(fams[family]).config.top_k
    args = ("perplexity", "--model", str(path), "--text-file", str(text), "--window", "16", "--stride", "8", "--json")
    code, out, err = cpu(capsys, *args)
    assert code == 0, err
    resident = json.loads(out)
    code, out, err = cpu(capsys, *args, "--cache-experts", str(K), "--expert-quant", "int8")
    assert code == 0, err
    quant = json.loads(out)
    assert resident["tokens"] == quant["tokens"] > 30 and resident["perplexity"] > 1
    assert quant["perplexity"] == pytest.approx(resident["perplexity"], rel=0.02)


def make_wide_qwen3(path, experts: int = 128, top_k: int = 8):
    """A Qwen3-MoE-shaped checkpoint with many small experts (D = I = 64, so the default group 64 fits)."""
    torch.manual_seed(3)
    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(20)
    model.save_pretrained(path, max_shard_size="2MB")
    hub_config(path / "config.json", "qwen3_moe")
    return path


def test_many_experts_traces_simulate_tune_and_the_default_group(tmp_path, capsys):
    path = make_wide_qwen3(tmp_path / "wide")
    c = Checkpoint(path).config
    assert (c.num_experts, c.top_k, c.family) == (128, 8, "qwen3_moe")

    base = gen(capsys, "--model", str(path), "--prefetch", "0")
    offloaded = gen(capsys, "--model", str(path), "--cache-experts", "12", "--prefetch", "1")
    assert offloaded["tokens"] == base["tokens"] and offloaded["stats"]["misses"] > 0
    quant = gen(capsys, "--model", str(path), "--expert-quant", "int4", "--attention-quant", "int8")
    assert quant["stats"]["expert_format"] == "int4-g64" and quant["stats"]["attention_format"] == "int8-g64"
    code, _, err = cpu(capsys, "generate", "--model", str(path), "--prompt-ids", IDS, "--expert-quant", "int4",
                       "--group-size", "128", "--json")
    assert code == 1 and "use 32 or 64" in err

    trace_path = tmp_path / "wide.trace"
    code, _, err = cpu(capsys, "generate", "--model", str(path), "--prompt-ids", IDS, "--max-new-tokens", "30",
                       "--cache-experts", "16", "--trace-out", str(trace_path), "--json")
    assert code == 0, err
    trace = load_trace(trace_path)
    assert trace.experts.shape == (39, 2, 8) and trace.num_experts == 128 and int(trace.experts.max()) >= 8
    code, out, err = run(capsys, "simulate", "--trace", str(trace_path), "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert sorted({r["slots"] for r in results}) == [8, 12, 16, 24]
    belady = {r["slots"]: r["hit_rate"] for r in results if r["policy"] == "belady"}
    lru = {r["slots"]: r["hit_rate"] for r in results if r["policy"] == "lru"}
    assert all(lru[s] <= belady[s] for s in lru) and belady[8] < belady[24]

    tuned = tmp_path / "wide.toml"
    code, out, err = run(capsys, "tune", "--trace", str(trace_path), "--budget", "24GB", "--out", str(tuned))
    assert code == 0, err
    assert "x 128 experts" in out and "group_size = 64" in tuned.read_text() and "another expert shape" not in out

    # calibrate measures an expert of the model's own shape; rates of another shape get a note from tune
    code, out, err = run(capsys, "calibrate", "--device", "cpu", "--config", str(path))
    assert code == 0, err
    hardware = out[out.index("[hardware]"):]
    assert 'D=64 I=64 formats fp32 int8-g64 int4-g64"' in hardware
    own, other = tmp_path / "own.toml", tmp_path / "other.toml"
    own.write_text('[budget]\ndevice = "24GB"\n\n' + hardware)
    other.write_text(own.read_text().replace("D=64 I=64", "D=4096 I=14336"))
    for profile, note in ((own, False), (other, True)):
        code, out, err = run(capsys, "tune", "--trace", str(trace_path), "--profile", str(profile))
        assert code == 0, err
        assert ("another expert shape" in out) == note and "cost model: no measured" not in out


def shape(dim: int, ffn: int, heads: int = 4, head_dim: int = 16) -> ModelConfig:
    return ModelConfig(dim=dim, n_layers=1, n_heads=heads, n_kv_heads=heads, head_dim=head_dim, ffn_dim=ffn,
                       num_experts=4, top_k=2, vocab_size=16)


def test_the_group_size_is_64_where_it_divides_else_the_largest_that_does():
    assert resolve_group_size(shape(4096, 14336), None) == 64  # Mixtral
    assert resolve_group_size(shape(2048, 1408), None) == 64  # Qwen1.5-MoE (1408 = 11 x 128)
    assert resolve_group_size(shape(128, 128), None) == 64 and resolve_group_size(shape(128, 128), 128) == 128
    assert resolve_group_size(shape(64, 32), None) == 32  # the tiny families
    # int8 attention adds D and H*hd: 3 heads of 32 is 96, which 64 does not divide
    assert resolve_group_size(shape(64, 64, 3, 32), None) == 64
    assert resolve_group_size(shape(64, 64, 3, 32), None, attention=True) == 32
    assert resolve_group_size(shape(64, 64, 3, 32), None, experts=False, attention=True) == 32
    assert resolve_group_size(shape(48, 80), 128, experts=False) == 128  # nothing quantized: unused, unchecked
    with pytest.raises(UserError) as bad:
        resolve_group_size(shape(64, 32), 64)
    assert str(bad.value) == ("quantization group size 64 does not divide the expert ffn dim 32: use 32 (sizes that "
                              "divide model dim 64, expert ffn dim 32), or leave the size out (--group-size, a "
                              "profile's group_size) to get one of them")
    with pytest.raises(UserError) as bad:
        resolve_group_size(shape(128, 256, 3, 32), 64, attention=True)
    assert "attention input size 96: use 32" in str(bad.value)
    with pytest.raises(UserError) as none:
        resolve_group_size(shape(48, 80), None)
    assert "no quantization group size (32, 64, 128) divides" in str(none.value) and "model dim 48" in str(none.value)


def test_the_tuner_spreads_slots_over_a_grid_of_sizes_for_many_experts():
    assert tune_sizes(2, 8) == [2, 3, 4, 5, 6, 7, 8]  # Mixtral: every size, as before
    q3 = tune_sizes(8, 128)
    assert q3[0] == 8 and q3[-1] == 128 and len(q3) <= TUNE_SIZES and q3 == sorted(set(q3))
    # the knapsack over the sizes it is given is the exact optimum over them
    rng = random.Random(1)
    sizes = [2, 3, 5, 8, 13]
    for _ in range(20):
        hits = {s: [] for s in sizes}
        for _layer in range(4):
            h = 0
            for s in sizes:
                h += rng.randint(0, 9)
                hits[s].append(h)
        total = rng.randint(8, 52)
        got = spread_slots(hits, total, 2, 13)
        brute = max(sum(hits[s][i] for i, s in enumerate(a))
                    for a in itertools.product(sizes, repeat=4) if sum(a) <= total)
        assert sum(got) <= total and sum(hits[s][i] for i, s in enumerate(got)) == brute
