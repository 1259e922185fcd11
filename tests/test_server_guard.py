"""The server against careless and hostile clients (issue 23): one bad request never touches another, and the
server keeps serving: out-of-range seeds, a request whose start fails, oversized or non-JSON bodies, foreign
Host and Origin headers, deep JSON, slow headers, too many connections, a full queue's Retry-After, a shutdown
with streams running; and a fuzz of the request schema."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serving import Running  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.serve.guard import Limits, QuietRepeats  # noqa: E402

PROMPT = "def fib(n):"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def engine():
    return Engine.load(resolve_model("demo"), EngineOptions(cache_experts=2, progress=False))


@pytest.fixture(scope="module")
def srv(engine):
    limits = Limits(max_request_bytes=4096, max_connections=8, header_timeout=0.5)
    running = Running(engine, "demo", limits=limits, max_batch=2, max_queue=2)
    running.ref = running.client.completions.create(model="demo", prompt=PROMPT, max_tokens=4,
                                                    temperature=0).choices[0].text
    yield running
    running.close()


def post(srv, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + "/v1/completions", content=content, headers=kw.pop("headers", JSON), timeout=30, **kw)


def still_serving(srv) -> None:
    r = srv.client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == srv.ref
    assert srv.idle() and len(srv.service.scheduler.free) == srv.service.scheduler.max_batch  # no slot leaked


@pytest.mark.parametrize("seed", [2**64, -1, 2**70, "1", 1.5, True])
def test_a_seed_out_of_range_is_400_and_leaks_nothing(srv, seed):
    for _ in range(3):  # four such requests used to leave the server deaf
        r = post(srv, {"prompt": PROMPT, "max_tokens": 2, "temperature": 0.5, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = post(srv, {"prompt": PROMPT, "max_tokens": 2, "temperature": 0.5, "seed": 2**64 - 1})
    assert r.status_code == 200
    still_serving(srv)


def test_a_request_that_fails_to_start_fails_alone(srv, monkeypatch):
    import offload_moe.batch as batch

    real = batch.sampling_generator

    def fragile(sampling, device):
        if sampling.seed == 666:
            raise RuntimeError("boom")
        return real(sampling, device)

    monkeypatch.setattr(batch, "sampling_generator", fragile)
    stream = srv.client.completions.create(model="demo", prompt=PROMPT, max_tokens=64, temperature=0.5, seed=1,
                                           stream=True)
    next(iter(stream))  # running beside the bad one
    r = post(srv, {"prompt": PROMPT, "max_tokens": 2, "temperature": 0.5, "seed": 666})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert sum(1 for _ in stream) > 0  # the other stream goes on to its end
    still_serving(srv)


def test_bodies_too_large_or_not_json_are_refused(srv):
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    assert post(srv, big).status_code == 413  # by its Content-Length
    chunks = (b"x" * 1000 for _ in range(10))  # no Content-Length: refused as it grows
    r = httpx.post(srv.url + "/v1/completions", content=chunks, headers=JSON, timeout=30)
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]["message"]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):  # what a cross-site form can send
        headers = {"content-type": ctype} if ctype else {}
        r = post(srv, {"prompt": PROMPT, "max_tokens": 1}, headers=headers)
        assert r.status_code == 415 and r.headers["content-type"] == "application/json"
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(srv.url + "/v1/completions", content=deep, headers=JSON, timeout=30)
    assert r.status_code in (400, 413) and "error" in r.json()
    still_serving(srv)


def test_deep_json_is_a_400_in_json(engine):
    running = Running(engine, "demo", limits=Limits(max_request_bytes=2**20), max_batch=1, max_queue=0)
    try:
        deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(running.url + "/v1/completions", content=deep, headers=JSON, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    finally:
        running.close()


def test_foreign_host_and_origin_are_403(srv):
    body = {"prompt": PROMPT, "max_tokens": 1}
    assert post(srv, body, headers={**JSON, "host": "evil.example"}).status_code == 403  # DNS rebinding
    assert post(srv, body, headers={**JSON, "origin": "http://evil.example"}).status_code == 403
    assert httpx.get(srv.url + "/v1/models", headers={"host": "evil.example:80"}, timeout=10).status_code == 403
    ok = {**JSON, "host": f"localhost:{srv.port}", "origin": f"http://127.0.0.1:{srv.port}"}
    assert post(srv, body, headers=ok).status_code == 200


def test_a_full_queue_says_when_to_retry(engine):
    running = Running(engine, "demo", max_batch=1, max_queue=0)
    try:
        stream = running.client.completions.create(model="demo", prompt=PROMPT, max_tokens=200, temperature=0,
                                                   stream=True)
        next(iter(stream))
        r = post(running, {"prompt": PROMPT, "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        stream.close()
    finally:
        running.close()


def test_slow_headers_and_too_many_connections_are_closed(srv):
    def closed(sock: socket.socket, within: float) -> bool:
        sock.settimeout(within)
        try:
            return sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            return False

    slow = socket.create_connection(("127.0.0.1", srv.port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    assert closed(slow, 10.0)  # header_timeout 0.5 s; the margin is for a loaded machine
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(12)]  # max_connections 8
    try:
        time.sleep(0.5)  # a loaded machine's event loop may take a while to accept them all
        assert sum(closed(s, 1.0) for s in held) >= 4
    finally:
        for s in held + [slow]:
            s.close()
    time.sleep(0.6)
    still_serving(srv)


def test_shutdown_drains_then_ends_what_is_left_with_an_error(engine):
    running = Running(engine, "demo", limits=Limits(shutdown_grace=0.5), max_batch=2, max_queue=0)
    stream = running.client.completions.create(model="demo", prompt=PROMPT, max_tokens=10_000, temperature=0,
                                               stream=True)
    events = iter(stream)
    next(events)
    got: list = []

    def read():
        try:
            got.extend(events)
        except openai.APIError as e:  # the client raises on the error event: the stream ended with one
            got.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    running.close()  # should_exit: the drain runs, then the server stops
    reader.join(timeout=10)
    assert not reader.is_alive() and got and isinstance(got[-1], openai.APIError)
    assert "shutting down" in str(got[-1])


TEMPLATE_ARG_NAMES = st.sampled_from(["enable_thinking", "messages", "bos_token", "a-b", ""])
REQUEST = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("demo"), st.text(max_size=5), st.integers()),
    "prompt": st.one_of(st.text(max_size=8), st.lists(st.integers(-5, 400), max_size=4),
                        st.lists(st.text(), max_size=2), st.integers(), st.none(),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "max_tokens": st.one_of(st.integers(-3, 2), st.floats(), st.text(max_size=3), st.booleans()),
    "temperature": st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.text(max_size=3), st.none()),
    "top_p": st.one_of(st.floats(allow_nan=True), st.integers(-1, 2), st.none()),
    "seed": st.one_of(st.integers(-2**70, 2**70), st.floats(), st.none()),
    "n": st.one_of(st.integers(-1, 3), st.none()),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3)),
    "stream": st.one_of(st.booleans(), st.integers(0, 1), st.none()),
    "stream_options": st.one_of(st.none(), st.dictionaries(st.just("include_usage"), st.booleans()), st.text()),
    "chat_template_kwargs": st.one_of(st.none(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                                      st.dictionaries(TEMPLATE_ARG_NAMES, st.one_of(st.booleans(), st.text(max_size=3)),
                                                      max_size=2)),
})


@settings(max_examples=40, deadline=None, derandomize=True,  # the same examples in every run: CI is not a lottery
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=REQUEST, chat=st.booleans())
def test_fuzzed_requests_get_a_2xx_or_a_4xx_in_json(srv, body, chat):
    if chat:
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": body.get("prompt")}
    if "max_tokens" not in body or body["max_tokens"] is True:
        body["max_tokens"] = 1  # a valid one generates little
    url = srv.url + ("/v1/chat/completions" if chat else "/v1/completions")
    r = httpx.post(url, content=json.dumps(body).encode(), headers=JSON, timeout=30)
    assert r.status_code < 300 or (400 <= r.status_code < 500 and "error" in r.json()), (r.status_code, r.text)
    if r.status_code < 300 and body.get("stream") is not True:
        assert "choices" in r.json()
    assert srv.idle()


@pytest.mark.parametrize("params", [{"temperature": 1e-45}, {"top_p": 5e-324, "temperature": 1.0},
                                    {"temperature": 1e-6, "seed": 3}])
def test_tiny_temperature_or_top_p_is_greedy_never_nan(srv, params):
    """A temperature under 1e-5 is greedy (dividing by it overflows); a top_p that is 0 in float32 keeps the top
    token. Both used to sample from NaN and emit token 0."""
    r = post(srv, {"prompt": PROMPT, "max_tokens": 4} | params)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == srv.ref


def test_a_missing_prompt_and_a_lone_surrogate_are_400s_that_say_so(srv):
    r = post(srv, {"max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "messages" not in r.text
    r = post(srv, b'{"prompt": "a\\ud800b", "max_tokens": 2}')
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                   headers=JSON, timeout=30)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    still_serving(srv)


def test_a_flood_of_one_error_is_logged_once_per_interval():
    """21,000 bad connections printed 135,167 tracebacks: the same message is now let through once per 10 s,
    with the count held back, and the traceback only the first time."""
    quiet, passed = QuietRepeats(every=10.0), []
    for _ in range(1000):
        record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource",
                                   None, (OSError, OSError(24, "Too many open files"), None))
        if quiet.filter(record):
            passed.append(record)
    assert len(passed) == 1 and quiet.held[("asyncio", "socket.accept() out of system resource")] == 999
    quiet.last = {key: -100.0 for key in quiet.last}  # ten seconds later
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource",
                               None, (OSError, OSError(24, "Too many open files"), None))
    assert quiet.filter(record) and "999 more like it held back" in record.msg and record.exc_info is None
