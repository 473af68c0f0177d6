"""NCCL communicator over CuPy arrays: the CUDA backend of the ``Communicator`` protocol.

:class:`NcclCommunicator` implements the protocol of docs/internals.md ("Communicators")
with one NCCL communicator per rank (one GPU per MPI process), bootstrapped over mpi4py.

Streams and completion
    Every collective is *enqueued* on the caller's stream -- the ``stream`` keyword (a
    ``cupy.cuda.Stream``/``ExternalStream`` or a raw ``cudaStream_t`` int), by default the
    current CuPy stream -- and returns immediately: no device->host synchronisation on the
    hot path, so collectives pipeline with the kernels around them and can be captured
    into CUDA graphs. Work that follows on the same stream sees the result; other streams
    must wait on an event. Completion is checked only by :meth:`NcclCommunicator.wait`
    (or ``sync=True`` on a call), which polls a CUDA event and NCCL's async error state
    against ``timeout_s``.

Timeouts and failure
    A blocking operation (``wait``/``sync=True``, ``allgather_record``, ``barrier``,
    ``split``, the construction handshake) that does not finish within ``timeout_s``
    aborts the communicator (``ncclCommAbort``) and raises
    :class:`~dpgather.core.errors.CollectiveTimeout` naming the operation. An NCCL error
    (failed call or asynchronous error such as a lost peer) does the same. From then on
    every call raises ``CollectiveTimeout("... communicator is broken")`` immediately.

Variable-count collectives
    NCCL has no v-collectives. ``all_gatherv`` is one NCCL group of ``ncclBroadcast`` calls
    (root ``r`` sends its ``counts[r]`` rows into its slot of ``recv``), ``reduce_scatterv``
    one group of ``ncclReduce`` calls (root ``r`` receives the sum of its slot). Roots with
    zero rows are skipped; ``counts`` is identical on every rank, so every rank skips the
    same ones and the groups match.

Teardown
    :meth:`NcclCommunicator.close` destroys sub-communicators first, then this one, then
    frees the MPI communicators. Destroy and abort run in a helper thread joined with a
    time limit, so teardown never hangs; live communicators are closed by an ``atexit``
    hook (registered after mpi4py's, so it runs before ``MPI_Finalize``) that only aborts.
    CUDA graphs that captured NCCL calls hold references on the NCCL communicator:
    destroy them *before* closing (see figures/gpu-probe-notes.md, exit hazard).

Not thread-safe: use one communicator from one thread at a time.

.. seealso:: https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/groups.html
"""

from __future__ import annotations

import atexit
import ctypes
import threading
import warnings

import numpy

from dpgather.core.errors import BackendUnavailable, CollectiveTimeout, ConfigError, InputError

from . import _nccl
from .base import Communicator, poll_until

__all__ = ["NcclCommunicator", "nccl_available"]

# NumPy dtype names whose NCCL reduction arithmetic is the dtype's own.
_NATIVE_REDUCTION = ("float32", "float16", "int32", "int64", "uint8", "int8", "float64")
# Storage dtypes accepted for the 2-byte floating names (CuPy has no bfloat16 dtype).
_STORAGE_2B = ("uint16", "int16")
# Bound on one NCCL teardown call when timeout_s means "wait forever", and at exit.
_TEARDOWN_DEFAULT_S = 60.0
_EXIT_LIMIT_S = 5.0

_registry: dict[int, "NcclCommunicator"] = {}
_atexit_registered = False
_exiting = False


def nccl_available() -> bool:
    """True iff CuPy imports, NCCL is loadable through it, and a GPU is visible."""
    return _nccl.available()


def _cupy():
    import cupy

    return cupy


class NcclCommunicator(Communicator):
    """NCCL communicator over the ranks of an MPI communicator, one GPU per rank.

    Args:
        mpi_comm: mpi4py communicator whose ranks form this communicator (default
            ``MPI.COMM_WORLD``). It is duplicated, so dpgather's host messages never mix
            with the caller's. Construction is collective over it.
        timeout_s: limit in seconds for every blocking operation (see module docstring);
            ``None`` or ``<= 0`` waits forever (teardown calls stay bounded).
        device: CUDA device ordinal for this rank. Default: the node-local rank
            (``Split_type(COMM_TYPE_SHARED)``) modulo the visible device count. The device
            becomes the calling thread's current CuPy device.

    Attributes:
        rank, size: this rank and the number of ranks (same as the MPI communicator's).
        timeout_s: the limit above. device: the CUDA device ordinal in use.

    Raises:
        BackendUnavailable: no CuPy/NCCL/GPU, or mpi4py is missing.
        InputError: ``timeout_s`` is not a number. ConfigError: ``device`` out of range.
        CollectiveTimeout: the unique-id handshake did not finish within ``timeout_s``.

    ``ncclCommInitRank`` itself blocks until every rank joined; it runs only after the
    bounded handshake proved that every rank is alive and constructing.
    """

    def __init__(self, mpi_comm=None, timeout_s: float = 60.0, device=None):
        if not _nccl.available():
            _nccl.lib()  # raises BackendUnavailable with the reason
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise BackendUnavailable(
                f"NcclCommunicator bootstraps over MPI and needs mpi4py ({exc})"
            ) from exc
        cupy = _cupy()
        self._init_state(timeout_s)
        parent = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        mpi = parent.Dup()
        self.rank, self.size = mpi.Get_rank(), mpi.Get_size()
        try:
            dev = self._pick_device(MPI, mpi, device)
            cupy.cuda.Device(dev).use()
            self.device = dev
            self._mpi = mpi
            uid = _nccl.getUniqueId() if mpi.Get_rank() == 0 else None
            uid = self._bcast_unique_id(mpi, uid, "NcclCommunicator init")
            with cupy.cuda.Device(dev):
                comm = self._call("ncclCommInitRank", _nccl.commInitRank, mpi.Get_size(), uid,
                                  mpi.Get_rank())
        except BaseException:
            self._mpi = None
            if not MPI.Is_finalized() and not self._orphans:
                mpi.Free()
            raise
        self._setup(mpi, comm, dev)

    # ------------------------------------------------------------------ construction

    def _init_state(self, timeout_s) -> None:
        try:
            timeout_s = 0.0 if timeout_s is None else float(timeout_s)
        except (TypeError, ValueError):
            raise InputError(
                f"timeout_s must be a number of seconds (or None), got {timeout_s!r}"
            ) from None
        if timeout_s != timeout_s:
            raise InputError("timeout_s must be a number of seconds (or None), got nan")
        self.timeout_s = timeout_s
        self._comm = None
        self._mpi = None
        self._broken = None
        self._closed = False
        self._children = []
        self._host = None  # MpiHostCommunicator over the same MPI comm, for allgather_record
        self._pending = {}  # stream ptr -> stream object, enqueued since the last wait
        self._orphans = []  # MPI requests abandoned on timeout, with their buffers
        self._last_op = None
        self._nccl_error = None
        self.rank = 0
        self.size = 1
        self.device = None

    def _setup(self, mpi, comm, device) -> None:
        global _atexit_registered
        cupy = _cupy()
        self._mpi = mpi
        self._comm = comm
        self.device = device
        self.rank = mpi.Get_rank()
        self.size = mpi.Get_size()
        self._u8 = _nccl.datatype("uint8")
        self._sum = _nccl.NCCL_SUM
        self._nccl_error = _nccl.error_type()
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
        count = _cupy().cuda.runtime.getDeviceCount()
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

    # ------------------------------------------------------------------ helpers

    def _check_usable(self, op: str) -> None:
        super()._check_usable(op)
        if self._comm is None:
            raise BackendUnavailable(f"{op}: this NcclCommunicator is closed")

    def _timeout(self, op: str, detail: str = ""):
        """Mark broken, abort NCCL, raise ``CollectiveTimeout`` for ``op``."""
        err = self._timed_out(op, detail)
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
            if isinstance(exc, self._nccl_error or _nccl.error_type()):
                self._nccl_failed(op, exc)
            raise

    def _check_async(self, op: str) -> None:
        comm = self._comm
        if comm is not None:
            self._call(op, _nccl.commGetAsyncError, comm)

    def _mpi_wait(self, req, op: str, *keep) -> None:
        if not poll_until(req.Test, self.timeout_s):
            # MPI may still write into the buffers: keep them alive with the request.
            self._orphans.append((req, keep))
            self._timeout(op, "(host exchange over MPI)")

    def _stream(self, stream):
        """(ptr, stream object or None) for the ``stream`` argument."""
        if stream is None:
            s = _cupy().cuda.get_current_stream()
            return s.ptr, s
        if isinstance(stream, int):
            return stream, None
        return int(stream.ptr), stream

    def _stream_obj(self, ptr, obj):
        if obj is not None:
            return obj
        return _cupy().cuda.ExternalStream(ptr, self.device)

    def _buf(self, arr, name: str):
        cupy = _cupy()
        if not isinstance(arr, cupy.ndarray):
            if not hasattr(arr, "__cuda_array_interface__"):
                raise InputError(
                    f"{name}: expected a CuPy array (or __cuda_array_interface__), got "
                    f"{type(arr).__name__}"
                )
            arr = cupy.asarray(arr)
        if arr.ndim != 2:
            raise InputError(f"{name}: expected a 2-D [rows, width] array, got shape {arr.shape}")
        if not arr.flags.c_contiguous:
            raise InputError(f"{name}: expected a C-contiguous array, got strides {arr.strides}")
        if arr.data.device_id != self.device:
            raise InputError(
                f"{name}: array is on device {arr.data.device_id}, the communicator on "
                f"{self.device}"
            )
        return arr

    @staticmethod
    def _row_bytes(arr) -> int:
        return arr.shape[1] * arr.itemsize

    def _same_rows(self, op, send, recv) -> int:
        rb = self._row_bytes(send)
        if self._row_bytes(recv) != rb:
            raise InputError(
                f"{op}: send rows are {send.shape[1]} x {send.dtype} = {rb} bytes, recv rows "
                f"{recv.shape[1]} x {recv.dtype} = {self._row_bytes(recv)} bytes; they must match"
            )
        return rb

    def _check_move_dtype(self, dtype, *arrays) -> None:
        if dtype is None:
            return
        size = _nccl.DTYPE_NAMES.get(dtype)
        if size is None:
            raise InputError(
                f"dtype: unknown {dtype!r}; expected one of {sorted(_nccl.DTYPE_NAMES)}"
            )
        for a in arrays:
            if a.itemsize != size:
                raise InputError(
                    f"dtype: {dtype!r} has {size}-byte items, the array has dtype {a.dtype}"
                )

    def _reduction_type(self, op, dtype, send, recv) -> int:
        if send.dtype != recv.dtype:
            raise InputError(f"{op}: send dtype {send.dtype} differs from recv dtype {recv.dtype}")
        stored = send.dtype.name
        name = stored if dtype is None else dtype
        if dtype is None and stored not in _NATIVE_REDUCTION:
            raise InputError(
                f"{op}: cannot sum dtype {stored} without a logical dtype; pass "
                "dtype='bfloat16' (or 'float16') for 2-byte float storage"
            )
        if name not in _nccl.DTYPE_NAMES:
            raise InputError(
                f"dtype: unknown {name!r}; expected one of {sorted(_nccl.DTYPE_NAMES)}"
            )
        ok = stored == name or (name in ("bfloat16", "float16") and stored in _STORAGE_2B)
        if not ok:
            raise InputError(
                f"{op}: dtype={name!r} does not describe arrays of dtype {stored}; bfloat16 "
                "and float16 may be stored as uint16/int16, other dtypes must match"
            )
        return _nccl.datatype(name)

    def _counts(self, op, counts):
        c = numpy.asarray(counts)
        if c.shape != (self.size,) or c.dtype.kind not in "iu":
            raise InputError(
                f"{op}: counts must be {self.size} integers (one per rank), got shape "
                f"{c.shape} dtype {c.dtype}"
            )
        if (c < 0).any():
            raise InputError(f"{op}: counts must be >= 0, got {c.tolist()}")
        c = [int(x) for x in c]
        offsets = [0]
        for x in c:
            offsets.append(offsets[-1] + x)
        return c, offsets

    def _enqueued(self, op, ptr, obj, stream, sync) -> None:
        self._last_op = op
        self._pending[ptr] = obj
        self._check_async(op)
        if sync:
            self.wait(stream)

    # ------------------------------------------------------------------ collectives

    def all_gather(self, send, recv, *, dtype=None, stream=None, sync=False):
        """Enqueue ``recv[r*m:(r+1)*m] = send of rank r`` for every rank (``ncclAllGather``).

        Args:
            send: ``[m, w]`` rows of this rank. recv: ``[size*m, w']`` with the same row
                bytes (in place allowed: ``send`` is ``recv[rank*m:(rank+1)*m]``).
            dtype: optional logical dtype name (checked against the item size; data moves
                as bytes). stream: see module docstring. sync: wait for completion.
        """
        op = "all_gather"
        self._check_usable(op)
        send, recv = self._buf(send, "send"), self._buf(recv, "recv")
        rb = self._same_rows(op, send, recv)
        m = send.shape[0]
        if recv.shape[0] != self.size * m:
            raise InputError(
                f"{op}: recv has {recv.shape[0]} rows, expected size*m = {self.size}*{m}"
            )
        self._check_move_dtype(dtype, send, recv)
        ptr, obj = self._stream(stream)
        self._call(op, _nccl.allGather, self._comm, send.data.ptr, recv.data.ptr, m * rb,
                   self._u8, ptr)
        self._enqueued(op, ptr, obj, stream, sync)

    def all_gatherv(self, send, recv, counts, *, dtype=None, stream=None, sync=False):
        """Enqueue the variable-count all-gather as one group of ``ncclBroadcast`` calls.

        Args:
            send: ``[>= counts[rank], w]``; its first ``counts[rank]`` rows are sent.
            recv: ``[>= sum(counts), w']`` with the same row bytes; rows
                ``[off_r, off_r + counts[r])`` receive rank ``r``'s rows, ``off`` being the
                exclusive prefix sum; rows past ``sum(counts)`` are not touched.
            counts: ``size`` non-negative integers, identical on every rank.
            dtype, stream, sync: as :meth:`all_gather`.
        """
        op = "all_gatherv"
        self._check_usable(op)
        send, recv = self._buf(send, "send"), self._buf(recv, "recv")
        rb = self._same_rows(op, send, recv)
        c, off = self._counts(op, counts)
        if send.shape[0] < c[self.rank]:
            raise InputError(
                f"{op}: send has {send.shape[0]} rows, counts[{self.rank}] = {c[self.rank]}"
            )
        if recv.shape[0] < off[-1]:
            raise InputError(f"{op}: recv has {recv.shape[0]} rows, sum(counts) = {off[-1]}")
        self._check_move_dtype(dtype, send, recv)
        ptr, obj = self._stream(stream)
        base = recv.data.ptr
        calls = []
        for r in range(self.size):
            if c[r] == 0:
                continue
            dst = base + off[r] * rb
            src = send.data.ptr if r == self.rank else dst
            calls.append((self._comm, src, dst, c[r] * rb, self._u8, r, ptr))
        self._group(op, _nccl.broadcast, calls)
        self._enqueued(op, ptr, obj, stream, sync)

    def all_reduce(self, send, recv, *, dtype=None, stream=None, sync=False):
        """Enqueue ``recv = sum over ranks of send`` (``ncclAllReduce``, sum).

        ``send`` and ``recv`` have the same shape and dtype; ``send`` may be ``recv``.
        ``dtype`` is required for 2-byte float storage (``"bfloat16"``/``"float16"``).
        """
        op = "all_reduce"
        self._check_usable(op)
        send, recv = self._buf(send, "send"), self._buf(recv, "recv")
        if send.shape != recv.shape:
            raise InputError(f"{op}: send shape {send.shape} differs from recv shape {recv.shape}")
        nccl_type = self._reduction_type(op, dtype, send, recv)
        ptr, obj = self._stream(stream)
        self._call(op, _nccl.allReduce, self._comm, send.data.ptr, recv.data.ptr, send.size,
                   nccl_type, self._sum, ptr)
        self._enqueued(op, ptr, obj, stream, sync)

    def reduce_scatter(self, send, recv, *, dtype=None, stream=None, sync=False):
        """Enqueue ``recv = sum over ranks of send[rank*m:(rank+1)*m]`` (``ncclReduceScatter``).

        ``send`` is ``[size*m, w]``, ``recv`` ``[m, w]``, same dtype.
        """
        op = "reduce_scatter"
        self._check_usable(op)
        send, recv = self._buf(send, "send"), self._buf(recv, "recv")
        if send.shape[1] != recv.shape[1] or send.shape[0] != self.size * recv.shape[0]:
            raise InputError(
                f"{op}: send shape {send.shape} must be [size*m, w] for recv shape "
                f"{recv.shape} (size {self.size})"
            )
        nccl_type = self._reduction_type(op, dtype, send, recv)
        ptr, obj = self._stream(stream)
        self._call(op, _nccl.reduceScatter, self._comm, send.data.ptr, recv.data.ptr,
                   recv.size, nccl_type, self._sum, ptr)
        self._enqueued(op, ptr, obj, stream, sync)

    def reduce_scatterv(self, send, recv, counts, *, dtype=None, stream=None, sync=False):
        """Enqueue the variable-count reduce-scatter as one group of ``ncclReduce`` calls.

        Args:
            send: ``[>= sum(counts), w]``; rows ``[off_r, off_r + counts[r])`` are summed
                over all ranks into rank ``r``.
            recv: ``[>= counts[rank], w]``, same dtype; its first ``counts[rank]`` rows get
                the sum, the rest are not touched.
            counts, dtype, stream, sync: as :meth:`all_gatherv` / :meth:`all_reduce`.
        """
        op = "reduce_scatterv"
        self._check_usable(op)
        send, recv = self._buf(send, "send"), self._buf(recv, "recv")
        if send.shape[1] != recv.shape[1]:
            raise InputError(f"{op}: send width {send.shape[1]} differs from recv {recv.shape[1]}")
        c, off = self._counts(op, counts)
        if send.shape[0] < off[-1]:
            raise InputError(f"{op}: send has {send.shape[0]} rows, sum(counts) = {off[-1]}")
        if recv.shape[0] < c[self.rank]:
            raise InputError(
                f"{op}: recv has {recv.shape[0]} rows, counts[{self.rank}] = {c[self.rank]}"
            )
        nccl_type = self._reduction_type(op, dtype, send, recv)
        ptr, obj = self._stream(stream)
        rb = self._row_bytes(send)
        w = send.shape[1]
        calls = []
        for r in range(self.size):
            if c[r] == 0:
                continue
            calls.append((self._comm, send.data.ptr + off[r] * rb, recv.data.ptr, c[r] * w,
                          nccl_type, self._sum, r, ptr))
        self._group(op, _nccl.reduce, calls)
        self._enqueued(op, ptr, obj, stream, sync)

    def _group(self, op, fn, calls) -> None:
        # Arguments are validated before groupStart: a Python error inside the group would
        # leave this rank's sequence different from the others'.
        try:
            _nccl.groupStart()
            try:
                for args in calls:
                    fn(*args)
            finally:
                _nccl.groupEnd()
        except Exception as exc:
            if isinstance(exc, self._nccl_error):
                self._nccl_failed(op, exc)
            raise

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
        ptr, obj = self._stream(stream)
        self._wait_stream(op, ptr, obj)

    def _wait_stream(self, op, ptr, obj) -> None:
        s = self._stream_obj(ptr, obj)
        if s.is_capturing():
            return
        self._event.record(s)
        event = self._event

        def finished():
            self._check_async(op)  # raises (and aborts) on an NCCL async error
            return event.done

        if not poll_until(finished, self.timeout_s):
            self._timeout(op)
        self._check_async(op)
        self._pending.pop(ptr, None)

    def _drain(self, op) -> None:
        """Wait (bounded) for every stream this communicator enqueued on since its last wait."""
        for ptr, obj in list(self._pending.items()):
            self._wait_stream(op, ptr, obj)

    # ------------------------------------------------------------------ host-side ops

    def allgather_record(self, record, table=None):
        """Gather one int32 record per rank on the host: ``table[r] = record of rank r``.

        Args:
            record: NumPy int32 ``[W]``. table: NumPy int32 ``[size, W]`` output (allocated
                when ``None``).

        Returns: ``table``. Goes over MPI on host memory (``MPI_Iallgather`` polled against
        ``timeout_s``); it never touches the GPU, so it adds no device synchronisation.
        """
        op = "allgather_record"
        self._check_usable(op)
        rec = numpy.asarray(record)
        if rec.dtype != numpy.int32 or rec.ndim != 1:
            raise InputError(f"{op}: record must be a 1-D int32 array, got {rec.dtype} {rec.shape}")
        rec = numpy.ascontiguousarray(rec)
        if table is None:
            table = numpy.empty((self.size, rec.shape[0]), dtype=numpy.int32)
        if (not isinstance(table, numpy.ndarray) or table.dtype != numpy.int32
                or table.shape != (self.size, rec.shape[0]) or not table.flags.c_contiguous
                or not table.flags.writeable):
            raise InputError(
                f"{op}: table must be a writable C-contiguous int32 array of shape "
                f"{(self.size, rec.shape[0])}, got {getattr(table, 'dtype', type(table))} "
                f"{getattr(table, 'shape', '')}"
            )
        host = self._host
        if host is None:
            from .host import MpiHostCommunicator

            host = self._host = MpiHostCommunicator(self._mpi, timeout_s=self.timeout_s)
        try:
            host.allgather_record(rec, table)  # shared-memory window on one node, else MPI
        except CollectiveTimeout:
            self._orphans.append(host)  # its pending request may still reference the MPI comm
            self._timeout(op)
        return table

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
        from mpi4py import MPI

        for name, v in (("color", color), ("key", key)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, numpy.integer))):
                raise InputError(f"split: {name} must be an int, got {v!r}")
        if color is not None and color < 0:
            raise InputError(f"split: color must be >= 0 or None, got {color}")
        if key is None:
            raise InputError("split: key must be an int, got None")
        mine = numpy.array([-1 if color is None else int(color), int(key),
                            int(_nccl.has_comm_split())], dtype=numpy.int64)
        table = numpy.empty((self.size, 3), dtype=numpy.int64)
        self._mpi_wait(self._mpi.Iallgather([mine, MPI.INT64_T], [table, MPI.INT64_T]), op,
                       mine, table)
        use_nccl_split = bool(table[:, 2].all())
        self._drain(op)
        sub_mpi = self._mpi.Split(MPI.UNDEFINED if color is None else int(color), int(key))
        try:
            if use_nccl_split:
                # NCCL_SPLIT_NOCOLOR (-1) opts out, as MPI.UNDEFINED does above.
                sub = self._call(op, _nccl.commSplit, self._comm,
                                 -1 if color is None else int(color), int(key))
            elif sub_mpi == MPI.COMM_NULL:
                sub = None
            else:
                uid = _nccl.getUniqueId() if sub_mpi.Get_rank() == 0 else None
                uid = self._bcast_unique_id(sub_mpi, uid, op)
                with _cupy().cuda.Device(self.device):
                    sub = self._call(op, _nccl.commInitRank, sub_mpi.Get_size(), uid,
                                     sub_mpi.Get_rank())
            if (sub is None) != (sub_mpi == MPI.COMM_NULL) or (
                    sub is not None and sub.rank_id() != sub_mpi.Get_rank()):
                raise ConfigError(
                    f"split: NCCL and MPI disagree on rank {self.rank}'s sub-rank "
                    f"({None if sub is None else sub.rank_id()} vs "
                    f"{None if sub_mpi == MPI.COMM_NULL else sub_mpi.Get_rank()})"
                )
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
            _run_bounded(_nccl.commAbort, comm, self._teardown_limit(), "ncclCommAbort")

    def _teardown_limit(self) -> float:
        return self.timeout_s if self.timeout_s > 0 else _TEARDOWN_DEFAULT_S

    def close(self) -> None:
        """Release the NCCL and MPI resources; idempotent; later calls raise.

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
                _run_bounded(_nccl.commDestroy, comm, self._teardown_limit(), "ncclCommDestroy")
            else:
                _run_bounded(_nccl.commAbort, comm, self._teardown_limit(), "ncclCommAbort")
        self._mark_broken("close() was called")
        host, self._host = self._host, None
        if host is not None:
            host.close()
        self._free_mpi()
        _registry.pop(id(self), None)

    def _free_mpi(self) -> None:
        mpi, self._mpi = self._mpi, None
        if mpi is None or self._orphans:
            return  # a timed-out request may still reference the communicator
        try:
            from mpi4py import MPI

            if not MPI.Is_finalized():
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
