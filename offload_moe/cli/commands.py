"""The command line: a thin layer over the engine. Every default comes from EngineOptions or Sampling."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..atomic import write_safetensors_atomic
from ..demo import TRAINED_DEMOS, resolve_model
from ..engine import Engine
from ..errors import UserError
from ..formats.int4_layouts import INT4_LAYOUTS
from ..formats.registry import DEFAULT_GROUP_SIZE
from ..generate import Sampling
from ..memory import CARDS
from ..offload.eviction import ONLINE_POLICIES
from ..options import (
    ATTENTION_QUANTS,
    EXPERT_QUANTS,
    GROUP_SIZES,
    HEAD_QUANTS,
    MISS_POLICIES,
    EngineOptions,
    parse_size,
)
from ..plan import DTYPES
from ..planning.trace import save_trace
from ..stats import format_table
from .entry import add_simulate, cmd_simulate, guarded
from .entry import int_list as _ids
from .entry import nonneg as _nonneg

DEFAULTS = EngineOptions()
SAMPLING = Sampling()
DEMO_PROMPT = 'def read_config(path):\n    """'
DEMO_TOKENS = 48
# the main job (no command): the trained demo, 2 of 8 experts cached per layer, gently sampled
MAIN_JOB = ["generate", "--cache-experts", "2", "--temperature", "0.8", "--top-p", "0.95"]
GROUP_HELP = (f"(default: {DEFAULTS.group_size or f'auto: {DEFAULT_GROUP_SIZE} where it divides every quantized input'}"
              ", else the largest of 32, 64, 128 that does)")


def _slots(text: str) -> int | list[int]:
    ids = _ids(text)
    if not ids:
        raise argparse.ArgumentTypeError("expected a count or a comma-separated count per layer")
    return ids[0] if len(ids) == 1 else ids


def _size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    n = _nonneg(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {n}")
    return n


def engine_flags() -> argparse.ArgumentParser:
    """Flags shared by every command that runs the model."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="demo",
                   help="model folder (Hugging Face, original or packed layout), 'demo' (the small trained MoE that "
                        "ships with the package: 8 experts, top-2), 'demo-fine' (its fine-grained twin: 32 experts, "
                        "top-4) or 'demo-random' (random weights, Mixtral's tokenizer) "
                        "(default: %(default)s)")
    g.add_argument("--profile", help="offload profile: a name in profiles/, a .toml file, or 'auto' (default: none)")
    g.add_argument("--device", help=f"cpu, cuda, cuda:N or auto (default: {DEFAULTS.device})")
    g.add_argument("--dtype", choices=[*DTYPES, "auto"], help=f"compute dtype (default: {DEFAULTS.dtype}: "
                   "float16 on cuda, float32 on cpu)")
    g.add_argument("--cache-experts", type=_slots, metavar="K",
                   help="expert cache slots per layer: one count, or one per layer as 4,4,6,... "
                        "(default: all experts resident)")
    g.add_argument("--prefetch", type=_nonneg, metavar="N",
                   help=f"predict each layer's experts N layers ahead (layer 0 from the previous token) and prefetch "
                        f"them (at most MoE layers - 1); 0 turns it off (default: {DEFAULTS.prefetch})")
    g.add_argument("--predictor", metavar="P",
                   help="what predicts: router (the layer's own router on the earlier hidden state), a file written "
                        "by train-predictor, or auto (the model folder's predictor.safetensors when there is one, "
                        f"else router) (default: {DEFAULTS.predictor})")
    g.add_argument("--prefetch-width", type=_nonneg, metavar="W",
                   help="experts prefetched per layer and token, best first, at most its slots; 0: top-k "
                        f"(default: {DEFAULTS.prefetch_width})")
    g.add_argument("--policy", choices=ONLINE_POLICIES, help=f"eviction policy (default: {DEFAULTS.policy})")
    g.add_argument("--miss-policy", choices=MISS_POLICIES,
                   help="a decode-step miss: fetch (copy it, wait), cpu (compute it on the CPU from RAM while "
                        f"the copy runs), auto (whichever measures faster) (default: {DEFAULTS.miss_policy})")
    g.add_argument("--expert-quant", choices=EXPERT_QUANTS,
                   help="quantize the experts at load; a packed --model keeps its own, none keeps an MXFP4 "
                        f"checkpoint's experts MXFP4 (default: {DEFAULTS.expert_quant})")
    g.add_argument("--attention-quant", choices=ATTENTION_QUANTS,
                   help="quantize the attention projections at load (they stay resident: int8 frees device memory "
                        f"for expert slots); a packed --model keeps its own (default: {DEFAULTS.attention_quant})")
    g.add_argument("--head-quant", choices=HEAD_QUANTS,
                   help="quantize the LM head (output matrix) at load to int8, group-wise like the attention (a "
                        "packed --model's too): a CPU decode lever, the one-token C kernel reads a quarter of "
                        "float32's bytes (batched steps and long scores widen it in an fp32 scratch of its size); "
                        "on CUDA it is rebuilt in a scratch as large as the fp16 matrix, so it saves no device "
                        f"memory there (default: {DEFAULTS.head_quant})")
    g.add_argument("--group-size", type=int, choices=GROUP_SIZES, help=f"quantization group size {GROUP_HELP}")
    g.add_argument("--ram-budget", type=_size, metavar="SIZE",
                   help="RAM for the experts, e.g. 16GB, or auto; when they need more, they stream from storage "
                        "through a RAM cache of this size (default: auto, 80%% of the available RAM)")
    g.add_argument("--context", type=int, help=f"KV-cache length to preallocate (default: {DEFAULTS.context})")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Run Mixture-of-Experts models with offloaded experts. With no command (or only flags): "
                    "generate from the embedded demo model, a small MoE trained on Python's standard library, "
                    f"with {' '.join(MAIN_JOB[1:])}.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser("generate", parents=[engine_flags()], help="generate text and print run statistics",
                         description="Generate text; print it as it is made, then the run statistics.")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (default: {DEMO_PROMPT!r})")
    src.add_argument("--prompt-ids", type=_ids, metavar="IDS", help="prompt as token ids, e.g. 1,415,2936")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message in the checkpoint's chat template (its Jinja "
                          "chat_template; a tokenizer.model folder: Mixtral's [INST] ... [/INST])")
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
    out.add_argument("--trace-out", metavar="TRACE", help="record the routing of this run (see README: traces)")

    prof = sub.add_parser("profile", parents=[engine_flags()], help="run prompts and record a routing trace",
                          description="Run every prompt (greedy) and write the routing trace of all tokens.")
    prof.add_argument("--prompts", required=True, metavar="FILE",
                      help="prompts: a text file, one per line, or JSONL with a 'prompt' field")
    prof.add_argument("--max-new-tokens", type=_nonneg, default=DEMO_TOKENS, metavar="N",
                      help="new tokens per prompt (default: %(default)s)")
    prof.add_argument("--trace-out", required=True, metavar="TRACE", help="the trace file to write (safetensors)")
    prof.add_argument("--hidden-states", action="store_true",
                      help="record the hidden state entering each MoE layer too (float16, dim x MoE layers x 2 "
                           "bytes per token: large), for train-predictor")
    prof.add_argument("--json", action="store_true", help="print the run statistics as one JSON object")

    add_simulate(sub)

    trp = sub.add_parser("train-predictor", help="fit the learned expert predictor on a trace with hidden states",
                         description="Fit a small MLP per MoE layer that predicts the layer's experts from an earlier "
                                     "hidden state (a trace recorded with profile --hidden-states), print its "
                                     "held-out recall beside the other predictors', and write the file that "
                                     "--predictor loads.")
    trp.add_argument("trace", help="a trace recorded with profile --hidden-states")
    trp.add_argument("--out", required=True, help="the predictor file to write (safetensors)")
    trp.add_argument("--lead", type=int, default=1, help="layers ahead it predicts: the --prefetch it serves "
                     "(default: %(default)s)")
    trp.add_argument("--hidden-size", type=int, default=256, help="the MLP's hidden size (default: %(default)s)")
    trp.add_argument("--steps", type=int, default=500, help="Adam steps per layer (default: %(default)s)")
    trp.add_argument("--batch", type=int, default=512, help="samples per step (default: %(default)s)")
    trp.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: %(default)s)")
    trp.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    trp.add_argument("--holdout", type=float, help="fit on the head, score on this share of the trace's tail "
                     "(default: 0.25; 0: fit on everything, no score)")
    trp.add_argument("--validate", metavar="TRACE", help="fit on the whole trace, score on this one")
    trp.add_argument("--json", action="store_true", help="print the report as one JSON object")

    tun = sub.add_parser("tune", help="search offload settings for a trace and write the best as a profile",
                         description="Predict decode tokens/s for expert precision, slots per layer, eviction "
                                     "policy, prefetch and miss handling; print the best against uniform LRU.")
    tun.add_argument("--trace", required=True)
    tun.add_argument("--profile", help="base profile: budget, reserve and [hardware] (default: none)")
    tun.add_argument("--budget", help="device memory, e.g. 24GB (default: the profile's)")
    tun.add_argument("--reserve", type=_size, help="device memory kept free for the CUDA context and activations "
                     "(default: the profile's, else 1.5GiB)")
    tun.add_argument("--context", type=int, default=DEFAULTS.context, help="context to leave room for "
                     "(default: %(default)s)")
    tun.add_argument("--batch", type=int, default=1, metavar="B", help="sequences decoding together (serve "
                     "--max-batch): the trace replayed as B streams, one access of the union of their experts per "
                     "layer and step, tokens/s over the batch, B sequences' KV cache (default: %(default)s)")
    tun.add_argument("--holdout", type=float, metavar="FRACTION", help="fit on the head of the trace and score the "
                     "winner and the default on this share of it held out at the end, split between prompts or forward "
                     "passes; 0: fit and score on all of it (default: 0.25)")
    tun.add_argument("--validate", metavar="TRACE", help="fit on the whole --trace and score the winner and the "
                     "default on this trace (same layers, experts and top-k)")
    tun.add_argument("--predictor", type=lambda v: [p for p in v.split(",") if p], default=[], metavar="FILE,...",
                     help="train-predictor files to try as well, each with its own lead (the prefetch depth); their "
                          "predictions come from the trace's hidden states (profile --hidden-states)")
    tun.add_argument("--out", metavar="FILE.toml", help="write the winner as a profile (default: print it)")
    tun.add_argument("--json", action="store_true", help="print the winner, the default and both scores as one "
                     "JSON object (notes go to stderr)")

    cal = sub.add_parser("calibrate", help="measure link, device and CPU speeds for the cost model",
                         description="Measure host-to-device, device and CPU bandwidth as decode uses them, and "
                                     "one expert's decode forward in each expert format (fp16, int8, int4, packed "
                                     "as the engine packs them for the device), on the device and on the CPU; "
                                     "print them as a profile's [hardware] table for tune.")
    cal.add_argument("--device", help=f"cpu, cuda or auto (default: {DEFAULTS.device})")
    cal.add_argument("--dim", type=int, default=4096, help="model dim of the measured expert (default: %(default)s, "
                     "Mixtral-8x7B's)")
    cal.add_argument("--ffn", type=int, default=14336, help="expert FFN dim (default: %(default)s)")
    cal.add_argument("--config", metavar="CONFIG", help="measure an expert of this model's shape instead (a "
                     "config.json, params.json or model folder): its D and I replace --dim and --ffn")

    con = sub.add_parser("convert", help="write a packed offload folder that loads fast",
                         description="Write the model once in the engine's layout: dense weights, and experts "
                                     "packed one after another with a checksummed index. Resumable.")
    con.add_argument("--model", required=True, help="source folder (any layout the engine reads)")
    con.add_argument("--out", required=True, help="the folder to write")
    con.add_argument("--experts", choices=(*EXPERT_QUANTS, "auto"), default="auto", help="expert precision; auto: "
                     "an MXFP4 checkpoint's stay MXFP4, others become int4 (default: %(default)s)")
    con.add_argument("--attention", choices=ATTENTION_QUANTS, default=DEFAULTS.attention_quant,
                     help="attention projections' precision: int8 or none (the --dtype) (default: %(default)s)")
    con.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULTS.group_size,
                     help=f"quantization group size {GROUP_HELP}")
    con.add_argument("--dtype", choices=list(DTYPES), default="float16",
                     help="dtype of the dense weights and of unquantized experts (default: %(default)s)")
    con.add_argument("--layout", choices=("auto", *INT4_LAYOUTS), default="auto",
                     help="int4 code layout: cuda (the tiles of torch's CUDA int4 kernel, for a GPU of compute "
                          "capability 8.0 or later), cpu (the CPU kernel's order; other GPUs dequantize), or auto: "
                          "that of this machine's device, cuda where its GPU runs the kernel (default: %(default)s)")

    ppl = sub.add_parser("perplexity", parents=[engine_flags()], help="perplexity of a text file",
                         description="Perplexity (sliding window) of the text's tokens with BOS in front.")
    ppl.add_argument("--text-file", required=True)
    ppl.add_argument("--max-tokens", type=int, default=4096, help="score at most this many tokens "
                     "(default: %(default)s)")
    ppl.add_argument("--window", type=int, help="tokens per window (default: the context)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")
    ppl.add_argument("--json", action="store_true", help='print one JSON object {"perplexity", "tokens"}')

    pln = sub.add_parser("plan", help="memory math of a model on 24, 16 and 12 GB cards, from its config.json",
                         description="Print the bytes per expert in fp16, int8 and int4, and the expert slots per "
                                     "layer that each card leaves beside the dense weights (fp16), the KV cache of "
                                     "the context and the reserve. Needs no weights: a config.json is enough.")
    pln.add_argument("--config", required=True, metavar="CONFIG",
                     help="a config.json (Hugging Face), a params.json (original release) or a model folder")
    pln.add_argument("--profile", action="append", metavar="NAME",
                     help="a card profile (its budget, reserve, dtype and context); repeat for several "
                          f"(default: {' '.join(CARDS)})")
    pln.add_argument("--context", type=int, help="context to leave KV-cache room for (default: the profile's, "
                     f"else {DEFAULTS.context})")
    pln.add_argument("--max-batch", type=int, default=1, metavar="N", help="sequences decoding together (serve "
                     "--max-batch): the KV cache of N sequences (default: %(default)s)")
    pln.add_argument("--json", action="store_true", help="print the numbers as one JSON object")

    srv = sub.add_parser("serve", parents=[engine_flags()], help="an OpenAI-compatible HTTP server",
                         description="Serve the model over HTTP with OpenAI's API (/v1/completions, "
                                     "/v1/chat/completions, /v1/models, /health, /metrics), several requests "
                                     "decoding together (continuous batching). Needs the serve extra: "
                                     "pip install 'offload_moe[serve]'.")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=_port, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    srv.add_argument("--max-batch", type=int, default=4, metavar="N",
                     help="sequences decoding together: a KV pool of N sequences, counted in the memory plan "
                          "(default: %(default)s)")
    srv.add_argument("--max-queue", type=_nonneg, default=64, metavar="N",
                     help="requests waiting for a slot beyond the batch; more are refused with 503 "
                          "(default: %(default)s)")
    srv.add_argument("--trace-out", metavar="TRACE", help="record the routing of every request served, written "
                     "when the server stops (see README: traces)")
    return parser


def options_from(args: argparse.Namespace) -> dict:
    """The engine flags that were given (others come from the profile or EngineOptions)."""
    keys = ("device", "dtype", "cache_experts", "prefetch", "predictor", "prefetch_width", "policy", "miss_policy",
            "expert_quant", "attention_quant", "head_quant", "group_size", "ram_budget", "context", "max_batch")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_engine(args: argparse.Namespace, quiet: bool) -> Engine:
    return Engine.load(resolve_model(args.model), profile=args.profile, progress=not quiet, **options_from(args))


def cmd_generate(args: argparse.Namespace) -> int:
    engine = load_engine(args, args.json)
    sampling = Sampling(temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed)
    prompt = args.prompt_ids if args.prompt_ids is not None else (args.prompt or DEMO_PROMPT)
    if args.model == "demo-random" and not args.json:
        print("note: this demo model has random weights: the text below is gibberish; the statistics are real.",
              file=sys.stderr)
    elif args.model in TRAINED_DEMOS and not args.json:
        c, size = engine.config, sum(f.stat().st_size for f in TRAINED_DEMOS[args.model].iterdir())
        print(f"note: the {args.model} model is a {size / 1e6:.1f} MB MoE ({c.n_layers} layers, {c.num_experts} "
              f"experts, top-{c.top_k}) trained for minutes on Python's standard library: expect code-like text, "
              "not working code.", file=sys.stderr)
    stream = None
    if not args.json:
        if isinstance(prompt, str):
            print(prompt, end="", flush=True)

        def stream(piece: str) -> None:
            print(piece, end="", flush=True)

    if args.trace_out:
        engine.start_trace(args.model)
    result = engine.generate(prompt, args.max_new_tokens, sampling, chat=args.chat,
                             keep_logits=args.logits_out is not None, on_text=stream)
    if args.logits_out:
        write_safetensors_atomic(args.logits_out, {"logits": result.logits})
    if args.trace_out:
        save_trace(args.trace_out, engine.stop_trace())
    if args.json:
        print(json.dumps({"tokens": result.tokens, "text": result.text, "stats": result.stats}))
    else:
        print("\n")
        print(format_table(result.stats))
    return 0


def read_prompts(path: str) -> list[str]:
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
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


def cmd_profile(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    engine = load_engine(args, args.json)
    capacity = engine.kv_capacity
    runs, skipped = [], []  # a prompt that does not fit the context is skipped, not the whole run lost
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
        raise UserError(f"no prompt in {args.prompts} fits the context of {capacity} tokens "
                        f"(all {len(prompts)} skipped; raise --context); no trace written")
    engine.start_trace(args.model, hidden=args.hidden_states)
    totals = {"tokens": 0, "hits": 0, "misses": 0}
    for i, ids in runs:
        stats = engine.generate(ids, args.max_new_tokens).stats
        totals["tokens"] += stats["prompt_tokens"] + stats["generated_tokens"]
        totals["hits"] += stats["hits"]
        totals["misses"] += stats["misses"]
        if not args.json:
            print(f"prompt {i + 1}/{len(prompts)}: {stats['prompt_tokens']} + {stats['generated_tokens']} tokens, "
                  f"hit rate {100 * stats['hit_rate']:.1f}%", file=sys.stderr)
    trace = engine.stop_trace()
    save_trace(args.trace_out, trace)
    totals["hit_rate"] = totals["hits"] / max(totals["hits"] + totals["misses"], 1)
    totals["trace_tokens"] = int(trace.experts.shape[0])
    totals["skipped"] = skipped
    if args.json:
        print(json.dumps(totals))
    else:
        note = f" ({len(skipped)} of {len(prompts)} prompts skipped: too long)" if skipped else ""
        print(f"wrote {args.trace_out}: {totals['trace_tokens']} tokens x {trace.num_layers} layers{note}; live hit "
              f"rate {100 * totals['hit_rate']:.1f}%. Next: python run.py simulate --trace {args.trace_out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..planning.costs import budget_of, hardware_of, model_shape
    from ..planning.trace import load_trace
    from ..planning.tune import levers, tune, winner_profile, write_profile
    from ..planning.validate import score_lines, scores, validation_split
    from ..profiles import load_profile

    def say(line: str = "") -> None:
        print(line, file=sys.stderr if args.json else sys.stdout)

    profile = load_profile(args.profile) if args.profile else None
    trace = load_trace(args.trace)
    split = validation_split(trace, args.trace, args.holdout, load_trace(args.validate) if args.validate else None,
                             args.validate or "")
    config = model_shape(trace)
    budget = budget_of(args.budget, profile)
    hw = hardware_of(profile)
    reserve = args.reserve if args.reserve is not None else (profile.device_reserve if profile
                                                               else DEFAULTS.device_reserve)
    say(f"trace {args.trace}: {trace.experts.shape[0]} tokens; model {config.n_layers} layers ({config.n_moe_layers} "
        f"with experts) x {config.num_experts} experts, top-{config.top_k} (D={config.dim}, I={config.ffn_dim}); "
        f"device budget {budget / 2**30:.1f} GiB; "
        f"link {hw['h2d_bytes_per_s'] / 1e9:.1f} GB/s"
        + (f"; batch {args.batch}: B sequences decoding together, tok/s over the batch" if args.batch > 1 else ""))
    say(split.note)
    measured = str(hw.get("measured_on", ""))
    if measured and f"D={config.dim} I={config.ffn_dim} " not in measured + " ":
        say(f"note: the [hardware] rates were measured on another expert shape ({measured}); this model's experts "
            f"are D={config.dim}, I={config.ffn_dim}: `python run.py calibrate --config MODEL` measures them")
    best, default, everything = tune(split.fit, config, budget, hw, reserve, args.context, log=say, batch=args.batch,
                                     predictors=args.predictor)
    score = scores(split, config, hw, best, default)
    table = score_lines(score)
    text = winner_profile(best, profile or load_profile("auto"), budget, reserve, hw, Path(args.trace).name)
    text = "".join(f"# {line.removeprefix('  ')}\n" for line in [split.note, *table]) + text
    if args.out:
        write_profile(args.out, text)
    if args.json:
        print(json.dumps({"trace": args.trace, "validation": split.note, **score,
                          "best": asdict(best), "default": asdict(default), "out": args.out,
                          "profile": None if args.out else text}))
        return 0
    print(f"\n  default  {default.describe()}")
    print(f"  best     {best.describe()}   ({best.tokens_per_s / default.tokens_per_s:.2f}x)")
    print("\n  one lever at a time, from the default:")
    for label, cand in levers(default, everything):
        print(f"    {label:<22} {cand.describe()}   ({cand.tokens_per_s / default.tokens_per_s:.2f}x)")
    print("\n" + "\n".join(table))
    if args.out:
        print(f"\nwrote {args.out}: python run.py generate --model DIR --profile {args.out}")
    else:
        print("\n" + text)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..planning.calibrate import calibrate
    from ..planning.tune import to_toml

    device = EngineOptions(device=args.device or DEFAULTS.device).resolved_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dim, ffn = args.dim, args.ffn
    if args.config is not None:
        config = read_config(args.config)
        dim, ffn = config.dim, config.ffn_dim
    hw = calibrate(device, dim, ffn, dtype)
    print("# paste into a profile, or pass the profile to tune")
    print(to_toml({"hardware": hw}).lstrip())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..formats.int4_layouts import int4_layout_for
    from ..formats.registry import expert_format, load_quant, resolve_group_size
    from ..weights.checkpoint import Checkpoint
    from ..weights.convert import convert

    ckpt = Checkpoint(resolve_model(args.model))
    config = ckpt.config
    quant = load_quant(args.experts, ckpt.mxfp4) if args.experts != "auto" else "mxfp4" if ckpt.mxfp4 else "int4"
    dtype = DTYPES[args.dtype]
    gpu = torch.device("cuda") if torch.cuda.is_available() else None  # quantizes much faster there
    layout = args.layout if args.layout != "auto" else int4_layout_for(gpu or torch.device("cpu"))
    group = resolve_group_size(config, args.group_size, experts=quant in ("int8", "int4"),
                               attention=args.attention == "int8")
    fmt = expert_format(quant, config, dtype, group, layout)
    attention = None if args.attention == "none" else group
    index = convert(resolve_model(args.model), args.out, fmt, dtype, pack_device=gpu, attention_group=attention)
    print(f"wrote {args.out}: {len(index['experts'])} experts as {fmt.name}, {fmt.nbytes / 2**20:.2f} MiB each; "
          f"attention {index['attention']}")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from ..perplexity import perplexity

    try:
        text = Path(args.text_file).read_text()
    except OSError as e:
        raise UserError(f"cannot read {args.text_file}: {e.strerror}") from None
    engine = load_engine(args, args.json)
    ids = engine.encode(text)[: args.max_tokens + 1]
    window = args.window or min(engine.kv_capacity, len(ids))
    stride = args.stride or max(window // 2, 1)
    ppl, n = perplexity(engine, ids, window, stride)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": n}))
    else:
        print(f"perplexity {ppl:.4f} over {n} tokens (window {window}, stride {stride})")
    return 0


def read_config(text: str):
    """The model shape of a config.json, a params.json or a model folder (no weights needed)."""
    from ..config import from_params_json
    from ..models import from_hf_config

    path = Path(text)
    if path.is_dir():
        path = path / "config.json" if (path / "config.json").exists() else path / "params.json"
    if not path.exists():
        raise UserError(f"no such config: {path}")
    return from_params_json(path) if path.name == "params.json" else from_hf_config(path)


def cmd_plan(args: argparse.Namespace) -> int:
    from ..memory import card_plan, format_card_plan

    config = read_config(args.config)
    if args.context is not None and args.context < 1:
        raise UserError("--context must be positive")
    plan = card_plan(config, args.profile or CARDS, args.context, DEFAULTS.context, args.max_batch)
    print(json.dumps(plan) if args.json else format_card_plan(plan, str(args.config)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.app import Service, bind, make_server, model_id, require_fastapi

    require_fastapi()
    engine = load_engine(args, quiet=False)
    service = Service(engine, model_id(args.model), max_batch=args.max_batch, max_queue=args.max_queue)
    sock = bind(args.host, args.port)
    if args.trace_out:
        engine.start_trace(args.model)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {service.model_id} at http://{shown}:{port}/v1 (max batch {args.max_batch}, queue "
          f"{args.max_queue}); Ctrl-C stops", file=sys.stderr, flush=True)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # SIGTERM ends as Ctrl-C does, after the shutdown
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        make_server(service, sock).run(sockets=[sock])  # uvicorn: SIGINT/SIGTERM finish or cancel the requests
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
        pass
    if args.trace_out:  # the step thread has stopped with the server
        save_trace(args.trace_out, engine.stop_trace())
        print(f"wrote {args.trace_out}", file=sys.stderr)
    print("stopped", file=sys.stderr)
    return 0


def cmd_train_predictor(args: argparse.Namespace) -> int:
    from ..planning.train_predictor import run_train_predictor

    return run_train_predictor(args)


COMMANDS = {"generate": cmd_generate, "profile": cmd_profile, "simulate": cmd_simulate, "tune": cmd_tune,
            "calibrate": cmd_calibrate, "convert": cmd_convert, "perplexity": cmd_perplexity, "plan": cmd_plan,
            "serve": cmd_serve, "train-predictor": cmd_train_predictor}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [*MAIN_JOB, *argv]
    args = parser.parse_args(argv)
    return guarded(COMMANDS[args.command], args)
