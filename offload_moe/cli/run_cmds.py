"""The commands that run the model on text: `generate`, `profile` (a routing trace of prompts) and
`perplexity`; `load_engine`, the engine as the engine flags describe it (`serve` loads through it too)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..atomic import check_target, write_safetensors_atomic
from ..demo import TRAINED_DEMOS
from ..engine import Engine
from ..errors import UserError
from ..perplexity import perplexity
from ..planning.trace import save_trace
from ..progress import note, progress_bar
from ..sampling import Sampling
from ..stats import format_table
from .args import options_from
from .parser import DEMO_PROMPT, program


def load_engine(args: argparse.Namespace) -> Engine:
    return Engine.load(args.model, profile=args.profile, revision=args.revision, **options_from(args))


def demo_note(args: argparse.Namespace, engine: Engine) -> None:
    """What to expect of a demo model's text, on stderr."""
    if args.model == "demo-random":
        print("note: this demo model has random weights: the text below is gibberish; the statistics are real.",
              file=sys.stderr)
    elif args.model in TRAINED_DEMOS:
        c, size = engine.config, sum(f.stat().st_size for f in TRAINED_DEMOS[args.model].iterdir())
        print(f"note: the {args.model} model is a {size / 1e6:.1f} MB MoE ({c.n_layers} layers, {c.num_experts} "
              f"experts, top-{c.top_k}) trained for minutes on Python's standard library: expect code-like text, "
              "not working code.", file=sys.stderr)


def print_piece(piece: str) -> None:
    print(piece, end="", flush=True)


def sampling_of(args: argparse.Namespace) -> Sampling:
    """The sampling flags (`parser.add_sampling_flags`), checked before the load: a bad flag costs no model load."""
    sampling = Sampling(temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed)
    sampling.check()
    return sampling


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = sampling_of(args)  # before the load, and before the prompt is printed
    if args.template_args and not (args.chat and args.prompt_ids is None):
        raise UserError("--chat-template-arg and --chat-template-kwargs need --chat and a text prompt")
    for out in (args.logits_out, args.trace_out):
        if out:
            check_target(out)
    engine = load_engine(args)
    prompt = args.prompt_ids if args.prompt_ids is not None else (args.prompt or DEMO_PROMPT)
    stream = None
    if not args.json:
        demo_note(args, engine)
        if isinstance(prompt, str):
            print(prompt, end="", flush=True)
        stream = print_piece
    if args.trace_out:
        engine.start_trace(args.model)
    result = engine.generate(prompt, args.max_new_tokens, sampling, chat=args.chat,
                             keep_logits=args.logits_out is not None, on_text=stream, template_args=args.template_args)
    if args.logits_out:
        write_safetensors_atomic(args.logits_out, {"logits": result.logits})
    if args.trace_out:
        save_trace(args.trace_out, engine.stop_trace())
    if args.json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "tokens": result.tokens, "text": result.text,
                          "stats": result.stats}))
    else:
        print("\n")
        print(format_table(result.stats))
    return 0


def read_text(path: str) -> str:
    """A text file's content, or a one-line error: missing, unreadable, or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None


def read_prompts(path: str) -> list[str]:
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        try:
            prompts = [json.loads(line)["prompt"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}: every line must be a JSON object with a 'prompt' field") from None
    else:
        prompts = lines
    if not prompts:
        raise UserError(f"{path} holds no prompt")
    return prompts


def fitting_prompts(engine: Engine, prompts: list[str], path: str) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """(index, token ids) of the prompts that fit the context, and the 1-based numbers of those skipped: a prompt
    that does not fit is skipped, not the whole run lost."""
    capacity = engine.kv_capacity
    runs, skipped = [], []
    for i, prompt in enumerate(prompts):
        ids = engine.encode(prompt)
        if len(ids) >= capacity:
            skipped.append(i + 1)
            head = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            print(f"warning: skipping prompt {i + 1} ({head!r}): it has {len(ids)} tokens; the context holds "
                  f"{capacity} (raise --context)", file=sys.stderr)
        else:
            runs.append((i, ids))
    if not runs:
        raise UserError(f"no prompt in {path} fits the context of {capacity} tokens "
                        f"(all {len(prompts)} skipped; raise --context); no trace written")
    return runs, skipped


def cmd_profile(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    sampling = sampling_of(args)
    check_target(args.trace_out)
    engine = load_engine(args)
    runs, skipped = fitting_prompts(engine, prompts, args.prompts)
    engine.start_trace(args.model, hidden=args.hidden_states)
    totals = {"tokens": 0, "hits": 0, "misses": 0}
    for i, ids in progress_bar(runs, "profiling", unit="prompt"):
        stats = engine.generate(ids, args.max_new_tokens, sampling).stats
        totals["tokens"] += stats["prompt_tokens"] + stats["generated_tokens"]
        totals["hits"] += stats["hits"]
        totals["misses"] += stats["misses"]
        if not args.json:
            note(f"prompt {i + 1}/{len(prompts)}: {stats['prompt_tokens']} + {stats['generated_tokens']} tokens, "
                 f"hit rate {100 * stats['hit_rate']:.1f}%")
    trace = engine.stop_trace()
    save_trace(args.trace_out, trace)
    totals["hit_rate"] = totals["hits"] / max(totals["hits"] + totals["misses"], 1)
    totals["trace_tokens"] = int(trace.experts.shape[0])
    totals["skipped"] = skipped
    if args.json:
        print(json.dumps(totals))
    else:
        skips = f" ({len(skipped)} of {len(prompts)} prompts skipped: too long)" if skipped else ""
        print(f"wrote {args.trace_out}: {totals['trace_tokens']} tokens x {trace.num_layers} layers{skips}; live hit "
              f"rate {100 * totals['hit_rate']:.1f}%. Next: {program()} simulate --trace {args.trace_out}")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    text = read_text(args.text_file)
    engine = load_engine(args)
    ids = engine.encode(text)[: args.max_tokens + 1]
    window = args.window or min(engine.kv_capacity, len(ids))
    stride = args.stride or max(window // 2, 1)
    ppl, n = perplexity(engine, ids, window, stride)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": n}))
    else:
        print(f"perplexity {ppl:.4f} over {n} tokens (window {window}, stride {stride})")
    return 0
