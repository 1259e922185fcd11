"""llama.cpp as the CPU reference, through llama-cpp-python (optional, never in CI: `pip install
llama-cpp-python gguf`; `convert_hf_to_gguf.py` comes with llama-cpp-python's source distribution, under
vendor/llama.cpp/). Shared by the benches that compare against it: the checkpoint converted to an f32 GGUF
by llama.cpp's own converter, quantized to q8_0, q4_0 and q4_k_m by its own `llama_model_quantize`, and a timed
greedy decode.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

INSTALL = ("llama.cpp side skipped: pip install llama-cpp-python gguf (builds llama.cpp from source), then pass "
           "--llama-cpp PATH/TO/convert_hf_to_gguf.py from its sdist (vendor/llama.cpp/)")
GGUF_TYPES = ("f32", "q8_0", "q4_0", "q4_k_m")


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def native_stderr_silenced():
    """llama.cpp logs every tensor it quantizes or loads to file descriptor 2, from C."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def gguf_files(path: Path, converter: Path, threads: int, tmp: Path) -> dict[str, Path]:
    """The checkpoint at `path` as GGUF files, per type in GGUF_TYPES."""
    import llama_cpp

    f32 = tmp / "model.f32.gguf"
    files = {"f32": f32, **{name: tmp / f"model.{name}.gguf" for name in GGUF_TYPES[1:]}}
    if all(f.exists() for f in files.values()):  # made by an earlier run
        return files
    env = dict(os.environ, PYTHONPATH=str(converter.parent / "gguf-py"))  # the converter's own gguf package
    done = subprocess.run([sys.executable, str(converter), str(path), "--outfile", str(f32), "--outtype", "f32"],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"GGUF conversion failed:\n{done.stderr[-2000:]}")
    for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                        ("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        with native_stderr_silenced():
            failed = llama_cpp.llama_model_quantize(str(f32).encode(), str(files[name]).encode(), params)
        if failed:
            raise SystemExit(f"llama.cpp could not quantize to {name}")
    return files


class Peer:
    """llama.cpp's all-CPU model of one GGUF file, loaded once, for decodes and prompts in turn with another side."""

    def __init__(self, file: Path, threads: int, context: int):
        import llama_cpp

        with native_stderr_silenced():
            self.llm = llama_cpp.Llama(str(file), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                                       n_batch=512, verbose=False)

    def decode(self, prompt: list[int], tokens: int) -> dict:
        """A greedy decode of `tokens` tokens: tokens/s over the steps after the first, and the tokens."""
        made, stamps = [], []
        for tok in self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            made.append(tok)
            if len(made) == tokens:
                break
        return {"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": made}

    def prefill(self, prompt: list[int]) -> float:
        """The prompt processed in one batch (llama.cpp's micro-batch, 512) from an empty KV cache: tokens/s."""
        self.llm.reset()  # eval then drops the KV cache from position 0 on
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - t0)


def decode(file: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    """llama.cpp's all-CPU greedy decode of `tokens` tokens: tokens/s over the steps after the first, the tokens."""
    result = Peer(file, threads, 256).decode(prompt, tokens)
    return {**result, "mib": file.stat().st_size / 2**20}


def bytes_per_token(file: Path, top_k: int, num_experts: int) -> int:
    """Weight bytes one decode step reads from a GGUF file: every tensor but the token embeddings (one row
    of those), the expert tensors (`*_exps`) top_k / num_experts of theirs."""
    from gguf import GGUFReader

    total = 0
    for t in GGUFReader(str(file)).tensors:
        if t.name == "token_embd.weight":
            continue
        total += t.n_bytes * top_k // num_experts if "_exps" in t.name else t.n_bytes
    return total
