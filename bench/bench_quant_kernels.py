"""CPU expert forward by format and path: dense against int8, int4, MXFP4 and GGUF's types, the kernels against
dequantize + matmul. This is the measurement behind the kernel choices of offload_moe/formats/
(int8.py, int4.py, mxfp4.py, ggml.py).

    python bench/bench_quant_kernels.py [--threads 2] [--tokens 1 16] [--seconds 60] [--group-size 64]
                                        [--dim 512 --ffn 1792]   (gpt-oss's experts: --dim 2880 --ffn 2880)

One expert of the shape in bench_decode.py (D=512, I=1792, or --dim/--ffn), random std-0.02 weights, per compute dtype
(fp32, the CPU default; bf16; fp16, what a CUDA engine hands to its CPU-miss path). Paths:
  forward      what `fmt.forward` runs (one of the below, by device, dtype and token count)
  dequant      `fmt.forward_dequant`: dequantize in fp32, fp32 matmul, cast back
  kernel       int8: one `_weight_int8pack_mm` per group, in the compute dtype (scalar but for bf16;
               not used by the engine)
               int4: `_weight_int4pack_mm_for_cpu` in bf16, activations cast
  kernel-dtype int4 only: the same kernel in the compute dtype itself (scalar but for bf16)
  bmm          int8 only: `int8_bmm_linear`, codes widened in place order, one batched matmul in fp32
MXFP4 (`mxfp4.Mxfp4Format`) has one path: `forward` is its `dequant` (decode into fp32, fp32 matmul).
GGUF (`ggml.GGUFFormat`): gguf-Q8_0 and gguf-Q4_0 (gguf-py's quantizer) and gguf-Q4_K+Q6_K (Q4_K_M's mix: gate and
up Q4_K, down Q6_K; random blocks, gguf-py has no k-quant quantizer): `forward` (one token on the CPU: the C kernel)
and `dequant` (torch's decode, then matmul); the k-quants need D and I multiples of 256.
Times are the best of many interleaved runs, in microseconds, so that other load on the machine
shows as little as possible; `GB/s` is the expert's packed bytes over the first token count's time
(what a CPU-computed miss must stream from RAM); `err` is the largest difference from `dequant`,
relative to its largest output. Results on the development machine are in BENCHMARKS.md,
"Kernel choices: the measurements behind formats/".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # ggml_blocks: GGUF blocks to measure

from ggml_blocks import HALVES, blocks  # noqa: E402

from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.formats.base import DenseFormat  # noqa: E402
from offload_moe.formats.ggml import GGUFFormat  # noqa: E402
from offload_moe.formats.int4 import Int4Format  # noqa: E402
from offload_moe.formats.int4_layouts import int4_cpu_kernel_linear  # noqa: E402
from offload_moe.formats.int8 import Int8Format, int8_bmm_linear  # noqa: E402
from offload_moe.formats.mxfp4 import Mxfp4Format  # noqa: E402

SHAPE = ModelConfig(dim=512, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1792, num_experts=8, top_k=2,
                    vocab_size=32000)  # --dim and --ffn replace D and I
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Forward = Callable[[torch.Tensor], torch.Tensor]


def swiglu(linear: Callable[[torch.Tensor, tuple], torch.Tensor], x: torch.Tensor, views: tuple) -> torch.Tensor:
    a, b = linear(x, views[0]).chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
    return linear(F.silu(a) * b, views[1])  # [T, D]


def int8_kernel(x: torch.Tensor, mat: tuple) -> torch.Tensor:
    """torch's int8 CPU kernel has one scale per output channel, so a grouped matmul is one call per
    group (summed in fp32) plus the zeros times each group's sum of x. The engine does not use it
    (see offload_moe/formats/int8.py); it is here to show why."""
    codes, s, z = mat
    T, G = x.shape[0], codes.shape[0]
    xg = x.reshape(T, G, -1)  # [T, K] -> [T, G, gs]
    y = xg.sum(dim=-1, dtype=torch.float32) @ z.float()  # [T, G] @ [G, N] -> [T, N]
    for g in range(G):
        y += torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), codes[g], s[g].to(x.dtype))  # [T, N]
    return y.to(x.dtype)


def int4_kernel_in_dtype(group_size: int) -> Callable[[torch.Tensor, tuple], torch.Tensor]:
    def linear(x: torch.Tensor, mat: tuple) -> torch.Tensor:
        codes, sz = mat
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, codes, group_size, sz.to(x.dtype))

    return linear


def packed(fmt, parts: dict[str, torch.Tensor]) -> tuple:
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(parts, buf)
    return fmt.views(buf)


def candidates(shape: ModelConfig, dtype: torch.dtype, group_size: int
               ) -> tuple[dict[tuple[str, str], Forward], dict[str, int]]:
    """(format, path) -> the expert forward of x [T, D] by that path; and each format's bytes per expert."""
    g = torch.Generator().manual_seed(0)
    D, I = shape.dim, shape.ffn_dim
    parts = {k: torch.randn(*s, generator=g) * 0.02 for k, s in {"w1": (I, D), "w3": (I, D), "w2": (D, I)}.items()}
    dense = DenseFormat(shape, dtype)
    int8, int4 = Int8Format(shape, dtype, group_size), Int4Format(shape, dtype, group_size)
    mx = Mxfp4Format(shape, dtype)
    dv, v8, v4, vm = packed(dense, parts), packed(int8, parts), packed(int4, parts), packed(mx, parts)
    out: dict[tuple[str, str], Forward] = {
        ("dense", "forward"): lambda x: dense.forward(x, dv)}
    sizes: dict[str, int] = {}
    for fmt, views in ((int8, v8), (int4, v4), (mx, vm)):
        out[fmt.name, "forward"] = lambda x, fmt=fmt, views=views: fmt.forward(x, views)
        out[fmt.name, "dequant"] = lambda x, fmt=fmt, views=views: fmt.forward_dequant(x, views)
    rng = np.random.default_rng(0)
    for kinds in ((Q.Q8_0,) * 3, (Q.Q4_0,) * 3, (Q.Q4_K, Q.Q4_K, Q.Q6_K)):
        if any(shape.dim % 256 or I % 256 for k in kinds if k in HALVES):  # a k-quant's super-blocks
            continue
        gg = GGUFFormat(shape, [kinds])
        raw = {p: (k, torch.from_numpy(blocks(k, *s, rng))) for p, k, s in zip(("w1", "w3", "w2"), kinds,
                                                                                ((I, D), (I, D), (D, I)), strict=True)}
        vg = packed(gg, raw)
        sizes[gg.name] = gg.nbytes
        out[gg.name, "forward"] = lambda x, gg=gg, vg=vg: gg.forward(x, vg)
        out[gg.name, "dequant"] = lambda x, gg=gg, vg=vg: gg.forward_dequant(x, vg)
    out[int8.name, "kernel"] = lambda x: swiglu(int8_kernel, x, v8)
    out[int8.name, "bmm"] = lambda x: swiglu(lambda x, mat: int8_bmm_linear(x, *mat), x, v8)
    if int4.cpu_kernel:
        def int4_bf16(x: torch.Tensor, mat: tuple) -> torch.Tensor:
            return int4_cpu_kernel_linear(x, *mat, group_size)

        out[int4.name, "kernel"] = lambda x: swiglu(int4_bf16, x, v4)
        out[int4.name, "kernel-dtype"] = lambda x: swiglu(int4_kernel_in_dtype(group_size), x, v4)
    return out, sizes | {f.name: f.nbytes for f in (dense, int8, int4, mx)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--seconds", type=float, default=60.0, help="total measuring time, shared by all rows")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=SHAPE.dim)
    ap.add_argument("--ffn", type=int, default=SHAPE.ffn_dim)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = replace(SHAPE, dim=args.dim, ffn_dim=args.ffn)

    runs: dict[tuple[str, str, str, int], Forward] = {}
    errors: dict[tuple[str, str, str, int], float] = {}
    nbytes: dict[tuple[str, str], int] = {}  # (format, dtype) -> bytes one forward must read
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        forwards, sizes = candidates(shape, dtype, args.group_size)
        for (fmt, path), fwd in forwards.items():
            nbytes[fmt, dname] = sizes[fmt if fmt != "dense" else DenseFormat(shape, dtype).name]
            for T in args.tokens:
                x = torch.randn(T, shape.dim, generator=torch.Generator().manual_seed(T)).to(dtype)
                runs[fmt, path, dname, T] = lambda fwd=fwd, x=x: fwd(x)
    for key, run in runs.items():
        fmt, _, dname, T = key
        if fmt != "dense":
            ref = runs[fmt, "dequant", dname, T]().float()
            errors[key] = ((run().float() - ref).abs().max() / ref.abs().max()).item()

    best = dict.fromkeys(runs, float("inf"))
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:  # round robin: a burst of other load hits every row alike
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - t0)

    cols = [f"T={T} us" for T in args.tokens]
    print(f"CPU expert forward, D={shape.dim} I={shape.ffn_dim}, group {args.group_size}, "
          f"{args.threads} threads, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print("GB/s: the expert's bytes over the first token count's time, i.e. how fast the path streams the weights")
    print(f"{'format':<15} {'path':<13} {'dtype':<5} {'MiB':>6} " + " ".join(f"{c:>10}" for c in cols)
          + f" {'GB/s':>6} {'err':>9}")
    for fmt, path, dname in dict.fromkeys(k[:3] for k in runs):
        times = " ".join(f"{best[fmt, path, dname, T] * 1e6:>10.0f}" for T in args.tokens)
        err = max((errors.get((fmt, path, dname, T), 0.0) for T in args.tokens), default=0.0)
        size = nbytes[fmt, dname]
        rate = size / best[fmt, path, dname, args.tokens[0]] / 1e9
        print(f"{fmt:<15} {path:<13} {dname:<5} {size / 2**20:>6.2f} {times} {rate:>6.1f} {err:>9.1e}")


if __name__ == "__main__":
    main()
