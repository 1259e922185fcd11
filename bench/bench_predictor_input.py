"""Which hidden state predicts the next layer's experts best: the one entering layer l - 1 (what the predictors
read today) or the router's input of layer l - 1 (after its attention, normed), which is known before layer l - 1's
copies are issued, so using it would cost a prefetch no lead.

    python bench/bench_predictor_input.py [--model demo|demo-fine] [--fit-tokens 40000] [--eval-tokens 20000]

For each input, a learned predictor one layer ahead per layer (train_predictor.fit_row: D -> 256 -> E, 500 Adam
steps), fitted on windows of the training files and scored on windows of the held-out files (bench_prediction.py's
split); layer 0 from the previous token's last layer. Printed: recall at width top-k per layer and the mean, for
  entering      the hidden state entering layer l - 1 (the trace's `hidden`, what `train-predictor` fits on);
  router input  layer l - 1's normed FFN input, read by wrapping `Transformer.moe`;
  + routing     the router input with layer l - 1's chosen experts as a one-hot beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_prediction import windows_trace  # noqa: E402
from train_tiny_moe import corpus_files, split_corpus  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.modeling.transformer import Transformer  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.planning.train_predictor import fit_row, recall  # noqa: E402


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
    seen: dict[int, list[torch.Tensor]] = {r: [] for r in range(L)}  # per layer, its router inputs [T, D], in order
    moe = Transformer.moe

    def keeping(self, row, blk, x, decode, logits=None):
        seen[row].append(x.detach().float().clone())
        return moe(self, row, blk, x, decode, logits)

    Transformer.moe = keeping
    train, held = split_corpus(corpus_files())

    def scored(files: dict[str, str], tokens: int):
        for r in seen:
            seen[r].clear()
        trace = windows_trace(engine, files, tokens)
        return trace, np.stack([torch.cat(seen[r]).numpy() for r in range(L)], 1)  # [T, L, D]

    fit, fit_x = scored(train, args.fit_tokens)
    held_trace, held_x = scored(held, args.eval_tokens)

    def samples(trace, routed_in: np.ndarray, row: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        src = row - 1 if row else L - 1  # layer 0 from the previous token's last layer
        if kind == "entering":
            x = trace.tensors["hidden"][:, src].astype(np.float32)
        else:
            x = routed_in[:, src]
            if kind == "+ routing":
                hot = np.zeros((trace.num_tokens, E), np.float32)
                np.put_along_axis(hot, trace.experts[:, src].astype(np.int64), 1.0, 1)
                x = np.concatenate([x, hot], 1)
        y = trace.experts[:, row]
        if not row:
            x, y = x[:-1], y[1:]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))

    print(f"# {args.model}: {L} layers, {E} experts, top-{K}; fitted on {fit.num_tokens:,} tokens, scored on "
          f"{held_trace.num_tokens:,} held-out tokens; recall at width {K} per layer")
    print(f"{'input':>14}" + "".join(f"{'layer ' + str(r):>9}" for r in range(L)) + f"{'mean':>9}")
    for kind in ("entering", "router input", "+ routing"):
        row_recall = []
        for row in range(L):
            w = fit_row(*samples(fit, fit_x, row, kind), E, 256, 500, 512, 3e-3, row)
            x, y = samples(held_trace, held_x, row, kind)
            with torch.no_grad():
                top = torch.topk(F.linear(F.gelu(F.linear(x, w["w1"], w["b1"])), w["w2"], w["b2"]), K, -1).indices
            row_recall.append(recall(top.numpy(), y.numpy()))
        print(f"{kind:>14}" + "".join(f"{100 * r:>8.1f}%" for r in row_recall) + f"{100 * np.mean(row_recall):>8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
