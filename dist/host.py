"""The MPI host backend: :class:`MpiHostCommunicator` over mpi4py on NumPy row buffers.

Every collective uses mpi4py's buffer (capitalised) non-blocking calls with explicit element
counts and MPI datatypes (no pickling), then waits by polling ``Request.Test()`` against a
``time.monotonic()`` deadline (:func:`dpgather.dist.base.poll_until`), so a missing peer gives
``CollectiveTimeout`` instead of a hang.

Data moves (all-gathers) travel as bytes. Sums use the datatype of :data:`dpgather.core.dtypes.DTYPES`
(``mpi`` column) and ``MPI.SUM``, except where that column says ``own``: float16 and bfloat16
have no MPI datatype and are summed by a user-defined commutative ``MPI.Op`` that adds in
float32 and rounds back after each pairwise step (NCCL's arithmetic); uint8 is summed by a
user-defined op too, because Open MPI's vectorised reduction component (``op/avx``, in 4.1 and
5.0) *saturates* 8- and 16-bit integer sums (200 + 100 = 255; open-mpi/ompi#8045, closed "won't
fix"), where C, MPICH and NCCL wrap (200 + 100 = 44). int32, int64 and float32 sums agree in every
MPI we test (MPICH 4, Open MPI 4.1 and 5.0).

Importing this module never imports mpi4py; the constructor does (and initialises MPI).
"""

import numpy as np

from dpgather.core.dtypes import DTYPES, host_storage
from dpgather.core.errors import BackendUnavailable, CollectiveTimeout, InputError
from dpgather.core.rows import check_rows

from .base import Communicator, Ops, bounded_wait, check_split_args, intracomm, load_mpi, parse_timeout

__all__ = ["MpiHostCommunicator", "MpiOps", "host_available", "load_mpi"]

_HOST_OK = None


def host_available():
    """True when mpi4py and an MPI library can be loaded (imports ``mpi4py.MPI`` on first call)."""
    global _HOST_OK
    if _HOST_OK is None:
        try:
            load_mpi()
            _HOST_OK = True
        except BackendUnavailable:
            _HOST_OK = False
    return _HOST_OK


def _own_sum(logical):
    """The body of this dtype's own SUM op: ``inoutbuf += inbuf`` in the dtype's arithmetic
    (integers wrap modulo 2**bits; float16/bfloat16 add in float32 and round back)."""
    dt = host_storage(logical)
    acc = np.dtype(DTYPES[logical].acc)

    def fn(inbuf, inoutbuf, datatype):
        a = np.frombuffer(inbuf, dtype=dt)
        b = np.frombuffer(inoutbuf, dtype=dt)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf sums are values, as in NCCL
            if acc == dt:
                np.add(a, b, out=b)
            else:
                b[...] = (a.astype(acc) + b.astype(acc)).astype(dt)

    return fn


class MpiOps(Ops):
    """Trusted MPI primitives of one :class:`MpiHostCommunicator` (see :class:`~dpgather.dist.base.Ops`).

    Each call starts the non-blocking MPI operation and polls it to completion against the
    communicator's ``timeout_s``; a timeout breaks the communicator.
    """

    def __init__(self, owner):
        MPI = load_mpi()
        self._owner = owner
        self._comm = owner._comm
        self._byte = MPI.BYTE
        self._in_place = MPI.IN_PLACE
        self._sum = MPI.SUM
        self._types = {name: getattr(MPI, d.mpi) for name, d in DTYPES.items()}
        self._sums = {}  # logical -> MPI.Op for the dtypes summed by our own op

    def _op(self, logical):
        if DTYPES[logical].mpi_sum == "native":
            return self._sum
        op = self._sums.get(logical)
        if op is None:
            op = self._sums[logical] = load_mpi().Op.Create(_own_sum(logical), commute=True)
        return op

    def _wait(self, req, op, *keep):
        """Wait for ``req`` (bounded); a timeout or an MPI error breaks the communicator."""
        owner = self._owner
        try:
            bounded_wait(req, owner.timeout_s, op, owner._orphans, *keep)
        except CollectiveTimeout as e:
            raise owner._timed_out(op, cause=e.__cause__) from None

    def all_gather(self, send, recv, logical, stream=None):
        n = send.nbytes
        sb = self._in_place if _at(send, recv, self._owner.rank * n) else [send, n, self._byte]
        self._wait(self._comm.Iallgather(sb, [recv, n, self._byte]), "all_gather", send, recv)

    def all_gatherv(self, send, recv, counts, offsets, logical, stream=None):
        rb = send.shape[1] * send.dtype.itemsize
        me = self._owner.rank
        c = np.array(counts, dtype=np.int64) * rb
        d = np.array(offsets[:-1], dtype=np.int64) * rb
        sb = self._in_place if _at(send, recv, int(d[me])) else [send, counts[me] * rb, self._byte]
        self._wait(self._comm.Iallgatherv(sb, [recv, (c, d), self._byte]), "all_gatherv", send, recv, c, d)

    def all_reduce(self, send, recv, logical, stream=None):
        mt, n = self._types[logical], recv.size
        if send is recv:
            req = self._comm.Iallreduce(self._in_place, [recv, n, mt], self._op(logical))
        else:
            req = self._comm.Iallreduce([send, n, mt], [recv, n, mt], self._op(logical))
        self._wait(req, "all_reduce", send, recv)

    def reduce_scatter(self, send, recv, logical, stream=None):
        mt, n = self._types[logical], recv.size
        # mpi4py's send count for *_scatter_block is the per-rank block count, like the recv's.
        self._wait(self._comm.Ireduce_scatter_block([send, n, mt], [recv, n, mt], self._op(logical)),
                   "reduce_scatter", send, recv)

    def reduce_scatterv(self, send, recv, counts, offsets, logical, stream=None):
        mt, w = self._types[logical], send.shape[1]
        c = np.array(counts, dtype=np.int64) * w
        total = offsets[-1] * w
        mine = counts[self._owner.rank] * w
        self._wait(self._comm.Ireduce_scatter([send, total, mt], [recv, mine, mt], c, self._op(logical)),
                   "reduce_scatterv", send, recv, c)

    def free(self):
        for op in self._sums.values():
            op.Free()
        self._sums.clear()


def _at(send, recv, byte_offset):
    """Whether ``send`` is ``recv``'s own block at ``byte_offset`` (an in-place all-gather: MPI
    forbids aliased buffers, ``MPI_IN_PLACE`` says it instead)."""
    return (send.size > 0 and send.__array_interface__["data"][0]
            == recv.__array_interface__["data"][0] + byte_offset)


class MpiHostCommunicator(Communicator):
    """The host communicator: mpi4py collectives on NumPy ``[rows, width]`` row buffers.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (intra-communicator); default ``MPI.COMM_WORLD``. It is used
            as is, not duplicated, and is never freed by :meth:`close` (only communicators made by
            :meth:`split` are owned and freed).
        timeout_s: seconds any one call may block before raising ``CollectiveTimeout`` and
            breaking the communicator; a positive number, ``float("inf")`` waits forever
            (:func:`~dpgather.dist.base.parse_timeout`).

    Raises:
        BackendUnavailable: mpi4py (or its MPI library) cannot be imported.
        InputError: ``comm`` is not an intra-communicator, ``timeout_s`` is not a positive number.

    See :class:`dpgather.dist.base.Communicator` for the semantics of every method. Buffers are
    C-contiguous 2-D ``numpy.ndarray``; ``recv`` must be writable. ``stream`` is ignored.
    """

    def __init__(self, comm=None, timeout_s=60.0, *, _owned=False):
        comm = intracomm(load_mpi().COMM_WORLD if comm is None else comm)
        self.timeout_s = parse_timeout(timeout_s, error=InputError)
        self._comm = comm
        self._owned = bool(_owned)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._orphans = []  # (request, buffers) left pending by a timeout
        self._closed = False
        self.ops = MpiOps(self)

    @property
    def comm(self):
        """The underlying ``mpi4py.MPI.Comm``."""
        return self._comm

    def _buffer(self, op, name, arr, writable=False, row_bytes=None):
        return check_rows(arr, name, op=op, of=np.ndarray, writable=writable, row_bytes=row_bytes)

    def _overlap(self, a, b):
        return np.may_share_memory(a, b)

    def split(self, color, key):
        """Split by ``color`` (int >= 0, or ``None`` to opt out and get ``None`` back), order by ``key``.

        A bounded ``Iallgather`` of (color, key) runs first, so a rank that never arrives gives
        ``CollectiveTimeout`` here instead of a hang inside the blocking ``MPI_Comm_split``.
        """
        self._check_usable("split")
        color, key = check_split_args(color, key)
        MPI = load_mpi()
        mine = np.array([-1 if color is None else color, key], dtype=np.int64)
        seen = np.empty((self.size, 2), dtype=np.int64)
        self.ops._wait(self._comm.Iallgather([mine, MPI.INT64_T], [seen, MPI.INT64_T]), "split", mine, seen)
        sub = self._comm.Split(MPI.UNDEFINED if color is None else color, key)
        if sub == MPI.COMM_NULL:
            return None
        return MpiHostCommunicator(sub, self.timeout_s, _owned=True)

    def barrier(self):
        self._check_usable("barrier")
        self.ops._wait(self._comm.Ibarrier(), "barrier")

    def wait(self, stream=None):
        """Every call completed before it returned: only refuses a broken communicator."""
        self._check_usable("wait")

    def abort(self):
        """Mark the communicator broken on this rank; the process keeps running."""
        self._mark_broken("abort() was called")

    def close(self):
        """Free the user-defined sum ops and, if owned (made by :meth:`split`), the communicator.

        Local and idempotent: no call here waits for a peer. ``COMM_WORLD`` and communicators
        passed in by the caller are never freed. With requests left pending by a timeout, the ops
        and the communicator are leaked on purpose (MPI may still use them).
        """
        if self._closed:
            return
        self._closed = True
        self._mark_broken("close() was called")
        MPI = load_mpi()
        if MPI.Is_finalized() or self._orphans:
            return
        self.ops.free()
        comm = self._comm
        if self._owned and comm not in (MPI.COMM_NULL, MPI.COMM_WORLD, MPI.COMM_SELF):
            comm.Free()
