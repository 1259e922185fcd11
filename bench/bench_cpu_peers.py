"""CPU expert compute against its peers: this engine with every expert resident (fp32, int8, int4) against
llama.cpp (f32, q8_0, q4_0) and transformers (fp32), on random Mixtral-layout checkpoints, all on the CPU.

    python bench/bench_cpu_peers.py [--llama-cpp CONVERTER] [--threads 2] [--tokens 48] [--repeats 3]
                                    [--shapes small,wide] [--prompt 256] [--files DIR]

Shapes: "small" (hidden 512, FFN 1792, 8 layers, 8 experts, top-2, vocab 32000) and "wide", bandwidth-bound (hidden
2048, FFN 5632, 4 layers, 8 experts, top-2: 4.4 GiB of fp32 experts). Per shape and precision both sides are loaded
in this one process and raced in `--repeats` rounds, each round a decode by each side, then a prompt by each
(`race`: this VM's memory bandwidth drifts by tens of percent, and a drift then falls on both), and each side's
best decode tok/s is kept (over the steps after the first, greedy, the same prompt). Beside each figure: the weight
bytes one decode step reads (every resident weight but the embeddings, K of E experts per layer; llama.cpp's from
its GGUF's tensors) and the GB/s that makes at that speed. Beside int8/int4 experts our attention projections and
LM head are int8 too (`--attention-quant`, `--head-quant`), as llama.cpp's q8_0/q4_0 files quantize their attention
and output matrix (q8_0; q6_K for the output in q4_0 files). With llama.cpp, a second table runs both sides on
llama.cpp's own q8_0, q4_0 and q4_k_m files: ours reads the GGUF file itself, its experts kept in the file's types
(`gguf-*`), its other tensors decoded to float32, then the attention and head int8 as above. llama.cpp is optional
(`llama_cpp_peer.INSTALL` says how); never run in CI.

Prefill: a `--prompt`-token prompt (256 by default, random ids), best of the rounds, tokens/s from an empty cache,
ours with `engine.generate(prompt, 1)`'s prefill time (the last position's logits only), llama.cpp's `eval` in one
batch. The header gives the CPU's vector instruction sets, the kernels' build (`cpu_kernels.isa()`: set
OFFLOAD_MOE_ISA=avx2 to run the AVX2 build on an AVX-512 machine) and this machine's copy bandwidth (one thread,
a 256 MiB fp32 copy: the ceiling decode's GB/s compare with).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.formats import cpu_kernels  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402

SHAPES = {
    "small": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1792, num_experts=8,
                         top_k=2, vocab_size=32000, max_context=4096),
    "wide": ModelConfig(dim=2048, n_layers=4, n_heads=16, n_kv_heads=4, head_dim=128, ffn_dim=5632, num_experts=8,
                        top_k=2, vocab_size=32000, max_context=4096),
}
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28740]
PAIRS = (("none", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))  # our expert format, llama.cpp's GGUF type
# before each run: the other side's idle threads (OpenMP's, ggml's pool) spin a while after their work; not on ours
PAUSE_S = 0.3
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512vbmi", "avx512_bf16", "amx_tile")


def machine() -> str:
    """The CPU's vector instruction sets, the kernels' build and one thread's copy bandwidth."""
    have = set(cpu_kernels._cpu_flags().split())
    src, dst = torch.ones(64 << 20), torch.empty(64 << 20)  # 256 MiB each
    with torch_threads(1):
        best = min(timed(lambda: dst.copy_(src)) for _ in range(5))
    return (f"CPU flags: {' '.join(f for f in FLAGS if f in have) or 'none of ' + ' '.join(FLAGS)}; kernels: "
            f"{cpu_kernels.isa()}; copy {2 * src.nbytes / best / 1e9:.1f} GB/s (read + write, one thread)")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class Ours:
    """This engine, every expert resident, float32 compute, loaded once: decodes and prompts in turn with llama.cpp."""

    def __init__(self, path: Path, quant: str, args, attention: str = "none", head: str = "none"):
        self.engine = engine = Engine.load(path, EngineOptions(
            expert_quant=quant, attention_quant=attention, head_quant=head, dtype="float32", prefetch=0,
            context=args.prompt + 64, progress=False, threads=args.threads))
        c, fmt = engine.config, engine.cache.fmt
        weights = (*engine.model.named_parameters(), *engine.model.named_buffers())  # int8 layers hold buffers
        dense = sum(p.numel() * p.element_size() for n, p in weights if "tok_embeddings" not in n)
        self.read = dense + len(c.moe_layers) * c.top_k * fmt.nbytes
        int8 = [what for what, q in (("attention", attention), ("head", head)) if q == "int8"]
        self.name = fmt.name + (f" + int8 {' and '.join(int8)}" if int8 else "")

    def decode(self, prompt: list[int], tokens: int) -> dict:
        r = self.engine.generate(prompt, tokens)
        return {"tok_s": r.stats["decode_tokens_per_s"], "tokens": r.tokens}

    def prefill(self, prompt: list[int]) -> float:
        return self.engine.generate(prompt, 1).stats["prefill_tokens_per_s"]


def race(sides: list, args) -> list[dict]:
    """Each side's best decode and prefill tok/s over `repeats` rounds, the sides alternating within each round, so
    that a change in the machine's speed (its memory bandwidth varies by tens of percent on this VM) falls on both."""
    best = [{"tok_s": 0.0, "prefill": 0.0, "tokens": []} for _ in sides]
    prompt = long_prompt(args.prompt)
    for _ in range(args.repeats):
        for side, b in zip(sides, best, strict=True):
            time.sleep(PAUSE_S)
            r = side.decode(PROMPT, args.tokens)
            if r["tok_s"] > b["tok_s"]:
                b |= r
        for side, b in zip(sides, best, strict=True):
            time.sleep(PAUSE_S)
            b["prefill"] = max(b["prefill"], side.prefill(prompt))
    return best


def measure(path: Path, quant: str, args, attention: str, head: str, file: Path | None, config: ModelConfig
            ) -> tuple[dict, dict | None]:
    """Ours (and llama.cpp's on `file`), raced: their figures, with the bytes a decode step reads."""
    a = Ours(path, quant, args, attention, head)
    sides = [a] if file is None else [a, llama_cpp_peer.Peer(file, args.threads, args.prompt + 64)]
    results = race(sides, args)
    ours, theirs = results[0] | {"name": a.name, "read": a.read}, None
    if file is not None:
        theirs = results[1] | {"read": llama_cpp_peer.bytes_per_token(file, config.top_k, config.num_experts)}
    del sides, a
    gc.collect()
    return ours, theirs


def long_prompt(n: int) -> list[int]:
    """The prefill prompt: BOS, then n - 1 ids drawn once (the same on both sides)."""
    return [1, *torch.randint(3, 32000, (n - 1,), generator=torch.Generator().manual_seed(0)).tolist()]


def transformers_fp32(path: Path, tokens: int, repeats: int) -> float | None:
    """transformers' MixtralForCausalLM in float32, greedy: best decode tok/s (a logits processor stamps each step)."""
    try:
        from transformers import LogitsProcessor, LogitsProcessorList, MixtralForCausalLM
    except ImportError:
        return None
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    best = 0.0
    for _ in range(repeats):
        stamps.clear()
        with torch.no_grad():
            model.generate(torch.tensor([PROMPT]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([Stamp()]))
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return best


def gbs(r: dict) -> str:
    return f"{r['tok_s']:7.1f} tok/s {r['read'] / 2**20:6.0f} MiB/token {r['read'] * r['tok_s'] / 1e9:5.1f} GB/s"


def row(a: dict, b: dict | None) -> str:
    """One table row's cells: decode (with bytes and GB/s) and prefill tok/s, each side and the ratio."""
    if b is None:
        return f"{gbs(a)} | - | - | {a['prefill']:7.1f} | - | -"
    return (f"{gbs(a)} | {gbs(b)} | {a['tok_s'] / b['tok_s']:.2f} | {a['prefill']:7.1f} | {b['prefill']:7.1f} | "
            f"{a['prefill'] / b['prefill']:.2f}")


def run_shape(name: str, config: ModelConfig, args, tmp: Path) -> None:
    print(f"\n## {name}: hidden {config.dim}, FFN {config.ffn_dim}, {config.n_layers} layers, {config.num_experts} "
          f"experts, top-{config.top_k}, vocab {config.vocab_size}", flush=True)
    path = tmp / name / "hf"
    if not (path / "config.json").exists():  # --files keeps them between runs
        path = write_random_checkpoint(path, config, dtype=torch.float32, layers_per_shard=1)
    files = {}
    if args.llama_cpp and llama_cpp_peer.available():
        files = llama_cpp_peer.gguf_files(path, args.llama_cpp, args.threads, tmp / name)
    else:
        print(llama_cpp_peer.INSTALL)
    print("| weights | offload_moe decode | llama.cpp decode | ratio | prefill ours | llama.cpp | ratio |\n"
          "|---|---|---|---|---|---|---|")
    f32_tokens = {}
    for quant, gguf_type in PAIRS:
        attention = args.attention_quant if quant != "none" else "none"  # llama.cpp quantizes its attention too
        head = args.head_quant if quant != "none" else "none"  # and its output matrix
        a, b = measure(path, quant, args, attention, head, files.get(gguf_type), config)
        if quant == "none":
            f32_tokens = {"ours": a["tokens"], "theirs": b and b["tokens"]}
            fp32 = a["tok_s"]
        print(f"| {gguf_type} / {a['name']} | {row(a, b)} |", flush=True)
    if files:
        same = f32_tokens["ours"] == f32_tokens["theirs"]
        print(f"f32 greedy tokens {'agree' if same else 'differ'} between offload_moe and llama.cpp")
        print("\nllama.cpp's own GGUF files, read by both (ours: experts in the file's types, the other tensors "
              "decoded to float32, then the attention and head int8 as above)")
        print("| file | offload_moe decode | llama.cpp decode | ratio | prefill ours | llama.cpp | ratio |\n"
              "|---|---|---|---|---|---|---|")
        for gguf_type in ("q8_0", "q4_0", "q4_k_m"):
            a, b = measure(files[gguf_type], "none", args, args.attention_quant, args.head_quant, files[gguf_type],
                           config)
            print(f"| {gguf_type} / {a['name']} | {row(a, b)} |", flush=True)
    if name in args.transformers:
        hf = transformers_fp32(path, args.tokens, args.repeats)
        if hf is None:
            print("transformers not installed: pip install transformers to compare")
        else:
            print(f"transformers fp32: {hf:.1f} tok/s; offload_moe fp32 is {fp32 / hf:.2f}x that")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, metavar="CONVERTER",
                    help="convert_hf_to_gguf.py from llama-cpp-python's sdist (vendor/llama.cpp/)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and precision; the best is kept")
    ap.add_argument("--prompt", type=int, default=256, help="the prefill prompt's tokens")
    ap.add_argument("--files", type=Path, help="keep the random checkpoints and GGUF files here and reuse them "
                    "(default: a temporary folder)")
    ap.add_argument("--shapes", default="small,wide", help="comma-separated, of: " + ", ".join(SHAPES))
    ap.add_argument("--attention-quant", default="int8", choices=("none", "int8"),
                    help="our attention projections beside int8/int4 experts (default: %(default)s, as q8_0/q4_0 "
                    "quantize llama.cpp's)")
    ap.add_argument("--head-quant", default="int8", choices=("none", "int8"),
                    help="our LM head beside int8/int4 experts (default: %(default)s, as q8_0/q4_0 quantize "
                    "llama.cpp's output matrix)")
    ap.add_argument("--transformers", default="small", help="shapes where transformers fp32 runs too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads, {args.tokens} tokens "
          f"greedy, best of {args.repeats}, decode tok/s; prefill of {args.prompt} tokens")
    print(machine())
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on the project's disk, not a tmpfs
        for name in args.shapes.split(","):
            run_shape(name, SHAPES[name], args, args.files or Path(tmp))


if __name__ == "__main__":
    main()
