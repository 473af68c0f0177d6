"""Node-local shared memory for a group of MPI ranks, with a purely local close.

:func:`node_segment` makes one POSIX shared-memory segment (a file under ``/dev/shm``) that every
rank of an MPI communicator maps. Rank 0 creates it under a random name, the name travels with
a bounded broadcast, every other rank opens and maps it, and once every rank reported its
mapping rank 0 unlinks the file: from then on the memory lives exactly as long as some rank
maps it, so nothing leaks after a crash, and closing is a local ``munmap`` that never waits for a
peer (unlike ``MPI_Win_free``, which is collective and hangs a rank whose peers are gone).

Every step of the set-up is a non-blocking MPI call polled against ``timeout_s``; the set-up is
collective and issues the same calls on every rank whatever happens locally, and either every
rank gets the segment or every rank gets ``None`` (ranks on different nodes cannot open the
file, a machine without ``/dev/shm`` cannot create it).
"""

import mmap
import os
import secrets

import numpy as np

from .base import bounded_wait

__all__ = ["NodeSegment", "node_segment"]

_SHM_DIR = "/dev/shm"


class NodeSegment:
    """One mapped shared-memory segment (see the module docstring).

    Attributes:
        nbytes: size in bytes. buf: a writable ``memoryview`` of the mapping (bytes).
    """

    def __init__(self, mm, nbytes):
        self._mm = mm
        self.nbytes = nbytes
        self.buf = memoryview(mm)

    def array(self, dtype, shape, offset=0):
        """A NumPy view of ``shape`` elements of ``dtype`` at byte ``offset`` of the segment."""
        return np.ndarray(shape, dtype=dtype, buffer=self.buf, offset=offset)

    def close(self):
        """Unmap (local; idempotent). Views made by :meth:`array` must no longer be used; while any
        of them is alive the mapping stays until the process exits."""
        if self._mm is None:
            return
        try:
            self.buf.release()
            self._mm.close()
        except BufferError:
            pass  # a view still exports the buffer: the mapping ends with the process
        self._mm = None


def node_segment(comm, nbytes, timeout_s, orphans, tag="dpgather"):
    """Create, on every rank of ``comm``, a mapping of one shared segment of ``nbytes`` bytes.

    Collective and bounded by ``timeout_s`` (``CollectiveTimeout``); ``orphans`` receives the
    requests a timeout abandons. Returns a :class:`NodeSegment` on every rank, or ``None`` on every
    rank when some rank cannot map it. The memory starts zeroed.
    """
    from mpi4py import MPI

    rank = comm.Get_rank()
    name = np.zeros(3, dtype=np.int64)  # (created, pid, token) of rank 0's file
    path = None
    mm = None
    if rank == 0 and nbytes > 0:
        name[:] = (0, os.getpid(), secrets.randbits(62))
        path = _path(tag, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                mm = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            name[0] = 1
        except (OSError, ValueError):
            mm = None
    seen = np.zeros(comm.Get_size(), dtype=np.int32)
    try:
        bounded_wait(comm.Ibcast([name, MPI.INT64_T], root=0), timeout_s, "shared-memory set-up",
                     orphans, name)
        if rank != 0 and name[0] and nbytes > 0:
            try:
                fd = os.open(_path(tag, name), os.O_RDWR)
                try:
                    if os.fstat(fd).st_size == nbytes:
                        mm = mmap.mmap(fd, nbytes)
                finally:
                    os.close(fd)
            except (OSError, ValueError):
                mm = None
        ok = np.array([mm is not None], dtype=np.int32)
        bounded_wait(comm.Iallgather([ok, MPI.INT32_T], [seen, MPI.INT32_T]), timeout_s,
                     "shared-memory set-up", orphans, ok, seen)
    finally:
        if path is not None:
            try:
                os.unlink(path)  # every rank mapped it, or none will: the name is no longer needed
            except OSError:
                pass
    if not seen.all():
        if mm is not None:
            mm.close()
        return None
    return NodeSegment(mm, nbytes)


def _path(tag, name):
    return os.path.join(_SHM_DIR, f"{tag}-{int(name[1])}-{int(name[2]):016x}")
