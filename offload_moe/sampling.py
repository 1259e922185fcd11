"""`Sampling`: how the next token is picked, with its checks. Torch-free: the command line's parser takes its
defaults from here without importing torch (`generate.py` samples)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int = 0

    def check(self) -> None:
        if self.temperature < 0:
            raise UserError("--temperature must be 0 or more")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("--top-k must be 0 or more")
