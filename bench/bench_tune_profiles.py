"""The shipped profiles' prefetch defaults, judged in the timed replay on a demo's held-out routing.

    python bench/bench_tune_profiles.py [--model demo|demo-fine] [--eval-tokens 8000] [--threads 2]
                                        [--policy P] [--pool layer|global] [--routing decode|text] [--temperature 0.7]

The held-out routing is bench_prediction.py's (`--routing`: held-out prompts decoded by the model's own sampling,
or windows of the held-out text; the training script's held-out files); the predictions
are the shipped predictor's (the model folder's predictor.safetensors, what `--predictor auto` loads).
For each card profile: its hardware, expert precision, policy and pool (the engine's default where it sets
none; `--policy`, `--pool`: another, to compare), its slots per layer scaled to the demo's experts (Mixtral's 8:
as they are), every prefetch option, width and miss policy scored by the tuner's judge (planning/judge.py).
Printed: each option's tok/s (modelled) under the profile's miss policy, the fastest of them, and the fastest
under any miss policy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_prediction import add_routing_flags, routing_trace  # noqa: E402
from train_tiny_moe import corpus_files, split_corpus  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.offload.eviction import ONLINE_POLICIES, POOLS  # noqa: E402
from offload_moe.offload.predictors import FILE_NAME, replayed  # noqa: E402
from offload_moe.options import EngineOptions, default_of  # noqa: E402
from offload_moe.planning.candidate import Candidate  # noqa: E402
from offload_moe.planning.costs import hardware_of  # noqa: E402
from offload_moe.planning.judge import judge  # noqa: E402
from offload_moe.profiles import load_profile  # noqa: E402

CARDS = ("24gb", "16gb", "12gb")
MIXTRAL_EXPERTS = 8  # the experts per layer the card profiles' cache_experts count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo or demo-fine")
    ap.add_argument("--eval-tokens", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policy", choices=ONLINE_POLICIES, help="instead of each profile's eviction policy")
    ap.add_argument("--pool", choices=POOLS, help="instead of each profile's slot pool")
    add_routing_flags(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    engine = Engine.load(folder, EngineOptions(prefetch=0, dtype="float32", progress=False, threads=args.threads))
    c = engine.config
    L, E, K = c.n_moe_layers, c.num_experts, c.top_k
    held = routing_trace(engine, split_corpus(corpus_files())[1], args.eval_tokens, args.routing, args.temperature)
    predicted = replayed(held, str(folder / FILE_NAME))  # as the engine predicts: calibrated, every expert ranked
    sources = [(0, "", held), (int(predicted.metadata["prefetch_lead"]), FILE_NAME, predicted)]
    print(f"# {args.model}: {L} layers, {E} experts, top-{K}; {held.num_tokens:,} held-out tokens ({args.routing} "
          f"routing); predictions: the shipped {FILE_NAME} (lead {sources[1][0]}, {predicted.predicted.shape[2]} wide)")
    print("| profile | slots | option | fetch tok/s | vs none | cpu tok/s | auto tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name in CARDS:
        profile = load_profile(name)
        s = profile.settings
        slots = max(K, min(E, round(s["cache_experts"] * E / MIXTRAL_EXPERTS)))
        layout = Candidate(s["expert_quant"], s.get("attention_quant", "none"), 64, [slots] * L,
                           args.policy or s.get("policy", default_of("policy")), 0, s.get("miss_policy", "fetch"),
                           0.0, 0.0, pool=args.pool or s.get("slot_pool", default_of("slot_pool")))
        out, _ = judge(layout, sources, c, hardware_of(profile))
        ways = list(dict.fromkeys((x.prefetch, x.width, x.decided) for x in out))
        by = {(x.prefetch, x.width, x.decided, x.miss_policy): x.tokens_per_s for x in out}
        none = by[0, 0, False, layout.miss_policy]
        for way in ways:
            label = "none" if not way[0] else f"lead {way[0]} " + ("decided" if way[2] else f"width {way[1]}")
            print(f"| {name} | {slots} of {E} | {label} | {by[(*way, layout.miss_policy)] / 1e3:.1f}k | "
                  f"{by[(*way, layout.miss_policy)] / none:.3f}x | {by[(*way, 'cpu')] / 1e3:.1f}k | "
                  f"{by[(*way, 'auto')] / 1e3:.1f}k |")
        same = [x for x in out if x.miss_policy == layout.miss_policy]
        pick, anyway = max(same, key=lambda x: x.tokens_per_s), max(out, key=lambda x: x.tokens_per_s)
        print(f"# {name}: fastest under miss policy {layout.miss_policy}: {pick.describe()}; under any: "
              f"{anyway.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
