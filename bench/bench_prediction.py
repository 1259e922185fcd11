"""Expert prediction on a trained demo: which predictor makes experts resident on arrival, on held-out routing.

    python bench/bench_prediction.py [--model demo|demo-fine|PATH] [--fit-tokens 40000] [--eval-tokens 20000]
                                     [--write | --recalibrate] [--threads 2] [--input router_input|hidden]
                                     [--routing decode|text] [--temperature 0.7]

Both sides of the split come from the training script's corpus split (tools/train_tiny_moe.py): the
learned predictor is fitted on routing of training files, every figure is measured on routing of the
held-out files, which neither the model nor the predictor saw. The routing (`--routing`), traced with the
hidden states, then replayed one token after another as one stream:
  decode  (the default) prompts of the files (16 tokens, one every 300), each continued for 200 tokens by the
          engine's own sampling at `--temperature`: the routing a decode meets, as `profile` records it. Its next
          token is the model's own, which the last layer's state foretells: the cross-token guess (layer 0 from
          the previous token's last layer) is the better for it. Greedy decoding sends a model this small into
          loops (16% distinct 4-grams at temperature 0, 84% at 0.7), which would flatter every cache.
  text    windows of the files (the model's context) scored in one pass, replayed as if decoded: each next token
          is the text's, which the model did not pick.
The learned predictor reads each layer's router input (`--input`; what `train-predictor` fits by default). Printed:
  * recall per layer at width K and 2K (train_predictor.recall_table's predictors, plus the router one
    layer ahead: each layer's own router on the hidden state entering the layer before; layer 0 from
    the previous token's last layer);
  * hit rates per cache size: LRU and Belady without prefetch, LRU with each predictor prefetching as
    many experts as the layer has slots (the engine's default width) and top-k of them;
  * the timed replay (timed.py) of those at the 24 GB profile's link and the cost model's compute:
    per size, the share of expert uses ready on arrival, late (copy in flight) and missed, and the
    cost-aware decision (speculate.py) over the learned predictor's full ranking, calibrated on the
    held-out routing; then the target line: at twice top-k slots, its tok/s against no prefetch, and the ceiling
    there: a perfect predictor (the held-out routing itself) decided the same way; and the target's two sides again
    under the 24gb profile's own eviction policy, which speeds up no prefetch too.
  * the decided prefetch by depth: leads 1 to N (`--depth`, each fitted and calibrated as lead 1), every
    lead decided at each row, a deeper one's copies only into the link's gap before the next layer's guess.
`--write` saves the learned predictor (every lead) as the model folder's predictor.safetensors, which the engine's
`--predictor auto` (the default) loads: how the demos' files are made. The file carries the calibration
measured on the held-out routing (train_predictor.calibration_of, as `train-predictor` measures it on its
held-out part), so the engine prefetches by `speculate`'s decision. `--recalibrate` instead loads the folder's
existing predictor.safetensors, measures its calibration on the held-out routing and writes it back with the
same weights and metadata, then stops (how the shipped files got their calibration without a refit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from train_tiny_moe import corpus_files, split_corpus  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.offload.predictors import (  # noqa: E402
    FILE_NAME,
    LearnedPredictor,
    RouterPredictor,
    load_predictor,
    replayed,
    save_predictor,
)
from offload_moe.offload.speculate import calibrate  # noqa: E402
from offload_moe.offload.states import HIDDEN  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.planning.replay import default_slots, simulate  # noqa: E402
from offload_moe.planning.timed import Deeper, TimedOptions, simulate_timed, timed_costs  # noqa: E402
from offload_moe.planning.trace import Trace, join_traces  # noqa: E402
from offload_moe.planning.train_predictor import calibration_of, fit_row, recall, recall_table, samples  # noqa: E402
from offload_moe.profiles import load_profile  # noqa: E402

# decode routing (`decode_trace`): a short prompt, then the model's own tokens up to most of the demos' context (256)
PROMPT_TOKENS, PROMPT_STRIDE, NEW_TOKENS = 16, 300, 200
PROFILE = "24gb"  # the timed replay's hardware and the target's eviction policy: the 24 GB card's profile


def windows_trace(engine: Engine, files: dict[str, str], tokens: int) -> Trace:
    """Windows of `files` (BOS + context - 1 tokens each), scored until `tokens`, as one trace with hidden states."""
    step, parts, n = engine.kv_capacity - 1, [], 0
    for text in files.values():
        ids = engine.tokenizer.encode(text, bos=False)
        for i in range(0, len(ids), step):
            engine.start_trace("bench", hidden=True)
            engine.score([engine.config.bos_id, *ids[i : i + step]])
            parts.append(engine.stop_trace())
            n += parts[-1].num_tokens
            if n >= tokens:
                break
        if n >= tokens:
            break
    return join_traces(parts)


def decode_trace(engine: Engine, files: dict[str, str], tokens: int, temperature: float) -> Trace:
    """Prompts of `files` (BOS and PROMPT_TOKENS tokens, one every PROMPT_STRIDE tokens), each continued by the
    engine's own sampling at `temperature` for up to NEW_TOKENS tokens (seeded by its place: reproducible), traced
    with hidden states until `tokens`, as one trace: the routing a decode meets, where the next token is the
    model's own, not the text's."""
    parts, n = [], 0
    for text in files.values():
        ids = engine.tokenizer.encode(text, bos=False)
        for i in range(0, len(ids) - PROMPT_TOKENS + 1, PROMPT_STRIDE):
            engine.start_trace("bench", hidden=True)
            engine.generate([engine.config.bos_id, *ids[i : i + PROMPT_TOKENS]], NEW_TOKENS,
                            temperature=temperature, seed=len(parts))
            parts.append(engine.stop_trace())
            n += parts[-1].num_tokens
            if n >= tokens:
                return join_traces(parts)
    return join_traces(parts)


def temperature(text: str) -> float:
    """`--temperature`: a sampling temperature, 0 (greedy) or more."""
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= t < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 (greedy) or more, got {text!r}")
    return t


def add_routing_flags(ap: argparse.ArgumentParser) -> None:
    """`--routing` and `--temperature`, for every bench that traces held-out routing (`routing_trace`)."""
    ap.add_argument("--routing", choices=("decode", "text"), default="decode", help="decode: prompts continued by the "
                    "engine's own sampling (what a decode meets, and what `profile` records); text: windows of the "
                    "files scored in one pass, replayed as if decoded (the next token is the text's)")
    ap.add_argument("--temperature", type=temperature, default=0.7, help="the decode routing's sampling "
                    "temperature (greedy decoding sends a model this small into loops)")


def routing_trace(engine: Engine, files: dict[str, str], tokens: int, routing: str, temperature: float) -> Trace:
    """`--routing` decode (`decode_trace`) or text (`windows_trace`) of `files`, until `tokens`."""
    if routing == "text":
        return windows_trace(engine, files, tokens)
    return decode_trace(engine, files, tokens, temperature)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo, demo-fine or a trained Mixtral-layout folder")
    ap.add_argument("--fit-tokens", type=int, default=40_000)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--write", action="store_true", help="save the predictor as the model folder's " + FILE_NAME +
                    ", with its calibration measured on the held-out routing")
    ap.add_argument("--recalibrate", action="store_true", help="rewrite the folder's " + FILE_NAME + " with its "
                    "weights and metadata as they are and a calibration measured on the held-out routing; then stop")
    ap.add_argument("--depth", type=int, default=3, help="fit leads 1 to this (at most the layers - 1); the "
                    "depth table decides copies from each lead up to each depth")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input", choices=HIDDEN, default="router_input", help="the state the learned predictor reads")
    add_routing_flags(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    engine = Engine.load(folder, EngineOptions(prefetch=0, dtype="float32", progress=False, threads=args.threads))
    c = engine.config
    L, E, K = c.n_moe_layers, c.num_experts, c.top_k
    train, held = split_corpus(corpus_files())

    def routing(files: dict[str, str], tokens: int) -> Trace:
        return routing_trace(engine, files, tokens, args.routing, args.temperature)

    what = ("windows" if args.routing == "text" else
            f"prompts decoded at temperature {args.temperature:g} ({PROMPT_TOKENS} + {NEW_TOKENS} tokens each)")
    if args.recalibrate:
        path = folder / FILE_NAME
        existing = load_predictor(path, L, c.dim, E)
        evaluation = routing(held, args.eval_tokens)
        for p in (existing, *existing.deeper):
            p.calibration = calibration_of(p, evaluation)  # [L, E]
        calibration = existing.calibration
        meta = {**existing.meta, "calibrated_tokens": str(evaluation.num_tokens)}
        save_predictor(path, existing.weights, existing.lead, meta, calibration, existing.deeper)
        print(f"wrote {path}: its weights, calibrated on {evaluation.num_tokens:,} tokens of held-out {what}; "
              f"mean chance per rank " + " ".join(f"{p:.2f}" for p in calibration.mean(0)))
        return 0
    fit, evaluation = routing(train, args.fit_tokens), routing(held, args.eval_tokens)
    print(f"# {time.strftime('%Y-%m-%d')}, {args.model}: {L} layers, {E} experts, top-{K}; fitted on "
          f"{fit.num_tokens:,} tokens of training-file {what}, measured on {evaluation.num_tokens:,} tokens of "
          f"held-out {what}")
    fitted = {lead: [fit_row(*samples(fit, row, lead, args.input), E, args.hidden_size, args.steps, 512, 3e-3, row)
                     for row in range(L)] for lead in range(1, min(args.depth, L - 1) + 1)}
    meta = {"trace": f"bench_prediction: {fit.num_tokens} tokens of training-file {what}", "model": args.model,
            "fitted_tokens": str(fit.num_tokens), "hidden_size": str(args.hidden_size), "steps": str(args.steps),
            "calibrated_tokens": str(evaluation.num_tokens), "input": args.input}
    learned = {lead: LearnedPredictor(w, lead, meta) for lead, w in fitted.items()}
    for p in learned.values():
        p.calibration = calibration_of(p, evaluation)  # [L, E]
    calibration = learned[1].calibration
    if args.write:
        save_predictor(folder / FILE_NAME, fitted[1], 1, meta, calibration, [learned[d] for d in sorted(learned)[1:]])
        print(f"wrote {folder / FILE_NAME} (leads {', '.join(map(str, sorted(learned)))})")
    router = RouterPredictor(engine.model, 1)

    for width in sorted({K, min(2 * K, E)}):
        table = recall_table(learned[1], fit, evaluation, width)
        table.pop("recorded")  # traced with prefetch off: the router's top-k, as "router" at K
        cut = replayed(evaluation, router, width)
        table["router"] = [recall(cut.predicted[:, r], evaluation.experts[:, r]) for r in range(L)]
        for d in sorted(learned)[1:]:
            table[f"learned {d}"] = recall_table(learned[d], fit, evaluation, width)["learned"]
        print(f"\nrecall at width {width} per layer (share of chosen experts among the {width} predicted; learned N: "
              "N layers ahead)")
        print(f"{'layer':>6}" + "".join(f"{name:>11}" for name in table))
        for r in range(L):
            print(f"{r:>6}" + "".join(f"{100 * table[name][r]:>10.1f}%" for name in table))
        print(f"{'mean':>6}" + "".join(f"{100 * np.mean(table[name]):>10.1f}%" for name in table))

    sizes = default_slots(K, E)
    # (name, predictor, width: None for the cache's slots)
    configs = [("router K", router, K), ("router S", router, None), ("learned K", learned[1], K),
               ("learned S", learned[1], None)] + ([("learned 2 K", learned[2], K)] if 2 in learned else [])
    print("\nhit rate (resident on arrival) per cache size, held out; prefetch width top-k (K) or the slots (S), "
          "learned 2: two layers ahead")
    names = ["LRU", "Belady"] + [name for name, _, _ in configs]
    print(f"{'slots':>6}" + "".join(f"{c:>12}" for c in names))
    replays = {}
    for s in sizes:
        row = [simulate(evaluation, s, "lru")["hit_rate"], simulate(evaluation, s, "belady")["hit_rate"]]
        for name, predictor, width in configs:
            replays[s, name] = cut = replayed(evaluation, predictor, width or s)
            row.append(simulate(cut, s, "lru", prefetch=1)["hit_rate"])
        print(f"{s:>6}" + "".join(f"{100 * v:>11.1f}%" for v in row))

    costs = timed_costs(evaluation, TimedOptions(profile=PROFILE))
    link = costs["h2d_bytes_per_s"] / 1e9
    print(f"\ntimed, LRU ({PROFILE} profile: {link:.0f} GB/s link, copy {1e6 * costs['copy_s']:.1f} us per expert of "
          f"{costs['expert_bytes'] / 1e3:.0f} kB; compute {1e6 * costs['layer_s']:.2f} us per layer "
          "from the cost model; demand copies first, stale speculative copies dropped): ready / late / missed %, "
          "us per token; decided: speculate.py's choice from the learned predictor's ranks, calibrated on the "
          "held-out routing")
    full = replayed(evaluation, learned[1], E)  # every expert ranked, for the decision to choose from
    names = ["none", *names[2:], "decided"]
    print(f"{'slots':>6}" + "".join(f"{c:>23}" for c in names))
    target = {}
    for s in sizes:
        runs = [simulate_timed(evaluation, s, "lru", None, 1, costs["copy_s"], costs["layer_s"])]
        for name, predictor, _ in configs:
            cut = replays[s, name]
            runs.append(simulate_timed(cut, s, "lru", cut.predicted, predictor.lead, costs["copy_s"], costs["layer_s"],
                                       after=cut.tensors["predicted_after"]))
        runs.append(simulate_timed(full, s, "lru", full.predicted, 1, costs["copy_s"], costs["layer_s"],
                                   after=full.tensors["predicted_after"], calibration=calibration))
        target[s] = runs
        print(f"{s:>6}" + "".join(f"{100 * r['ready']:>6.1f}/{100 * r['late']:.1f}/{100 * r['missed']:.1f} "
                                  f"{1e6 * r['seconds_per_token']:>5.1f}" for r in runs))
    deep = sorted(learned)
    fulls = {d: replayed(evaluation, learned[d], E) for d in deep[1:]}
    deepest = [Deeper(d, fulls[d].predicted, fulls[d].tensors["predicted_after"], learned[d].calibration)
               for d in deep[1:]]  # leads 2 to N, decided beside lead 1
    print("\ndecided prefetch by depth N, tok/s over no prefetch, copies per token demand+speculative (leads 1 to N; "
          "a deeper lead's copies only fill the link until the next layer's nearer guess)")
    print(f"{'slots':>6}" + "".join(f"{'depth ' + str(d):>34}" for d in deep))
    for s in sizes:
        none, cells = target[s][0], []
        for depth in deep:
            r = simulate_timed(full, s, "lru", full.predicted, 1, costs["copy_s"], costs["layer_s"],
                               after=full.tensors["predicted_after"], calibration=calibration,
                               deeper=[x for x in deepest if x.lead <= depth])
            target[s].append(r)
            cells.append(f"{r['tokens_per_s'] / none['tokens_per_s']:.3f}x ({r['demand_copies']:.2f}+"
                         f"{r['prefetch_copies_per_token']:.2f}, {r['dropped']:.2f} dropped)")
        print(f"{s:>6}" + "".join(f"{c:>34}" for c in cells))
    s = min(2 * K, E)
    none, decided = target[s][0], target[s][-1]
    print(f"\ntarget, {s} slots (2 x top-k), miss policy fetch: no prefetch {none['tokens_per_s'] / 1e3:.1f}k tok/s "
          f"(link busy {100 * none['link_busy']:.1f}%), decided prefetch at depth {deep[-1]} "
          f"{decided['tokens_per_s'] / 1e3:.1f}k tok/s "
          f"(link busy {100 * decided['link_busy']:.1f}%, {decided['demand_copies']:.2f} demand + "
          f"{decided['prefetch_copies_per_token']:.2f} speculative copies per token, {decided['dropped']:.2f} "
          f"dropped): {decided['tokens_per_s'] / none['tokens_per_s']:.3f}x")
    # the same under the profile's own eviction policy, both sides: it speeds up no prefetch too
    policy = load_profile(PROFILE).settings["policy"]
    both = [simulate_timed(evaluation, s, policy, None, 1, costs["copy_s"], costs["layer_s"]),
            simulate_timed(full, s, policy, full.predicted, 1, costs["copy_s"], costs["layer_s"],
                           after=full.tensors["predicted_after"], calibration=calibration, deeper=deepest)]
    print(f"the same under the {PROFILE} profile's eviction policy ({policy}), both sides: no prefetch "
          f"{both[0]['tokens_per_s'] / 1e3:.1f}k tok/s, decided prefetch at depth {deep[-1]} "
          f"{both[1]['tokens_per_s'] / 1e3:.1f}k tok/s: {both[1]['tokens_per_s'] / both[0]['tokens_per_s']:.3f}x")
    # the ceiling: the held-out routing itself as every lead's prediction, its chosen experts first (calibrated: 1.0,
    # the rest 0), decided as above
    chosen = (full.predicted[..., :, None] == evaluation.experts[..., None, :]).any(-1)  # [T, L, E]
    perfect = np.take_along_axis(full.predicted, np.argsort(~chosen, axis=-1, kind="stable"), -1)  # [T, L, E]
    sure = calibrate(perfect, evaluation.experts)  # [L, E]
    r = simulate_timed(evaluation, s, "lru", perfect, 1, costs["copy_s"], costs["layer_s"], calibration=sure,
                       deeper=[Deeper(d, perfect, None, sure) for d in deep[1:]])
    print(f"ceiling, {s} slots: a perfect predictor decided at depth {deep[-1]} {r['tokens_per_s'] / 1e3:.1f}k tok/s "
          f"(link busy {100 * r['link_busy']:.1f}%): {r['tokens_per_s'] / none['tokens_per_s']:.3f}x")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
