"""Hardware calibration: measure, on the target, the link, memory and per-format expert compute
rates that the cost model (`costs`) reads from a profile's [hardware]. Only the `calibrate` command
imports it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..formats.registry import auto_group_size, format_for
from ..progress import progress_bar
from .costs import MIXTRAL_8X7B, PRECISIONS, rate_key


def calibrate(device: torch.device, dim: int = 4096, ffn: int = 14336, dtype: torch.dtype = torch.float16,
              repeats: int = 5, formats=PRECISIONS) -> dict:
    """Measure what the cost model needs, the way decode uses it, on one expert of shape (dim, ffn):
    - h2d_bytes_per_s: its w13's bytes copied from pinned RAM to the device;
    - device_bytes_per_s, cpu_bytes_per_s: the dense w13 GEMV (one token) on the device and on the CPU;
    - device_weights_per_s_P and cpu_weights_per_s_P for each expert format P in `formats` (none,
      int8, int4): one whole expert's decode forward (one token), packed as the engine packs it for
      `device` (int4 in the layout of the device's kernel, group 64 where it divides), on the device
      from a device buffer, and on the CPU from the host buffer (what a CPU-computed miss runs),
      as weights per second. On a CPU device the two are one measurement.
    `measured_on` says when, where, the dtype, the shape and the formats measured."""

    def best(fn, on: torch.device = device) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if on.type == "cuda":
                torch.cuda.synchronize(on)  # SYNC: timing
            times.append(time.perf_counter() - t0)
        return min(times)

    config = replace(MIXTRAL_8X7B, dim=dim, ffn_dim=ffn)
    quantizable = auto_group_size(config) is not None
    measured = [p for p in formats if p == "none" or quantizable]  # else no group size divides the shape
    names = []
    with progress_bar(what="calibrating", total=1 + len(measured), unit="step") as bar:
        hw = _bandwidths(device, dim, ffn, dtype, best)
        bar.update()
        for precision in measured:
            fmt = format_for(config, precision, dtype, device=device)  # the engine's group size and int4 layout
            names.append(fmt.name)
            device_s, cpu_s = _expert_forward_seconds(fmt, device, dim, ffn, dtype, best)
            hw[rate_key("device", precision)] = config.expert_params / device_s
            hw[rate_key("cpu", precision)] = config.expert_params / cpu_s
            bar.update()
    hw["measured_on"] = (f"{time.strftime('%Y-%m-%d')} {device} {str(dtype).removeprefix('torch.')} D={dim} I={ffn} "
                         f"formats {' '.join(names)}")
    return hw


def _bandwidths(device: torch.device, dim: int, ffn: int, dtype: torch.dtype, best) -> dict:
    """Link, device and CPU bandwidths on one expert's w13, the largest GEMV of decode."""
    w = torch.randn(2 * ffn, dim, dtype=dtype)
    x = torch.randn(1, dim, dtype=dtype)
    src = w.pin_memory() if device.type == "cuda" else w
    dst = torch.empty_like(w, device=device)
    xd = x.to(device)
    nbytes = w.numel() * w.element_size()
    return {"h2d_bytes_per_s": nbytes / best(lambda: dst.copy_(src, non_blocking=True)),
            "device_bytes_per_s": nbytes / best(lambda: F.linear(xd, dst)),
            "cpu_bytes_per_s": nbytes / best(lambda: F.linear(x, w), torch.device("cpu"))}


def _expert_forward_seconds(fmt, device: torch.device, dim: int, ffn: int, dtype: torch.dtype, best
                            ) -> tuple[float, float]:
    """(device, CPU) seconds of one expert's forward for one token in `fmt`: random std-0.02 weights
    packed where the engine packs them (quantized on a CUDA device) into a host buffer; on the device
    from a copy of it, on the CPU from the host buffer itself."""
    pack_on = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    parts = {k: (torch.randn(*shape, generator=g) * 0.02).to(pack_on)
             for k, shape in {"w1": (ffn, dim), "w3": (ffn, dim), "w2": (dim, ffn)}.items()}
    host = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(parts, host)
    del parts
    x = torch.randn(1, dim, generator=g).to(dtype)
    views = fmt.views(host)
    cpu_s = best(lambda: fmt.forward(x, views), torch.device("cpu"))
    if device.type == "cpu":
        return cpu_s, cpu_s
    xd, views_dev = x.to(device), fmt.views(host.to(device))
    return best(lambda: fmt.forward(xd, views_dev)), cpu_s
