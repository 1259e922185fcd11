"""Perplexity of a text under the engine, with a sliding window: exp(mean NLL of every token after BOS).

Windows of `window` tokens start every `stride` tokens; each window scores only the tokens that
no earlier window scored, so every token after BOS is counted once, with up to window - stride
tokens of left context when it is not in the first window.
"""

from __future__ import annotations

import math

import torch

from .errors import UserError
from .progress import progress_bar


def perplexity(engine, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of `ids` (BOS first)."""
    if len(ids) < 2:
        raise UserError("the text has no token to score after BOS")
    if window < 2 or window > engine.kv_capacity:
        raise UserError(f"the window must be between 2 and the context ({engine.kv_capacity}) tokens, got {window}")
    if not 0 < stride <= window - 1:
        raise UserError(f"--stride must be between 1 and the window - 1 ({window - 1}), got {stride}")
    nll, scored, begin, done = 0.0, 0, 0, 1  # positions < done are scored (position 0, BOS, never is)
    with progress_bar(what="perplexity", total=len(ids) - 1, unit="tok") as bar:
        while done < len(ids):
            end = min(begin + window, len(ids))
            logits = engine.score(ids[begin:end])  # [end-begin, V]; row r predicts position begin+r+1
            rows = torch.arange(done - 1 - begin, end - 1 - begin)
            targets = torch.tensor(ids[done:end], device=logits.device)
            logp = torch.log_softmax(logits[rows], dim=-1)  # [n, V]
            nll -= logp.gather(1, targets[:, None]).sum().item()
            scored += end - done
            bar.update(end - done)
            done = end
            begin += stride
    return math.exp(nll / scored), scored
