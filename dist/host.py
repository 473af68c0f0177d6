"""The MPI host backend: :class:`MpiHostCommunicator` over mpi4py on NumPy row buffers.

Every collective uses mpi4py's buffer (capitalised) non-blocking calls with explicit element
counts and MPI datatypes (no pickling), then waits by polling ``Request.Test()`` against a
``time.monotonic()`` deadline (:func:`dpgather.dist.base.poll_until`), so a missing peer gives
``CollectiveTimeout`` instead of a hang.

float16 and bfloat16 have no MPI datatype: they travel as 2-byte words (``MPI.UINT16_T``) and are
reduced by a user-defined commutative ``MPI.Op`` that adds in float32 and rounds back to the dtype
after each pairwise step (NCCL's arithmetic). bfloat16 host arrays are ``ml_dtypes.bfloat16``, or
any 2-byte array with ``dtype="bfloat16"``.

uint8 sums also go through a user-defined op (NumPy's wrapping ``uint8`` add): Open MPI's
vectorised reduction component (``op/avx``, 4.1 and 5.0) *saturates* 8- and 16-bit integer sums
(200 + 100 = 255, open-mpi/ompi#8045, closed "won't fix"), where C, MPICH and NCCL wrap
(200 + 100 = 44). int32, int64 and the floating types use ``MPI.SUM``, which wraps / rounds the
same way in every MPI we test (MPICH 4, Open MPI 4.1 and 5.0).

Importing this module never imports mpi4py; the constructor does (and initialises MPI).
"""

import os

import numpy as np

from dpgather.core.errors import BackendUnavailable, InputError

from .base import Communicator, poll_until

__all__ = ["MpiHostCommunicator", "host_available"]

_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "uint8": 1}
_HALF = ("float16", "bfloat16")
# Logical dtypes summed by our own MPI.Op instead of MPI.SUM (see the module docstring).
_OWN_SUM = _HALF + ("uint8",)

_MPI = None  # the mpi4py.MPI module once imported
_MPI_TYPE = {}  # logical dtype name -> MPI datatype (predefined; never freed)
_NP_LOGICAL = None  # numpy dtype -> logical name
_I32 = np.dtype(np.int32)


def _load_mpi():
    global _MPI, _NP_LOGICAL
    if _MPI is not None:
        return _MPI
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise BackendUnavailable(
            "the MPI host backend needs mpi4py (and an MPI library): "
            '`pip install "mpi4py>=4" mpich` (or `pip install dpgather[host]`); '
            f"importing it failed with: {e}"
        ) from e
    _MPI_TYPE.update(
        float32=MPI.FLOAT, float64=MPI.DOUBLE, int32=MPI.INT32_T, int64=MPI.INT64_T,
        uint8=MPI.UINT8_T, float16=MPI.UINT16_T, bfloat16=MPI.UINT16_T,
    )
    table = {np.dtype(name): name for name in ("float32", "float64", "float16", "int32", "int64", "uint8")}
    try:
        import ml_dtypes

        table[np.dtype(ml_dtypes.bfloat16)] = "bfloat16"
    except ImportError:  # bfloat16 then only as 2-byte storage with dtype="bfloat16"
        pass
    _NP_LOGICAL = table
    _MPI = MPI
    return MPI


_HOST_OK = None


def host_available():
    """True when mpi4py and an MPI library can be loaded (imports ``mpi4py.MPI`` on first call)."""
    global _HOST_OK
    if _HOST_OK is None:
        try:
            _load_mpi()
            _HOST_OK = True
        except (BackendUnavailable, RuntimeError, OSError):
            _HOST_OK = False
    return _HOST_OK


_SHM_WIDTH = 16  # int32 fields a shared-memory record slot holds


class _ShmRecords:
    """The per-step record all-gather through one MPI shared-memory window (ranks of one node).

    Layout: ``slots[parity, rank] = (sequence, field0 .. field15)`` as int32 words (the
    sequence wraps at 2**31, far beyond any pair of calls in flight). Call ``k`` (counted
    identically on every rank) writes this rank's fields into ``slots[k % 2, rank]``, then its
    sequence ``k``, and polls every rank's sequence in that parity until all equal ``k``. Two
    parities suffice: a rank can only write call ``k + 2`` after every rank wrote ``k + 1``,
    i.e. after every rank finished reading call ``k``. No MPI progress is involved, so
    oversubscribed ranks (more ranks than cores) only need to be scheduled once each.

    Needs x86-64 (stores become visible in program order, loads are not reordered with older
    loads); elsewhere, and across nodes, the MPI ``Iallgather`` path is used.
    """

    _STRIDE = 1 + _SHM_WIDTH

    def __init__(self, win, buf, rank, size):
        self._win = win
        self._slots = np.ndarray(buffer=buf, dtype=np.int32, shape=(2, size, self._STRIDE))
        self._words = memoryview(buf).cast("B").cast("i")  # per-word access without numpy calls
        self._rank = rank
        self._size = size
        self._k = 0

    @classmethod
    def create(cls, comm):
        import platform

        MPI = _MPI
        if platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("DPGATHER_NO_SHM_SYNC"):
            return None
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            same_node = node.Get_size() == comm.Get_size()
        finally:
            node.Free()
        if not comm.allreduce(same_node, op=MPI.LAND):
            return None
        size, rank = comm.Get_size(), comm.Get_rank()
        nbytes = 2 * size * cls._STRIDE * 4
        win = MPI.Win.Allocate_shared(nbytes if rank == 0 else 0, 4, comm=comm)
        buf, _ = win.Shared_query(0)
        self = cls(win, buf, rank, size)
        if rank == 0:
            self._slots[...] = 0
        comm.Barrier()
        return self

    def allgather(self, record, table, timeout_s):
        """Fill ``table`` with every rank's ``record``; False if ``timeout_s`` passed first."""
        self._k = k = (self._k + 1) & 0x7FFFFFFF or 1
        p = k & 1
        stride = self._STRIDE
        part = self._slots[p]
        w = record.shape[0]
        part[self._rank, 1:1 + w] = record
        words = self._words
        base = p * self._size * stride
        words[base + self._rank * stride] = k
        seq = range(base, base + self._size * stride, stride)

        def arrived():
            for i in seq:
                if words[i] != k:
                    return False
            return True

        if not arrived() and not poll_until(arrived, timeout_s):
            return False
        table[...] = part[:, 1:1 + w]
        return True

    def free(self):
        self._words.release()
        try:
            self._win.Free()
        except Exception:
            pass
        self._win = None
        self._slots = None


def _wrapping_sum(np_dtype):
    """The body of the integer SUM op: inoutbuf += inbuf, wrapping modulo 2**bits."""

    def fn(inbuf, inoutbuf, datatype):
        a = np.frombuffer(inbuf, dtype=np_dtype)
        b = np.frombuffer(inoutbuf, dtype=np_dtype)
        np.add(a, b, out=b)

    return fn


def _half_sum(np_dtype):
    """The body of the float16/bfloat16 SUM op: inoutbuf = round(f32(inbuf) + f32(inoutbuf))."""
    f32 = np.float32

    def fn(inbuf, inoutbuf, datatype):
        a = np.frombuffer(inbuf, dtype=np_dtype)
        b = np.frombuffer(inoutbuf, dtype=np_dtype)
        b[...] = (a.astype(f32) + b.astype(f32)).astype(np_dtype)

    return fn


class MpiHostCommunicator(Communicator):
    """The host communicator: mpi4py collectives on NumPy ``[rows, width]`` row buffers.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (intra-communicator); default ``MPI.COMM_WORLD``. It is used
            as is, not duplicated, and is never freed by :meth:`close` (only communicators made by
            :meth:`split` are owned and freed).
        timeout_s: seconds any one call may block before raising ``CollectiveTimeout`` and
            breaking the communicator; ``<= 0`` or ``None`` waits forever.

    Raises:
        BackendUnavailable: mpi4py (or its MPI library) cannot be imported.

    See :class:`dpgather.dist.base.Communicator` for the semantics of every method. Buffers are
    C-contiguous 2-D ``numpy.ndarray``; ``recv`` must be writable. ``stream`` is ignored.
    """

    def __init__(self, comm=None, timeout_s=60.0, *, _owned=False):
        MPI = _load_mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise InputError(
                f"comm must be an mpi4py intra-communicator such as MPI.COMM_WORLD, got {comm!r}"
            )
        try:
            self.timeout_s = 0.0 if timeout_s is None else float(timeout_s)
        except (TypeError, ValueError):
            raise InputError(f"timeout_s must be a number of seconds (or None), got {timeout_s!r}") from None
        if self.timeout_s != self.timeout_s:
            raise InputError("timeout_s must be a number of seconds (or None), got nan")
        self._comm = comm
        self._owned = bool(_owned)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._ops = {}  # logical dtype -> MPI.Op (float16/bfloat16 sums); freed in close()
        self._tcache = {}  # (numpy dtype, dtype kwarg) -> (logical name, MPI datatype)
        self._orphans = []  # requests left pending by a timeout (they keep their buffers alive)
        self._closed = False
        self._shm = None  # _ShmRecords once the first allgather_record proved every rank alive
        self._shm_ok = None

    @property
    def comm(self):
        """The underlying ``mpi4py.MPI.Comm``."""
        return self._comm

    # -- helpers -----------------------------------------------------------------------------
    def _type(self, op, name, arr, dtype):
        """Validate ``arr`` as a C-contiguous 2-D ndarray; return (logical, MPI datatype)."""
        if type(arr) is not np.ndarray and not isinstance(arr, np.ndarray):
            raise InputError(f"{op}: {name} must be a numpy.ndarray, got {type(arr).__name__}")
        if arr.ndim != 2:
            raise InputError(f"{op}: {name} must be 2-D [rows, width], got shape {arr.shape}")
        if not arr.flags.c_contiguous:
            raise InputError(f"{op}: {name} must be C-contiguous, got strides {arr.strides} for shape {arr.shape}")
        key = (arr.dtype, dtype)
        hit = self._tcache.get(key)
        if hit is not None:
            return hit
        if dtype is None:
            logical = _NP_LOGICAL.get(arr.dtype)
            if logical is None:
                raise InputError(
                    f"{op}: {name} has dtype {arr.dtype}, expected one of "
                    f"{sorted(_ITEMSIZE)} (or pass dtype= for 2-byte bfloat16/float16 storage)"
                )
        else:
            logical = str(dtype)
            if logical not in _ITEMSIZE:
                raise InputError(f"{op}: dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
            if arr.dtype.itemsize != _ITEMSIZE[logical]:
                raise InputError(
                    f"{op}: {name} has {arr.dtype.itemsize}-byte elements ({arr.dtype}) but "
                    f"dtype={logical!r} needs {_ITEMSIZE[logical]}-byte elements"
                )
        hit = (logical, _MPI_TYPE[logical])
        self._tcache[key] = hit
        return hit

    def _pair(self, op, send, recv, dtype):
        logical, mt = self._type(op, "send", send, dtype)
        if recv is not send:
            rlog, _ = self._type(op, "recv", recv, dtype if dtype is not None else logical)
            if rlog != logical or recv.dtype.itemsize != send.dtype.itemsize:
                raise InputError(
                    f"{op}: recv dtype {recv.dtype} does not match send dtype {send.dtype} "
                    f"(logical {logical!r})"
                )
            if recv.shape[1] != send.shape[1]:
                raise InputError(
                    f"{op}: recv row width must equal send row width {send.shape[1]}, got "
                    f"recv shape {recv.shape}"
                )
        if not recv.flags.writeable:
            raise InputError(f"{op}: recv must be writable (got a read-only array of shape {recv.shape})")
        return logical, mt

    def _no_alias(self, op, send, recv):
        if send is not recv and recv.size and send.size and np.may_share_memory(send, recv):
            raise InputError(
                f"{op}: send and recv must not overlap (got shapes {send.shape} and {recv.shape} "
                "sharing memory); pass the same array for an in-place all_reduce"
            )

    def _counts(self, op, counts):
        c = np.asarray(counts)
        if c.shape != (self.size,) or c.dtype.kind not in "iu":
            raise InputError(
                f"{op}: counts must be {self.size} integer row counts (one per rank), got "
                f"{counts!r}"
            )
        c = c.astype(np.int64, copy=False)
        if self.size and c.min() < 0:
            raise InputError(f"{op}: counts must be >= 0, got {c.tolist()}")
        return c

    def _sum_op(self, logical):
        if logical not in _OWN_SUM:
            return _MPI.SUM
        op = self._ops.get(logical)
        if op is None:
            if logical == "uint8":
                op = _MPI.Op.Create(_wrapping_sum(np.dtype(np.uint8)), commute=True)
                self._ops[logical] = op
                return op
            if logical == "float16":
                np_dtype = np.dtype(np.float16)
            else:
                try:
                    import ml_dtypes
                except ImportError as e:
                    raise BackendUnavailable(
                        "bfloat16 reductions on the host need ml_dtypes: `pip install ml_dtypes`"
                    ) from e
                np_dtype = np.dtype(ml_dtypes.bfloat16)
            op = _MPI.Op.Create(_half_sum(np_dtype), commute=True)
            self._ops[logical] = op
        return op

    def _wait(self, req, op):
        if not poll_until(req.Test, self.timeout_s):
            self._orphans.append(req)
            raise self._timed_out(op)

    # -- collectives ---------------------------------------------------------------------------
    def all_gather(self, send, recv, *, dtype=None, stream=None):
        self._check_usable("all_gather")
        _, mt = self._pair("all_gather", send, recv, dtype)
        m, w = send.shape
        if recv.shape[0] != self.size * m:
            raise InputError(
                f"all_gather: recv must have size*m = {self.size}*{m} = {self.size * m} rows, got "
                f"shape {recv.shape}"
            )
        self._no_alias("all_gather", send, recv)
        n = m * w
        self._wait(self._comm.Iallgather([send, n, mt], [recv, n, mt]), "all_gather")

    def all_gatherv(self, send, recv, counts, *, dtype=None, stream=None):
        self._check_usable("all_gatherv")
        _, mt = self._pair("all_gatherv", send, recv, dtype)
        c = self._counts("all_gatherv", counts)
        w = send.shape[1]
        mine = int(c[self.rank])
        if send.shape[0] < mine:
            raise InputError(
                f"all_gatherv: send must have at least counts[{self.rank}] = {mine} rows, got "
                f"shape {send.shape}"
            )
        total = int(c.sum())
        if recv.shape[0] != total:
            raise InputError(
                f"all_gatherv: recv must have sum(counts) = {total} rows, got shape {recv.shape}"
            )
        self._no_alias("all_gatherv", send, recv)
        ce = c * w
        displs = np.zeros_like(ce)
        np.cumsum(ce[:-1], out=displs[1:])
        self._wait(
            self._comm.Iallgatherv([send, mine * w, mt], [recv, (ce, displs), mt]), "all_gatherv"
        )

    def all_reduce(self, send, recv, *, dtype=None, stream=None):
        self._check_usable("all_reduce")
        logical, mt = self._pair("all_reduce", send, recv, dtype)
        if recv.shape != send.shape:
            raise InputError(
                f"all_reduce: recv must have the shape of send {send.shape}, got {recv.shape}"
            )
        n = send.size
        mop = self._sum_op(logical)
        same = recv is send or (
            n and send.__array_interface__["data"][0] == recv.__array_interface__["data"][0]
        )
        if same:
            req = self._comm.Iallreduce(_MPI.IN_PLACE, [recv, n, mt], mop)
        else:
            self._no_alias("all_reduce", send, recv)
            req = self._comm.Iallreduce([send, n, mt], [recv, n, mt], mop)
        self._wait(req, "all_reduce")

    def reduce_scatter(self, send, recv, *, dtype=None, stream=None):
        self._check_usable("reduce_scatter")
        logical, mt = self._pair("reduce_scatter", send, recv, dtype)
        m, w = recv.shape
        if send.shape[0] != self.size * m:
            raise InputError(
                f"reduce_scatter: send must have size*m = {self.size}*{m} = {self.size * m} rows "
                f"for recv shape {recv.shape}, got send shape {send.shape}"
            )
        self._no_alias("reduce_scatter", send, recv)
        # mpi4py's send count for *_scatter_block is the per-rank block count, like the recv's.
        req = self._comm.Ireduce_scatter_block([send, m * w, mt], [recv, m * w, mt], self._sum_op(logical))
        self._wait(req, "reduce_scatter")

    def reduce_scatterv(self, send, recv, counts, *, dtype=None, stream=None):
        self._check_usable("reduce_scatterv")
        logical, mt = self._pair("reduce_scatterv", send, recv, dtype)
        c = self._counts("reduce_scatterv", counts)
        w = send.shape[1]
        total = int(c.sum())
        if send.shape[0] != total:
            raise InputError(
                f"reduce_scatterv: send must have sum(counts) = {total} rows, got shape {send.shape}"
            )
        mine = int(c[self.rank])
        if recv.shape[0] < mine:
            raise InputError(
                f"reduce_scatterv: recv must have at least counts[{self.rank}] = {mine} rows, got "
                f"shape {recv.shape}"
            )
        self._no_alias("reduce_scatterv", send, recv)
        req = self._comm.Ireduce_scatter(
            [send, total * w, mt], [recv, mine * w, mt], c * w, self._sum_op(logical)
        )
        self._wait(req, "reduce_scatterv")

    def allgather_record(self, record, table):
        """The per-step sync: one ``Iallgather`` of the int32 record (no pickling).

        Args:
            record: C-contiguous int32 ``[W]`` (1-D).
            table: C-contiguous writable int32 ``[size, W]``; row ``r`` receives rank ``r``'s
                record.
        """
        if self._broken is not None:
            self._check_usable("allgather_record")
        if (
            type(record) is not np.ndarray or type(table) is not np.ndarray
            or record.dtype != _I32 or table.dtype != _I32
            or record.ndim != 1 or table.shape != (self.size, record.shape[0])
            or not (record.flags.c_contiguous and table.flags.carray)  # carray: C, aligned, writable
        ):
            self._bad_record(record, table)
        shm = self._shm
        if shm is not None and record.shape[0] <= _SHM_WIDTH:
            if not shm.allgather(record, table, self.timeout_s):
                raise self._timed_out("allgather_record")
            return
        mt = _MPI.INT32_T
        req = self._comm.Iallgather([record, mt], [table, mt])
        if not req.Test() and not poll_until(req.Test, self.timeout_s):
            self._orphans.append(req)
            raise self._timed_out("allgather_record")
        if shm is None and self._shm_ok is None:
            self._shm_ok = False
            self._shm = _ShmRecords.create(self._comm)

    def _bad_record(self, record, table):
        for name, a in (("record", record), ("table", table)):
            if not isinstance(a, np.ndarray) or a.dtype != _I32:
                raise InputError(
                    f"allgather_record: {name} must be a numpy int32 array, got "
                    f"{type(a).__name__} of dtype {getattr(a, 'dtype', None)}"
                )
            if not a.flags.c_contiguous:
                raise InputError(f"allgather_record: {name} must be C-contiguous, got strides {a.strides}")
        if record.ndim != 1:
            raise InputError(f"allgather_record: record must be 1-D [W], got shape {record.shape}")
        if table.shape != (self.size, record.shape[0]):
            raise InputError(
                f"allgather_record: table must have shape (size, W) = {(self.size, record.shape[0])}, "
                f"got {table.shape}"
            )
        raise InputError("allgather_record: table must be writable and aligned (got a read-only or unaligned array)")

    def split(self, color, key):
        """Split by ``color`` (int >= 0, or ``None`` to opt out and get ``None`` back), order by ``key``.

        A bounded ``Iallgather`` of (color, key) runs first, so a rank that never arrives gives
        ``CollectiveTimeout`` here instead of a hang inside the blocking ``MPI_Comm_split``.
        """
        self._check_usable("split")
        MPI = _MPI
        for name, v in (("color", color), ("key", key)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise InputError(f"split: {name} must be an int, got {v!r}")
        if color is not None and color < 0:
            raise InputError(f"split: color must be >= 0 or None, got {color}")
        if key is None:
            raise InputError("split: key must be an int, got None")
        mine = np.array([-1 if color is None else int(color), int(key)], dtype=np.int64)
        seen = np.empty((self.size, 2), dtype=np.int64)
        self._wait(self._comm.Iallgather([mine, MPI.INT64_T], [seen, MPI.INT64_T]), "split")
        sub = self._comm.Split(MPI.UNDEFINED if color is None else int(color), int(key))
        if sub == MPI.COMM_NULL:
            return None
        return MpiHostCommunicator(sub, self.timeout_s, _owned=True)

    def barrier(self):
        self._check_usable("barrier")
        self._wait(self._comm.Ibarrier(), "barrier")

    def abort(self):
        """Mark the communicator broken on this rank; the process keeps running."""
        self._mark_broken("abort() was called")

    def close(self):
        """Free the float16/bfloat16 ops and, if owned (made by :meth:`split`), the communicator.

        Idempotent. ``COMM_WORLD`` and communicators passed in by the caller are never freed. With
        requests left pending by a timeout the ops are leaked on purpose (MPI may still call them).
        """
        if self._closed:
            return
        self._closed = True
        healthy = self._broken is None
        self._mark_broken("close() was called")
        MPI = _MPI
        if MPI.Is_finalized():
            self._ops.clear()
            return
        if self._shm is not None:
            if healthy:  # MPI_Win_free is collective: never wait on peers that may be gone
                self._shm.free()
            self._shm = None
        if not self._orphans:
            for op in self._ops.values():
                op.Free()
        self._ops.clear()
        comm = self._comm
        if self._owned and comm != MPI.COMM_NULL and comm != MPI.COMM_WORLD and comm != MPI.COMM_SELF:
            comm.Free()
