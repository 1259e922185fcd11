"""The command-line entry point (`run.py`, the `offload-moe` script).

A command that needs no model (`simulate`) is parsed and run here without importing torch or the
engine, whose import alone takes 1-2 s on a small machine: a replay costs its own time. Every other
command goes to `cli`, whose full parser adds the same `simulate` subparser (`add_simulate`), so
`run.py --help` lists it and both paths parse it alike. `guarded` is how every command ends on bad
input: one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ..errors import UserError
from ..offload.eviction import POLICIES


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


def add_simulate(sub) -> None:
    """The `simulate` subparser, added to `sub` (an argparse subparsers action)."""
    sim = sub.add_parser("simulate", help="replay a trace under eviction policies and cache sizes",
                         description="Hit rates of eviction policies against the optimal offline bound (Belady).")
    sim.add_argument("--trace", required=True, help="a trace written by profile or generate --trace-out")
    sim.add_argument("--slots", type=int_list, help="cache slots per layer to try, e.g. 2,3,4,6 (default: top-k, "
                     "1.5, 2 and 3 times top-k, at most the expert count: 2,3,4,6 for Mixtral's top-2 of 8)")
    sim.add_argument("--policy", default=",".join(POLICIES), help="policies, comma-separated "
                     "(default: %(default)s)")
    sim.add_argument("--prefetch", type=nonneg, default=0, help="0 or 1: insert the predictions the trace recorded "
                     "(the engine's predictor's, its --prefetch layers ahead; with prefetch off, the router's one "
                     "layer ahead) before each access (default: %(default)s)")
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
                       "hit-rate replay (about 0.4 s per cache size, both replays, for 2,000 tokens x 4 layers); "
                       "imports torch for the cost model")
    timed.add_argument("--link-gbs", type=float, metavar="X", help="host-to-device GB/s (default: --profile's "
                       "[hardware] h2d_bytes_per_s, else 25)")
    timed.add_argument("--layer-ms", type=float, metavar="X", help="compute ms per layer (default: the tuner's cost "
                       "model: one token's dense and expert compute over the layers, at --profile's [hardware] rates)")
    timed.add_argument("--expert-quant", metavar="P", help="none, int8 or int4: the expert size copied (default: "
                       "--profile's expert_quant, else none: the fp16 size)")
    timed.add_argument("--profile", help="a profile name or .toml file whose [hardware] gives the rates")


def cmd_simulate(args: argparse.Namespace) -> int:
    from ..planning.report import run_simulate

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    timed = None
    if args.timed:
        from ..planning.timed import TimedOptions

        timed = TimedOptions(args.link_gbs, args.layer_ms, args.expert_quant, args.profile)
    return run_simulate(args.trace, args.slots, policies, args.prefetch, args.json, args.plot, args.batch, timed,
                        args.predictor, args.prefetch_width)


LIGHT = {"simulate": (add_simulate, cmd_simulate)}  # commands that start without torch


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; bad input (UserError) is one line on stderr and exit code 1, no traceback."""
    try:
        return command(args)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHT:
        add, command = LIGHT[argv[0]]
        parser = argparse.ArgumentParser(prog="run.py")
        add(parser.add_subparsers(dest="command", metavar="COMMAND"))
        return guarded(command, parser.parse_args(argv))
    from .commands import main as full

    return full(argv)
