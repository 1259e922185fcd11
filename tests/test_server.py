"""The OpenAI-compatible server (`offload_moe.serve`), in this process on 127.0.0.1 and an ephemeral
port, driven by the official `openai` client: its text equals Engine.generate's, streamed or not,
alone or beside other streams; chat through a checkpoint's template; errors in OpenAI's shape; a
client gone mid-stream frees its sequence."""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from families import make_family  # noqa: E402
from serving import Running  # noqa: E402

from offload_moe.cli.parser import build_parser  # noqa: E402
from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.errors import UserError  # noqa: E402
from offload_moe.generate import GenerationResult, StopText  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.planning.trace import load_trace  # noqa: E402
from offload_moe.serve.schema import ChatCompletion, check  # noqa: E402
from offload_moe.serve.service import Choice, Job, Service  # noqa: E402
from offload_moe.tokenizer import TextStream  # noqa: E402

PROMPTS = ["def fib(n):", "import os\n", 'class Config:\n    """']
TOKENS = 24
CONTEXT = 512  # the demo holds 256


@pytest.fixture(scope="module")
def demo():
    engine = Engine.load(resolve_model("demo"), EngineOptions(context=CONTEXT, cache_experts=2, progress=False))
    refs = {p: engine.generate(p, TOKENS).text for p in PROMPTS}  # before the step thread owns the model
    srv = Running(engine, "demo", max_batch=4, max_queue=1)
    srv.refs = refs
    yield srv
    srv.close()


def complete(client, prompt, stream=False, **kw):
    if not stream:
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=TOKENS, temperature=0, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, finish, usage = [], None, None
    for chunk in client.completions.create(model="demo", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.text)
            finish = c.finish_reason or finish
    return "".join(text), finish, usage


def test_models_and_health(demo):
    assert [m.id for m in demo.client.models.list().data] == ["demo"]
    assert httpx.get(demo.url + "/health", timeout=10).json() == {"status": "ok"}


def test_greedy_equals_generate_streamed_or_not(demo):
    for prompt in PROMPTS[:2]:
        text, finish, usage = complete(demo.client, prompt)
        assert text == demo.refs[prompt]
        assert finish == "length"
        n_prompt = len(demo.service.engine.encode(prompt))
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n_prompt, TOKENS,
                                                                                      n_prompt + TOKENS)
        streamed = complete(demo.client, prompt, stream=True)
        assert streamed[0] == text and streamed[1] == finish
        assert streamed[2].completion_tokens == TOKENS


def test_concurrent_streams_each_equal_alone(demo):
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda p: complete(demo.client, p, stream=True)[0], PROMPTS))
    assert got == [demo.refs[p] for p in PROMPTS]


def test_stop_text_ends_the_output(demo):
    ref = demo.refs[PROMPTS[0]]
    stop = ref[6:9]
    want = ref[: ref.find(stop)]
    for stream in (False, True):
        text, finish, _ = complete(demo.client, PROMPTS[0], stream=stream, stop=["@@never@@", stop])
        assert (text, finish) == (want, "stop")
    assert demo.idle()


def test_zero_max_tokens(demo):
    r = demo.client.completions.create(model="demo", prompt="x", max_tokens=0, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "length", 0)


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


@pytest.mark.parametrize("kw,param", [({"max_tokens": -1}, "max_tokens"), ({"temperature": 2.5}, "temperature"),
                                      ({"temperature": -0.1}, "temperature"), ({"n": 0}, "n"),
                                      ({"n": 6}, "n"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"),
                                      ({"presence_penalty": 2.5}, "presence_penalty"),
                                      ({"logit_bias": {"x": 1}}, "logit_bias"),
                                      ({"logit_bias": {"1": 101}}, "logit_bias"),
                                      ({"logit_bias": {"4096": 1}}, "logit_bias"), ({"logprobs": 21}, "logprobs")])
def test_bad_parameters_are_400(demo, kw, param):
    args = {"model": "demo", "prompt": "x", "max_tokens": 4}
    status, body = error_of(lambda: demo.client.completions.create(**args, extra_body=kw))
    assert status == 400 and body["param"] == param and body["type"] == "invalid_request_error"
    assert complete(demo.client, PROMPTS[0])[0] == demo.refs[PROMPTS[0]]  # still serving


def test_prompt_longer_than_the_context_is_400(demo):
    capacity = demo.service.scheduler.capacity  # the demo's own context, 256, under CONTEXT
    n = capacity + 44
    status, body = error_of(lambda: demo.client.completions.create(model="demo", prompt=[1] * n, max_tokens=4))
    assert status == 400 and body["code"] == "context_length_exceeded"
    assert str(capacity) in body["message"] and str(n) in body["message"]


def test_unknown_model_and_route_are_404(demo):
    status, body = error_of(lambda: demo.client.completions.create(model="gpt-4", prompt="x", max_tokens=2))
    assert status == 404 and body["code"] == "model_not_found"
    r = httpx.post(demo.url + "/v1/nope", json={}, timeout=10)
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(demo.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and "message" in r.json()["error"]
    r = httpx.post(demo.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert complete(demo.client, PROMPTS[1])[0] == demo.refs[PROMPTS[1]]


def test_full_queue_is_503_and_a_client_gone_is_cancelled(demo):
    """max_batch 4 + max_queue 1: five held streams, the sixth is refused; closing the streams mid-way
    cancels their sequences at the next step."""
    streams = [demo.client.completions.create(model="demo", prompt=PROMPTS[i % 3], max_tokens=CONTEXT,
                                              temperature=0, stream=True) for i in range(5)]
    try:
        next(iter(streams[0]))  # one token arrived: the step thread is running them
        status, body = error_of(lambda: demo.client.completions.create(model="demo", prompt="x", max_tokens=2))
        assert status == 503 and body["code"] == "queue_full" and set(body) == {"message", "type", "param", "code"}
        sizes, deadline = demo.service.scheduler.batch_sizes, time.monotonic() + 10
        while max(sizes, default=0) < 4 and time.monotonic() < deadline:  # the four admitted decode together
            time.sleep(0.01)
        assert max(sizes) == 4
    finally:
        for s in streams:
            s.close()
    assert demo.idle(), "the cancelled sequences were not freed"
    finished = demo.service.scheduler.finished
    assert sum(r.result.stop_reason == "cancelled" for r in finished.values()) >= 4
    assert complete(demo.client, PROMPTS[2])[0] == demo.refs[PROMPTS[2]]


def test_tokens_that_wait_in_the_queue_make_one_piece(demo):
    """A stream that falls behind the step thread gets every queued token in one piece (one event); a stop
    string is still found token by token: the text ends before it and the usage counts the tokens up to it."""
    svc, tok = demo.service, demo.service.engine.tokenizer
    ids = svc.engine.encode("def fib(n):\n    return fib(n - 1) + fib(n - 2)\n")

    async def run(stops):
        choice = Choice(0, 0, -1, GenerationResult([]), TextStream(tok), StopText(stops))
        job = Job([], [choice], asyncio.Queue(), logprobs=False)
        for event in [(-1, t, None) for t in ids[:-1]] + [(-1, ids[-1], "length")]:
            job.queue.put_nowait(event)
        return [d.text async for d in svc.pieces(job)], choice

    pieces, choice = asyncio.run(run([]))
    assert pieces == [tok.decode(ids)] and (choice.tokens, choice.finish) == (len(ids), "length")
    pieces, choice = asyncio.run(run(["fib(n - 1)"]))
    assert pieces == [tok.decode(ids).split("fib(n - 1)")[0]] and choice.finish == "stop"
    assert 0 < choice.tokens < len(ids)
    assert "fib(n - 1)" in tok.decode(ids[: choice.tokens]) and "fib(n - 2)" not in pieces[0]
    assert demo.idle()


def test_a_client_gone_before_a_whole_completion_is_cancelled(demo):
    assert demo.idle()
    sched = demo.service.scheduler
    before = {rid for rid, r in sched.finished.items() if r.result.stop_reason == "cancelled"}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(demo.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0},
                   timeout=httpx.Timeout(10, read=0.05))  # 250 tokens: 0.6 s here
    assert demo.idle(), "the request of the client gone was not freed"
    assert {rid for rid, r in sched.finished.items() if r.result.stop_reason == "cancelled"} - before


def test_metrics(demo):
    """Every figure the issue lists, parsed from the Prometheus text: requests, tokens in and out, decode
    tok/s (counters of decode tokens and seconds, and a gauge over the last 10 s), batch size, queue length,
    hit rate overall and per layer, bytes copied, prefetch recall; each sample under its # TYPE."""
    assert demo.idle()
    with ThreadPoolExecutor(2) as pool:  # two streams: decode steps of 2 sequences, within the gauge's window
        list(pool.map(lambda p: complete(demo.client, p), PROMPTS[:2]))
    text = httpx.get(demo.url + "/metrics", timeout=10).text
    values, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif not line.startswith("#"):
            name, value = line.split()
            values[name] = float(value)
            assert name.split("{")[0] in types, name
    p = "offload_moe_"
    listed = ["requests_total", "prompt_tokens_total", "generation_tokens_total", "decode_tokens_total",
              "decode_seconds_total", "decode_tokens_per_second", "batch_size", "queue_length", "expert_hit_rate",
              "expert_bytes_to_device_total", "expert_copies_total", "prefetch_recall"]
    assert {p + n for n in listed} <= set(values)
    assert all(types[p + n] == ("counter" if n.endswith("_total") else "gauge") for n in listed)
    assert values[p + "requests_total"] >= 2 and values[p + "prompt_tokens_total"] > 0
    generated = values[p + "generation_tokens_total"]
    assert 0 < values[p + "decode_tokens_total"] <= generated  # prefills made the first tokens
    assert values[p + "decode_seconds_total"] > 0
    rate = values[p + "decode_tokens_per_second"]
    assert 0 < rate and rate == pytest.approx(demo.service.scheduler.decode_rate(), rel=0.5)
    assert (values[p + "batch_size"], values[p + "queue_length"]) == (0, 0)  # idle again
    assert 0 <= values[p + "expert_hit_rate"] <= 1 and 0 <= values[p + "prefetch_recall"] <= 1
    assert values[p + "expert_bytes_to_device_total"] > 0  # 2 of 8 experts cached: misses copied
    layers = [k for k in values if k.startswith(p + 'expert_layer_hit_rate{layer="')]
    assert len(layers) == demo.service.engine.config.n_moe_layers
    assert all(0 <= values[k] <= 1 for k in layers)


def test_chat_with_the_checkpoints_template(tmp_path):
    path = make_family(tmp_path / "qwen3", "qwen3_moe", seed=1, tokenizer="qwen3_5")
    engine = Engine.load(path, EngineOptions(progress=False))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    ref = engine.generate(messages, 12)
    srv = Running(engine, "qwen3", max_batch=2)
    try:
        r = srv.client.chat.completions.create(model="qwen3", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].finish_reason == ("stop" if ref.stop_reason == "eos" else "length")
        assert r.usage.prompt_tokens == len(ref.prompt_ids)
        assert r.usage.completion_tokens == len(ref.tokens)
        parts = [c.choices[0].delta.content or "" for c in srv.client.chat.completions.create(
            model="qwen3", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices]
        assert "".join(parts) == ref.text
        check_chat_template_kwargs(srv, engine, messages)
    finally:
        srv.close()
    # the server's default (serve --chat-template-arg), under a request's chat_template_kwargs
    service = Service(engine, "qwen3", max_batch=1, template_args={"enable_thinking": False})
    for kwargs, thinking in ((None, False), ({"enable_thinking": True}, True), ({"x": 1}, False)):
        req = check(ChatCompletion, {"messages": messages, "chat_template_kwargs": kwargs})
        want = engine.encode(messages, template_args={"enable_thinking": thinking})
        assert service.prompt_ids(req, chat=True) == [want]
    with pytest.raises(UserError, match="'tools' cannot be a chat template argument"):
        Service(engine, "qwen3", max_batch=1, template_args={"tools": []})
    args = build_parser().parse_args(["serve", "--chat-template-kwargs", '{"a": 1, "b": 2}', "--chat-template-arg",
                                      "a=x"])
    assert args.template_args == {"a": "x", "b": 2}


def check_chat_template_kwargs(srv, engine, messages) -> None:
    """vLLM's chat_template_kwargs reach the template (Qwen3.5's enable_thinking: the prompt changes); a field that
    is not an object, or a name the renderer sets, is a 400 naming the field."""
    args = {"enable_thinking": False}
    ref = engine.generate(messages, 6, template_args=args)
    assert len(ref.prompt_ids) != len(engine.encode(messages))
    r = srv.client.chat.completions.create(model="qwen3", messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"chat_template_kwargs": args})
    assert r.usage.prompt_tokens == len(ref.prompt_ids) and r.choices[0].message.content == ref.text
    for kwargs, says in (([1], "must be an object"), ("x", "must be an object"),
                         ({"messages": []}, "'messages' cannot be a chat template argument")):
        status, body = error_of(lambda kw=kwargs: srv.client.chat.completions.create(
            model="qwen3", messages=messages, max_tokens=2, extra_body={"chat_template_kwargs": kw}))
        assert status == 400 and body["param"] == "chat_template_kwargs" and says in body["message"], body


def test_serve_command_prints_its_address_and_stops_on_a_signal(tmp_path):
    """`run.py serve --port 0` prints the address it listens on, answers, and stops cleanly (exit 0) on SIGINT
    and on SIGTERM, writing its --trace-out; the API key from $OFFLOAD_MOE_API_KEY is required."""
    import os
    import selectors
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for sig in (signal.SIGINT, signal.SIGTERM):
        cmd = [sys.executable, str(root / "run.py"), "serve", "--model", "demo", "--port", "0", "--max-batch", "2",
               "--trace-out", str(tmp_path / f"{sig.name}.trace")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=root,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OFFLOAD_MOE_API_KEY": "k3y"})
        try:
            sel = selectors.DefaultSelector()
            sel.register(proc.stderr, selectors.EVENT_READ)
            err, url, deadline = b"", None, time.monotonic() + 60
            while url is None and time.monotonic() < deadline and proc.poll() is None:
                if sel.select(timeout=1):
                    err += os.read(proc.stderr.fileno(), 4096)
                    for line in err.decode().splitlines():
                        if line.startswith("serving demo at "):
                            url = line.split()[3]
            assert url is not None, err.decode()[-2000:]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and "API key required" in err.decode()
            assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).json() == {"status": "ok"}
            body = {"prompt": "import os", "max_tokens": 5, "temperature": 0}
            assert httpx.post(url + "/completions", json=body, timeout=30).status_code == 401
            r = httpx.post(url + "/completions", json=body, headers={"Authorization": "Bearer k3y"}, timeout=30)
            assert r.json()["usage"]["completion_tokens"] == 5
            proc.send_signal(sig)
            rest = proc.communicate(timeout=30)[1]
            assert proc.returncode == 0, rest.decode()[-2000:]
            assert "stopped" in rest.decode()
            trace = load_trace(tmp_path / f"{sig.name}.trace")
            assert trace.experts.shape[0] == 3 + 5 - 1  # the prompt's tokens and the fed ones
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_serve_without_fastapi_is_one_line(capsys, monkeypatch):
    from conftest import run_cli

    monkeypatch.setitem(sys.modules, "fastapi", None)
    code, _, err = run_cli(capsys, "serve", "--model", "demo")
    assert code == 1
    assert err.strip().count("\n") == 0 and "pip install 'offload_moe[serve]'" in err


def test_serve_refuses_an_empty_api_key(capsys):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "serve", "--model", "demo", "--api-key", "")
    assert code == 1 and err.strip().count("\n") == 0 and "--api-key must not be empty" in err


def test_serve_refuses_a_port_out_of_range(capsys):
    from offload_moe.cli.entry import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "demo", "--port", "70000"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "a port is 0 to 65535, got 70000" in err and "Traceback" not in err
