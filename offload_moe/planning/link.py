"""The host-to-device link of the timed replay (timed.py), and the CPU beside it.

One link carries one copy at a time. Demand copies go first: a demand copy passes every queued
speculative copy and a started one too (the live link splits a copy into chunks; here the chunks are
taken as small against a copy, so the demand copy starts the moment it is issued and the speculative
one resumes after it). Speculative copies run first issued first served in the gaps, each no earlier
than its slot is free (`not_before`: the last row that read the slot has ended). A speculative copy
still queued or running when its row's routing is known, and not used by it, is dropped: the link
time it had is lost, the rest is never spent. One a row uses is promoted: its rest goes on as a demand
copy.

Time only moves forward: `advance(now)` settles the speculative copies' progress up to `now`, and every
call after it happens at `now`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Copy:
    left: float  # seconds of link time still to run
    pool: int
    slot: int
    row: int  # the row whose expert it carries (stale when that row's routing does not use it)
    not_before: float  # its slot is free from then


class Link:
    """Demand copies first, speculative ones in the gaps (see the module docstring). `done(pool, slot, t)`
    is called when a speculative copy lands at time t."""

    def __init__(self, copy_s: float, done):
        self.copy_s, self.done = copy_s, done
        self.demand_end = 0.0  # when the demand copies issued so far have landed
        self.settled = 0.0  # speculative progress is known up to here
        self.queue: list[_Copy] = []  # speculative copies, in issue order
        self.busy = 0.0  # seconds the link carried a copy, dropped parts included
        self.dropped = 0  # speculative copies dropped or overwritten before they landed
        self.landed = 0.0  # when the latest speculative copy landed

    def advance(self, now: float) -> None:
        """Run the queued speculative copies in the link's idle time up to `now`."""
        t = max(self.settled, self.demand_end)
        while self.queue and t < now:
            head = self.queue[0]
            t = max(t, head.not_before)
            if t >= now:
                break
            run = min(head.left, now - t)
            head.left -= run
            self.busy += run
            t += run
            if head.left <= 0:
                self.queue.pop(0)
                self.landed = t
                self.done(head.pool, head.slot, t)
        self.settled = max(self.settled, now)

    def backlog(self, now: float) -> float:
        """Seconds of copy work ahead of a speculative copy issued at `now`."""
        return max(0.0, self.demand_end - now) + sum(c.left for c in self.queue)

    def demand(self, now: float, work: float | None = None) -> float:
        """A demand copy of `work` seconds (a whole copy by default) issued at `now`; returns when it lands."""
        work = self.copy_s if work is None else work
        self.demand_end = max(now, self.demand_end) + work
        self.busy += work
        return self.demand_end

    def speculate(self, pool: int, slot: int, row: int, not_before: float) -> None:
        self.queue.append(_Copy(self.copy_s, pool, slot, row, not_before))

    def pending(self, pool: int, slot: int) -> _Copy | None:
        return next((c for c in self.queue if c.pool == pool and c.slot == slot), None)

    def cancel(self, pool: int, slot: int) -> bool:
        """Drop the speculative copy into a slot (its row does not use it, or another copy overwrites the slot);
        whether there was one."""
        copy = self.pending(pool, slot)
        if copy is not None:
            self.queue.remove(copy)
            self.dropped += 1
        return copy is not None

    def promote(self, now: float, pool: int, slot: int) -> float | None:
        """The speculative copy into a slot, now needed: its rest runs as a demand copy; when it lands (None: no
        such copy)."""
        copy = self.pending(pool, slot)
        if copy is None:
            return None
        self.queue.remove(copy)
        return self.demand(max(now, copy.not_before), copy.left)

    def stale(self, row: int, used: set[int]) -> list[tuple[int, int]]:
        """The (pool, slot) of `row`'s queued copies whose slot is not in `used`: dropped."""
        gone = [c for c in self.queue if c.row == row and c.slot not in used]
        for c in gone:
            self.queue.remove(c)
        self.dropped += len(gone)
        return [(c.pool, c.slot) for c in gone]

    def finish(self) -> float:
        """Run every queued copy to its end; when the link falls idle."""
        self.advance(float("inf"))
        return max(self.landed, self.demand_end)
