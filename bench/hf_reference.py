"""transformers' decode speed, timed the way the engine reports its own: over the decode steps after
the first (the engine times the first decode step apart), best of several runs. Shared by the bench
scripts that compare against transformers."""

from __future__ import annotations

import time

import torch


def transformers_decode_rate(model, prompt: list[int], tokens: int, repeats: int) -> float:
    """Decode tokens/s of a transformers causal LM on `prompt`, greedy, `tokens` new tokens."""
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    best = 0.0
    for _ in range(repeats):
        head = timed(2)  # prefill, the first token and the first decode step (the engine reports it apart)
        total = timed(tokens)
        best = max(best, (tokens - 2) / max(total - head, 1e-9))
    return best
