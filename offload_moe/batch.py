"""Continuous batching: several sequences decode together, each in its own slot of a KV pool.

    from offload_moe import Engine, Scheduler, Sampling
    sched = Scheduler(engine, max_batch=4)
    a = sched.add(engine.encode("def fib(n):"), max_new_tokens=32)
    b = sched.add(engine.encode("import os"), max_new_tokens=8, sampling=Sampling(temperature=0.7, seed=1))
    while sched.busy:
        for rid, token, finished in sched.step(): ...
    sched.result(a).tokens, sched.stats(a)

A step, in this order:
  1. cancelled requests leave (reported as finished "cancelled"), waiting ones join free slots;
  2. one decode forward for every sequence that has a token to feed (`Transformer.forward_batch`:
     per-sequence attention, the MoE layers over the B tokens at once, so each layer acquires the
     union of the batch's experts once and computes each expert for the rows that chose it);
  3. prompts are prefilled, at most `prefill_chunk` tokens in all per step (chunked by the single-
     sequence forward into the sequence's slot), so a long prompt delays the others' next token by
     one chunk's forward, not by the whole prompt; a prompt finished here yields its first token.
Each sequence samples with its own Sampling, generator and penalty counts (`Adjust`) and stops by the
rules of `generate_tokens` (EOS, max_new_tokens, a full context), so its tokens and logits are those
of the sequence run alone with `Engine.generate` (within float rounding: an expert's matmul over
several rows, the masked attention over the longest span). Asked for, a sequence's log-probabilities
(`token_logprobs`: its generated tokens', its prompt's) go into its result as they are made; a
request for its prompt's alone (max_new_tokens 0) is prefilled and generates nothing.

add and cancel may be called from other threads (a server's handlers); step runs in one thread,
the only one that touches the model.

Legend: B sequences in a decode step, V vocabulary, T tokens.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .generate import (
    Adjust,
    GenerationResult,
    Logprob,
    adjuster,
    check_request,
    pick,
    sampling_generator,
    token_logprobs,
)
from .memory import gib
from .modeling.layers import KVPool
from .sampling import Sampling

FINISHED_KEPT = 1024  # finished requests whose result and stats stay readable
RECENT_S = 10.0  # the window of `decode_rate`, seconds


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    keep_logits: bool = False
    logprobs: int | None = None  # the generated tokens' log-probabilities, with this many top ones
    prompt_logprobs: int | None = None  # the prompt's, likewise
    gen: torch.Generator | None = None
    adjust: Adjust | None = None
    slot: int = -1  # its KV-pool slot while admitted
    prefilled: int = 0  # prompt tokens in its slot
    pending: int | None = None  # the last sampled token, to be fed at the next decode step
    result: GenerationResult = field(default_factory=lambda: GenerationResult(prompt_ids=[]))
    rows: list[torch.Tensor] = field(default_factory=list)  # logits [V] per generated token (keep_logits)
    t_added: float = 0.0
    t_admitted: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0


def check_pool_fits(engine, max_batch: int) -> None:
    """A pool beyond the engine's own comes on top of what the engine planned (its own KV cache included):
    with a device budget, refuse a pool that does not fit it, before allocating anything."""
    plan = engine.plan
    if plan is None or plan.device_budget is None:
        return
    pool = max_batch * engine.config.kv_bytes(engine.kv_capacity, engine.dtype.itemsize)
    if plan.device_total + pool > plan.device_budget:
        raise UserError(f"a KV pool of {max_batch} sequences ({gib(pool)}) does not fit the device beside "
                        f"{plan.describe()}: budget {gib(plan.device_budget)} (lower --max-batch or --context, or "
                        "free slots)")


class Scheduler:
    """A pool of `max_batch` sequence slots over an engine's model and expert cache: the engine's own KV pool
    when it was loaded with max_batch >= this one (planned at load; `generate` on that engine uses its slot
    0, so not while this scheduler runs), else a pool allocated here, if it fits the device budget."""

    def __init__(self, engine, max_batch: int = 4, prefill_chunk: int = 256):
        if max_batch < 1:
            raise UserError("--max-batch must be 1 or more")
        if prefill_chunk < 1:
            raise UserError("the prefill chunk must be 1 token or more")
        self.engine, self.max_batch, self.prefill_chunk = engine, max_batch, prefill_chunk
        own = engine.pool
        if own is not None and len(own.seqs) >= max_batch:
            self.pool = own
        else:
            check_pool_fits(engine, max_batch)
            self.pool = KVPool(engine.config, engine.kv_capacity, max_batch, engine.device, engine.dtype)
        self.capacity = engine.kv_capacity
        self.free = list(range(max_batch))
        self.active: list[Request] = []  # admitted, in admission order
        self.waiting: deque[Request] = deque()
        self.cancelled: set[int] = set()
        self.finished: OrderedDict[int, Request] = OrderedDict()
        self.lock = threading.Lock()
        self.next_id = 0
        self.steps = 0
        self.batch_sizes: list[int] = []  # sequences per decode forward, for the stats
        self.decode_tokens, self.decode_s = 0, 0.0  # tokens of decode steps (not prefills) and their seconds
        self.recent: deque[tuple[float, int, float]] = deque()  # (end, tokens, seconds) of the last RECENT_S's steps

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting or self.cancelled)

    def add(self, prompt_ids: list[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
            keep_logits: bool = False, logprobs: int | None = None, prompt_logprobs: int | None = None) -> int:
        """Queue a sequence; it joins at the next step with a free slot. Returns its request id. `logprobs`,
        `prompt_logprobs`: its result's `logprobs` and `prompt_logprobs`, each token's with that many top ones."""
        sampling = sampling or Sampling()
        check_request(self.engine, list(prompt_ids), max_new_tokens, sampling)
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise UserError(f"{name} must be a whole number, 0 or more, got {k!r}")
        ids = self.engine.encode(list(prompt_ids))  # checks the ids against the vocabulary
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
            req = Request(rid, ids, max_new_tokens, sampling, keep_logits, logprobs, prompt_logprobs,
                          t_added=time.perf_counter())
            req.result = GenerationResult(prompt_ids=list(ids))
            self.waiting.append(req)
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request (waiting or running); it is reported finished, "cancelled", at the next step."""
        with self.lock:
            self.cancelled.add(rid)

    def step(self) -> list[tuple[int, int | None, str | None]]:
        """Run one step; returns (request id, new token or None, finish reason or None) per event."""
        events: list[tuple[int, int | None, str | None]] = []
        self._admit(events)
        # in slot order: the pool's slots are then often consecutive, read as a view (`decode_ragged`)
        decoding = sorted((r for r in self.active if r.pending is not None), key=lambda r: r.slot)
        if decoding:
            self._decode(decoding, events)
        self._prefill(events)
        self.steps += 1
        return events

    def _admit(self, events: list) -> None:
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            kept = deque(r for r in self.waiting if r.id not in cancelled)
            gone = [r for r in self.waiting if r.id in cancelled] + [r for r in self.active if r.id in cancelled]
            self.waiting = kept
            for req in gone:
                self._finish(req, "cancelled", events)
            now = time.perf_counter()
            while self.free and self.waiting:
                req = self.waiting.popleft()
                req.t_admitted = now
                if req.max_new_tokens == 0 and req.prompt_logprobs is None:  # as generate_tokens: nothing to run
                    self._finish(req, "length", events)
                    continue
                req.slot = self.free.pop(0)
                self.active.append(req)
                try:  # one request's setup failing must not touch the others, nor keep its slot
                    self.pool.seqs[req.slot].reset()
                    req.gen = sampling_generator(req.sampling, self.engine.device)
                    req.adjust = adjuster(req.sampling, req.prompt)
                except Exception:  # noqa: BLE001 - reported to that request alone, as its finish reason
                    self._finish(req, "error", events)

    def _decode(self, reqs: list[Request], events: list) -> None:
        t0 = time.perf_counter()
        tokens = torch.tensor([r.pending for r in reqs], device=self.engine.device)  # [B]
        logits = self.engine.model.forward_batch(tokens, self.pool, [r.slot for r in reqs])  # [B, V]
        if all(r.sampling.greedy and r.adjust is None for r in reqs):  # one argmax for the batch, as `pick` per row
            picked = logits.argmax(dim=-1)  # [B]
        else:
            picked = torch.stack([pick(logits[b], r.sampling, r.gen, r.adjust) for b, r in enumerate(reqs)])  # [B]
        ids = picked.tolist()  # SYNC: the tokens go to the host, to stream them and to check for EOS
        asked = [b for b, r in enumerate(reqs) if r.logprobs is not None]  # one host copy for all of them
        lps = dict(zip(asked, token_logprobs(logits[asked], [ids[b] for b in asked],
                                             max(reqs[b].logprobs for b in asked)), strict=True)) if asked else {}
        self.batch_sizes.append(len(reqs))
        now = time.perf_counter()
        self.decode_tokens += len(reqs)
        self.decode_s += now - t0
        with self.lock:  # `decode_rate` reads it from another thread
            self.recent.append((now, len(reqs), now - t0))
            while self.recent[0][0] < now - RECENT_S:
                self.recent.popleft()
        for b, req in enumerate(reqs):
            req.result.decode_steps += 1
            if req.result.decode_steps == 1:
                req.result.first_decode_s = now - t0
            self._emit(req, ids[b], logits[b], events, now, lps.get(b))

    def _prefill(self, events: list) -> None:
        budget = self.prefill_chunk
        for req in [r for r in self.active if r.prefilled < len(r.prompt)]:
            if budget == 0:
                break
            n = min(budget, len(req.prompt) - req.prefilled)
            budget -= n
            t0 = time.perf_counter()
            start = req.prefilled
            chunk = torch.tensor(req.prompt[start : start + n], device=self.engine.device)  # [T]
            out = self.engine.model(chunk, self.pool.seqs[req.slot], last_only=req.prompt_logprobs is None)
            req.prefilled += n
            if req.prompt_logprobs is not None:  # row t predicts the prompt's token start + t + 1
                self._prompt_logprobs(req, out, req.prompt[start + 1 : start + n + 1])
            logits = out[-1]  # [V]
            if req.prefilled < len(req.prompt):
                req.result.prefill_s += time.perf_counter() - t0
                continue
            if req.max_new_tokens == 0:  # its prompt's log-probabilities were all it asked for
                req.result.prefill_s += time.perf_counter() - t0
                self._finish(req, "length", events)
                continue
            token = pick(logits, req.sampling, req.gen, req.adjust)
            tok = int(token)  # SYNC: as in _decode
            now = time.perf_counter()
            req.result.prefill_s += now - t0
            req.t_first = now
            self._emit(req, tok, logits, events, now)

    @staticmethod
    def _prompt_logprobs(req: Request, out: torch.Tensor, targets: list[int]) -> None:
        if req.result.prompt_logprobs is None:
            req.result.prompt_logprobs = [None]  # the first token has no context to be predicted from
        if targets:
            req.result.prompt_logprobs += token_logprobs(out[: len(targets)], targets, req.prompt_logprobs)

    def _emit(self, req: Request, tok: int, logits: torch.Tensor, events: list, now: float,
              lp: Logprob | None = None) -> None:
        """A new token of `req` (`logits` [V] it was picked from; `lp`: its log-probabilities, when computed with
        others'): record it, then stop by generate_tokens' rules or keep it to feed."""
        req.result.tokens.append(tok)
        req.t_last = now
        if req.logprobs is not None:
            lp = lp or token_logprobs(logits.view(1, -1), [tok], req.logprobs)[0]
            req.result.logprobs.append(lp._replace(top=lp.top[: req.logprobs]))
        if req.keep_logits:
            req.rows.append(logits)
        reason = None
        if tok in self.engine.stop_ids:
            reason = "eos"
        elif len(req.result.tokens) >= req.max_new_tokens:
            reason = "length"
        elif self.pool.seqs[req.slot].pos >= self.capacity:
            reason = "context"
        req.pending = tok if reason is None else None
        events.append((req.id, tok, reason))
        if reason is not None:
            self._finish(req, reason, events, report=False)

    def _finish(self, req: Request, reason: str, events: list, report: bool = True) -> None:
        if req.slot >= 0:
            self.active.remove(req)
            self.free.append(req.slot)
            self.free.sort()  # the lowest free slot first: the decode rows stay packed
            req.slot = -1
        req.pending = None
        req.result.stop_reason = reason
        if req.t_first:
            req.result.decode_s = req.t_last - req.t_first
        if req.keep_logits and req.rows:
            req.result.logits = torch.stack(req.rows).float().cpu()  # [generated, V]
        req.rows = []
        tok = self.engine.tokenizer
        if tok is not None:
            req.result.text = tok.decode(req.result.tokens)
        if report:
            events.append((req.id, None, reason))
        self.finished[req.id] = req
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def decode_rate(self) -> float:
        """Aggregate decode tokens/s of the decode steps that ended in the last RECENT_S seconds: their
        tokens over their seconds (the rate while decoding; 0 when none ran)."""
        since = time.perf_counter() - RECENT_S
        with self.lock:
            steps = [(n, s) for end, n, s in self.recent if end >= since]
        seconds = sum(s for _, s in steps)
        return sum(n for n, _ in steps) / seconds if seconds > 0 else 0.0

    def _request(self, rid: int) -> Request:
        with self.lock:  # another thread may be adding to `waiting`
            for req in (*self.active, *self.waiting):
                if req.id == rid:
                    return req
            if rid in self.finished:
                return self.finished[rid]
        raise KeyError(f"no request {rid}")

    def result(self, rid: int) -> GenerationResult:
        """Tokens so far (all of them once finished), stop reason, timings; logits when asked for."""
        return self._request(rid).result

    def stats(self, rid: int) -> dict:
        """One request's counts and timings, in seconds."""
        req = self._request(rid)
        r = req.result
        return {
            "prompt_tokens": len(req.prompt),
            "generated_tokens": len(r.tokens),
            "finish_reason": r.stop_reason or None,
            "queued_s": (req.t_admitted - req.t_added) if req.t_admitted else None,
            "time_to_first_token_s": (req.t_first - req.t_added) if req.t_first else None,
            "prefill_s": r.prefill_s,
            "decode_s": req.t_last - req.t_first if req.t_first else 0.0,
            "decode_tokens_per_s": (len(r.tokens) - 1) / (req.t_last - req.t_first)
            if req.t_first and req.t_last > req.t_first else None,
        }
