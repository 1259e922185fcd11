"""`Sampling`: how the next token is picked, with its checks. Torch-free: the command line's parser takes its
defaults from here without importing torch (`generate.py` samples).

The logits go through, in this order (vLLM's): `logit_bias` added; `repetition_penalty` on every token seen (the
prompt's and the generated ones: a positive logit divided by it, a negative one multiplied, as transformers and
vLLM do); `frequency_penalty` times a token's count in the generated text and `presence_penalty` once for a token
it holds, subtracted (OpenAI's definition); then greedy picks the top token, or sampling divides by the
temperature, drops the tokens under `min_p` times the top token's probability, keeps the `top_k` best and the
`top_p` nucleus, and draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .errors import UserError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy
SEEDS = 2**64  # a seed is 0 <= seed < 2**64: what torch.Generator.manual_seed takes
BIAS_LIMIT = 100.0  # a logit bias is within +-100 (OpenAI's bound)


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int = 0
    min_p: float = 0.0  # 0 means no min-p filter
    repetition_penalty: float = 1.0  # 1 means none
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        """A temperature this close to 0 picks the top token anyway, and dividing by it overflows to NaN."""
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts(self) -> bool:
        """Whether the logits change before the pick (a bias or a penalty): each sequence then keeps its counts."""
        return bool(self.logit_bias) or self.repetition_penalty != 1 or bool(self.presence_penalty) \
            or bool(self.frequency_penalty)

    def check(self) -> None:
        """A UserError naming the first bad value (its flag's name), of a wrong type included."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
        for name in ("top_k", "seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise UserError(f"--{name.replace('_', '-')} must be a whole number, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be a number, 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("--top-k must be 0 or more")
        if not 0 <= self.seed < SEEDS:
            raise UserError(f"--seed must be 0 or more and below 2**64, got {self.seed}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be above 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"--{name.replace('_', '-')} must be in [-2, 2], got {getattr(self, name)}")
        self._check_bias()

    def _check_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise UserError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise UserError(f"logit_bias: a token id is a whole number, 0 or more, got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, int | float) or not -BIAS_LIMIT <= bias <= BIAS_LIMIT:
                raise UserError(f"logit_bias: token {token}'s bias must be a number in [-100, 100], got {bias!r}")


NAMES = tuple(f.name for f in fields(Sampling))


def with_params(sampling: Sampling | None, params: dict, caller: str) -> Sampling:
    """`sampling` (default: greedy) with the fields named in `params` replaced (None leaves one as it is); a name
    that is not a field is Python's TypeError, as for any unexpected keyword of `caller`."""
    for name in params:
        if name not in NAMES:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    return replace(sampling or Sampling(), **{k: v for k, v in params.items() if v is not None})
