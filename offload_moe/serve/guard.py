"""What keeps one careless or hostile client from hurting the others, before a request reaches the app.

- `Guard`, an ASGI middleware: a Host (or Origin) that is not this server's is a 403 (a web page cannot reach a
  local server through DNS rebinding or a cross-site form); with an API key (serve --api-key, OFFLOAD_MOE_API_KEY),
  a request to any route but /health without `Authorization: Bearer <key>` is a 401 (compared in constant time);
  a POST whose body is not `application/json` is a 415
  (a cross-site form or plain-text POST cannot be one); a body over `max_request_bytes` is a 413, refused by its
  Content-Length or as soon as it grows past the bound, never read whole into memory.
- `protocol(limits)`: uvicorn's h11 protocol with the two bounds it lacks: a connection whose request headers have
  not all arrived `header_timeout` seconds after it opened (or after its previous response) is closed, and a
  connection beyond `max_connections` open ones is closed at once (file descriptors run out before that).
- `quiet_repeats`: the same error logged again within 10 s is counted, not printed (a flood of bad connections
  must not flood stderr).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK = ("localhost", "127.0.0.1", "::1")
API_KEY_ENV = "OFFLOAD_MOE_API_KEY"  # serve --api-key's default (vLLM's is VLLM_API_KEY)


@dataclass
class Limits:
    """The serve command's bounds (its flags)."""

    max_request_bytes: int = 4 * 2**20  # a request body; a prompt the context holds is far smaller
    max_connections: int = 256  # open at once
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    shutdown_grace: float = 10.0  # seconds running requests get to finish on SIGTERM / Ctrl-C
    allowed_hosts: tuple[str, ...] = ()  # Host / Origin names besides the bound address and loopback ("*": any)


def allowed_hosts(bound: str, extra: tuple[str, ...]) -> set[str] | None:
    """The host names a request may carry (None: any): a server bound to a loopback address answers loopback names
    only; one bound to every address (0.0.0.0, ::) or another address answers any, as its user exposed it."""
    if "*" in extra or bound not in (*LOOPBACK, "0:0:0:0:0:0:0:1") and not bound.startswith("127."):
        return None
    return {*LOOPBACK, bound, *extra}


def host_of(netloc: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    return urlsplit(f"//{netloc}").hostname or ""


async def reject(send, status: int, message: str, code: str | None = None, headers: tuple = ()) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


OPEN_PATHS = ("/health",)  # what answers without the API key (a load balancer's probe)


def authorized(header: bytes | None, key: bytes) -> bool:
    """`Authorization: Bearer <key>` (the scheme in any case), the key compared in constant time."""
    scheme, _, token = (header or b"").partition(b" ")
    return hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"


class Guard:
    """The checks above, as pure ASGI middleware around the app."""

    def __init__(self, app, limits: Limits, hosts: set[str] | None, api_key: str | None = None):
        self.app, self.limits, self.hosts = app, limits, hosts
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None:
            host, origin = headers.get("host", ""), headers.get("origin")
            checked = [("host", host, host_of(host))]  # a request without a Host header is refused too
            if origin:
                checked.append(("origin", origin, host_of(urlsplit(origin).netloc)))
            for name, value, hostname in checked:
                if hostname not in self.hosts:
                    return await reject(send, 403, f"{name} {value!r} is not this server's (serve --allow-host adds "
                                                   "one)")
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), None)
            if not authorized(given, self.key):
                return await reject(send, 401, "a missing or wrong API key: send Authorization: Bearer <key>",
                                    code="invalid_api_key", headers=((b"www-authenticate", b"Bearer"),))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return await reject(send, 415, "a request body must be JSON (Content-Type: application/json)")
        limit, length = self.limits.max_request_bytes, headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await reject(send, 413, f"the request body is over {limit} bytes (serve --max-request-bytes)")
        body = await read_bounded(receive, limit)
        if body is None:
            return await reject(send, 413, f"the request body is over {limit} bytes (serve --max-request-bytes)")
        return await self.app(scope, replay(body, receive), send)


async def read_bounded(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


def replay(body: bytes, receive):
    """A `receive` that gives the app the body already read, then waits on the connection (disconnects)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def protocol(limits: Limits):
    """uvicorn's h11 protocol class with the header deadline and the connection cap."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Bounded(H11Protocol):
        deadline = None
        armed_for = None  # the request cycle when the deadline was set: a new one means the headers arrived

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.close()
                return
            self.arm()

        def arm(self) -> None:
            self.armed_for = self.cycle
            self.deadline = self.loop.call_later(limits.header_timeout, self.too_slow)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def too_slow(self) -> None:
            if self.cycle is self.armed_for:  # no new request's headers since armed
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self.armed_for:
                self.disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.disarm()
                self.arm()  # the next request's headers get the same bound

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return Bounded


class QuietRepeats(logging.Filter):
    """Lets a message template through once per `every` seconds; says how many were held back."""

    def __init__(self, every: float = 10.0):
        super().__init__()
        self.every, self.last, self.held = every, {}, {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, str(record.msg)), time.monotonic()
        if now - self.last.get(key, -self.every) < self.every:
            self.held[key] = self.held.get(key, 0) + 1
            return False
        self.last[key] = now
        held = self.held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it held back)"
        if record.exc_info and held:  # one traceback is enough to diagnose a flood
            record.exc_info = None
        return True


def quiet_repeats() -> None:
    """Rate-limit the logs that a flood of bad connections fills (uvicorn's and asyncio's accept errors)."""
    for name in ("uvicorn.error", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietRepeats) for f in logger.filters):
            logger.addFilter(QuietRepeats())
