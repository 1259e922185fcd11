"""A fake of the `torch.cuda` calls that `prefetch.Transfers` makes, for testing its ordering rules
on the CPU: streams are in-order queues on a simulated clock, copies take `copy_ticks`, kernels
take none, and every call is logged.

Time: the clock advances one tick per fake call. A copy starts when its stream is free, the
events it waits for have completed and it has been enqueued; it completes `copy_ticks` later. An
event recorded on a stream completes when everything enqueued there before it has. The host
sees completion through `query` (clock >= done) and waits through `synchronize` (the clock jumps).
The data itself moves at once (these are CPU tensors): only the order is simulated.

Log entries: ("stream", name, device), ("current_stream", device), ("copy", stream name, event,
start, end), ("stream_wait", stream name, event), ("record", stream name, event),
("host_wait", event, ticks waited); tests add their own (kernels).
"""

from __future__ import annotations

from contextlib import contextmanager


class FakeEvent:
    def __init__(self, cuda: FakeCuda):
        self.cuda, self.done_at = cuda, None  # None: never recorded (waiting on it is a no-op)

    def query(self) -> bool:
        self.cuda.tick()
        return self.done_at is None or self.cuda.clock >= self.done_at

    def synchronize(self) -> None:
        c = self.cuda
        c.tick()
        waited = 0 if self.done_at is None else max(0, self.done_at - c.clock)
        c.clock += waited
        c.log.append(("host_wait", self, waited))

    def record(self, stream: FakeStream | None = None) -> None:
        (stream or self.cuda.compute).record_event(self)

    def wait(self, stream: FakeStream) -> None:
        stream.wait_event(self)


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str, device=None):
        self.cuda, self.name, self.device = cuda, name, device
        self.tail = 0  # when everything enqueued so far has completed
        self.bound = 0  # the start bound of the copy being enqueued (events it waits for)
        self.copying = False  # inside `with cuda.stream(self)`: the next record ends a copy
        self.placed = False

    def wait_event(self, ev: FakeEvent) -> None:
        self.cuda.tick()
        self.cuda.log.append(("stream_wait", self.name, ev))
        if ev.done_at is not None:
            if self.copying:
                self.bound = max(self.bound, ev.done_at)
            else:
                self.tail = max(self.tail, ev.done_at)

    def record_event(self, ev: FakeEvent) -> None:
        c = self.cuda
        c.tick()
        if self.copying and not self.placed:  # the copy enqueued in this block
            start = max(self.tail, self.bound, c.clock)
            self.tail = start + c.copy_ticks
            self.placed = True
            c.log.append(("copy", self.name, ev, start, self.tail))
        else:
            self.tail = max(self.tail, c.clock)
            c.log.append(("record", self.name, ev))
        ev.done_at = self.tail

    def synchronize(self) -> None:
        self.cuda.clock = max(self.cuda.clock, self.tail)


class FakeCuda:
    def __init__(self, copy_ticks: int = 40):
        self.clock, self.copy_ticks = 0, copy_ticks
        self.log: list[tuple] = []
        self.compute = FakeStream(self, "compute")
        self.streams: list[FakeStream] = []

    def tick(self) -> None:
        self.clock += 1

    def Stream(self, device=None, priority: int = 0) -> FakeStream:  # noqa: N802 (torch.cuda's name)
        self.tick()
        name = "demand" if priority < 0 else "prefetch"
        self.log.append(("stream", name, device))
        s = FakeStream(self, name, device)
        self.streams.append(s)
        return s

    def Event(self) -> FakeEvent:  # noqa: N802
        return FakeEvent(self)

    def current_stream(self, device=None) -> FakeStream:
        self.tick()
        self.log.append(("current_stream", device))
        return self.compute

    @contextmanager
    def stream(self, s: FakeStream):
        s.copying, s.placed, s.bound = True, False, 0
        try:
            yield
        finally:
            s.copying = False
