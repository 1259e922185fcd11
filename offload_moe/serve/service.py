"""The request logic of the OpenAI-compatible server, apart from the HTTP framework (`app.py`).

One background thread (`Worker`) runs `scheduler.step()` while anything is busy and hands each event
to its request's asyncio queue (`loop.call_soon_threadsafe`). `Service` checks a request's parameters
and prompts, submits its sequences (n per prompt) at once, turns their tokens into text pieces
(`Delta`s: holding back what could begin a stop string, with the tokens' log-probabilities when asked)
and counts the metrics. Errors are `APIError`s, in OpenAI's shape
{"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

from ..batch import RECENT_S, Scheduler
from ..errors import UserError
from ..generate import GenerationResult, Logprob, StopText
from ..sampling import SEEDS, Sampling
from ..tokenizer import TextStream, check_template_args
from .tokens import TokenText

FINISH = {"eos": "stop", "length": "length", "context": "length"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Worker:
    """The one thread that steps the scheduler; hands (sequence id, token or None, finish reason or None) to
    each request's queue on its event loop."""

    def __init__(self, scheduler: Scheduler, max_queue: int):
        self.sched, self.max_queue = scheduler, max_queue
        self.handlers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # by sequence id
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.draining = False  # shutting down: new requests are refused
        self.counts = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rejected": 0}
        self.thread = threading.Thread(target=self._run, name="offload-moe-step", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            for rid in list(self.handlers):
                self.sched.cancel(rid)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    @property
    def room(self) -> int:
        """Sequences running or waiting at most."""
        return self.sched.max_batch + self.max_queue

    def submit(self, seqs: list[tuple[list[int], int, Sampling]], logprobs: int | None = None,
               prompt_logprobs: int | None = None) -> tuple[list[int], list[GenerationResult], asyncio.Queue]:
        """Queue a request's sequences (prompt ids, max tokens, sampling), all or none; their events go to one
        queue. Returns their ids, their results (the scheduler's: log-probabilities are read there) and the
        queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:  # the step thread dispatches under this lock: no event before the handler is set
            if self.draining:
                raise APIError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if len(self.handlers) + len(seqs) > self.room:
                self.counts["rejected"] += 1
                raise APIError(503, f"the server is busy: {len(self.handlers)} sequences running or queued "
                                    f"(--max-batch {self.sched.max_batch}, --max-queue {self.max_queue}); retry later",
                               code="queue_full", kind="server_error")
            rids: list[int] = []
            try:
                for ids, max_tokens, sampling in seqs:
                    rids.append(self.sched.add(ids, max_tokens, sampling, logprobs=logprobs,
                                               prompt_logprobs=prompt_logprobs))
            except UserError as e:
                for rid in rids:
                    self.sched.cancel(rid)
                raise APIError(400, str(e), code="invalid_value") from None
            results = [self.sched.result(rid) for rid in rids]
            for rid in rids:
                self.handlers[rid] = (loop, queue)
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += sum(len(ids) for ids, *_ in seqs)
        self.wake.set()
        return rids, results, queue

    def cancel(self, rid: int) -> None:
        with self.lock:
            self.handlers.pop(rid, None)
        self.sched.cancel(rid)
        self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            while self.sched.busy:
                try:
                    events = self.sched.step()
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the thread lives on
                    self.fail_all(e)
                    break
                with self.lock:
                    sends: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up of each loop per step
                    for rid, tok, reason in events:
                        if tok is not None:
                            self.counts["completion_tokens"] += 1
                        h = self.handlers.get(rid)
                        if h is not None:
                            sends.setdefault(h[0], []).append((h[1], (rid, tok, reason)))
                            if reason is not None:
                                del self.handlers[rid]
                    for loop, items in sends.items():
                        loop.call_soon_threadsafe(_deliver, items)

    def fail_all(self, error: Exception) -> None:
        """End every request in flight with `error` (an APIError is passed on as it is)."""
        with self.lock:
            for rid, (loop, queue) in self.handlers.items():
                loop.call_soon_threadsafe(queue.put_nowait, (rid, error, "error"))
                self.sched.cancel(rid)
            self.handlers.clear()


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


@dataclass
class Choice:
    """One sequence of a request, as the service follows it."""

    index: int  # in the response: prompt * n + its number among the prompt's n
    prompt: int
    rid: int
    result: GenerationResult  # the scheduler's (its log-probabilities)
    text: TextStream
    shown: StopText
    tokens: int = 0  # generated so far
    chars: int = 0  # characters of their text (before any stop string cut it): the next token's offset
    finish: str | None = None


@dataclass
class Delta:
    """What one choice adds to the response at once: text, the log-probabilities of its new tokens with each
    token's offset in its text, and how it ended, at its end."""

    choice: Choice
    text: str = ""
    logprobs: list[tuple[Logprob, int]] = field(default_factory=list)
    finish: str | None = None


@dataclass
class Job:
    """A request's sequences, submitted together."""

    prompts: list[list[int]]
    choices: list[Choice]
    queue: asyncio.Queue
    logprobs: bool  # whether its tokens' log-probabilities are read


class Service:
    """The request logic, apart from the HTTP framework."""

    def __init__(self, engine, model_id: str, max_batch: int = 4, max_queue: int = 64, prefill_chunk: int = 256,
                 template_args: dict | None = None):
        """`template_args`: the chat template arguments of every chat request, below its chat_template_kwargs."""
        if max_queue < 0:
            raise UserError("--max-queue must be 0 or more")
        self.engine, self.model_id = engine, model_id
        self.template_args = check_template_args(dict(template_args or {}))
        self.scheduler = Scheduler(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
        self.worker = Worker(self.scheduler, max_queue)
        self.created = int(time.time())
        self.token_text = TokenText(engine.tokenizer)

    # -- parameters (their types and ranges: `schema.py`) -----------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server runs '{self.model_id}'",
                           param="model", code="model_not_found")

    def sampling(self, req, choice: int) -> Sampling:
        """The request's sampling for its `choice`-th sequence of a prompt: the seed plus `choice` (n choices differ,
        each reproducible); no seed: a fresh one. OpenAI's default temperature is 1."""
        bias = req.logit_bias or {}
        V = self.engine.config.vocab_size
        outside = [t for t in bias if t >= V]
        if outside:
            raise APIError(400, f"'logit_bias': token id {outside[0]} is outside the vocabulary (0..{V - 1})",
                           param="logit_bias", code="invalid_value")
        seed = random.randrange(2**31) if req.seed is None else (req.seed + choice) % SEEDS
        return Sampling(temperature=float(1.0 if req.temperature is None else req.temperature),
                        top_p=float(1.0 if req.top_p is None else req.top_p), top_k=max(req.top_k or 0, 0),
                        min_p=float(req.min_p or 0.0), seed=seed,
                        repetition_penalty=float(1.0 if req.repetition_penalty is None else req.repetition_penalty),
                        presence_penalty=float(req.presence_penalty or 0.0),
                        frequency_penalty=float(req.frequency_penalty or 0.0), logit_bias=bias or None)

    @staticmethod
    def stops(req) -> list[str]:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        return [s for s in stop if s]

    def chat_args(self, req) -> dict:
        """A chat request's template arguments: the server's, its reasoning_effort, and its chat_template_kwargs over
        them."""
        effort = {} if req.reasoning_effort is None else {"reasoning_effort": req.reasoning_effort}
        try:
            return check_template_args({**self.template_args, **effort, **(req.chat_template_kwargs or {})})
        except UserError as e:
            raise APIError(400, str(e), param="chat_template_kwargs", code="invalid_value") from None

    def prompt_ids(self, req, chat: bool) -> list[list[int]]:
        """The request's prompts as token ids (tokenizing: run it off the event loop), each checked against the
        context."""
        param = "messages" if chat else "prompt"
        args = self.chat_args(req) if chat else None
        try:
            prompts = [self.engine.encode(p, chat=chat, template_args=args) for p in req.prompts]
        except UserError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        except Exception as e:  # noqa: BLE001 - a template that raises on these messages
            if not chat:  # the tokenizer itself failed: ours to fix, said without its internals
                raise APIError(500, "cannot tokenize the prompt", code="internal_error", kind="server_error") from None
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages",
                           code="invalid_value") from None
        capacity = self.scheduler.capacity
        for ids in prompts:
            if len(ids) >= capacity:
                raise APIError(400, f"This model's maximum context length is {capacity} tokens; the prompt has "
                                    f"{len(ids)} tokens", param=param, code="context_length_exceeded")
        return prompts

    def _tokenizer(self, param: str):
        if self.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: it takes token ids", param=param, code="invalid_value")
        return self.engine.tokenizer

    def tokenize(self, text: str, special: bool) -> list[int]:
        """/tokenize: `special`: with the BOS (and the like) that the tokenizer adds around a text."""
        return self._tokenizer("content").encode(text, bos=special)

    def detokenize(self, tokens: list[int]) -> str:
        V = self.engine.config.vocab_size
        outside = [t for t in tokens if t >= V]
        if outside:
            raise APIError(400, f"'tokens': token id {outside[0]} is outside the vocabulary (0..{V - 1})",
                           param="tokens", code="invalid_value")
        return self._tokenizer("tokens").decode(tokens)

    # -- generation -------------------------------------------------------------------------------
    def submit(self, req, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
               prompt_logprobs: int | None) -> Job:
        """Queue n sequences per prompt, all at once (503 when the queue cannot take them all; 400 when it never
        could)."""
        n = req.n or 1
        if len(prompts) * n > self.worker.room:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} make {len(prompts) * n} sequences; this server "
                                f"runs or queues {self.worker.room} at most (--max-batch + --max-queue)", param="n",
                           code="invalid_value")
        seqs = [(ids, max_tokens, self.sampling(req, j)) for ids in prompts for j in range(n)]
        rids, results, queue = self.worker.submit(seqs, logprobs, prompt_logprobs)
        stops = self.stops(req)
        choices = [Choice(i, i // n, rid, result, TextStream(self.engine.tokenizer), StopText(stops))
                   for i, (rid, result) in enumerate(zip(rids, results, strict=True))]
        return Job(prompts, choices, queue, logprobs is not None)

    async def pieces(self, job: Job):
        """Yield the request's `Delta`s until every choice has ended. Tokens that arrived while the consumer was
        busy make one delta per choice (one server-sent event), each token still checked for stop strings on its
        own; a stop string ends its choice (its sequence is cancelled). When the consumer stops early (a client
        gone), every sequence still running is cancelled."""
        live = {c.rid: c for c in job.choices}
        try:
            while live:
                events = [await job.queue.get()]
                while not job.queue.empty():
                    events.append(job.queue.get_nowait())
                deltas: dict[int, Delta] = {}
                for rid, tok, reason in events:
                    ch = live.get(rid)
                    if ch is None:  # ended by a stop string: its last events
                        continue
                    if isinstance(tok, APIError):
                        raise tok
                    if isinstance(tok, Exception):
                        raise APIError(500, f"generation failed: {tok}", code="internal_error", kind="server_error")
                    if reason == "error":  # this sequence alone could not start (`Scheduler._admit`)
                        raise APIError(500, "generation failed to start", code="internal_error", kind="server_error")
                    delta = deltas.setdefault(rid, Delta(ch))
                    self._advance(ch, delta, tok, reason, job.logprobs)
                    if ch.finish is not None:
                        del live[rid]
                        if reason is None:  # a stop string: the sequence would go on
                            self.worker.cancel(rid)
                for delta in deltas.values():
                    yield delta
        finally:
            for rid in live:
                self.worker.cancel(rid)

    @staticmethod
    def _advance(ch: Choice, delta: Delta, tok: int | None, reason: str | None, logprobs: bool) -> None:
        piece = ""
        if tok is not None:
            if logprobs:
                delta.logprobs.append((ch.result.logprobs[ch.tokens], ch.chars))
            ch.tokens += 1
            piece = ch.text.push(tok)
        if reason is not None:
            piece += ch.text.flush()
        ch.chars += len(piece)
        delta.text += ch.shown.push(piece, final=reason is not None)
        if ch.shown.stopped:
            ch.finish = "stop"
        elif reason is not None:
            ch.finish = FINISH.get(reason, reason)
        delta.finish = ch.finish

    @staticmethod
    def usage(job: Job) -> dict:
        """Each prompt's tokens once (as OpenAI counts n choices), every choice's generated tokens."""
        prompt = sum(len(ids) for ids in job.prompts)
        completion = sum(c.tokens for c in job.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def metrics(self) -> str:
        table = self.engine.cache.table
        hits, misses = sum(table.hits), sum(table.misses)
        c = self.worker.counts
        rows = [
            ("offload_moe_requests_total", "counter", "requests accepted", c["requests"]),
            ("offload_moe_requests_rejected_total", "counter", "requests refused: the queue was full", c["rejected"]),
            ("offload_moe_prompt_tokens_total", "counter", "prompt tokens of accepted requests", c["prompt_tokens"]),
            ("offload_moe_generation_tokens_total", "counter", "tokens generated", c["completion_tokens"]),
            ("offload_moe_decode_tokens_total", "counter", "tokens generated by decode steps (a prompt's first "
             "token comes from its prefill)", self.scheduler.decode_tokens),
            ("offload_moe_decode_seconds_total", "counter", "seconds spent in decode steps: rate(tokens) / rate("
             "seconds) is the decode tok/s while decoding", self.scheduler.decode_s),
            ("offload_moe_decode_tokens_per_second", "gauge", f"aggregate decode tok/s over the decode steps of the "
             f"last {RECENT_S:.0f} s (0 when none ran)", self.scheduler.decode_rate()),
            ("offload_moe_batch_size", "gauge", "sequences admitted in the batch", len(self.scheduler.active)),
            ("offload_moe_queue_length", "gauge", "requests waiting for a slot", len(self.scheduler.waiting)),
            ("offload_moe_expert_hits_total", "counter", "expert cache hits", hits),
            ("offload_moe_expert_misses_total", "counter", "expert cache misses", misses),
            ("offload_moe_expert_hit_rate", "gauge", "expert cache hit rate overall",
             hits / (hits + misses) if hits + misses else 1.0),
        ]
        counters = self.engine.cache.counters
        accesses = hits + misses
        rows += [
            ("offload_moe_expert_copies_total", "counter", "experts copied to the device", counters.copies),
            ("offload_moe_expert_bytes_to_device_total", "counter", "expert bytes copied to the device",
             counters.bytes_to_device),
            ("offload_moe_prefetch_recall", "gauge", "accesses served by a prefetched expert, over all accesses",
             sum(table.prefetch_hits) / accesses if accesses else 0.0),
        ]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        name = "offload_moe_expert_layer_hit_rate"
        lines += [f"# HELP {name} expert cache hit rate per MoE layer", f"# TYPE {name} gauge"]
        for layer, (h, m) in enumerate(zip(list(table.hits), list(table.misses), strict=True)):
            lines.append(f'{name}{{layer="{layer}"}} {h / (h + m) if h + m else 1.0}')
        return "\n".join(lines) + "\n"
