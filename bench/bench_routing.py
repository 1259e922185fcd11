"""Is the tiny model's routing real? Perplexity and routing statistics on held-out standard-library files.

    python bench/bench_routing.py [--model offload_moe/data/tiny-moe] [--max-windows N]
    python bench/bench_routing.py --model offload_moe/data/tiny-moe-fine   # the fine-grained demo, 32 x top-4

Offloading pays off when routing has structure: consecutive tokens reuse experts (a cache hits)
and a layer's choices can be guessed one layer early (a prefetch has something to fetch). This
prints, on files that neither the model nor its tokenizer saw (the held-out rule of
tools/train_tiny_moe.py, imported from there), each file cut into windows of the model's context
and scored as BOS + window, for three models of one shape:

  trained     the checkpoint
  untrained   the model training started from (the training script's initialisation, same seed)
  random      a random-weight checkpoint as offload_moe.demo writes them (std 0.02, norms 1)

these numbers:

  perplexity        next-token perplexity over every window
  persist first     per layer, the share of consecutive tokens whose first-choice expert is the
                    same (uniformly random routing: 1/E = 12.5%; Mixtral-8x7B reports 14-28%)
  persist top-k     the share whose top-k sets share an expert (uniformly random: 1 - C(E-K, K) /
                    C(E, K) = 46.4% for 8 experts top-2; Mixtral-8x7B reports 45-67%)
  prefetch recall   per layer l >= 1, the share of the experts layer l chose that layer l's router
                    also picks from the hidden state entering layer l-1: what a prefetch one layer
                    ahead fetches in time (uniformly random: K/E = 25%)
  load max/min      the largest and smallest share of a layer's assignments one expert takes over
                    all windows (balanced: 1/E)
  window top        the share of a window's first choices that its busiest expert takes, averaged
                    over windows (balanced: a little above 1/E). A random-weight model scores high
                    here: attention averages its random residual stream over the window, so the
                    router's input drifts towards one point and most tokens of a window pick the
                    same experts. That inflates its persistence and hit rates without any locality
                    that a real model would show.
  cache hit rates   each layer its own cache of S expert slots, tokens in order: LRU against
                    Belady's optimal offline rule, replaying the routing trace in the simulator
                    (offload_moe.planning.replay) at its default sizes, K, 1.5K, 2K and 3K (2, 3, 4, 6 for
                    top-2 of 8; 4, 6, 8, 12 for top-4 of 32); with K slots every policy is forced

Legend: T tokens, D dim, E experts, K top-k, L layers.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from train_tiny_moe import TinyMixtral, corpus_files, save_checkpoint, split_corpus  # noqa: E402

from offload_moe.demo import write_random_checkpoint  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.models import from_hf_config  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.planning.replay import default_slots, simulate  # noqa: E402
from offload_moe.planning.trace import join_traces, routing_counts  # noqa: E402

DEFAULT_MODEL = ROOT / "offload_moe" / "data" / "tiny-moe"


class RoutingStats:
    """Perplexity and routing counts (`trace.routing_counts`) summed over windows, per layer; the
    reported shares are ratios of them."""

    def __init__(self, n_layers: int, n_experts: int):
        self.n_layers, self.n_experts = n_layers, n_experts
        self.nll = 0.0
        self.pairs = 0  # consecutive token pairs, which are also the next tokens scored
        self.choices = 0  # T * K, summed over windows
        self.counts = {k: 0 for k in ("same_first", "same_any", "recalled", "load")}
        self.window_top = np.zeros(n_layers)  # busiest expert's share of first choices, summed over windows
        self.windows = 0

    def add(self, ids: list[int], logits: torch.Tensor, experts: np.ndarray, predicted: np.ndarray) -> None:
        """One window: ids (BOS first), its logits [T, V] and its routing, experts and predicted [T, L, K]."""
        self.nll += F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum").item()
        self.pairs += len(ids) - 1
        self.choices += experts[:, 0].size  # [T, K]
        counts = routing_counts(experts, predicted, self.n_experts)
        for k in self.counts:
            self.counts[k] = self.counts[k] + counts[k]
        self.window_top += counts["first"].max(-1) / len(ids)  # [L, E] -> [L]
        self.windows += 1

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.pairs)

    def layer_row(self, layer: int) -> tuple[float, float, float | None, float, float, float]:
        """persist first, persist top-k, prefetch recall (None at layer 0), load max, load min, window top."""
        c = self.counts
        share = c["load"][layer] / c["load"][layer].sum()  # [E]
        recall = float(c["recalled"][layer]) / self.choices if layer else None
        return (float(c["same_first"][layer]) / self.pairs, float(c["same_any"][layer]) / self.pairs, recall,
                float(share.max()), float(share.min()), float(self.window_top[layer]) / self.windows)


def held_out_windows(engine: Engine, max_windows: int | None) -> list[list[int]]:
    """Each held-out file's tokens cut into windows of context - 1, each scored as BOS + window."""
    _, held = split_corpus(corpus_files())
    step = engine.kv_capacity - 1
    windows = []
    for text in held.values():
        ids = engine.tokenizer.encode(text, bos=False)
        windows += [[engine.config.bos_id, *ids[i : i + step]] for i in range(0, len(ids), step)]
    return windows[:max_windows] if max_windows else windows


def untrained_checkpoint(model_dir: Path, out: Path, seed: int) -> Path:
    """The training script's initial model (same shape, same seed), with the trained tokenizer."""
    shape = from_hf_config(model_dir / "config.json")
    torch.manual_seed(seed)
    save_checkpoint(TinyMixtral(shape), (model_dir / "tokenizer.model").read_bytes(), out)
    return out


def measure(path: Path, windows: list[list[int]]) -> tuple[RoutingStats, list[dict]]:
    """Score every window; return the routing statistics and, per slot count (`default_slots`), LRU and
    Belady hit rates."""
    engine = Engine.load(path, EngineOptions(prefetch=0, dtype="float32", progress=False))
    c = engine.config
    stats = RoutingStats(c.n_layers, c.num_experts)
    traces = []
    for ids in windows:
        engine.start_trace(str(path))
        logits = engine.score(ids)  # [T, V]
        traces.append(engine.stop_trace())
        stats.add(ids, logits, traces[-1].experts, traces[-1].predicted)
    # every window, one after another, as the simulator's workload: windows x [T_i, L, K] -> [T, L, K]
    routing = join_traces(traces)
    caches = [{"slots": s, "lru": simulate(routing, s, "lru")["hit_rate"],
               "optimal": simulate(routing, s, "belady")["hit_rate"]} for s in default_slots(c.top_k, c.num_experts)]
    return stats, caches


def uniform_baselines(E: int, K: int) -> tuple[float, float, float]:
    """First-choice persistence, top-k overlap and prefetch recall of uniformly random routing."""
    return 1 / E, 1 - math.comb(E - K, K) / math.comb(E, K), K / E


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="trained checkpoint (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=0, help="score only the first N windows; 0: all (default)")
    p.add_argument("--seed", type=int, default=0, help="the training seed, for the untrained model (default: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    engine = Engine.load(args.model, EngineOptions(prefetch=0, dtype="float32", progress=False))
    c = engine.config
    windows = held_out_windows(engine, args.max_windows or None)
    print(f"{args.model}: {c.n_layers} layers, {c.num_experts} experts, top-{c.top_k}; held-out: {len(windows)} "
          f"windows, {sum(len(w) for w in windows):,} tokens (context {engine.kv_capacity})")
    results = {"trained": measure(args.model, windows)}
    with tempfile.TemporaryDirectory() as tmp:
        results["untrained"] = measure(untrained_checkpoint(args.model, Path(tmp) / "untrained", args.seed), windows)
        random_path = write_random_checkpoint(Path(tmp) / "random", c, torch.float16, seed=args.seed)
        results["random"] = measure(random_path, windows)

    print("perplexity: " + ", ".join(f"{name} {stats.perplexity:.2f}" for name, (stats, _) in results.items()))
    first, anyk, recall = uniform_baselines(c.num_experts, c.top_k)
    print(f"\nrouting (uniformly random routing: persist first {first:.1%}, persist top-{c.top_k} {anyk:.1%}, "
          f"prefetch recall {recall:.1%}; balanced load {1 / c.num_experts:.1%})")
    print(f"{'layer':>5} {'model':>9} {'persist first':>14} {'persist top-k':>14} {'prefetch recall':>16} "
          f"{'load max/min':>14} {'window top':>11}")
    means = {name: [0.0, 0.0, 0.0] for name in results}
    for layer in range(c.n_layers):
        for name, (stats, _) in results.items():
            f1, fk, rc, hi, lo, top = stats.layer_row(layer)
            m = means[name]
            m[0], m[1] = m[0] + f1 / c.n_layers, m[1] + fk / c.n_layers
            m[2] += (rc or 0.0) / (c.n_layers - 1)
            rc_text = f"{rc:.1%}" if rc is not None else "-"
            print(f"{layer:>5} {name:>9} {f1:>14.1%} {fk:>14.1%} {rc_text:>16} {hi:>8.1%}/{lo:<5.1%} {top:>11.1%}")
    for name, (f1, fk, rc) in means.items():
        print(f"{'mean':>5} {name:>9} {f1:>14.1%} {fk:>14.1%} {rc:>16.1%}")

    print(f"\nexpert cache hit rates (each layer its own cache of S of {c.num_experts} slots, tokens in order)")
    print(f"{'S':>5} " + " ".join(f"{name + ' LRU':>14} {name + ' opt':>14}" for name in results))
    for i, slots in enumerate(default_slots(c.top_k, c.num_experts)):
        cells = [f"{caches[i]['lru']:>14.1%} {caches[i]['optimal']:>14.1%}" for _, caches in results.values()]
        print(f"{slots:>5} " + " ".join(cells))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
