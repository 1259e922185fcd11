"""Experts four times the RAM budget, on the CPU: this engine (RAM tier over storage, prefetch)
against transformers + accelerate's disk offload (device_map="auto", max_memory, offload_folder).

    python bench/bench_offload_vs_accelerate.py [--tokens 12] [--threads 2] [--llama-cpp CONVERTER]

The checkpoint: a random Mixtral shape (hidden 512, FFN 1792, 8 layers, 16 experts, top-2,
float32) whose experts take 1.3 GiB. Both systems get the same RAM for expert weights, a quarter
of that: the engine as 2 cache slots per layer plus a RAM tier (`--ram-budget`), accelerate as
`max_memory` beyond the dense weights. The engine runs with prefetch 0 and with prefetch 1 (which
also reads predicted experts from storage, wrong guesses included). accelerate spends part of that
same `max_memory` on a load buffer: with disk offload its device map keeps room in RAM for the
largest offloaded layer (to load it back each forward), so fewer of its weights stay in RAM; the
script prints how the map split them. The page cache is kept out of both: the engine reads its
packed folder with O_DIRECT (or drops pages with posix_fadvise DONTNEED); for accelerate, a logits
processor drops the offload folder's and the checkpoint's pages (posix_fadvise DONTNEED on every
file) before each forward, so its disk reads are real reads too (the time the drop takes is left
out). Pages that accelerate keeps memory-mapped cannot be dropped that way: the script measures
(mincore) how much of those files the page cache still holds after each drop, RAM that accelerate
uses beyond `max_memory`.

Both are measured the same way, per decoded token, over the decode steps after the first (the
first carries one-time work; the engine's stats count the same steps): timestamps and the bytes
this process read from storage (/proc/self/io `read_bytes`, which counts O_DIRECT reads and page
faults on memory-mapped files alike) are taken as each token comes out, by the engine's token
generator and by a logits processor in transformers' generate, and the figures are the
differences between the second token and the last, over tokens - 2 steps. The engine's own
storage counter is printed beside the /proc figure as a check.

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
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_cpp_peer  # noqa: E402

from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.demo import write_random_checkpoint  # noqa: E402
from offload_moe.engine import Engine
from offload_moe.formats.base import DenseFormat  # noqa: E402
from offload_moe.generate import generate_tokens  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.sampling import Sampling  # noqa: E402
from offload_moe.weights.convert import convert  # noqa: E402
from offload_moe.weights.sources import page_cache_bytes  # noqa: E402

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


def proc_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (Linux /proc/self/io `read_bytes`, all
    threads): direct reads, buffered reads that missed the page cache, faults on mapped files."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def decode_window(marks: list[tuple]) -> tuple[int, float, list[float]]:
    """marks[i] = (time, counters...) as token i+1 came out: the decode steps after the first are those
    between the second token and the last. Returns (steps, seconds, per-step difference of each counter)."""
    if len(marks) < 3:
        raise SystemExit("--tokens must be at least 3: the figures are over the decode steps after the first")
    (t0, *c0), (t1, *c1) = marks[1], marks[-1]
    steps = len(marks) - 2
    return steps, t1 - t0, [(b - a) / steps for a, b in zip(c0, c1, strict=True)]


def engine_run(packed: Path, budget: int, tokens: int, prefetch: int = 1) -> dict:
    slots = 2
    slot_bytes = SHAPE.n_layers * slots * SHAPE.expert_params * 4
    engine = Engine.load(packed, EngineOptions(cache_experts=slots, prefetch=prefetch, ram_budget=budget - slot_bytes,
                                               context=256, progress=False))
    store, table = engine.cache.store, engine.cache.table

    def mark(_token: int) -> None:
        t = store.counters
        marks.append((time.perf_counter(), t.bytes_read, proc_read_bytes(), sum(table.hits), sum(table.misses),
                      t.ram_hits, t.ram_misses))

    marks = []
    for _ in generate_tokens(engine, PROMPT, tokens, Sampling(), on_token=mark):
        pass
    n, seconds, (counted, io, hits, misses, ram_hits, ram_misses) = decode_window(marks)
    return {"tok_s": n / seconds, "steps": n, "read_per_token": counted, "io_read_per_token": io,
            "ram_tier": store.ram_bytes, "slots": slot_bytes, "hit_rate": hits / max(hits + misses, 1e-9),
            "ram_hit_rate": ram_hits / max(ram_hits + ram_misses, 1e-9)}


def accelerate_run(path: Path, budget: int, tokens: int, offload: Path) -> dict | None:
    try:
        from transformers import LogitsProcessor, LogitsProcessorList, MixtralForCausalLM
    except ImportError:
        return None
    dense = SHAPE.dense_params * 4
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="auto",
                                               max_memory={"cpu": dense + budget}, offload_folder=str(offload)).eval()
    offloaded = sum(f.stat().st_size for f in offload.rglob("*") if f.is_file())
    # how the device map split the weights, and the load buffer it kept in RAM for them: the largest layer
    where = model.hf_device_map
    on_disk = ram = 0
    for name, p in model.named_parameters():
        placed = next((where[k] for k in sorted(where, key=len, reverse=True)
                       if name == k or name.startswith(k + ".") or k == ""), "cpu")
        size = p.numel() * 4
        on_disk, ram = (on_disk + size, ram) if placed == "disk" else (on_disk, ram + size)
    largest = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in model.model.layers)

    marks, dropping, kept = [], [0.0], []
    files = [f for folder in (offload, path) for f in folder.rglob("*") if f.is_file()]

    class MarkAndDrop(LogitsProcessor):
        """Called once per forward, right after it: note the time (less the drops so far) and the bytes
        read, then drop the offload folder's and the checkpoint's pages so that the next forward reads
        storage, and measure what stayed cached (mapped pages cannot be dropped)."""

        def __call__(self, input_ids, scores):
            marks.append((time.perf_counter() - dropping[0], proc_read_bytes()))
            t0 = time.perf_counter()
            drop_page_cache(offload)
            drop_page_cache(path)
            kept.append(sum(page_cache_bytes(f) for f in files))
            dropping[0] += time.perf_counter() - t0
            return scores

    drop_page_cache(offload)
    drop_page_cache(path)
    with torch.no_grad():
        model.generate(torch.tensor([PROMPT]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([MarkAndDrop()]))
    n, seconds, (io,) = decode_window(marks)
    return {"tok_s": n / seconds, "steps": n, "read_per_token": io, "offloaded": offloaded, "weights_in_ram": ram,
            "weights_on_disk": on_disk, "load_buffer": largest, "max_memory": dense + budget,
            "cached_after_drop": sum(kept[1:]) / len(kept[1:])}


def engine_resident_run(path: Path, quant: str, tokens: int) -> dict:
    dtype = "float32" if quant == "none" else "bfloat16"  # the CPU int8/int4 kernels are vectorised for bf16
    engine = Engine.load(path, EngineOptions(expert_quant=quant, dtype=dtype, prefetch=0, context=256,
                                             progress=False))
    r = engine.generate(PROMPT, tokens)
    return {"tok_s": r.stats["decode_tokens_per_s"], "tokens": r.tokens, "format": engine.cache.fmt.name}


def llama_cpp_runs(path: Path, converter: Path, tokens: int, threads: int, tmp: Path) -> dict[str, dict]:
    """llama.cpp's all-CPU greedy decode of the checkpoint, per GGUF type: tokens/s and the tokens."""
    files = llama_cpp_peer.gguf_files(path, converter, threads, tmp)
    return {name: llama_cpp_peer.decode(file, PROMPT, tokens, threads) for name, file in files.items()}


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
    ap.add_argument("--tokens", type=int, default=12, help="tokens to generate; the figures are over the last "
                    "tokens - 2 decode steps (default: %(default)s)")
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
        mib = 2**20
        runs = {}
        for prefetch in (0, 1):  # prefetch also reads predicted experts from storage, wrong guesses included
            ours = runs[prefetch] = engine_run(packed, budget, args.tokens, prefetch)
            print(f"offload_moe (2 slots/layer {ours['slots'] / mib:.0f} MiB + RAM tier {ours['ram_tier'] / mib:.0f} "
                  f"MiB, prefetch {prefetch}): {ours['tok_s']:.2f} tok/s over {ours['steps']} decode steps, read "
                  f"{ours['io_read_per_token'] / mib:.1f} MiB/token from storage (/proc/self/io; the engine counted "
                  f"{ours['read_per_token'] / mib:.1f}), over those steps a device hit rate of "
                  f"{100 * ours['hit_rate']:.1f}% and a RAM tier hit rate of {100 * ours['ram_hit_rate']:.1f}%",
                  flush=True)
        theirs = accelerate_run(path, budget, args.tokens, Path(tmp) / "offload")
        if theirs is None:
            print("transformers not installed: pip install transformers accelerate to compare")
        else:
            print(f"transformers + accelerate disk offload: {theirs['tok_s']:.2f} tok/s over {theirs['steps']} decode "
                  f"steps, read {theirs['read_per_token'] / mib:.1f} MiB/token from storage (/proc/self/io); "
                  f"max_memory {theirs['max_memory'] / mib:.0f} MiB: weights in RAM "
                  f"{theirs['weights_in_ram'] / mib:.0f} MiB, on disk {theirs['weights_on_disk'] / mib:.0f} MiB "
                  f"(offload folder "
                  f"{theirs['offloaded'] / mib:.0f} MiB), load buffer kept free for the largest layer "
                  f"{theirs['load_buffer'] / mib:.0f} MiB; its files kept "
                  f"{theirs['cached_after_drop'] / mib:.0f} MiB in the page cache after each drop (memory-mapped: "
                  "RAM beyond max_memory)")
            for prefetch, ours in runs.items():
                speed = ours["tok_s"] / theirs["tok_s"]
                fewer = theirs["read_per_token"] / max(ours["io_read_per_token"], 1)
                print(f"offload_moe with prefetch {prefetch} against accelerate: {speed:.1f}x the speed, {fewer:.1f}x "
                      "fewer bytes read per token")
        if args.llama_cpp:
            print_cpu_reference(path, args.llama_cpp, max(args.tokens, 32), args.threads, Path(tmp))


if __name__ == "__main__":
    main()
