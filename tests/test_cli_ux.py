"""The command line as a user meets it (issue 24): --version, the program's name in its usage, progress bars on
stderr that --quiet turns off, --json output untouched by bars and logs, --log-level, a note on stderr that comes
before the streamed text, and serve's optional access log."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from conftest import run_cli as run

import offload_moe
from offload_moe.cli.entry import main
from offload_moe.cli.parser import DEMO_PROMPT, program
from offload_moe.formats import cpu_kernels

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_the_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"offload_moe {offload_moe.__version__}\n"


def test_python_dash_m_runs_the_command_line():
    r = subprocess.run([sys.executable, "-m", "offload_moe", "plan", "--log-level", "loud"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("usage: python -m offload_moe plan ")
    assert "invalid choice: 'loud'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv0,prog", [("/venv/bin/offload-moe", "offload-moe"), ("run.py", "python run.py"),
                                        ("/src/offload_moe/__main__.py", "python -m offload_moe")])
def test_usage_names_the_program_as_it_was_run(capsys, monkeypatch, argv0, prog):
    assert program(argv0) == prog
    monkeypatch.setattr(sys, "argv", [argv0])
    with pytest.raises(SystemExit) as exit_:
        main(["simulate"])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith(f"usage: {prog} simulate ")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("import os\n\ndef main():\n    return os.getcwd()\n" * 4)
    return path


def test_progress_on_a_terminal_stderr_and_not_with_quiet(capsys, monkeypatch, text_file):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stderr, as a terminal
    ppl = ("perplexity", "--model", "demo", "--text-file", str(text_file), "--max-tokens", "40", "--window", "16",
           "--json")
    code, out, err = run(capsys, *ppl)
    assert code == 0, err
    assert "loading experts" in err and "perplexity:" in err and "tok/s" in err
    assert json.loads(out)["tokens"] == 40  # stdout: the one object, bars or not

    code, out_quiet, err = run(capsys, *ppl, "--quiet", "--log-level", "DEBUG")
    assert code == 0, err
    assert out_quiet == out and "\r" not in err and "loading experts" not in err
    assert " INFO offload_moe.engine: " in err and " DEBUG offload_moe.engine: slots per layer" in err


def test_a_bad_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["perplexity", "--text-file", "x", "--log-level", "verbose"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--log-level" in err and "Traceback" not in err


def test_the_cpu_kernel_note_comes_before_the_streamed_text(capsys, monkeypatch):
    """The note says why the C kernels are not used; they are built at load, so it never lands mid-text."""
    if cpu_kernels.platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the kernels are x86-64 only: no note elsewhere")
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no gcc
    cpu_kernels.library.cache_clear()
    both = io.StringIO()  # stdout and stderr in one stream, as a terminal shows them
    try:
        with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
            code = main(["generate", "--model", "demo", "--max-new-tokens", "3", "--quiet"])
    finally:
        cpu_kernels.library.cache_clear()  # built again, with gcc, where next needed
    text = both.getvalue()
    assert code == 0, text
    assert "CPU kernels unavailable" in text
    assert text.index("CPU kernels unavailable") < text.index(DEMO_PROMPT)


def test_serve_access_log_is_off_unless_asked(capsys, monkeypatch):
    pytest.importorskip("fastapi")
    import httpx
    import serving

    from offload_moe import Engine, EngineOptions
    from offload_moe.demo import resolve_model
    from offload_moe.serve.app import make_server

    engine = Engine.load(resolve_model("demo"), EngineOptions(cache_experts=2, progress=False))
    for access_log in (False, True):
        monkeypatch.setattr(serving, "make_server", partial(make_server, access_log=access_log))
        srv = serving.Running(engine, "demo")
        try:
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        finally:
            srv.close()
        assert ('"GET /health HTTP/1.1" 200' in capsys.readouterr().out) == access_log
