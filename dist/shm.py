"""Node-local shared memory for a group of MPI ranks, with a purely local close.

:func:`node_segment` makes one POSIX shared-memory segment (a file under ``/dev/shm``) that every
rank of an MPI communicator maps. Rank 0 creates it under a random name and reserves its pages
(``posix_fallocate``: a full ``/dev/shm`` fails here, not with SIGBUS later), the name travels
with a bounded broadcast, every other rank opens and maps it, and once every rank reported its
mapping rank 0 unlinks the file: from then on the memory lives exactly as long as some rank maps
it, so nothing leaks after a crash, and closing is a local ``munmap`` that never waits for a peer
(unlike ``MPI_Win_free``, which is collective and hangs a rank whose peers are gone).

Every step of the set-up is a non-blocking MPI call polled against ``timeout_s``; the set-up is
collective and issues the same calls on every rank whatever happens locally, and either every
rank gets the segment or every rank raises the same ``BackendUnavailable`` (ranks on different
nodes cannot open the file, a machine without ``/dev/shm`` cannot create it).

Two protocols run over such segments, the per-step sync (:mod:`.sync`) and the host twin of
the P2P transport (:mod:`.windows`); both publish data with plain stores and rely on x86-64
store order (:func:`unusable_reason`).
"""

import errno
import mmap
import os
import platform
import secrets

import numpy as np

from dpgather.core.errors import BackendUnavailable

from .base import bounded_wait, load_mpi

__all__ = ["NodeSegment", "node_segment", "unusable_reason"]

_SHM_DIR = "/dev/shm"
# Per-rank outcome codes of the set-up (positive: the errno of the failure).
_MAPPED, _OTHER, _SKIPPED = 0, -1, -2


def unusable_reason():
    """Why this machine cannot run a flag protocol over :func:`node_segment`, or None.

    The protocols publish data with plain stores read in order by the peers: x86-64 keeps
    stores in program order and never reorders loads with older loads (TSO); elsewhere they
    would need fences. And the segment lives in ``/dev/shm``.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"shared-memory flag protocols need x86-64 (TSO store order), this is {platform.machine()}"
    if not os.path.isdir(_SHM_DIR):
        return f"{_SHM_DIR} does not exist"
    return None


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
    requests a timeout abandons. A rank that passes ``nbytes=0`` opts out (then no rank gets a
    segment). The memory starts zeroed.

    Returns:
        a :class:`NodeSegment` on every rank.

    Raises:
        BackendUnavailable: on every rank when some rank could not create or map it, naming
            the first such rank and why.
    """
    MPI = load_mpi()
    rank = comm.Get_rank()
    name = np.zeros(3, dtype=np.int64)  # (created, pid, token) of rank 0's file
    path = None
    mm = None
    code = np.array([_SKIPPED], dtype=np.int32)
    if rank == 0 and nbytes > 0:
        name[:] = (0, os.getpid(), secrets.randbits(62))
        path = _path(tag, name)
        mm = _map(_create, path, nbytes, code)
        name[0] = mm is not None
    seen = np.zeros(comm.Get_size(), dtype=np.int32)
    try:
        bounded_wait(comm.Ibcast([name, MPI.INT64_T], root=0), timeout_s, "shared-memory set-up",
                     orphans, name)
        if rank != 0 and name[0] and nbytes > 0:
            mm = _map(_open, _path(tag, name), nbytes, code)
        bounded_wait(comm.Iallgather([code, MPI.INT32_T], [seen, MPI.INT32_T]), timeout_s,
                     "shared-memory set-up", orphans, code, seen)
    finally:
        if path is not None:
            try:
                os.unlink(path)  # every rank mapped it, or none will: the name is no longer needed
            except OSError:
                pass
    if (seen != _MAPPED).any():
        if mm is not None:
            mm.close()
        raise BackendUnavailable(_verdict(seen, nbytes))
    return NodeSegment(mm, nbytes)


def _create(path, nbytes):
    """Rank 0: create, reserve and map the file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _open(path, nbytes):
    """Every other rank: open and map rank 0's file."""
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != nbytes:
            raise OSError(errno.EINVAL, "the segment has another size than this rank asked for")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _map(how, path, nbytes, code):
    """``how(path, nbytes)`` (:func:`_create` or :func:`_open`): the mapping, or None with
    ``code[0]`` saying why (an errno, or ``_OTHER``)."""
    try:
        mm = how(path, nbytes)
    except OSError as e:
        code[0] = e.errno or _OTHER
        return None
    except ValueError:
        code[0] = _OTHER
        return None
    code[0] = _MAPPED
    return mm


def _verdict(seen, nbytes):
    """The reason of the first rank that failed (one that merely skipped only if none failed)."""
    failed = [r for r, c in enumerate(seen.tolist()) if c not in (_MAPPED, _SKIPPED)]
    if failed:
        r, c = failed[0], int(seen[failed[0]])
        why = os.strerror(c) if c > 0 else "not a valid mapping"
        return (f"rank {r} cannot create or map a {nbytes}-byte shared-memory segment in {_SHM_DIR}: "
                f"{why} (ranks on other nodes cannot open it; a full {_SHM_DIR} cannot hold it)")
    skipped = [r for r, c in enumerate(seen.tolist()) if c == _SKIPPED]
    return f"ranks {skipped} did not map the shared-memory segment (opted out, or rank 0 created none)"


def _path(tag, name):
    return os.path.join(_SHM_DIR, f"{tag}-{int(name[1])}-{int(name[2]):016x}")
