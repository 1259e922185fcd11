"""C kernels for one expert's forward of one token on the CPU (`cpu_kernels.c`): the decode step's expert
compute, read straight from the packed buffers of `base.DenseFormat` (fp32), `int8.Int8Format` and
`int4.Int4Format` (the "cpu" layout, row blocks of 64), biases and gpt-oss's clamped SwiGLU included; and one
matrix of a GGUF type (`ggml_linear`, for `ggml.GGUFFormat`: the file's blocks decoded inside float32 dot products,
plain C that gcc vectorizes).

Why: torch runs an expert as five or more ops (two matmuls, chunk, silu, mul) whose dispatch costs as much
as the arithmetic at decode sizes, and its int8/int4 paths widen codes to floats (int8) or run in bf16 (int4).
Here one call does the whole expert: fp32 weights stream through FMAs; int8 codes multiply activations quantized to
int16 per group (VNNI's int16 dot products); int4 codes multiply activations quantized to int8 (llama.cpp's q4_0 x
q8_0 scheme). Two builds of the source (`isa`): avx512, intrinsics for CPUs with AVX-512 VNNI and VBMI; avx2, the
same arithmetic compiled for x86-64-v3 (AVX2, FMA: the desktop CPUs without AVX-512), portable C that gcc
vectorizes and AVX2 intrinsics for int4; the best the CPU runs, unless OFFLOAD_MOE_ISA=avx512|avx2|none forces
one. The error this adds against the torch path is within tests/test_cpu_kernels.py's BOUND (int4's far below
int4's own error); the measured errors: BENCHMARKS.md, "Kernel choices".

The source is compiled on first use (at a model's load) with the system's gcc (-O3 -ffast-math -fopenmp, and
-march=native or -march=x86-64-v3) into a per-user cache, ~/.cache/offload_moe/kernels (or
$OFFLOAD_MOE_CACHE/kernels), named by a hash of the source, the flags, gcc's version and the CPU's flags, and loaded
with ctypes: no build step at install, no new dependency. Where gcc is missing, compilation fails, the CPU is not
x86-64 or lacks AVX2 and FMA, or OFFLOAD_MOE_ISA=none, `library()` is None and the formats keep their torch path
(a one-line note on stderr says why, unless the switch or the CPU did).

Legend: T tokens, D dim, I ffn dim.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SOURCES = (SOURCE, SOURCE.with_name("decode_step.c"))  # the first includes the second: one library
# -ffast-math for the compile only (vectorized expf, reassociated sums): linked with it, the library would set
# flush-to-zero for the whole process when loaded (gcc's crtfastmath)
FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC"]
# each instruction set's build: avx512 tuned for this CPU (the intrinsics need its AVX-512 VNNI and VBMI), avx2 for
# x86-64-v3 (AVX2, FMA, F16C: Haswell and Zen 1 on), the source's other branch (C, and AVX2 for int4)
ISAS = {"avx512": ["-march=native"], "avx2": ["-march=x86-64-v3"]}
NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"), "avx2": ("avx2", "fma")}
ENV_SWITCH = "OFFLOAD_MOE_ISA"  # avx512, avx2 or none (the torch path everywhere): forces the kernels' build


def cache_dir() -> Path:
    """Where compiled kernels are kept: under $OFFLOAD_MOE_CACHE, as the demo checkpoint (`demo.py`)."""
    return Path(os.environ.get("OFFLOAD_MOE_CACHE", Path.home() / ".cache" / "offload_moe")) / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def runs(build: str) -> bool:
    """Whether this CPU runs the kernels' `build` (a key of ISAS): x86-64, with the flags it needs."""
    return (platform.machine().lower() in ("x86_64", "amd64") and build in NEEDS
            and set(_cpu_flags().split()).issuperset(NEEDS[build]))


def isa() -> str:
    """The kernels' instruction set: OFFLOAD_MOE_ISA where set, else the best this CPU runs (none: not x86-64,
    or no AVX2 and FMA)."""
    forced = os.environ.get(ENV_SWITCH)
    return forced if forced is not None else next((build for build in ISAS if runs(build)), "none")


_threads = 0  # the kernels' team size (`set_kernel_threads`), also for a library loaded after it was set


def set_kernel_threads(n: int) -> None:
    """Run every kernel's OpenMP team on `n` threads, whichever thread calls it (`threads.set_threads`)."""
    global _threads
    _threads = n
    if (lib := library()) is not None:
        lib.okm_set_threads(n)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels of `isa()`, or None where they cannot run here (see the module docstring)."""
    chosen = isa()
    if chosen == "none":
        return None
    if not runs(chosen):
        print(f"offload_moe: {ENV_SWITCH}={chosen}: {'this CPU does not run it' if chosen in ISAS else 'unknown'} "
              f"(avx512, avx2, none); using torch's path", file=sys.stderr)
        return None
    build = [*FLAGS, *ISAS[chosen]]
    try:
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
        source = b"\0".join(f.read_bytes() for f in SOURCES)
        key = hashlib.sha256(b"\0".join([source, " ".join(build).encode(), gcc.encode(), _cpu_flags().encode()]))
        so = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # then renamed: a half-written file is never loaded
                obj, out = Path(tmp) / "cpu_kernels.o", Path(tmp) / so.name
                link = ["-shared", "-fopenmp", "-o", str(out), str(obj), "-lm"]
                for cmd in ([*build, "-c", "-o", str(obj), str(SOURCE)], link):
                    subprocess.run(["gcc", *cmd], capture_output=True, text=True, check=True)
                out.replace(so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1:] if isinstance(e, subprocess.CalledProcessError) else [str(e)]
        print(f"offload_moe: CPU kernels unavailable ({' '.join(detail) or 'gcc failed'}); using torch's path",
              file=sys.stderr)
        return None
    if lib.okm_vectorized() != (chosen == "avx512"):  # gcc did not give this CPU's AVX-512 to the avx512 build
        print(f"offload_moe: the {chosen} CPU kernels did not build as such; using torch's path", file=sys.stderr)
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.okm_dense.argtypes = [p] * 7 + [i, i, f]
    lib.okm_int8.argtypes = [p] * 11 + [i, i, i, f]
    lib.okm_int4.argtypes = [p] * 9 + [i, i, i, f]
    lib.okm_int8_linear.argtypes = [p] * 6 + [i, i, i]
    lib.okm_ggml_linear.argtypes = [i, p, p, p, p, i, i, i]
    lib.okm_attention_step.argtypes = [p] * 7 + [i, i, p, p, p]
    lib.okm_head_step.argtypes = [p, p, f, i, p, p, p]
    lib.okm_int8_dequant.argtypes = [p, p, p, p, i, i, i]
    lib.okm_int4_dequant.argtypes = [p, p, p, i, i, i, i]
    lib.okm_ggml_dequant.argtypes = [i, p, p, i, i, i]
    lib.okm_step_floats.argtypes = [i] * 5
    lib.okm_step_floats.restype = i
    lib.okm_set_threads.argtypes = [i]
    lib.okm_set_threads.restype = None
    lib.okm_set_threads(_threads)
    lib.okm_ggml_reads.argtypes = [i]
    lib.okm_work_floats.restype = lib.okm_ggml_reads.restype = i
    for fn in (lib.okm_dense, lib.okm_int8, lib.okm_int4, lib.okm_int8_linear, lib.okm_ggml_linear,
               lib.okm_attention_step, lib.okm_head_step, lib.okm_int8_dequant, lib.okm_int4_dequant,
               lib.okm_ggml_dequant):
        fn.restype = None
    return lib


class ExpertKernel:
    """One format's kernel: `kind` "dense" (fp32 only), "int8" or "int4" (the "cpu" layout with blocks of 64:
    2I and D multiples of 64); `__call__(x, views)` for x [1, D] on the CPU -> [1, D] in x's dtype. `runs(x)`
    says whether it applies (else the format runs its torch path): one token, on the CPU, kernels built."""

    def __init__(self, kind: str, D: int, I: int, group_size: int, limit: float | None):
        self.kind, self.D, self.I, self.gs = kind, D, I, group_size
        self.limit = -1.0 if limit is None else float(limit)  # < 0: silu
        self._work: torch.Tensor | None = None  # scratch: w13's output and the quantized activations

    def runs(self, x: torch.Tensor) -> bool:
        return x.shape[0] == 1 and x.device.type == "cpu" and library() is not None

    def __call__(self, x: torch.Tensor, views: tuple) -> torch.Tensor:
        lib = library()
        if self._work is None:
            self._work = torch.empty(lib.okm_work_floats(self.D, self.I, self.gs), dtype=torch.float32)
        xf = x.float().contiguous() if x.dtype != torch.float32 or not x.is_contiguous() else x
        y = torch.empty(1, self.D, dtype=torch.float32)
        ptrs = [t.data_ptr() for t in _flat(views)]
        if self.kind == "dense":
            w13, w2, *biases = ptrs
            lib.okm_dense(xf.data_ptr(), w13, w2, *(biases or (None, None)), y.data_ptr(), self._work.data_ptr(),
                          self.D, self.I, self.limit)
        else:
            fn = lib.okm_int8 if self.kind == "int8" else lib.okm_int4
            n = 6 if self.kind == "int8" else 4  # the matrices' parts, then the biases
            fn(xf.data_ptr(), *ptrs[:n], *(ptrs[n:] or (None, None)), y.data_ptr(), self._work.data_ptr(), self.D,
               self.I, self.gs, self.limit)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
    """One token x [1, K] on the CPU times an int8 matrix in `int8.int8_store`'s layout (codes [G, N, gs],
    scales and zeros [G, N]) -> [1, N] in x's dtype, by the C kernel (int16 activations, as the int8 expert's);
    None where it does not run (kernels not built, N not a multiple of 16): the caller's torch path."""
    lib = library()
    G, N, gs = codes.shape
    if lib is None or N % 16 or x.shape[0] != 1 or x.device.type != "cpu":
        return None
    xf = x.float().contiguous()
    y = torch.empty(1, N, dtype=torch.float32)
    work = torch.empty(lib.okm_work_floats(0, G * gs, gs), dtype=torch.float32)  # a few KiB
    lib.okm_int8_linear(xf.data_ptr(), codes.data_ptr(), s.data_ptr(), z.data_ptr(), y.data_ptr(), work.data_ptr(),
                        N, G * gs, gs)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def ggml_linear(x: torch.Tensor, raw: torch.Tensor, kind: int, K: int) -> torch.Tensor | None:
    """One token x [1, K] on the CPU times a GGUF matrix, its bytes raw [N, K/bs*ts] of type `kind` (a
    gguf.GGMLQuantizationType), decoded inside the dot products -> [1, N] in float32; None where the C kernel does
    not read the type or does not run here: the caller's torch path."""
    lib = library()
    if lib is None or x.shape[0] != 1 or x.device.type != "cpu" or not lib.okm_ggml_reads(int(kind)):
        return None
    xf = x.float().contiguous()
    N = raw.shape[0]
    y = torch.empty(1, N, dtype=torch.float32)
    work = torch.empty(K // 16, dtype=torch.float32)  # the sums of x over each 16 inputs
    lib.okm_ggml_linear(int(kind), raw.data_ptr(), xf.data_ptr(), y.data_ptr(), work.data_ptr(), N, K, raw.shape[1])
    return y


def int8_dequant(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> bool:
    """An int8 matrix in `int8.int8_store`'s layout (codes [G, N, gs], s, z [G, N]) decoded into out [N, K] float32
    on the CPU in one pass; False where the kernels do not run here (the caller's torch path)."""
    lib = library()
    if lib is None or out.dtype != torch.float32 or codes.device.type != "cpu":
        return False
    G, N, gs = codes.shape
    lib.okm_int8_dequant(codes.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), N, G * gs, gs)
    return True


def int4_dequant(codes: torch.Tensor, sz: torch.Tensor, out: torch.Tensor, block: int) -> bool:
    """An int4 matrix in the "cpu" layout (codes [N, K/2] in row blocks of `block`, sz [G, N, 2]) decoded into out
    [N, K] float32 on the CPU in one pass; False where the kernels do not run here (the caller's torch path)."""
    lib = library()
    if lib is None or out.dtype != torch.float32 or codes.device.type != "cpu":
        return False
    G, N, _ = sz.shape
    K = codes.shape[1] * 2
    lib.okm_int4_dequant(codes.data_ptr(), sz.data_ptr(), out.data_ptr(), N, K, K // G, block)
    return True


def ggml_dequant(raw: torch.Tensor, kind: int, K: int, out: torch.Tensor) -> bool:
    """A GGUF matrix, its bytes raw [N, K/bs*ts] of type `kind`, decoded into out [N, K] float32 on the CPU in one C
    pass (a prompt's GEMM then multiplies it); False where the C code does not read the type or does not run here."""
    lib = library()
    if lib is None or raw.device.type != "cpu" or not lib.okm_ggml_reads(int(kind)):
        return False
    lib.okm_ggml_dequant(int(kind), raw.data_ptr(), out.data_ptr(), raw.shape[0], K, raw.shape[1])
    return True


def _flat(views: tuple) -> list[torch.Tensor]:
    """A format's views as a flat list of tensors: the matrices' parts (nested tuples) then the biases; the
    GroupQuantFormat's on_cpu flag dropped."""
    out = []
    for v in views:
        if isinstance(v, tuple):
            out += v
        elif isinstance(v, torch.Tensor):
            out.append(v)
    return out
