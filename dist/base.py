"""The communicator protocol shared by the MPI host backend and the NCCL backend.

A :class:`Communicator` moves *row buffers*: C-contiguous 2-D arrays ``[rows, width]`` where a row
is one token's hidden state (or one logits row). Every count and offset is in **rows**; the row
width is ``buf.shape[1]`` and the element type is the buffer's dtype or the logical ``dtype`` name
passed explicitly (``dpgather.core.dtypes``: ``"float32", "float16", "bfloat16", "int32",
"int64", "uint8"``).

Two layers, one per audience:

- the **checked methods** of :class:`Communicator` (``all_gather``, ``all_gatherv``,
  ``all_reduce``, ``reduce_scatter``, ``reduce_scatterv``): every argument is validated here,
  once, in this base class (shapes, counts, row bytes, dtypes, aliasing) and a bad one raises
  :class:`~dpgather.core.errors.InputError` before anything is issued;
- the **trusted primitives** ``comm.ops`` (:class:`Ops`): the same five operations with arguments
  already known to be valid (logical dtype name, counts and exclusive offsets as tuples of ints).
  The data plane validates once at the public API of ``DpAttention`` and calls these.

Every method is *collective*: all ranks of the communicator call it in the same order with
compatible arguments. Zero-row calls are legal and are still issued, so every rank runs the same
sequence of collectives whatever its counts.

Completion and time limits: the host backend completes each call before returning, polling the
MPI request against ``timeout_s``; the NCCL backend enqueues on a CUDA stream and returns, and
:meth:`Communicator.wait` polls completion against ``timeout_s``. When an operation has not
completed by then, the communicator is marked broken (NCCL: aborted) and
:class:`~dpgather.core.errors.CollectiveTimeout` is raised naming the operation, the rank and the
timeout; every later call raises ``CollectiveTimeout`` ("communicator is broken after ...")
immediately, so one lost rank turns into an error on every survivor instead of a hang.
"""

import abc
import math
import numbers
import os
import time

import numpy as np

from dpgather.core.dtypes import DTYPES, holds, logical_of_host, normalize_dtype
from dpgather.core.errors import BackendUnavailable, CollectiveTimeout, ConfigError, InputError

__all__ = [
    "Communicator", "Ops", "bounded_wait", "poll_until", "default_spin", "parse_timeout", "check_counts",
    "check_split_args", "exclusive_offsets", "load_mpi", "Closing", "intracomm", "teardown_limit", "SPIN_MAX",
]

_monotonic = time.monotonic
_sleep = time.sleep
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))

# Back-off of poll_until. Spinning first keeps the common case (peers already there) at a few
# microseconds; then calls separated by sched_yield(), which returns at once on an idle core and
# hands the core to a peer on an oversubscribed one; only a long wait sleeps, and never longer
# than _SLEEP_MAX_S, because MPI progresses a transfer only inside Test(): a 1 ms sleep made a
# 488 MiB uneven all-gatherv take 37 s where a plain Wait() takes 0.9 s.
_SPIN = 32
#: The largest spin count ``DPGATHER_POLL_SPIN`` may set; larger values are clamped to it. Spins
#: beyond a few thousand only burn the core (a test() call costs 0.1-2 us).
SPIN_MAX = 65536
_SPIN_CHECK = 63  # the spin loop reads the clock every 64 calls: the deadline holds for any spin
_YIELD_S = 0.05  # seconds of yield-polling before the first sleep
_SLEEP_MIN_S = 20e-6
_SLEEP_MAX_S = 200e-6
# Bound of a teardown wait (a stream drained before freeing, an NCCL destroy) when timeout_s is
# "no limit": teardown must end even then.
_TEARDOWN_DEFAULT_S = 60.0

_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
_default_spin = None
_MPI = None  # the mpi4py.MPI module once imported


def load_mpi():
    """``mpi4py.MPI``, or raise :class:`BackendUnavailable` with the install command.

    The one MPI loader of dpgather: the host communicator, the NCCL bootstrap, the P2P
    construction, the sync and the facade import mpi4py through it (importing it initialises MPI).
    """
    global _MPI
    if _MPI is not None:
        return _MPI
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:
        raise BackendUnavailable(
            "dpgather needs mpi4py and an MPI library: "
            '`pip install "mpi4py>=4" mpich` (or `pip install "dpgather[host]"`); '
            f"importing it failed with: {e}"
        ) from e
    _MPI = MPI
    return MPI


def intracomm(comm, name="comm", error=InputError):
    """``comm`` if it is an mpi4py intra-communicator (not ``COMM_NULL``), else raise ``error``
    naming ``name`` and the value."""
    MPI = load_mpi()
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise error(f"{name} must be an mpi4py intra-communicator such as MPI.COMM_WORLD, got {comm!r}")
    return comm


def default_spin():
    """Back-to-back polls before yielding: ``_SPIN``, or 0 when this node is oversubscribed.

    With more ranks on the node than usable cores, a spinning rank takes the core the peer it waits
    for needs. The node's rank count comes from the launcher's environment (Hydra
    ``MPI_LOCALNRANKS``, Open MPI ``OMPI_COMM_WORLD_LOCAL_SIZE``...), so no collective is needed.
    ``DPGATHER_POLL_SPIN=N`` (a non-negative integer) overrides; values above :data:`SPIN_MAX`
    are clamped to it, anything else is ignored.
    """
    global _default_spin
    if _default_spin is None:
        env = os.environ.get("DPGATHER_POLL_SPIN")
        if env is not None and env.strip().isdigit():
            _default_spin = min(int(env), SPIN_MAX)
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

    Back-off: up to ``spin`` back-to-back calls (the clock is read every 64 of them, so the
    deadline holds whatever the spin count), then calls separated by ``sched_yield()`` for
    50 ms, then calls separated by sleeps growing from 20 us to 200 us. ``test`` must be cheap and
    must make progress on the operation it tests (``MPI.Request.Test``, ``cupy.cuda.Event.done``).

    Args:
        test: zero-argument callable returning a truthy value once the operation completed.
        timeout_s: seconds from now, as :func:`parse_timeout` returns them (``math.inf``: no limit).
        spin: back-to-back calls before the first yield; default :func:`default_spin`.

    Returns:
        ``True`` if ``test()`` returned true, ``False`` if the deadline passed first (``test`` is
        always called at least once, and once more after the deadline before giving up).
    """
    if test():
        return True
    start = _monotonic()
    deadline = start + timeout_s
    for n in range(default_spin() if spin is None else spin):
        if test():
            return True
        if (n & _SPIN_CHECK) == _SPIN_CHECK and _monotonic() >= deadline:
            return bool(test())
    yield_until = min(start + _YIELD_S, deadline)
    n = 0
    while True:
        _yield()
        if test():
            return True
        n += 1
        if (n & 15) == 0 and _monotonic() >= yield_until:
            break
    nap = _SLEEP_MIN_S
    while True:
        left = deadline - _monotonic()
        if left <= 0:
            return bool(test())
        _sleep(min(nap, left))
        if test():
            return True
        nap = min(nap * 2, _SLEEP_MAX_S)


def bounded_wait(req, timeout_s, what, orphans, *keep):
    """Poll an MPI request to completion or raise ``CollectiveTimeout`` naming ``what``.

    The one bounded MPI wait of dpgather. On a timeout, or an MPI error raised by ``Test()``
    (e.g. ``MPI_ERR_TRUNCATE`` when the ranks issued different collectives; the exception is
    chained as ``__cause__``), the request and ``keep`` (its buffers) are appended to
    ``orphans``: MPI may still write into them, so they must stay alive.
    """
    try:
        done = req.Test() or poll_until(req.Test, timeout_s)
    except Exception as e:
        if not isinstance(e, load_mpi().Exception):
            raise
        orphans.append((req, keep))
        raise CollectiveTimeout(
            f"{what} failed with an MPI error ({e}): the ranks probably issued different "
            "collectives") from e
    if not done:
        orphans.append((req, keep))
        raise CollectiveTimeout(
            f"{what} did not complete within timeout_s={timeout_s:g} s: a peer rank did not enter "
            "the same call (crashed, stuck, or issued a different sequence)")


def parse_timeout(value, name="timeout_s", error=ConfigError):
    """``value`` as a time limit in seconds: a positive number, or ``inf`` for no limit.

    The one timeout parser of dpgather, with one meaning everywhere: the result is a float
    ``> 0``, ``math.inf`` meaning "wait forever" (what :func:`poll_until` takes).

    Raises:
        error: 0, a negative number, NaN, None, a bool or anything that is not a real number,
            naming ``name`` and the value.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a positive number of seconds (float('inf'): no limit), got {value!r}")
    v = float(value)
    if not v > 0:  # also NaN
        raise error(f"{name} must be a positive number of seconds (float('inf'): no limit), got {value!r}")
    return v


def teardown_limit(timeout_s, slack=0.0):
    """Seconds a teardown wait may take: ``timeout_s + slack``, or 60 s when ``timeout_s`` is inf."""
    return _TEARDOWN_DEFAULT_S if math.isinf(timeout_s) else timeout_s + slack


def check_counts(op, counts, size):
    """``counts`` as a read-only int64 array of ``size`` non-negative row counts, or raise."""
    c = np.asarray(counts)
    if c.shape != (size,) or c.dtype.kind not in "iu":
        raise InputError(f"{op}: counts must be {size} integer row counts (one per rank), got {counts!r}")
    c = c.astype(np.int64)
    if size and c.min() < 0:
        raise InputError(f"{op}: counts must be >= 0, got {c.tolist()}")
    return c


def exclusive_offsets(counts):
    """``(0, c0, c0+c1, ..., sum)`` of a sequence of ints, as a tuple."""
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return tuple(out)


def check_split_args(color, key):
    """Validate :meth:`Communicator.split` arguments; returns ``(color or None, key)`` as ints."""
    for name, v in (("color", color), ("key", key)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise InputError(f"split: {name} must be an int, got {v!r}")
    if color is not None and color < 0:
        raise InputError(f"split: color must be >= 0 or None, got {color}")
    if key is None:
        raise InputError("split: key must be an int, got None")
    return (None if color is None else int(color)), int(key)


class Ops(abc.ABC):
    """The trusted primitives of one communicator (see the module docstring).

    Arguments are never validated here: ``send``/``recv`` are C-contiguous 2-D arrays of the
    backend with equal row bytes, ``logical`` a logical dtype name whose item size matches,
    ``counts`` a tuple of ``size`` non-negative ints, ``offsets`` its exclusive prefix sums
    (``size + 1`` ints), buffers large enough, and send and recv disjoint (except the in-place
    ``all_reduce(x, x)``). Every call is collective, like the checked method of the same name.
    """

    @abc.abstractmethod
    def all_gather(self, send, recv, logical, stream=None):
        """``recv[r*m:(r+1)*m] = send of rank r``; ``m = send.shape[0]``."""

    @abc.abstractmethod
    def all_gatherv(self, send, recv, counts, offsets, logical, stream=None):
        """``recv[offsets[r]:offsets[r+1]] = send[:counts[r]] of rank r``."""

    @abc.abstractmethod
    def all_reduce(self, send, recv, logical, stream=None):
        """``recv = sum over ranks of send`` (``send`` may be ``recv``)."""

    @abc.abstractmethod
    def reduce_scatter(self, send, recv, logical, stream=None):
        """``recv = sum over ranks t of send_t[rank*m:(rank+1)*m]``; ``m = recv.shape[0]``."""

    @abc.abstractmethod
    def reduce_scatterv(self, send, recv, counts, offsets, logical, stream=None):
        """``recv[:counts[rank]] = sum over ranks t of send_t[offsets[rank]:offsets[rank+1]]``."""


class Closing:
    """``with obj:`` closes ``obj`` on the way out (communicators, transports: ``close()`` is
    local and idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Communicator(Closing, abc.ABC):
    """A group of ``size`` ranks running collectives on row buffers (see the module docstring).

    Attributes:
        rank: this process's rank in the communicator, ``0 <= rank < size``.
        size: number of ranks.
        timeout_s: seconds any one blocking call may take before it raises
            :class:`~dpgather.core.errors.CollectiveTimeout` and breaks the communicator
            (``math.inf``: no limit; :func:`parse_timeout`).
        ops: the trusted primitives (:class:`Ops`).

    Buffers: ``send`` is only read, ``recv`` is only written (except the in-place
    ``all_reduce(x, x)``), both are C-contiguous 2-D arrays of the backend's array type with the
    same row size in bytes. ``stream`` is the CUDA stream to enqueue on (NCCL backend); the host
    backend accepts and ignores it.

    Subclasses provide :attr:`ops`, the array check :meth:`_buffer`, :meth:`_overlap`, and the
    non-data methods (``split``, ``barrier``, ``wait``, ``abort``, ``close``).
    """

    rank: int
    size: int
    timeout_s: float
    ops: Ops
    _broken = None  # str: why the communicator refuses further use, or None

    # -- broken-state bookkeeping ------------------------------------------------------------
    @property
    def broken(self):
        """``None`` while usable, else a string saying why the communicator refuses calls."""
        return self._broken

    @property
    def abandoned(self):
        """True when a timeout left requests pending on this communicator's MPI communicator
        (nothing that shares it may be freed then: MPI may still use it)."""
        return bool(getattr(self, "_orphans", ()))

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

    def _timed_out(self, op, detail="", cause=None):
        """Mark broken and build the ``CollectiveTimeout`` for ``op`` (the caller raises it).

        ``cause``: the MPI error that ended the wait (a :func:`bounded_wait` exception's
        ``__cause__``), or None for a timeout.
        """
        what = f"{op}{' ' + detail if detail else ''}"
        if cause is not None:
            self._mark_broken(f"{what} failed on rank {self.rank} with an MPI error ({cause})")
            return CollectiveTimeout(
                f"{what} failed on rank {self.rank}/{self.size} with an MPI error: {cause}; the ranks "
                "probably issued different collectives. The communicator is now broken")
        self._mark_broken(f"{what} timed out on rank {self.rank} (timeout_s={self.timeout_s:g})")
        return CollectiveTimeout(
            f"{what} did not complete within timeout_s={self.timeout_s:g} s on rank "
            f"{self.rank}/{self.size}: a peer rank did not enter the same collective (crashed, "
            "stuck, or issued a different sequence); the communicator is now broken"
        )

    # -- argument checks shared by both backends -----------------------------------------------
    @abc.abstractmethod
    def _buffer(self, op, name, arr, writable=False, row_bytes=None):
        """``arr`` as a C-contiguous 2-D array of this backend (no copy; of ``row_bytes`` bytes per
        row when given), or raise InputError (:func:`dpgather.core.rows.check_rows`)."""

    @abc.abstractmethod
    def _overlap(self, a, b):
        """True when the two arrays share memory."""

    def _pair(self, op, send, recv):
        send = self._buffer(op, "send", send)
        recv = self._buffer(op, "recv", recv, writable=True, row_bytes=send.shape[1] * send.dtype.itemsize)
        return send, recv

    def _disjoint(self, op, send, recv):
        if send is not recv and send.size and recv.size and self._overlap(send, recv):
            raise InputError(
                f"{op}: send and recv must not overlap (got shapes {send.shape} and {recv.shape} "
                "sharing memory); pass the same array for an in-place all_reduce")

    @staticmethod
    def _move_dtype(op, dtype, send):
        """Logical dtype of a data move (checked against the item size only)."""
        if dtype is None:
            return logical_of_host(send.dtype) or "uint8"
        logical = normalize_dtype(dtype, f"{op}: dtype")
        if send.dtype.itemsize != DTYPES[logical].itemsize:
            raise InputError(
                f"{op}: dtype={logical!r} has {DTYPES[logical].itemsize}-byte items, the arrays "
                f"have dtype {send.dtype}")
        return logical

    @staticmethod
    def _sum_dtype(op, dtype, send, recv):
        """Logical dtype of a reduction: the arrays' own, or ``dtype`` for 2-byte float storage."""
        if send.dtype != recv.dtype:
            raise InputError(f"{op}: send dtype {send.dtype} differs from recv dtype {recv.dtype}")
        stored = logical_of_host(send.dtype)
        if dtype is None:
            if stored is None:
                raise InputError(
                    f"{op}: cannot sum dtype {send.dtype} without a logical dtype; pass "
                    "dtype='bfloat16' (or 'float16') for 2-byte float storage")
            return stored
        logical = normalize_dtype(dtype, f"{op}: dtype")
        if not holds(send.dtype, logical):
            raise InputError(
                f"{op}: dtype={logical!r} does not describe arrays of dtype {send.dtype}; "
                "bfloat16 and float16 may be stored as uint16/int16, other dtypes must match")
        return logical

    # -- the checked protocol --------------------------------------------------------------------
    def all_gather(self, send, recv, *, dtype=None, stream=None):
        """Concatenate every rank's ``send`` in rank order into ``recv`` on every rank.

        Args:
            send: ``[m, w]``; the same ``m`` on every rank (may be 0).
            recv: ``[size * m, w]``; rows ``[r*m, (r+1)*m)`` receive rank ``r``'s ``send``.
            dtype: logical dtype name (data moves as bytes; only the item size is checked).
        """
        op = "all_gather"
        self._check_usable(op)
        send, recv = self._pair(op, send, recv)
        if recv.shape[0] != self.size * send.shape[0]:
            raise InputError(f"{op}: recv must have size*m = {self.size}*{send.shape[0]} rows, got "
                             f"shape {recv.shape}")
        self._disjoint(op, send, recv)
        self.ops.all_gather(send, recv, self._move_dtype(op, dtype, send), stream)

    def all_gatherv(self, send, recv, counts, *, dtype=None, stream=None):
        """All-gather with a different row count per rank.

        Args:
            send: ``[>= counts[rank], w]``; only ``send[:counts[rank]]`` is sent.
            recv: ``[>= sum(counts), w]``; rank ``r``'s rows land at ``recv[off[r] : off[r]+counts[r]]``
                where ``off`` is the exclusive prefix sum of ``counts``; later rows are not written.
            counts: ``size`` non-negative row counts, identical on all ranks.
        """
        op = "all_gatherv"
        self._check_usable(op)
        send, recv = self._pair(op, send, recv)
        c = check_counts(op, counts, self.size)
        mine = int(c[self.rank])
        if send.shape[0] < mine:
            raise InputError(f"{op}: send must have at least counts[{self.rank}] = {mine} rows, got "
                             f"shape {send.shape}")
        total = int(c.sum())
        if recv.shape[0] < total:
            raise InputError(f"{op}: recv must have sum(counts) = {total} rows, got shape {recv.shape}")
        self._disjoint(op, send, recv)
        ct = tuple(int(x) for x in c)
        self.ops.all_gatherv(send, recv, ct, exclusive_offsets(ct), self._move_dtype(op, dtype, send),
                             stream)

    def all_reduce(self, send, recv, *, dtype=None, stream=None):
        """Element-wise sum over all ranks of ``send`` into ``recv`` (same shape).

        ``send`` may be ``recv`` (in place). The sum uses the dtype's own arithmetic: integers wrap,
        float16 and bfloat16 are added in float32 and rounded back after each pairwise step, as
        NCCL does.
        """
        op = "all_reduce"
        self._check_usable(op)
        same = send is recv
        send, recv = self._pair(op, send, recv)
        if recv.shape != send.shape:
            raise InputError(f"{op}: recv must have the shape of send {send.shape}, got {recv.shape}")
        logical = self._sum_dtype(op, dtype, send, recv)
        if not same:
            self._disjoint(op, send, recv)
        self.ops.all_reduce(recv if same else send, recv, logical, stream)

    def reduce_scatter(self, send, recv, *, dtype=None, stream=None):
        """Sum ``send`` over ranks and give rank ``r`` the ``r``-th block of ``m`` rows.

        Args:
            send: ``[size * m, w]``.
            recv: ``[m, w]``: ``recv = sum over ranks t of send_t[rank*m : (rank+1)*m]``.
        """
        op = "reduce_scatter"
        self._check_usable(op)
        send, recv = self._pair(op, send, recv)
        if send.shape[0] != self.size * recv.shape[0]:
            raise InputError(f"{op}: send must have size*m = {self.size}*{recv.shape[0]} rows for recv "
                             f"shape {recv.shape}, got send shape {send.shape}")
        logical = self._sum_dtype(op, dtype, send, recv)
        self._disjoint(op, send, recv)
        self.ops.reduce_scatter(send, recv, logical, stream)

    def reduce_scatterv(self, send, recv, counts, *, dtype=None, stream=None):
        """Reduce-scatter with a different block size per rank.

        Args:
            send: ``[>= sum(counts), w]``.
            recv: ``[>= counts[rank], w]``; ``recv[:counts[rank]]`` receives the sum over ranks of
                ``send[off[rank] : off[rank] + counts[rank]]``; rows past ``counts[rank]`` are not
                written.
            counts: ``size`` non-negative row counts, identical on all ranks.
        """
        op = "reduce_scatterv"
        self._check_usable(op)
        send, recv = self._pair(op, send, recv)
        c = check_counts(op, counts, self.size)
        total = int(c.sum())
        if send.shape[0] < total:
            raise InputError(f"{op}: send must have sum(counts) = {total} rows, got shape {send.shape}")
        mine = int(c[self.rank])
        if recv.shape[0] < mine:
            raise InputError(f"{op}: recv must have at least counts[{self.rank}] = {mine} rows, got "
                             f"shape {recv.shape}")
        logical = self._sum_dtype(op, dtype, send, recv)
        self._disjoint(op, send, recv)
        ct = tuple(int(x) for x in c)
        self.ops.reduce_scatterv(send, recv, ct, exclusive_offsets(ct), logical, stream)

    # -- the rest of the protocol ----------------------------------------------------------------
    @abc.abstractmethod
    def split(self, color, key):
        """Split into sub-communicators of the ranks with equal ``color``, ordered by ``key``.

        Collective over this communicator and bounded by ``timeout_s``. ``color=None`` opts out
        and gets ``None``. Returns a new communicator of the same backend and ``timeout_s`` that
        the caller owns (``close()`` it).
        """

    @abc.abstractmethod
    def barrier(self):
        """Return once every rank has entered the barrier (bounded by ``timeout_s``)."""

    @abc.abstractmethod
    def wait(self, stream=None):
        """Block until the work issued so far on ``stream`` finished (bounded by ``timeout_s``).

        The host backend completes every call before returning, so this returns at once.
        """

    @abc.abstractmethod
    def abort(self):
        """Make every pending and future call on this rank fail with ``CollectiveTimeout``.

        Local: it never kills the process. Peers still waiting on this rank time out on their own.
        """

    @abc.abstractmethod
    def close(self):
        """Release the backend resources in order. Local and idempotent; later calls raise."""

    def __repr__(self):
        state = "ok" if self._broken is None else "broken"
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, timeout_s={self.timeout_s:g}, {state})"
