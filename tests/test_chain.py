"""The launch chain (dpgather/_chain.py) against fake CUDA streams and events, on CPUs.

The chain decides which stream waits on which event; its CUDA calls are ``Event.record``,
``Stream.wait_event`` and ``Stream.is_capturing``. A fake CuPy records them, so the ordering rules
of docs/overlap.md are checked here, and the GPU tests only add the real CUDA semantics.
"""

import types

import pytest

from dpgather._chain import EventPool, NullChain, StreamChain


class FakeEvent:
    def __init__(self, log):
        self.log, self.rec, self.id = log, None, len(log.events)
        log.events.append(self)

    def record(self, stream):
        self.log.ops.append(("record", self.id, stream.ptr))
        self.rec = (stream.ptr, len(self.log.ops))


class FakeStream:
    def __init__(self, log, ptr, capturing=False):
        self.log, self.ptr, self.capturing = log, ptr, capturing

    def is_capturing(self):
        return self.capturing

    def wait_event(self, ev):
        assert ev.rec is not None, "waited on an event that was never recorded"
        self.log.ops.append(("wait", self.ptr, ev.id, ev.rec[0]))


class Fake:
    """A CuPy stand-in: ``cuda.get_current_stream``, ``cuda.Event``; ``ops`` logs the calls."""

    def __init__(self):
        self.ops, self.events = [], []
        self.current = None
        log = self
        self.cuda = types.SimpleNamespace(get_current_stream=lambda: log.current,
                                          Event=lambda **kw: FakeEvent(log))

    def stream(self, ptr, capturing=False):
        return FakeStream(self, ptr, capturing)


def op(fake, chain, s):
    """One data-plane operation on stream ``s``: enter, a launch, leave."""
    fake.current = s
    got, cap = chain.enter()
    assert got is s
    fake.ops.append(("launch", s.ptr))
    chain.leave(got, cap)


def waits(fake):
    return [o for o in fake.ops if o[0] == "wait"]


def test_one_stream_costs_nothing():
    f = Fake()
    chain = StreamChain(f)
    a = f.stream(1)
    for _ in range(5):
        op(f, chain, a)
    assert not chain.chained and not f.events and not waits(f)


def test_a_second_stream_switches_the_chain_on_and_waits():
    f = Fake()
    chain = StreamChain(f)
    a, b = f.stream(1), f.stream(2)
    op(f, chain, a)
    op(f, chain, b)
    assert chain.chained
    # the previous operation on a is fenced by an event recorded on a, which b waits on
    assert ("wait", 2, 0, 1) in f.ops
    assert f.ops.index(("launch", 2)) > f.ops.index(("wait", 2, 0, 1))
    f.ops.clear()
    op(f, chain, b)  # same stream again: no wait
    assert not waits(f)
    op(f, chain, a)  # back to a: waits on the record made right after b's operation
    w = waits(f)
    assert w == [("wait", 1, 0, 2)]


def test_started_chain_records_after_every_operation():
    f = Fake()
    chain = StreamChain(f)
    chain.start()  # micro_batches > 1, or an asynchronous call
    a, b = f.stream(1), f.stream(2)
    op(f, chain, a)
    rec = [o for o in f.ops if o[0] == "record"]
    assert rec and rec[-1][2] == 1  # recorded on a right after its launch
    op(f, chain, b)
    assert waits(f)[-1][1:] == (2, 0, 1)


def test_capture_keeps_its_own_timeline():
    f = Fake()
    chain = StreamChain(f)
    chain.start()
    a = f.stream(1)
    op(f, chain, a)  # eager
    c, d = f.stream(3, capturing=True), f.stream(4, capturing=True)
    f.ops.clear()
    op(f, chain, c)  # first captured operation: never waits on an eager event
    assert not waits(f)
    op(f, chain, d)  # a fork inside the same capture: joins on the captured event
    assert waits(f) == [("wait", 4, 1, 3)]
    c.capturing = d.capturing = False  # the capture ended
    f.ops.clear()
    b = f.stream(2)
    op(f, chain, b)  # eager again: waits on the last *eager* operation (on a), not the captured one
    assert waits(f) == [("wait", 2, 0, 1)]
    f.ops.clear()
    c.capturing = True  # a new capture on c: the old captured event (on d, no longer capturing) is skipped
    op(f, chain, c)
    assert not waits(f)


def test_suspended_and_null_chain():
    f = Fake()
    chain = StreamChain(f)
    chain.start()
    a, b = f.stream(1), f.stream(2)
    op(f, chain, a)
    f.ops.clear()
    with chain.suspended():
        op(f, chain, b)
    assert f.ops == [("launch", 2)]
    n = NullChain()
    assert n.enter() == (None, False)
    n.leave(None, False)
    with n.suspended():
        pass


def test_event_pool_reuses():
    f = Fake()
    pool = EventPool(f)
    e1 = pool.get()
    pool.put(e1)
    assert pool.get() is e1 and pool.created == 1
    pool.get()
    assert pool.created == 2


@pytest.mark.parametrize("capturing_old", [False, True])
def test_switch_while_the_old_stream_captures(capturing_old):
    f = Fake()
    chain = StreamChain(f)
    a, b = f.stream(1, capturing=capturing_old), f.stream(2)
    op(f, chain, a)
    op(f, chain, b)
    # a stream that is capturing cannot fence eager work: no record on it, no wait
    assert bool(waits(f)) is (not capturing_old)
