"""Matrix products of several tokens on the CPU in float32 (a prompt's experts, projections and MLPs): x [T, K] times
w [N, K]^T, by whichever of torch's two CPU GEMMs is faster here, decided once per process by timing both.

Why: `F.linear` on the CPU calls MKL's sgemm. On the project's AMD EPYC VM oneDNN's (`torch.ops.mkldnn.
_linear_pointwise`, which torch ships for its own compiled graphs) runs the prompt's shapes faster (BENCHMARKS.md),
the same float32 products in another summation order; on Intel CPUs MKL is the one tuned. So the engine
does not assume either: `faster_gemm` times both on a prompt-sized product at first use (a few milliseconds) and
keeps the winner. One token (decode) never comes here on the CPU: the C kernels take it.

Legend: T tokens, K inputs, N outputs.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T (+ b) -> [T, N]: `F.linear`, or oneDNN's GEMM on the CPU in float32 for T > 1 where
    `faster_gemm` found it faster."""
    if (x.dim() == 2 and x.shape[0] > 1 and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.device.type == "cpu" and faster_gemm() == "onednn"):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), b, "none", [], "")
    return F.linear(x, w, b)


@functools.cache
def faster_gemm() -> str:
    """"onednn" or "mkl" (torch's default, `F.linear`): the faster on a [64, 1024] x [1024, 2048] product, best of
    5 each, timed once per process; "mkl" where torch was built without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return "mkl"
    x, w = torch.randn(64, 1024), torch.randn(2048, 1024)

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    try:
        onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    except (RuntimeError, AttributeError):  # the op missing from this build
        return "mkl"
    return "onednn" if onednn < best(lambda: F.linear(x, w)) else "mkl"
