"""Launch ordering: every transport launch of one ``DpAttention`` runs after the previous one.

NCCL collectives on one communicator and P2P pulls on one window must never run concurrently
(kernels/p2p.cu: "launches of one transport must be stream-ordered (one stream, or
event-ordered)"; two NCCL collectives of one communicator on two streams may interleave their
kernels differently on different ranks). With one stream this holds by itself. With an
asynchronous call on a communication stream beside synchronous calls on the compute stream, or
with micro-batches on several streams, :class:`StreamChain` keeps it: each data-plane operation
makes its stream wait on an event recorded right after the previous operation (when that one ran
on another stream), then records the event again after itself. An operation is one
``DataPlane.gather`` / ``combine`` (its copies and collectives) or one graph replay, so the
whole of an operation -- its packing copies included -- runs after the previous operation.

Costs: on one stream, one pointer comparison per operation and nothing else (the *unchained*
state of a ``DpAttention`` that never saw a second stream). The chain switches on for good at
the first operation on another stream, at the first asynchronous call, or at construction with
``micro_batches > 1``; from then on each operation records one event and asks whether its stream
is capturing (about 2 us).

Graph capture: work recorded inside a capture runs only when the graph is launched, so the chain
keeps two timelines -- eager launches and captured ones. A capturing stream waits only on an
event recorded in a capture still running (the fork/join of one capture); an eager launch waits
only on an eager event. A graph launch is ordered by its launcher: :class:`~dpgather.GraphRunner`
enters the chain around its replays; its own capture runs with the chain suspended, after a
device synchronisation.

The host backend needs none of this (every call completes before it returns): it uses
:class:`NullChain`.
"""

import contextlib

__all__ = ["NullChain", "StreamChain", "EventPool", "Retired", "run_async", "EVENT_POOL"]

#: Idle events an :class:`EventPool` keeps for reuse: more than the handles two micro-batches keep
#: in flight (a few per micro-batch); events beyond it are dropped, not leaked.
EVENT_POOL = 64


class NullChain:
    """The host backend's chain: calls complete in issue order, nothing to do."""

    chained = False

    def enter(self):
        return None, False

    def leave(self, stream, captured):
        pass

    def start(self):
        pass

    @contextlib.contextmanager
    def suspended(self):
        yield


class StreamChain:
    """The launch chain of one data plane on the CUDA backend (see the module docstring).

    Args:
        cupy: the CuPy module (its current device is this rank's).

    Usage: ``s, cap = chain.enter()`` before an operation (``s`` is the current stream, which
    now waits on the previous operation when that ran elsewhere), the operation on ``s``, then
    ``chain.leave(s, cap)``.
    """

    def __init__(self, cupy):
        self._cupy = cupy
        self._current = cupy.cuda.get_current_stream
        self.chained = False
        self._eager = None  # stream of the last eager operation
        self._eager_ev = None  # event recorded right after it (chained only)
        self._eager_rec = False  # _eager_ev holds a record
        self._cap = None  # stream of the last captured operation
        self._cap_ev = None
        self._suspended = 0

    def _event(self):
        return self._cupy.cuda.Event(block=False, disable_timing=True)

    def start(self):
        """Switch the chain on (idempotent). The previous operation, if any, is fenced by an event
        recorded now on its stream (conservative: it also covers what that stream ran since)."""
        if self.chained:
            return
        self.chained = True
        self._eager_ev = self._event()
        self._cap_ev = self._event()
        e = self._eager
        if e is not None and not e.is_capturing():
            self._eager_ev.record(e)
            self._eager_rec = True

    def enter(self):
        """Order the current stream after the previous operation; returns ``(stream, captured)``."""
        s = self._current()
        if self._suspended:
            return s, None
        if not self.chained:
            e = self._eager
            if e is None or e.ptr == s.ptr:
                return s, False
            self.start()  # a second stream: from now on every operation is chained
        cap = s.is_capturing()
        if cap:
            c = self._cap
            if c is not None and c.ptr != s.ptr and c.is_capturing():
                s.wait_event(self._cap_ev)  # a join inside the same capture
        else:
            e = self._eager
            if e is not None and e.ptr != s.ptr and self._eager_rec:
                s.wait_event(self._eager_ev)
        return s, cap

    def leave(self, s, cap):
        """Record that the operation just issued on ``s`` is the chain's last one."""
        if cap is None:  # suspended
            return
        if cap:
            self._cap = s
            self._cap_ev.record(s)
        else:
            self._eager = s
            if self.chained:
                self._eager_ev.record(s)
                self._eager_rec = True

    @contextlib.contextmanager
    def suspended(self):
        """No ordering inside (a graph runner's construction: it synchronises the device before
        and after its warm-up and capture, so nothing it issues can overlap another operation)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1


class EventPool:
    """Reusable CUDA events for asynchronous handles (no event is created per step once warm).

    An event may be recorded again as soon as every ``wait_event`` on it has been *issued*:
    ``cudaStreamWaitEvent`` uses the record current at the time of the call.
    """

    def __init__(self, cupy):
        self._cupy = cupy
        self._free = []
        self.created = 0

    def get(self):
        if self._free:
            return self._free.pop()
        self.created += 1
        return self._cupy.cuda.Event(block=False, disable_timing=True)

    def put(self, ev):
        if len(self._free) < EVENT_POOL:
            self._free.append(ev)


def run_async(chain, events, current, s, work):
    """Run ``work()`` on stream ``s`` after the work enqueued so far on ``current`` (the caller's
    stream, which produced the inputs); returns ``(result, event)``, the event recorded on ``s``
    after the work (what ``AsyncHandle.wait`` waits on). The chain switches on for good."""
    if not chain.chained:
        chain.start()
    if current.ptr != s.ptr:
        ev = events.get()
        ev.record(current)
        s.wait_event(ev)
        events.put(ev)  # safe: the wait above was issued with the current record
    with s:
        res = work()
    done = events.get()
    done.record(s)
    return res, done


class Retired:
    """Arena buffers replaced (their role grew) while the device may still read them.

    With every operation on one stream, the memory pool reuses a freed buffer in stream order:
    :meth:`retire` drops it. Once the chain is on (several streams), a buffer is kept until an
    event recorded when it was retired -- after the chain's earlier operations -- has completed
    (:meth:`release`, a query per buffer, no synchronisation); one retired during a graph
    capture (no event can be queried later) is kept until :meth:`clear` (close).

    Args:
        chain: the data plane's launch chain. events: an :class:`EventPool` (None on the host).
        current: ``current() -> stream``.
    """

    def __init__(self, chain, events, current):
        self._chain, self._events, self._current = chain, events, current
        self._kept = []  # (event or None, buffer)

    def retire(self, buf):
        if not self._chain.chained:
            return
        s = self._current()
        if s.is_capturing():
            self._kept.append((None, buf))
            return
        ev = self._events.get()
        ev.record(s)
        self._kept.append((ev, buf))

    def release(self):
        if not self._kept:
            return
        keep = []
        for ev, buf in self._kept:
            if ev is not None and ev.done:
                self._events.put(ev)
            else:
                keep.append((ev, buf))
        self._kept = keep

    def clear(self):
        self._kept = []
