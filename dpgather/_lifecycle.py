"""The lifecycle of a ``DpAttention``: open, aborted or closed, and closing at interpreter exit.

:class:`State` is shared by the rooms that run calls (the op path, graph runners, asynchronous
handles): they ask it whether the ``DpAttention`` may still be used and tell it to abort when a
collective failed, without calling back into the ``DpAttention``. Aborting is local and
immediate: the communicators are aborted (NCCL ``commAbort``) and every later call raises
``CollectiveTimeout`` saying why (the P2P kernels already refuse once their error word is set).
"""

import atexit
import contextlib
import weakref

from dpgather.core import CollectiveTimeout, InputError

from ._log import get_logger

__all__ = ["State", "register_at_exit", "free_duplicate"]

log = get_logger("facade")


class State:
    """Whether a ``DpAttention`` is usable (module docstring).

    Attributes:
        closed: ``close()`` was called. aborted: why it was aborted, or None.
    """

    def __init__(self):
        self.closed = False
        self.aborted = None
        self._comms = ()

    def attach(self, comms):
        """The communicators :meth:`abort` aborts (sub-communicators first)."""
        self._comms = tuple(c for c in comms if c is not None)

    def check(self):
        """Raise unless usable: InputError once closed, CollectiveTimeout once aborted."""
        if self.closed:
            raise InputError("this DpAttention is closed")
        if self.aborted is not None:
            raise CollectiveTimeout(f"this DpAttention was aborted: {self.aborted}; create a new one on every rank")

    def abort(self, reason):
        """Abort the communicators (local, immediate) and refuse further use."""
        if self.aborted is None:
            self.aborted = reason
            log.warning("DpAttention aborted: %s", reason)
        for c in self._comms:
            try:
                c.abort()
            except Exception:
                pass

    @contextlib.contextmanager
    def guard(self, what):
        """A ``CollectiveTimeout`` inside aborts (naming ``what``), then propagates."""
        try:
            yield
        except CollectiveTimeout as e:
            self.abort(f"{what} timed out ({e})")
            raise


def free_duplicate(comm, orphans, *users):
    """Free dpgather's duplicate ``comm`` of the caller's communicator (``MPI_Comm_free``, local),
    unless a request a timeout abandoned may still use it -- ``orphans`` of the construction, or
    a user (the sync, the tp communicator) whose ``abandoned`` is true: then it is leaked on
    purpose, like every communicator after a timeout."""
    if comm is None or orphans or any(u is not None and u.abandoned for u in users):
        return
    from dpgather.dist.base import load_mpi

    if not load_mpi().Is_finalized():
        comm.Free()


_LIVE = weakref.WeakSet()
_HOOKED = False


def _close_all():
    for obj in list(_LIVE):
        try:
            obj.close()
        except Exception:
            pass


def register_at_exit(obj):
    """Close ``obj`` at interpreter exit, before mpi4py finalizes MPI (atexit runs handlers in
    reverse order and mpi4py registered its own when MPI was imported). Closing is local, so a
    rank whose peers are gone exits promptly."""
    global _HOOKED
    _LIVE.add(obj)
    if not _HOOKED:
        atexit.register(_close_all)
        _HOOKED = True
