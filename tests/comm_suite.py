"""One protocol suite for every communicator: the checks are written once and bound to a backend.

``run_suite(binding, comm, label)`` checks every collective of the ``Communicator`` protocol
(dpgather.dist.base) on ``comm``: every dtype (integers overflow on purpose: sums must wrap, as
in C and NCCL), zero-row and odd-width shapes, uneven / zero / one-rank v-counts, in-place
all-reduce, exact float rounding at two ranks, the send buffer never modified, nothing written
past ``counts[rank]``, ``split`` for every divisor with key order and opting out, ``barrier``,
``wait``, ``abort`` (later calls fail at once), ``close`` (idempotent, later calls fail), and the
same ``InputError`` for every bad argument on every backend. Inputs are a pure function of
(seed, tag, rank), so each rank computes every peer's input and the NumPy reference locally;
outputs are poisoned before every call.

A :class:`Binding` says how arrays live on a backend: ``host`` (NumPy) and ``cuda`` (CuPy; a
non-default stream and a CUDA graph capture are checked there too). The MPI scenarios in
``tests/mpi/comm_scenarios.py`` run the suite under ``mpiexec`` and report the failures.
"""

import os
import sys
import time
import zlib

import ml_dtypes
import numpy as np

from dpgather.core.errors import CollectiveTimeout, InputError

_MPI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi")
if _MPI_DIR not in sys.path:
    sys.path.insert(0, _MPI_DIR)
from scenario_kit import Checker  # noqa: E402  (the collector of every test script)

BF16 = np.dtype(ml_dtypes.bfloat16)
#: logical name -> host dtype of the reference data
DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": BF16,
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
}
SHAPES = ((0, 3), (1, 1), (3, 5), (2, 8))  # (rows per rank, width): zero rows and odd widths
SEED = 1234


class Binding:
    """How a backend holds row buffers.

    Attributes:
        name: ``"host"`` or ``"cuda"``. xp: the array module.
    """

    def __init__(self, name):
        self.name = name
        if name == "host":
            self.xp = np
        else:
            import cupy

            self.xp = cupy

    def dev(self, a):
        """Host array -> backend array (bfloat16 as uint16 storage on CUDA)."""
        if self.name == "host":
            return np.ascontiguousarray(a)
        if a.dtype == BF16:
            a = a.view(np.uint16)
        return self.xp.asarray(np.ascontiguousarray(a))

    def host(self, a, like=None):
        """Backend array -> host array (viewed as ``like``'s dtype when given)."""
        h = a if self.name == "host" else self.xp.asnumpy(a)
        if like is not None and h.dtype != like:
            h = h.view(like)
        return h

    def poison(self, shape, dt):
        h = np.empty(shape, dtype=dt)
        h.view(np.uint8)[...] = 0xA5
        return self.dev(h)

    def logical_kw(self, dt):
        """``dtype=`` keyword for arrays of host dtype ``dt`` (bfloat16 storage needs it on CUDA)."""
        return {"dtype": "bfloat16"} if (dt == BF16 and self.name == "cuda") else {}


def data(tag, r, rows, w, dt):
    """Deterministic input of rank r for tag; floats are multiples of 0.5 in [-4, 4] so every sum
    over <= 8 ranks is exact in float16/bfloat16 too; integers span their whole range."""
    rng = np.random.default_rng([SEED, zlib.crc32(repr(tag).encode()), r])
    if dt.kind == "f" or dt == BF16:
        return (rng.integers(-8, 9, size=(rows, w)) * 0.5).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=(rows, w), endpoint=True, dtype=dt)


def total(arrs, dt):
    """Reference sum in the dtype's own arithmetic (integers wrap modulo 2**bits)."""
    if dt.kind in "iu":
        out = np.zeros(arrs[0].shape, dtype=dt)
        for a in arrs:
            out += a
        return out
    return sum(a.astype(np.float64) for a in arrs).astype(dt)


def same(a, b):
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                 np.ascontiguousarray(b).view(np.uint8))


def collectives(bd, c, ck, color=0, stream=None):
    """Every data collective of the protocol on ``c``, every dtype and shape."""
    n, me = c.size, c.rank
    kw_s = {} if stream is None else {"stream": stream}
    for dname, dt in DTYPES.items():
        lk = bd.logical_kw(dt)
        for m, w in SHAPES:
            key = (color, dname, m, w)
            ins = [data(("ag",) + key, r, m, w, dt) for r in range(n)]
            send = bd.dev(ins[me])
            recv = bd.poison((n * m, w), dt)
            c.all_gather(send, recv, **lk, **kw_s)
            c.wait(stream)
            ck.ok(same(bd.host(recv, dt), np.concatenate(ins)), f"all_gather {key}")
            ck.ok(same(bd.host(send, dt), ins[me]), f"all_gather send modified {key}")

            ins = [data(("ar",) + key, r, m, w, dt) for r in range(n)]
            ref = total(ins, dt)
            send = bd.dev(ins[me])
            recv = bd.poison((m, w), dt)
            c.all_reduce(send, recv, **lk, **kw_s)
            c.wait(stream)
            ck.ok(same(bd.host(recv, dt), ref), f"all_reduce {key}")
            ck.ok(same(bd.host(send, dt), ins[me]), f"all_reduce send modified {key}")
            x = bd.dev(ins[me])
            c.all_reduce(x, x, **lk, **kw_s)
            c.wait(stream)
            ck.ok(same(bd.host(x, dt), ref), f"all_reduce in place {key}")

            ins = [data(("rs",) + key, r, n * m, w, dt) for r in range(n)]
            ref = total([a[me * m:(me + 1) * m] for a in ins], dt)
            send = bd.dev(ins[me])
            recv = bd.poison((m, w), dt)
            c.reduce_scatter(send, recv, **lk, **kw_s)
            c.wait(stream)
            ck.ok(same(bd.host(recv, dt), ref), f"reduce_scatter {key}")
            ck.ok(same(bd.host(send, dt), ins[me]), f"reduce_scatter send modified {key}")

        # v-variants: uneven counts with zeros, all zero, one rank holding everything, increasing
        for case, counts in enumerate((
            [(r * 5 + 3) % 4 for r in range(n)],
            [0] * n,
            [0] * (n - 1) + [3],
            [r + 1 for r in range(n)],
        )):
            counts = np.array(counts, dtype=np.int64)
            off = np.concatenate([[0], np.cumsum(counts)])
            for w in (1, 7):
                key = (color, dname, case, w)
                ins = [data(("agv",) + key, r, int(counts[r]) + 1, w, dt) for r in range(n)]
                send = bd.dev(ins[me])  # one row more than counts[me]: must not be sent
                recv = bd.poison((int(off[-1]) + 1, w), dt)  # one row more: must not be written
                tail = bd.host(recv, dt)[off[-1]:].copy()
                c.all_gatherv(send, recv, counts, **lk, **kw_s)
                c.wait(stream)
                got = bd.host(recv, dt)
                ref = np.concatenate([ins[r][:counts[r]] for r in range(n)])
                ck.ok(same(got[:off[-1]], ref), f"all_gatherv {key} counts={counts.tolist()}")
                ck.ok(same(got[off[-1]:], tail), f"all_gatherv wrote past sum(counts) {key}")

                ins = [data(("rsv",) + key, r, int(off[-1]), w, dt) for r in range(n)]
                send = bd.dev(ins[me])
                recv = bd.poison((int(counts[me]) + 2, w), dt)
                extra = bd.host(recv, dt)[counts[me]:].copy()
                c.reduce_scatterv(send, recv, counts.tolist() if case % 2 else counts, **lk, **kw_s)
                c.wait(stream)
                got = bd.host(recv, dt)
                ref = total([a[off[me]:off[me + 1]] for a in ins], dt)
                ck.ok(same(got[:counts[me]], ref), f"reduce_scatterv {key} counts={counts.tolist()}")
                ck.ok(same(got[counts[me]:], extra), f"reduce_scatterv wrote past counts {key}")
                ck.ok(same(bd.host(send, dt), ins[me]), f"reduce_scatterv send modified {key}")

    # 2-byte floats as uint16 storage with the logical dtype given explicitly (both backends)
    for dname in ("bfloat16", "float16"):
        dt = DTYPES[dname]
        ins = [data(("store", color, dname), r, 3, 5, dt) for r in range(n)]
        recv = bd.poison((3, 5), np.uint16)
        c.all_reduce(bd.dev(ins[me].view(np.uint16)), recv, dtype=dname, **kw_s)
        c.wait(stream)
        ck.ok(same(bd.host(recv).view(dt), total(ins, dt)), f"all_reduce {dname} as uint16 storage")
        recv = bd.poison((n * 3, 5), np.uint16)
        c.all_gather(bd.dev(ins[me].view(np.uint16)), recv, dtype=dname, **kw_s)
        c.wait(stream)
        ck.ok(same(bd.host(recv).view(dt), np.concatenate(ins)), f"all_gather {dname} as uint16 storage")

    # rounding: with two ranks the pairwise sum is order-independent, so it is checkable exactly
    if n == 2:
        for dname in ("float32", "float16", "bfloat16"):
            dt = DTYPES[dname]
            lk = bd.logical_kw(dt)
            ins = [np.random.default_rng([SEED, 7, color, r]).standard_normal((4, 33)).astype(dt) for r in range(2)]
            ref = (ins[0].astype(np.float32) + ins[1].astype(np.float32)).astype(dt)
            recv = bd.poison((4, 33), dt)
            c.all_reduce(bd.dev(ins[me]), recv, **lk, **kw_s)
            c.wait(stream)
            ck.ok(same(bd.host(recv, dt), ref), f"all_reduce rounding {dname}")
            recv = bd.poison((2, 33), dt)
            c.reduce_scatter(bd.dev(ins[me]), recv, **lk, **kw_s)
            c.wait(stream)
            ck.ok(same(bd.host(recv, dt), ref[me * 2:me * 2 + 2]), f"reduce_scatter rounding {dname}")


def bad_arguments(bd, c, ck):
    """Invalid arguments raise InputError locally (on every rank: no collective is issued)."""
    n = c.size
    f32 = bd.dev(np.zeros((2, 4), np.float32))

    def z(shape, dt):
        return bd.dev(np.zeros(shape, dt))

    ck.raises(InputError, lambda: c.all_gather(f32, z((n * 2 + 1, 4), np.float32)), "all_gather recv rows")
    ck.raises(InputError, lambda: c.all_gather(z((4, 4), np.float32)[:, ::2], z((n * 4, 2), np.float32)),
              "non-contiguous send")
    ck.raises(InputError, lambda: c.all_reduce(f32, z((2, 4), np.float64)), "dtype mismatch")
    ck.raises(InputError, lambda: c.all_reduce(f32, z((2, 5), np.float32)), "width mismatch")
    ck.raises(InputError, lambda: c.all_reduce(f32, z((2, 4), np.float32), dtype="bfloat16"),
              "bfloat16 on 4-byte elements")
    ck.raises(InputError, lambda: c.all_reduce(f32, z((2, 4), np.float32), dtype="complex64"), "unknown dtype")
    ck.raises(InputError, lambda: c.all_reduce(z((2, 4), np.uint16), z((2, 4), np.uint16)), "uint16 without dtype")
    ck.raises(InputError, lambda: c.all_reduce(z(4, np.float32), z(4, np.float32)), "1-D buffers")
    big = z((4, 4), np.float32)
    ck.raises(InputError, lambda: c.all_reduce(big[:2], big[1:3]), "overlapping send/recv")
    ck.raises(InputError, lambda: c.all_gatherv(f32, z((2, 4), np.float32), [1] * (n + 1)), "counts length")
    ck.raises(InputError, lambda: c.all_gatherv(f32, z((2, 4), np.float32), [-1] + [1] * (n - 1)), "negative counts")
    ck.raises(InputError, lambda: c.all_gatherv(f32, z((3 * n, 4), np.float32), [3] * n), "send shorter than counts")
    ck.raises(InputError, lambda: c.reduce_scatterv(f32, z((5, 4), np.float32), [5] * n), "reduce_scatterv send rows")
    ck.raises(InputError, lambda: c.split(1.5, 0), "split color not an int")
    ck.raises(InputError, lambda: c.split(-2, 0), "split negative color")
    ck.raises(InputError, lambda: c.split(0, None), "split key None")
    c.barrier()  # still in step after the local errors


def divisors(n):
    return [a for a in range(1, n + 1) if n % a == 0]


def run_suite(bd, world, label, make_comm):
    """The whole suite; returns (failures, checks). ``make_comm()`` builds a fresh communicator
    over the same ranks as ``world`` (for abort/close checks)."""
    ck = Checker(label)
    rank, size = world.rank, world.size
    collectives(bd, world, ck)
    bad_arguments(bd, world, ck)
    if bd.name == "cuda":
        s = bd.xp.cuda.Stream(non_blocking=True)
        sub = Checker(f"{label} (non-default stream)")
        collectives_one_dtype(bd, world, sub, s)
        ck.merge(sub)
    for a in divisors(size):
        sub = world.split(rank // a, rank)
        ck.ok(sub.size == a and sub.rank == rank % a and sub.timeout_s == world.timeout_s,
                 f"split A={a}: got rank {sub.rank} size {sub.size}")
        inner = Checker(f"{label} split A={a}")
        collectives(bd, sub, inner, color=rank // a)
        ck.merge(inner)
        sub.close()
        sub.close()  # idempotent
        ck.raises(CollectiveTimeout, sub.barrier, f"split A={a}: call after close")
    rev = world.split(0, size - 1 - rank)
    recv = bd.dev(np.full((size, 1), -1, np.int64))
    rev.all_gather(bd.dev(np.array([[rank]], np.int64)), recv)
    rev.wait()
    order = bd.host(recv)[:, 0].tolist()
    ck.ok(rev.rank == size - 1 - rank and order == list(range(size))[::-1],
             f"reversed split: rank {rev.rank}, order {order}")
    rev.close()
    part = world.split(None if rank % 2 else 0, rank)
    ok = part is None if rank % 2 else (part is not None and part.size == (size + 1) // 2)
    ck.ok(ok, f"split with color None: got {part!r}")
    if part is not None:
        part.barrier()
        part.close()
    mine = make_comm()
    mine.abort()
    t0 = time.monotonic()
    ck.raises(CollectiveTimeout, mine.barrier, "barrier after abort")
    ck.raises(CollectiveTimeout, lambda: mine.all_gather(bd.dev(np.zeros((1, 1), np.float32)),
                                                         bd.dev(np.zeros((size, 1), np.float32))),
              "all_gather after abort")
    ck.ok(time.monotonic() - t0 < 0.5, "calls after abort were not immediate")
    mine.close()
    world.barrier()
    return ck.fails, ck.checks


def collectives_one_dtype(bd, c, ck, stream):
    """A short pass on a non-default stream (CUDA): bfloat16 sums and v-gathers."""
    n, me = c.size, c.rank
    dt = BF16
    ins = [data(("stream-ar",), r, 3, 9, dt) for r in range(n)]
    recv = bd.poison((3, 9), dt)
    c.all_reduce(bd.dev(ins[me]), recv, dtype="bfloat16", stream=stream)
    c.wait(stream)
    ck.ok(same(bd.host(recv, dt), total(ins, dt)), "all_reduce bfloat16 on a non-default stream")
    counts = [r % 3 for r in range(n)]
    off = np.concatenate([[0], np.cumsum(counts)])
    ins = [data(("stream-agv",), r, counts[r], 4, dt) for r in range(n)]
    recv = bd.poison((int(off[-1]), 4), dt)
    c.all_gatherv(bd.dev(ins[me]), recv, counts, dtype="bfloat16", stream=stream)
    c.wait(stream)
    ck.ok(same(bd.host(recv, dt), np.concatenate(ins)), "all_gatherv on a non-default stream")
