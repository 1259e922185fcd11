"""GPU check: Mixtral-8x7B-shaped layers on a card budgeted like a 24 GB one. Under 5 minutes on one GPU.

    python bench/gpu_check.py [--layers 4] [--tokens 64] [--workdir /tmp] [--json OUT.json]

Writes a random-weight checkpoint with Mixtral-8x7B's shapes (hidden 4096, FFN 14336, 8 experts,
top-2, GQA 32/8, vocab 32000) but only --layers of the 32 layers, to local disk. Each case runs
with the cache slots per layer that a 24 GB card leaves for the *full 32-layer* model (the budget
scaled to the layers present, not 24 GB for 4 layers), and prints decode tokens/s, hit rate,
bytes moved, compute waiting on copies, and how much of the copy time was hidden behind compute.
Random weights route almost uniformly, so hit rates here are a floor, not Mixtral's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.demo import write_random_checkpoint  # noqa: E402
from offload_moe.engine import Engine
from offload_moe.formats.base import DenseFormat  # noqa: E402
from offload_moe.formats.int4 import Int4Format  # noqa: E402
from offload_moe.formats.int4_layouts import cuda_int4_kernel_runs, int4_cuda_kernel_linear  # noqa: E402
from offload_moe.formats.int8 import Int8Format  # noqa: E402
from offload_moe.formats.registry import bytes_per_expert, format_for  # noqa: E402
from offload_moe.memory import slots_that_fit  # noqa: E402
from offload_moe.offload.prefetch import Transfers  # noqa: E402
from offload_moe.options import DEFAULT_RESERVE, EngineOptions
from offload_moe.weights.convert import convert  # noqa: E402

MIXTRAL = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336, num_experts=8,
                      top_k=2, vocab_size=32000, max_context=32768)
CARD = 24 * 2**30
CONTEXT = 4096
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28740, 28734, 6211, 12, 77]


def slots_for_card(quant: str, group: int) -> int:
    """Slots per layer that a 24 GB card leaves for the full 32-layer Mixtral at a 4K context, fp16 dense."""
    nbytes = bytes_per_expert(MIXTRAL, quant, group, torch.float16)
    return slots_that_fit(MIXTRAL, torch.float16, nbytes, CARD, CONTEXT, DEFAULT_RESERVE)[0]


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 on the card, as a 24 GB user runs it; fp32 for the CPU smoke run."""
    return torch.float16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device: torch.device) -> float:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    synchronize(device)
    return 5 * src.numel() / (time.perf_counter() - t0)


def pinned_allocator_bytes(device: torch.device) -> int | None:
    """Bytes held by torch's caching pinned-host allocator (which rounds blocks up to a power of two);
    the expert stores register their memory themselves, so loading one must not grow this."""
    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)


def int4_kernel_check(device: torch.device) -> dict | None:
    """torch's CUDA int4 kernel (the `int4-g64-cuda` layout) against the dequantizing reference on one
    Mixtral-shaped expert (D=4096, I=14336, random std-0.02 weights, packed on the GPU as the engine
    packs them): the largest error relative to the largest output, and each path's forward time per
    expert, beside fp16 and int8 experts. The tolerance is int4's bf16 one (2e-2: the kernel takes bf16
    activations and returns bf16)."""
    if device.type != "cuda":
        print("int4 CUDA kernel vs dequantize: skipped in smoke mode (needs CUDA)", flush=True)
        return None
    if not cuda_int4_kernel_runs(device):
        print(f"int4 CUDA kernel: does not run on {torch.cuda.get_device_name(device)} (compute capability "
              f"{torch.cuda.get_device_capability(device)}, or its probe failed): the engine dequantizes", flush=True)
        return {"kernel_runs": False, "ok": True}
    out = int4_kernel_figures(device)
    torch.cuda.empty_cache()  # the expert's buffers and scratch, before the engine cases
    return out


def int4_kernel_figures(device: torch.device) -> dict:
    dtype = compute_dtype(device)
    g = torch.Generator().manual_seed(0)
    D, I = MIXTRAL.dim, MIXTRAL.ffn_dim
    parts = {k: (torch.randn(*shape, generator=g) * 0.02).to(device)
             for k, shape in {"w1": (I, D), "w3": (I, D), "w2": (D, I)}.items()}
    formats = {"int4-cuda": Int4Format(MIXTRAL, dtype, 64, "cuda"), "int4-cpu": Int4Format(MIXTRAL, dtype, 64, "cpu"),
               "int8": Int8Format(MIXTRAL, dtype, 64), "fp16": DenseFormat(MIXTRAL, dtype)}
    views = {}
    for name, fmt in formats.items():
        host = torch.empty(fmt.nbytes, dtype=torch.uint8)
        fmt.pack(parts, host)
        views[name] = fmt.views(host.to(device))
    del parts
    cuda, cpu = formats["int4-cuda"], formats["int4-cpu"]

    def kernel_forward(x: torch.Tensor) -> torch.Tensor:  # the kernel at any token count (forward stops at 128)
        w13, w2, _ = views["int4-cuda"]
        a, b = int4_cuda_kernel_linear(x, *w13, 64).chunk(2, dim=-1)
        return int4_cuda_kernel_linear(torch.nn.functional.silu(a) * b, *w2, 64)

    def seconds(fn, repeats: int = 20) -> float:
        fn()
        synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        return best

    out = {"kernel_runs": True, "tokens": {}}
    worst = 0.0
    for T in (1, 16, 128, 256):
        x = torch.randn(T, D, generator=g).to(device, dtype)
        y = kernel_forward(x)
        ref32 = cpu.forward_dequant(x.float(), views["int4-cpu"])  # fp32: the weights the codes stand for
        errs = {"vs_dequant_cuda_layout": cuda.forward_dequant(x, views["int4-cuda"]),
                "vs_dequant_cpu_layout": cpu.forward_dequant(x, views["int4-cpu"]), "vs_fp32": ref32}
        errs = {k: ((y.float() - r.float()).abs().max() / r.float().abs().max()).item() for k, r in errs.items()}
        worst = max(worst, *errs.values())
        times = {"int4 kernel": seconds(lambda x=x: kernel_forward(x)),
                 "int4 dequantize (cuda layout)": seconds(lambda x=x: cuda.forward_dequant(x, views["int4-cuda"])),
                 "int4 dequantize (cpu layout)": seconds(lambda x=x: cpu.forward_dequant(x, views["int4-cpu"])),
                 "int8 dequantize": seconds(lambda x=x: formats["int8"].forward(x, views["int8"])),
                 "fp16": seconds(lambda x=x: formats["fp16"].forward(x, views["fp16"]))}
        out["tokens"][T] = {"max_rel_error": errs, "seconds_per_expert": times}
        print(f"int4 kernel, Mixtral expert, T={T:<3}: max rel error " +
              ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + "; us per expert: " +
              ", ".join(f"{k} {1e6 * v:.0f}" for k, v in times.items()), flush=True)
    out["ok"] = worst < 2e-2
    print(f"int4 kernel against the dequantizing reference: {'ok' if out['ok'] else 'FAIL'} (worst {worst:.2e}, "
          "tolerance 2e-2)", flush=True)
    return out


def run_case(path: Path, name: str, tokens: int, bw: float, device: torch.device, feed: bool = True,
             **options) -> dict:
    """One engine's figures; `feed` False: speculative copies enqueued whole, as before the feeder."""
    t0 = time.perf_counter()
    dtype = str(compute_dtype(device)).removeprefix("torch.")
    allocator_before = pinned_allocator_bytes(device)
    engine = Engine.load(path, EngineOptions(device=str(device), dtype=dtype, context=CONTEXT, progress=False,
                                             **options))
    if not feed:
        cache, measured = engine.cache, engine.cache.transfers.bytes_per_s
        cache.transfers = Transfers(engine.device, [len(m) for m in cache.mem], feed=False)
        if measured is not None:
            cache.transfers.measured(measured)
    load_s = time.perf_counter() - t0
    pinned = {"pinned_host_bytes": engine.cache.store.pinned_bytes, "planned_pinned_bytes": engine.plan.pinned,
              "pinned_allocator_growth": None if allocator_before is None
              else pinned_allocator_bytes(device) - allocator_before}
    print(f"  pinned host memory {pinned['pinned_host_bytes'] / 2**30:.3f} GiB, planned "
          f"{pinned['planned_pinned_bytes'] / 2**30:.3f} GiB"
          f"{'' if pinned['pinned_host_bytes'] == pinned['planned_pinned_bytes'] else '  MISMATCH'}; torch's pinned "
          f"allocator grew by {pinned['pinned_allocator_growth']} bytes at load", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine.generate(PROMPT, 8)  # warm-up: kernels, allocator
    s = engine.generate(PROMPT, tokens).stats
    copy_s = s["bytes_to_device"] / bw
    hidden = 1 - s["copy_wait_s"] / copy_s if copy_s else 1.0
    storage = {k: s[k] for k in ("ram_hit_rate", "bytes_read_from_storage", "storage_wait_s") if k in s}
    row = {"case": name, "load_s": round(load_s, 1), **storage, **{k: s[k] for k in (
        "decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "prefetch_recall", "prefetch_precision",
        "bytes_to_device", "copy_wait_s", "peak_device_bytes", "slots_per_layer", "bytes_per_expert", "cpu_misses",
        "demand_during_prefetch", "prefetch_preempted", "prefetch_dropped")},
        "copy_s_at_link_speed": copy_s, "copy_hidden_share": hidden, **pinned}
    print(f"{name:<34} {s['decode_tokens_per_s']:7.2f} tok/s  hit {100 * s['hit_rate']:5.1f}%  "
          f"moved {s['bytes_to_device'] / 2**30:6.2f} GiB  wait {s['copy_wait_s']:6.2f} s  "
          f"hidden {100 * hidden:5.1f}%  peak {s['peak_device_bytes'] / 2**30:5.2f} GiB  "
          f"(x{MIXTRAL.n_layers // engine.config.n_layers} layers: ~{s['decode_tokens_per_s'] * engine.config.n_layers / MIXTRAL.n_layers:.2f} tok/s)",  # noqa: E501
          flush=True)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def device_index_check(path: Path, device: torch.device) -> dict | None:
    """Stream rule 1: an engine on an explicit `cuda:N` (the last device) keeps its copy streams and
    events on that device, and computes what the default device computes. None in the CPU smoke run."""
    if device.type != "cuda":
        print("device index check: skipped (no CUDA device in the smoke run)")
        return None
    explicit = torch.device("cuda", torch.cuda.device_count() - 1)
    runs = {}
    for name in ("cuda", str(explicit)):
        engine = Engine.load(path, EngineOptions(device=name, dtype="float16", cache_experts=2, prefetch=1,
                                                 context=CONTEXT, progress=False))
        t = engine.cache.transfers
        on_device = t.demand.device == t.prefetch.device == engine.device
        runs[name] = (engine.generate(PROMPT, 8, keep_logits=True).logits, on_device)
        del engine
        torch.cuda.empty_cache()
    (base, _), (logits, on_device) = runs["cuda"], runs[str(explicit)]
    diff = float((base - logits).abs().max())
    ok = on_device and diff <= 1e-2 * float(base.abs().max())
    print(f"device index check on {explicit}: streams on the engine's device {on_device}, max logit difference "
          f"to the default device {diff:.3g}: {'ok' if ok else 'FAILED'}", flush=True)
    return {"device": str(explicit), "streams_on_device": on_device, "max_logit_diff": diff, "ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every case on the CPU with a tiny shape: checks this script, measures nothing")
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_check: no CUDA device; nothing to do (--cpu-smoke checks the script on the CPU)")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke run"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {name}, torch {torch.__version__}, "
          f"Mixtral-8x7B shapes, {args.layers} of 32 layers, budget of a 24 GB card scaled to them", flush=True)
    bw = h2d_bandwidth(device)
    print(f"pinned host-to-device: {bw / 1e9:.1f} GB/s", flush=True)
    kernel = int4_kernel_check(device)
    config = replace(MIXTRAL, n_layers=args.layers)
    if args.cpu_smoke:
        config = replace(config, dim=256, ffn_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = write_random_checkpoint(Path(tmp) / "mixtral-shaped", config, torch.bfloat16, layers_per_shard=1)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        int4, int8, fp16 = slots_for_card("int4", 64), slots_for_card("int8", 64), slots_for_card("none", 64)
        print(f"slots per layer on a 24 GB card: int4-g64 {int4}, int8-g64 {int8}, fp16 {fp16} (top-k is 2)")
        index = device_index_check(path, device)
        rows = [
            run_case(path, f"int4, {int4} slots, prefetch 1", args.tokens, bw, device, expert_quant="int4",
                     cache_experts=int4, prefetch=1),
            run_case(path, f"int4, {int4} slots, prefetch 1, whole copies", args.tokens, bw, device, feed=False,
                     expert_quant="int4", cache_experts=int4, prefetch=1),
            run_case(path, f"int4, {int4} slots, prefetch 0", args.tokens, bw, device, expert_quant="int4",
                     cache_experts=int4, prefetch=0),
            run_case(path, f"int4, {int4} slots, miss policy auto", args.tokens, bw, device, expert_quant="int4",
                     cache_experts=int4, prefetch=1, miss_policy="auto"),
            run_case(path, f"int4 + int8 attention, {int4} slots, prefetch 1", args.tokens, bw, device,
                     expert_quant="int4", attention_quant="int8", cache_experts=int4, prefetch=1),
            run_case(path, f"int8, {max(int8, 2)} slots, prefetch 1", args.tokens, bw, device, expert_quant="int8",
                     cache_experts=max(int8, 2), prefetch=1),
            run_case(path, "fp16, 2 slots (over 24 GB), prefetch 1", args.tokens, bw, device, cache_experts=2,
                     prefetch=1),
            run_case(path, "fp16, all resident (upper bound)", args.tokens, bw, device, prefetch=0),
        ]
        # the storage tier: a packed int4 folder (quantized on the GPU), RAM for a quarter of the experts
        t0 = time.perf_counter()
        packed = Path(tmp) / "packed-int4"
        fmt = format_for(config, "int4", compute_dtype(device), 64, device)  # the device's layout
        convert(path, packed, fmt, compute_dtype(device), progress=False, pack_device=device)
        print(f"packed int4 folder written in {time.perf_counter() - t0:.0f} s", flush=True)
        quarter = config.n_layers * config.num_experts * fmt.nbytes // 4
        rows.append(run_case(packed, f"int4 packed, RAM tier 1/4, {int4} slots", args.tokens, bw, device,
                             cache_experts=int4, prefetch=1, ram_budget=quarter))
    if args.json:
        Path(args.json).write_text(json.dumps({"h2d_bytes_per_s": bw, "rows": rows, "int4_kernel": kernel,
                                               "device_index": index}, indent=1))
    return 0 if all(check is None or check["ok"] for check in (kernel, index)) else 1


if __name__ == "__main__":
    sys.exit(main())
