"""The command-line entry point (the `offload-moe` script, `python run.py`, `python -m offload_moe`): parse, set
up progress and logging, then run the chosen command.

The full parser is torch-free (`parser.py`); a command's module is imported only once it is chosen
(`COMMANDS`), so `simulate` and `--help` start without torch or the engine, whose import alone takes
1-2 s on a small machine. `guarded` is how every command ends on bad input: one line on stderr and
exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from ..errors import UserError
from ..progress import note, quiet
from .parser import MAIN_JOB, build_parser

# command -> "module:function"; the one lazy import point of the command line (it keeps torch off `simulate`)
COMMANDS = {
    "generate": "offload_moe.cli.run_cmds:cmd_generate",
    "profile": "offload_moe.cli.run_cmds:cmd_profile",
    "perplexity": "offload_moe.cli.run_cmds:cmd_perplexity",
    "simulate": "offload_moe.cli.simulate_cmd:cmd_simulate",
    "tune": "offload_moe.cli.offline_cmds:cmd_tune",
    "calibrate": "offload_moe.cli.offline_cmds:cmd_calibrate",
    "plan": "offload_moe.cli.offline_cmds:cmd_plan",
    "train-predictor": "offload_moe.planning.train_predictor:run_train_predictor",
    "convert": "offload_moe.cli.convert_cmd:cmd_convert",
    "serve": "offload_moe.cli.serve_cmd:cmd_serve",
}


def command_of(name: str) -> Callable[[argparse.Namespace], int]:
    module, function = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


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


class ToStderr(logging.Handler):
    """Log records on stderr (as it is when they come), above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            note(self.format(record))
        except Exception:
            self.handleError(record)


def setup_logging(level: str) -> None:
    """The package's diagnostics (the "offload_moe" logger) on stderr from `level` up."""
    handler = ToStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("offload_moe")
    logger.handlers = [handler]  # one handler however often main runs in a process
    logger.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = [*MAIN_JOB, *argv]
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    quiet(args.quiet)
    return guarded(command_of(args.command), args)
