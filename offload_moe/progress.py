"""Progress bars on stderr (tqdm) for the long steps: loading experts, `convert`, `profile`, `perplexity`,
`calibrate`, `train-predictor` and `tune`.

A bar shows where stderr is a terminal and clears itself when done; `quiet()` (the command line's --quiet)
turns every bar off, a call's `enabled` (the engine's `progress` option) its own. `note` writes a line on
stderr above a running bar, not through it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm

_quiet = False


def quiet(on: bool = True) -> None:
    """No bars from here on (on=False: bars again)."""
    global _quiet
    _quiet = on


def progress_bar(iterable: Iterable | None = None, what: str = "", total: int | None = None, unit: str = "it",
                 initial: int = 0, enabled: bool = True) -> tqdm:
    """A bar over `iterable` (or to `total` from `initial`, advanced by `update`); unit "B" counts bytes (KiB,
    MiB, GiB)."""
    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(iterable, desc=what, total=total, initial=initial, unit=unit, leave=False, file=sys.stderr,
                dynamic_ncols=True, disable=True if _quiet or not enabled else None,  # None: off unless a terminal
                **scaled)


def note(line: str) -> None:
    """One line on stderr, above any bar."""
    tqdm.write(line, file=sys.stderr)
