"""Bounded construction exchanges: how a node's ranks agree while building a transport.

A transport (its shared windows, its probe) is built collectively over an MPI communicator, and
a failure on any rank must raise the same error on every rank instead of leaving the others in
the next exchange. :class:`Bootstrap` does that with fixed-size :data:`RECORD` rows: each phase
every rank fills its record (facts, or a failure kind with a reason), one bounded
``Iallgather`` gives every rank the table of all records, and :meth:`Bootstrap.verdict` raises
the first failing rank's error on every rank alike.

Every MPI call is nonblocking and polled against ``timeout_s``
(:func:`~dpgather.dist.base.bounded_wait`): ``CollectiveTimeout`` when a peer does not show up.
"""

import numpy as np

from dpgather.core.errors import BackendUnavailable, ConfigError

from .base import bounded_wait, intracomm, load_mpi

__all__ = ["Bootstrap", "RECORD", "FAIL_UNAVAILABLE", "FAIL_CONFIG", "fail", "text"]

_REASON_BYTES = 240

#: One record per rank per construction phase (raw bytes over ``MPI.BYTE``).
RECORD = np.dtype([
    ("ok", "<i4"),  # 0 ok, else FAIL_UNAVAILABLE or FAIL_CONFIG
    ("dev", "<i4"),  # CUDA device ordinal (or the device count in the first phase)
    ("host", "<u8"),  # node identity (dist.nodes.host_id)
    ("cap", "<i8"),  # a size every rank must agree on (the pull transport: capacity_bytes)
    ("epoch0", "<i8"),  # a start value every rank must agree on (the pull transport: the epoch)
    ("bus", "S16"),  # PCI bus id of the device
    ("handle", "u1", (64,)),  # cudaIpcMemHandle_t
    ("reason", f"S{_REASON_BYTES}"),
])
#: Failure kinds of ``RECORD["ok"]``: raised as BackendUnavailable / ConfigError.
FAIL_UNAVAILABLE, FAIL_CONFIG = 1, 2


def fail(rec, kind, reason):
    """Mark record ``rec`` failed with ``kind`` and ``reason`` (cut to the field's size)."""
    rec["ok"] = kind
    rec["reason"] = str(reason).encode()[:_REASON_BYTES]


def text(field) -> str:
    """A bytes field of a record as text."""
    return bytes(field).rstrip(b"\x00").decode(errors="replace")


class Bootstrap:
    """Bounded exchanges of :data:`RECORD` rows over a private duplicate of ``mpi_comm``.

    Args:
        who: what is being built, named in messages (``"CudaPull"``, ``"the P2P probe"``).
        mpi_comm: an mpi4py intra-communicator; duplicated (bounded ``Idup``).
        timeout_s: bound of every exchange (a parsed timeout: seconds or ``math.inf``).

    Attributes:
        rank, size: this rank and the number of ranks. comm: the private duplicate.
        timeout_s. orphans: requests (and buffers) a timeout abandoned; while any is left,
        :meth:`free` leaks the duplicate on purpose.

    Raises:
        InputError: ``mpi_comm`` is not an intra-communicator.
        BackendUnavailable: mpi4py is missing. CollectiveTimeout: a peer did not duplicate.
    """

    def __init__(self, who, mpi_comm, timeout_s):
        MPI = load_mpi()
        self.MPI = MPI
        self.who = who
        self.timeout_s = timeout_s
        intracomm(mpi_comm, "mpi_comm")
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.orphans = []
        self.comm = None
        comm, req = mpi_comm.Idup()
        self.comm = comm
        self.wait(req, "duplicating the MPI communicator")

    def wait(self, req, what, *keep):
        """Wait for ``req`` within ``timeout_s`` or raise ``CollectiveTimeout`` naming ``what``."""
        bounded_wait(req, self.timeout_s, f"{self.who} construction ({what}) on rank {self.rank}/{self.size}",
                     self.orphans, *keep)

    @staticmethod
    def record():
        """A fresh zeroed record (``ok`` = 0)."""
        return np.zeros((), RECORD)

    def allgather(self, rec, what):
        """Every rank's record (``[size]`` of :data:`RECORD`)."""
        table = np.zeros(self.size, RECORD)
        send = np.ascontiguousarray(rec).reshape(1)
        B = self.MPI.BYTE
        self.wait(self.comm.Iallgather([send.view(np.uint8), B], [table.view(np.uint8), B]), what, send, table)
        return table

    @staticmethod
    def first_failure(table):
        """``"rank r: reason"`` of the first failed record of ``table``, or None."""
        bad = np.flatnonzero(table["ok"] != 0)
        if bad.size == 0:
            return None
        r = int(bad[0])
        return f"rank {r}: {text(table['reason'][r])}"

    def verdict(self, table, what):
        """Raise the first failing rank's error on every rank (same type, same text)."""
        bad = np.flatnonzero(table["ok"] != 0)
        if bad.size == 0:
            return
        r = int(bad[0])
        kind = int(table["ok"][r])
        others = f" (and ranks {bad[1:].tolist()})" if bad.size > 1 else ""
        msg = (f"{self.who} construction failed ({what}) on rank {r}/{self.size}{others}: "
               f"{text(table['reason'][r])}")
        raise (ConfigError if kind == FAIL_CONFIG else BackendUnavailable)(msg)

    def agree(self, rec, what, same=()):
        """Gather ``rec``, raise every rank's first failure, then require one node and equal
        ``same`` fields on every rank (the same error on every rank). Returns the table."""
        table = self.allgather(rec, what)
        self.verdict(table, what)
        hosts = table["host"]
        if (hosts != hosts[0]).any():
            groups = sorted({int(h) for h in hosts})
            where = [groups.index(int(h)) for h in hosts]
            raise BackendUnavailable(
                f"{self.who}: the {self.size} ranks span {len(groups)} nodes (node index per rank: "
                f"{where}); the P2P transport needs every rank on one node (use it inside each node "
                "and NCCL between nodes)")
        for field, name in same:
            v = table[field]
            if (v != v[0]).any():
                raise ConfigError(f"{self.who}: {name} differs between ranks: {v.tolist()}; every rank "
                                  "must pass the same value")
        return table

    def free(self):
        """Free the duplicate (local); leaked while a timed-out request may still use it."""
        comm, self.comm = self.comm, None
        if comm is None or self.orphans:
            return
        try:
            if not self.MPI.Is_finalized():
                comm.Free()
        except Exception:  # teardown must not raise
            pass
