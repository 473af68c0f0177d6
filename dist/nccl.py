"""NCCL communicator over CuPy arrays: the CUDA backend of the ``Communicator`` protocol.

:class:`NcclCommunicator` implements the protocol of :mod:`dpgather.dist.base` with one NCCL
communicator per rank (one GPU per MPI process), bootstrapped over mpi4py. Its trusted
primitives (:class:`NcclOps`) call CuPy's own binding, ``cupy.cuda.nccl.NcclCommunicator``,
directly: device pointers, element counts, the NCCL datatype of :data:`dpgather.core.dtypes.DTYPES`.

Streams and completion
    Every collective is *enqueued* on the caller's stream -- the ``stream`` keyword (a
    ``cupy.cuda.Stream``/``ExternalStream`` or a raw ``cudaStream_t`` int), by default the
    current CuPy stream -- and returns immediately: no device->host synchronisation on the
    hot path, so collectives pipeline with the kernels around them and can be captured
    into CUDA graphs. Completion is checked only by :meth:`NcclCommunicator.wait`, which polls
    a CUDA event and NCCL's async error state against ``timeout_s``.

Timeouts and failure
    A blocking operation (``wait``, ``barrier``, ``split``, the construction handshake) that does
    not finish within ``timeout_s`` aborts the communicator (``ncclCommAbort``) and raises
    :class:`~dpgather.core.errors.CollectiveTimeout` naming the operation. An NCCL error (failed
    call or asynchronous error such as a lost peer) does the same. From then on every call raises
    ``CollectiveTimeout("... communicator is broken")`` immediately.

Variable-count collectives
    NCCL has no v-collectives. ``all_gatherv`` is one NCCL group of ``ncclBroadcast`` calls
    (root ``r`` sends its ``counts[r]`` rows into its slot of ``recv``), ``reduce_scatterv``
    one group of ``ncclReduce`` calls (root ``r`` receives the sum of its slot). Roots with
    zero rows are skipped; ``counts`` is identical on every rank, so every rank skips the
    same ones and the groups match.

Teardown
    :meth:`NcclCommunicator.close` is local: it destroys sub-communicators first, then this one
    (``ncclCommDestroy`` after a bounded wait for pending work when healthy, ``ncclCommAbort``
    otherwise), then frees the MPI communicator. Destroy and abort run in a helper thread joined
    with a time limit, so teardown never hangs; live communicators are closed by an ``atexit``
    hook (registered after mpi4py's, so it runs before ``MPI_Finalize``) that only aborts.
    CUDA graphs that captured NCCL calls hold references on the NCCL communicator:
    destroy them *before* closing (a process that still holds such a graph hangs at exit).

Not thread-safe: use one communicator from one thread at a time.

.. seealso:: https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/groups.html
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import threading
import warnings

import numpy

from dpgather.core.dtypes import DTYPES
from dpgather.core.errors import BackendUnavailable, CollectiveTimeout, ConfigError, InputError
from dpgather.core.rows import check_rows
from dpgather.kernels._cuda import load_cupy

from .base import Communicator, Ops, bounded_wait, check_split_args, load_mpi, parse_timeout, poll_until, teardown_limit

__all__ = ["NcclCommunicator", "NcclOps", "nccl_available", "nccl_version"]

# Bound on one NCCL teardown call at exit.
_EXIT_LIMIT_S = 5.0
# ncclCommSplit exists from NCCL 2.18.1 (version encoding major*10000 + minor*100 + patch).
_COMM_SPLIT_VERSION = 21801
_NCCL_SUM = 0  # ncclSum, fixed by the NCCL ABI (ncclRedOp_t)

_registry: dict[int, "NcclCommunicator"] = {}
_atexit_registered = False
_exiting = False


@functools.cache
def _binding():
    """``cupy.cuda.nccl``, or ``None`` when CuPy, a GPU or libnccl is missing."""
    try:
        load_cupy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cupy.cuda.nccl warns when libnccl cannot be loaded
            from cupy.cuda import nccl
    except Exception:
        return None
    if not getattr(nccl, "available", False) or not hasattr(nccl, "NcclCommunicator"):
        return None
    return nccl


def nccl_available() -> bool:
    """True iff CuPy imports, a GPU is visible and CuPy's NCCL binding loaded libnccl."""
    return _binding() is not None


def _nccl():
    if not nccl_available():
        raise BackendUnavailable(
            "NCCL is not usable here: the CUDA backend needs CuPy with its NCCL binding and a "
            "visible GPU: `pip install cupy-cuda12x` (CUDA 12) or `pip install cupy-cuda13x` "
            "(CUDA 13), and NCCL (`pip install nvidia-nccl-cu12`)")
    return _binding()


def nccl_version() -> int:
    """Runtime NCCL version as ``major*10000 + minor*100 + patch`` (2.28.9 -> 22809)."""
    return int(_nccl().get_version())


def _unique_id_forms(uid):
    """The unique id in both CuPy generations' constructor forms (14+: bytes; older: tuple)."""
    if isinstance(uid, (bytes, bytearray)):
        return bytes(uid), tuple(b - 256 if b > 127 else b for b in uid)
    return tuple(uid), bytes(b & 0xFF for b in uid)


def _init_rank(nranks, uid, rank):
    """``ncclCommInitRank`` on the current device; blocks until all ``nranks`` joined."""
    ctor = _nccl().NcclCommunicator
    forms = _unique_id_forms(uid)
    try:
        return ctor(int(nranks), forms[0], int(rank))
    except TypeError:  # the other CuPy generation's commId type
        return ctor(int(nranks), forms[1], int(rank))


def _stream_ptr(stream):
    """``(ptr, stream object or None)`` for a ``stream`` argument (None: the current stream)."""
    if stream is None:
        s = load_cupy().cuda.get_current_stream()
        return s.ptr, s
    if isinstance(stream, int):
        return stream, None
    return int(stream.ptr), stream


class NcclOps(Ops):
    """Trusted NCCL primitives of one :class:`NcclCommunicator` (see
    :class:`~dpgather.dist.base.Ops`): each call enqueues on the stream and returns."""

    def __init__(self, owner, comm):
        nccl = _nccl()
        self._owner = owner
        self._comm = comm
        self._rank = owner.rank
        self._size = owner.size
        self._u8 = nccl.NCCL_UINT8
        self._types = {name: int(getattr(nccl, d.nccl)) for name, d in DTYPES.items()}
        self._group_start = nccl.groupStart
        self._group_end = nccl.groupEnd
        self._error = nccl.NcclError

    def _issued(self, op, ptr, obj):
        owner = self._owner
        owner._last_op = op
        if ptr not in owner._pending:
            owner._pending[ptr] = obj

    def _failed(self, op, exc):
        if isinstance(exc, self._error):
            self._owner._nccl_failed(op, exc)
        raise exc

    def all_gather(self, send, recv, logical, stream=None):
        ptr, obj = _stream_ptr(stream)
        try:
            self._comm.allGather(send.data.ptr, recv.data.ptr, send.nbytes, self._u8, ptr)
        except Exception as e:
            self._failed("all_gather", e)
        self._issued("all_gather", ptr, obj)

    def all_gatherv(self, send, recv, counts, offsets, logical, stream=None):
        ptr, obj = _stream_ptr(stream)
        rb = send.shape[1] * send.dtype.itemsize
        base, me, comm, u8 = recv.data.ptr, self._rank, self._comm, self._u8
        try:
            self._group_start()
            try:
                for r in range(self._size):
                    c = counts[r]
                    if c:
                        dst = base + offsets[r] * rb
                        comm.broadcast(send.data.ptr if r == me else dst, dst, c * rb, u8, r, ptr)
            finally:
                self._group_end()
        except Exception as e:
            self._failed("all_gatherv", e)
        self._issued("all_gatherv", ptr, obj)

    def all_reduce(self, send, recv, logical, stream=None):
        self._sum("all_reduce", self._comm.allReduce, send, recv, logical, stream)

    def reduce_scatter(self, send, recv, logical, stream=None):
        self._sum("reduce_scatter", self._comm.reduceScatter, send, recv, logical, stream)

    def _sum(self, op, fn, send, recv, logical, stream):
        """One NCCL sum of ``recv.size`` elements (``ncclAllReduce`` / ``ncclReduceScatter``)."""
        ptr, obj = _stream_ptr(stream)
        try:
            fn(send.data.ptr, recv.data.ptr, recv.size, self._types[logical], _NCCL_SUM, ptr)
        except Exception as e:
            self._failed(op, e)
        self._issued(op, ptr, obj)

    def reduce_scatterv(self, send, recv, counts, offsets, logical, stream=None):
        ptr, obj = _stream_ptr(stream)
        w = send.shape[1]
        rb = w * send.dtype.itemsize
        base, out, comm, t = send.data.ptr, recv.data.ptr, self._comm, self._types[logical]
        try:
            self._group_start()
            try:
                for r in range(self._size):
                    c = counts[r]
                    if c:
                        comm.reduce(base + offsets[r] * rb, out, c * w, t, _NCCL_SUM, r, ptr)
            finally:
                self._group_end()
        except Exception as e:
            self._failed("reduce_scatterv", e)
        self._issued("reduce_scatterv", ptr, obj)


class NcclCommunicator(Communicator):
    """NCCL communicator over the ranks of an MPI communicator, one GPU per rank.

    Args:
        mpi_comm: mpi4py communicator whose ranks form this communicator (default
            ``MPI.COMM_WORLD``). It is duplicated, so dpgather's host messages never mix
            with the caller's. Construction is collective over it.
        timeout_s: limit in seconds for every blocking operation (see module docstring);
            a positive number, ``float("inf")`` waits forever (teardown calls stay bounded).
        device: CUDA device ordinal for this rank. Default: the node-local rank
            (``Split_type(COMM_TYPE_SHARED)``) modulo the visible device count. The device
            becomes the calling thread's current CuPy device.

    Attributes:
        rank, size: this rank and the number of ranks (same as the MPI communicator's).
        timeout_s: the limit above. device: the CUDA device ordinal in use. ops: :class:`NcclOps`.

    Raises:
        BackendUnavailable: no CuPy/NCCL/GPU, or mpi4py is missing.
        InputError: ``timeout_s`` is not a positive number. ConfigError: ``device`` out of range.
        CollectiveTimeout: the unique-id handshake did not finish within ``timeout_s``.

    ``ncclCommInitRank`` itself blocks until every rank joined; it runs only after the
    bounded handshake proved that every rank is alive and constructing.
    """

    def __init__(self, mpi_comm=None, timeout_s: float = 60.0, device=None):
        _nccl()  # raises BackendUnavailable with the reason
        MPI = load_mpi()
        cupy = load_cupy()
        self._init_state(timeout_s)
        parent = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        mpi = parent.Dup()
        self.rank, self.size = mpi.Get_rank(), mpi.Get_size()
        try:
            dev = self._pick_device(MPI, mpi, device)
            cupy.cuda.Device(dev).use()
            self.device = dev
            self._mpi = mpi
            uid = _nccl().get_unique_id() if mpi.Get_rank() == 0 else None
            uid = self._bcast_unique_id(mpi, uid, "NcclCommunicator init")
            with cupy.cuda.Device(dev):
                comm = self._call("ncclCommInitRank", _init_rank, mpi.Get_size(), uid, mpi.Get_rank())
        except BaseException:
            self._mpi = None
            if not MPI.Is_finalized() and not self._orphans:
                mpi.Free()
            raise
        self._setup(mpi, comm, dev)

    # ------------------------------------------------------------------ construction

    def _init_state(self, timeout_s) -> None:
        self.timeout_s = parse_timeout(timeout_s, error=InputError)
        self._comm = None
        self._mpi = None
        self._broken = None
        self._closed = False
        self._children = []
        self._pending = {}  # stream ptr -> stream object, enqueued since the last wait
        self._orphans = []  # MPI requests abandoned on timeout, with their buffers
        self._last_op = None
        self.rank = 0
        self.size = 1
        self.device = None
        self.ops = None

    def _setup(self, mpi, comm, device) -> None:
        global _atexit_registered
        cupy = load_cupy()
        self._mpi = mpi
        self._comm = comm
        self.device = device
        self.rank = mpi.Get_rank()
        self.size = mpi.Get_size()
        self.ops = NcclOps(self, comm)
        with cupy.cuda.Device(device):
            self._event = cupy.cuda.Event(block=False, disable_timing=True)
        _registry[id(self)] = self
        if not _atexit_registered:
            # After mpi4py's import-time registration: atexit is LIFO, so this runs first.
            atexit.register(_close_all_at_exit)
            _atexit_registered = True

    @classmethod
    def _from_parts(cls, mpi, comm, device, timeout_s):
        self = cls.__new__(cls)
        self._init_state(timeout_s)
        self._setup(mpi, comm, device)
        return self

    @staticmethod
    def _pick_device(MPI, mpi, device) -> int:  # noqa: N803
        count = load_cupy().cuda.runtime.getDeviceCount()
        if device is not None:
            device = int(device)
            if not 0 <= device < count:
                raise ConfigError(f"device: expected 0 <= device < {count}, got {device}")
            return device
        local = mpi.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_rank() % count
        finally:
            local.Free()

    def _bcast_unique_id(self, mpi, uid, op):
        # int16 carries a char of either signedness exactly.
        buf = numpy.zeros(128, dtype=numpy.int16)
        if uid is not None:
            if isinstance(uid, (bytes, bytearray)):
                buf[:] = numpy.frombuffer(bytes(uid), dtype=numpy.uint8)
            else:
                buf[:] = uid
        self._mpi_wait(mpi.Ibcast(buf, root=0), op, buf)
        return bytes(int(x) & 0xFF for x in buf)

    # ------------------------------------------------------------------ checks and failures

    def _check_usable(self, op: str) -> None:
        super()._check_usable(op)
        if self._comm is None:
            raise BackendUnavailable(f"{op}: this NcclCommunicator is closed")

    def _buffer(self, op, name, arr, writable=False, row_bytes=None):
        cupy = load_cupy()
        if not isinstance(arr, cupy.ndarray):
            if not hasattr(arr, "__cuda_array_interface__"):
                raise InputError(f"{op}: {name} must be a CuPy array (or expose __cuda_array_interface__), "
                                 f"got {type(arr).__name__}")
            arr = cupy.asarray(arr)
        check_rows(arr, name, op=op, row_bytes=row_bytes)
        if arr.data.device_id != self.device:
            raise InputError(f"{op}: {name} is on device {arr.data.device_id}, the communicator on {self.device}")
        return arr

    def _overlap(self, a, b):
        pa, pb = a.data.ptr, b.data.ptr
        return pa < pb + b.nbytes and pb < pa + a.nbytes

    def _timeout(self, op: str, detail: str = "", cause=None):
        """Mark broken, abort NCCL, raise ``CollectiveTimeout`` for ``op``."""
        err = self._timed_out(op, detail, cause)
        self._abort_nccl()
        raise err

    def _nccl_failed(self, op: str, exc):
        self._mark_broken(f"{op} failed on rank {self.rank} with an NCCL error ({exc})")
        self._abort_nccl()
        raise CollectiveTimeout(
            f"{op} failed on rank {self.rank}/{self.size} (device {self.device}) with an NCCL "
            f"error: {exc}; the NCCL communicator was aborted and is now broken"
        ) from exc

    def _call(self, op, fn, *args):
        """Run one NCCL call; an NCCL error aborts and breaks the communicator."""
        try:
            return fn(*args)
        except Exception as exc:
            if isinstance(exc, _nccl().NcclError):
                self._nccl_failed(op, exc)
            raise

    def check_async_error(self, op="async error check") -> None:
        """Raise ``CollectiveTimeout`` (and abort) if NCCL reported an asynchronous error."""
        comm = self._comm
        if comm is not None:
            self._call(op, comm.check_async_error)

    def _mpi_wait(self, req, op: str, *keep) -> None:
        """Wait for an MPI request (bounded); a timeout or MPI error aborts and breaks."""
        try:
            bounded_wait(req, self.timeout_s, op, self._orphans, *keep)
        except CollectiveTimeout as e:
            self._timeout(op, "(host exchange over MPI)", cause=e.__cause__)

    # ------------------------------------------------------------------ completion

    def wait(self, stream=None) -> None:
        """Block until the work enqueued so far on ``stream`` has finished, within ``timeout_s``.

        Records an event on ``stream`` (default: current CuPy stream) and polls it together
        with NCCL's async error state. On timeout or NCCL error the communicator is aborted
        and :class:`CollectiveTimeout` raised. Returns at once while ``stream`` is capturing
        a CUDA graph (nothing has run yet).
        """
        op = f"wait ({self._last_op or 'no collective'})"
        self._check_usable(op)
        ptr, obj = _stream_ptr(stream)
        self._wait_stream(op, ptr, obj)

    def _wait_stream(self, op, ptr, obj) -> None:
        s = obj if obj is not None else load_cupy().cuda.ExternalStream(ptr, self.device)
        if s.is_capturing():
            return
        self._event.record(s)
        event = self._event

        def finished():
            self.check_async_error(op)  # raises (and aborts) on an NCCL async error
            return event.done

        if not poll_until(finished, self.timeout_s):
            self._timeout(op)
        self.check_async_error(op)
        self._pending.pop(ptr, None)

    def _drain(self, op) -> None:
        """Wait (bounded) for every stream this communicator enqueued on since its last wait."""
        for ptr, obj in list(self._pending.items()):
            self._wait_stream(op, ptr, obj)

    # ------------------------------------------------------------------ host-side ops

    def barrier(self) -> None:
        """Host barrier over MPI (``MPI_Ibarrier`` polled against ``timeout_s``); no GPU sync."""
        op = "barrier"
        self._check_usable(op)
        self._mpi_wait(self._mpi.Ibarrier(), op)

    def split(self, color, key):
        """Split into disjoint sub-communicators (collective over this communicator).

        Ranks with the same ``color`` (``int >= 0``; ``None`` opts out and gets ``None``)
        form one sub-communicator, ranked by ``key`` then by rank here (MPI and NCCL
        order). Used for the attn_tp group: ``split(rank // A, rank % A)``. A bounded
        exchange of (color, key) runs first, so a missing rank gives ``CollectiveTimeout``
        instead of a hang. Uses ``ncclCommSplit`` when every rank's NCCL has it (2.18.1+),
        else a fresh ``ncclCommInitRank`` bootstrapped over ``MPI_Comm_split``. Work
        enqueued on this communicator is waited for first (NCCL requires it). The
        sub-communicator shares ``device`` and ``timeout_s`` and is closed with (before)
        this one, or earlier by its own ``close()``.
        """
        op = "split"
        self._check_usable(op)
        MPI = load_mpi()
        color, key = check_split_args(color, key)
        nccl = _nccl()
        has_split = hasattr(nccl.NcclCommunicator, "commSplit") and nccl_version() >= _COMM_SPLIT_VERSION
        mine = numpy.array([-1 if color is None else color, key, int(has_split)], dtype=numpy.int64)
        table = numpy.empty((self.size, 3), dtype=numpy.int64)
        self._mpi_wait(self._mpi.Iallgather([mine, MPI.INT64_T], [table, MPI.INT64_T]), op, mine, table)
        use_nccl_split = bool(table[:, 2].all())
        self._drain(op)
        sub_mpi = self._mpi.Split(MPI.UNDEFINED if color is None else color, key)
        try:
            if use_nccl_split:
                # NCCL_SPLIT_NOCOLOR (-1) opts out, as MPI.UNDEFINED does above.
                sub = self._call(op, self._comm.commSplit, -1 if color is None else color, key)
            elif sub_mpi == MPI.COMM_NULL:
                sub = None
            else:
                uid = nccl.get_unique_id() if sub_mpi.Get_rank() == 0 else None
                uid = self._bcast_unique_id(sub_mpi, uid, op)
                with load_cupy().cuda.Device(self.device):
                    sub = self._call(op, _init_rank, sub_mpi.Get_size(), uid, sub_mpi.Get_rank())
            if (sub is None) != (sub_mpi == MPI.COMM_NULL) or (
                    sub is not None and sub.rank_id() != sub_mpi.Get_rank()):
                raise ConfigError(
                    f"split: NCCL and MPI disagree on rank {self.rank}'s sub-rank "
                    f"({None if sub is None else sub.rank_id()} vs "
                    f"{None if sub_mpi == MPI.COMM_NULL else sub_mpi.Get_rank()})")
        except BaseException:
            if sub_mpi != MPI.COMM_NULL:
                sub_mpi.Free()
            raise
        if sub is None:
            return None
        child = NcclCommunicator._from_parts(sub_mpi, sub, self.device, self.timeout_s)
        self._children.append(child)
        return child

    # ------------------------------------------------------------------ teardown

    def abort(self) -> None:
        """Abort the NCCL communicator (and its sub-communicators); later calls raise.

        ``ncclCommAbort`` stops this rank's pending NCCL kernels and frees the
        communicator without waiting for the peers (local: it never kills the process);
        bounded by ``timeout_s``. Peers still waiting on this rank time out on their own.
        """
        self._mark_broken("abort() was called")
        self._abort_nccl()

    def _abort_nccl(self) -> None:
        for child in self._children:
            child._mark_broken(f"the parent communicator broke ({self._broken})")
            child._abort_nccl()
        comm, self._comm = self._comm, None
        self._pending.clear()
        if comm is not None:
            _run_bounded(lambda c: c.abort(), comm, self._teardown_limit(), "ncclCommAbort")

    def _teardown_limit(self) -> float:
        return teardown_limit(self.timeout_s)

    def close(self) -> None:
        """Release the NCCL and MPI resources; local, idempotent; later calls raise.

        Order: sub-communicators, then a bounded wait for work still pending on the
        streams this communicator used, then ``ncclCommDestroy`` (``ncclCommAbort`` if
        broken, if the wait failed, or at interpreter exit), then the MPI communicator.
        Destroy CUDA graphs that captured NCCL calls of this communicator first.
        """
        if self._closed:
            return
        self._closed = True
        for child in reversed(self._children):
            child.close()
        self._children.clear()
        destroy = self._broken is None and not _exiting
        if self._comm is not None and destroy:
            try:
                self._drain("close")
            except Exception:
                destroy = False  # a timeout or NCCL error aborted the communicator already
        comm, self._comm = self._comm, None
        self._pending.clear()
        if comm is not None:
            if destroy:
                _run_bounded(lambda c: c.destroy(), comm, self._teardown_limit(), "ncclCommDestroy")
            else:
                _run_bounded(lambda c: c.abort(), comm, self._teardown_limit(), "ncclCommAbort")
        self._mark_broken("close() was called")
        self._free_mpi()
        _registry.pop(id(self), None)

    def _free_mpi(self) -> None:
        mpi, self._mpi = self._mpi, None
        if mpi is None or self._orphans:
            return  # a timed-out request may still reference the communicator
        try:
            if not load_mpi().Is_finalized():
                mpi.Free()
        except Exception:  # teardown must not raise
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._broken else "ok")
        return (f"NcclCommunicator(rank={self.rank}, size={self.size}, device={self.device}, "
                f"timeout_s={self.timeout_s:g}, {state})")


def _run_bounded(fn, comm, limit_s: float, what: str) -> None:
    """Run ``fn(comm)`` (an NCCL teardown call) in a helper thread for at most ``limit_s``.

    ncclCommDestroy needs the peers, and both destroy and abort wait for CUDA graphs that
    still reference the communicator. A call that does not return in time is abandoned, and
    the CuPy object is leaked on purpose so its finaliser never calls ncclCommDestroy again
    at interpreter exit. When no thread can be started (interpreter shutdown, Python 3.12+)
    the call is skipped the same way: process exit releases the NCCL resources.
    """
    done = threading.Event()
    errors = []

    def target():
        try:
            fn(comm)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    if _exiting:
        limit_s = min(limit_s, _EXIT_LIMIT_S)
    try:
        threading.Thread(target=target, name=f"dpgather-{what}", daemon=True).start()
    except RuntimeError:  # can't create new thread at interpreter shutdown
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(comm))
        return
    if not done.wait(limit_s):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(comm))
        warnings.warn(
            f"dpgather: {what} did not return within {limit_s:g} s and was abandoned "
            "(are CUDA graphs that captured NCCL calls still alive?)",
            RuntimeWarning,
            stacklevel=3,
        )
    elif errors:
        warnings.warn(f"dpgather: {what} failed: {errors[0]!r}", RuntimeWarning, stacklevel=3)


def _close_all_at_exit() -> None:
    global _exiting
    _exiting = True
    for comm in list(_registry.values()):
        try:
            comm.close()
        except Exception:
            pass
