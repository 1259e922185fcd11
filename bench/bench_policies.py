"""Eviction policies on held-out routing: every policy x cache size x slot pool, against LRU and Belady.

    python bench/bench_policies.py [--model demo --model demo-fine] [--eval-tokens 20000] [--trace FILE ...]
                                   [--threads 2] [--routing decode|text] [--temperature 0.7]

For each trained demo (both by default) the held-out trace is made as bench_prediction.py makes it (`--routing`):
by default prompts of the files neither the model nor its predictor saw (tools/train_tiny_moe.py's split), each
continued by the model's own sampling, traced with hidden states; and the engine's default predictions (the
shipped learned predictor, top-k wide, one layer ahead) made from them. Each `--trace` is replayed as recorded.
Every trace is replayed

  * without prefetch, where Belady (per layer) is the optimum of any eviction rule, and
  * with the recorded predictions prefetched (prefetch 1: what the engine runs by default), where Belady under
    the same prefetches is the bound the table measures against (no longer an optimum),

at the simulator's default sizes (top-k, 1.5, 2 and 3 times top-k slots per layer), every online policy in
both pools (`layer`: each layer its own slots; `global`: their sum shared by every layer). Printed per trace
and prefetch: the hit rates, and the share of the per-layer LRU -> per-layer Belady gap each closes,
(hit - LRU) / (Belady - LRU), at each size and on average over the medium sizes (all but top-k, where
every rule is forced); `min vs LRU` is the worst difference from per-layer LRU over those sizes. Last, the
loop's cost per step of each policy (compiled where numba is installed, and as plain Python), on a slice of
the last trace and on a synthetic trace of Qwen3-30B-A3B's shape (bench_simulate.py's).

Legend: T tokens, L layers, K top-k, E experts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_prediction import add_routing_flags, routing_trace  # noqa: E402
from bench_simulate import synthetic_trace  # noqa: E402
from train_tiny_moe import corpus_files, split_corpus  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.offload.eviction import ONLINE_POLICIES, POOLS, SlotTable, jit_available  # noqa: E402
from offload_moe.offload.predictors import FILE_NAME, replayed  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.planning.replay import default_slots, simulate_many  # noqa: E402
from offload_moe.planning.trace import Trace, load_trace, slice_trace  # noqa: E402


def held_out(model: str, tokens: int, threads: int, routing: str, temperature: float) -> Trace:
    """The demo's held-out routing (`routing_trace`) with the engine's default predictions (its folder's learned
    predictor)."""
    folder = resolve_model(model)
    engine = Engine.load(folder, EngineOptions(prefetch=0, dtype="float32", progress=False, threads=threads))
    _, held = split_corpus(corpus_files())
    trace = routing_trace(engine, held, tokens, routing, temperature)
    return replayed(trace, str(folder / FILE_NAME), engine.config.top_k)


def table(name: str, trace: Trace, prefetch: int) -> dict:
    """Print one trace's table at one prefetch setting; return {(policy, pool): mean gap closed at medium sizes}."""
    sizes = default_slots(trace.top_k, trace.num_experts)
    runs = {(p, pool): [r["hit_rate"] for r in simulate_many(trace, sizes, p, prefetch, pool=pool)]
            for pool in POOLS for p in (*ONLINE_POLICIES, "belady")}
    lru, bound = np.array(runs["lru", "layer"]), np.array(runs["belady", "layer"])
    medium = [i for i, s in enumerate(sizes) if s > trace.top_k and bound[i] > lru[i]]
    bound_name = "the optimum" if not prefetch else "Belady under the same prefetches, not an optimum"
    print(f"\n{name}: {trace.num_tokens:,} tokens x {trace.num_layers} layers, {trace.num_experts} experts, "
          f"top-{trace.top_k}; prefetch {prefetch}; gap: per-layer LRU -> per-layer Belady ({bound_name})")
    print(f"{'policy':>12} {'pool':>6}" + "".join(f"{s:>8}" for s in sizes) + "   gap closed at"
          + "".join(f"{sizes[i]:>7}" for i in medium) + f"{'mean':>8}{'min vs LRU':>12}")
    means = {}
    for (policy, pool), rates in runs.items():
        r = np.array(rates)
        gaps = [(r[i] - lru[i]) / (bound[i] - lru[i]) for i in medium]
        worst = min((r[i] - lru[i] for i in medium), default=0.0)
        means[policy, pool] = float(np.mean(gaps)) if gaps else 0.0
        print(f"{policy:>12} {pool:>6}" + "".join(f"{100 * x:>7.1f}%" for x in r) + " " * 15
              + "".join(f"{100 * g:>6.1f}%" for g in gaps) + f"{100 * means[policy, pool]:>7.1f}%"
              + f"{100 * worst:>+11.1f}%")
    return means


def loop_cost(name: str, trace: Trace, tokens: int, size: int) -> None:
    """Microseconds per step (one token at one layer) of each policy, per-layer caches of `size` slots and one
    global pool of their sum, prefetch on: compiled (where numba is) and plain Python, on the first `tokens`."""
    cut = slice_trace(trace, 0, min(tokens, trace.num_tokens))
    modes = ["1", "0"] if jit_available() else ["0"]
    print(f"\nthe loop's cost per step, {name} (us; {cut.num_tokens} tokens x {cut.num_layers} layers, "
          f"{cut.num_experts} experts, top-{cut.top_k}, {size} slots per layer, prefetch 1; compiled, then plain "
          "Python)")
    print(f"{'policy':>12}" + "".join(f"{pool + (' jit' if m == '1' else ' py'):>14}" for m in modes for pool in POOLS))
    was = os.environ.get("OFFLOAD_MOE_JIT")
    try:
        for policy in ONLINE_POLICIES:
            cells = []
            for mode in modes:
                os.environ["OFFLOAD_MOE_JIT"] = mode
                assert SlotTable([1], 1).compiled == (mode == "1")
                for pool in POOLS:
                    simulate_many(slice_trace(cut, 0, 4), [size], policy, 1, pool=pool)  # compiled outside
                    t0 = time.perf_counter()
                    simulate_many(cut, [size], policy, 1, pool=pool)
                    cells.append(1e6 * (time.perf_counter() - t0) / (cut.num_tokens * cut.num_layers))
            print(f"{policy:>12}" + "".join(f"{c:>14.2f}" for c in cells))
    finally:
        if was is None:
            os.environ.pop("OFFLOAD_MOE_JIT", None)
        else:
            os.environ["OFFLOAD_MOE_JIT"] = was


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="demo, demo-fine (default: both) or a trained Mixtral-layout "
                    "folder with a predictor.safetensors")
    ap.add_argument("--trace", action="append", default=[], help="a recorded trace to replay as well (repeatable)")
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens per demo (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    add_routing_flags(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"# {time.strftime('%Y-%m-%d')}, bench_policies: numba {'on' if jit_available() else 'off'}")
    traces = [(m, held_out(m, args.eval_tokens, args.threads, args.routing, args.temperature))
              for m in (args.model or ["demo", "demo-fine"])]
    traces += [(path, load_trace(path)) for path in args.trace]
    summary: dict[tuple[str, str], list[float]] = {}
    for name, trace in traces:
        for prefetch in (0, 1) if (trace.predicted >= 0).any() else (0,):
            for key, gap in table(name, trace, prefetch).items():
                summary.setdefault((key, prefetch), []).append(gap)
    for prefetch in (0, 1):
        rows = sorted(((np.mean(g), k) for (k, p), g in summary.items() if p == prefetch and k[0] != "belady"),
                      reverse=True)
        if rows:
            print(f"\nmean gap closed at medium sizes over the traces, prefetch {prefetch}, best online first: "
                  + ", ".join(f"{policy} ({pool}) {100 * g:.1f}%" for g, (policy, pool) in rows[:6]))
    loop_cost(traces[-1][0], traces[-1][1], 2000, 2 * traces[-1][1].top_k)
    # Qwen3-30B-A3B's shape (48 layers, top-8 of 128, 32 slots): a pool of 1,536 slots
    loop_cost("synthetic, Qwen3-30B-A3B's shape", synthetic_trace(200, 48, 128, 8), 200, 32)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
