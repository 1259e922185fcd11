"""The command line's argument types and its engine flags, generated from `options.EngineOptions`.

Each field of EngineOptions whose metadata says `cli` is one flag `--field-name` with that field's help,
choices and metavar. The flags default to None so that a profile fills what the user did not give
(`options_from`); their help shows EngineOptions' default. Torch-free: `--help` prints without it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import Field

from ..errors import UserError
from ..options import OPTIONS, flag_name, parse_size
from ..tokenizer import check_template_args


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {n}")
    return n


def slots(text: str) -> int | list[int]:
    """One count for every layer, or one count per layer."""
    ids = int_list(text)
    if not ids:
        raise argparse.ArgumentTypeError("expected a count or a comma-separated count per layer")
    return ids[0] if len(ids) == 1 else ids


def size(text: str) -> int | None:
    """Bytes from "16GB" and the like; "auto" is None (the engine picks)."""
    if text == "auto":
        return None
    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> int:
    n = nonneg(text)
    if n == 0:
        raise argparse.ArgumentTypeError("expected 1 or more, got 0")
    return n


def nbytes(text: str) -> int:
    """Bytes from "4MB" and the like, above 0."""
    n = size(text)  # "auto" is None: refused here
    if not n:
        raise argparse.ArgumentTypeError(f"expected a size above 0 such as 4MB, got {text!r}")
    return n


def seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not s > 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return s


def port(text: str) -> int:
    n = nonneg(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {n}")
    return n


def template_args(args: dict) -> dict:
    """Chat template arguments whose names a template may take (`check_template_args`), as a flag's value."""
    try:
        return check_template_args(args)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def template_arg(text: str) -> dict:
    """KEY=VALUE, one chat template argument: VALUE as JSON where it parses (false, 3, "x", [1, 2]), else the text."""
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as enable_thinking=false, got {text!r}")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return template_args({key: value})


def template_kwargs(text: str) -> dict:
    """A JSON object of chat template arguments, as vLLM's and llama.cpp's --chat-template-kwargs take it."""
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(args, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": false}}', "
                                         f"got {text!r}")
    return template_args(args)


class MergeArgs(argparse.Action):
    """Flags whose values (dicts) add up to one dict, in the order given: a later value for a name wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), **values})


# The fields whose flag needs more than its annotation says: the others are int where the field is an int,
# else str.
FLAG_TYPES: dict[str, Callable] = {"cache_experts": slots, "ram_budget": size, "prefetch": nonneg,
                                   "prefetch_width": nonneg, "link_gbs": float}
ENGINE_FLAGS = [name for name, f in OPTIONS.items() if f.metadata["cli"]]
LOAD_KEYS = (*ENGINE_FLAGS, "max_batch")  # serve's --max-batch is not an engine flag, but sizes the load too


def flag_type(f: Field) -> Callable | None:
    if f.name in FLAG_TYPES:
        return FLAG_TYPES[f.name]
    return int if f.type.split(" | ")[0] == "int" else None


def flag_help(f: Field) -> str:
    shown = f.metadata["shown"] if f.metadata["shown"] is not None else f.default
    return f"{f.metadata['help']} (default: {shown})"


def add_revision(group) -> None:
    """--revision, beside every flag that takes a model or config by name."""
    group.add_argument("--revision", metavar="REV", help="the branch, tag or commit of a hub id (or of a Hugging Face "
                       "cache folder models--org--name) (default: main)")


def engine_flags() -> argparse.ArgumentParser:
    """Flags shared by every command that runs the model."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="demo",
                   help="model folder (Hugging Face, original or packed layout; a Hugging Face cache folder "
                        "models--org--name), a GGUF file (llama.cpp's; of a split "
                        "set, its first file -00001-of-N.gguf), a hub id org/name (from the Hugging Face cache, "
                        "else downloaded unless HF_HUB_OFFLINE is set), org/name:QUANT (the GGUF file of that repo "
                        "whose name holds QUANT, e.g. Q4_K_M), 'demo' (the small trained MoE that "
                        "ships with the package: 8 experts, top-2), 'demo-fine' (its fine-grained twin: 32 experts, "
                        "top-4) or 'demo-random' (random weights, Mixtral's tokenizer) "
                        "(default: %(default)s)")
    add_revision(g)
    g.add_argument("--profile", help="offload profile: a name in profiles/, a .toml file, or 'auto' (default: none)")
    for name in ENGINE_FLAGS:
        f = OPTIONS[name]
        g.add_argument(flag_name(name), type=flag_type(f), choices=f.metadata["choices"],
                       metavar=f.metadata["metavar"], help=flag_help(f))
    return p


def options_from(args: argparse.Namespace) -> dict:
    """The engine flags that were given (others come from the profile or EngineOptions)."""
    return {k: getattr(args, k) for k in LOAD_KEYS if getattr(args, k, None) is not None}
