"""The per-step sync: the one host collective of a step.

Every step each rank contributes a fixed-width int32 record (its batch for the planner plus the
control fields of ``DpAttention``) and every rank receives the table of all records.
:class:`StepSync` owns that exchange:

- the first exchange goes over MPI (``MPI_Iallgather``, polled against ``timeout_s``), so every
  rank is known alive before anything else is set up;
- right after it, when every rank maps one node-local shared-memory segment
  (:func:`dpgather.dist.shm.node_segment`; all ranks on one node, x86-64), later exchanges go
  through that segment with no MPI call at all: each rank writes its record and a sequence
  number into its slot and polls the others' sequence numbers. MPI's progress engine cost
  45-53 us p50 per exchange at 4 oversubscribed ranks; the segment 16-22 us (BENCHMARKS.md).
  ``DPGATHER_NO_SHM_SYNC=1`` (any value but empty or ``0``) keeps the MPI path (as do ranks
  spread over several nodes).

Slot layout: ``slots[parity, rank] = (sequence, field 0 .. field W-1)`` int32. Call ``k``
(counted identically on every rank) writes this rank's fields into ``slots[k % 2, rank]``, then
its sequence ``k``, and polls every rank's sequence in that parity until all equal ``k``. Two
parities suffice: a rank can only write call ``k + 2`` after every rank wrote ``k + 1``, i.e.
after every rank finished reading call ``k``. Stores become visible in program order on x86-64
(TSO), which the protocol needs; elsewhere the MPI path is used.

Closing is local (an ``munmap``): a rank whose peers died or timed out never waits for them.
:meth:`StepSync.allgather_obj` is the bounded object all-gather for the rare paths (the
configuration agreement at construction, error messages after a failed step).
"""

import os
import pickle

import numpy as np

from dpgather.core.errors import BackendUnavailable, CollectiveTimeout, InputError

from .base import bounded_wait, load_mpi, parse_timeout, poll_until
from .shm import node_segment, unusable_reason

__all__ = ["StepSync"]


def shm_sync_disabled():
    """True when ``DPGATHER_NO_SHM_SYNC`` asks for the MPI path (any value but empty and ``0``)."""
    return os.environ.get("DPGATHER_NO_SHM_SYNC", "").strip() not in ("", "0")


class StepSync:
    """The per-step record exchange of one ``DpAttention`` (see the module docstring).

    Args:
        comm: an mpi4py intra-communicator the caller owns and does not use concurrently (a
            private duplicate: the exchange's MPI path issues collectives on it).
        width: int32 fields per record.
        timeout_s: bound of every exchange (``CollectiveTimeout`` after it): a positive number,
            ``float("inf")`` waits forever (:func:`~dpgather.dist.base.parse_timeout`).

    Attributes:
        transport: ``"mpi"`` or ``"shm"`` (after the first exchange decided).
        rank, size: of ``comm``. broken: ``None`` or why the sync refuses further use.
        host_collectives: host collectives issued so far (one per :meth:`exchange`, two per
            :meth:`allgather_obj`): what "one host collective per step" is measured with.
    """

    def __init__(self, comm, width, timeout_s):
        self._MPI = load_mpi()
        self._comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.width = int(width)
        self.timeout_s = parse_timeout(timeout_s, error=InputError)
        self.table = np.zeros((self.size, self.width), dtype=np.int32)
        self.transport = "mpi"
        self.broken = None
        self._calls = 0
        self.host_collectives = 0
        self._seg = None
        self._slots = None
        self._words = None
        self._orphans = []
        self._shm_decided = False

    # -- the exchange ------------------------------------------------------------------------
    def exchange(self, record):
        """Gather every rank's ``record`` (int32 ``[width]``) into :attr:`table` and return it.

        The returned table is owned by the sync and overwritten by the next exchange.

        Raises:
            CollectiveTimeout: some rank did not exchange within ``timeout_s`` (the sync is
                broken from then on).
        """
        if self.broken is not None:
            raise CollectiveTimeout(f"the per-step sync on rank {self.rank} is broken after {self.broken}")
        self._calls = k = (self._calls + 1) & 0x7FFFFFFF or 1
        self.host_collectives += 1
        if self._words is not None:
            if not self._shm_exchange(record, k):
                raise self._timeout("the per-step sync (shared memory)")
            return self.table
        MPI = self._MPI
        try:
            bounded_wait(self._comm.Iallgather([record, MPI.INT32_T], [self.table, MPI.INT32_T]),
                         self.timeout_s, "the per-step sync", self._orphans, record, self.table)
        except CollectiveTimeout:
            raise self._timeout("the per-step sync (MPI)") from None
        if not self._shm_decided:
            self._shm_decided = True
            self._setup_shm()
        return self.table

    def _timeout(self, what):
        self.broken = f"{what} timed out on rank {self.rank} (timeout_s={self.timeout_s:g})"
        return CollectiveTimeout(
            f"{what} did not complete within timeout_s={self.timeout_s:g} s on rank "
            f"{self.rank}/{self.size}: a peer rank did not reach sync() (crashed, stuck, or "
            "called sync() a different number of times)")

    def _setup_shm(self):
        """Collective: move later exchanges to a shared segment if every rank can map it."""
        stride = 1 + self.width
        nbytes = 2 * self.size * stride * 4
        want = unusable_reason() is None and not shm_sync_disabled()
        try:
            seg = node_segment(self._comm, nbytes if want else 0, self.timeout_s, self._orphans,
                               tag="dpgather-sync")
        except CollectiveTimeout:
            raise self._timeout("the per-step sync's shared-memory set-up") from None
        except BackendUnavailable:  # some rank cannot map it (or opted out): stay on MPI
            return
        self._seg = seg
        self._slots = seg.array(np.int32, (2, self.size, stride))
        self._words = seg.buf.cast("i")  # per-word access without NumPy calls (fast polling)
        self.transport = "shm"

    def _shm_exchange(self, record, k):
        p = k & 1
        stride = 1 + self.width
        words = self._words
        part = self._slots[p]
        part[self.rank, 1:] = record
        base = p * self.size * stride
        words[base + self.rank * stride] = k
        seq = range(base, base + self.size * stride, stride)

        def arrived():
            for i in seq:
                if words[i] != k:
                    return False
            return True

        if not arrived() and not poll_until(arrived, self.timeout_s):
            return False
        self.table[...] = part[:, 1:]
        return True

    @property
    def abandoned(self):
        """True when a timeout left MPI requests pending on the communicator (it must not be
        freed then: MPI may still use it)."""
        return bool(self._orphans)

    # -- rare paths ----------------------------------------------------------------------------
    def allgather_obj(self, obj, what="an object exchange"):
        """Every rank's ``obj`` (picklable), as a list in rank order; bounded by ``timeout_s``.

        Two non-blocking MPI calls (lengths, then bytes). For the configuration agreement and
        error messages, never on the per-step path.
        """
        MPI = self._MPI
        self.host_collectives += 2
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        mine = np.array([data.size], dtype=np.int64)
        sizes = np.zeros(self.size, dtype=np.int64)
        try:
            bounded_wait(self._comm.Iallgather([mine, MPI.INT64_T], [sizes, MPI.INT64_T]),
                         self.timeout_s, what, self._orphans, mine, sizes)
            displs = np.zeros(self.size, dtype=np.int64)
            np.cumsum(sizes[:-1], out=displs[1:])
            out = np.empty(int(sizes.sum()), dtype=np.uint8)
            bounded_wait(self._comm.Iallgatherv([data, MPI.BYTE], [out, (sizes, displs), MPI.BYTE]),
                         self.timeout_s, what, self._orphans, data, out, sizes, displs)
        except CollectiveTimeout:
            raise self._timeout(what) from None
        return [pickle.loads(out[d:d + n].tobytes()) for d, n in zip(displs.tolist(), sizes.tolist())]

    def close(self):
        """Unmap the shared segment (local, idempotent); later exchanges raise."""
        if self.broken is None:
            self.broken = "close() was called"
        self._words = None
        self._slots = None
        if self._seg is not None:
            self._seg.close()
            self._seg = None
