"""Time `simulate` as a user runs it: the CLI, Python start-up included, all five policies, on two
synthetic 100,000-token traces written in the trace format (`trace.py`):

  mixtral  32 layers, 8 experts, top-2, 4 slots per layer
  qwen3    48 layers, 128 experts, top-8, 32 slots per layer (Qwen3-30B-A3B's shape)

Routing has skew and locality, as trained routers do: each layer favours its own experts (expert
popularity falls as 1 / rank^0.8, ranks shuffled per layer), and each of a token's ranks keeps the
previous token's expert with probability 0.3, else draws a fresh one from that popularity. The
prediction for layer l is the true choice with probability 0.7, else a fresh draw, so prefetch has
something to get right.

It prints the load average (other work on the machine stretches wall time, not CPU time), the
start-up alone (`simulate --help`), and per trace: the CLI's wall and CPU seconds (all threads)
for all five policies, each of --repeat runs; then, in this process, each policy's hit rate and
seconds (`simulate.simulate`, after one call that compiles or loads the compiled replay loop) and
LRU with prefetch 1.

    python bench/bench_simulate.py [--tokens N] [--repeat 3] [--shape mixtral,qwen3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload_moe.offload.eviction import POLICIES  # noqa: E402
from offload_moe.planning.replay import simulate  # noqa: E402
from offload_moe.planning.trace import Trace, load_trace, save_trace  # noqa: E402

SHAPES = {"mixtral": (32, 8, 2, 4), "qwen3": (48, 128, 8, 32)}  # layers, experts, top-k, slots


def skewed_draws(rng: np.random.Generator, tokens: int, popularity: np.ndarray, k: int) -> np.ndarray:
    """k distinct experts per token and layer, [T, L, K], each drawn from its layer's popularity
    [L, E]; a rank that repeats an earlier rank of its token is drawn again until none does."""
    L, E = popularity.shape
    cdf = np.cumsum(popularity, axis=1)  # [L, E]
    cdf /= cdf[:, -1:]
    flat = (cdf + np.arange(L)[:, None]).reshape(-1)  # [L*E]: layer l's cdf shifted to [l, l + 1]

    def draw(u: np.ndarray, layer: np.ndarray) -> np.ndarray:  # uniforms -> expert ids, same shape
        return np.minimum(np.searchsorted(flat, u + layer, side="right"), L * E - 1) - layer * E

    out = draw(rng.random((tokens, L, k)), np.arange(L)[None, :, None]).reshape(-1, k)  # [T*L, K]
    layer = np.tile(np.arange(L), tokens)  # [T*L]
    rows = np.arange(tokens * L)  # the token-layers still to check
    while len(rows):
        part = out[rows]  # [R, K]
        dup = np.zeros(part.shape, bool)  # [R, K]: the rank repeats an earlier one
        for j in range(1, k):
            dup[:, j] = (part[:, j : j + 1] == part[:, :j]).any(-1)
        part[dup] = draw(rng.random(int(dup.sum())), np.broadcast_to(layer[rows, None], part.shape)[dup])
        out[rows] = part
        rows = rows[dup.any(-1)]
    return out.reshape(tokens, L, k)  # [T*L, K] -> [T, L, K]


def synthetic_trace(tokens: int, layers: int, experts: int, top_k: int, keep: float = 0.3, skew: float = 0.8,
                    seed: int = 0) -> Trace:
    """A Markov chain per layer and rank over skewed fresh draws (see the module docstring). Where two
    ranks of one token then name the same expert, that token-layer takes its fresh draw whole."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** skew  # [E]
    popularity = np.stack([rng.permutation(popularity) for _ in range(layers)])  # [L, E]
    fresh = skewed_draws(rng, tokens, popularity, top_k)  # [T, L, K]
    redraw = rng.random((tokens, layers, top_k)) >= keep  # [T, L, K]
    redraw[0] = True
    # the token whose fresh draw each chain still carries: the last redraw at or before t
    source = np.maximum.accumulate(np.where(redraw, np.arange(tokens)[:, None, None], 0), axis=0)  # [T, L, K]
    chosen = np.take_along_axis(fresh, source, axis=0)  # [T, L, K]
    ranked = np.sort(chosen, axis=-1)  # [T, L, K]
    dup = (ranked[..., 1:] == ranked[..., :-1]).any(-1)  # [T, L]
    chosen[dup] = fresh[dup]
    predicted = np.where(rng.random((tokens, layers, 1)) < 0.7, chosen,
                         skewed_draws(rng, tokens, popularity, top_k))  # [T, L, K]
    predicted[:, 0] = -1
    weights = rng.standard_exponential((tokens, layers, top_k), np.float32)  # [T, L, K]: a flat Dirichlet
    weights /= weights.sum(-1, keepdims=True)
    return Trace(chosen.astype(np.int32), weights, predicted.astype(np.int32), experts, top_k, layers,
                 "synthetic")


def wall(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command: its wall seconds, its CPU seconds (user + system, all threads) and its stdout."""
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="CLI runs per trace; the best is shown (default 3)")
    ap.add_argument("--shape", default="mixtral,qwen3", help="traces to run: mixtral, qwen3 or both")
    ap.add_argument("--dir", help="where the traces are written, and reused when present (default: a temporary "
                    "folder)")
    args = ap.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_simulate."))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a busy machine stretches wall time, "
          "not CPU time)")
    start = min(wall([sys.executable, "run.py", "simulate", "--help"])[:2] for _ in range(args.repeat))
    print(f"CLI start-up (simulate --help), best of {args.repeat}: {start[0]:.2f} s wall, {start[1]:.2f} s CPU")
    for name in args.shape.split(","):
        L, E, K, S = SHAPES[name]
        path = folder / f"{name}-{args.tokens}.trace"
        if not path.exists():
            t0 = time.perf_counter()
            save_trace(path, synthetic_trace(args.tokens, L, E, K))
            print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
        cmd = [sys.executable, "run.py", "simulate", "--trace", str(path), "--slots", str(S),
               "--policy", ",".join(POLICIES), "--json"]
        runs = [wall(cmd) for _ in range(args.repeat)]
        rates = {r["policy"]: r["hit_rate"] for r in json.loads(runs[0][2])["results"]}
        print(f"\n{name}: {args.tokens} tokens x {L} layers, {E} experts, top-{K}, {S} slots")
        print(f"  CLI, all {len(POLICIES)} policies: " + ", ".join(f"{t:.2f}" for t, _, _ in runs)
              + f" s wall (best {min(t for t, _, _ in runs):.2f}); " + ", ".join(f"{c:.2f}" for _, c, _ in runs)
              + f" s CPU; load average {os.getloadavg()[0]:.1f}")
        trace = load_trace(path)
        simulate(trace, S, "lru")  # compiles the replay loop, or loads it from the cache
        print(f"  {'policy':<8}{'prefetch':>9}{'hit rate':>10}{'copies/token':>14}{'wall s':>8}{'CPU s':>7}"
              "  (in this process)")
        for policy, prefetch in [(p, 0) for p in POLICIES] + [("lru", 1)]:
            t0, c0 = time.perf_counter(), time.process_time()
            r = simulate(trace, S, policy, prefetch=prefetch)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            if not prefetch:
                assert r["hit_rate"] == rates[policy], "the CLI and this process disagree"
            print(f"  {policy:<8}{prefetch:>9}{100 * r['hit_rate']:>9.2f}%{r['copies'] / args.tokens:>14.2f}"
                  f"{secs:>8.2f}{cpu:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
