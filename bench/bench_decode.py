"""CPU decode speed: this engine (all experts resident, and 2 of 8 cached) against transformers,
and the engine with fp32, int8 and int4 experts.

    python bench/bench_decode.py [--tokens 48] [--threads 2] [--repeats 3] [--no-quant]

Same random-weight Mixtral for both (hidden 512, FFN 1792, 8 layers, 8 experts, top-2,
vocab 32000, float32: the shape of the plain-PyTorch and llama.cpp CPU figures that BENCHMARKS.md
quotes with their source), greedy, one prompt. Prints decode tokens/s (best of --repeats; for both
systems over the decode steps after the first, as the engine's stats count them: the first step's
one-time work is left out) and the two ratios that the core issue sets as targets:
all-resident / transformers >= 1 and 2-of-8-cached / all-resident >= 0.5. Then, per expert
precision (fp32, int8, int4 with groups of 64; compute in bfloat16 for the quantized ones, where
torch's CPU kernels are vectorized), decode tokens/s with all experts cached and with 2 of 8,
and the bytes copied to the device per token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_reference import transformers_decode_rate  # noqa: E402

from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.demo import write_random_checkpoint  # noqa: E402
from offload_moe.engine import Engine
from offload_moe.options import EngineOptions  # noqa: E402

SHAPE = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1792, num_experts=8, top_k=2,
                    vocab_size=32000, max_context=4096)
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28740]


def engine_rate(path: Path, tokens: int, repeats: int, **options) -> tuple[float, dict]:
    engine = Engine.load(path, EngineOptions(**options, context=256, progress=False))
    best, stats = 0.0, {}
    for _ in range(repeats):
        result = engine.generate(PROMPT, tokens)
        if result.stats["decode_tokens_per_s"] > best:
            best, stats = result.stats["decode_tokens_per_s"], result.stats
    return best, stats


def transformers_rate(path: Path, tokens: int, repeats: int) -> float | None:
    try:
        from transformers import MixtralForCausalLM
    except ImportError:
        return None
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return transformers_decode_rate(model, PROMPT, tokens, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-quant", action="store_true", help="skip the expert-precision table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "bench", SHAPE, dtype=torch.float32)
        print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads, "
              f"{args.tokens} tokens greedy, shape D={SHAPE.dim} I={SHAPE.ffn_dim} L={SHAPE.n_layers} "
              f"E={SHAPE.num_experts} K={SHAPE.top_k} V={SHAPE.vocab_size}, float32")
        resident, _ = engine_rate(path, args.tokens, args.repeats, prefetch=0)
        cached, stats = engine_rate(path, args.tokens, args.repeats, cache_experts=2, prefetch=1)
        cached0, stats0 = engine_rate(path, args.tokens, args.repeats, cache_experts=2, prefetch=0)
        reference = transformers_rate(path, args.tokens, args.repeats)
    print(f"{'engine':<42} {'decode tok/s':>12}")
    print(f"{'offload_moe, all experts resident':<42} {resident:12.1f}")
    print(f"{'offload_moe, 2 of 8 cached, prefetch 1':<42} {cached:12.1f}   hit rate {100 * stats['hit_rate']:.1f}%, "
          f"{stats['bytes_to_device'] / stats['generated_tokens'] / 2**20:.1f} MiB copied per token")
    print(f"{'offload_moe, 2 of 8 cached, prefetch 0':<42} {cached0:12.1f}   hit rate {100 * stats0['hit_rate']:.1f}%")
    if reference is not None:
        print(f"{'transformers, all resident':<42} {reference:12.1f}")
        print(f"ratio all-resident / transformers: {resident / reference:.2f} (target >= 1)")
    else:
        print("transformers not installed: pip install transformers to compare")
    print(f"ratio 2-of-8 cached / all-resident: {cached / resident:.2f} (target >= 0.5)")
    if args.no_quant:
        return
    print(f"\n{'experts':<10} {'compute':<9} {'bytes/expert':>13} {'all cached':>11} {'2 of 8':>8} "
          f"{'hit rate':>9} {'MiB copied/token':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "bench", SHAPE, dtype=torch.float32)
        for quant, dtype in (("none", "float32"), ("int8", "bfloat16"), ("int4", "bfloat16"), ("int4", "float32")):
            opts = {"expert_quant": quant, "group_size": 64, "dtype": dtype}
            full, fs = engine_rate(path, args.tokens, args.repeats, prefetch=0, **opts)
            two, ts = engine_rate(path, args.tokens, args.repeats, cache_experts=2, prefetch=0, **opts)
            moved = ts["bytes_to_device"] / max(ts["generated_tokens"], 1) / 2**20
            print(f"{quant:<10} {dtype:<9} {fs['bytes_per_expert'] / 2**20:10.2f} MiB {full:11.1f} {two:8.1f} "
                  f"{100 * ts['hit_rate']:8.1f}% {moved:17.2f}")


if __name__ == "__main__":
    main()
