"""The cost model: the predicted time of one decode step from a simulated cache run, and the hardware
and model shape it reads.

A step is one token's, or, with a batch of B sequences decoding together (`--batch`), one step of
all B (`batch_replay`'s replay: each layer acquires the union of the B tokens' experts once, so more
distinct experts per step, shared by the rows that chose them). Decode is memory-bound; copies are
bytes over the measured link bandwidth, and an expert's compute is what `calibrate` measured for its
format (one expert's decode forward, as weights per second; an expert's weights are read once however
many rows chose it):
  compute  = dense bytes / device bandwidth + X * expert_s      (expert_s = expert weights / measured rate;
                                                                 X = experts computed per step, L*K for one token)
  copy     = expert bytes / host-to-device bandwidth          (one miss or one prefetch)
  cpu      = expert weights / measured CPU rate               (one miss computed on the CPU)
A format's kernel decides its rate, not its bytes: int4 read as 0.56 bytes per weight by a real int4
kernel is fast, int4 rebuilt in fp16 (about 12.5 bytes of traffic per weight) is slower than fp16
itself. Where a profile's [hardware] has no measured rate for a format (`device_weights_per_s_int4`,
`cpu_weights_per_s_int4`, ...), the expert costs its bytes over the device (or CPU) bandwidth, the
assumption of a kernel that reads each byte once, and the tuner says so in its output.
With m demand misses and p prefetch copies per step (from the simulator):
  fetch: t = max(compute + m*copy, (m + p)*copy)    a demand miss stalls; prefetches overlap compute,
                                                   but the link carries every copy
  cpu:   t = max(compute + m*cpu,  (m + p)*copy)    the miss runs on the CPU; its copy still happens
  auto:  the faster of the two per miss (min(copy, cpu) in the first term)
and B / t tokens per second (aggregate over the batch). The KV cache of B sequences comes off the budget.
"""

from __future__ import annotations

import json

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..formats.registry import bytes_per_expert
from ..memory import resident_bytes
from ..options import parse_size
from ..profiles import Profile
from .trace import Trace

MIXTRAL_8X7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                           num_experts=8, top_k=2, vocab_size=32000)
PRECISIONS = ("none", "int8", "int4")
DEFAULT_HARDWARE = {"h2d_bytes_per_s": 25e9, "device_bytes_per_s": 800e9, "cpu_bytes_per_s": 40e9}


def rate_key(where: str, precision: str) -> str:
    """The [hardware] key of a measured expert compute rate: where is "device" or "cpu"."""
    return f"{where}_weights_per_s_{precision}"


def expert_seconds(config: ModelConfig, expert_bytes: int, hw: dict, precision: str | None) -> tuple[float, float]:
    """(device, CPU) seconds of one expert's decode forward in `precision`: its weights over the rate
    `calibrate` measured for that format, else (no precision, or no such figure) its bytes over the
    device or CPU bandwidth."""
    rates = [hw.get(rate_key(where, precision)) if precision else None for where in ("device", "cpu")]
    return tuple(config.expert_params / rate if rate else expert_bytes / hw[f"{where}_bytes_per_s"]
                 for rate, where in zip(rates, ("device", "cpu"), strict=True))


def rate_notes(hw: dict, precisions=PRECISIONS) -> list[str]:
    """What the cost model assumes for lack of measured rates: one line per place, empty when none."""
    notes = []
    for where, bandwidth in (("device", "device_bytes_per_s"), ("cpu", "cpu_bytes_per_s")):
        missing = [p for p in precisions if not hw.get(rate_key(where, p))]
        if missing:
            keys = ", ".join(rate_key(where, p) for p in missing)
            notes.append(f"cost model: no measured {where} compute rate for {', '.join(missing)} ({keys}): falls back "
                         f"to their bytes over {bandwidth}, as if each format's kernel read its bytes once "
                         "(run `python run.py calibrate` on the target and put its [hardware] in the profile)")
    return notes


def step_seconds(config: ModelConfig, expert_bytes: int, hw: dict, misses: float, prefetches: float,
                 miss_policy: str, attention: str = "none", group_size: int = 64, precision: str | None = None,
                 experts: float | None = None) -> float:
    """Predicted seconds of one decode step with `misses` and `prefetches` copies (see the module docstring):
    `experts` computed in it (default L*K, one token's); `precision` ("none", "int8", "int4") selects the
    measured compute rates of `hw` (see `expert_seconds`)."""
    dense = resident_bytes(config, torch.float16, group_size if attention == "int8" else None)  # fp16 resident weights
    expert_s, cpu = expert_seconds(config, expert_bytes, hw, precision)
    experts = config.n_moe_layers * config.top_k if experts is None else experts
    compute = dense / hw["device_bytes_per_s"] + experts * expert_s
    copy = expert_bytes / hw["h2d_bytes_per_s"]
    per_miss = {"fetch": copy, "cpu": cpu, "auto": min(copy, cpu)}[miss_policy]
    return max(compute + misses * per_miss, (misses + prefetches) * copy)


def step_cost(config: ModelConfig, hw: dict, r: dict, tokens: int, precision: str, attention: str, group_size: int,
              miss_policy: str) -> float:
    """Predicted seconds of one decode step from `tune.replay`'s counts `r` over a trace of `tokens` tokens (a step
    is one token, or one forward of the batch), for experts in `precision`."""
    steps = r.get("forwards", tokens)
    nbytes = bytes_per_expert(config, precision, group_size, torch.float16)
    return step_seconds(config, nbytes, hw, r["misses"] / steps, r["prefetch_copies"] / steps, miss_policy,
                        attention, group_size, precision, r["accesses"] / steps)


def hardware_of(profile: Profile | None) -> dict:
    """DEFAULT_HARDWARE, overridden by the profile's [hardware] (measured_on stays text)."""
    hw = dict(DEFAULT_HARDWARE)
    if profile is not None and profile.hardware:
        hw.update({k: float(v) if k != "measured_on" else v for k, v in profile.hardware.items()})
    return hw


def budget_of(text: str | None, profile: Profile | None) -> int:
    """The device memory to plan for: `--budget` text, else the profile's [budget] device."""
    if text:
        return parse_size(text)
    if profile is not None and profile.device_budget:
        return profile.device_budget
    raise UserError("give the device memory with --budget (e.g. 24GB) or a profile that has [budget] device")


def model_shape(trace: Trace, name: str = "", required: bool = False) -> ModelConfig:
    """The model shape recorded in the trace, or Mixtral-8x7B's when the trace has none; `required`: a UserError
    naming the trace (`name`) then."""
    raw = trace.metadata.get("config") if trace.metadata else None
    if not raw and required:
        raise UserError(f"trace {name} records no model shape (its 'config' metadata): record it with profile or "
                        "generate --trace-out, which write it")
    if not raw:
        return MIXTRAL_8X7B
    try:
        shape = json.loads(raw)
        if not isinstance(shape, dict):
            raise TypeError(f"a {type(shape).__name__}, not an object")
        return ModelConfig.from_dict(shape)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise UserError(f"the trace's 'config' metadata is not a model shape ({e}); record the trace again") from None
