"""A completion request's response, in OpenAI's shape for a chat or a text completion, whole or streamed as
server-sent events; its log-probabilities in OpenAI's two shapes:

  chat         choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
               "logprob", "bytes"}, ...]}, ...], "refusal": null}: the top_logprobs most likely tokens at each place.
  completions  choices[i].logprobs = {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (the legacy
               shape): top_logprobs a {token: logprob} per token, the `logprobs` most likely and the chosen one;
               text_offset each token's character offset in the choice's text. With echo the prompt's tokens come
               first, the first one's logprob and top_logprobs null (lm-evaluation-harness's loglikelihood reads
               these).

A token's `bytes` are its own (`tokens.TokenText`), so a choice's tokens' bytes join into its text; `token` is them as
text. Log-probabilities are the model's (before any bias, penalty or temperature), at least -9999 (OpenAI's floor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import defaultdict

from ..generate import Logprob
from ..tokenizer import TextStream
from .service import APIError, Choice, Delta, Job, Service

FLOOR = -9999.0
Entry = tuple[int, Logprob | None, int]  # a token, its log-probabilities (None: the prompt's first), its offset


class Reply:
    """The response to one completion request. `echo`: per prompt, the text before its choices' text."""

    def __init__(self, service: Service, job: Job, chat: bool, include_usage: bool, echo: list[str] | None = None):
        self.service, self.job, self.chat, self.include_usage, self.echo = service, job, chat, include_usage, echo
        kind = "chatcmpl" if chat else "cmpl"
        self.id, self.created = f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.text_of = service.token_text

    # -- log-probabilities -----------------------------------------------------------------------------
    def prompt_entries(self, ch: Choice) -> list[Entry]:
        """The echoed prompt's tokens, their log-probabilities (the scheduler's) and offsets in its decoded text."""
        ids, lps = self.job.prompts[ch.prompt], ch.result.prompt_logprobs or []
        stream, chars, entries = TextStream(self.service.engine.tokenizer), 0, []
        for i, t in enumerate(ids):
            entries.append((t, lps[i] if i < len(lps) else None, chars))
            chars += len(stream.push(t))
        return entries

    def entries(self, delta: Delta) -> list[Entry]:
        shift = len(self.echo[delta.choice.prompt]) if self.echo is not None else 0
        return [(lp.token, lp, offset + shift) for lp, offset in delta.logprobs]

    def logprobs(self, entries: list[Entry]) -> dict | None:
        if not self.job.logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_entry(lp) for _, lp, _ in entries], "refusal": None}
        tops = []
        for token, lp, _ in entries:
            top = None
            if lp is not None:
                top = {self.text_of(t)[0]: max(v, FLOOR) for t, v in lp.top}
                top.setdefault(self.text_of(token)[0], max(lp.logprob, FLOOR))  # OpenAI's: the chosen one too
            tops.append(top)
        return {"tokens": [self.text_of(t)[0] for t, _, _ in entries],
                "token_logprobs": [None if lp is None else max(lp.logprob, FLOOR) for _, lp, _ in entries],
                "top_logprobs": tops, "text_offset": [offset for *_, offset in entries]}

    def _chat_entry(self, lp: Logprob) -> dict:
        def one(token: int, value: float) -> dict:
            text, raw = self.text_of(token)
            return {"token": text, "logprob": max(value, FLOOR), "bytes": raw}

        return {**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}

    # -- the response ----------------------------------------------------------------------------------
    def chunk(self, index: int, text: str | None, logprobs: dict | None = None, finish: str | None = None,
              whole: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if whole:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    async def whole(self, request, gen):
        from fastapi.responses import Response

        deltas = await collect(request, gen)
        if deltas is None:  # the client is gone: its sequences were cancelled
            return Response(status_code=499)
        texts: dict[int, str] = defaultdict(str)
        entries: dict[int, list[Entry]] = defaultdict(list)
        for d in deltas:
            texts[d.choice.index] += d.text
            entries[d.choice.index] += self.entries(d)
        choices = []
        for ch in self.job.choices:
            text, lps = texts[ch.index], entries[ch.index]
            if self.echo is not None:
                text = self.echo[ch.prompt] + text
                lps = self.prompt_entries(ch) + lps if self.job.logprobs else lps
            choices.append(self.chunk(ch.index, text, self.logprobs(lps), ch.finish, whole=True))
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.service.model_id, "choices": choices,
                "usage": self.service.usage(self.job)}

    def streamed(self, gen):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self.events(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def sse(self, choices, usage=None) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.service.model_id, "choices": choices}
        if self.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    async def events(self, gen):
        """A chat's choices open with the assistant's role; with echo, a choice's first event is its prompt; each
        delta is an event (its text and its tokens' log-probabilities), a choice's end one more."""
        started: set[int] = set()
        try:
            try:
                if self.chat:
                    for ch in self.job.choices:
                        yield self.sse([{"index": ch.index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])
                async for d in gen:
                    ch = d.choice
                    if self.echo is not None and ch.index not in started:
                        started.add(ch.index)
                        echoed = self.prompt_entries(ch) if self.job.logprobs else []
                        yield self.sse([self.chunk(ch.index, self.echo[ch.prompt], self.logprobs(echoed))])
                    lps = self.entries(d)
                    if d.text or lps:
                        yield self.sse([self.chunk(ch.index, d.text, self.logprobs(lps))])
                    if d.finish is not None:
                        yield self.sse([self.chunk(ch.index, None, finish=d.finish)])
                if self.include_usage:
                    yield self.sse([], self.service.usage(self.job))
            except APIError as e:  # the headers are sent: the error is the stream's last event (OpenAI's way)
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()


async def collect(request, gen) -> list[Delta] | None:
    """Every delta; None when the client disconnects first (checked every 0.05 s: the request is then cancelled,
    as a stream's is)."""
    async def join():
        return [d async for d in gen]

    task = asyncio.ensure_future(join())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.05)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
    finally:
        if not task.done():
            task.cancel()  # the generator's own cleanup cancels the request
        else:
            await gen.aclose()
