"""Time the trace simulator on a Mixtral-sized synthetic trace: 100,000 tokens, 32 layers,
8 experts, top-2, every policy at 4 slots per layer (and LRU with prefetch 1).

Routing has some locality, as real routers do: per layer, each of a token's ranks keeps the
previous token's expert with probability 0.3, else draws a fresh one. The prediction for layer l
is the true choice with probability 0.7, else a random one, so prefetch has something to get right.

    python bench/bench_simulate.py [--tokens N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload_moe.policy import POLICIES  # noqa: E402
from offload_moe.simulate import simulate  # noqa: E402
from offload_moe.trace import Trace  # noqa: E402


def random_distinct(rng: np.random.Generator, shape: tuple[int, ...], num_experts: int, k: int) -> np.ndarray:
    """k distinct uniform experts per entry, [*shape, k]: draw rank j among the num_experts - j
    experts left, then step over the ones already taken (in ascending order), so no sort of E."""
    out = np.empty((*shape, k), np.int64)
    for j in range(k):
        x = rng.integers(0, num_experts - j, size=shape)
        for taken in np.sort(out[..., :j], axis=-1).transpose(-1, *range(len(shape))):  # [j, *shape]
            x += x >= taken
        out[..., j] = x
    return out


def synthetic_trace(tokens: int, layers: int = 32, experts: int = 8, top_k: int = 2, keep: float = 0.3,
                    seed: int = 0) -> Trace:
    """A Markov chain per layer and rank: each token keeps the previous token's expert with probability
    `keep`, else takes a fresh draw. Where two ranks of one token then name the same expert, that
    token-layer takes its fresh draw whole (the chain itself goes on)."""
    rng = np.random.default_rng(seed)
    fresh = random_distinct(rng, (tokens, layers), experts, top_k)  # [T, L, K]
    redraw = rng.random((tokens, layers, top_k)) >= keep  # [T, L, K]
    redraw[0] = True
    # the token whose fresh draw each chain still carries: the last redraw at or before t
    source = np.maximum.accumulate(np.where(redraw, np.arange(tokens)[:, None, None], 0), axis=0)  # [T, L, K]
    chosen = np.take_along_axis(fresh, source, axis=0)  # [T, L, K]
    ranked = np.sort(chosen, axis=-1)  # [T, L, K]
    dup = (ranked[..., 1:] == ranked[..., :-1]).any(-1)  # [T, L]
    chosen[dup] = fresh[dup]
    predicted = np.where(rng.random((tokens, layers, 1)) < 0.7, chosen,
                         random_distinct(rng, (tokens, layers), experts, top_k))  # [T, L, K]
    predicted[:, 0] = -1
    weights = rng.dirichlet(np.ones(top_k), size=(tokens, layers)).astype(np.float32)  # [T, L, K]
    return Trace(chosen.astype(np.int32), weights, predicted.astype(np.int32), experts, top_k, layers,
                 "synthetic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--slots", type=int, default=4)
    args = ap.parse_args()
    t0 = time.perf_counter()
    trace = synthetic_trace(args.tokens)
    print(f"trace: {args.tokens} tokens x 32 layers, 8 experts, top-2 (built in {time.perf_counter() - t0:.1f} s)")
    print(f"{'policy':<8}{'prefetch':>9}{'slots':>6}{'hit rate':>10}{'copies/token':>14}{'seconds':>9}")
    runs = [(p, 0) for p in POLICIES] + [("lru", 1)]
    total = 0.0
    for policy, prefetch in runs:
        t0 = time.perf_counter()
        r = simulate(trace, args.slots, policy, prefetch=prefetch)
        secs = time.perf_counter() - t0
        total += secs if not prefetch else 0.0
        print(f"{policy:<8}{prefetch:>9}{args.slots:>6}{100 * r['hit_rate']:>9.1f}%"
              f"{r['copies'] / args.tokens:>14.2f}{secs:>9.2f}", flush=True)
    print(f"all {len(POLICIES)} policies without prefetch: {total:.1f} s")


if __name__ == "__main__":
    main()
