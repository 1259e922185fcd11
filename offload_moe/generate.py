"""Generation: prefill the prompt in one pass, then decode one token at a time.

Sampling stays on the device (no host round trip but the one labelled in `generate_tokens`):
a bias and penalties (`Adjust`, counts kept on the device), then greedy is an argmax; sampling
filters by min-p, top-k and top-p, then draws with the exponential trick (argmax of p / Exp(1)),
which needs no cumulative sum on the host. Log-probabilities (`token_logprobs`) cost a host copy
and are computed only when asked for. Stop strings (`StopText`) are matched in the text.

Legend: V vocabulary, T tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .errors import UserError
from .sampling import Sampling


class Logprob(NamedTuple):
    """A token's log-probability under the model, and the `top` most likely tokens there, (id, logprob) best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logits: torch.Tensor | None = None  # [generated, V] float32, when asked for
    prefill_s: float = 0.0
    decode_s: float = 0.0  # from the first token to the last, every decode step
    decode_steps: int = 0
    first_decode_s: float = 0.0  # the first decode step alone: it carries one-time work (first T=1 kernels)
    stop_reason: str = ""  # eos, length, context, stop (a stop string), cancelled (a batched request)
    stats: dict = field(default_factory=dict)
    logprobs: list[Logprob] = field(default_factory=list)  # per generated token, when a Scheduler is asked for them
    prompt_logprobs: list[Logprob | None] | None = None  # per prompt token (None for the first), likewise


class Adjust:
    """One sequence's changes to its logits before the pick (`Sampling.adjusts`; the order: sampling.py's): the
    bias, and the penalties over the tokens it has seen, whose marks and counts stay on the device (`update` takes
    the picked token's tensor: no host round trip)."""

    def __init__(self, s: Sampling, prompt_ids: list[int]):
        self.s, self.prompt = s, prompt_ids
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # token ids [N], biases [N]
        self.seen: torch.Tensor | None = None  # [V] bool: the prompt's and the generated tokens
        self.counts: torch.Tensor | None = None  # [V] float32: each token's count in the generated ones
        self.started = False

    def _start(self, logits: torch.Tensor) -> None:
        s, dev, V = self.s, logits.device, logits.shape[-1]
        if s.logit_bias:
            self.bias = (torch.tensor(list(s.logit_bias), device=dev),
                         torch.tensor(list(s.logit_bias.values()), dtype=logits.dtype, device=dev))
        if s.repetition_penalty != 1:
            self.seen = torch.zeros(V, dtype=torch.bool, device=dev)
            self.seen[torch.tensor(self.prompt, device=dev)] = True
        if s.presence_penalty or s.frequency_penalty:
            self.counts = torch.zeros(V, dtype=logits.dtype, device=dev)
            self.one = torch.ones(1, dtype=logits.dtype, device=dev)
        self.started = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> the adjusted logits [V] (a new tensor)."""
        if not self.started:
            self._start(logits)
        s = self.s
        if self.bias is not None:
            logits = logits.index_add(0, *self.bias)
        if self.seen is not None:
            p = s.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / p, logits * p), logits)
        if self.counts is not None:
            logits = logits - s.frequency_penalty * self.counts - s.presence_penalty * (self.counts > 0)
        return logits

    def update(self, token: torch.Tensor) -> None:
        """The token just picked (a 0-d tensor on the device) joins the seen and counted ones."""
        idx = token.view(1)
        if self.seen is not None:
            self.seen.index_fill_(0, idx, True)
        if self.counts is not None:
            self.counts.index_add_(0, idx, self.one)


def adjuster(sampling: Sampling, prompt_ids: list[int]) -> Adjust | None:
    return Adjust(sampling, prompt_ids) if sampling.adjusts else None


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits [V] float32 (adjusted) -> token id (0-d tensor, on the logits' device)."""
    if s.greedy:
        return logits.argmax()
    logits = logits / s.temperature
    if s.min_p > 0:  # p < min_p * p_max, in logits: logit < max logit + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(s.min_p), float("-inf"))
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [V]
    if s.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # drop a token when the tokens ranked above it already reach top_p
        drop = (sorted_p.cumsum(0) - sorted_p) >= s.top_p
        drop[0] = False  # the top token stays whatever top_p (5e-324 is 0 in float32: it would drop every token)
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return (probs / noise).argmax()


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[Logprob]:
    """logits [T, V] -> each row's log-probability of tokens[t], with its k most likely tokens. The raw model's
    (a log-softmax of the logits before any bias, penalty or temperature), as vLLM reports them."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).view(-1, 1)).view(-1).tolist()  # SYNC: asked for
    if k:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # [T, k]
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in tokens]
    return [Logprob(t, c, top) for t, c, top in zip(tokens, chosen, tops, strict=True)]


def _stop_at(text: str, stops: list[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could begin a stop string: not shown yet."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


class StopText:
    """Text pieces in, the part that may be shown out: the text ends before the first stop string (`stopped`
    then), and what could begin one is held back until it cannot, or the text ends (`final`)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max(map(len, self.stops), default=0)
        self.text = ""  # all pushed, cut before a stop string
        self.shown = 0  # characters given out
        self.stopped = False

    def push(self, piece: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a stop string ending in `piece` starts here or later
        self.text += piece
        cut = _stop_at(self.text, self.stops, start)
        if cut is not None:
            self.stopped, self.text = True, self.text[:cut]
        end = len(self.text) if final or cut is not None else len(self.text) - _held_back(self.text, self.stops)
        out, self.shown = self.text[self.shown:end], max(self.shown, end)
        return out


def check_request(engine, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> None:
    """What generation refuses before it starts, alone or batched: bad sampling settings (a biased token outside
    the vocabulary), a token count that is not 0 or more, a prompt that leaves the context no room for a new
    token."""
    sampling.check()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be a whole number, 0 or more, got {max_new_tokens!r}")
    V = engine.config.vocab_size
    outside = [t for t in sampling.logit_bias or () if t >= V]
    if outside:
        raise UserError(f"logit_bias: token id {outside[0]} is outside the vocabulary (0..{V - 1})")
    capacity = engine.kv_capacity
    if len(prompt_ids) >= capacity:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the context holds {capacity} (raise --context)")


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None, adjust: Adjust | None) -> torch.Tensor:
    """The next token of a sequence from its logits [V]: adjusted, sampled, and counted as seen."""
    if adjust is None:
        return sample(logits, s, gen)
    token = sample(adjust(logits), s, gen)
    adjust.update(token)
    return token


def sampling_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """The seeded random stream of a sampled request (None when greedy: argmax draws nothing)."""
    if sampling.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(sampling.seed)
    return gen


def generate_tokens(
    engine,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    keep_logits: bool = False,
    on_token: Callable[[int], None] | None = None,
) -> Generator[int, bool | None, GenerationResult]:
    """Yield each new token id; return the GenerationResult (via StopIteration.value). Sending True in place of
    next() ends generation there (a stop string found in the text), with the stop reason "stop"."""
    check_request(engine, prompt_ids, max_new_tokens, sampling)
    capacity = engine.kv_capacity
    device = engine.device
    gen = sampling_generator(sampling, device)
    adjust = adjuster(sampling, prompt_ids)
    engine.kv.reset()
    engine.cache.reset_counters()
    if hasattr(engine.cache.store, "reset_counters"):
        engine.cache.store.reset_counters()
    result = GenerationResult(prompt_ids=list(prompt_ids))
    rows: list[torch.Tensor] = []
    stop = engine.stop_ids  # config.json's, generation_config.json's and the tokenizer's EOS ids
    if max_new_tokens == 0:
        result.stop_reason = "length"
        return result

    t0 = time.perf_counter()
    logits = engine.model(torch.tensor(prompt_ids, device=device), engine.kv, last_only=True)[0]  # [V]
    token = pick(logits, sampling, gen, adjust)
    tok = int(token)  # SYNC: the token goes to the host, to stream it and to check for EOS
    result.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        result.tokens.append(tok)
        if keep_logits:
            rows.append(logits)
        if on_token is not None:
            on_token(tok)
        if (yield tok):
            result.stop_reason = "stop"
            break
        if tok in stop:
            result.stop_reason = "eos"
            break
        if len(result.tokens) >= max_new_tokens:
            result.stop_reason = "length"
            break
        if engine.kv.pos >= capacity:
            result.stop_reason = "context"
            break
        logits = engine.model(token.view(1), engine.kv)[0]  # [V]
        token = pick(logits, sampling, gen, adjust)
        tok = int(token)  # SYNC: as above
        result.decode_steps += 1
        if result.decode_steps == 1:
            result.first_decode_s = time.perf_counter() - t1
    result.decode_s = time.perf_counter() - t1
    if keep_logits:
        result.logits = torch.stack(rows).float().cpu()  # [generated, V]
    if engine.tokenizer is not None:
        result.text = engine.tokenizer.decode(result.tokens)
    return result
