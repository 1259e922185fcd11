"""Moving expert bytes to the device, and guessing which experts the next layers will want.

Stream and event rules (CUDA). Every stream and event belongs to the engine's device (`cuda:N`
included): streams are created on it and "the compute stream" is `current_stream(device)`, never
the current device's. Three streams take part: the compute stream, a `demand` stream for copies
that the current layer needs now (created with the higher priority) and a `prefetch` stream for
speculative copies. Each slot owns two events, created once:
  ready[l][s]  recorded on the copying stream right after the copy into slot s of row l.
  free[l][s]   recorded on the compute stream right after the last kernel that reads slot s
               has been enqueued (`mark_free`).
  1. A copy into a slot first makes its stream wait for that slot's `free` event, so it never
     overwrites weights that a queued kernel is still going to read, and for the slot's previous
     `ready` event, so two copies into one slot (a prefetch, then a demand copy that evicted the
     prefetched expert before use) land in the order they were issued.
  2. Demand copies never queue behind speculative ones. The host-to-device copy engine serves a
     stream's copies in the order they were enqueued, so speculative copies have their own stream,
     and a layer's prefetches (decided at the layer's entry, `Prefetcher`) are enqueued only after
     that layer's demand copies (`ExpertCache.acquire` flushes them). On CUDA they reach their stream
     a chunk at a time (rules 7-8: `feeder.Feeder`), so a demand copy issued while a prefetch is in
     flight finds a few chunks on the link, not the whole queue; `demand_during_prefetch` counts those.
  3. Issuing and waiting are apart. `acquire` issues the misses' copies and returns at once; the
     MoE layer launches the kernels of the experts already resident, then waits for each expert
     still in flight (`wait_ready`) just before its own kernel. Waiting makes the compute stream
     wait for the slot's `ready` event; if the copy has not finished, the host also waits on it
     (a labelled SYNC), and that time is counted as compute stalled on a copy (`copy_wait_s`).
  4. A decode miss computed on the CPU (miss policy cpu/auto): the hidden state goes to a pinned
     host buffer first (`to_host`: a non-blocking copy and an event), then the device experts are
     launched, then the host waits for that event only (not for the expert kernels) and computes
     the missed experts; their outputs go back through a pinned buffer with one non-blocking copy.
  5. A copy's source is a pinned host buffer. The all-in-RAM store never rewrites one; the tiered
     store (RAM cache over storage) gets the slot's `ready` event with `done()` (a speculative copy's on
     CUDA: that event once the feeder has fed all of it, `_Landed`) and does not reuse that RAM buffer
     before the event has completed (a later recording of that event is a later copy into the same
     slot, which by rule 1 completes after ours).
  6. Nothing else synchronises. The per-layer `.tolist()` of router choices (in `modeling/transformer.py`) and,
     with prefetch on, the prediction's `.tolist()` are the decode step's syncs: residency is
     decided on the host. While speculative copies wait to be fed (rule 7), the host spins in them
     feeding the link, and reads the tensor once its event has completed (`host_list`).
  7. Demand first. On CUDA a speculative copy is fed to the prefetch stream in chunks of `link.CHUNK_S`
     (at the link's measured speed) by the host: at each issue and wait, and in the decode step's syncs,
     which spin feeding it while copies are queued (`host_list`, `_host_wait`), as many in flight as keep
     the link busy until the host comes back (feeder.py). A demand copy passes the queued rest. An expert
     needed before its prefetch is all on the link (a hit still in flight) has the rest copied at once on
     the demand stream (`hurry`).
  8. Stale never: when a row's routing is known (`ExpertCache.routed`), a speculative copy into it of
     an expert the routing does not use is dropped (`drop`) if it has not all gone to the link (on
     CUDA: the chunks not yet fed never go; on the emulated link: queued, or on the link): its slot
     is emptied in the slot table (`SlotTable.vacate`), so it is never counted as resident. A
     speculative copy still on its way into a slot that another copy now fills (its expert evicted
     unused) is dropped too, so that copy waits only for what went (rule 1).
On a CPU device there are no streams: copies run inline, in the same order, so the results are
identical to the CUDA path and to a run without prefetch, unless the engine emulates a link
(`--link-gbs`): then `self.cuda` is `link.EmulatedLink`, and the rules above run as on CUDA, with:
  9. One copy engine of the given speed, worked by a thread: a copy lasts bytes / speed of wall
     time; the demand stream's head goes first whenever it can start (rule 1's events done).
  10. The link itself runs a copy in chunks of `link.CHUNK_S` and a demand copy passes a speculative
      one at the end of the current chunk, and it takes stale ones back at once: the feeder's effect with
      a host always there to feed it. (`EmulatedLink(chunk_s=None)` is a copy engine as CUDA's instead,
      fed by the feeder as on CUDA: bench/bench_link.py `--links`.)
  Compute waits as in rule 3; `backlog_s` is the link's queue in seconds, for decisions that weigh it.
The CUDA calls go through `self.cuda` (torch.cuda, the emulated link, or a test's fake of it), so
these rules are tested on the CPU (tests/test_transfer_rules.py, tests/test_feeder.py, tests/test_link.py)
and, with `torch.cuda._sleep` widening the races, on a GPU.

Prediction (`Prefetcher`): at the entry of row l, the predictor (predictors.py) scores the rows
predicted from there: row l + N, N the prefetch depth, and for the last rows row l + N - L of the next
token (not in a batched step, whose next step may hold other sequences). For one token its best
`width` experts are prefetched (default: top-k); for a prompt or a batch, the experts most
tokens rank in their top-k (ties: the row's most used so far), up to `width`. A predictor with a
calibration (per row and rank, the chance the row uses the expert) ranks every expert it calibrated,
and the cache issues only the copies that pay (`speculate.decide_row`, the timed replay's rule), from
the link's backlog, one copy's time and the time until the row runs. A calibrated learned predictor with
deeper leads (`train-predictor --lead N` writes leads 1..N) predicts each row from its `--prefetch` lead
and every deeper one, nearest first (with a pool per row; a shared pool takes the nearest only); a deeper
guess's copies go only into the link's gap before the next layer's nearer guess, so the depth adapts per
row and token to the link's queue. All of a row's predictions reach the host in one sync.
Storage reads (tiered store) start at once and one row further ahead; device copies wait for row
l's demand copies (rule 2).

Legend: T tokens, D dim, E experts, K top-k, N prefetch depth, L rows, P prefetch width.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import torch

from .eviction import prefetch_choice
from .feeder import Feeder
from .link import EmulatedLink
from .predictors import targets_of
from .speculate import candidates, could_start


class Transfers:
    """Host-to-device copies of whole experts, and the hidden state's round trip for CPU-computed
    misses, with per-slot events on CUDA (the rules above). `cuda`: torch.cuda, or a test's fake."""

    def __init__(self, device: torch.device, slots: Sequence[int], cuda=None, feed: bool = True):
        """`feed` False: speculative copies are enqueued whole where the link does not chunk them itself (CUDA
        before the feeder: a benchmark's baseline)."""
        self.device = device
        self.cuda = cuda if cuda is not None else (torch.cuda if device.type == "cuda" else None)
        self.link = cuda if isinstance(cuda, EmulatedLink) else None  # rules 9-10
        self.in_flight = [[False] * n for n in slots]  # a copy into [l][s] was issued and not yet waited for
        self.bytes_per_s: float | None = None  # CUDA: the link's measured speed, for `backlog_s` (calibration)
        self._queued: deque[tuple] = deque()  # CUDA with a known speed: (ready event, bytes) per whole copy
        self.feeder: Feeder | None = None  # CUDA: the speculative copies (feeder.py)
        if self.cuda is None:
            return
        cuda = self.cuda
        self.demand = cuda.Stream(device, priority=-1)  # rule 2: its own stream, the higher priority
        self.prefetch = cuda.Stream(device)
        self.ready = [[cuda.Event() for _ in range(n)] for n in slots]
        self.free = [[cuda.Event() for _ in range(n)] for n in slots]
        self.prefetch_tail = cuda.Event()  # recorded after the latest speculative copy
        self.host_event, self.back_event, self.sync_event = cuda.Event(), cuda.Event(), cuda.Event()
        self.pin = cuda is torch.cuda  # a fake backend runs on CPU tensors, which cannot be pinned
        self._host: dict[tuple, torch.Tensor] = {}  # pinned staging buffers, allocated once per shape
        if feed and (self.link is None or not self.link.takes_back):  # speculative copies a chunk at a time (rule 7)
            self.feeder = Feeder(cuda, self._slot_copy, self.prefetch, self.demand, slots)
            self.landed = [[_Landed(self.feeder, self.ready[p][s], p, s) for s in range(n)]
                           for p, n in enumerate(slots)]
            if self.link is not None:
                self.feeder.set_speed(self.link.bytes_per_s)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, row: int, slot: int, demand: bool = True):
        """Copy one expert into a slot, on the demand stream (needed by this layer now) or the
        prefetch stream; return the event after which `src` may be reused (None: now)."""
        if self.cuda is None:
            dst.copy_(src)
            return None
        self.in_flight[row][slot] = True
        if not demand and self.feeder is not None:
            self.feeder.add(row, slot, dst, src)  # rules 7-8: fed to the link a chunk at a time
            return self.landed[row][slot]
        stream = self.demand if demand else self.prefetch
        self._slot_copy(stream, row, slot, dst, src)
        if not demand:
            self.prefetch_tail.record(stream)
        if demand and self.feeder is not None:
            self.feeder.passed()
        if self.link is None and self.bytes_per_s is not None:
            self._queued.append((self.ready[row][slot], dst.numel() * dst.element_size()))
        return self.ready[row][slot]

    def _slot_copy(self, stream, row: int, slot: int, dst: torch.Tensor, src: torch.Tensor, wait: bool = True) -> None:
        """One copy into a slot on `stream` (the emulated link's, or CUDA's), then the slot's `ready` event recorded
        behind it; first, where `wait` (a whole copy, or a feeder job's first bytes), rule 1: the slot's queued
        kernels have read the old weights and an earlier copy into it has landed."""
        with self.cuda.stream(stream):
            if wait:
                stream.wait_event(self.free[row][slot])
                stream.wait_event(self.ready[row][slot])
            if self.link is not None:
                self.link.copy(stream, dst, src)
            else:
                dst.copy_(src, non_blocking=True)
            self.ready[row][slot].record(stream)

    @property
    def preempted(self) -> int:
        """Speculative copies a demand copy passed, each counted once (on the emulated link and on CUDA)."""
        source = self.feeder if self.feeder is not None else self.link
        return source.preempted if source is not None else 0

    @property
    def can_drop(self) -> bool:
        """Whether a speculative copy can be stopped before it lands (rule 8): fed a chunk at a time, or on an
        emulated link that takes copies back."""
        return self.feeder is not None or (self.link is not None and self.link.takes_back)

    def drop(self, row: int, slot: int) -> bool:
        """Drop the speculative copy into a slot if it has bytes the feeder has not enqueued, or, on an emulated
        link that takes copies back, if it is still queued or on the link (rule 8); whether it was."""
        if not self.in_flight[row][slot]:
            return False
        if self.feeder is not None:
            dropped = self.feeder.cancel(row, slot)
        else:
            dropped = self.link is not None and self.link.drop(self.ready[row][slot])  # False where it takes none back
        if dropped:
            self.in_flight[row][slot] = False
        return dropped

    def hurry(self, row: int, slot: int) -> None:
        """The slot's expert is needed now: the rest of a speculative copy the feeder has not enqueued goes at
        once, on the demand stream (where there is no feeder, the whole copy is on the link already)."""
        if self.feeder is not None:
            self.feeder.hurry(row, slot)

    def host_list(self, t: torch.Tensor) -> list:
        """t.tolist(), a sync the caller labels. On CUDA with speculative copies still to feed, the host feeds
        them while the device computes `t`, and only then reads it."""
        if self.feeder is not None and self.feeder.queue:
            self.sync_event.record(self.cuda.current_stream(self.device))
            self._host_wait(self.sync_event)
        return t.tolist()

    def _host_wait(self, ev) -> None:
        """The host waits for `ev` (each caller labels its SYNC), feeding the link meanwhile while the feeder
        has copies to feed."""
        feeder = self.feeder
        while feeder is not None and feeder.queue and not ev.query():
            feeder.pump()
            time.sleep(0)  # the GIL to other threads: a reader, or the emulated link's worker, which moves the bytes
        ev.synchronize()  # at once where the loop saw it complete

    def backlog_s(self, demand: bool = False) -> float:
        """Seconds of copy work ahead of a copy issued now (on the demand stream, or the prefetch stream behind
        everything): 0.0 for inline copies; on the emulated link, its schedule; on CUDA, the bytes of the copies
        not yet landed over the measured speed (`bytes_per_s`, from `ExpertCache.calibrate_misses`), else 0.0.
        On CUDA an estimate: a slot's event tells of its latest copy only, and demand copies share the link."""
        feeder = self.feeder
        rest = 0 if feeder is None or demand else feeder.rest_bytes()  # not yet on the link: after the rest
        if self.link is not None:
            return self.link.backlog_s(demand) + rest / self.link.bytes_per_s
        if self.cuda is None or self.bytes_per_s is None:
            return 0.0
        queued = self._queued
        while queued and queued[0][0].query():
            queued.popleft()
        flying = 0 if feeder is None else feeder.flying_bytes()
        return (sum(n for ev, n in queued if not ev.query()) + flying + rest) / self.bytes_per_s

    def measured(self, bytes_per_s: float) -> None:
        """The link's speed, measured at load (`ExpertCache.calibrate_misses`): what `backlog_s` counts bytes in, and
        the feeder's chunk."""
        self.bytes_per_s = bytes_per_s
        if self.feeder is not None:
            self.feeder.set_speed(bytes_per_s)

    def reset_counts(self) -> None:
        if self.link is not None:
            self.link.reset_counts()
        if self.feeder is not None:
            self.feeder.preempted = 0

    def prefetch_busy(self) -> bool:
        """Whether a speculative copy is still in flight (a demand copy issued now shares the link)."""
        if self.feeder is not None:
            return self.feeder.busy()
        return self.cuda is not None and not self.prefetch_tail.query()

    def wait_ready(self, row: int, slot: int) -> float:
        """Order compute after the slot's copy (rule 3); return host seconds spent waiting."""
        if self.cuda is None or not self.in_flight[row][slot]:
            return 0.0
        self.hurry(row, slot)
        ev = self.ready[row][slot]
        waited = 0.0
        if not ev.query():
            t0 = time.perf_counter()
            self._host_wait(ev)  # SYNC: compute needs this expert now and its copy is still in flight
            waited = time.perf_counter() - t0
        self.cuda.current_stream(self.device).wait_event(ev)
        self.in_flight[row][slot] = False
        return waited

    def mark_free(self, row: int, slot: int) -> None:
        if self.cuda is not None:
            self.free[row][slot].record(self.cuda.current_stream(self.device))

    def to_host(self, x: torch.Tensor) -> None:
        """Start copying the hidden state x [T, D] to a pinned host buffer (rule 4); `host_x` waits."""
        if self.cuda is None:
            self._x = x
            return
        buf = self._staging("x", x)
        buf.copy_(x, non_blocking=True)
        self.host_event.record(self.cuda.current_stream(self.device))
        self._x = buf

    def host_x(self) -> torch.Tensor:
        """The hidden state given to `to_host`, once it is on the host."""
        if self.cuda is not None:
            self._host_wait(self.host_event)  # SYNC: the CPU computes missed experts from it (rule 4)
        return self._x

    def to_device(self, y: torch.Tensor) -> torch.Tensor:
        """CPU-computed expert outputs y [n, D] onto the device, one non-blocking copy from pinned memory."""
        if self.cuda is None:
            return y
        buf = self._staging("y", y)
        # SYNC: the previous layer's copy out of this buffer has finished (it has: this layer's router
        # read its choices on the host since); written only after that, so no copy reads a half-new buffer
        self.back_event.synchronize()
        buf.copy_(y)
        out = buf.to(self.device, non_blocking=True)
        self.back_event.record(self.cuda.current_stream(self.device))
        return out

    def _staging(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(like.shape), like.dtype)
        if key not in self._host:
            self._host[key] = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.pin)
        return self._host[key]

    def synchronize(self) -> None:
        if self.cuda is not None:
            if self.feeder is not None:
                self.feeder.flush()
            self.demand.synchronize()  # SYNC: end of load/warm-up, not on the decode path
            self.prefetch.synchronize()  # SYNC: likewise


class _Landed:
    """What the store waits for before it reuses a speculative copy's source (rule 5, `store.done`): the slot's
    `ready` event, once the feeder has enqueued the whole copy. Allocated with the slots."""

    __slots__ = ("feeder", "ready", "pool", "slot")

    def __init__(self, feeder: Feeder, ready, pool: int, slot: int):
        self.feeder, self.ready, self.pool, self.slot = feeder, ready, pool, slot

    def query(self) -> bool:
        return not self.feeder.queued(self.pool, self.slot) and self.ready.query()

    def synchronize(self) -> None:
        self.feeder.flush()  # its bytes on the link first (and the jobs queued before it: one stream, in order)
        self.ready.synchronize()


PROBE = 16  # a prediction whose copies have not paid for its host time is still made once in this many calls


class Prefetcher:
    """Speculative prefetch: at each row's entry or at its router (the predictor's `input`), the predictor
    (predictors.py) scores the rows it predicts from there, and each gets its `widths[row]` best experts. With no
    cache it only predicts, for a routing trace to record what a prefetch would fetch. A calibrated learned
    predictor with deeper leads (`LearnedPredictor.deeper`) predicts each row from several rows ahead, nearest
    first; the cache issues a deeper guess's copies only into the link's gap before a nearer guess comes
    (`decide_row`)."""

    def __init__(self, model, predictor, widths: Sequence[int], cache=None):
        self.model, self.predictor, self.cache = model, predictor, cache
        # nearest lead first; deeper ones only into a pool of the row's own: in one shared by every row, LRU's oldest
        # entries are the next rows' experts of the last token, which a deeper guess's copy displaces just before
        # their reuse (the demo at the 12gb profile's 2 slots: 0.89x no prefetch with leads 1-3, 0.99x with lead 1);
        # with no cache, only the nearest lead's predictions are recorded
        nearest = cache is None or cache.pool == "global"
        self.stages = [predictor, *([] if nearest else getattr(predictor, "deeper", []))]
        self.lead, self.widths = self.stages[-1].lead, list(widths)  # the depth
        self.input = predictor.input  # which hidden state the model calls it with: "hidden" or "router_input"
        # per lead, averages of the expected saving of a prediction's copies and of its host time (seconds): here
        # (`cost`) and in the cache, deciding and issuing its copies (`issue`)
        self.gain = {s.lead: 0.0 for s in self.stages}
        self.cost = {s.lead: 0.0 for s in self.stages}
        self.issue = {s.lead: 0.0 for s in self.stages}
        self.calls = {s.lead: 0 for s in self.stages}
        self.top_k, rows = model.config.top_k, model.config.n_moe_layers
        # per row, what it predicts: (stage, target row, for the next token?), nearest lead first; settled once
        self.targets = [[(s, t, nxt) for s in self.stages for t, nxt in targets_of(row, s.lead, rows)]
                        for row in range(rows)]
        if cache is not None:
            cache.top_k = self.top_k

    def __call__(self, row: int, h: torch.Tensor, decode: bool) -> None:
        """`h` [T, D] is `row`'s hidden state the predictor reads (`input`: entering the row, or its router
        input). The device copies are queued on the cache (`plan_prefetch`) and issued after `row`'s demand
        copies (rule 2). A trace records the nearest lead's predictions."""
        t0 = time.perf_counter()
        recorder = self.model.recorder
        made = []  # (stage, target, experts [T, P]) of every lead
        backlog = None  # the link's queue at this row's entry: read once, for the first prediction that pays
        for stage, target, next_token in self.targets[row]:
            if next_token and decode and h.shape[0] > 1:
                continue  # a batch's next step may hold other sequences: no cross-token guess
            x = h[-1:] if next_token else h  # a prompt's next forward follows its last token
            cal = stage.calibration
            if cal is not None and self.cache is not None and recorder is None:
                if not self._pays(stage):
                    continue
                backlog = self.cache.transfers.backlog_s() if backlog is None else backlog
                if not self._in_time(stage, backlog):
                    continue
            width = self.widths[target] if cal is None or self.cache is None else cal.shape[1]
            made.append((stage, target, stage.rank(target, x, width)))
            if recorder is not None and stage is self.predictor:
                recorder.predicted(target, next_token, made[-1][2])
        if self.cache is None:
            return
        flat = []
        if made:
            flat = self.cache.transfers.host_list(torch.cat([e.reshape(-1) for _, _, e in made]))  # SYNC: to host
        at = 0
        for stage, target, experts in made:
            T, P = experts.shape
            ranks = [flat[at + i * P : at + (i + 1) * P] for i in range(T)]  # [T][P]
            at += T * P
            uses, cal = self.cache.table.uses_of(target), stage.calibration
            if cal is None:
                chosen, ranked = prefetch_choice(ranks, self.top_k, self.widths[target], uses), None
            else:  # the cache chooses among them once this row's demand copies are queued (`decide_row`)
                ranked = candidates(ranks, cal[target], uses)
                chosen = [e for e, _ in ranked][: self.cache.slots[target]]
            self.cache.store.prefetch(target, chosen)  # non-blocking reads from storage (tiered store only)
            self.cache.plan_prefetch(target, chosen, ranked, stage.lead, deeper=stage is not self.predictor)
        if made:  # the host time, shared by the leads predicted
            spent = (time.perf_counter() - t0) / len(made)
            for stage, _, _ in made:
                self.cost[stage.lead] = 0.9 * self.cost[stage.lead] + 0.1 * spent
        if not self.cache.store.in_ram and row + self.lead + 1 < len(self.targets) and h.shape[0] == 1:
            # storage reads run one row further ahead than the copies, on the router's guess (from the router input
            # too, where the predictor reads that: the ffn norm of a normed state, a guess all the same)
            deeper = row + self.lead + 1
            self.cache.store.prefetch(deeper, self.model.predict(deeper, h).view(-1).tolist())  # SYNC: to host

    def _pays(self, stage) -> bool:
        """Whether a calibrated `stage`'s prediction pays: not while its copies' expected saving (`decide`'s, an
        average per prediction) has been below its host time (predicting here, deciding and issuing its copies in
        the cache), but for every PROBE-th call, which keeps the averages current: where nothing pays, prefetch
        costs next to nothing."""
        c, lead = self.cache, stage.lead
        for k, g in c.gains.items():  # the savings decided since the last call, and their host time, into averages
            self.gain[k] = 0.9 * self.gain[k] + 0.1 * g
            self.issue[k] = 0.9 * self.issue[k] + 0.1 * c.spent[k]
        c.gains.clear()
        c.spent.clear()
        self.calls[lead] += 1
        return self.calls[lead] % PROBE == 1 or self.gain[lead] >= self.cost[lead] + self.issue[lead]

    def _in_time(self, stage, backlog_s: float) -> bool:
        """Whether a copy decided now for `stage` could start in time (`speculate.could_start`, behind the link's
        queue at this row's entry, `backlog_s`): before the row `stage.lead` rows ahead runs, and for a deeper lead
        before the next row's nearer guess (this row's demand copies, issued before the decision, add the same to
        both sides)."""
        better = self.cache.layer_s if stage is not self.predictor else float("inf")
        return could_start(backlog_s, stage.lead * self.cache.layer_s, better)
