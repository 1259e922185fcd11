"""Run statistics: what users compare (tokens/s) and what explains it (hits, copies, waits)."""

from __future__ import annotations

import torch


def collect_stats(engine, result) -> dict:
    c, table = engine.cache.counters, engine.cache.table
    hits, misses = table.hits, table.misses  # per layer
    accesses = sum(hits) + sum(misses)
    prefetch_used, prefetch_copies = sum(table.prefetch_hits), sum(table.prefetch_copies)
    prompt = len(result.prompt_ids)
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(engine.device)
    else:
        peak = engine.device_bytes  # on the CPU: what the engine placed on its compute device
    return {
        "prompt_tokens": prompt,
        "generated_tokens": len(result.tokens),
        "prefill_tokens_per_s": prompt / result.prefill_s if result.prefill_s else 0.0,
        "decode_tokens_per_s": decode_rate(result),
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "first_decode_s": result.first_decode_s,
        "stop_reason": result.stop_reason,
        "hit_rate": sum(hits) / accesses if accesses else 1.0,
        "per_layer_hit_rate": [h / (h + m) if h + m else 1.0 for h, m in zip(hits, misses, strict=True)],
        "hits": sum(hits),
        "misses": sum(misses),
        "per_layer_hits": list(hits),
        "per_layer_misses": list(misses),
        "prefetch_depth": engine.model.prefetcher.lead if engine.model.prefetcher else 0,  # 0: off, or all resident
        "predictor": engine.model.prefetcher.predictor.name if engine.model.prefetcher else None,
        "prefetch_copies": prefetch_copies,
        "prefetch_recall": prefetch_used / accesses if accesses else 0.0,
        "prefetch_precision": prefetch_used / prefetch_copies if prefetch_copies else 0.0,
        "copies": c.copies,
        "miss_policy": engine.options.miss_policy,
        "cpu_misses": c.cpu_misses,
        "bytes_to_device": c.bytes_to_device,
        "bytes_per_expert": engine.cache.fmt.nbytes,
        "expert_format": engine.cache.fmt.name,
        "attention_format": engine.attention_format,
        "head_format": engine.head_format,
        "copy_wait_s": c.copy_wait_s,
        "demand_during_prefetch": c.demand_during_prefetch,
        **link_stats(engine.cache, result),
        "peak_device_bytes": peak,
        "pinned_host_bytes": getattr(engine.cache.store, "pinned_bytes", 0),  # registered exactly, on CUDA
        **storage_stats(engine.cache.store),
        "slots_per_layer": list(engine.cache.slots),
        "slot_pool": engine.cache.pool,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def link_stats(cache, result) -> dict:
    """The emulated link's (`--link-gbs`): its speed, the share of the run's time (prefill and decode) it carried
    a copy; there and on CUDA, the speculative copies a demand copy passed and those dropped as stale (prefetch.py,
    rules 7-10). Without a link: None for the speed and share (a CUDA copy engine is not timed); inline, zeros."""
    link = cache.transfers.link
    seconds = result.prefill_s + result.decode_s
    return {"link_gbs": link.bytes_per_s / 1e9 if link else None,
            "link_busy": link.busy_until_now() / seconds if link and seconds > 0 else None,
            "prefetch_preempted": cache.transfers.preempted,
            "prefetch_dropped": cache.counters.prefetch_dropped}


def decode_rate(result) -> float:
    """Steady-state decode tokens/s: the steps after the first, whose time (`first_decode_s`, reported
    apart) includes one-time work such as the first call of each T=1 kernel; all steps if there is one."""
    steps, seconds = result.decode_steps, result.decode_s
    if steps > 1 and seconds > result.first_decode_s:
        steps, seconds = steps - 1, seconds - result.first_decode_s
    return steps / seconds if seconds > 0 else 0.0


def storage_stats(store) -> dict:
    """The RAM tier over storage, when the experts do not fit in RAM (tiered store)."""
    t = getattr(store, "counters", None)
    if t is None:
        return {"experts_in_ram": True}
    lookups = t.ram_hits + t.ram_misses
    return {"experts_in_ram": False, "ram_hit_rate": t.ram_hits / lookups if lookups else 1.0,
            "bytes_read_from_storage": t.bytes_read, "storage_wait_s": t.read_wait_s,
            "storage_prefetch_reads": t.prefetch_reads, "ram_tier_bytes": store.ram_bytes}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(stats: dict) -> str:
    """A small two-column table, then the per-layer hit rates on one line."""
    rows = [
        ("prefill", f"{stats['prompt_tokens']} tokens, {stats['prefill_tokens_per_s']:.1f} tok/s"),
        ("decode", f"{stats['generated_tokens']} tokens, {stats['decode_tokens_per_s']:.1f} tok/s (the first step "
                   f"apart: {1000 * stats['first_decode_s']:.1f} ms)"),
        ("expert hit rate", f"{100 * stats['hit_rate']:.1f}% ({stats['hits']} hits, {stats['misses']} misses)"),
        ("prefetch", f"depth {stats['prefetch_depth']} ({stats['predictor'] or 'off'}), {stats['prefetch_copies']} "
                     "copies, recall "
                     f"{100 * stats['prefetch_recall']:.1f}%, precision {100 * stats['prefetch_precision']:.1f}%"),
        ("copied to device", f"{_bytes(stats['bytes_to_device'])} in {stats['copies']} copies "
                             f"({_bytes(stats['bytes_per_expert'])} per expert)"),
        ("compute waiting on copies", f"{stats['copy_wait_s'] * 1000:.1f} ms"),
        ("demand copies beside a prefetch", f"{stats['demand_during_prefetch']} (sharing the link)"),
        ("speculative copies", f"{stats['prefetch_preempted']} passed by a demand copy, {stats['prefetch_dropped']} "
                               "dropped as stale"),
        ("misses computed on the CPU", f"{stats['cpu_misses']} (miss policy {stats['miss_policy']})"),
        ("peak device memory", _bytes(stats["peak_device_bytes"])),
        ("pinned host memory", _bytes(stats["pinned_host_bytes"]) if stats["pinned_host_bytes"] else "none (no CUDA)"),
        ("slots per layer", _compact(stats["slots_per_layer"])
         + (f" (one pool of {sum(stats['slots_per_layer'])} shared by every layer)"
            if stats["slot_pool"] == "global" else "")),
    ]
    if stats["link_gbs"] is not None:
        rows.append(("emulated link", f"{stats['link_gbs']:g} GB/s, busy {100 * stats['link_busy']:.1f}% of the run"))
    if not stats.get("experts_in_ram", True):
        rows.append(("RAM tier over storage", f"{_bytes(stats['ram_tier_bytes'])}, hit rate "
                     f"{100 * stats['ram_hit_rate']:.1f}%, read {_bytes(stats['bytes_read_from_storage'])}, "
                     f"waited {stats['storage_wait_s'] * 1000:.1f} ms"))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    per_layer = " ".join(f"{100 * r:.0f}" for r in stats["per_layer_hit_rate"])
    lines.append(f"  {'hit rate per layer (%)':<{width}}  {per_layer}")
    return "\n".join(lines)


def _compact(slots: list[int]) -> str:
    return str(slots[0]) if len(set(slots)) == 1 else ",".join(map(str, slots))
