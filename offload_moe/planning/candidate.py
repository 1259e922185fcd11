"""One setting `tune` scores (`Candidate`), and how its time was found (`SCORED`): shared by the tuner
(`tune.py`), its judge in the timed replay (`judge.py`) and the held-out check (`validate.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCORED = ("cost model", "timed replay")  # how a candidate's time was found


@dataclass
class Candidate:
    precision: str
    attention: str
    group_size: int
    slots: list[int]
    policy: str
    prefetch: int
    miss_policy: str
    hit_rate: float
    seconds_per_step: float  # one decode step of `batch` sequences
    batch: int = 1
    predictor: str = ""  # a train-predictor file whose predictions were replayed; "": the trace's recorded ones
    pool: str = "layer"  # the slots per layer, or (global) their sum shared by every layer
    width: int = 0  # fixed-width prefetch: predictions copied per row at most; 0: none, or decided
    decided: bool = False  # prefetch by the cost-aware decision (`speculate`), not a fixed width
    scored: str = SCORED[0]  # how seconds_per_step was found: the closed-form cost model or the timed replay
    link_busy: float | None = None  # the link's busy share in the timed replay; None: not replayed in time

    @property
    def seconds_per_token(self) -> float:
        return self.seconds_per_step / self.batch

    @property
    def tokens_per_s(self) -> float:
        """Aggregate over the batch."""
        return self.batch / self.seconds_per_step

    def describe(self) -> str:
        s = self.slots
        slots = str(s[0]) if len(set(s)) == 1 else f"{min(s)}-{max(s)} (sum {sum(s)})"
        slots += " global" if self.pool == "global" else ""
        how = (" decided" if self.decided else f" width {self.width}") if self.prefetch else ""
        return (f"{self.precision:<5} attn {self.attention:<4} slots {slots:<14} {self.policy:<11} "
                f"prefetch {self.prefetch}{how}{' ' + Path(self.predictor).name if self.predictor else ''} "
                f"miss {self.miss_policy:<5} hit {100 * self.hit_rate:5.1f}%  "
                f"{self.tokens_per_s:7.2f} tok/s" + (f" ({1e3 * self.seconds_per_step:.2f} ms per step of {self.batch})"
                                                     if self.batch > 1 else "")
                + (f" [timed, link busy {100 * self.link_busy:.0f}%]" if self.link_busy is not None else ""))
