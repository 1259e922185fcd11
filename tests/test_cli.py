"""The command line as a user runs it: exit codes, error text, JSON output, files written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli as cli
from safetensors.torch import load_file

from offload_moe.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess:
    """The real script, in a subprocess, as a user would run it."""
    import os

    env = dict(os.environ)
    if env_cache is not None:
        env["OFFLOAD_MOE_CACHE"] = str(env_cache)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)



def test_main_job_runs_the_trained_demo_offloaded(tmp_path):
    r = run(env_cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trained" in r.stderr
    assert r.stdout.startswith('def read_config(path):\n    """')
    assert "expert hit rate" in r.stdout and "decode" in r.stdout
    assert re.search(r"slots per layer\s+2 \(one pool of 8 shared by every layer\)\n", r.stdout)
    text = r.stdout.split("\n\n  prefill")[0]
    assert len(text) > 60 and run(env_cache=tmp_path).stdout.split("\n\n  prefill")[0] == text  # seeded


def test_random_demo_is_made_once_in_the_cache_folder(tmp_path):
    r = run("--model", "demo-random", "--max-new-tokens", "4", env_cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr
    assert (tmp_path / "demo-random" / "config.json").exists()


def test_help_lists_every_flag_with_its_default():
    r = run("generate", "--help")
    assert r.returncode == 0
    for flag in ("--model", "--prompt", "--prompt-ids", "--profile", "--max-new-tokens", "--greedy", "--temperature",
                 "--top-p", "--top-k", "--seed", "--device", "--dtype", "--cache-experts", "--prefetch", "--json",
                 "--logits-out", "--chat", "--context", "--policy"):
        assert flag in r.stdout, flag
    assert "default: 1)" in r.stdout  # prefetch, from EngineOptions
    assert run("--help").returncode == 0


def test_json_prints_exactly_one_object(ckpts, capsys):
    code, out, err = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt", "def add(a, b):",
                         "--max-new-tokens", "6", "--cache-experts", "3", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"prompt_ids", "tokens", "text", "stats"}
    assert data["prompt_ids"] == load_tokenizer(ckpts["base"]).encode("def add(a, b):")  # BOS first
    assert data["prompt_ids"][0] == 1 and len(data["tokens"]) == 6
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "per_layer_hit_rate", "prefetch_recall",
                "prefetch_precision", "bytes_to_device", "copy_wait_s", "peak_device_bytes"):
        assert key in data["stats"], key
    assert len(data["stats"]["per_layer_hit_rate"]) == 3
    assert data["stats"]["slots_per_layer"] == [3, 3, 3]


def test_logits_out_rows_are_the_logits_tokens_were_chosen_from(ckpts, capsys, tmp_path):
    path = tmp_path / "logits.safetensors"
    code, out, _ = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt-ids", "1,415,2936",
                       "--max-new-tokens", "5", "--json", "--logits-out", str(path))
    assert code == 0
    logits = load_file(path)["logits"]
    tokens = json.loads(out)["tokens"]
    assert logits.shape == (5, 32000) and str(logits.dtype) == "torch.float32"
    assert logits.argmax(-1).tolist() == tokens


def test_streamed_text_equals_decoded_text(ckpts, capsys):
    code, out, _ = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt", "Hello", "--max-new-tokens", "8",
                       "--temperature", "0.9", "--seed", "3")
    assert code == 0
    code, js, _ = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt", "Hello", "--max-new-tokens", "8",
                      "--temperature", "0.9", "--seed", "3", "--json")
    assert out.startswith("Hello" + json.loads(js)["text"])


def test_per_layer_slots_and_chat(ckpts, capsys):
    code, out, _ = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt", "hi", "--chat",
                       "--cache-experts", "2,4,3", "--max-new-tokens", "3", "--json")
    assert code == 0
    assert json.loads(out)["stats"]["slots_per_layer"] == [2, 4, 3]
    assert json.loads(out)["stats"]["prompt_tokens"] > 8  # [INST] ... [/INST] around "hi"


def damaged(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "config-not-json":
        (dst / "config.json").write_text("{not json")
    elif how == "truncated-shard":
        shard = sorted(dst.glob("model-*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "missing-shard":
        sorted(dst.glob("model-*.safetensors"))[1].unlink()
    elif how == "missing-tensor":
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        del index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "wrong-shape":
        config = json.loads((dst / "config.json").read_text())
        config["intermediate_size"] = 100
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("how,message", [
    ("config-not-json", "is not valid JSON"),
    ("truncated-shard", "truncated"),
    ("missing-shard", "missing"),
    ("missing-tensor", "layers.1.attention.wk.weight is missing"),
    ("wrong-shape", "shape"),
])
def test_broken_checkpoints_get_a_short_error(ckpts, tmp_path, capsys, how, message):
    path = damaged(ckpts["base"], tmp_path / how, how)
    code, out, err = cli(capsys, "generate", "--model", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert code == 1
    assert message in err and err.startswith("error: ")
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/folder"], "no such model folder"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--cache-experts", "1"], "fewer than top-k"),
    (["--cache-experts", "2,2"], "2 counts given for 3 layers"),
    (["--profile", "no-such-profile"], "unknown profile"),
    (["--prompt-ids", ",".join(["5"] * 40), "--context", "32"], "the prompt has 40 tokens"),
    (["--top-p", "0"], "--top-p"),
])
def test_bad_input_gets_a_short_error(ckpts, capsys, args, message):
    base = ["generate", "--model", str(ckpts["base"]), "--max-new-tokens", "2"]
    if "--prompt-ids" not in args:
        base += ["--prompt-ids", "1,2"]
    code, out, err = cli(capsys, *base, *args)
    assert code == 1, err
    assert message in err and "Traceback" not in err


def test_profile_that_does_not_fit_is_refused_with_numbers(ckpts, tmp_path, capsys):
    profile = tmp_path / "tiny-card.toml"
    profile.write_text('device = "cpu"\ncache_experts = 8\n[budget]\ndevice = "1MB"\ndevice_reserve = "0"\n')
    code, _, err = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt-ids", "1",
                       "--profile", str(profile))
    assert code == 1
    assert "does not fit the device" in err and "GiB" in err and "budget" in err


def test_usage_errors_exit_2_without_traceback():
    r = run("generate", "--prefetch", "-1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--prefetch" in r.stderr
    r = run("generate", "--prompt", "a", "--prompt-ids", "1")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_existing_logits_file_survives_a_failed_run(ckpts, tmp_path, capsys):
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"precious")
    code, _, _ = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt-ids", "1,99999",
                     "--logits-out", str(path))
    assert code == 1 and path.read_bytes() == b"precious"
