"""The timed replay against the live engine over the emulated link: is the modelled tok/s what a run measures?

    python bench/bench_link.py [--models demo,demo-fine] [--tokens 224] [--copy-ms 5] [--repeats 3] [--threads 2]
                               [--links ideal,fed,whole] [--routing decode|text] [--temperature 0.7]

For each trained demo, at twice top-k slots per layer (LRU, a cache per layer, miss policy fetch), with the engine's
prefetch (its predictor, --prefetch 1: "depth N" where the predictor file has a calibration, the copies `speculate`
chooses at each of its leads 1 to N, in the replay too; else "lead 1", the fixed width), with the file's nearest
lead alone ("depth 1", a copy of the file without its deeper leads) and without: the live engine decodes held-out
tokens (from the training script's held-out files, tools/train_tiny_moe.py; `--routing`: by default a prompt of them
continued by the model's own sampling, as bench_prediction.py's decode routing, else the text itself) token by
token, teacher-forced through the decode path, on a CPU device whose link is emulated (`--link-gbs`) at the speed
that makes one expert's copy last `--copy-ms` (well above sleep granularity), the three settings in turn `--repeats`
times, the fastest run of each counted and the spread of its runs printed. Measured over the decode steps after the
first: tok/s, the compute's waits on copies, the link's busy share. The same tokens' routing and predictions,
recorded in a run before the timed one, then go through the timed replay (planning/timed.py `simulate_timed`) with
the same copy time and a layer's compute time from either
  * calibrated: `planning/calibrate.py` on this CPU at the model's shape, through the tuner's cost model (what
    `simulate --timed --profile` reads from a calibrated profile), or
  * measured: the live run's own decode time less its waits, per layer,
and the ratio modelled / live of each, the replay's link (`planning/link.py`) serving demand copies first and
dropping stale speculative ones as the engine's does. The calibrated column says whether the cost model knows this
CPU's compute; the measured one whether the replay's link (one copy at a time, waits before use) is the engine's.
`--links`: the emulated link the prefetching settings run over, each in turn (no prefetch runs over the first):
  ideal  the engine's `--link-gbs`: it runs copies in 0.1 ms chunks itself, a demand copy passing a speculative
         one at the next chunk, and takes stale ones back (the link the replay models);
  fed    a copy engine as CUDA's (a copy runs whole, none taken back: `EmulatedLink(chunk_s=None)`), fed
         speculative copies a chunk at a time by the host (offload/feeder.py), as the engine does on CUDA;
  whole  the same engine, speculative copies enqueued whole (CUDA before the feeder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_prediction import add_routing_flags  # noqa: E402
from train_tiny_moe import corpus_files, split_corpus  # noqa: E402

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine  # noqa: E402
from offload_moe.offload.link import EmulatedLink  # noqa: E402
from offload_moe.offload.predictors import FILE_NAME, load_predictor, replayed, save_predictor  # noqa: E402
from offload_moe.offload.prefetch import Transfers  # noqa: E402
from offload_moe.options import EngineOptions  # noqa: E402
from offload_moe.planning.calibrate import calibrate  # noqa: E402
from offload_moe.planning.costs import step_seconds  # noqa: E402
from offload_moe.planning.timed import deeper_of, simulate_timed  # noqa: E402
from offload_moe.planning.trace import slice_trace  # noqa: E402
from offload_moe.threads import set_threads  # noqa: E402

PROMPT = 16  # held-out tokens of prefill before the decode steps


def held_out_ids(engine: Engine, count: int, routing: str, temperature: float) -> list[int]:
    """BOS and `count` - 1 tokens: the held-out files' first ones (routing text), or PROMPT of them continued by the
    engine's own sampling at `temperature`, seed 0 (routing decode: bench_prediction.py's; every setting decodes
    these same tokens, which its logits, equal to the resident engine's, would sample too)."""
    ids = [engine.config.bos_id]
    for text in split_corpus(corpus_files())[1].values():
        ids += engine.tokenizer.encode(text, bos=False)
        if len(ids) >= count:
            break
    if routing == "text":
        return ids[:count]
    made = engine.generate(ids[:PROMPT], count - PROMPT, temperature=temperature, seed=0).tokens
    if PROMPT + len(made) < count:
        sys.exit(f"the decode of the held-out prompt ended after {len(made)} tokens; fewer --tokens, or --routing text")
    return ids[:PROMPT] + made


@torch.inference_mode()
def decode(engine: Engine, ids: list[int]) -> dict:
    """Prefill ids[:PROMPT], then one decode step per following token; timed from the second step on."""
    cache, link = engine.cache, engine.cache.transfers.link
    engine.kv.reset()
    cache.reset_counters()
    engine.model(torch.tensor(ids[:PROMPT]), engine.kv, last_only=True)
    engine.model(torch.tensor(ids[PROMPT : PROMPT + 1]), engine.kv)  # the first step: one-time work
    wait0, busy0, t0 = cache.counters.copy_wait_s, link.busy_until_now(), time.perf_counter()
    for tok in ids[PROMPT + 1 :]:
        engine.model(torch.tensor([tok]), engine.kv)
    seconds = time.perf_counter() - t0
    steps = len(ids) - PROMPT - 1
    return {"tok_s": steps / seconds, "wait_s": (cache.counters.copy_wait_s - wait0) / steps,
            "busy": (link.busy_until_now() - busy0) / seconds, "compute_s": (seconds - cache.counters.copy_wait_s
                                                                             + wait0) / steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,demo-fine")
    ap.add_argument("--tokens", type=int, default=224, help="decode steps per run (the demos' context is 256)")
    ap.add_argument("--copy-ms", type=float, default=5.0, help="one expert's copy over the emulated link")
    ap.add_argument("--repeats", type=int, default=3, help="live runs per setting, the settings in turn; the fastest "
                    "counts, the spread is printed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--links", default="ideal", help="ideal, fed, whole: see the docstring")
    add_routing_flags(ap)
    args = ap.parse_args()
    links = args.links.split(",")
    if not links or set(links) - {"ideal", "fed", "whole"}:
        ap.error(f"--links takes ideal, fed and whole, not {args.links!r}")
    print(f"# {time.strftime('%Y-%m-%d')}: {args.tokens} decode steps ({args.routing} routing), one expert copy "
          f"{args.copy_ms} ms, "
          "twice top-k slots per layer, LRU, miss policy fetch")
    print(f"{'model':>10}{'link':>6}{'prefetch':>9}{'link GB/s':>10}{'live tok/s':>11}{'spread':>10}{'wait ms/tok':>12}"
          f"{'link busy':>10}"
          f"{'model tok/s':>12}{'ratio':>7}{'calibrated':>11}{'ratio':>7}")
    tmp = Path(tempfile.mkdtemp())
    for name in args.models.split(","):
        options = dict(device="cpu", dtype="float32", policy="lru", slot_pool="layer", miss_policy="fetch",
                       threads=args.threads, progress=False)
        probe = Engine.load(name, EngineOptions(**options))
        c, fmt = probe.config, probe.cache.fmt
        L, K = c.n_moe_layers, c.top_k
        copy_s = args.copy_ms / 1e3
        gbs = fmt.nbytes / copy_s / 1e9
        # one thread (torch's and the C kernels'): at the demos' shapes an op is microseconds, and a second thread adds
        # only a barrier, which on a loaded machine can wait milliseconds for a descheduled thread
        set_threads(1)
        hw = calibrate(torch.device("cpu"), c.dim, c.ffn_dim, torch.float32, repeats=50, formats=("none",))
        set_threads(args.threads)
        calibrated_layer_s = step_seconds(c, fmt.nbytes, hw, 0, 0, "fetch", precision="none") / L
        if PROMPT + 1 + args.tokens > probe.kv_capacity:
            ap.error(f"--tokens {args.tokens}: {name} holds {probe.kv_capacity} tokens, the prompt {PROMPT + 1}")
        ids = held_out_ids(probe, PROMPT + 1 + args.tokens, args.routing, args.temperature)
        del probe
        shipped = load_predictor(resolve_model(name) / FILE_NAME, L, c.dim, c.num_experts)
        nearest = tmp / f"{name}-lead1.safetensors"  # the shipped file's nearest lead alone: depth 1
        save_predictor(nearest, shipped.weights, shipped.lead, shipped.meta, shipped.calibration)
        runs = {}  # (link, prefetch, predictor) -> (engine, trace, live runs)
        settings = [(link, 1, p) for link in links for p in ("auto", str(nearest))] + [(links[0], 0, "auto")]
        for link, prefetch, predictor in settings:
            engine = Engine.load(name, EngineOptions(cache_experts=2 * K, prefetch=prefetch, link_gbs=gbs,
                                                     predictor=predictor, **options))
            if link != "ideal":  # a copy engine as CUDA's, fed or not
                cache = engine.cache
                cache.transfers.link.close()
                cache.transfers = Transfers(engine.device, [len(m) for m in cache.mem],
                                            EmulatedLink(gbs * 1e9, chunk_s=None), feed=link == "fed")
                if link == "fed" and prefetch and predictor == "auto":
                    feeder = cache.transfers.feeder
                    print(f"# {name}: the feeder's chunk {feeder.chunk_bytes} bytes, "
                          f"{1e3 * feeder.chunk_bytes / (gbs * 1e9):.2f} ms, {feeder.window} to {len(feeder.ring)} "
                          "in flight")
            engine.start_trace(name, hidden=True)
            decode(engine, ids)
            runs[link, prefetch, predictor] = (engine, engine.stop_trace(), [])
        for _ in range(args.repeats):  # the settings in turn, so a slow spell of the machine falls on each
            for engine, _, lives in runs.values():
                lives.append(decode(engine, ids))
        for (link, prefetch, _), (engine, trace, lives) in runs.items():
            live = max(lives, key=lambda r: r["tok_s"])
            engine.cache.transfers.link.close()
            cut = slice_trace(trace, PROMPT + 1, trace.num_tokens)
            used = engine.model.prefetcher.predictor if prefetch else None
            # a predictor file with a calibration: the engine prefetches what `speculate` decides at each of its leads,
            # so does the replay (the deeper leads' predictions made again from the recorded hidden states)
            table = used.calibration if used is not None else None
            if table is not None:
                cut = replayed(cut, used, c.num_experts)
            modelled = [simulate_timed(cut, 2 * K, "lru", cut.predicted if used else None, 1, copy_s, layer_s,
                                       after=cut.tensors.get("predicted_after") if used else None,
                                       calibration=table, deeper=deeper_of(cut) if table is not None else ())
                        ["tokens_per_s"] for layer_s in (live["compute_s"] / L, calibrated_layer_s)]
            depth = engine.model.prefetcher.lead if prefetch else 0
            kind = "none" if not prefetch else "lead 1" if table is None else f"depth {depth}"
            spread = f"{min(r['tok_s'] for r in lives):.0f}-{max(r['tok_s'] for r in lives):.0f}"
            print(f"{name:>10}{link:>6}{kind:>9}{gbs:>10.3f}{live['tok_s']:>11.1f}{spread:>10}"
                  f"{1e3 * live['wait_s']:>12.2f}{100 * live['busy']:>9.1f}%"
                  + "".join(f"{m:>{w}.1f}{m / live['tok_s']:>7.2f}"
                            for m, w in zip(modelled, (12, 11), strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
