"""``AsyncHandle``: one asynchronous data-plane call in flight (docs/overlap.md).

``dp.gather_async(x, plan, stream=comm)`` (and ``scatter_async``, ``gather_logits_async``,
``scatter_logits_async``) enqueues the call on ``comm`` and returns a handle at once::

    h = dp.gather_async(x, plan, contribution="partial", stream=comm)
    ...                                   # compute on the current stream meanwhile
    G = h.wait()                          # the current stream now runs after the gather; G = h.result

Who writes what: the call's output (``h.result``) is written on the handle's stream, by the
device, after ``gather_async`` returned; ``wait(stream)`` orders ``stream`` (default: the
current stream) after it with an event -- no host synchronisation. Reading ``h.result`` before
``wait()`` raises :class:`~dpgather.InputError` (the device may still be writing it).

Lifetimes: the handle keeps a reference to the call's inputs (``x``, ``Y``, ``out=``...) until
``wait()``, so an input freed by the caller meanwhile cannot be handed to another allocation by
a stream-ordered memory pool (CuPy's pool reuses a block on the stream that freed it; after
``wait()`` that stream is ordered after the call). ``h.result`` is a view of the micro-batch's
arena role (``gathered``, ``output``, ``logits``, ``logits_output``) or the caller's ``out=``:
valid until the next call of the same role on the same micro-batch, which makes reading it raise.

On the host backend the call completes before ``*_async`` returns; the handle keeps the same
rules (``wait()`` once, then ``result``), so code written against it runs in CI unchanged.
"""

from typing import Any

from dpgather.core.errors import InputError

__all__ = ["AsyncHandle"]

_PENDING, _WAITED = 0, 1


class AsyncHandle:
    """One asynchronous call (see the module docstring); made by ``DpAttention.*_async``.

    Attributes:
        op: ``"gather"``, ``"scatter"``, ``"gather_logits"`` or ``"scatter_logits"``.
        micro_batch: the micro-batch of the call's plan.
        plan: the call's plan.
        stream: the stream the call was enqueued on (None on the host backend).
    """

    __slots__ = ("op", "micro_batch", "plan", "stream", "_owner", "_backend", "_events", "_event", "_result",
                 "_refs", "_state", "_arena", "_role", "_gen")

    def __init__(self, owner, backend, events, op, step, stream, event, result, refs, role):
        """``owner``: the ``DpAttention``'s :class:`~dpgather._lifecycle.State`; ``backend``,
        ``events``: where streams and events come from; ``step``: the call's step; ``event``:
        recorded after the call on ``stream`` (None on the host backend); ``role``: the arena
        role ``result`` views (None: the caller's ``out=``)."""
        self.op = op
        self.micro_batch = step.mb
        self.plan = step.plan
        self.stream = stream
        self._owner = owner
        self._backend = backend
        self._events = events
        self._event = event
        self._result = result
        self._refs = refs
        self._state = _PENDING
        self._arena = step.arena if role is not None else None
        self._role = role
        self._gen = self._arena.generation(role) if self._arena is not None else 0

    @property
    def done(self) -> bool:
        """True once :meth:`wait` was called (the caller's stream is ordered after the call)."""
        return self._state == _WAITED

    def wait(self, stream: Any = None) -> Any:
        """Order ``stream`` after the call and return :attr:`result`.

        Args:
            stream: the stream that will use the result: None (the current CuPy stream), a
                ``cupy.cuda.Stream`` / ``ExternalStream``, a raw ``cudaStream_t`` int or a
                ``torch.cuda.Stream``. Ignored on the host backend.

        Enqueues ``cudaStreamWaitEvent`` on ``stream`` (no host synchronisation: use
        ``DpAttention.wait()`` for a bounded host wait), then drops the references to the inputs.
        Call it exactly once; inside a graph capture it joins the call's stream into the capture.

        Raises:
            InputError: called a second time, ``stream`` is not a stream, or the DpAttention is
                closed.
            CollectiveTimeout: the DpAttention was aborted (a collective failed or timed out).
        """
        if self._state == _WAITED:
            raise InputError(f"{self.op}_async(...).wait() was called twice on micro-batch {self.micro_batch}'s "
                             "handle; call wait() once per handle and keep the result it returned")
        self._owner.check()
        ev = self._event
        if ev is not None:
            s = self._backend.stream(stream, "stream")
            s.wait_event(ev)
            self._events.put(ev)
            self._event = None
        self._refs = None
        self._state = _WAITED
        return self.result

    @property
    def result(self) -> Any:
        """The call's output (what the synchronous call returns), once :meth:`wait` was called.

        Raises:
            InputError: read before ``wait()``; the view was handed out again by a later call of
                the same role on this micro-batch; the DpAttention is closed.
        """
        if self._state != _WAITED:
            raise InputError(f"{self.op}_async(...).result was read before wait(): the {self.op} may still be "
                             f"running on its stream; call h.wait(stream) first (it returns the result)")
        if self._owner.closed:
            raise InputError(f"{self.op}_async(...).result: the DpAttention is closed, its buffers are released")
        arena = self._arena
        if arena is not None and arena.generation(self._role) != self._gen:
            raise InputError(
                f"{self.op}_async(...).result: micro-batch {self.micro_batch}'s '{self._role}' buffer was "
                f"handed to a later call since this handle was issued, so the result is overwritten; read "
                f"(or copy) a result before the next call of the same kind on the same micro-batch")
        return self._result

    def __repr__(self):
        state = "waited" if self._state == _WAITED else "pending"
        return f"AsyncHandle({self.op}, micro_batch={self.micro_batch}, {state})"
