"""Input the engine cannot run, through the command line as a user meets it: a too-long prompt among many is
skipped by `profile`, and a checkpoint of an architecture the engine does not implement is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli as run

from offload_moe.models import supported
from offload_moe.planning.trace import load_trace

DEMO = Path(__file__).resolve().parent.parent / "offload_moe" / "data" / "tiny-moe"
LONG = "def " + " ".join(f"name_{i} = value_{i} + {i}" for i in range(60))  # far over 64 tokens
SHORT = ["def fib(n):", "class Stack:", "import os"]


def profile(capsys, tmp_path: Path, prompts: list[str], trace: Path, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / f"prompts-{len(list(tmp_path.glob('prompts-*')))}.txt"
    path.write_text("\n".join(prompts) + "\n")
    return run(capsys, "profile", "--model", "demo", "--context", "64", "--prompts", str(path),
               "--max-new-tokens", "4", "--trace-out", str(trace), *extra)


def test_profile_skips_a_prompt_longer_than_the_context_and_keeps_the_rest(tmp_path, capsys):
    trace = tmp_path / "run.trace"
    code, out, err = profile(capsys, tmp_path, [SHORT[0], SHORT[1], LONG, SHORT[2]], trace, "--json")
    assert code == 0, err
    assert "warning: skipping prompt 3 ('def name_0 = value_0" in err and "context holds 64" in err
    assert "Traceback" not in err
    result = json.loads(out)
    assert result["skipped"] == [3]

    # the trace is exactly the one of the prompts that fit, run alone
    alone = tmp_path / "alone.trace"
    code, out, err = profile(capsys, tmp_path, SHORT, alone, "--json")
    assert code == 0 and json.loads(out)["skipped"] == []
    got, want = load_trace(trace), load_trace(alone)
    assert result["trace_tokens"] == got.experts.shape[0] == want.experts.shape[0] > 3 * 4
    assert (got.experts == want.experts).all() and (got.predicted == want.predicted).all()


def test_profile_text_output_names_the_skipped_prompts(tmp_path, capsys):
    code, out, err = profile(capsys, tmp_path, [LONG, SHORT[0]], tmp_path / "t.trace")
    assert code == 0, err
    assert "warning: skipping prompt 1" in err and "prompt 2/2:" in err
    assert "1 of 2 prompts skipped" in out and (tmp_path / "t.trace").exists()


def test_profile_fails_when_no_prompt_fits_and_leaves_the_trace_file_alone(tmp_path, capsys):
    trace = tmp_path / "keep.trace"
    trace.write_bytes(b"precious")
    code, out, err = profile(capsys, tmp_path, [LONG, LONG + " again"], trace, "--json")
    assert code == 1 and out == ""
    assert "warning: skipping prompt 1" in err and "warning: skipping prompt 2" in err
    assert err.strip().splitlines()[-1].startswith("error: no prompt") and "Traceback" not in err
    assert trace.read_bytes() == b"precious"
    code, _, err = profile(capsys, tmp_path, [LONG], tmp_path / "new.trace")
    assert code == 1 and not (tmp_path / "new.trace").exists()


def checkpoint_saying(tmp_path: Path, **keys) -> Path:
    """The demo checkpoint (Mixtral tensor names) with its config.json's model_type / architectures replaced."""
    path = tmp_path / "model"
    shutil.copytree(DEMO, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in keys.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("keys,says", [
    (dict(model_type="dbrx", architectures=["DbrxForCausalLM"]), "model_type 'dbrx'"),
    (dict(model_type="granitemoe", architectures=None), "model_type 'granitemoe'"),
    (dict(model_type=None, architectures=["JambaForCausalLM"]), "architectures JambaForCausalLM"),
    (dict(model_type="mixtral", architectures=["PhiMoEForCausalLM"]), "architectures PhiMoEForCausalLM"),
])
def test_an_architecture_the_engine_does_not_implement_is_refused(tmp_path, capsys, keys, says):
    path = checkpoint_saying(tmp_path, **keys)
    code, out, err = run(capsys, "generate", "--model", str(path), "--prompt", "def f():", "--max-new-tokens", "2")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and says in err and "does not implement" in err
    for model_type, names in supported().items():
        assert model_type in err and all(name in err for name in names)


@pytest.mark.parametrize("keys", [
    dict(model_type=None, architectures=None),  # hand-written: taken as Mixtral
    dict(model_type="mixtral", architectures=None),
    dict(model_type=None, architectures=["MixtralForCausalLM"]),
])
def test_mixtral_and_a_config_that_does_not_say_still_load(tmp_path, capsys, keys):
    path = checkpoint_saying(tmp_path, **keys)
    code, out, err = run(capsys, "generate", "--model", str(path), "--prompt", "def f():", "--max-new-tokens", "2",
                         "--json")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 2


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0")])
def test_a_bad_sampling_flag_is_refused_before_the_model_loads(capsys, flag, value):
    code, out, err = run(capsys, "generate", "--model", "demo", "--prompt", "def f():", flag, value)
    assert code == 1 and out == ""  # the prompt is not echoed: nothing ran
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and flag in err
