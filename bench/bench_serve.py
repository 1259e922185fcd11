"""The server under concurrent streams: aggregate decode tokens/s, time to first token and inter-token
latency (p50/p95), the expert hit rate, and the server's CPU time per token, at each concurrency.

    python bench/bench_serve.py [--concurrency 1,2,4,8] [--tokens 64] [--cache-experts 2] [--miss-policy cpu]
                                [--prefetch 1] [--threads 1] [--hostile]

The demo model, served in this process on 127.0.0.1 (an ephemeral port) with --max-batch the highest
concurrency; each stream is a greedy /v1/completions request with stream=true (httpx, server-sent events;
the tokens from its usage chunk), the prompts differing per stream. Aggregate tok/s: every stream's tokens
over the wall time from the first request to the last stream's end. Server CPU per token: this process's
CPU seconds over the tokens, which a busy shared machine disturbs much less than the wall time, split into
the step thread's (the model, the scheduler) and the rest's (the HTTP side). One warm-up request first.

The defaults, and why they changed (they were: clients as threads of this process, 2 torch threads, miss
policy fetch):
  * the clients run in their own processes (one per stream, started before the timing), as a server's
    clients do: as threads here they took this process's GIL from the step thread at every token; each
    makes its httpx.Client once (a new one per request loaded the CA certificates: ~40 ms of every TTFT);
  * 1 torch thread: the model takes one core and the HTTP side and the clients the other; with 2, torch's
    OpenMP workers spin against them, and on a shared 2-core machine runs were bimodal (up to 4x slower);
  * --miss-policy cpu: on a CPU device with every expert in RAM a missed expert is computed from RAM in
    place, while fetch first copies it into a device slot (the GPU's flow, modelled byte for byte); the
    hit rate, the same for both, is what a card with this many slots would see. --miss-policy fetch
    measures the copies.
The first line of the output says which configuration ran.

--hostile: instead, 4 streams run quiet, then again beside a hostile client process that keeps sending what a
careless or hostile user sends (5 MB bodies, seeds out of range, non-JSON bodies, connections that send half
their headers and stall); prints both inter-token latencies (p50/p95), their ratio, and what the hostile client
got back. Issue 23's bar: p95 within 1.5x of the quiet run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["def fib(n):", "import os\n", "class Config:", "for i in range(", "with open(path) as f:",
           "try:\n    import", "def __init__(self,", "return sorted("]


_client = None  # a client process's one httpx.Client: made once (each new one loads the CA certificates, ~40 ms here)


def stream(job: tuple[str, str, int, float]) -> tuple[float, float, list[float], int]:
    """One streamed completion, in a client process: (start, seconds to the first text chunk, the times of
    every text chunk, tokens generated). `job` = (url, prompt, tokens, when to start: perf_counter, shared by
    every process on this machine)."""
    import httpx

    global _client
    _client = _client or httpx.Client(timeout=300)
    url, prompt, tokens, at = job
    time.sleep(max(0.0, at - time.perf_counter()))
    t0, times, n = time.perf_counter(), [], 0
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with _client.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["usage"]:
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return t0, times[0] - t0, times, n


def hostile(job: tuple) -> dict:
    """In a client process, from `at` (perf_counter) until `done` is set: bad requests in a loop, and stalled
    connections (half their headers, then nothing) held 20 at a time. Returns the status codes seen."""
    import socket

    import httpx

    url, at, done = job
    time.sleep(max(0.0, at - time.perf_counter()))
    host, port = url.removeprefix("http://").split(":")
    seen: dict[str, int] = {}
    big = b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}'
    requests = [(big, "application/json"), (b'{"prompt": "x", "seed": 18446744073709551616}', "application/json"),
                (b"prompt=x", "application/x-www-form-urlencoded")]
    held: list[socket.socket] = []
    with httpx.Client(timeout=30) as client:
        while not done.is_set():
            for body, ctype in requests:
                try:
                    code = str(client.post(url + "/v1/completions", content=body,
                                           headers={"content-type": ctype}).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                seen[code] = seen.get(code, 0) + 1
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(s)
            if len(held) > 20:
                held.pop(0).close()
    for s in held:
        s.close()
    return seen


def run_hostile(url: str, tokens: int) -> None:
    """4 streams quiet, then beside `hostile`; inter-token latency of both (see the module docstring)."""
    ctx = mp.get_context("spawn")
    pool, done = ctx.Pool(5), ctx.Manager().Event()
    pool.map(stream, [(url, PROMPTS[0], tokens, 0.0)] * 4)  # warm-up
    rows = {}
    for label in ("quiet", "hostile"):
        at = time.perf_counter() + 0.3
        attack = pool.apply_async(hostile, ((url, at - 0.2, done),)) if label == "hostile" else None
        runs = pool.map(stream, [(url, PROMPTS[i], tokens, at) for i in range(4)])
        itl = [b - a for _, _, times, _ in runs for a, b in zip(times, times[1:], strict=False)]
        rows[label] = (pct(itl, 0.5), pct(itl, 0.95), sum(k for *_, k in runs))
        if attack is not None:
            done.set()
            print(f"the hostile client got (status: count): {attack.get(timeout=60)}")
    pool.close()
    print("| 4 streams | inter-token p50 / p95 ms | tokens |")
    print("|---|---|---|")
    for label, (p50, p95, n) in rows.items():
        print(f"| {label} | {1e3 * p50:.1f} / {1e3 * p95:.1f} | {n} |")
    print(f"p95 hostile / quiet: {rows['hostile'][1] / rows['quiet'][1]:.2f} (bar: 1.5)")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")


def main() -> None:
    import torch

    from offload_moe.demo import resolve_model
    from offload_moe.engine import Engine
    from offload_moe.options import EngineOptions
    from offload_moe.serve.app import bind, make_server
    from offload_moe.serve.service import Service

    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--cache-experts", type=int, default=2)
    ap.add_argument("--miss-policy", default="cpu", choices=("fetch", "cpu", "auto"))
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hostile", action="store_true", help="4 streams quiet, then beside a hostile client")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [4] if args.hostile else [int(c) for c in args.concurrency.split(",")]
    options = EngineOptions(cache_experts=args.cache_experts, miss_policy=args.miss_policy, prefetch=args.prefetch,
                            max_batch=max(levels), progress=False)
    engine = Engine.load(resolve_model("demo"), options)
    service = Service(engine, "demo", max_batch=max(levels), max_queue=0)
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = make_server(service, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    if args.hostile:
        run_hostile(url, args.tokens)
        server.should_exit = True
        thread.join(timeout=30)
        return
    clients = mp.get_context("spawn").Pool(max(levels))  # started (and warm) before anything is timed
    clients.map(stream, [(url, PROMPTS[0], args.tokens, 0.0)] * max(levels))  # warm-up
    c = engine.cache
    in_place = c.host_is_device and c.cpu_cheaper
    print(f"demo model, {args.cache_experts} of 8 experts cached per layer, miss policy {args.miss_policy} "
          f"({'misses computed from RAM in place' if in_place else 'misses copied'}), prefetch {args.prefetch}, "
          f"{args.tokens} tokens per stream, {args.threads} torch thread(s), {engine.device}; clients in their own "
          "processes")
    print("| streams | aggregate tok/s | x one | TTFT p50 / p95 ms | inter-token p50 / p95 ms | hit rate "
          "| server CPU ms/token: step thread + HTTP |")
    print("|---|---|---|---|---|---|---|")
    base = None
    table = c.table
    step_clock = time.pthread_getcpuclockid(service.worker.thread.ident)  # the step thread's CPU clock
    for n in levels:
        h0, m0 = sum(table.hits), sum(table.misses)
        at = time.perf_counter() + 0.2  # every client starts then
        cpu, step = time.process_time(), time.clock_gettime(step_clock)
        runs = clients.map(stream, [(url, PROMPTS[i % len(PROMPTS)], args.tokens, at) for i in range(n)])
        cpu, step = time.process_time() - cpu, time.clock_gettime(step_clock) - step
        wall = max(times[-1] for _, _, times, _ in runs) - min(t0 for t0, *_ in runs)
        tokens = sum(k for *_, k in runs)
        rate = tokens / wall
        base = base or rate
        ttft = [t for _, t, _, _ in runs]
        itl = [b - a for _, _, times, _ in runs for a, b in zip(times, times[1:], strict=False)]
        hits, misses = sum(table.hits) - h0, sum(table.misses) - m0
        print(f"| {n} | {rate:.0f} | {rate / base:.2f} | {1e3 * pct(ttft, 0.5):.1f} / {1e3 * pct(ttft, 0.95):.1f} "
              f"| {1e3 * pct(itl, 0.5):.1f} / {1e3 * pct(itl, 0.95):.1f} | {hits / max(hits + misses, 1):.1%} "
              f"| {1e3 * cpu / tokens:.2f}: {1e3 * step / tokens:.2f} + {1e3 * (cpu - step) / tokens:.2f} |")
    clients.close()
    server.should_exit = True
    thread.join(timeout=10)


if __name__ == "__main__":
    main()
