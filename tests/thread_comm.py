"""T ranks in one process: threads behind a barrier, implementing the trusted communicator
primitives (``dpgather.dist.base.Ops``) on NumPy rows, so the data plane can be unit-tested in a
single process (tests/test_rooms.py). Written from docs/internals.md ("Communicators"), not from
the library's communicators: an independent twin.

Sums: integers wrap (NumPy's own arithmetic), floats are summed in float64 in rank order and
rounded once to the dtype (the data-plane tests compare sums within a tolerance).
"""

import threading

import numpy as np


class Group:
    """``size`` ranks exchanging through shared slots; every call is collective."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots = [None] * size

    def exchange(self, rank, value):
        """Every rank's ``value``, in rank order (two barriers: publish, then read)."""
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


def _sum(arrs, dt):
    if dt.kind in "iu":
        out = arrs[0].copy()
        for a in arrs[1:]:
            out += a
        return out
    acc = np.zeros(arrs[0].shape, np.float64)
    for a in arrs:
        acc += a.astype(np.float64)
    return acc.astype(dt)


class ThreadOps:
    """The five trusted primitives of one rank of a :class:`Group` (counts and offsets in rows)."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def all_gather(self, send, recv, logical, stream=None):
        parts = self.group.exchange(self.rank, send.copy())
        m = send.shape[0]
        for r, p in enumerate(parts):
            recv[r * m:(r + 1) * m] = p

    def all_gatherv(self, send, recv, counts, offsets, logical, stream=None):
        parts = self.group.exchange(self.rank, send[:counts[self.rank]].copy())
        for r, p in enumerate(parts):
            recv[offsets[r]:offsets[r] + counts[r]] = p

    def all_reduce(self, send, recv, logical, stream=None):
        parts = self.group.exchange(self.rank, send.copy())
        recv[...] = _sum(parts, send.dtype)

    def reduce_scatter(self, send, recv, logical, stream=None):
        parts = self.group.exchange(self.rank, send.copy())
        m = recv.shape[0]
        recv[...] = _sum([p[self.rank * m:(self.rank + 1) * m] for p in parts], send.dtype)

    def reduce_scatterv(self, send, recv, counts, offsets, logical, stream=None):
        parts = self.group.exchange(self.rank, send.copy())
        lo, c = offsets[self.rank], counts[self.rank]
        recv[:c] = _sum([p[lo:lo + c] for p in parts], send.dtype)


class ThreadComm:
    """What the data plane reads of a communicator: ``ops``, ``rank``, ``size``."""

    def __init__(self, group, rank):
        self.ops = ThreadOps(group, rank)
        self.rank, self.size = rank, group.size


def run_ranks(T, fn):
    """Run ``fn(rank)`` on ``T`` threads; returns the results in rank order, re-raising the
    first failure."""
    out, errors = [None] * T, []

    def body(r):
        try:
            out[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(T)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out
