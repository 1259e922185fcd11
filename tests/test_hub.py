"""Model names as users type them (`demo.find_model`, `weights/hub.py`), over a Hugging Face cache built here as
huggingface_hub lays it out (blobs linked from snapshots, refs naming commits; its own `scan_cache_dir` reads it),
with HF_HUB_CACHE pointing there and HF_HUB_OFFLINE=1: a hub id loads and generates, at a revision too; a cache
folder resolves to its snapshot; `org/name:QUANT` picks one GGUF file; `plan --config` reads the shipped configs
offline; the server's model id is the hub id or --served-model-name; bad names are one line."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SHAPES, run_cli
from gguf import GGMLQuantizationType as Q
from gguf_files import write_gguf

from offload_moe.config import ModelConfig
from offload_moe.demo import TRAINED_DEMOS, find_model, write_random_checkpoint
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.options import EngineOptions
from offload_moe.weights.hub import pick_gguf

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, num_experts=4, top_k=2,
                   vocab_size=32000, max_context=256)
PROMPT = [1, 17, 33, 250]  # inside the GGUF model's 320 ids
GEN = ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "3", "--json"]


def cache_repo(cache: Path, repo: str, folder: Path, refs: tuple[str, ...],
               files: dict[str, Path] | None = None) -> Path:
    """A repository's snapshot in the cache: each file a blob named by its hash, linked from snapshots/<commit>/;
    refs/<name> holds the commit. `files`: path in the repository -> file (default: the folder's files)."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    files = files or {p.name: p for p in folder.iterdir()}
    commit = hashlib.sha1(f"{repo} {refs}".encode()).hexdigest()
    for name, src in files.items():
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage / "snapshots" / commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """tiny/moe (main: seed 0, sharded; tag v1: seed 1) and tiny/moe-GGUF (a Q8_0 file, and an F32 split set in a
    folder) in a fresh cache."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    src = {ref: write_random_checkpoint(root / ref, TINY, seed=i, layers_per_shard=1) for i, ref in
           enumerate(("main", "v1"))}
    snaps = {ref: cache_repo(cache, "tiny/moe", src[ref], (ref,)) for ref in src}
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(vocab_size=320, max_position_embeddings=256,
                                                                       **SHAPES["base"])).eval()
    q8 = write_gguf(model, "mixtral", root / "moe-Q8_0.gguf", Q.Q8_0)
    (root / "f32").mkdir()
    first = write_gguf(model, "mixtral", root / "f32" / "moe-F32.gguf", split_max_tensors=20)
    files = {q8.name: q8} | {f"F32/{p.name}": p for p in (root / "f32").iterdir()}
    gguf_snap = cache_repo(cache, "tiny/moe-GGUF", root, ("main",), files)
    return {"cache": cache, "src": src, "snaps": snaps, "gguf": gguf_snap, "q8": q8, "f32": first.name}


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tokens(model, *flags: str, capsys) -> list[int]:
    code, out, err = run_cli(capsys, "generate", "--model", str(model), *GEN, *flags)
    assert code == 0, err
    return json.loads(out)["tokens"]


def one_line_error(code: int, err: str, *says: str) -> None:
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert all(s in err for s in says), err


def test_the_cache_is_laid_out_as_huggingface_hub_lays_it_out(hub):
    from huggingface_hub import scan_cache_dir

    repos = {r.repo_id: r for r in scan_cache_dir(hub["cache"]).repos}
    assert set(repos) == {"tiny/moe", "tiny/moe-GGUF"}
    assert {ref for rev in repos["tiny/moe"].revisions for ref in rev.refs} == {"main", "v1"}


def test_a_hub_id_loads_and_generates_at_a_revision_too(hub, capsys):
    """The sharded model's index names files that are links into blobs/: they are inside the snapshot."""
    want = {revision: tokens(hub["src"][revision], capsys=capsys) for revision in ("main", "v1")}
    assert want["main"] != want["v1"]
    assert tokens("tiny/moe", capsys=capsys) == want["main"]
    assert tokens("tiny/moe", "--revision", "v1", capsys=capsys) == want["v1"]
    commit = hub["snaps"]["v1"].name
    assert find_model("tiny/moe", commit) == find_model("tiny/moe", "v1")
    assert find_model("tiny/moe", "v1").path == hub["snaps"]["v1"]


def test_a_cache_folder_is_its_snapshot_and_goes_by_the_hub_id(hub):
    storage = hub["cache"] / "models--tiny--moe"
    assert find_model(storage).path == hub["snaps"]["main"] and find_model(storage).name == "tiny/moe"
    assert find_model(str(storage), "v1").path == hub["snaps"]["v1"]
    assert find_model(hub["snaps"]["v1"]).name == "tiny/moe"  # a snapshot folder: not its hash
    with pytest.raises(UserError, match="no snapshot of revision v2 .*its refs: main, v1"):
        find_model(storage, "v2")
    with pytest.raises(UserError, match="a revision applies to a hub id"):
        find_model(hub["src"]["main"], "v1")
    with pytest.raises(UserError, match=r"tiny/moe \(revision v9\): no such local .*\(HF_HUB_OFFLINE is set"):
        find_model("tiny/moe", "v9")


def test_the_python_api_takes_names_as_the_command_line_does(hub):
    opts = EngineOptions(progress=False)
    assert Engine.load("demo", opts).checkpoint.path == TRAINED_DEMOS["demo"]
    engine = Engine.load("tiny/moe", opts, revision="v1")
    assert engine.name == "tiny/moe" and engine.checkpoint.path == hub["snaps"]["v1"]
    assert engine.generate(PROMPT, 3).tokens == Engine.load(hub["src"]["v1"], opts).generate(PROMPT, 3).tokens


def test_a_quant_tag_picks_that_gguf_file(hub, capsys):
    found = find_model("tiny/moe-GGUF:q8_0")  # any case
    assert found.path == hub["gguf"] / "moe-Q8_0.gguf" and found.name == "tiny/moe-GGUF:q8_0"
    assert find_model("tiny/moe-GGUF:F32").path == hub["gguf"] / "F32" / hub["f32"]  # a split set: its first file
    assert tokens("tiny/moe-GGUF:Q8_0", capsys=capsys) == tokens(hub["q8"], capsys=capsys)
    code, out, err = run_cli(capsys, "plan", "--config", "tiny/moe-GGUF:Q8_0", "--json")
    assert code == 0 and json.loads(out)["formats"]["gguf"] == "gguf-Q8_0", err
    one_line_error(*run_cli(capsys, "generate", "--model", "tiny/moe-GGUF:Q4_K_M", *GEN)[::2],
                   "no GGUF file has Q4_K_M in its name", "moe-Q8_0.gguf", hub["f32"])


def test_pick_gguf_whole_words_split_sets_and_ambiguity():
    files = ["README.md", "m-Q2_K.gguf", "m-Q2_K_L.gguf", "m-UD-Q4_K_XL.gguf", "mmproj-m-Q8_0.gguf", "m-Q8_0.gguf",
             "BF16/m-BF16-00002-of-00002.gguf", "BF16/m-BF16-00001-of-00002.gguf"]
    assert pick_gguf(files, "q2_k", "r") == "m-Q2_K.gguf"  # the whole word, not Q2_K_L
    assert pick_gguf(files, "Q2_K_L", "r") == "m-Q2_K_L.gguf"
    assert pick_gguf(files, "Q4_K_XL", "r") == "m-UD-Q4_K_XL.gguf"
    assert pick_gguf(files, "Q8_0", "r") == "m-Q8_0.gguf"  # not the projector
    assert pick_gguf(files, "bf16", "r") == "BF16/m-BF16-00001-of-00002.gguf"
    with pytest.raises(UserError, match=r"r: Q2 is in the names of several GGUF files \(m-Q2_K.gguf, m-Q2_K_L.gguf\)"):
        pick_gguf(files, "Q2", "r")
    with pytest.raises(UserError, match="no GGUF file has Q6_K in its name"):
        pick_gguf(files, "Q6_K", "r")
    with pytest.raises(UserError, match="it has no GGUF file"):
        pick_gguf(["config.json"], "Q6_K", "r")


def test_plan_reads_shipped_configs_offline_then_the_cache(hub, capsys):
    code, out, err = run_cli(capsys, "plan", "--config", "Qwen/Qwen3-30B-A3B", "--json")
    assert code == 0 and json.loads(out)["model"]["experts"] == 128, err
    code, out, err = run_cli(capsys, "plan", "--config", "tiny/moe", "--revision", "v1", "--json")
    assert code == 0 and json.loads(out)["model"]["experts"] == TINY.num_experts, err
    one_line_error(*run_cli(capsys, "plan", "--config", "tiny/nothing")[::2], "tiny/nothing", str(hub["cache"]),
                   "HF_HUB_OFFLINE", "the shipped public configs: ")


@pytest.mark.parametrize("flags,served", [([], "tiny/moe"), (["--served-model-name", "tiny"], "tiny")])
def test_the_server_answers_to_the_hub_id_or_the_served_name(monkeypatch, capsys, flags, served):
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import offload_moe.cli.serve_cmd as serve_cmd

    made = {}

    def make_server(service, sock, *args, **kwargs):
        made["server"] = server = real(service, sock, *args, **kwargs)
        made["port"] = sock.getsockname()[1]
        return server

    real = serve_cmd.make_server
    monkeypatch.setattr(serve_cmd, "make_server", make_server)
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("code", run_cli(
        capsys, "serve", "--model", "tiny/moe", "--port", "0", *flags)[0]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not getattr(made.get("server"), "started", False):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    models = httpx.get(f"http://127.0.0.1:{made['port']}/v1/models", timeout=10).json()
    made["server"].should_exit = True
    thread.join(timeout=20)
    assert [m["id"] for m in models["data"]] == [served] and done["code"] == 0


@pytest.mark.parametrize("name,says", [
    ("nope", ["no such model folder or file: nope", "hub id org/name"]),
    ("tiny/absent", ["tiny/absent: no such local folder or file", "not in the Hugging Face cache at",
                     "HF_HUB_OFFLINE is set"]),
    ("./tiny/moe", ["no such model folder or file: ./tiny/moe"]),  # a path, not a hub id
    ("tiny/moe-GGUF", ["no config.json or params.json", "tiny/moe-GGUF:QUANT"]),
])
def test_unknown_names_are_one_line(capsys, hub, name, says):
    one_line_error(*run_cli(capsys, "generate", "--model", name, *GEN)[::2], *says)
