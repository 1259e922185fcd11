"""Which hidden state predicts the next layer's experts best: the one entering layer l - 1 or the router's input of
layer l - 1 (after its attention, normed), which is known before layer l - 1's copies are issued, so using it costs
a prefetch no lead.

    python bench/bench_predictor_input.py [--model demo|demo-fine] [--fit-tokens 40000] [--eval-tokens 20000]

For each input, a learned predictor one layer ahead per layer (train_predictor.fit_row: D -> 256 -> E, 500 Adam
steps), fitted on windows of the training files and scored on windows of the held-out files (bench_prediction.py's
split); layer 0 from the previous token's last layer. Printed: recall at width top-k per layer and the mean, for
  hidden        the hidden state entering layer l - 1 (the trace's `hidden`);
  router_input  layer l - 1's router input (the trace's `router_input`: what `train-predictor` fits by default);
  + routing     the router input with layer l - 1's chosen experts as a one-hot beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_prediction import windows_trace  # noqa: E402
from train_tiny_moe import corpus_files, split_corpus  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.offload.predictors import LearnedPredictor, source_of  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.planning.train_predictor import fit_row, recall, samples  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--fit-tokens", type=int, default=40_000)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load(resolve_model(args.model), EngineOptions(prefetch=0, dtype="float32", progress=False))
    c = engine.config
    L, E, K = c.n_moe_layers, c.num_experts, c.top_k
    train, held = split_corpus(corpus_files())
    fit, evaluation = windows_trace(engine, train, args.fit_tokens), windows_trace(engine, held, args.eval_tokens)

    def with_routing(trace, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`samples` of the router input, layer l - 1's chosen experts one-hot beside it."""
        x, y = samples(trace, row, 1, "router_input")
        src, cross = source_of(row, 1, L)
        chosen = trace.experts[:-1, src] if cross else trace.experts[:, src]  # [N, K]
        hot = torch.zeros(len(x), E).scatter_(1, torch.from_numpy(chosen.astype(np.int64)), 1.0)  # [N, E]
        return torch.cat([x, hot], 1), y

    kinds = {"hidden": lambda t, r: samples(t, r, 1, "hidden"),
             "router_input": lambda t, r: samples(t, r, 1, "router_input"), "+ routing": with_routing}
    print(f"# {args.model}: {L} layers, {E} experts, top-{K}; fitted on {fit.num_tokens:,} tokens, scored on "
          f"{evaluation.num_tokens:,} held-out tokens; recall at width {K} per layer")
    print(f"{'input':>14}" + "".join(f"{'layer ' + str(r):>9}" for r in range(L)) + f"{'mean':>9}")
    for kind, take in kinds.items():
        row_recall = []
        for row in range(L):
            w = fit_row(*take(fit, row), E, 256, 500, 512, 3e-3, row)
            x, y = take(evaluation, row)
            model = LearnedPredictor([w] * L, 1, {})
            with torch.no_grad():
                row_recall.append(recall(model.rank(row, x, K).numpy(), y.numpy()))
        print(f"{kind:>14}" + "".join(f"{100 * r:>8.1f}%" for r in row_recall) + f"{100 * np.mean(row_recall):>8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
