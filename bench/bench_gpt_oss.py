"""gpt-oss on the engine: decode speed of a gpt-oss-shaped random model against transformers, all resident and
offloaded, in float32 and with MXFP4 experts, after a short and a long prompt.

    python bench/bench_gpt_oss.py [--tokens 32] [--long 1024] [--threads 2] [--repeats 3]

Shape (a small gpt-oss-20b): hidden 512, 8 layers alternating sliding-window (128) and full attention, 8 heads
/ 2 kv heads of 64 dims with sinks and biases, 32 experts of FFN 512 (with biases, clamped SwiGLU), top-4,
YaRN, vocab 32000, float32. Written by transformers' own GptOssForCausalLM (random weights), read by both. The
MXFP4 rows quantize the experts at load (`--expert-quant mxfp4`: the format an official checkpoint's experts
are kept in). Prints decode tokens/s (best of --repeats, greedy) for the engine with every expert resident and
with 8 of 32 cached per layer (prefetch 1), and for transformers (its default attention), after
an 8-token prompt and after a --long-token one; and the KV cache the engine holds at the long context (the
sliding layers keep 128 positions).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_reference import decode_table, print_decode_table, prompt_bench_args, write_random_model  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
             vocab_size=32000, max_position_embeddings=4096,
             rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128})
ROWS = {  # label: engine options
    "float32, all 32 experts resident": dict(prefetch=0),
    "float32, 8 of 32 cached, prefetch 1": dict(cache_experts=8, prefetch=1),
    "mxfp4, all 32 experts resident": dict(prefetch=0, expert_quant="mxfp4"),
    "mxfp4, 8 of 32 cached, prefetch 1": dict(cache_experts=8, prefetch=1, expert_quant="mxfp4"),
    "int4, all 32 experts resident": dict(prefetch=0, expert_quant="int4"),
}



def main() -> None:
    args, prompts = prompt_bench_args(__doc__.splitlines()[0])
    context = args.long + args.tokens + 8
    held: dict[str, int] = {}  # the KV cache's bytes, from the engines

    def note(engine, rates) -> str:
        held["kv"] = engine.kv.nbytes
        return (f"hit rate {100 * rates['long'][1]['hit_rate']:.0f}%, {engine.cache.fmt.nbytes / 2**20:.2f} MiB "
                "per expert")

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_model(Path(tmp) / "gpt-oss-shaped", "GptOss", SHAPE)
        print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads, {args.tokens} "
              f"tokens greedy, gpt-oss shape D=I=512 L=8 (4 sliding) E=32 K=4, float32 compute")
        rows = decode_table(path, ROWS, prompts, args, context, "GptOssForCausalLM", note)
    print_decode_table(rows, args.long)
    kv = held["kv"]
    full = 2 * 8 * 2 * 64 * 4 * context  # every layer's k and v for the whole context, float32
    print(f"KV cache at a {context}-token context: {kv / 2**20:.1f} MiB (the 4 sliding layers hold 128 positions; "
          f"{full / 2**20:.1f} MiB if every layer held the whole context)")


if __name__ == "__main__":
    main()
