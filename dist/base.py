"""The communicator protocol shared by the MPI host backend and the NCCL backend.

A :class:`Communicator` moves *row buffers*: C-contiguous 2-D arrays ``[rows, width]`` where a row
is one token's hidden state (or one logits row). Every count and offset is in **rows**; the row
width is ``buf.shape[1]`` and the element type is the buffer's dtype or the logical ``dtype`` name
passed explicitly (``"float32", "float16", "bfloat16", "int32", "int64", "uint8"``).

Every method is *collective*: all ranks of the communicator call it in the same order with
compatible arguments. Zero-row calls are legal and are still issued, so every rank runs the same
sequence of collectives whatever its counts.

Every blocking call honours ``timeout_s``. When an operation has not completed by then, the
communicator is marked broken (the NCCL backend also aborts its communicator) and
:class:`~dpgather.core.errors.CollectiveTimeout` is raised naming the operation, the rank and the
timeout. Every later call raises ``CollectiveTimeout`` ("communicator is broken after ...")
immediately, so one lost rank turns into an error on every survivor instead of a hang.

This module also holds the helpers both backends use for that: :func:`poll_until` (deadline
polling with a cheap backoff) and the broken-state bookkeeping on :class:`Communicator`.
"""

import abc
import os
import time

from dpgather.core.errors import CollectiveTimeout

__all__ = ["Communicator", "poll_until", "default_spin", "LOGICAL_DTYPES"]

#: Logical dtype names every backend understands (DESIGN section 4).
LOGICAL_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8")

_monotonic = time.monotonic
_sleep = time.sleep
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))

# Backoff schedule of poll_until. Spinning first keeps the common case (peers already there)
# at a few microseconds; yielding and then sleeping keeps oversubscribed runs (more ranks than
# cores) from starving the very peers they are waiting for.
_SPIN = 32  # ~10 us of Test() calls; more only adds tail latency when a peer is descheduled
_YIELDS = 2000
_SLEEP_MIN_S = 20e-6
_SLEEP_MAX_S = 1e-3

_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
_default_spin = None


def default_spin():
    """Back-to-back polls before yielding: ``_SPIN``, or 0 when this node is oversubscribed.

    With more ranks on the node than usable cores, a spinning rank takes the core the peer it waits
    for needs (measured here: 4 ranks on 2 cores, the record all-gather p50 went from ~100 us
    spinning to ~30 us yielding at once). The node's rank count comes from the launcher's
    environment (Hydra ``MPI_LOCALNRANKS``, Open MPI ``OMPI_COMM_WORLD_LOCAL_SIZE``...), so no
    collective is needed. ``DPGATHER_POLL_SPIN=N`` overrides.
    """
    global _default_spin
    if _default_spin is None:
        env = os.environ.get("DPGATHER_POLL_SPIN")
        if env is not None and env.strip().isdigit():
            _default_spin = int(env)
        else:
            local = 0
            for var in _LOCAL_SIZE_VARS:
                v = os.environ.get(var, "")
                if v.isdigit():
                    local = int(v)
                    break
            try:
                cores = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cores = os.cpu_count() or 1
            _default_spin = 0 if local > cores else _SPIN
    return _default_spin


def poll_until(test, timeout_s, spin=None):
    """Call ``test()`` until it returns true or ``timeout_s`` seconds have passed.

    Backoff: up to ``spin`` back-to-back calls, then calls separated by ``sched_yield()``, then
    calls separated by sleeps growing from 20 us to 1 ms. ``test`` must be cheap and must make
    progress on the operation it tests (``MPI.Request.Test``, ``cupy.cuda.Event.done``...).

    Args:
        test: zero-argument callable returning a truthy value once the operation completed.
        timeout_s: seconds from now; ``None`` or a non-positive value waits forever.
        spin: back-to-back calls before the first yield; default :func:`default_spin`.

    Returns:
        ``True`` if ``test()`` returned true, ``False`` if the deadline passed first (``test`` is
        always called at least once, and once more after the deadline before giving up).
    """
    if test():
        return True
    forever = timeout_s is None or timeout_s <= 0
    deadline = 0.0 if forever else _monotonic() + timeout_s
    for n in range(default_spin() if spin is None else spin):
        if test():
            return True
        if not forever and (n & 31) == 31 and _monotonic() >= deadline:
            return bool(test())
    for n in range(_YIELDS):
        _yield()
        if test():
            return True
        if not forever and (n & 7) == 7 and _monotonic() >= deadline:
            return bool(test())
    nap = _SLEEP_MIN_S
    while True:
        if not forever:
            left = deadline - _monotonic()
            if left <= 0:
                return bool(test())
            _sleep(min(nap, left))
        else:
            _sleep(nap)
        if test():
            return True
        nap = min(nap * 2, _SLEEP_MAX_S)


class Communicator(abc.ABC):
    """A group of ``size`` ranks running collectives on row buffers (see the module docstring).

    Attributes:
        rank: this process's rank in the communicator, ``0 <= rank < size``.
        size: number of ranks.
        timeout_s: seconds any one blocking call may take before it raises
            :class:`~dpgather.core.errors.CollectiveTimeout` and breaks the communicator.

    Buffers: ``send`` is only read, ``recv`` is only written (except the in-place
    ``all_reduce(x, x)``), both are C-contiguous 2-D arrays of the backend's array type with the
    same row width and element size. ``stream`` is the CUDA stream to enqueue on (NCCL backend);
    the host backend accepts and ignores it.
    """

    rank: int
    size: int
    timeout_s: float
    _broken = None  # str: why the communicator refuses further use, or None

    # -- broken-state bookkeeping ------------------------------------------------------------
    @property
    def broken(self):
        """``None`` while usable, else a string saying why the communicator refuses calls."""
        return self._broken

    def _mark_broken(self, reason):
        """Record the first reason the communicator became unusable (later ones are dropped)."""
        if self._broken is None:
            self._broken = reason

    def _check_usable(self, op):
        """Raise ``CollectiveTimeout`` at once when a previous call broke the communicator."""
        if self._broken is not None:
            raise CollectiveTimeout(
                f"{op} on rank {self.rank}/{self.size}: communicator is broken after {self._broken}; "
                "create a new communicator (every rank) to continue"
            )

    def _timed_out(self, op, detail=""):
        """Mark broken and build the ``CollectiveTimeout`` for ``op`` (the caller raises it)."""
        what = f"{op}{' ' + detail if detail else ''}"
        self._mark_broken(f"{what} timed out on rank {self.rank} (timeout_s={self.timeout_s:g})")
        return CollectiveTimeout(
            f"{what} did not complete within timeout_s={self.timeout_s:g} s on rank "
            f"{self.rank}/{self.size}: a peer rank did not enter the same collective (crashed, "
            "stuck, or issued a different sequence); the communicator is now broken"
        )

    # -- the protocol --------------------------------------------------------------------------
    @abc.abstractmethod
    def all_gather(self, send, recv, *, dtype=None, stream=None):
        """Concatenate every rank's ``send`` in rank order into ``recv`` on every rank.

        Args:
            send: ``[m, w]``; the same ``m`` on every rank (may be 0).
            recv: ``[size * m, w]``; rows ``[r*m, (r+1)*m)`` receive rank ``r``'s ``send``.
            dtype: logical dtype name overriding ``send.dtype`` (e.g. ``"bfloat16"`` for 2-byte
                storage).
        """

    @abc.abstractmethod
    def all_gatherv(self, send, recv, counts, *, dtype=None, stream=None):
        """All-gather with a different row count per rank.

        Args:
            send: ``[>= counts[rank], w]``; only ``send[:counts[rank]]`` is sent.
            recv: ``[sum(counts), w]``; rank ``r``'s rows land at ``recv[off[r] : off[r]+counts[r]]``
                where ``off`` is the exclusive prefix sum of ``counts``.
            counts: integer sequence/array of ``size`` non-negative row counts, identical on all
                ranks.
        """

    @abc.abstractmethod
    def all_reduce(self, send, recv, *, dtype=None, stream=None):
        """Element-wise sum over all ranks of ``send`` into ``recv`` (same shape).

        ``send`` may be ``recv`` (in place). The sum uses the dtype's own arithmetic (float16 and
        bfloat16 are added in float32 and rounded back after each pairwise step, as NCCL does).
        """

    @abc.abstractmethod
    def reduce_scatter(self, send, recv, *, dtype=None, stream=None):
        """Sum ``send`` over ranks and give rank ``r`` the ``r``-th block of ``m`` rows.

        Args:
            send: ``[size * m, w]``.
            recv: ``[m, w]``: ``recv = sum over ranks t of send_t[rank*m : (rank+1)*m]``.
        """

    @abc.abstractmethod
    def reduce_scatterv(self, send, recv, counts, *, dtype=None, stream=None):
        """Reduce-scatter with a different block size per rank.

        Args:
            send: ``[sum(counts), w]``.
            recv: ``[>= counts[rank], w]``; ``recv[:counts[rank]]`` receives the sum over ranks of
                ``send[off[rank] : off[rank] + counts[rank]]``; rows past ``counts[rank]`` are not
                written.
            counts: ``size`` non-negative row counts, identical on all ranks.
        """

    @abc.abstractmethod
    def allgather_record(self, record, table):
        """The per-step sync: gather every rank's int32 record into ``table`` (host memory).

        Args:
            record: host int32 ``[W]``.
            table: host int32 ``[size, W]``; row ``r`` receives rank ``r``'s record.
        """

    @abc.abstractmethod
    def split(self, color, key):
        """Split into sub-communicators of the ranks with equal ``color``, ordered by ``key``.

        Collective over this communicator. Returns a new communicator of the same backend and
        ``timeout_s`` that the caller owns (``close()`` it).
        """

    @abc.abstractmethod
    def barrier(self):
        """Return once every rank has entered the barrier (bounded by ``timeout_s``)."""

    @abc.abstractmethod
    def abort(self):
        """Make every pending and future call on this rank fail with ``CollectiveTimeout``.

        Local: it never kills the process. Peers still waiting on this rank time out on their own.
        """

    @abc.abstractmethod
    def close(self):
        """Release the backend resources in order. Idempotent; later calls raise."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        state = "ok" if self._broken is None else "broken"
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, timeout_s={self.timeout_s:g}, {state})"
