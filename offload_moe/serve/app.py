"""An OpenAI-compatible HTTP server over the continuous-batching `Scheduler` (FastAPI + uvicorn: the
`serve` extra).

    python run.py serve --model demo --port 8000 --max-batch 4

The HTTP handlers only tokenize, queue and format, never touch the model: the request logic and the
step thread are `service.py`'s. Endpoints: GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (streamed as server-sent events or not), GET /health, GET /metrics.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}. FastAPI and uvicorn are
imported where they are used: without them, `require_fastapi` says what to install.
"""

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid

from ..errors import UserError
from .guard import Guard, Limits, allowed_hosts, protocol, quiet_repeats
from .schema import ChatCompletion, Completion, check
from .service import APIError, Service

MISSING = "pip install 'offload_moe[serve]'"


def require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"serve needs FastAPI and uvicorn ({e.name} is missing): {MISSING}") from None


def create_app(service: Service, limits: Limits | None = None, hosts: set[str] | None = None):
    """The FastAPI application over a Service, behind the `Guard` (`hosts`: the Host names it answers, None any);
    the step thread starts and stops with it."""
    from fastapi import FastAPI

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()

    app = FastAPI(title="offload_moe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_model_routes(app, service)
    add_completion_routes(app, service)
    return Guard(app, limits or Limits(), hosts)


def add_error_handlers(app) -> None:
    """APIError, and the router's 404 and 405, as JSON in OpenAI's shape."""
    from fastapi.responses import JSONResponse

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        retry = {"Retry-After": "1"} if e.status == 503 else None  # a full queue: worth retrying soon
        return JSONResponse(e.body(), status_code=e.status, headers=retry)

    async def http_error(request, e):
        status = getattr(e, "status_code", 404)
        message = f"Invalid URL ({request.method} {request.url.path})" if status == 404 else str(e.detail)
        return JSONResponse(APIError(status, message).body(), status_code=status)

    app.add_exception_handler(404, http_error)
    app.add_exception_handler(405, http_error)


def add_model_routes(app, service: Service) -> None:
    """GET /health, /metrics, /v1/models and /v1/models/{model}."""
    from fastapi.responses import PlainTextResponse

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(service)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        service.check_model(model)
        return model_card(service)


def model_card(service: Service) -> dict:
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "offload_moe"}


def add_completion_routes(app, service: Service) -> None:
    """POST /v1/completions and /v1/chat/completions."""
    from fastapi import Request

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(service, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(service, request, chat=True)


async def read_body(request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:  # JSON may escape a lone surrogate ("\\ud800"): not text, and no tokenizer should see it
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds a lone surrogate: not valid Unicode text") from None
    return body


async def complete(service: Service, request, chat: bool):
    """A completion request: checked (`schema`), tokenized off the event loop, queued (503 when the queue is
    full), answered whole or streamed."""
    req = check(ChatCompletion if chat else Completion, await read_body(request))
    service.check_model(req.model)
    ids = await asyncio.to_thread(service.prompt_ids, req, chat)  # a long prompt must not stall other streams
    max_tokens = req.token_limit
    if max_tokens is None:  # OpenAI's defaults: 16 for a text completion, the context for a chat
        max_tokens = service.scheduler.capacity - len(ids) if chat else 16
    reply = Reply(service, chat, ids, bool(req.stream_options and req.stream_options.include_usage))
    gen = service.pieces(*service.worker.submit(ids, max_tokens, service.sampling(req)), service.stops(req),
                         reply.out)
    if req.stream:
        return reply.streamed(gen)
    return await reply.whole(request, gen)


class Reply:
    """The response to one completion request, in OpenAI's shape for a chat or a text completion."""

    def __init__(self, service: Service, chat: bool, ids: list[int], include_usage: bool):
        self.service, self.chat, self.ids, self.include_usage = service, chat, ids, include_usage
        kind = "chatcmpl" if chat else "cmpl"
        self.id, self.created = f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.out: dict = {}  # finish_reason and completion_tokens, filled by `Service.pieces`

    async def whole(self, request, gen):
        from fastapi.responses import Response

        text = await collect(request, gen)
        if text is None:  # the client is gone: its sequence was cancelled
            return Response(status_code=499)
        c = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": self.out["finish_reason"]} if self.chat else
             {"index": 0, "text": text, "logprobs": None, "finish_reason": self.out["finish_reason"]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.service.model_id, "choices": [c],
                "usage": self.service.usage(self.ids, self.out)}

    def streamed(self, gen):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self.events(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def choice(self, text: str | None, finish) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def sse(self, choices, usage=None) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.service.model_id, "choices": choices}
        if self.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    async def events(self, gen):
        try:
            try:
                if self.chat:
                    yield self.sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}])
                async for piece in gen:
                    yield self.sse([self.choice(piece, None)])
                yield self.sse([self.choice(None, self.out["finish_reason"])])
                if self.include_usage:
                    yield self.sse([], self.service.usage(self.ids, self.out))
            except APIError as e:  # the headers are sent: the error is the stream's last event (OpenAI's way)
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()


async def collect(request, gen) -> str | None:
    """The whole text; None when the client disconnects first (checked every 0.05 s: the request is
    then cancelled, as a stream's is)."""
    async def join():
        return "".join([piece async for piece in gen])

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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def make_server(service: Service, sock: socket.socket, limits: Limits | None = None, log_level: str = "warning",
                access_log: bool = False):
    """A uvicorn.Server for the app on `sock` (run it with `server.run(sockets=[sock])`), with the `limits`: the
    Host names of the bound address, the protocol's bounds, and on shutdown a drain (`Worker.drain`); uvicorn logs
    from `log_level` up, and with `access_log` a line per request whatever that level."""
    import uvicorn

    limits = limits or Limits()
    hosts = allowed_hosts(sock.getsockname()[0], limits.allowed_hosts)
    config = uvicorn.Config(create_app(service, limits, hosts), log_level=log_level, access_log=access_log,
                            lifespan="on", http=protocol(limits), limit_concurrency=limits.max_connections,
                            timeout_keep_alive=5, timeout_graceful_shutdown=int(limits.shutdown_grace) + 2)
    if access_log:  # its lines are at info, below the default level
        access = logging.getLogger("uvicorn.access")
        access.setLevel(min(access.level, logging.INFO))
    quiet_repeats()

    class Draining(uvicorn.Server):
        async def shutdown(self, sockets=None):
            """New requests get a 503 at once; running ones get `shutdown_grace` seconds to finish, then an
            error (a stream's last event) and their end, before uvicorn's own deadline cancels anything."""
            service.worker.draining = True
            late = asyncio.get_running_loop().call_later(limits.shutdown_grace, service.worker.fail_all,
                                                         APIError(503, "the server is shutting down",
                                                                  code="shutting_down", kind="server_error"))
            try:
                await super().shutdown(sockets)
            finally:
                late.cancel()

    return Draining(config)

