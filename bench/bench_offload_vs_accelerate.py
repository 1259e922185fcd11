"""Experts four times the RAM budget, on the CPU: this engine (RAM tier over storage, prefetch)
against transformers + accelerate's disk offload (device_map="auto", max_memory, offload_folder).

    python bench/bench_offload_vs_accelerate.py [--tokens 8] [--threads 2]

The checkpoint: a random Mixtral shape (hidden 512, FFN 1792, 8 layers, 16 experts, top-2,
float32) whose experts take 1.3 GiB. Both systems get the same RAM for expert weights, a quarter
of that: the engine as 2 cache slots per layer plus a RAM tier (`--ram-budget`), accelerate as
`max_memory` beyond the dense weights. The page cache is kept out of both: the engine reads its
packed folder with O_DIRECT (or drops pages with posix_fadvise DONTNEED); for accelerate, a
logits processor drops the offload folder's pages (posix_fadvise DONTNEED on every file) before
each token, so its disk reads are real reads too. Prints decode tokens/s and bytes read from
storage per token.
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

from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.demo import write_random_checkpoint  # noqa: E402
from offload_moe.engine import Engine, EngineOptions  # noqa: E402
from offload_moe.expert_store import DenseFormat  # noqa: E402
from offload_moe.packed import convert  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
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
            return
        print(f"transformers + accelerate disk offload: {theirs['tok_s']:.2f} tok/s, read "
              f"{theirs['read_per_token'] / 2**20:.1f} MiB/token ({theirs['offloaded'] / 2**20:.0f} MiB offloaded)")
        print(f"speed-up: {ours['tok_s'] / theirs['tok_s']:.1f}x")


if __name__ == "__main__":
    main()
