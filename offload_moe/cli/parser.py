"""The command line's parser: one `add_<command>` per command, `build_parser` puts them together.

Torch-free (the defaults come from `options` and `sampling`): `--help` and every command parse
before anything heavy is imported, and `simulate` runs without torch at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..offload.eviction import POLICIES, POOLS
from ..offload.states import HIDDEN
from ..options import (
    ATTENTION_QUANTS,
    CARDS,
    DTYPE_NAMES,
    EXPERT_QUANTS,
    GROUP_SIZES,
    INT4_LAYOUTS,
    OPTIONS,
    default_of,
)
from ..sampling import Sampling
from ..serve.guard import API_KEY_ENV, Limits
from .args import (
    MergeArgs,
    add_revision,
    engine_flags,
    flag_help,
    int_list,
    nbytes,
    nonneg,
    port,
    positive,
    seconds,
    size,
    template_arg,
    template_kwargs,
)

BUDGET_S = 60.0  # tune --budget-s: a minute of replays on the project's 2-core VM
SAMPLING = Sampling()
LIMITS = Limits()
DEMO_PROMPT = 'def read_config(path):\n    """'
DEMO_TOKENS = 48
# the main job (no command): the trained demo, 2 of 8 experts cached per layer, gently sampled
MAIN_JOB = ["generate", "--cache-experts", "2", "--temperature", "0.8", "--top-p", "0.95"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def program(argv0: str | None = None) -> str:
    """The command line as it was started (`argv0`, default sys.argv[0]), for its usage and the commands it
    suggests: offload-moe (the console script), python run.py, or python -m offload_moe."""
    path = Path(sys.argv[0] if argv0 is None else argv0)
    if path.name == "__main__.py":
        return f"python -m {path.parent.name}"
    return f"python {path.name}" if path.suffix == ".py" else path.name.removesuffix(".exe") or "offload-moe"


def add_template_flags(group, applies: str) -> None:
    """--chat-template-arg and --chat-template-kwargs, into one dict `template_args`."""
    group.add_argument("--chat-template-arg", dest="template_args", type=template_arg, action=MergeArgs,
                       metavar="KEY=VALUE", help="a variable of the chat template, such as enable_thinking=false "
                       "(Qwen3's) or reasoning_effort=high (gpt-oss's): VALUE is read as JSON where it parses "
                       f"(false, not False), else as a string; repeatable; {applies}")
    group.add_argument("--chat-template-kwargs", dest="template_args", type=template_kwargs, action=MergeArgs,
                       metavar="JSON", help="several at once, as a JSON object: '{\"enable_thinking\": false}' "
                       "(vLLM's and llama.cpp's flag); with --chat-template-arg, a later name wins")


def add_sampling_flags(parser) -> None:
    """generate's and profile's sampling flags (`run_cmds.sampling_of` reads them)."""
    smp = parser.add_argument_group("sampling (greedy unless --temperature > 0)")
    smp.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    smp.add_argument("--temperature", type=float, default=SAMPLING.temperature,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    smp.add_argument("--top-p", type=float, default=SAMPLING.top_p, help="nucleus sampling mass (default: %(default)s)")
    smp.add_argument("--top-k", type=nonneg, default=SAMPLING.top_k, help="keep the k most likely tokens; "
                     "0 keeps all (default: %(default)s)")
    smp.add_argument("--seed", type=int, default=SAMPLING.seed, help="sampling seed (default: %(default)s)")


def add_generate(sub) -> None:
    gen = sub.add_parser("generate", parents=[engine_flags()], help="generate text and print run statistics",
                         description="Generate text; print it as it is made, then the run statistics.")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (default: {DEMO_PROMPT!r})")
    src.add_argument("--prompt-ids", type=int_list, metavar="IDS", help="prompt as token ids, e.g. 1,415,2936")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message in the checkpoint's chat template (its Jinja "
                          "chat_template; a tokenizer.model folder: Mixtral's [INST] ... [/INST])")
    add_template_flags(gen, "needs --chat")
    gen.add_argument("--max-new-tokens", type=nonneg, default=DEMO_TOKENS, metavar="N",
                     help="stop after N new tokens (default: %(default)s)")
    add_sampling_flags(gen)
    out = gen.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help='print one JSON object {"tokens", "text", "stats"} on stdout and nothing else')
    out.add_argument("--logits-out", metavar="FILE",
                     help="write a safetensors file whose float32 tensor 'logits' [generated, vocab] holds the "
                          "logits each generated token was chosen from")
    out.add_argument("--trace-out", metavar="TRACE", help="record the routing of this run (see README: traces)")


def add_profile(sub) -> None:
    prof = sub.add_parser("profile", parents=[engine_flags()], help="run prompts and record a routing trace",
                          description="Run every prompt (greedy, or sampled as the sampling flags say: as you will "
                          "serve, for the routing your decode meets) and write the routing trace of all tokens.")
    prof.add_argument("--prompts", required=True, metavar="FILE",
                      help="prompts: a text file, one per line, or JSONL with a 'prompt' field")
    prof.add_argument("--max-new-tokens", type=nonneg, default=DEMO_TOKENS, metavar="N",
                      help="new tokens per prompt (default: %(default)s)")
    prof.add_argument("--trace-out", required=True, metavar="TRACE", help="the trace file to write (safetensors)")
    prof.add_argument("--hidden-states", action="store_true",
                      help="record the hidden state entering each MoE layer and its router input too (float16, "
                           "dim x MoE layers x 4 bytes per token: large), for train-predictor")
    prof.add_argument("--json", action="store_true", help="print the run statistics as one JSON object")
    add_sampling_flags(prof)


def add_simulate(sub) -> None:
    sim = sub.add_parser("simulate", help="replay a trace under eviction policies and cache sizes",
                         description="Hit rates of eviction policies against the optimal offline bound (Belady).")
    sim.add_argument("--trace", required=True, help="a trace written by profile or generate --trace-out")
    sim.add_argument("--slots", type=int_list, help="cache slots per layer to try, e.g. 2,3,4,6 (default: top-k, "
                     "1.5, 2 and 3 times top-k, at most the expert count: 2,3,4,6 for Mixtral's top-2 of 8)")
    sim.add_argument("--policy", default="all", help=f"policies, comma-separated, from {', '.join(POLICIES)}; all: "
                     "every online one (belady, the bound, is always shown) (default: %(default)s)")
    sim.add_argument("--slot-pool", choices=POOLS, default=default_of("slot_pool"), help="layer: each layer its own "
                     "--slots; global: their sum, one pool shared by every layer (default: %(default)s, the engine's)")
    sim.add_argument("--prefetch", type=nonneg, help="0 or 1: insert the predictions the trace recorded (the "
                     "engine's predictor's, its --prefetch layers ahead; with prefetch off, the router's one layer "
                     "ahead) before each access (default: what the engine that recorded the trace ran: 1 where it "
                     "ran with prefetch on, else 0)")
    sim.add_argument("--predictor", metavar="FILE", help="replay instead the predictions of this train-predictor "
                     "file, made from the trace's hidden states (profile --hidden-states); implies --prefetch 1 "
                     "(imports torch)")
    sim.add_argument("--prefetch-width", type=nonneg, default=0, metavar="W", help="with --predictor: experts "
                     "prefetched per layer and token, at most its slots; 0: top-k, the engine's default "
                     "(default: %(default)s)")
    sim.add_argument("--json", action="store_true", help='print one JSON object {"results": [...]}')
    sim.add_argument("--plot", metavar="FILE.png", help="draw hit rate against slots and a per-layer expert heatmap")
    sim.add_argument("--batch", type=int, default=1, metavar="B", help="replay the trace as B sequences decoding "
                     "together: B contiguous parts stepped at once, one access of the union of their experts per "
                     "layer and step, as the engine's batched decode (default: %(default)s)")
    timed = sim.add_argument_group("timed replay (--timed)")
    timed.add_argument("--timed", action="store_true", help="also replay in modelled time, with the trace's "
                       "predictions (lead: its prefetch_lead, else 1) and without prefetch, the first online "
                       "--policy only: one link, one expert copy at a time; per layer the share of accesses ready "
                       "on arrival, late (copy in flight) and missed. A Python loop per step, slower than the "
                       "hit-rate replay; imports torch for the cost model")
    timed.add_argument("--link-gbs", type=float, metavar="X", help="host-to-device GB/s (default: --profile's "
                       "[hardware] h2d_bytes_per_s, else 25)")
    timed.add_argument("--layer-ms", type=float, metavar="X", help="compute ms per layer (default: the tuner's cost "
                       "model: one token's dense and expert compute over the layers, at --profile's [hardware] rates)")
    timed.add_argument("--expert-quant", metavar="P", help="none, int8 or int4: the expert size copied (default: "
                       "--profile's expert_quant, else none: the fp16 size)")
    timed.add_argument("--profile", help="a profile name or .toml file whose [hardware] gives the rates")


def add_train_predictor(sub) -> None:
    trp = sub.add_parser("train-predictor", help="fit the learned expert predictor on a trace with hidden states",
                         description="Fit a small MLP per MoE layer that predicts the layer's experts from an earlier "
                                     "hidden state (a trace recorded with profile --hidden-states), print its "
                                     "held-out recall beside the other predictors', and write the file that "
                                     "--predictor loads, with a calibration measured on the held-out part (a "
                                     "quarter of the trace by default) so the engine prefetches only the "
                                     "copies that pay.")
    trp.add_argument("trace", help="a trace recorded with profile --hidden-states")
    trp.add_argument("--out", required=True, help="the predictor file to write (safetensors)")
    trp.add_argument("--lead", type=int, default=1, help="layers ahead it predicts: the --prefetch it serves; "
                     "calibrated, it holds every lead from 1 to this, and the engine's --prefetch M decides copies "
                     "from lead M and every deeper one (default: %(default)s)")
    trp.add_argument("--input", choices=("auto", *HIDDEN), default="auto",
                     help="the state it reads: each layer's router input (after the attention) or the hidden state "
                     "entering the layer; the engine reads what the file says (default: %(default)s, the router "
                     "input where the trace holds it)")
    trp.add_argument("--hidden-size", type=int, default=256, help="the MLP's hidden size (default: %(default)s)")
    trp.add_argument("--steps", type=int, default=500, help="Adam steps per layer (default: %(default)s)")
    trp.add_argument("--batch", type=int, default=512, help="samples per step (default: %(default)s)")
    trp.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: %(default)s)")
    trp.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    trp.add_argument("--holdout", type=float, help="fit on the head; score, and calibrate the file's per-rank "
                     "chances (the prefetch decision's), on this share of the trace's tail, split at a prompt or "
                     "forward boundary (default: 0.25, a quarter held out; 0: fit on everything, no score and no "
                     "calibration, so the engine prefetches a fixed width)")
    trp.add_argument("--validate", metavar="TRACE", help="fit on the whole trace; score and calibrate on this one")
    trp.add_argument("--json", action="store_true", help="print the report as one JSON object")


def add_tune(sub) -> None:
    tun = sub.add_parser("tune", help="search offload settings for a trace and write the best as a profile",
                         description="Predict decode tokens/s for expert precision, slots per layer, eviction "
                                     "policy, slot pool, prefetch and miss handling; print the best against the "
                                     "default.")
    tun.add_argument("--trace", required=True)
    tun.add_argument("--profile", help="base profile: budget, reserve and [hardware] (default: none)")
    tun.add_argument("--budget", help="device memory, e.g. 24GB (default: the profile's)")
    tun.add_argument("--reserve", type=size, help="device memory kept free for the CUDA context and activations "
                     "(default: the profile's, else 1.5GiB)")
    tun.add_argument("--context", type=int, default=default_of("context"), help="context to leave room for "
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
    tun.add_argument("--budget-s", type=seconds, default=BUDGET_S, metavar="S", help="seconds for the replays: every "
                     "eviction policy in both slot pools and every way to prefetch, the default's first, then the "
                     "timed replays of the best layout's prefetch and miss options; what the time leaves out is "
                     "said (default: %(default)s)")
    tun.add_argument("--out", metavar="FILE.toml", help="write the winner as a profile (default: print it)")
    tun.add_argument("--json", action="store_true", help="print the winner, the default and both scores as one "
                     "JSON object (notes go to stderr)")


def add_calibrate(sub) -> None:
    cal = sub.add_parser("calibrate", help="measure link, device and CPU speeds for the cost model",
                         description="Measure host-to-device, device and CPU bandwidth as decode uses them, and "
                                     "one expert's decode forward in each expert format (fp16, int8, int4, packed "
                                     "as the engine packs them for the device), on the device and on the CPU; "
                                     "print them as a profile's [hardware] table for tune.")
    cal.add_argument("--device", help=f"cpu, cuda or auto (default: {default_of('device')})")
    cal.add_argument("--dim", type=int, default=4096, help="model dim of the measured expert (default: %(default)s, "
                     "Mixtral-8x7B's)")
    cal.add_argument("--ffn", type=int, default=14336, help="expert FFN dim (default: %(default)s)")
    cal.add_argument("--config", metavar="CONFIG", help="measure an expert of this model's shape instead (as plan "
                     "--config takes it): its D and I replace --dim and --ffn")
    add_revision(cal)


def add_convert(sub) -> None:
    con = sub.add_parser("convert", help="write a packed offload folder that loads fast",
                         description="Write the model once in the engine's layout: dense weights, and experts "
                                     "packed one after another with a checksummed index. Resumable.")
    con.add_argument("--model", required=True, help="source folder or GGUF file (any layout the engine reads), "
                     "or a model name as the engine flags' --model takes it (a hub id org/name[:QUANT], demo)")
    add_revision(con)
    con.add_argument("--out", required=True, help="the folder to write")
    con.add_argument("--experts", choices=(*EXPERT_QUANTS, "auto"), default="auto", help="expert precision; auto: "
                     "an MXFP4 checkpoint's stay MXFP4, a GGUF file's quantized ones keep their types (so does none), "
                     "others become int4 (default: %(default)s)")
    con.add_argument("--attention", choices=ATTENTION_QUANTS, default=default_of("attention_quant"),
                     help="attention projections' precision: int8 or none (the --dtype) (default: %(default)s)")
    con.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=default_of("group_size"),
                     help=flag_help(OPTIONS["group_size"]))
    con.add_argument("--dtype", choices=DTYPE_NAMES, default="float16",
                     help="dtype of the dense weights and of unquantized experts (default: %(default)s)")
    con.add_argument("--layout", choices=("auto", *INT4_LAYOUTS), default="auto",
                     help="int4 code layout: cuda (the tiles of torch's CUDA int4 kernel, for a GPU of compute "
                          "capability 8.0 or later), cpu (the CPU kernel's order; other GPUs dequantize), or auto: "
                          "that of this machine's device, cuda where its GPU runs the kernel (default: %(default)s)")


def add_perplexity(sub) -> None:
    ppl = sub.add_parser("perplexity", parents=[engine_flags()], help="perplexity of a text file",
                         description="Perplexity (sliding window) of the text's tokens with BOS in front.")
    ppl.add_argument("--text-file", required=True)
    ppl.add_argument("--max-tokens", type=int, default=4096, help="score at most this many tokens "
                     "(default: %(default)s)")
    ppl.add_argument("--window", type=int, help="tokens per window (default: the context)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")
    ppl.add_argument("--json", action="store_true", help='print one JSON object {"perplexity", "tokens"}')


def add_plan(sub) -> None:
    pln = sub.add_parser("plan", help="memory math of a model on 24, 16 and 12 GB cards, from its config.json",
                         description="Print the bytes per expert in fp16, int8 and int4, and the expert slots per "
                                     "layer that each card leaves beside the dense weights (fp16), the KV cache of "
                                     "the context and the reserve. Needs no weights: a config.json (or a GGUF's "
                                     "metadata) is enough.")
    pln.add_argument("--config", required=True, metavar="CONFIG",
                     help="a config.json (Hugging Face), a params.json (original release), a model folder or a GGUF "
                          "file (its metadata); else the name or hub id of a shipped public config (such as "
                          "Qwen/Qwen3-30B-A3B), offline; else a model name as --model takes it (a hub id: from the "
                          "Hugging Face cache, else its config.json alone is downloaded)")
    add_revision(pln)
    pln.add_argument("--profile", action="append", metavar="NAME",
                     help="a card profile (its budget, reserve, dtype and context); repeat for several "
                          f"(default: {' '.join(CARDS)})")
    pln.add_argument("--context", type=int, help="context to leave KV-cache room for (default: the profile's, "
                     f"else {default_of('context')})")
    pln.add_argument("--max-batch", type=int, default=1, metavar="N", help="sequences decoding together (serve "
                     "--max-batch): the KV cache of N sequences (default: %(default)s)")
    pln.add_argument("--json", action="store_true", help="print the numbers as one JSON object")


def add_serve(sub) -> None:
    srv = sub.add_parser("serve", parents=[engine_flags()], help="an OpenAI-compatible HTTP server",
                         description="Serve the model over HTTP with OpenAI's API (/v1/completions, "
                                     "/v1/chat/completions, /v1/models, /health, /metrics), several requests "
                                     "decoding together (continuous batching). Needs the serve extra: "
                                     "pip install 'offload_moe[serve]'.")
    srv.add_argument("--served-model-name", metavar="NAME", help="the model id the server answers to and lists "
                     "(GET /v1/models) (default: --model as given: the hub id or demo name, else the folder's or "
                     "file's name)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=port, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    srv.add_argument("--max-batch", type=int, default=4, metavar="N",
                     help="sequences decoding together: a KV pool of N sequences, counted in the memory plan "
                          "(default: %(default)s)")
    srv.add_argument("--max-queue", type=nonneg, default=64, metavar="N",
                     help="requests waiting for a slot beyond the batch; more are refused with 503 "
                          "(default: %(default)s)")
    srv.add_argument("--trace-out", metavar="TRACE", help="record the routing of every request served, written "
                     "when the server stops (see README: traces)")
    srv.add_argument("--access-log", action="store_true", help="a line on stdout for every request (uvicorn's "
                     "access log; default: off)")
    add_template_flags(srv, "a default for every chat request (a request's chat_template_kwargs win, name by "
                            "name)")
    lim = srv.add_argument_group("limits (one client must not hurt the others)")
    lim.add_argument("--max-request-bytes", type=nbytes, default=LIMITS.max_request_bytes, metavar="SIZE",
                     help="a larger request body is refused with 413 (default: %(default)s bytes)")
    lim.add_argument("--max-connections", type=positive, default=LIMITS.max_connections, metavar="N",
                     help="connections open at once; more are closed at once (default: %(default)s)")
    lim.add_argument("--header-timeout", type=seconds, default=LIMITS.header_timeout, metavar="S",
                     help="seconds a connection has to send a request's headers (default: %(default)s)")
    lim.add_argument("--shutdown-grace", type=seconds, default=LIMITS.shutdown_grace, metavar="S",
                     help="on Ctrl-C or SIGTERM, seconds running requests get to finish before they end with an "
                          "error (default: %(default)s)")
    lim.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="a Host or Origin name to answer besides the bound address's (a server on a loopback "
                          "address answers only loopback names, against DNS rebinding); '*': any; repeatable")
    lim.add_argument("--api-key", metavar="KEY", help="every route but /health then needs Authorization: Bearer "
                     f"KEY, else 401 (default: ${API_KEY_ENV}; unset or empty: no key, any client is served)")


SUBPARSERS = (add_generate, add_profile, add_simulate, add_train_predictor, add_tune, add_calibrate, add_convert,
              add_perplexity, add_plan, add_serve)  # in the order --help lists them


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--quiet and --log-level, which every command takes."""
    out = parser.add_argument_group("progress and diagnostics (on stderr)")
    out.add_argument("--quiet", action="store_true", help="no progress bars (they show where stderr is a terminal)")
    out.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="warning",
                     help="diagnostics from this level up: info adds the steps of a load, debug more "
                          "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program(),
        description="Run Mixture-of-Experts models with offloaded experts. With no command (or only flags): "
                    "generate from the embedded demo model, a small MoE trained on Python's standard library, "
                    f"with {' '.join(MAIN_JOB[1:])}.",
    )
    parser.add_argument("--version", action="version", version=f"offload_moe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBPARSERS:
        add(sub)
    for command in sub.choices.values():
        add_output_flags(command)
    return parser
