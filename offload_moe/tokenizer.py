"""Tokenizers, chat prompts, end-of-sequence ids and incremental decoding.

Two backends behind one interface (`Tokenizer`), a folder's chosen by `load_tokenizer(folder)`, a GGUF file's made
by `gguf_tokenizer.gguf_tokenizer`:
  tokenizer.json   Hugging Face's `tokenizers` (Qwen2/3-MoE, OLMoE, Phi-3.5-MoE and most hub checkpoints), with
                   `tokenizer_config.json` applied as transformers' `PreTrainedTokenizerFast` (5.x) applies it:
                   its added and special tokens and `split_special_tokens`; BOS/EOS around a text come from
                   tokenizer.json's post-processor (transformers 5 ignores `add_bos_token` when there is a
                   tokenizer.json). A text gives transformers' ids, special tokens written in the text
                   included. Preferred when a folder has both files.
  tokenizer.model  sentencepiece (Mixtral's release layout, the demo model).
  X.gguf           the file's tokenizer.ggml.* vocabulary, built into a `tokenizers.Tokenizer` that tokenizes as
                   llama.cpp does (`gguf_tokenizer.py`), served as a tokenizer.json is (`HFTokenizer`).

Chat (`Tokenizer.chat`): the checkpoint's own `chat_template` (chat_template.jinja, else tokenizer_config.json's),
rendered as transformers renders it (a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, loop
controls, `raise_exception`, `tojson`, `strftime_now`, a `namespace` that refuses underscore names, the messages
with a reasoning also as `thinking` (gpt-oss's harmony template), add_generation_prompt=True and the special tokens as
`bos_token`, `eos_token`, ...), then encoded without adding BOS (the template writes its own). Template arguments
(`chat(messages, enable_thinking=False)`: Qwen3's switch; gpt-oss's `reasoning_effort`) are variables of the template,
as `apply_chat_template(..., **kwargs)` passes them, except that they may not take the names the renderer sets
(`RESERVED_ARGS`). A sentencepiece folder uses Mixtral-Instruct's template, <s>[INST] message [/INST], which reads
no argument.

Generation stops on every EOS id the checkpoint names (`Engine.stop_ids`): config.json's, generation_config.json's
(`generation_eos_ids`; Qwen lists <|im_end|> and <|endoftext|>) and the tokenizer's `eos_token` (`eos_ids`).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from .config import read_json
from .errors import UserError

BUNDLED = Path(__file__).parent / "data" / "tokenizer.model"  # Mixtral's, from mistral-common (Apache-2.0)

# The files of a folder that tokenizing, chat and stopping read (a converted folder needs them all; a GGUF's
# tokenizer is written as the first, third and last: `HFTokenizer.save`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Messages = str | list[dict]
# what a chat template argument may not be called: the variables the renderer sets itself, and the parameters of
# transformers' apply_chat_template that steer it rather than reach the template
RESERVED_ARGS = ("messages", "add_generation_prompt", "tools", "documents", *SPECIAL_NAMES, "chat_template",
                 "continue_final_message", "tokenize")


class Tokenizer:
    """What the engine needs of a tokenizer; `load_tokenizer` picks the backend."""

    bos_id: int | None = None  # None: the tokenizer has no BOS token
    eos_ids: tuple[int, ...] = ()  # the tokenizer's own end-of-sequence token(s)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of `text`; `bos`: with the special tokens the tokenizer adds around a text (BOS, if it has one)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens (BOS, EOS, chat markers) left out."""
        raise NotImplementedError

    def chat(self, messages: Messages, /, **template_args) -> list[int]:
        """Ids of a conversation (one user message, or [{"role": ..., "content": ...}, ...]) ready for the
        assistant's reply; `template_args`: variables of the chat template (`check_template_args`)."""
        raise NotImplementedError


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """A folder's tokenizer, None without one: tokenizer.json when it has one, else tokenizer.model. (A GGUF file's
    comes from its metadata: `gguf_tokenizer.gguf_tokenizer`.)"""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return HFTokenizer.from_folder(folder)
    if (folder / "tokenizer.model").exists():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    return None


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer, chat and generation files the folder has (what a converted copy must carry along)."""
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).exists()]


def generation_eos_ids(folder: str | Path) -> tuple[int, ...]:
    """generation_config.json's `eos_token_id` (an id or a list of ids); () without the file or the key."""
    path = Path(folder) / "generation_config.json"
    if not path.exists():
        return ()
    eos = read_json(path).get("eos_token_id")
    try:
        return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    except (TypeError, ValueError):
        raise UserError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}") from None


def check_template_args(args: dict) -> dict:
    """`args` if each name can be a chat template's variable: an identifier, not one of RESERVED_ARGS."""
    for name in args:
        if not isinstance(name, str) or not name.isidentifier():
            raise UserError(f"a chat template argument's name must be an identifier such as enable_thinking, "
                            f"got {name!r}")
        if name in RESERVED_ARGS:
            raise UserError(f"{name!r} cannot be a chat template argument: the renderer sets it, or transformers' "
                            "apply_chat_template takes it itself")
    return args


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names of an assistant's reasoning


def _messages(messages: Messages) -> list[dict]:
    """The messages as transformers hands them to a template: None keys dropped, and a reasoning given under any
    of REASONING_FIELDS also as `thinking` (gpt-oss's harmony template reads that) and `reasoning_content`."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not messages or not all(isinstance(m, dict) for m in messages):
        raise UserError("a chat is a message, or a non-empty list of {'role': ..., 'content': ...} messages")
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


# -- sentencepiece ---------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (Mixtral's), with Mixtral-Instruct's [INST] template."""

    def __init__(self, path: str | Path = BUNDLED):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        self.eos_ids = (self.eos_id,) if self.eos_id >= 0 else ()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos and self.bos_id is not None else []) + self.sp.encode(text)

    def chat(self, messages: Messages, /, **template_args) -> list[int]:
        """Mixtral-Instruct's template: <s>[INST] user [/INST] assistant</s>[INST] user [/INST]; system messages, as
        mistral-common's tokenizer v1 takes them, joined and put before the first user message's text ("\n\n"
        between). It reads no argument: `template_args` are checked and left unread, as a Jinja template leaves
        those it does not name."""
        check_template_args(template_args)
        ids = [] if self.bos_id is None else [self.bos_id]
        messages = _messages(messages)
        system = "\n\n".join(str(m.get("content", "")).strip() for m in messages if m.get("role") == "system")
        for m in messages:
            role, content = m.get("role"), str(m.get("content", "")).strip()
            if role == "system":
                continue
            if role == "user":
                if system:
                    content, system = f"{system}\n\n{content}", ""
                ids += self.sp.encode(f"[INST] {content} [/INST]")
            elif role == "assistant":
                ids += self.sp.encode(content) + list(self.eos_ids)
            else:
                raise UserError(f"the [INST] chat template has system, user and assistant messages, not {role!r}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# -- tokenizer.json --------------------------------------------------------------------------------------


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return None if token is None else str(token)


def _added_token(token, special: bool | None = None):
    from tokenizers import AddedToken

    if isinstance(token, dict):
        fields = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in token}
        if special is not None:
            fields["special"] = special
        return AddedToken(token["content"], **fields)
    return AddedToken(str(token), special=True if special is None else special)


def _folder_config(folder: Path) -> dict:
    """tokenizer_config.json, with a legacy special_tokens_map.json over it (read, as transformers reads
    it, only when the config has no added_tokens_decoder)."""
    path = folder / "tokenizer_config.json"
    cfg = read_json(path) if path.exists() else {}
    legacy = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in cfg and legacy.exists():
        for key, value in read_json(legacy).items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                have = list(cfg.get(key) or [])
                cfg[key] = have + [t for t in value if t not in have]
            else:
                cfg[key] = value
    return cfg


def _folder_template(folder: Path, cfg: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named templates: the
    'default' one)."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` with its named special tokens and chat template: a folder's
    tokenizer.json with tokenizer_config.json applied as transformers applies it (`from_folder`), or the vocabulary
    of a GGUF file (`gguf_tokenizer.gguf_tokenizer`), so both encode, chat and decode by the same code."""

    def __init__(self, backend, special: dict[str, str], chat_template: str | None, source: str | Path,
                 eos_ids: tuple[int, ...] | None = None):
        """`backend`: the tokenizers.Tokenizer, its added tokens and post-processor (BOS/EOS around a text) in place;
        `special`: the named special tokens' text ({"bos_token": "<s>", ...}), the template's variables;
        `source`: the folder or file, for messages; `eos_ids`: the stop ids, else the eos_token's id."""
        self.tk, self.special, self.chat_template, self.source = backend, special, chat_template, Path(source)
        self.tk.no_truncation()  # a file may carry truncation or padding for training; a prompt is encoded whole
        self.tk.no_padding()
        bos, eos = special.get("bos_token"), special.get("eos_token")
        self.bos_id = self.tk.token_to_id(bos) if bos else None
        eos_id = self.tk.token_to_id(eos) if eos else None
        self.eos_ids = eos_ids if eos_ids is not None else (() if eos_id is None else (eos_id,))

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            tk = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"cannot load tokenizer {path}: {str(e).splitlines()[0] if str(e) else e}") from None
        cfg = _folder_config(folder)

        # Added tokens: tokenizer_config.json's added_tokens_decoder, and the named and extra special tokens,
        # where tokenizer.json does not have them already (with the same flags).
        decoder = cfg.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise UserError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must be an object")
        declared = {t["content"]: t for t in decoder.values() if isinstance(t, dict) and "content" in t}
        have = {repr(t) for t in tk.get_added_tokens_decoder().values()}
        new = [tok for _, t in sorted(decoder.items(), key=lambda kv: int(kv[0]))
               if isinstance(t, dict) and repr(tok := _added_token(t)) not in have]
        special = {name: _content(cfg.get(name)) for name in SPECIAL_NAMES if _content(cfg.get(name))}
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        known = {t.content for t in tk.get_added_tokens_decoder().values()} | {t.content for t in new}
        for raw in [*(cfg[name] for name in special), *extra]:
            text = _content(raw)
            if text and text not in known:
                new.append(_added_token(declared.get(text) or raw, special=True))
                known.add(text)
        if new:
            tk.add_tokens(new)

        # special tokens written in a text are those tokens, unless the config says to split them
        tk.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        # BOS/EOS around a text: tokenizer.json's post-processor decides (transformers 5 ignores tokenizer_config.json's
        # add_bos_token/add_eos_token when a tokenizer.json is there, and so do we)
        return cls(tk, special, _folder_template(folder, cfg), folder)

    def save(self, folder: str | Path) -> None:
        """Write this tokenizer as a folder's files that `from_folder` reads back the same: tokenizer.json (its
        added tokens and post-processor in it), tokenizer_config.json (the named special tokens, the chat template)
        and generation_config.json (the stop ids). How a GGUF's tokenizer goes into a converted folder."""
        folder = Path(folder)
        self.tk.save(str(folder / "tokenizer.json"))
        config = {**self.special, **({"chat_template": self.chat_template} if self.chat_template else {})}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_ids)}, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=bos).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: Messages, /, **template_args) -> str:
        """The checkpoint's chat template applied to `messages`, as transformers' `apply_chat_template` renders
        it (tokenize=False, add_generation_prompt=True); `template_args`: the template's own variables
        (enable_thinking=False, ...)."""
        check_template_args(template_args)
        if self.chat_template is None:
            where = ("tokenizer.chat_template" if self.source.suffix == ".gguf"
                     else "a chat_template in tokenizer_config.json, or chat_template.jinja")
            raise UserError(f"{self.source} has no chat template ({where}): --chat needs one; without --chat the "
                            "prompt goes in as it is")
        import jinja2

        try:
            return _compile(self.chat_template).render(messages=_messages(messages), tools=None, documents=None,
                                                       add_generation_prompt=True, **self.special,
                                                       **template_args)
        except jinja2.TemplateError as e:
            raise UserError(f"{self.source}: the chat template failed: {e.message or e}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as e:  # Python's, on the values given: 'a' + 1
            raise UserError(f"{self.source}: the chat template failed: {type(e).__name__}: {e}") from None

    def chat(self, messages: Messages, /, **template_args) -> list[int]:
        # the template writes BOS itself, if any
        return self.encode(self.render_chat(messages, **template_args), bos=False)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A chat template in the environment transformers renders it in (chat templates are untrusted code: sandboxed)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for training masks: here, its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Namespace(jinja2.utils.Namespace):
        """`namespace()` as transformers gives it: no attribute whose name starts with an underscore."""

        def __init__(*args, **kwargs):  # jinja's own signature trick, so that namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


# -- streaming -------------------------------------------------------------------------------------------


class TextStream:
    """Token ids in, text pieces out. A byte-level BPE token (or a byte-fallback piece) may hold part of a
    character's UTF-8 bytes: a piece is given out only once its text does not end in an incomplete sequence
    (decoded as U+FFFD), so no broken character is ever shown, and `flush()` gives what is left at the end. The
    pieces add up to `decode` of all the ids. Each step decodes a window, the tokens since the piece before the
    last one, against the same window without the new tokens (decoders that drop the leading space of a text
    drop it from both), so the cost does not grow with the length of the text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids = tokenizer, []
        self.start = 0  # the window's first token
        self.shown = 0  # tokens whose text has been given out

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        """The text held back (an incomplete character at the end), once generation is over."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.start:self.shown])
        text = self.tok.decode(self.ids[self.start:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.start, self.shown = self.shown, len(self.ids)
        return text[len(before):]
