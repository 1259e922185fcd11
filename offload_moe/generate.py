"""Generation: prefill the prompt in one pass, then decode one token at a time.

Sampling stays on the device (no host round trip but the one labelled in `generate_tokens`):
greedy is an argmax; sampling filters by top-k and top-p, then draws with the exponential
trick (argmax of p / Exp(1)), which needs no cumulative sum on the host.

Legend: V vocabulary, T tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .sampling import Sampling


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
    stop_reason: str = ""
    stats: dict = field(default_factory=dict)


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits [V] float32 -> token id (0-d tensor, on the logits' device)."""
    if s.greedy:
        return logits.argmax()
    logits = logits / s.temperature
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


def check_request(prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, capacity: int) -> None:
    """What generation refuses before it starts, alone or batched: bad sampling settings, a negative
    token count, a prompt that leaves the context no room for a new token."""
    sampling.check()
    if max_new_tokens < 0:
        raise UserError("--max-new-tokens must be 0 or more")
    if len(prompt_ids) >= capacity:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the context holds {capacity} (raise --context)")


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
) -> Generator[int, None, GenerationResult]:
    """Yield each new token id; return the GenerationResult (via StopIteration.value)."""
    capacity = engine.kv_capacity
    check_request(prompt_ids, max_new_tokens, sampling, capacity)
    device = engine.device
    gen = sampling_generator(sampling, device)
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
    token = sample(logits, sampling, gen)
    tok = int(token)  # SYNC: the token goes to the host, to stream it and to check for EOS
    result.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        result.tokens.append(tok)
        if keep_logits:
            rows.append(logits)
        if on_token is not None:
            on_token(tok)
        yield tok
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
        token = sample(logits, sampling, gen)
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
