"""The server under concurrent streams: aggregate decode tokens/s, time to first token and inter-token
latency (p50/p95), and the expert hit rate, at each concurrency.

    python bench/bench_serve.py [--concurrency 1,2,4,8] [--tokens 64] [--cache-experts 2] [--threads 2]

The demo model, served in this process on 127.0.0.1 (an ephemeral port) with --max-batch the highest
concurrency; each stream is a greedy /v1/completions request with stream=true (httpx, server-sent
events; the tokens from its usage chunk), the prompts differing per stream. Aggregate tok/s: every
stream's tokens over the wall time from the first request to the last stream's end. One warm-up
request first. The clients run in this process too: on a small machine they take CPU from the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_moe.demo import resolve_model  # noqa: E402
from offload_moe.engine import Engine, EngineOptions  # noqa: E402
from offload_moe.server import Service, bind, make_server  # noqa: E402

PROMPTS = ["def fib(n):", "import os\n", "class Config:", "for i in range(", "with open(path) as f:",
           "try:\n    import", "def __init__(self,", "return sorted("]


def stream(url: str, prompt: str, tokens: int) -> tuple[float, list[float], int]:
    """(seconds to the first text chunk, the times of every text chunk, tokens generated) of one streamed
    completion."""
    t0, times, n = time.perf_counter(), [], 0
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["usage"]:
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return times[0] - t0, times, n


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--cache-experts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = Engine.load(resolve_model("demo"), EngineOptions(cache_experts=args.cache_experts, progress=False))
    service = Service(engine, "demo", max_batch=max(levels), max_queue=0)
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = make_server(service, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    stream(url, PROMPTS[0], args.tokens)  # warm-up
    print(f"demo model, {args.cache_experts} of 8 experts cached per layer, {args.tokens} tokens per stream, "
          f"{args.threads} threads")
    print("| streams | aggregate tok/s | x one | TTFT p50 / p95 ms | inter-token p50 / p95 ms | hit rate |")
    print("|---|---|---|---|---|---|")
    base = None
    table = engine.cache.table
    for n in levels:
        h0, m0 = sum(table.hits), sum(table.misses)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda i: stream(url, PROMPTS[i % len(PROMPTS)], args.tokens), range(n)))
        wall = time.perf_counter() - t0
        rate = sum(n for *_, n in runs) / wall
        base = base or rate
        ttft = [t for t, *_ in runs]
        itl = [b - a for _, times, _ in runs for a, b in zip(times, times[1:], strict=False)]
        hits, misses = sum(table.hits) - h0, sum(table.misses) - m0
        print(f"| {n} | {rate:.0f} | {rate / base:.2f} | {1e3 * pct(ttft, 0.5):.1f} / {1e3 * pct(ttft, 0.95):.1f} "
              f"| {1e3 * pct(itl, 0.5):.1f} / {1e3 * pct(itl, 0.95):.1f} | {hits / max(hits + misses, 1):.1%} |")
    server.should_exit = True
    thread.join(timeout=10)


if __name__ == "__main__":
    main()
