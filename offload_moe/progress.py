"""A one-line progress bar on stderr, for long loads."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr, for loads above 256 MB when stderr is a terminal."""

    def __init__(self, what: str, total: int, enabled: bool = True):
        self.what, self.total, self.done = what, total, 0
        self.on = enabled and total > 256 * 2**20 and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.on and (now - self.last > 0.2 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9) / 2**20
            pct = 100 * self.done / self.total
            print(f"\rloading {self.what}: {pct:5.1f}% {self.done / 2**30:6.2f} GiB {rate:7.0f} MiB/s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.on:
            print(file=sys.stderr)
