"""The command line: a thin layer over the engine. Every default comes from EngineOptions or Sampling."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .cache import MISS_POLICIES
from .demo import resolve_model
from .engine import DTYPES, Engine, EngineOptions
from .errors import UserError
from .generate import Sampling
from .policy import ONLINE_POLICIES
from .stats import format_table

DEFAULTS = EngineOptions()
SAMPLING = Sampling()
DEMO_PROMPT = "def fibonacci(n):"
DEMO_TOKENS = 48


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _slots(text: str) -> int | list[int]:
    ids = _ids(text)
    if not ids:
        raise argparse.ArgumentTypeError("expected a count or a comma-separated count per layer")
    return ids[0] if len(ids) == 1 else ids


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {n}")
    return n


def engine_flags() -> argparse.ArgumentParser:
    """Flags shared by every command that runs the model."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="demo",
                   help="model folder (Hugging Face or original layout), or 'demo' (default: %(default)s)")
    g.add_argument("--profile", help="offload profile: a name in profiles/, a .toml file, or 'auto' (default: none)")
    g.add_argument("--device", help=f"cpu, cuda, cuda:N or auto (default: {DEFAULTS.device})")
    g.add_argument("--dtype", choices=[*DTYPES, "auto"], help=f"compute dtype (default: {DEFAULTS.dtype}: "
                   "float16 on cuda, float32 on cpu)")
    g.add_argument("--cache-experts", type=_slots, metavar="K",
                   help="expert cache slots per layer: one count, or one per layer as 4,4,6,... "
                        "(default: all experts resident)")
    g.add_argument("--prefetch", type=_nonneg, metavar="N",
                   help=f"prefetch the predicted experts of the next N layers; 0 turns it off "
                        f"(default: {DEFAULTS.prefetch})")
    g.add_argument("--policy", choices=ONLINE_POLICIES, help=f"eviction policy (default: {DEFAULTS.policy})")
    g.add_argument("--miss-policy", choices=MISS_POLICIES,
                   help="a decode-step miss: fetch (copy it, wait), cpu (compute it on the CPU from RAM while "
                        f"the copy runs), auto (whichever measures faster) (default: {DEFAULTS.miss_policy})")
    g.add_argument("--context", type=int, help=f"KV-cache length to preallocate (default: {DEFAULTS.context})")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Run Mixture-of-Experts models with offloaded experts. With no command: generate from the "
                    "embedded demo model (random weights) with 2 of 8 experts cached per layer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser("generate", parents=[engine_flags()], help="generate text and print run statistics",
                         description="Generate text; print it as it is made, then the run statistics.")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (default: {DEMO_PROMPT!r})")
    src.add_argument("--prompt-ids", type=_ids, metavar="IDS", help="prompt as token ids, e.g. 1,415,2936")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the [INST] ... [/INST] template")
    gen.add_argument("--max-new-tokens", type=_nonneg, default=DEMO_TOKENS, metavar="N",
                     help="stop after N new tokens (default: %(default)s)")
    smp = gen.add_argument_group("sampling (greedy unless --temperature > 0)")
    smp.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    smp.add_argument("--temperature", type=float, default=SAMPLING.temperature,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    smp.add_argument("--top-p", type=float, default=SAMPLING.top_p, help="nucleus sampling mass (default: %(default)s)")
    smp.add_argument("--top-k", type=_nonneg, default=SAMPLING.top_k, help="keep the k most likely tokens; "
                     "0 keeps all (default: %(default)s)")
    smp.add_argument("--seed", type=int, default=SAMPLING.seed, help="sampling seed (default: %(default)s)")
    out = gen.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help='print one JSON object {"tokens", "text", "stats"} on stdout and nothing else')
    out.add_argument("--logits-out", metavar="FILE",
                     help="write a safetensors file whose float32 tensor 'logits' [generated, vocab] holds the "
                          "logits each generated token was chosen from")
    return parser


def options_from(args: argparse.Namespace) -> dict:
    """The engine flags that were given (others come from the profile or EngineOptions)."""
    keys = ("device", "dtype", "cache_experts", "prefetch", "policy", "miss_policy", "context")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_engine(args: argparse.Namespace, quiet: bool) -> Engine:
    return Engine.load(resolve_model(args.model), profile=args.profile, progress=not quiet, **options_from(args))


def cmd_generate(args: argparse.Namespace) -> int:
    engine = load_engine(args, args.json)
    sampling = Sampling(temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed)
    prompt = args.prompt_ids if args.prompt_ids is not None else (args.prompt or DEMO_PROMPT)
    if args.model in ("demo", "demo-random") and not args.json:
        print("note: the demo model has random weights: the text below is gibberish; the statistics are real.",
              file=sys.stderr)
    stream = None
    if not args.json:
        if isinstance(prompt, str):
            print(prompt, end="", flush=True)

        def stream(piece: str) -> None:
            print(piece, end="", flush=True)

    result = engine.generate(prompt, args.max_new_tokens, sampling, chat=args.chat,
                             keep_logits=args.logits_out is not None, on_text=stream)
    if args.logits_out:
        write_safetensors_atomic(args.logits_out, {"logits": result.logits})
    if args.json:
        print(json.dumps({"tokens": result.tokens, "text": result.text, "stats": result.stats}))
    else:
        print("\n")
        print(format_table(result.stats))
    return 0


def write_safetensors_atomic(path: str, tensors: dict) -> None:
    """Write next to the target and rename, so an existing file is never left half-written."""
    from safetensors.torch import save_file

    target = Path(path)
    if not target.parent.exists():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


COMMANDS = {"generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        # the main job: generate (from the demo model unless --model says otherwise), 2 slots per layer
        argv = ["generate", "--cache-experts", "2", *argv]
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError:
        print("error: out of memory (try fewer --cache-experts, a shorter --context or a smaller profile)",
              file=sys.stderr)
        return 1
