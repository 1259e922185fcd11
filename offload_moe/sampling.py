"""`Sampling`: how the next token is picked, with its checks. Torch-free: the command line's parser takes its
defaults from here without importing torch (`generate.py` samples)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy
SEEDS = 2**64  # a seed is 0 <= seed < 2**64: what torch.Generator.manual_seed takes


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """A temperature this close to 0 picks the top token anyway, and dividing by it overflows to NaN."""
        return self.temperature < GREEDY_BELOW

    def check(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan passes `< 0`: refused here
            raise UserError(f"--temperature must be a number, 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("--top-k must be 0 or more")
        if not 0 <= self.seed < SEEDS:
            raise UserError(f"--seed must be 0 or more and below 2**64, got {self.seed}")
