"""The request logic of the OpenAI-compatible server, apart from the HTTP framework (`app.py`).

One background thread (`Worker`) runs `scheduler.step()` while anything is busy and hands each event
to its request's asyncio queue (`loop.call_soon_threadsafe`). `Service` checks a request's parameters
and prompt, turns its tokens into text pieces (holding back what could begin a stop string) and counts
the metrics. Errors are `APIError`s, in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import random
import threading
import time

from ..batch import RECENT_S, Scheduler
from ..errors import UserError
from ..sampling import Sampling
from ..tokenizer import TextStream, check_template_args

FINISH = {"eos": "stop", "length": "length", "context": "length"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Worker:
    """The one thread that steps the scheduler; hands (token or None, finish reason or None) to each
    request's queue on its event loop."""

    def __init__(self, scheduler: Scheduler, max_queue: int):
        self.sched, self.max_queue = scheduler, max_queue
        self.handlers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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

    def submit(self, ids: list[int], max_tokens: int, sampling: Sampling) -> tuple[int, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:  # the step thread dispatches under this lock: no event before the handler is set
            if self.draining:
                raise APIError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if len(self.handlers) >= self.sched.max_batch + self.max_queue:
                self.counts["rejected"] += 1
                raise APIError(503, f"the server is busy: {len(self.handlers)} requests running or queued "
                                    f"(--max-batch {self.sched.max_batch}, --max-queue {self.max_queue}); retry later",
                               code="queue_full", kind="server_error")
            try:
                rid = self.sched.add(ids, max_tokens, sampling)
            except UserError as e:
                raise APIError(400, str(e), code="invalid_value") from None
            self.handlers[rid] = (loop, queue)
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += len(ids)
        self.wake.set()
        return rid, queue

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
                            sends.setdefault(h[0], []).append((h[1], (tok, reason)))
                            if reason is not None:
                                del self.handlers[rid]
                    for loop, items in sends.items():
                        loop.call_soon_threadsafe(_deliver, items)

    def fail_all(self, error: Exception) -> None:
        """End every request in flight with `error` (an APIError is passed on as it is)."""
        with self.lock:
            for rid, (loop, queue) in self.handlers.items():
                loop.call_soon_threadsafe(queue.put_nowait, (error, "error"))
                self.sched.cancel(rid)
            self.handlers.clear()


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _stop_at(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
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

    # -- parameters (their types and ranges: `schema.py`) -----------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server runs '{self.model_id}'",
                           param="model", code="model_not_found")

    @staticmethod
    def sampling(req) -> Sampling:
        """The request's sampling; no seed: a fresh one (OpenAI's default temperature is 1)."""
        return Sampling(temperature=float(1.0 if req.temperature is None else req.temperature),
                        top_p=float(1.0 if req.top_p is None else req.top_p),
                        seed=req.seed if req.seed is not None else random.randrange(2**31))

    @staticmethod
    def stops(req) -> list[str]:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        return [s for s in stop if s]

    def chat_args(self, req) -> dict:
        """A chat request's template arguments: the server's, and the request's chat_template_kwargs over them."""
        try:
            return check_template_args({**self.template_args, **(req.chat_template_kwargs or {})})
        except UserError as e:
            raise APIError(400, str(e), param="chat_template_kwargs", code="invalid_value") from None

    def prompt_ids(self, req, chat: bool) -> list[int]:
        """The request's prompt as token ids (tokenizing: run it off the event loop), checked against the context."""
        args = self.chat_args(req) if chat else None
        try:
            if chat:
                ids = self.engine.encode([{**m.model_dump(), "content": m.text} for m in req.messages], chat=True,
                                         template_args=args)
            else:
                prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) \
                    else req.prompt
                ids = self.engine.encode(prompt)
        except UserError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt", code="invalid_value") from None
        except Exception as e:  # noqa: BLE001 - a template that raises on these messages
            if not chat:  # the tokenizer itself failed: ours to fix, said without its internals
                raise APIError(500, "cannot tokenize the prompt", code="internal_error", kind="server_error") from None
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages",
                           code="invalid_value") from None
        capacity = self.scheduler.capacity
        if len(ids) >= capacity:
            raise APIError(400, f"This model's maximum context length is {capacity} tokens; the prompt has "
                                f"{len(ids)} tokens", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        return ids

    # -- generation -------------------------------------------------------------------------------
    async def pieces(self, rid: int, queue: asyncio.Queue, stops: list[str], out: dict):
        """Yield request `rid`'s text pieces; `out` gets finish_reason and completion_tokens at the end. Cancels
        the request in the scheduler when the consumer stops early (a client gone) or a stop string ends it.
        Tokens that arrived while the consumer was busy make one piece (one server-sent event), each still
        checked for stop strings on its own."""
        text = TextStream(self.engine.tokenizer)
        full, sent, n, done = "", 0, 0, False
        out["completion_tokens"] = 0
        try:
            while True:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                for tok, reason in events:
                    if isinstance(tok, APIError):
                        done = True
                        raise tok
                    if isinstance(tok, Exception):
                        done = True
                        raise APIError(500, f"generation failed: {tok}", code="internal_error", kind="server_error")
                    if tok is not None:
                        n += 1
                        full += text.push(tok)
                    if reason == "error":  # this request alone could not start (`Scheduler._admit`)
                        done = True
                        raise APIError(500, "generation failed to start", code="internal_error", kind="server_error")
                    if reason is not None:
                        done = True
                        full += text.flush()
                    out["completion_tokens"] = n
                    cut = _stop_at(full, stops)
                    if cut is not None:
                        out["finish_reason"] = "stop"
                        if cut > sent:
                            yield full[sent:cut]
                        return
                    if reason is not None:
                        out["finish_reason"] = FINISH.get(reason, reason)
                        if len(full) > sent:
                            yield full[sent:]
                        return
                safe = len(full) - _held_back(full, stops)
                if safe > sent:
                    yield full[sent:safe]
                    sent = safe
        finally:
            if not done:
                self.worker.cancel(rid)

    def usage(self, ids: list[int], out: dict) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": out["completion_tokens"],
                "total_tokens": len(ids) + out["completion_tokens"]}

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
