"""The request bodies the server takes, as pydantic models (FastAPI's own way): every field's type and range is
checked here, in one place, and a bad one is a 400 in OpenAI's shape naming the field (`check`).

Types are strict (a string is not a number, a number is not a boolean); fields this server does not read are
accepted and ignored, as OpenAI's API allows clients to send them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..sampling import SEEDS
from .service import APIError

Number = StrictInt | StrictFloat


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
    n: Literal[1] | None = None  # one choice per request
    seed: Annotated[StrictInt, Field(ge=0, lt=SEEDS)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None

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
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] | \
        Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class ChatCompletion(Params):
    messages: Annotated[list[Message], Field(min_length=1)]
    chat_template_kwargs: dict[StrictStr, Any] | None = None  # vLLM's: the chat template's variables


# what a field of several accepted types must be, for its type errors
EXPECTED = {"temperature": "a number", "top_p": "a number", "prompt": "a string, or one list of token ids",
            "stop": "a string or a list of strings", "content": "a string or a list of text parts",
            "chat_template_kwargs": "an object"}
TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "function", "constrained", "literal", "json")


def check(model: type[Params], body: dict) -> Params:
    """`body` as `model`, or a 400 naming the first bad field (its path: `messages.0.role`) and what it must be."""
    try:
        return model.model_validate(body)
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
