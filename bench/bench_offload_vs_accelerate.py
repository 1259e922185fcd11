"""Experts four times the RAM budget, on the CPU: this engine (RAM tier over storage, prefetch)
against transformers + accelerate's disk offload (device_map="auto", max_memory, offload_folder).

    python bench/bench_offload_vs_accelerate.py [--tokens 8] [--threads 2] [--llama-cpp CONVERTER]

The checkpoint: a random Mixtral shape (hidden 512, FFN 1792, 8 layers, 16 experts, top-2,
float32) whose experts take 1.3 GiB. Both systems get the same RAM for expert weights, a quarter
of that: the engine as 2 cache slots per layer plus a RAM tier (`--ram-budget`), accelerate as
`max_memory` beyond the dense weights. The page cache is kept out of both: the engine reads its
packed folder with O_DIRECT (or drops pages with posix_fadvise DONTNEED); for accelerate, a
logits processor drops the offload folder's pages (posix_fadvise DONTNEED on every file) before
each token, so its disk reads are real reads too. Prints decode tokens/s and bytes read from
storage per token.

With `--llama-cpp CONVERTER` (optional, never in CI: `pip install llama-cpp-python gguf`, and the
path of `convert_hf_to_gguf.py` from llama-cpp-python's source distribution,
vendor/llama.cpp/), the same checkpoint also runs all in RAM, as the reference for how fast CPU
expert compute can be: llama.cpp's decode in f32, q8_0 and q4_0 (quantized by its own
`llama_model_quantize`) beside this engine's with every expert resident in fp32, int8 and int4,
and whether the f32 greedy tokens agree. One expert's forward per precision, against the bytes
it reads, is `bench/bench_quant_kernels.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.convert import convert  # noqa: E402
from offload_moe.demo import write_random_checkpoint  # noqa: E402
from offload_moe.engine import Engine, EngineOptions  # noqa: E402
from offload_moe.formats import DenseFormat  # noqa: E402

SHAPE = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1792, num_experts=16, top_k=2,
                    vocab_size=32000, max_context=4096)
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28740]


def drop_page_cache(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def engine_run(packed: Path, budget: int, tokens: int) -> dict:
    slots = 2
    slot_bytes = SHAPE.n_layers * slots * SHAPE.expert_params * 4
    engine = Engine.load(packed, EngineOptions(cache_experts=slots, prefetch=1, ram_budget=budget - slot_bytes,
                                               context=256, progress=False))
    s = engine.generate(PROMPT, tokens).stats
    return {"tok_s": s["decode_tokens_per_s"], "read_per_token": s["bytes_read_from_storage"] / (len(PROMPT) + tokens),
            "ram_tier": s["ram_tier_bytes"], "slots": slot_bytes, "hit_rate": s["hit_rate"],
            "ram_hit_rate": s["ram_hit_rate"]}


def accelerate_run(path: Path, budget: int, tokens: int, offload: Path) -> dict | None:
    try:
        from transformers import LogitsProcessor, LogitsProcessorList, MixtralForCausalLM
    except ImportError:
        return None
    dense = SHAPE.dense_params * 4
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="auto",
                                               max_memory={"cpu": dense + budget}, offload_folder=str(offload)).eval()
    offloaded = sum(f.stat().st_size for f in offload.rglob("*") if f.is_file())

    class DropCache(LogitsProcessor):
        def __call__(self, input_ids, scores):
            drop_page_cache(offload)
            return scores

    ids = torch.tensor([PROMPT])
    kwargs = {"do_sample": False, "logits_processor": LogitsProcessorList([DropCache()])}

    def timed(n: int) -> float:
        drop_page_cache(offload)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - t0

    first = timed(1)
    total = timed(tokens)
    # every forward reads every offloaded weight once: the bytes read per token are the offload size
    return {"tok_s": (tokens - 1) / max(total - first, 1e-9), "read_per_token": offloaded, "offloaded": offloaded}


def engine_resident_run(path: Path, quant: str, tokens: int) -> dict:
    dtype = "float32" if quant == "none" else "bfloat16"  # the CPU int8/int4 kernels are vectorised for bf16
    engine = Engine.load(path, EngineOptions(expert_quant=quant, dtype=dtype, prefetch=0, context=256,
                                             progress=False))
    r = engine.generate(PROMPT, tokens)
    return {"tok_s": r.stats["decode_tokens_per_s"], "tokens": r.tokens, "format": engine.cache.fmt.name}


@contextlib.contextmanager
def native_stderr_silenced():
    """llama.cpp logs every tensor it quantizes or loads to file descriptor 2, from C."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def llama_cpp_runs(path: Path, converter: Path, tokens: int, threads: int, tmp: Path) -> dict[str, dict]:
    """llama.cpp's all-CPU greedy decode of the checkpoint, per GGUF type: tokens/s and the tokens."""
    import subprocess

    import llama_cpp

    f32 = tmp / "model.f32.gguf"
    env = dict(os.environ, PYTHONPATH=str(converter.parent / "gguf-py"))  # the converter's own gguf package
    done = subprocess.run([sys.executable, str(converter), str(path), "--outfile", str(f32), "--outtype", "f32"],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"GGUF conversion failed:\n{done.stderr[-2000:]}")
    files = {"f32": f32}
    for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        files[name] = tmp / f"model.{name}.gguf"
        with native_stderr_silenced():
            failed = llama_cpp.llama_model_quantize(str(f32).encode(), str(files[name]).encode(), params)
        if failed:
            raise SystemExit(f"llama.cpp could not quantize to {name}")
    out = {}
    for name, file in files.items():
        with native_stderr_silenced():
            llm = llama_cpp.Llama(str(file), n_ctx=256, n_threads=threads, n_batch=64, verbose=False)
        made, stamps = [], []
        for tok in llm.generate(PROMPT, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            made.append(tok)
            if len(made) == tokens:
                break
        out[name] = {"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": made,
                     "mib": file.stat().st_size / 2**20}
        del llm
    return out


def print_cpu_reference(path: Path, converter: Path, tokens: int, threads: int, tmp: Path) -> None:
    print(f"\n# all in RAM, CPU only, {threads} threads, {tokens} tokens greedy (decode tok/s)")
    ours = {q: engine_resident_run(path, q, tokens) for q in ("none", "int8", "int4")}
    theirs = llama_cpp_runs(path, converter, tokens, threads, tmp)
    for r in ours.values():
        print(f"offload_moe, every expert resident, {r['format']:<9}: {r['tok_s']:7.2f}")
    for name, r in theirs.items():
        print(f"llama.cpp {name:<5} ({r['mib']:6.0f} MiB GGUF)          : {r['tok_s']:7.2f}")
    same = ours["none"]["tokens"] == theirs["f32"]["tokens"]
    print(f"f32 greedy tokens {'agree' if same else 'differ'} between offload_moe and llama.cpp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", type=Path, metavar="CONVERTER",
                    help="convert_hf_to_gguf.py from llama-cpp-python's sdist: add llama.cpp's all-CPU decode")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    experts = SHAPE.n_layers * SHAPE.num_experts * SHAPE.expert_params * 4
    budget = experts // 4
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads; experts "
          f"{experts / 2**30:.2f} GiB, RAM for expert weights {budget / 2**20:.0f} MiB (a quarter), "
          f"{args.tokens} tokens greedy")
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on the project's disk, not a tmpfs
        path = write_random_checkpoint(Path(tmp) / "hf", SHAPE, dtype=torch.float32, layers_per_shard=1)
        packed = Path(tmp) / "packed"
        convert(path, packed, DenseFormat(SHAPE, torch.float32), torch.float32, progress=False)
        ours = engine_run(packed, budget, args.tokens)
        print(f"offload_moe (2 slots/layer {ours['slots'] / 2**20:.0f} MiB + RAM tier {ours['ram_tier'] / 2**20:.0f} "
              f"MiB, prefetch 1): {ours['tok_s']:.2f} tok/s, read {ours['read_per_token'] / 2**20:.1f} MiB/token "
              f"from storage, device hit rate {100 * ours['hit_rate']:.1f}%, RAM tier hit rate "
              f"{100 * ours['ram_hit_rate']:.1f}%", flush=True)
        theirs = accelerate_run(path, budget, args.tokens, Path(tmp) / "offload")
        if theirs is None:
            print("transformers not installed: pip install transformers accelerate to compare")
        else:
            print(f"transformers + accelerate disk offload: {theirs['tok_s']:.2f} tok/s, read "
                  f"{theirs['read_per_token'] / 2**20:.1f} MiB/token ({theirs['offloaded'] / 2**20:.0f} MiB "
                  f"offloaded)")
            print(f"speed-up: {ours['tok_s'] / theirs['tok_s']:.1f}x")
        if args.llama_cpp:
            print_cpu_reference(path, args.llama_cpp, max(args.tokens, 32), args.threads, Path(tmp))


if __name__ == "__main__":
    main()
