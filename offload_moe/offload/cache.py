"""Expert residency on the compute device: preallocated slots, filled from the host store.

A row is a layer with experts, numbered among those layers (a dense first layer has none), the model's word
too: an expert is (row, expert). The slots form one pool per row (`pool` "layer": row l has `slots[l]`), or
one pool of their sum that every row's experts share (`pool` "global": a miss of any row may evict any
row's expert). Which expert leaves a full pool is decided by `eviction.SlotTable` (the same code the
simulator runs); moving the bytes and ordering the copies is `prefetch.Transfers`' job. This module keeps
the slots, asks the table, issues the copies and counts what happened.

Slots are allocated once, `[S, bytes]` per pool, and their weight views are computed once (in a global pool,
again when an expert of a row whose layout differs lands in the slot: a GGUF file with per-layer types), so
a miss allocates nothing else: it is one `copy_` into an existing slot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..formats.base import ExpertFormat
from ..options import MISS_POLICIES
from .eviction import ONLINE_POLICIES, POOLS, SlotTable
from .link import EmulatedLink
from .prefetch import Transfers
from .speculate import decide_row, miss_on_cpu
from .store import ExpertStore


@dataclass
class CacheCounters:
    """Raw counts of the bytes moved; `stats.py` turns them into rates. Hits, misses and prefetch
    use are counted per layer by the slot table itself (`table.hits` etc.), the simulator's code."""

    bytes_to_device: int = 0
    copy_wait_s: float = 0.0
    copies: int = 0
    cpu_misses: int = 0  # misses whose output this step computed on the CPU (miss policy cpu/auto)
    demand_during_prefetch: int = 0  # demand copies issued while a speculative copy was in flight
    prefetch_dropped: int = 0  # speculative copies dropped unfinished: unused by their routing, or evicted (rule 8)


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        fmt: ExpertFormat,
        slots: Sequence[int],
        device: torch.device,
        policy: str = "lru",
        seed: int = 0,
        miss_policy: str = "fetch",
        pool: str = "layer",
        link_gbs: float | None = None,
    ):
        if policy not in ONLINE_POLICIES:
            raise ValueError(f"the engine runs online policies only ({', '.join(ONLINE_POLICIES)}), not {policy!r}")
        if miss_policy not in MISS_POLICIES:
            raise ValueError(f"unknown miss policy {miss_policy!r}; choose from {', '.join(MISS_POLICIES)}")
        if pool not in POOLS:
            raise ValueError(f"unknown slot pool {pool!r}; choose from {', '.join(POOLS)}")
        self.store, self.fmt, self.device = store, fmt, device
        self.slots, self.pool = list(slots), pool  # slots per row; their sum is one pool when pool is global
        L, E = len(self.slots), store.num_experts
        shared = pool == "global"
        sizes = [sum(self.slots)] if shared else self.slots  # slots per pool
        self.pool_of = [0] * L if shared else list(range(L))  # each row's pool
        self.table = SlotTable(sizes, E, policy, seed, layers=L if shared else 1)
        self.miss_policy = miss_policy
        self.cpu_cheaper = miss_policy == "cpu"  # for auto, decided by `calibrate_misses`
        # on the CPU a layer whose slots cover every expert reads the host store in place: no second copy
        self.aliased = [not shared and device.type == "cpu" and n >= E and store.in_ram for n in sizes]
        self.mem = [
            store.layers[p] if alias else torch.empty((n, fmt.nbytes), dtype=torch.uint8, device=device)
            for p, (n, alias) in enumerate(zip(sizes, self.aliased, strict=True))
        ]
        if shared:  # one list of views, every row's: recomputed on a copy only where layouts differ by row
            self.views = [[fmt.views(self.mem[0][s], 0) for s in range(sizes[0])]] * L
            kinds = getattr(fmt, "kinds", None)
            self._view_row = [0] * sizes[0] if kinds is not None and len(set(kinds)) > 1 else None
        else:
            self.views = [[fmt.views(self.mem[row][s], row) for s in range(n)] for row, n in enumerate(self.slots)]
            self._view_row = None
        self._host_views: dict[tuple[int, int], tuple] = {}  # (row, expert) -> views of its RAM buffer
        # on a CPU device, `link_gbs` emulates a host-to-device link of that speed (prefetch.py, rules 9-10)
        self.transfers = Transfers(device, sizes, EmulatedLink(link_gbs * 1e9) if link_gbs else None)
        # prefetches waiting for this layer's demand copies: (row, experts, (expert, chance) to choose from or
        # None, rows ahead, whether a nearer guess of the row follows)
        self.planned: list[tuple[int, list[int], list[tuple[int, float]] | None, int, bool]] = []
        self.speculative: list[list[tuple[int, int]]] = [[] for _ in self.slots]  # per row: (slot, expert) prefetched
        self.counters = CacheCounters()
        self.copy_s = self.cpu_s = 0.0  # one expert's copy and CPU forward, measured by `calibrate_misses`
        self.layer_s = 0.0  # a layer's compute between two acquires (an average), for `decide_row`
        self.top_k = 1  # experts a token uses per row, set by the prefetcher, for `decide_row`
        self.gains: dict[int, float] = {}  # per lead, the expected saving of the copies decided since `Prefetcher` read
        self.spent: dict[int, float] = {}  # per lead, the host time of deciding and issuing them (the gate's cost too)
        self._entered = self._waited = None  # the latest acquire's time and copy_wait_s then

    @property
    def host_is_device(self) -> bool:
        """No copy engine (a CPU device) and every expert in RAM: the host store is the device's memory, so
        copying is the only difference between fetching an expert and computing it from RAM."""
        return self.transfers.cuda is None and self.store.in_ram

    @property
    def device_bytes(self) -> int:
        return sum(m.numel() for m, alias in zip(self.mem, self.aliased, strict=True) if not alias)

    def reset_counters(self) -> None:
        self.counters = CacheCounters()
        self.table.reset_counts()
        self.transfers.reset_counts()

    def routed(self, row: int, chosen: list[list[int]]) -> None:
        """Row `row`'s routing is known (chosen [T][K]): drop the speculative copies into it of experts it does
        not use that are still queued or on the link, and empty their slots (prefetch.py, rule 8)."""
        issued, self.speculative[row] = self.speculative[row], []
        if not issued or not self.transfers.can_drop:
            return
        used = set(chosen[0]) if len(chosen) == 1 else {e for tok in chosen for e in tok}
        p = self.pool_of[row]
        for s, e in issued:
            if e not in used and self.table.slot(row, e) == s and self.transfers.drop(p, s):
                self.table.vacate(row, e)
                self.counters.prefetch_dropped += 1

    def acquire(self, row: int, experts: list[int], decode: bool = False
                ) -> tuple[list[int], list[bool], list[bool]]:
        """Make `experts` (distinct) resident for the current layer. Returns, for each: its slot;
        whether this step computes it on the CPU instead (`cpu_forward`); whether its copy is still
        in flight (`wait` before computing it). Nothing here waits (prefetch.py, rule 3).

        A miss is always admitted: its copy starts now, on the demand stream; then the prefetches
        planned at this layer's entry are issued (rule 2). With miss policy `cpu` (or `auto`, when
        the CPU computes an expert faster than the link copies it) a decode step does not wait for
        a miss's copy: it computes the expert from host RAM, and the copy, for later tokens, goes
        on the prefetch stream, since nothing waits for it now. On the CPU with every expert in RAM
        that policy copies nothing: a slot filled then reads the expert's RAM buffer in place.
        """
        self._pace()
        hit, slots, _ = self.table.access_row(row, experts, pending=self.planned[0][:2] if self.planned else None)
        if self.transfers.feeder is not None:  # a hit's prefetch not yet all on the link: the rest now, as demand
            for s, h in zip(slots, hit, strict=True):
                if h:
                    self.transfers.hurry(self.pool_of[row], s)
        c = self.counters
        on_cpu = [False] * len(experts)
        for k, e in enumerate(experts):
            if not hit[k]:
                on_cpu[k] = decode and self._on_cpu(sum(on_cpu))
                c.cpu_misses += on_cpu[k]
                self._copy(row, slots[k], e, demand=not on_cpu[k])
        self._flush_prefetch(len(experts) - sum(hit) - sum(on_cpu))
        flying = self.transfers.in_flight[self.pool_of[row]]
        late = [not cpu and flying[s] for s, cpu in zip(slots, on_cpu, strict=True)]
        return slots, on_cpu, late

    def _on_cpu(self, queued: int) -> bool:
        """Whether a decode miss is computed on the CPU: miss policy cpu; auto on a device with a copy engine,
        per miss from the link's backlog and the CPU misses already queued (`speculate.miss_on_cpu`); auto
        elsewhere, as `calibrate_misses` found."""
        if self.miss_policy != "auto" or self.transfers.cuda is None:
            return self.cpu_cheaper
        return miss_on_cpu(self.transfers.backlog_s(), self.copy_s, queued * self.cpu_s, self.cpu_s)

    def _pace(self) -> None:
        """Average a layer's compute: the time since the previous acquire, less what it waited for copies."""
        now, waited = time.perf_counter(), self.counters.copy_wait_s
        if self._entered is not None:
            spent = max(0.0, now - self._entered - (waited - self._waited))
            self.layer_s = spent if self.layer_s == 0.0 else 0.9 * self.layer_s + 0.1 * spent
        self._entered, self._waited = now, waited

    def wait(self, row: int, slot: int) -> None:
        """Order compute after the copy into `slot`; a host wait is counted as compute stalled on a copy."""
        self.counters.copy_wait_s += self.transfers.wait_ready(self.pool_of[row], slot)

    def cpu_forward(self, row: int, expert: int, x_host: torch.Tensor) -> torch.Tensor:
        """Run one expert on the CPU from its host-RAM bytes: x_host [T, D] -> [T, D] on the CPU."""
        y = self.fmt.forward(x_host, self.host_views(row, expert))
        self.store.done(row, expert)
        return y

    def host_views(self, row: int, expert: int) -> tuple:
        """The weight views of an expert's host buffer; computed once when every expert is in RAM (those
        buffers never move; the tiered store's do)."""
        if not self.store.in_ram:
            return self.fmt.views(self.store.buffer(row, expert), row)
        views = self._host_views.get((row, expert))
        if views is None:
            views = self._host_views[row, expert] = self.fmt.views(self.store.buffer(row, expert), row)
        return views

    def calibrate_misses(self, dim: int, dtype: torch.dtype, repeats: int = 3) -> dict:
        """For miss policy `auto` and `decide_row`: time one expert's decode forward on the CPU against one copy to the
        device. Call it before any expert is resident: it uses slot 0 of layer 0 as scratch."""
        x = torch.randn(1, dim, dtype=dtype)
        buf = self.store.buffer(0, 0)
        views = self.fmt.views(buf, 0)
        dst = self.mem[0][0] if not self.aliased[0] else torch.empty_like(buf, device=self.device)
        times = {"cpu_s": float("inf"), "copy_s": float("inf")}
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.fmt.forward(x, views)
            times["cpu_s"] = min(times["cpu_s"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            dst.copy_(buf, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # SYNC: calibration at load, not on the decode path
            times["copy_s"] = min(times["copy_s"], time.perf_counter() - t0)
        self.store.done(0, 0)
        if self.transfers.link is not None:  # the emulated link's copy, not the memcpy
            times["copy_s"] = self.transfers.link.seconds(buf.numel() * buf.element_size())
        elif self.device.type == "cuda":  # what `backlog_s` counts queued bytes in, and the feeder's chunk
            self.transfers.measured(buf.numel() * buf.element_size() / times["copy_s"])
        self.copy_s, self.cpu_s = times["copy_s"], times["cpu_s"]
        if self.miss_policy == "auto":  # on the CPU device an expert runs on the CPU either way, copied or not
            self.cpu_cheaper = self.host_is_device or times["cpu_s"] < times["copy_s"]
        return times

    def release(self, row: int, slots: list[int]) -> None:
        """The kernels reading these slots are enqueued: a later copy into them must wait for those."""
        for s in slots:
            self.transfers.mark_free(self.pool_of[row], s)

    def plan_prefetch(self, row: int, experts: list[int], ranked: list[tuple[int, float]] | None = None,
                      lead: int = 1, deeper: bool = False) -> None:
        """Queue a prefetch for `row`, `lead` rows ahead; it is issued after the current layer's demand copies:
        `experts`, or, given `ranked` (expert, chance), those `speculate.decide_row` chooses then; `deeper`: a
        nearer guess of `row` comes at the next layer (its copies only fill the link until then)."""
        self.planned.append((row, experts, ranked, lead, deeper))

    def _flush_prefetch(self, demand: int) -> None:
        """Issue the planned prefetches, after this layer's `demand` copies (the layer waits for those before
        the planned row's `lead` layers run, and before the next layer's guesses)."""
        planned, self.planned = self.planned, []
        for row, experts, ranked, lead, deeper in planned:
            if ranked is None:
                self.prefetch(row, experts)
                continue
            t0, wait = time.perf_counter(), demand * self.copy_s
            better = wait + self.layer_s if deeper else float("inf")
            chosen = decide_row(self.table, row, ranked, self.top_k, self.copy_s, self.transfers.backlog_s(),
                                wait + lead * self.layer_s, self.slots[row], better)
            self.prefetch(row, [e for e, _ in chosen])
            # for `Prefetcher`'s gate: what the copies are expected to save, and what deciding and issuing them cost
            self.gains[lead] = self.gains.get(lead, 0.0) + sum(g for _, g in chosen)
            self.spent[lead] = self.spent.get(lead, 0.0) + time.perf_counter() - t0

    def prefetch(self, row: int, experts: list[int]) -> None:
        """Start copying predicted experts that are not resident (never evicting one of them)."""
        inserted, slots, _ = self.table.prefetch_row(row, experts)
        for k, e in enumerate(experts):
            if inserted[k]:
                self._copy(row, slots[k], e, demand=False)
                self.speculative[row].append((slots[k], e))

    def _copy(self, row: int, s: int, expert: int, demand: bool) -> None:
        p = self.pool_of[row]
        if self.aliased[p]:  # slot s already is the host buffer of expert s (filled by warm)
            return
        if self.host_is_device and self.cpu_cheaper:  # the CPU computes it from RAM: the slot reads that in place
            self.views[row][s] = self.host_views(row, expert)
            return
        if self._view_row is not None and self._view_row[s] != row:  # a global pool's slot, another layout
            self.views[row][s], self._view_row[s] = self.fmt.views(self.mem[p][s], row), row
        if self.transfers.drop(p, s):  # a speculative copy still on its way here: its expert was evicted unused
            self.counters.prefetch_dropped += 1
        if demand and self.transfers.prefetch_busy():
            self.counters.demand_during_prefetch += 1
        event = self.transfers.copy(self.mem[p][s], self.store.buffer(row, expert), p, s, demand)
        self.store.done(row, expert, event)
        self.counters.bytes_to_device += self.fmt.nbytes
        self.counters.copies += 1

    def warm(self) -> float:
        """Load every expert of the layers whose own slots cover them all: those layers are resident."""
        t0 = time.perf_counter()
        for row, n in enumerate(self.slots):
            if n >= self.table.num_experts and self.pool == "layer":
                self.acquire(row, list(range(self.table.num_experts)))
        self.transfers.synchronize()
        return time.perf_counter() - t0
