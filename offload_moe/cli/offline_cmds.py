"""The commands that plan without running the model: `tune` (offload settings for a trace), `calibrate`
(the cost model's speeds), `plan` (the memory math of a config on the cards) and `train-predictor`
(`planning.train_predictor.run_train_predictor`, straight from the command table)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..atomic import check_target, write_text_atomic
from ..config import from_params_json
from ..demo import find_model
from ..errors import UserError
from ..memory import card_plan, format_card_plan
from ..models import from_hf_config
from ..models.public import public_config, public_configs
from ..options import CARDS, default_of
from ..plan import kept_gguf, resolve_device, resolve_dtype
from ..planning.calibrate import calibrate
from ..planning.costs import budget_of, hardware_of, model_shape
from ..planning.trace import load_trace
from ..planning.tune import levers, size_text, to_toml, tune, winner_profile
from ..planning.validate import score_lines, scores, validation_split
from ..profiles import load_profile
from ..weights.checkpoint import Checkpoint
from ..weights.gguf import GGUFModel
from .parser import program

CONFIG_FILES = ["config.json", "params.json"]  # all that plan fetches of a hub repository


def config_path(text: str, revision: str | None = None) -> Path:
    """Where a model's shape is, in this order: a local config.json, params.json, model folder or GGUF file; a
    shipped public config by model name or hub id (`models.public`, offline; not at another revision); a model
    name as --model takes it (`demo.find_model`: a hub id's config.json alone is fetched, or read from the cache)."""
    if not Path(text).exists() and revision is None and (shipped := public_config(text)) is not None:
        return shipped
    try:
        return find_model(text, revision, CONFIG_FILES).path
    except UserError as e:
        raise UserError(f"{e}; the shipped public configs: {', '.join(public_configs())}") from None


def read_config(path: Path):
    """The model shape at `config_path`: a config.json, a params.json, a model folder's or a GGUF file's metadata
    (no weights needed)."""
    if path.suffix == ".gguf" and path.is_file():
        return GGUFModel(path).config()
    if path.is_dir():
        path = path / "config.json" if (path / "config.json").exists() else path / "params.json"
    if not path.exists():
        raise UserError(f"no config.json or params.json in {path.parent}")
    return from_params_json(path) if path.name == "params.json" else from_hf_config(path)


def tune_header(args: argparse.Namespace, trace, config, budget: int, hw: dict) -> str:
    """What tune works from: the trace, the model, the budget and the link."""
    return (f"trace {args.trace}: {trace.experts.shape[0]} tokens; model {config.n_layers} layers "
            f"({config.n_moe_layers} with experts) x {config.num_experts} experts, top-{config.top_k} "
            f"(D={config.dim}, I={config.ffn_dim}); device budget {size_text(budget)}; "
            f"link {hw['h2d_bytes_per_s'] / 1e9:.1f} GB/s"
            + (f"; batch {args.batch}: B sequences decoding together, tok/s over the batch" if args.batch > 1
               else ""))


def shape_note(config, hw: dict) -> str | None:
    """A note when the [hardware] rates were measured on another expert shape than this model's."""
    measured = str(hw.get("measured_on", ""))
    if measured and f"D={config.dim} I={config.ffn_dim} " not in measured + " ":
        return (f"note: the [hardware] rates were measured on another expert shape ({measured}); this model's "
                f"experts are D={config.dim}, I={config.ffn_dim}: `{program()} calibrate --config MODEL` "
                "measures them")
    return None


def print_tuning(args: argparse.Namespace, best, default, everything, table: list[str], text: str) -> None:
    print(f"\n  default  {default.describe()}")
    print(f"  best     {best.describe()}   ({best.tokens_per_s / default.tokens_per_s:.2f}x)")
    print("\n  one lever at a time, from the default:")
    for label, cand in levers(default, everything):
        print(f"    {label:<22} {cand.describe()}   ({cand.tokens_per_s / default.tokens_per_s:.2f}x)")
    print("\n" + "\n".join(table))
    if args.out:
        print(f"\nwrote {args.out}: {program()} generate --model DIR --profile {args.out}")
    else:
        print("\n" + text)


def cmd_tune(args: argparse.Namespace) -> int:
    def say(line: str = "") -> None:
        print(line, file=sys.stderr if args.json else sys.stdout)

    if args.out:
        check_target(args.out)
    profile = load_profile(args.profile) if args.profile else None
    trace = load_trace(args.trace)
    config = model_shape(trace, args.trace, required=True)
    split = validation_split(trace, args.trace, args.holdout, load_trace(args.validate) if args.validate else None,
                             args.validate or "")
    budget = budget_of(args.budget, profile)
    hw = hardware_of(profile)
    reserve = args.reserve if args.reserve is not None else (profile.device_reserve if profile
                                                               else default_of("device_reserve"))
    say(tune_header(args, trace, config, budget, hw))
    say(split.note)
    note = shape_note(config, hw)
    if note:
        say(note)
    best, default, everything = tune(split.fit, config, budget, hw, reserve, args.context, log=say, batch=args.batch,
                                     predictors=args.predictor, budget_s=args.budget_s)
    if min(best.slots) >= config.num_experts:
        return all_resident(args, best, profile, budget, reserve, hw)
    score = scores(split, config, hw, best, default)
    table = score_lines(score)
    text = winner_profile(best, profile or load_profile("auto"), budget, reserve, hw, Path(args.trace).name)
    text = "".join(f"# {line.removeprefix('  ')}\n" for line in [split.note, *table]) + text
    if args.out:
        write_text_atomic(args.out, text)
    if args.json:
        print(json.dumps({"trace": args.trace, "validation": split.note, **score,
                          "best": asdict(best), "default": asdict(default), "out": args.out,
                          "profile": None if args.out else text}))
    else:
        print_tuning(args, best, default, everything, table, text)
    return 0


def all_resident(args: argparse.Namespace, best, profile, budget: int, reserve: int, hw: dict) -> int:
    """`tune` when every expert fits the budget: it says so, and its profile keeps every expert resident (the cost
    model's figure for such a run is only its compute bound, so none is printed)."""
    line = (f"every expert fits the {size_text(budget)} budget ({best.precision} experts, {best.attention} "
            "attention): nothing is offloaded, so there is no cache to tune; the profile keeps every expert resident")
    text = winner_profile(best, profile or load_profile("auto"), budget, reserve, hw, Path(args.trace).name,
                          resident=True)
    if args.out:
        write_text_atomic(args.out, text)
    if args.json:
        print(json.dumps({"trace": args.trace, "all_resident": True, "message": line, "out": args.out,
                          "profile": None if args.out else text}))
    else:
        print(f"\n  {line}")
        print(f"\nwrote {args.out}" if args.out else "\n" + text)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device or default_of("device"))
    dtype = resolve_dtype("auto", device)
    dim, ffn = args.dim, args.ffn
    if args.config is not None:
        config = read_config(config_path(args.config, args.revision))
        dim, ffn = config.dim, config.ffn_dim
    hw = calibrate(device, dim, ffn, dtype)
    print("# paste into a profile, or pass the profile to tune")
    print(to_toml({"hardware": hw}).lstrip())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    path = config_path(args.config, args.revision)
    config = read_config(path)
    if args.context is not None and args.context < 1:
        raise UserError("--context must be positive")
    # a GGUF file: a column for its experts as it holds them
    kept = kept_gguf(Checkpoint(path), "none") if path.suffix == ".gguf" and path.is_file() else None
    plan = card_plan(config, args.profile or CARDS, args.context, default_of("context"), args.max_batch, kept)
    print(json.dumps(plan) if args.json else format_card_plan(plan, str(args.config)))
    return 0
