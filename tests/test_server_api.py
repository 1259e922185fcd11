"""The server's OpenAI parameters beyond the basics (issue 24), through the official `openai` client: log-probabilities
against transformers' log-softmax (echo with max_tokens 0 and 1 as lm-evaluation-harness asks, several prompts,
streamed; a chat's), n choices, penalties, min_p and logit_bias equal to the engine alone (batched together),
fields this server does not implement refused by name, unknown ones ignored, the API key, /tokenize."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")

from families import make_family, reference  # noqa: E402
from serving import Running  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402

TOL = 1e-3
PROMPT = "def fib(n):"


@pytest.fixture(scope="module")
def demo():
    engine = Engine.load(resolve_model("demo"), EngineOptions(cache_experts=2, progress=False))
    srv = Running(engine, "demo", max_batch=4, max_queue=4)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def hf_demo():
    return transformers.MixtralForCausalLM.from_pretrained(resolve_model("demo"), dtype=torch.float32).eval()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax [T, V] of a sequence: row t is the distribution of token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_legacy(lp, ids: list[int], want: torch.Tensor, k: int) -> None:
    """OpenAI's legacy logprobs of a completion that echoes `ids`: the first token's null, then each token's
    log-probability and the top k (and the chosen one), within TOL of transformers' `want`."""
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = torch.tensor(lp.token_logprobs[1 : len(ids)])
    ref = want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (got - ref).abs().max() < TOL
    for t in range(1, len(ids)):
        top = lp.top_logprobs[t]
        assert k <= len(top) <= k + 1 and max(top.values()) == pytest.approx(want[t - 1].max().item(), abs=TOL)
        assert lp.token_logprobs[t] in top.values()
    assert lp.text_offset == sorted(lp.text_offset) and len(lp.tokens) == len(lp.token_logprobs)


def test_echo_logprobs_equal_transformers(demo, hf_demo):
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs 1, max_tokens 1, two prompts in one
    request), max_tokens 0, and a stream of the same."""
    tok = demo.service.engine.tokenizer
    prompts = [tok.encode("def read_config(path):\n    with open(path) as f:"), tok.encode("import os\nimport sys")]
    wants = [hf_logprobs(hf_demo, ids) for ids in prompts]
    r = demo.client.completions.create(model="demo", prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                       temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for c, ids, want in zip(r.choices, prompts, wants, strict=True):
        check_legacy(c.logprobs, ids, want, 1)
        last, top = c.logprobs.token_logprobs[-1], c.logprobs.top_logprobs[-1]
        assert len(c.logprobs.tokens) == len(ids) + 1 and last == max(top.values())  # greedy: lm-eval's is_greedy
        assert abs(last - want[-1].max().item()) < TOL
        assert c.text.startswith(tok.decode(ids))
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 2
    print("echo logprobs, max |diff| vs transformers:", max(
        (torch.tensor(c.logprobs.token_logprobs[1 : len(ids)]) - w[torch.arange(len(ids) - 1), torch.tensor(ids[1:])])
        .abs().max().item() for c, ids, w in zip(r.choices, prompts, wants, strict=True)))

    r = demo.client.completions.create(model="demo", prompt=prompts[0], echo=True, logprobs=3, max_tokens=0)
    c = r.choices[0]
    assert (c.text, c.finish_reason, r.usage.completion_tokens) == (tok.decode(prompts[0]), "length", 0)
    assert len(c.logprobs.token_logprobs) == len(prompts[0])
    check_legacy(c.logprobs, prompts[0], wants[0], 3)

    whole = demo.client.completions.create(model="demo", prompt=PROMPT, echo=True, logprobs=2, max_tokens=5,
                                           temperature=0)
    text, values, offsets = "", [], []
    for chunk in demo.client.completions.create(model="demo", prompt=PROMPT, echo=True, logprobs=2, max_tokens=5,
                                                temperature=0, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.choices[0].text and values == whole.choices[0].logprobs.token_logprobs
    assert offsets == whole.choices[0].logprobs.text_offset
    assert demo.idle()


def test_chat_logprobs_equal_transformers(tmp_path):
    """A chat's logprobs (OpenAI's content entries) through a byte-level tokenizer: each token's bytes join into the
    text, its log-probability and its top ones within TOL of transformers'; streamed, the same entries."""
    path = make_family(tmp_path / "qwen3", "qwen3_moe", seed=1, tokenizer="chatml")
    engine = Engine.load(path, EngineOptions(progress=False))
    messages = [{"role": "user", "content": "Hello, world!"}]
    ref = engine.generate(messages, 10)
    want = hf_logprobs(reference(path, "qwen3_moe"), ref.prompt_ids + ref.tokens)[len(ref.prompt_ids) - 1 :]
    srv = Running(engine, "qwen3", max_batch=2)
    try:
        r = srv.client.chat.completions.create(model="qwen3", messages=messages, max_tokens=10, temperature=0,
                                               logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert r.choices[0].message.content == ref.text and len(content) == len(ref.tokens)
        joined = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")  # random weights: any bytes
        assert joined == ref.text + ("<|im_end|>" if ref.stop_reason == "eos" else "")
        got = torch.tensor([e.logprob for e in content])
        diff = (got - want[torch.arange(len(ref.tokens)), torch.tensor(ref.tokens)]).abs().max().item()
        print(f"chat logprobs, max |diff| vs transformers: {diff:.2e}")
        assert diff < TOL
        for e, row in zip(content, want, strict=False):
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=TOL)
        streamed = [e for chunk in srv.client.chat.completions.create(
            model="qwen3", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3,
            stream=True) for c in chunk.choices if c.logprobs is not None for e in c.logprobs.content]
        assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
        plain = srv.client.chat.completions.create(model="qwen3", messages=messages, max_tokens=2, temperature=0)
        assert plain.choices[0].logprobs is None
    finally:
        srv.close()


def test_n_choices_each_equal_their_seed_alone(demo):
    """n=3 sampled choices: choice j is the engine's text with seed + j; streamed, the same per index."""
    engine = demo.service.engine
    refs = [engine.generate(PROMPT, 8, temperature=0.9, seed=5 + j) for j in range(3)]
    assert len({r.text for r in refs}) > 1
    r = demo.client.completions.create(model="demo", prompt=PROMPT, n=3, max_tokens=8, temperature=0.9, seed=5)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [ref.text for ref in refs]
    assert r.usage.completion_tokens == sum(len(ref.tokens) for ref in refs)
    assert r.usage.prompt_tokens == len(refs[0].prompt_ids)  # the prompt once, as OpenAI counts n choices
    texts = {}
    for chunk in demo.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                                     n=2, max_tokens=6, temperature=0.9, seed=5, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    chat = [engine.generate(PROMPT, 6, chat=True, temperature=0.9, seed=5 + j).text for j in range(2)]
    assert texts == {0: chat[0], 1: chat[1]}
    assert demo.idle()


PARAMS = [{"frequency_penalty": 1.5, "presence_penalty": 0.5}, {"repetition_penalty": 1.4},
          {"min_p": 0.2, "temperature": 0.9, "seed": 4, "top_k": 20}, {"presence_penalty": -1.0, "top_p": 0.9,
                                                                        "temperature": 0.7, "seed": 2}]


def test_penalties_batched_equal_alone(demo):
    """Each parameter set changes the greedy text as defined, and run side by side (one batch) equals the engine
    alone with the same keywords."""
    engine = demo.service.engine
    plain = engine.generate(PROMPT, 16).text
    refs = [engine.generate(PROMPT, 16, **p).text for p in PARAMS]
    assert refs[0] != plain and refs[1] != plain  # the penalties change the greedy text

    def one(p):
        return demo.client.completions.create(model="demo", prompt=PROMPT, max_tokens=16,
                                              extra_body={"temperature": 0} | p).choices[0].text

    with ThreadPoolExecutor(len(PARAMS)) as pool:
        assert list(pool.map(one, PARAMS)) == refs
    assert max(demo.service.scheduler.batch_sizes) > 1


def test_logit_bias(demo):
    """+100 on a token makes it every greedy pick; -100 on the greedy first token removes it."""
    tok, engine = demo.service.engine.tokenizer, demo.service.engine
    x = tok.encode(" x", bos=False)[-1]
    r = demo.client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={x: 100})
    assert r.choices[0].text == tok.decode([x] * 4)
    first = engine.generate(PROMPT, 1).tokens[0]
    r = demo.client.completions.create(model="demo", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(first): -100})
    assert r.choices[0].text != tok.decode([first])
    assert r.choices[0].text == engine.generate(PROMPT, 1, logit_bias={first: -100}).text


@pytest.mark.parametrize("chat,field,value", [
    (True, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    (True, "tool_choice", "required"), (True, "response_format", {"type": "json_object"}),
    (True, "functions", [{"name": "f"}]), (True, "top_logprobs", 2), (True, "modalities", ["text", "audio"]),
    (False, "best_of", 2), (False, "suffix", "\n}")])
def test_unimplemented_fields_are_400_by_name(demo, chat, field, value):
    status, body = post(demo, chat, {field: value})
    assert status == 400 and body["error"]["param"] == field and "does not support" in body["error"]["message"]


def test_harmless_and_unknown_fields_are_ignored_and_logged(demo, caplog):
    caplog.set_level(logging.DEBUG, logger="offload_moe.serve")
    for chat, extra in ((True, {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}}),
                        (False, {"best_of": 1, "suffix": ""}),
                        (True, {"user": "u1", "store": False, "vendor_knob": {"x": 1}})):
        status, body = post(demo, chat, extra)
        assert status == 200, body
    assert any("vendor_knob" in r.getMessage() and "user" in r.getMessage() for r in caplog.records)


def post(srv, chat: bool, extra: dict, headers: dict | None = None) -> tuple[int, dict]:
    body = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}) | {"max_tokens": 2}
    r = httpx.post(srv.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body | extra,
                   headers=headers, timeout=30)
    return r.status_code, r.json()


def test_tokenize_and_detokenize(demo):
    tok = demo.service.engine.tokenizer
    text = "def fib(n):\n    return n"
    r = httpx.post(demo.url + "/tokenize", json={"content": text}, timeout=10).json()
    assert r == {"tokens": tok.encode(text, bos=False)}
    special = httpx.post(demo.url + "/tokenize", json={"prompt": text, "add_special_tokens": True}, timeout=10).json()
    assert special["tokens"] == tok.encode(text)
    back = httpx.post(demo.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=10).json()
    assert back["content"] == text
    for path, body in (("/tokenize", {}), ("/tokenize", {"content": 5}), ("/detokenize", {"tokens": [-1]}),
                       ("/detokenize", {"tokens": [10**6]})):
        r = httpx.post(demo.url + path, json=body, timeout=10)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key(demo):
    """With a key every route but /health needs it (401 in OpenAI's shape otherwise), /metrics and /tokenize too."""
    srv = Running(demo.service.engine, "demo", api_key="s3cret", max_batch=1)
    try:
        assert srv.client.completions.create(model="demo", prompt="x", max_tokens=1).choices[0].finish_reason
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model="demo", prompt="x", max_tokens=1)
        assert info.value.body["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/tokenize"),
                             ("POST", "/v1/chat/completions")):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
                r = httpx.request(method, srv.url + path, json={"content": "x"}, headers=headers, timeout=10)
                assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        ok = {"authorization": "bearer s3cret"}
        assert httpx.get(srv.url + "/metrics", headers=ok, timeout=10).status_code == 200
        r = httpx.post(srv.url + "/tokenize", json={"content": "x"}, headers=ok, timeout=10)
        assert r.status_code == 200 and json.loads(r.text)["tokens"]
    finally:
        srv.close()
