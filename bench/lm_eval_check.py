"""lm-evaluation-harness through the server (issue 24): lm-eval's `local-completions` model asks /v1/completions
for each choice's log-likelihood (token ids, echo, logprobs 1, max_tokens 1, several prompts per request). A
small multiple-choice task, a JSONL file written here (nothing is downloaded), runs through the served model and
through lm-eval's own transformers backend (`hf`) on the same checkpoint; the two are compared: accuracy, and
every choice's log-likelihood.

    python bench/lm_eval_check.py                # a tiny random Mixtral with a byte-level BPE trained here
    python bench/lm_eval_check.py --model DIR    # a Hugging Face folder (its tokenizer: what AutoTokenizer loads)

Not part of the tests: it needs lm-eval, which it installs with pip when it is missing (--no-install: it says
so and stops). Float32 on the CPU. It passes (exit 0) when the accuracies are equal and every log-likelihood is
within --tol of transformers'. A random model's accuracy means nothing; the agreement is the point.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASK = "offload_moe_check"
ITEMS = [  # context, choices, the right one
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin"], 0),
    ("The sun rises in the", [" east", " west", " north"], 0),
    ("def add(a, b):\n    return a", [" + b", " - b", " * b"], 0),
    ("import os\nimport", [" sys", " banana", " the"], 0),
    ("for i in range(10):\n   ", [" print(i)", " return", " import"], 0),
    ("A week has seven", [" days", " hours", " years"], 0),
    ("The opposite of hot is", [" cold", " warm", " loud"], 0),
    ("Two plus two equals", [" four", " five", " three"], 0),
    ("The quick brown fox jumps over the lazy", [" dog", " cat", " car"], 0),
    ("class Config:\n    def __init__(self", [", path):", " + 1", "]]"], 0),
    ("Cats and dogs are", [" animals", " planets", " numbers"], 0),
]


def ensure_lm_eval(install: bool):
    try:
        return importlib.import_module("lm_eval")
    except ImportError:
        pass
    if install:
        print("lm_eval is missing: pip install lm-eval ...", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "lm-eval"], check=False)
        if done.returncode == 0:
            importlib.invalidate_caches()
            return importlib.import_module("lm_eval")
    print("lm_eval (lm-evaluation-harness) is missing" + (" and pip could not install it (no network?)" if install
          else "") + ": install it with `pip install lm-eval`, then run this again.", file=sys.stderr)
    sys.exit(1)


def tiny_model(folder: Path) -> Path:
    """A random Mixtral (float32) with a byte-level BPE tokenizer.json trained on the task's text, both in the
    layout AutoTokenizer and from_pretrained read."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [c + choice for c, choices, _ in ITEMS for choice in choices] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "model_max_length": 256}))
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                     bos_token_id=0, eos_token_id=0)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def write_task(folder: Path) -> None:
    """The items as JSONL and a lm-eval task over them (multiple choice, accuracy)."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in ITEMS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: answer\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")


def serve(path: Path, name: str, max_batch: int):
    """The server in this process on 127.0.0.1 and a free port: (url, the uvicorn server, its thread)."""
    from offload_moe.engine import Engine
    from offload_moe.options import EngineOptions
    from offload_moe.serve.app import bind, make_server
    from offload_moe.serve.service import Service

    engine = Engine.load(path, EngineOptions(device="cpu", dtype="float32", progress=False))
    sock = bind("127.0.0.1", 0)
    server = make_server(Service(engine, name, max_batch=max_batch), sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def loglikelihoods(out: dict) -> dict[int, list[float]]:
    """Each item's choices' log-likelihoods, from lm-eval's logged samples."""
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"][TASK]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Hugging Face model folder (default: a tiny random Mixtral made here)")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per request lm-eval sends (default: 4)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest log-likelihood difference (default: 1e-3)")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install lm-eval when it is missing")
    args = ap.parse_args()
    lm_eval = ensure_lm_eval(not args.no_install)
    from lm_eval.tasks import TaskManager

    from offload_moe.serve.app import model_id

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = Path(args.model) if args.model else tiny_model(tmp / "tiny-mixtral")
        write_task(tmp)
        name = model_id(str(path))
        url, server, thread = serve(path, name, max_batch=args.batch_size)
        tasks = TaskManager(include_path=str(tmp))
        try:
            served = lm_eval.simple_evaluate(
                model="local-completions", tasks=[TASK], task_manager=tasks, log_samples=True,
                model_args=f"model={name},base_url={url}/v1/completions,tokenizer={path},"
                           f"tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,"
                           f"batch_size={args.batch_size}")
        finally:
            server.should_exit = True
            thread.join(timeout=30)
        reference = lm_eval.simple_evaluate(model="hf", tasks=[TASK], task_manager=tasks, log_samples=True,
                                            model_args=f"pretrained={path},dtype=float32,device=cpu", batch_size=1)
    got, want = loglikelihoods(served), loglikelihoods(reference)
    diffs = [abs(a - b) for doc in want for a, b in zip(got[doc], want[doc], strict=True)]
    acc = served["results"][TASK]["acc,none"], reference["results"][TASK]["acc,none"]
    def row(values: list[float]) -> str:
        return " ".join(f"{x:9.4f}" for x in values)

    print(f"{'item':>4}  {'served log-likelihoods':<40}  transformers")
    for doc in sorted(want):
        print(f"{doc:>4}  {row(got[doc]):<40}  {row(want[doc])}")
    print(f"accuracy: served {acc[0]:.3f}, transformers {acc[1]:.3f}; {len(diffs)} log-likelihoods, |diff| max "
          f"{max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}")
    ok = acc[0] == acc[1] and max(diffs) <= args.tol and set(got) == set(want)
    print("PASS" if ok else f"FAIL (tolerance {args.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
