"""The CLI's outputs and inputs as a careless user gives them (issue 23): an output that is a FIFO, a device or
a symlink is written into or through, never replaced; a folder, a missing folder, a non-UTF-8 file, a seed out
of range or a NaN temperature is one `error:` line before any model loads; a KV pool the RAM cannot hold is
refused before it is allocated; a shard index pointing outside the model folder, and NaN in a dense weight, are
refused."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading

import pytest
from conftest import run_cli as run
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file

from offload_moe.planning.trace import load_trace, save_trace

GEN = ("generate", "--model", "demo", "--prompt-ids", "1,2,3", "--max-new-tokens", "2")


def one_error(code: int, out: str, err: str, *says: str) -> None:
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(s in err for s in says), err


def test_an_output_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, capsys):
    target, link = tmp_path / "logits.safetensors", tmp_path / "link.safetensors"
    target.write_bytes(b"old")
    link.symlink_to(target)
    code, _, err = run(capsys, *GEN, "--json", "--logits-out", str(link))
    assert code == 0, err
    assert link.is_symlink() and load_safetensors(target.read_bytes())["logits"].shape[0] == 2


@pytest.mark.parametrize("flag,tensor", [("--logits-out", "logits"), ("--trace-out", "experts")])
def test_an_output_that_is_a_fifo_is_written_into(tmp_path, capsys, flag, tensor):
    """A FIFO (as a device: /dev/null, /dev/stdout) is not a regular file: written into, never replaced. The tests
    never aim at the real /dev/null: were the rule broken, running as root would destroy it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, _, err = run(capsys, *GEN, "--json", flag, str(fifo))
    reader.join(timeout=30)
    assert code == 0, err
    assert stat.S_ISFIFO(fifo.stat().st_mode) and load_safetensors(got[0])[tensor].shape[0] > 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_device_is_one_line(capsys):
    code, out, err = run(capsys, *GEN, "--json", "--logits-out", "/dev/full")
    assert code == 1 and "cannot write /dev/full" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--trace-out", "--logits-out"])
def test_an_output_that_is_a_folder_or_in_no_folder_is_refused_first(tmp_path, capsys, flag):
    one_error(*run(capsys, *GEN, flag, str(tmp_path)), "is a folder")
    one_error(*run(capsys, *GEN, flag, str(tmp_path / "no" / "such.out")), "does not exist")


def test_serve_checks_its_trace_output_before_it_loads(tmp_path, capsys):
    one_error(*run(capsys, "serve", "--model", "demo", "--port", "0", "--trace-out", str(tmp_path / "no" / "t")),
              "does not exist")


def test_a_kv_pool_that_ram_cannot_hold_is_refused(capsys):
    one_error(*run(capsys, "serve", "--model", "demo", "--port", "0", "--max-batch", "1000000000"),
              "KV cache", "--max-batch")


def test_non_utf8_inputs_are_one_line(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"def f():\n\xff\xfe oops\n")
    one_error(*run(capsys, "profile", "--model", "demo", "--prompts", str(bad), "--trace-out",
                   str(tmp_path / "t.trace")), "not UTF-8")
    one_error(*run(capsys, "perplexity", "--model", "demo", "--text-file", str(bad)), "not UTF-8")


@pytest.mark.parametrize("flags,says", [(["--seed", str(2**64), "--temperature", "0.5"], "--seed"),
                                        (["--seed", "-1"], "--seed"), (["--temperature", "nan"], "--temperature")])
def test_sampling_values_out_of_range_are_one_line(capsys, flags, says):
    one_error(*run(capsys, *GEN, *flags), says)


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_shard_outside_the_model_folder_is_refused(ckpts, tmp_path, capsys):
    path = copy_of(ckpts["base"], tmp_path / "m")
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../../../../etc/passwd"
    index.write_text(json.dumps(data))
    one_error(*run(capsys, "generate", "--model", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "1"),
              "not a file inside the model folder")


def test_nan_in_a_dense_weight_is_refused_at_load(ckpts, tmp_path, capsys):
    path = copy_of(ckpts["base"], tmp_path / "m")
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    one_error(*run(capsys, "generate", "--model", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "1"),
              "norm.weight holds NaN")


def test_convert_killed_before_its_first_journal_resumes(ckpts, tmp_path, capsys):
    """A run killed before its first flush left only experts.bin (and, since, an empty journal): the next run
    starts it again instead of refusing the folder."""
    out = tmp_path / "packed"
    out.mkdir()
    (out / "experts.bin").write_bytes(b"\x00" * 100)  # what such a run left, before the journal is written first
    code, _, err = run(capsys, "convert", "--model", str(ckpts["base"]), "--out", str(out), "--experts", "int8",
                       "--group-size", "32", "--dtype", "float32")
    assert code == 0, err
    assert (out / "packed.json").exists()


def test_convert_into_a_file_or_an_unwritable_place_is_one_line(ckpts, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    one_error(*run(capsys, "convert", "--model", str(ckpts["base"]), "--out", str(afile)), "is not a folder")
    assert afile.read_text() == "mine"
    one_error(*run(capsys, "convert", "--model", str(ckpts["base"]), "--out", "/proc/offload-moe-test"),
              "cannot write")


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '{"dim": "wide"}'])
def test_a_trace_whose_model_shape_is_broken_is_one_line(tmp_path, capsys, bad):
    code, _, err = run(capsys, *GEN[:-2], "--max-new-tokens", "4", "--json", "--trace-out", str(tmp_path / "t"))
    assert code == 0, err
    trace = load_trace(tmp_path / "t")
    trace.metadata["config"] = bad
    save_trace(tmp_path / "bad", trace)
    one_error(*run(capsys, "simulate", "--trace", str(tmp_path / "bad"), "--timed"), "model shape")
    one_error(*run(capsys, "tune", "--trace", str(tmp_path / "bad"), "--budget", "24GB"), "model shape")


def test_convert_refuses_nan_in_an_expert(ckpts, tmp_path, capsys):
    path = copy_of(ckpts["base"], tmp_path / "m")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in weight_map if ".experts." in k)
    tensors = load_file(path / weight_map[key])
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path / weight_map[key], metadata={"format": "pt"})
    one_error(*run(capsys, "convert", "--model", str(path), "--out", str(tmp_path / "p"), "--experts", "int8",
                   "--group-size", "32"), "holds NaN or infinite values")
    assert not (tmp_path / "p" / "packed.json").exists()


@pytest.mark.parametrize("edit,says", [({"num_hidden_layers": 2}, "has layer 2"), ({"rope_theta": "abc"}, "rope_theta"),
                                       ({"num_local_experts": 4}, "has expert 4")])
def test_a_config_that_does_not_fit_its_checkpoint_is_one_line(ckpts, tmp_path, capsys, edit, says):
    """The base checkpoint has 3 layers of 8 experts: a config declaring fewer would run part of it, silently."""
    path = copy_of(ckpts["base"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text()) | edit
    (path / "config.json").write_text(json.dumps(config))
    one_error(*run(capsys, "generate", "--model", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "1"), says)
