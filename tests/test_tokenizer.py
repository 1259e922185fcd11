"""Tokenizers and chat: tokenizer.json against transformers' AutoTokenizer (ids, special tokens in the text, BOS),
the chat template against `apply_chat_template` (with template arguments: enable_thinking, reasoning_effort, on the
command line too), text prompts through the engine against transformers' model and its `generate`, every EOS id
stopping generation, and streaming that never shows a broken UTF-8 sequence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER, run_cli
from families import FAMILIES, make_family, reference
from hf_tokenizer import add_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.options import EngineOptions
from offload_moe.tokenizer import (
    BUNDLED,
    RESERVED_ARGS,
    HFTokenizer,
    SentencePieceTokenizer,
    TextStream,
    load_tokenizer,
    tokenizer_files,
)

TEXTS = [
    "Hello, world!",
    "Why is the sky blue?",
    "<|im_start|>user\nhi<|im_end|>",  # special tokens written in the text are those tokens
    "<|endoftext|><|endoftext|>a<|im_end|>b",
    "Caf\u00e9 cr\u00e8me, \u4e2d\u6587 \U0001f600\U0001f680 x",
    "  lots   of\n\nspace\t and 's 'll CAPS 12345",
    "",
]
MULTIBYTE = ("na\u00efve \u4e2d\u6587 \u65e5\u672c\u8a9e \U0001f600 "
             "\U0001f468\u200d\U0001f469\u200d\U0001f467 \u00e9t\u00e9")  # 2-, 3- and 4-byte characters, a ZWJ family
CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
STYLES = ["chatml", "qwen3_5", "json_bos", "add_bos"]
PROMPT = "Why is the sky blue? Caf\u00e9 \U0001f600"


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict:
    """Tokenizer folders (no model) per (style, tokenizer_class)."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for style in STYLES:
        for cls in ("PreTrainedTokenizerFast", "Qwen2Tokenizer"):
            d = root / f"{style}-{cls}"
            d.mkdir()
            out[style, cls] = add_tokenizer(d, style, tokenizer_class=cls)
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    """Every family with a tokenizer.json: the Qwen3 ones with Qwen3.5's template (enable_thinking), the others
    with ChatML."""
    root = tmp_path_factory.mktemp("families-tok")
    return {name: make_family(root / name, name, seed=i, tokenizer="qwen3_5" if name.startswith("qwen3") else "chatml")
            for i, name in enumerate(FAMILIES)}


# -- encoding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["PreTrainedTokenizerFast", "Qwen2Tokenizer"])
@pytest.mark.parametrize("style", STYLES)
def test_encoding_equals_transformers(tok_dirs, style, cls):
    path = tok_dirs[style, cls]
    ref = AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        want = ref(text)["input_ids"]
        assert ours.encode(text) == want, text
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=True), text
    assert ours.bos_id == ref.bos_token_id
    assert ours.eos_ids == (ref.eos_token_id,)
    hello = ours.encode("Hello")
    if style == "json_bos":  # tokenizer.json's post-processor puts BOS first; chat templates write their own
        assert hello[0] == ours.bos_id == 0 and ours.encode("Hello", bos=False) == hello[1:]
    else:  # ChatML adds none; add_bos_token in the config is ignored beside a tokenizer.json, as transformers 5 does
        assert 0 not in hello
    special = ours.encode("<|im_start|>user<|im_end|>", bos=False)
    assert special[0] == 1 and special[-1] == 2  # one id each, not their characters


def test_added_and_special_tokens_from_the_config(tmp_path):
    """A token that only tokenizer_config.json declares (added_tokens_decoder), and a named special token that
    neither file lists, are added as transformers adds them."""
    add_tokenizer(tmp_path, "chatml")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["300"] = {"content": "<tool>", "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
    cfg["pad_token"] = "<|pad|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in ("a<tool>b<|pad|>c", "<tool><|im_end|>"):
        assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.tk.token_to_id("<tool>") == 300 and ours.tk.token_to_id("<|pad|>") == 301


def test_tokenizer_json_is_preferred_and_sentencepiece_kept(tmp_path):
    add_tokenizer(tmp_path, "chatml")
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    assert [f.name for f in tokenizer_files(tmp_path)] == ["tokenizer.json", "tokenizer.model",
                                                           "tokenizer_config.json", "generation_config.json"]
    (tmp_path / "tokenizer.json").unlink()
    sp = load_tokenizer(tmp_path)
    assert isinstance(sp, SentencePieceTokenizer) and sp.bos_id == 1 and sp.eos_ids == (2,)
    assert sp.chat("hi") == sp.encode("[INST] hi [/INST]")  # Mixtral's [INST] template, BOS first
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Light."}, {"role": "user", "content": "More?"}]
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in chat])
    assert sp.chat(chat) == MistralTokenizer.v1().encode_chat_completion(request).tokens  # the system prompt too
    assert load_tokenizer(tmp_path / "missing") is None


def test_broken_tokenizer_json_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)


# -- chat -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_chat_template_equals_apply_chat_template(tok_dirs, style):
    path = tok_dirs[style, "PreTrainedTokenizerFast"]
    ref = AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    chats = CHATS + ([[{"role": "system", "content": "Be brief."}, *CHATS[0]]] if style != "json_bos" else [])
    for messages in chats:
        text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.render_chat(messages) == text
        assert ours.chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    if style == "chatml":
        assert ours.render_chat("hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    if style == "json_bos":  # bos_token and eos_token variables, block whitespace removed (trim/lstrip_blocks)
        assert ours.render_chat(CHATS[1]) == "<|endoftext|>[INST] a [/INST] b<|im_end|>[INST] c [/INST]"
        assert ours.chat("hi").count(0) == 1  # the template's BOS only


def test_chat_template_errors(tok_dirs, tmp_path):
    ours = load_tokenizer(tok_dirs["json_bos", "PreTrainedTokenizerFast"])
    with pytest.raises(UserError, match="roles must alternate"):  # the template's raise_exception
        ours.chat([{"role": "assistant", "content": "x"}])
    add_tokenizer(tmp_path, "chatml")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m.content }"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not valid Jinja"):
        load_tokenizer(tmp_path).chat("hi")
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no chat template"):
        load_tokenizer(tmp_path).chat("hi")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token is defined }}|{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path).render_chat("hi") == "False|hi"  # ChatML has no BOS; the file wins
    (tmp_path / "chat_template.jinja").write_text("{{ 'effort: ' + reasoning_effort }}")
    with pytest.raises(UserError, match="the chat template failed: TypeError: can only concatenate"):
        load_tokenizer(tmp_path).chat("hi", reasoning_effort=3)  # Python's error on a value, not a traceback


def test_template_args_equal_apply_chat_template(tok_dirs):
    """enable_thinking, Qwen3.5's switch, reaches the template as apply_chat_template(..., **kwargs) passes it; an
    argument the template does not read changes nothing."""
    path = tok_dirs["qwen3_5", "PreTrainedTokenizerFast"]
    ref, ours = AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    for args in ({"enable_thinking": False}, {"enable_thinking": True}, {}):
        for messages in CHATS:
            text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **args)
            assert ours.render_chat(messages, **args) == text
            assert ours.render_chat(messages, **args, unread=[1, {"a": None}]) == text
            want = ref.apply_chat_template(messages, add_generation_prompt=True, **args)["input_ids"]
            assert ours.chat(messages, **args) == want
        empty = args == {"enable_thinking": False}  # an empty think block, else an open one
        assert text.endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if empty else "<think>\n"))


def test_template_args_may_not_take_the_renderers_names(tok_dirs):
    """The variables the renderer sets (messages, add_generation_prompt, tools, documents, the special tokens) and
    apply_chat_template's own parameters are refused by name: transformers fails on some (messages) and lets
    others replace what it sets (bos_token)."""
    hf, sp = load_tokenizer(tok_dirs["qwen3_5", "PreTrainedTokenizerFast"]), SentencePieceTokenizer()
    for name in RESERVED_ARGS:
        for tok in (hf, sp):
            with pytest.raises(UserError, match=f"'{name}' cannot be a chat template argument"):
                tok.chat("hi", **{name: 1})
    for name in ("enable-thinking", "", "2x"):
        with pytest.raises(UserError, match="must be an identifier"):
            hf.chat("hi", **{name: False})
    assert sp.chat("hi", enable_thinking=False) == sp.chat("hi")  # Mixtral's [INST] reads no argument


# gpt-oss's harmony template is this kind of Jinja: defaults for undefined kwargs, strftime_now, a namespace whose
# attributes are set in loops, loop.index0, loop controls, macros, tojson, raise_exception, and an assistant's
# reasoning read as `thinking` (given here as `reasoning_content`, which transformers aliases)
HARMONY = """{%- macro channel(name, text) -%}<|start|>assistant<|channel|>{{ name }}<|message|>{{ text }}<|end|>
{%- endmacro -%}
{%- if reasoning_effort is not defined %}{% set reasoning_effort = "medium" %}{% endif -%}
<|start|>system<|message|>Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}
Reasoning: {{ reasoning_effort }}<|end|>
{%- set state = namespace(last_user=-1) -%}
{%- for m in messages -%}
  {%- if m.role == "user" %}{% set state.last_user = loop.index0 %}{% endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == "system" %}{% continue %}{% endif -%}
  {%- if "<|channel|>" in m.content %}{{ raise_exception("put the analysis in 'thinking'") }}{% endif -%}
  {%- if m.role == "assistant" -%}
    {%- if "thinking" in m and loop.index0 > state.last_user %}{{ channel("analysis", m.thinking) }}{% endif -%}
    {{- channel("final", m.content) -}}
  {%- elif m.role == "tool" -%}
    <|start|>functions.lookup to=assistant<|channel|>commentary<|message|>{{ m.content | tojson }}<|end|>
  {%- else -%}
    <|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>
  {%- endif -%}
  {%- if m.content == "stop here" %}{% break %}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}"""


def test_a_harmony_like_template_renders_as_transformers(tmp_path):
    add_tokenizer(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").write_text(HARMONY)
    ref, ours = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "reasoning_content": "old thoughts", "content": "hello"},
         {"role": "user", "content": "again"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "new thoughts", "content": "b"}],
        [{"role": "user", "content": "stop here"}, {"role": "user", "content": "never shown"}],
        [{"role": "user", "content": "x"}, {"role": "tool", "content": {"temperature": 21}}],
    ]
    rendered = []
    for messages in chats:
        text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rendered.append(ours.render_chat(messages))
        assert rendered[-1] == text
        assert ours.chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert "old thoughts" not in rendered[0] and "<|channel|>analysis<|message|>new thoughts" in rendered[1]
    assert "never shown" not in rendered[2] and '{"temperature": 21}' in rendered[3]
    assert "Current date: 20" in rendered[0] and rendered[0].endswith("<|start|>assistant")
    high = ref.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=False, reasoning_effort="high")
    assert ours.render_chat(chats[0], reasoning_effort="high") == high and "Reasoning: high<|end|>" in high
    with pytest.raises(UserError, match="put the analysis in 'thinking'"):
        ours.chat([{"role": "assistant", "content": "<|channel|>final<|message|>x"}])
    (tmp_path / "chat_template.jinja").write_text("{% set ns = namespace(_hidden=1) %}{{ ns._hidden }}")
    with pytest.raises(UserError, match="_hidden"):  # as transformers' sandbox refuses it
        load_tokenizer(tmp_path).chat("hi")


# -- through the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_text_tokens_logits_and_greedy_tokens_match_transformers(family_dirs, family):
    """From text, per family: the ids of a text, and of a chat message with a template argument (Qwen3.5's template
    reads it, ChatML leaves it), are AutoTokenizer's; their logits within 1e-4 of the model's; greedy tokens from
    the text are those of transformers' generate from its own tokenization, their logits within 1e-3."""
    path = family_dirs[family]
    ref_tok = AutoTokenizer.from_pretrained(path)
    engine = Engine.load(path, EngineOptions(prefetch=0, progress=False))
    ids = engine.encode(PROMPT)
    assert ids == ref_tok(PROMPT)["input_ids"]
    no_think = {"enable_thinking": False}
    chat = engine.encode(PROMPT, chat=True, template_args=no_think)
    assert chat == ref_tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                               **no_think)["input_ids"]
    ref = reference(path, family)
    with torch.no_grad():
        for seq in (ids, chat):
            want = ref(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(engine.score(seq), want, rtol=0, atol=1e-4)
        out = ref.generate(**ref_tok(PROMPT, return_tensors="pt"), max_new_tokens=4, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    got = engine.generate(PROMPT, 4, keep_logits=True)
    assert got.tokens == out.sequences[0, len(ids):].tolist()
    torch.testing.assert_close(got.logits, torch.cat(out.logits), rtol=0, atol=1e-3)


def test_generation_stops_at_every_eos_id(family_dirs, tmp_path):
    src = family_dirs["qwen3_moe"]
    path = tmp_path / "qwen3"
    shutil.copytree(src, path)
    add_tokenizer(path, "chatml", eos_ids=[])  # config.json's eos (2) and the tokenizer's <|im_end|> (2) only
    engine = Engine.load(path, EngineOptions(prefetch=0, progress=False))
    assert engine.stop_ids == {2}
    free = engine.generate(PROMPT, 8)
    assert free.stop_reason == "length", "the random model should not produce id 2 in 8 tokens"
    k = next(i for i, t in enumerate(free.tokens) if i >= 2 and t not in (0, 2))
    stop = free.tokens[k]
    add_tokenizer(path, "chatml", eos_ids=[2, stop])  # as Qwen's: a list, beside config.json's single id
    engine = Engine.load(path, EngineOptions(prefetch=0, progress=False))
    assert engine.stop_ids == {2, stop}
    got = engine.generate(PROMPT, 8)
    assert got.tokens == free.tokens[: k + 1] and got.stop_reason == "eos"
    assert engine.stream(PROMPT, 8) and engine.last_result.tokens == got.tokens


def test_generate_chat_through_the_cli(family_dirs, capsys):
    path = family_dirs["qwen2_moe"]
    ref_tok = AutoTokenizer.from_pretrained(path)
    want = ref_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    code, out, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi", "--chat",
                             "--max-new-tokens", "6", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["stats"]["prompt_tokens"] == len(want)
    engine = Engine.load(path, EngineOptions(progress=False))
    direct = engine.generate(want, 6)
    assert result["tokens"] == direct.tokens
    assert result["text"] == ref_tok.decode(direct.tokens, skip_special_tokens=True)
    code, out, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi", "--chat",
                             "--max-new-tokens", "6")
    assert code == 0, err
    assert out.startswith("hi" + result["text"])  # the prompt, then the streamed text


def test_chat_template_args_through_the_cli(family_dirs, capsys):
    """--chat-template-arg and --chat-template-kwargs (vLLM's and llama.cpp's) reach the template: the prompt is
    apply_chat_template's with the same arguments; a later value for a name wins."""
    path = family_dirs["qwen3_moe"]  # Qwen3.5's template: enable_thinking
    ref_tok = AutoTokenizer.from_pretrained(path)
    engine = Engine.load(path, EngineOptions(progress=False))
    base = ["generate", "--model", str(path), "--prompt", "hi", "--chat", "--max-new-tokens", "3", "--json"]
    runs = [([], True), (["--chat-template-arg", "enable_thinking=false"], False),
            (["--chat-template-kwargs", '{"enable_thinking": false}'], False),
            (["--chat-template-kwargs", '{"enable_thinking": false}', "--chat-template-arg", "enable_thinking=true"],
             True)]
    lengths = set()
    for flags, thinking in runs:
        code, out, err = run_cli(capsys, *base, *flags)
        assert code == 0, err
        result = json.loads(out)
        want = ref_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           enable_thinking=thinking)["input_ids"]
        assert result["stats"]["prompt_tokens"] == len(want), flags
        assert result["tokens"] == engine.generate(want, 3).tokens, flags
        lengths.add(len(want))
    assert len(lengths) == 2  # the argument changed the prompt


@pytest.mark.parametrize("flags,message", [
    (["--chat-template-arg", "enable_thinking"], "expected KEY=VALUE such as enable_thinking=false"),
    (["--chat-template-arg", "=1"], "must be an identifier"),
    (["--chat-template-arg", "messages=[]"], "'messages' cannot be a chat template argument"),
    (["--chat-template-kwargs", "{enable_thinking: false}"], "not valid JSON"),
    (["--chat-template-kwargs", "[1]"], "expected a JSON object"),
    (["--chat-template-kwargs", '{"bos_token": "<s>"}'], "'bos_token' cannot be a chat template argument"),
])
def test_bad_chat_template_args_are_usage_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "generate", "--model", "demo", "--prompt", "hi", "--chat", *flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err


def test_chat_template_args_need_a_chat(family_dirs, capsys):
    for prompt in (["--prompt", "hi"], ["--chat", "--prompt-ids", "5,6"]):  # before any model is loaded
        code, _, err = run_cli(capsys, "generate", "--model", "demo", *prompt, "--chat-template-arg", "a=1")
        assert code == 1 and err == ("error: --chat-template-arg and --chat-template-kwargs need --chat and a text "
                                     "prompt\n")
    engine = Engine.load(family_dirs["qwen3_moe"], EngineOptions(prefetch=0, progress=False))
    for prompt, chat in (("hi", False), ([5, 6], True)):
        with pytest.raises(UserError, match="apply to a chat"):
            engine.encode(prompt, chat, {"enable_thinking": False})


def test_chat_without_a_template_is_an_error_line(family_dirs, tmp_path, capsys):
    path = tmp_path / "olmoe"
    shutil.copytree(family_dirs["olmoe"], path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi", "--chat")
    assert code == 1 and err.startswith("error: ") and "no chat template" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0, err


# -- streaming ------------------------------------------------------------------------------------------


def _stream(tok, ids: list[int]) -> list[str]:
    s = TextStream(tok)
    pieces = [s.push(i) for i in ids]
    return pieces + [s.flush()]


def _byte_ids(tok: HFTokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character split across tokens. (Byte-level BPE writes byte b
    as GPT-2's printable stand-in for it.)"""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    table = dict(zip(bs, map(chr, cs), strict=True))
    return [tok.tk.token_to_id(table[b]) for b in text.encode()]


def test_stream_never_shows_a_broken_character(tok_dirs):
    tok = load_tokenizer(tok_dirs["chatml", "PreTrainedTokenizerFast"])
    for ids in (_byte_ids(tok, MULTIBYTE), tok.encode(MULTIBYTE), tok.encode("\U0001f600" * 5)):
        pieces = _stream(tok, ids)
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) == tok.decode(ids)
    assert "".join(_stream(tok, tok.encode(MULTIBYTE))) == MULTIBYTE
    pieces = _stream(tok, _byte_ids(tok, "\u4e2d"))
    assert pieces == ["", "", "\u4e2d", ""]  # held back until its third byte
    cut = _byte_ids(tok, "a\u4e2d")[:-1]  # ends inside a character: shown at the end, as the full decode has it
    assert _stream(tok, cut) == ["a", "", "", tok.decode(cut)[1:]] and tok.decode(cut).endswith("\ufffd")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 299), max_size=40))
def test_stream_adds_up_to_the_full_decode(tok_dirs, ids):
    tok = load_tokenizer(tok_dirs["chatml", "PreTrainedTokenizerFast"])
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30))
def test_stream_of_any_text_byte_by_byte(tok_dirs, text):
    tok = load_tokenizer(tok_dirs["chatml", "PreTrainedTokenizerFast"])
    ids = _byte_ids(tok, text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


TINY_SP = Path(__file__).parents[1] / "offload_moe" / "data" / "tiny-moe" / "tokenizer.model"  # byte fallback


def test_sentencepiece_stream_with_byte_fallback():
    tok = SentencePieceTokenizer(TINY_SP)
    ids = tok.encode(MULTIBYTE, bos=False)
    pieces = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    mixtral = SentencePieceTokenizer(BUNDLED)
    ids = mixtral.encode("Hello world, \U0001f600 again", bos=False)
    assert "".join(_stream(mixtral, ids)) == mixtral.decode(ids) == "Hello world, \U0001f600 again"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4095), max_size=30))
def test_sentencepiece_stream_adds_up_to_the_full_decode(ids):
    """Windows that start at a piece whose leading space the decoder drops: the pieces still add up."""
    tok = SentencePieceTokenizer(TINY_SP)
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_engine_stream_equals_the_result_text(family_dirs):
    engine = Engine.load(family_dirs["phimoe"], EngineOptions(progress=False))
    for prompt in (PROMPT, "\U0001f600"):
        pieces = list(engine.stream(prompt, 12))
        assert "".join(pieces) == engine.last_result.text
        assert engine.last_result.text == engine.tokenizer.decode(engine.last_result.tokens)


def test_a_converted_folder_keeps_the_tokenizer_chat_and_stop_ids(family_dirs, tmp_path):
    from offload_moe.formats.base import DenseFormat
    from offload_moe.weights.convert import convert

    src = Engine.load(family_dirs["qwen2_moe"], EngineOptions(prefetch=0, progress=False))
    out = tmp_path / "packed"
    convert(src.checkpoint.path, out, DenseFormat(src.config, torch.float32), torch.float32, progress=False)
    packed = Engine.load(out, EngineOptions(prefetch=0, progress=False))
    assert packed.checkpoint.layout == "packed" and packed.config.family == "qwen2_moe"
    assert packed.stop_ids == src.stop_ids
    chat = [{"role": "user", "content": "def f(x):"}]
    assert packed.encode(chat, chat=True) == src.encode(chat, chat=True)
    assert packed.generate("def f(x):", 6).text == src.generate("def f(x):", 6).text
