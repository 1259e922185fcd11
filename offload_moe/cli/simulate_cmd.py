"""`simulate`: replay a trace under eviction policies and cache sizes. Torch-free: a replay costs its own
time, not the engine's import."""

from __future__ import annotations

import argparse

from ..planning.report import run_simulate
from ..planning.timed import TimedOptions


def cmd_simulate(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    timed = TimedOptions(args.link_gbs, args.layer_ms, args.expert_quant, args.profile) if args.timed else None
    return run_simulate(args.trace, args.slots, policies, args.prefetch, args.json, args.plot, args.batch, timed,
                        args.predictor, args.prefetch_width, args.slot_pool)
