"""The request bodies the server takes, as pydantic models (FastAPI's own way): every field's type and range is
checked here, in one place, and a bad one is a 400 in OpenAI's shape naming the field (`check`).

Types are strict (a string is not a number, a number is not a boolean). A field OpenAI's API defines and this
server does not implement (tools, a response_format but text, best_of > 1, ...) is a 400 naming it (`refuse`):
never silently ignored. Fields that OpenAI's API does not define (vendor extensions, `user`, `store`,
`metadata`) are accepted, ignored and logged at debug level, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from ..sampling import BIAS_LIMIT, SEEDS
from .service import APIError

log = logging.getLogger("offload_moe.serve")
Number = StrictInt | StrictFloat
MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's bound for a chat; vLLM's default for both)
MAX_N = 128  # choices per prompt (the queue bounds it further: `Service.check_fits`)
Ids = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Strict):
    include_usage: StrictBool = False


class Params(Strict):
    """What completions and chat completions share."""

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # vLLM's: -1 and 0 keep every token
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, allow_inf_nan=False)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-BIAS_LIMIT, le=BIAS_LIMIT)]] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=SEEDS)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's keys are token ids written as strings: {"50256": -100}."""
        if bias is None:
            return None
        for key in bias:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"a key must be a token id such as \"50256\", got {key[:20]!r}")
        return {int(k): float(v) for k, v in bias.items()}

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TextPart(Strict):
    type: StrictStr
    text: StrictStr | None = None


class Message(Strict):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    @property
    def text(self) -> str:
        """The content as text: a string, or OpenAI's list of parts (the text parts joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text or "" for p in self.content if p.type == "text")


class Completion(Params):
    # one prompt (a string or token ids) or several, each with its n choices (index = prompt * n + choice)
    prompt: StrictStr | Ids | Annotated[list[StrictStr], Field(min_length=1)] | \
        Annotated[list[Ids], Field(min_length=1)]
    echo: StrictBool | None = None  # the prompt before the text (and its log-probabilities first)
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # the top ones per token
    best_of: Any = None
    suffix: Any = None

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class ChatCompletion(Params):
    messages: Annotated[list[Message], Field(min_length=1)]
    chat_template_kwargs: dict[StrictStr, Any] | None = None  # vLLM's: the chat template's variables
    reasoning_effort: StrictStr | None = None  # a chat template variable too (gpt-oss's), as vLLM passes it
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None

    @property
    def prompts(self) -> list[list[dict]]:
        return [[{**m.model_dump(), "content": m.text} for m in self.messages]]


# what a field of several accepted types must be, for its type errors
EXPECTED = {"temperature": "a number", "top_p": "a number", "min_p": "a number", "repetition_penalty": "a number",
            "presence_penalty": "a number", "frequency_penalty": "a number",
            "prompt": "a string, a list of token ids, or a list of either", "stop": "a string or a list of strings",
            "content": "a string or a list of text parts", "chat_template_kwargs": "an object",
            "logit_bias": "an object of token ids to numbers"}
TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "function", "constrained", "literal", "json")
AUTO = (None, "none", "auto")  # tool_choice / function_call values that ask for no tool call: there are none


def unsupported(req: Strict) -> tuple[str, str] | None:
    """The first field OpenAI's API defines that this server does not implement, with what it does not do."""
    if isinstance(req, Completion):
        rules = [("best_of", req.best_of not in (None, 1), "best_of above 1 (n choices are supported)"),
                 ("suffix", req.suffix not in (None, ""), "suffix (insertion)")]
    elif isinstance(req, ChatCompletion):
        fmt = req.response_format
        rules = [("tools", req.tools not in (None, []), "tools (function calling)"),
                 ("tool_choice", req.tool_choice not in AUTO, "tool_choice (function calling)"),
                 ("functions", req.functions not in (None, []), "functions (function calling)"),
                 ("function_call", req.function_call not in AUTO, "function_call (function calling)"),
                 ("response_format", fmt is not None and fmt != {"type": "text"},
                  "a response_format other than {\"type\": \"text\"} (structured output)"),
                 ("audio", req.audio is not None, "audio output"),
                 ("modalities", req.modalities not in (None, ["text"]), "modalities other than [\"text\"]"),
                 ("web_search_options", req.web_search_options is not None, "web search"),
                 ("top_logprobs", req.top_logprobs is not None and not req.logprobs,
                  "top_logprobs without logprobs: true")]
    else:
        return None
    return next(((name, what) for name, bad, what in rules if bad), None)


def check(model: type[Strict], body: dict) -> Strict:
    """`body` as `model`, or a 400 naming the first bad field (its path: `messages.0.role`) and what it must be, or
    the first field OpenAI defines that this server does not implement; the fields it ignores are logged."""
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        path = [str(p) for p in first["loc"] if isinstance(p, int) or not str(p).lower().startswith(TYPE_TAGS)]
        field = path[-1] if path else "body"
        got = repr(first.get("input"))
        got = got if len(got) <= 40 else got[:37] + "..."
        says = first["msg"]
        if first["type"].endswith("_type") and field in EXPECTED:
            says = f"must be {EXPECTED[field]}"
        raise APIError(400, f"'{'.'.join(path) or 'body'}': {says} (got {got})", param=path[0] if path else None,
                       code="invalid_value") from None
    refused = unsupported(req)
    if refused is not None:
        raise APIError(400, f"'{refused[0]}': this server does not support {refused[1]}", param=refused[0],
                       code="unsupported_parameter")
    if log.isEnabledFor(logging.DEBUG) and req.model_extra:
        log.debug("%s: ignored the fields %s", model.__name__, ", ".join(sorted(req.model_extra)))
    return req


class Tokenize(Strict):
    """POST /tokenize: llama-server's fields (content, add_special), or vLLM's (prompt, add_special_tokens)."""

    content: StrictStr | None = None
    prompt: StrictStr | None = None
    add_special: StrictBool | None = None
    add_special_tokens: StrictBool | None = None

    @property
    def text(self) -> str:
        if (self.content is None) == (self.prompt is None):
            raise APIError(400, "'content': give the text to tokenize as content (or prompt), once", param="content",
                           code="invalid_value")
        return self.content if self.content is not None else self.prompt

    @property
    def special(self) -> bool:
        """BOS and the like around the text: off by default, as llama-server and lm-eval's remote tokenizer."""
        return bool(self.add_special if self.add_special is not None else self.add_special_tokens)


class Detokenize(Strict):
    tokens: list[Annotated[StrictInt, Field(ge=0)]]

