"""DeepSeek-V2 on the engine: decode speed of a DeepSeek-V2-shaped random model against transformers, all
resident and offloaded, at a short and a long context; and the latent KV cache's size.

    python bench/bench_deepseek.py [--tokens 32] [--long 1024] [--threads 2] [--repeats 3]

Shape (a small DeepSeek-V2-Lite): hidden 512, 8 layers (the first dense, FFN 1024), 64 routed experts of
FFN 256, top-6, 2 shared; multi-head latent attention with 8 heads, q straight from x, kv_lora_rank 128,
qk_nope 64, qk_rope 32, v 64, YaRN (factor 4, mscale 0.707); vocab 32000, float32. Written by transformers'
own DeepseekV2ForCausalLM (random weights), read by both. Prints decode tokens/s (best of --repeats, greedy)
for the engine with every expert resident and with 16 of 64 cached per layer (prefetch 1), and for
transformers, after an 8-token prompt and after a --long-token one. The engine decodes in MLA's absorbed
form over the cached latents; transformers expands every cached latent to per-head keys and values at
each step, so the gap grows with the context.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_reference import decode_table, print_decode_table, prompt_bench_args, write_random_model  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
             num_attention_heads=8, kv_lora_rank=128, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32,
             v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
             topk_method="greedy", norm_topk_prob=False, vocab_size=32000, max_position_embeddings=4096,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                              "mscale_all_dim": 0.707, "original_max_position_embeddings": 1024})
ROWS = {  # label: engine options
    "all 64 experts resident": dict(prefetch=0),
    "16 of 64 cached, prefetch 1": dict(cache_experts=16, prefetch=1),
}



def main() -> None:
    args, prompts = prompt_bench_args(__doc__.splitlines()[0])
    context = args.long + args.tokens + 8
    config = {}

    def note(engine, rates) -> str:
        config["c"] = engine.config
        return f"hit rate {100 * rates['long'][1]['hit_rate']:.0f}%"

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_model(Path(tmp) / "deepseek-v2-shaped", "DeepseekV2", SHAPE)
        print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads, {args.tokens} "
              f"tokens greedy, DeepSeek-V2 shape D=512 L=8 E=64 I=256 K=6, MLA H=8 R=128, float32")
        rows = decode_table(path, ROWS, prompts, args, context, "DeepseekV2ForCausalLM", note)
    print_decode_table(rows, args.long)
    c = config["c"]
    latent = c.kv_bytes(1, 2)
    full = c.n_layers * c.n_heads * (c.head_dim + c.v_head_dim) * 2
    print(f"KV cache per token in fp16: {latent} B of latents ({c.kv_lora_rank} + {c.qk_rope_head_dim} per layer) "
          f"against {full} B of per-head keys and values ({full / latent:.1f}x)")


if __name__ == "__main__":
    main()
