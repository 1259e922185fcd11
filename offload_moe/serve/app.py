"""An OpenAI-compatible HTTP server over the continuous-batching `Scheduler` (FastAPI + uvicorn: the
`serve` extra).

    python run.py serve --model demo --port 8000 --max-batch 4

The HTTP handlers only tokenize, queue and format, never touch the model: the request logic and the
step thread are `service.py`'s, the responses' shapes `reply.py`'s. Endpoints: GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events or not), POST /tokenize
and /detokenize (llama-server's), GET /health, GET /metrics. With an API key, every route but /health
needs it (`guard.py`). Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
FastAPI and uvicorn are imported where they are used: without them, `require_fastapi` says what to
install.
"""

import asyncio
import contextlib
import json
import logging
import socket

from ..errors import UserError
from .guard import Guard, Limits, allowed_hosts, protocol, quiet_repeats
from .reply import Reply
from .schema import ChatCompletion, Completion, Detokenize, Tokenize, check
from .service import APIError, Service

MISSING = "pip install 'offload_moe[serve]'"
ERROR_DELIVERY_S = 5  # after the shutdown grace, the time its error events get before uvicorn cancels the streams


def require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"serve needs FastAPI and uvicorn ({e.name} is missing): {MISSING}") from None


def create_app(service: Service, limits: Limits | None = None, hosts: set[str] | None = None,
               api_key: str | None = None):
    """The FastAPI application over a Service, behind the `Guard` (`hosts`: the Host names it answers, None any;
    `api_key`: the bearer token every route but /health needs, None none); the step thread starts and stops with
    it."""
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
    add_token_routes(app, service)
    return Guard(app, limits or Limits(), hosts, api_key)


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


def add_token_routes(app, service: Service) -> None:
    """POST /tokenize ({"content"} -> {"tokens"}) and /detokenize ({"tokens"} -> {"content"}), llama-server's; they
    take vLLM's names too (prompt, add_special_tokens; the text also as "prompt")."""
    from fastapi import Request

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = check(Tokenize, await read_body(request))
        return {"tokens": await asyncio.to_thread(service.tokenize, req.text, req.special)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = check(Detokenize, await read_body(request))
        text = await asyncio.to_thread(service.detokenize, req.tokens)
        return {"content": text, "prompt": text}


async def complete(service: Service, request, chat: bool):
    """A completion request: checked (`schema`), tokenized off the event loop, its sequences queued (503 when the
    queue is full), answered whole or streamed (`reply`)."""
    req = check(ChatCompletion if chat else Completion, await read_body(request))
    service.check_model(req.model)
    prompts = await asyncio.to_thread(service.prompt_ids, req, chat)  # a long prompt must not stall other streams
    max_tokens = req.token_limit
    if max_tokens is None:  # OpenAI's defaults: 16 for a text completion, the rest of the context for a chat
        max_tokens = service.scheduler.capacity - len(prompts[0]) if chat else 16
    echo = None
    if chat:
        logprobs, prompt_logprobs = (req.top_logprobs or 0) if req.logprobs else None, None
    else:
        logprobs = req.logprobs
        prompt_logprobs = logprobs if req.echo else None
        if req.echo:
            echo = [p if isinstance(p, str) else service.engine.tokenizer.decode(ids)
                    for p, ids in zip(req.prompts, prompts, strict=True)]
    job = service.submit(req, prompts, max_tokens, logprobs, prompt_logprobs)
    reply = Reply(service, job, chat, bool(req.stream_options and req.stream_options.include_usage), echo)
    gen = service.pieces(job)
    if req.stream:
        return reply.streamed(gen)
    return await reply.whole(request, gen)


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
                access_log: bool = False, api_key: str | None = None):
    """A uvicorn.Server for the app on `sock` (run it with `server.run(sockets=[sock])`), with the `limits`: the
    Host names of the bound address, the protocol's bounds, and on shutdown a drain (`Worker.drain`); uvicorn logs
    from `log_level` up, and with `access_log` a line per request whatever that level; `api_key`: the bearer token
    every route but /health needs."""
    import uvicorn

    limits = limits or Limits()
    # on a loaded 2-core machine 2 s after the grace was once too little for the event loop to write an error out
    hosts = allowed_hosts(sock.getsockname()[0], limits.allowed_hosts)
    config = uvicorn.Config(create_app(service, limits, hosts, api_key), log_level=log_level, access_log=access_log,
                            lifespan="on", http=protocol(limits), limit_concurrency=limits.max_connections,
                            timeout_keep_alive=5,
                            timeout_graceful_shutdown=int(limits.shutdown_grace) + ERROR_DELIVERY_S)
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

