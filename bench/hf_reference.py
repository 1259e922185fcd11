"""transformers' decode speed, timed the way the engine reports its own: over the decode steps after
the first (the engine times the first decode step apart), best of several runs; and the engine's own, from
its stats. Shared by the bench scripts that compare against transformers."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def write_random_model(path: Path, family: str, shape: dict) -> Path:
    """A random checkpoint of transformers' `{family}ForCausalLM` with `{family}Config(**shape)`, seed 0."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**shape)
    getattr(transformers, f"{family}ForCausalLM")(config).eval().save_pretrained(path)
    return path


def transformers_decode_rate(model, prompt: list[int], tokens: int, repeats: int) -> float:
    """Decode tokens/s of a transformers causal LM on `prompt`, greedy, `tokens` new tokens."""
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    best = 0.0
    for _ in range(repeats):
        head = timed(2)  # prefill, the first token and the first decode step (the engine reports it apart)
        total = timed(tokens)
        best = max(best, (tokens - 2) / max(total - head, 1e-9))
    return best


def engine_decode_rate(engine, prompt: list[int], tokens: int, repeats: int) -> tuple[float, dict]:
    """The engine's decode tokens/s on `prompt` (best of `repeats`, greedy) and that run's stats."""
    engine.generate(prompt[:8], 4)  # one-time work out of the way
    runs = [engine.generate(prompt, tokens).stats for _ in range(repeats)]
    best = max(runs, key=lambda s: s["decode_tokens_per_s"])
    return best["decode_tokens_per_s"], best


def prompt_bench_args(description: str) -> tuple[argparse.Namespace, dict[str, list[int]]]:
    """The flags of a bench that decodes after a short and a long prompt (--tokens, --long, --threads, applied
    here, --repeats), and those two prompts: 8 and --long random ids of a 32000-piece vocabulary, BOS first."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--long", type=int, default=1024, help="prompt tokens of the long-context run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    return args, {"short": [1] + torch.randint(3, 32000, (7,), generator=g).tolist(),
                  "long": [1] + torch.randint(3, 32000, (args.long - 1,), generator=g).tolist()}


def decode_table(path, rows: dict[str, dict], prompts: dict[str, list[int]], args, context: int, reference: str,
                 note=None) -> list[tuple[str, float, float, str]]:
    """(label, tok/s after the short prompt, after the long one, remark) for the engine on the folder `path`
    with each of `rows` (label: EngineOptions fields), `note(engine, rates)` giving the remark, and for
    transformers' class `reference` on the same folder; `print_decode_table` prints them."""
    import transformers

    from offload_moe.engine import Engine
    from offload_moe.options import EngineOptions

    out = []
    for label, options in rows.items():
        engine = Engine.load(path, EngineOptions(**options, context=context, progress=False))
        rates = {which: engine_decode_rate(engine, prompt, args.tokens, args.repeats)
                 for which, prompt in prompts.items()}
        out.append((f"offload_moe, {label}", rates["short"][0], rates["long"][0],
                    note(engine, rates) if note is not None else ""))
        del engine
    model = getattr(transformers, reference).from_pretrained(path, dtype=torch.float32).eval()
    ref = {which: transformers_decode_rate(model, prompt, args.tokens, args.repeats)
           for which, prompt in prompts.items()}
    return out + [("transformers, all resident", ref["short"], ref["long"], "")]


def print_decode_table(rows: list[tuple[str, float, float, str]], long: int) -> None:
    print(f"{'':<50} {'8-token prompt':>15} {f'{long}-token prompt':>17}")
    for label, short, long_rate, note in rows:
        print(f"{label:<50} {short:>9.1f} tok/s {long_rate:>11.1f} tok/s   {note}")
