"""MPI scenarios for MpiHostCommunicator; run with ``mpiexec -n N python comm_scenarios.py ...``.

    collectives [SEED]          every collective x dtype x shape on COMM_WORLD and on the split
                                sub-communicators (every divisor A of N, color = rank // A);
                                integer inputs overflow on purpose (sums wrap, as in C and NCCL).
    timeout OP [TIMEOUT_S]      rank 0 skips OP (all_reduce | allgather_record | barrier | all_gatherv)
                                that the others enter; they must raise CollectiveTimeout within
                                ~TIMEOUT_S and then fail fast; then every rank leaves normally
                                (MPI_Finalize with the abandoned request pending returns at once
                                under MPICH 4 and Open MPI 4.1 / 5.0: measured).

Every rank reports its failures with ``mpi_harness.report`` (the test asserts on them).

Inputs are a pure function of (seed, tag, rank), so every rank computes every peer's input and the
NumPy reference locally. Outputs are poisoned first; results are asserted collectively.
"""

import sys
import time
import traceback
import zlib

import ml_dtypes
import numpy as np
from mpi4py import MPI

from mpi_harness import report
from dpgather.core.errors import CollectiveTimeout, InputError
from dpgather.dist import MpiHostCommunicator

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
}
SHAPES = ((0, 3), (1, 1), (3, 5), (2, 8))  # (rows per rank, width): zero rows and odd widths
SEED = 1234
WORLD = MPI.COMM_WORLD


def data(tag, r, rows, w, dt):
    """Deterministic input of rank r for tag; float values are multiples of 0.5 in [-4, 4] so
    every sum over <= 4 ranks is exact in float16/bfloat16 too."""
    rng = np.random.default_rng([SEED, zlib.crc32(repr(tag).encode()), r])
    if dt.kind == "f" or dt == DTYPES["bfloat16"]:
        return (rng.integers(-8, 9, size=(rows, w)) * 0.5).astype(dt)
    info = np.iinfo(dt)
    # the whole range: sums of two ranks overflow, and must wrap modulo 2**bits
    return rng.integers(info.min, info.max, size=(rows, w), endpoint=True, dtype=dt)


def total(arrs, dt):
    """Reference sum in the dtype's own arithmetic (exact inputs; integers wrap modulo 2**bits,
    as C and NCCL define it)."""
    if dt.kind in "iu":
        out = np.zeros(arrs[0].shape, dtype=dt)
        for a in arrs:
            out += a  # NumPy integer addition wraps
        return out
    return sum(a.astype(np.float64) for a in arrs).astype(dt)


def poison(shape, dt):
    out = np.empty(shape, dtype=dt)
    out.view(np.uint8)[...] = 0xA5
    return out


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


class Checker:
    def __init__(self, label):
        self.label = label
        self.fails = []

    def check(self, ok, what):
        if not ok:
            self.fails.append(f"{self.label}: {what}")

    def raises(self, exc, fn, what):
        try:
            fn()
        except exc:
            return
        except Exception as e:  # noqa: BLE001
            self.fails.append(f"{self.label}: {what}: raised {type(e).__name__}: {e}")
            return
        self.fails.append(f"{self.label}: {what}: did not raise {exc.__name__}")


def run_collectives(c, label, color=0):
    """Every collective on communicator c; returns the list of failures on this rank."""
    ck = Checker(label)
    n, me = c.size, c.rank
    for dname, dt in DTYPES.items():
        for m, w in SHAPES:
            key = (color, dname, m, w)
            # all_gather
            ins = [data(("ag",) + key, r, m, w, dt) for r in range(n)]
            send = ins[me].copy()
            recv = poison((n * m, w), dt)
            c.all_gather(send, recv)
            ck.check(same(recv, np.concatenate(ins)), f"all_gather {key}")
            ck.check(same(send, ins[me]), f"all_gather send modified {key}")

            # all_reduce out of place and in place
            ins = [data(("ar",) + key, r, m, w, dt) for r in range(n)]
            ref = total(ins, dt)
            send = ins[me].copy()
            recv = poison((m, w), dt)
            c.all_reduce(send, recv)
            ck.check(same(recv, ref), f"all_reduce {key}")
            ck.check(same(send, ins[me]), f"all_reduce send modified {key}")
            x = ins[me].copy()
            c.all_reduce(x, x)
            ck.check(same(x, ref), f"all_reduce in place {key}")

            # reduce_scatter
            ins = [data(("rs",) + key, r, n * m, w, dt) for r in range(n)]
            ref = total([a[me * m : (me + 1) * m] for a in ins], dt)
            send = ins[me].copy()
            recv = poison((m, w), dt)
            c.reduce_scatter(send, recv)
            ck.check(same(recv, ref), f"reduce_scatter {key}")
            ck.check(same(send, ins[me]), f"reduce_scatter send modified {key}")

        # v-variants: uneven counts with zeros, all zero, and one rank holding everything
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
                send = ins[me].copy()  # one row more than counts[me]: must not be sent
                recv = poison((int(off[-1]), w), dt)
                c.all_gatherv(send, recv, counts)
                ref = np.concatenate([ins[r][: counts[r]] for r in range(n)])
                ck.check(same(recv, ref), f"all_gatherv {key} counts={counts.tolist()}")
                ck.check(same(send, ins[me]), f"all_gatherv send modified {key}")

                ins = [data(("rsv",) + key, r, int(off[-1]), w, dt) for r in range(n)]
                send = ins[me].copy()
                recv = poison((int(counts[me]) + 2, w), dt)
                extra = recv[counts[me] :].copy()
                c.reduce_scatterv(send, recv, counts.tolist() if case % 2 else counts)
                ref = total([a[off[me] : off[me + 1]] for a in ins], dt)
                ck.check(same(recv[: counts[me]], ref), f"reduce_scatterv {key} counts={counts.tolist()}")
                ck.check(same(recv[counts[me] :], extra), f"reduce_scatterv wrote past counts {key}")
                ck.check(same(send, ins[me]), f"reduce_scatterv send modified {key}")

    # bfloat16 / float16 as 2-byte storage with the logical dtype given explicitly
    for dname in ("bfloat16", "float16"):
        dt = DTYPES[dname]
        ins = [data(("store", color, dname), r, 3, 5, dt) for r in range(n)]
        recv = poison((3, 5), np.uint16)
        c.all_reduce(ins[me].view(np.uint16), recv, dtype=dname)
        ck.check(same(recv.view(dt), total(ins, dt)), f"all_reduce {dname} as uint16 storage")
        recv = poison((n * 3, 5), np.uint16)
        c.all_gather(ins[me].view(np.uint16), recv, dtype=dname)
        ck.check(same(recv.view(dt), np.concatenate(ins)), f"all_gather {dname} as uint16 storage")

    # rounding: with two ranks the pairwise sum is order-independent, so it is checkable exactly
    if n == 2:
        for dname in ("float32", "float16", "bfloat16"):
            dt = DTYPES[dname]
            ins = [np.random.default_rng([SEED, 7, color, r]).standard_normal((4, 33)).astype(dt) for r in range(2)]
            ref = (ins[0].astype(np.float32) + ins[1].astype(np.float32)).astype(dt)
            recv = poison((4, 33), dt)
            c.all_reduce(ins[me], recv)
            ck.check(same(recv, ref), f"all_reduce rounding {dname}")
            recv = poison((2, 33), dt)
            c.reduce_scatter(ins[me], recv)
            ck.check(same(recv, ref[me * 2 : me * 2 + 2]), f"reduce_scatter rounding {dname}")

    # the per-step sync, repeated with changing records
    table = np.empty((n, 8), dtype=np.int32)
    for step in range(50):
        rec = np.arange(8, dtype=np.int32) * 3 + 1000 * me + step + color
        table.fill(-7)
        c.allgather_record(rec, table)
        exp = np.arange(8, dtype=np.int32)[None, :] * 3 + 1000 * np.arange(n)[:, None] + step + color
        ck.check(np.array_equal(table, exp), f"allgather_record step {step}")
    c.barrier()

    # invalid arguments raise InputError locally (on every rank: no collective is issued)
    f32 = np.zeros((2, 4), np.float32)
    ck.raises(InputError, lambda: c.all_gather(f32, np.zeros((n * 2 + 1, 4), np.float32)), "all_gather recv rows")
    ck.raises(InputError, lambda: c.all_gather(np.zeros((4, 4), np.float32)[:, ::2], np.zeros((n * 4, 2), np.float32)), "non-contiguous send")
    ck.raises(InputError, lambda: c.all_reduce(f32, np.zeros((2, 4), np.float64)), "dtype mismatch")
    ck.raises(InputError, lambda: c.all_reduce(f32, np.zeros((2, 5), np.float32)), "width mismatch")
    ck.raises(InputError, lambda: c.all_reduce(f32, np.zeros((2, 4), np.float32), dtype="bfloat16"), "bfloat16 on 4-byte elements")
    ck.raises(InputError, lambda: c.all_reduce(f32, np.zeros((2, 4), np.float32), dtype="complex64"), "unknown dtype")
    ck.raises(InputError, lambda: c.all_reduce(np.zeros((2, 4), np.uint16), np.zeros((2, 4), np.uint16)), "uint16 without dtype")
    ck.raises(InputError, lambda: c.all_reduce(np.zeros(4, np.float32), np.zeros(4, np.float32)), "1-D buffers")
    big = np.zeros((4, 4), np.float32)
    ck.raises(InputError, lambda: c.all_reduce(big[:2], big[1:3]), "overlapping send/recv")
    ck.raises(InputError, lambda: c.all_gatherv(f32, np.zeros((2, 4), np.float32), [1] * (n + 1)), "counts length")
    ck.raises(InputError, lambda: c.all_gatherv(f32, np.zeros((2, 4), np.float32), [-1] + [1] * (n - 1)), "negative counts")
    ck.raises(InputError, lambda: c.all_gatherv(f32, np.zeros((3 * n, 4), np.float32), [3] * n), "send shorter than counts")
    ck.raises(InputError, lambda: c.reduce_scatterv(f32, np.zeros((5, 4), np.float32), [5] * n), "reduce_scatterv send rows")
    ck.raises(InputError, lambda: c.allgather_record(np.zeros(8, np.int64), np.zeros((n, 8), np.int32)), "record dtype")
    ck.raises(InputError, lambda: c.allgather_record(np.zeros(8, np.int32), np.zeros((n + 1, 8), np.int32)), "table shape")
    ro = np.zeros((n, 8), np.int32)
    ro.flags.writeable = False
    ck.raises(InputError, lambda: c.allgather_record(np.zeros(8, np.int32), ro), "read-only table")
    c.barrier()  # still in step after the local errors
    return ck.fails


def divisors(n):
    return [a for a in range(1, n + 1) if n % a == 0]


def scenario_collectives():
    rank, size = WORLD.rank, WORLD.size
    fails = []

    def expect(ok, msg):
        if not ok:
            fails.append(msg)

    world = MpiHostCommunicator(timeout_s=30)
    expect(world.rank == rank and world.size == size, "rank/size")
    fails += run_collectives(world, "world")

    for a in divisors(size):
        sub = world.split(rank // a, rank)
        ok = sub.size == a and sub.rank == rank % a and sub.timeout_s == world.timeout_s
        expect(ok, f"split A={a}: got rank {sub.rank} size {sub.size}")
        fails += run_collectives(sub, f"split A={a}", color=rank // a)
        sub.close()
        sub.close()  # idempotent
        ck = Checker(f"closed A={a}")
        ck.raises(CollectiveTimeout, sub.barrier, "call after close")
        fails += ck.fails

    # key orders the ranks of the new communicator
    rev = world.split(0, size - 1 - rank)
    recv = np.empty((size, 1), np.int64)
    rev.all_gather(np.array([[rank]], np.int64), recv)
    expect(rev.rank == size - 1 - rank and recv[:, 0].tolist() == list(range(size))[::-1],
           f"reversed split: rank {rev.rank}, order {recv[:, 0].tolist()}")
    rev.close()

    # color None opts out (gets None back); the others form one communicator
    part = world.split(None if rank % 2 else 0, rank)
    ok = part is None if rank % 2 else (part is not None and part.size == (size + 1) // 2)
    expect(ok, f"split with color None: got {part!r}")
    if part is not None:
        part.barrier()
        part.close()

    # abort() is local and immediate: every later call fails at once
    mine = MpiHostCommunicator(WORLD, timeout_s=30)
    mine.abort()
    t0 = time.monotonic()
    ck = Checker("abort")
    ck.raises(CollectiveTimeout, mine.barrier, "barrier after abort")
    ck.raises(CollectiveTimeout, lambda: mine.allgather_record(np.zeros(8, np.int32), np.zeros((size, 8), np.int32)),
              "allgather_record after abort")
    ck.check(time.monotonic() - t0 < 0.5, "calls after abort were not immediate")
    mine.close()
    fails += ck.fails

    world.barrier()
    world.close()
    world.close()
    report(rank, failures=fails[:50], nfailures=len(fails))


def scenario_timeout(op, timeout_s):
    rank, size = WORLD.rank, WORLD.size
    ok, msg = True, ""
    try:
        # A private context: the final sync on COMM_WORLD cannot match the abandoned request.
        comm = MpiHostCommunicator(WORLD.Dup(), timeout_s=timeout_s)
        comm.barrier()
        # one good record all-gather first: later ones take the shared-memory path (if enabled)
        comm.allgather_record(np.zeros(8, np.int32), np.zeros((size, 8), np.int32))
        x = np.ones((4, 3), np.float32)
        y = np.empty_like(x)
        calls = {
            "all_reduce": lambda: comm.all_reduce(x, y),
            "all_gatherv": lambda: comm.all_gatherv(x, np.empty((4 * size, 3), np.float32), [4] * size),
            "allgather_record": lambda: comm.allgather_record(np.zeros(8, np.int32), np.zeros((size, 8), np.int32)),
            "barrier": comm.barrier,
        }
        if rank != 0:
            t0 = time.monotonic()
            try:
                calls[op]()
                ok, msg = False, f"{op} returned although rank 0 never entered it"
            except CollectiveTimeout as e:
                el = time.monotonic() - t0
                text = str(e)
                if not (0.95 * timeout_s <= el <= timeout_s + 2.0):
                    ok, msg = False, f"timeout took {el:.3f}s for timeout_s={timeout_s}"
                elif op not in text or f"rank {rank}" not in text or f"{timeout_s:g}" not in text:
                    ok, msg = False, f"message does not name op/rank/timeout: {text}"
            for name in ("all_reduce", "barrier", "allgather_record"):
                t0 = time.monotonic()
                try:
                    calls[name]()
                    ok, msg = False, f"{name} after the timeout did not raise"
                except CollectiveTimeout as e:
                    el = time.monotonic() - t0
                    if el > 0.05 or "broken" not in str(e):
                        ok, msg = False, f"{name} after the timeout: {el:.3f}s, {e}"
        ok = WORLD.allreduce(ok, op=MPI.LAND)
    except BaseException:  # noqa: BLE001 - report whatever happened
        ok, msg = False, traceback.format_exc()
    report(rank, failures=[] if ok else [msg or "a peer failed"])


def main(argv):
    global SEED
    what = argv[1] if len(argv) > 1 else "collectives"
    if what == "collectives":
        if len(argv) > 2:
            SEED = int(argv[2])
        scenario_collectives()
    elif what == "timeout":
        scenario_timeout(argv[2] if len(argv) > 2 else "all_reduce", float(argv[3]) if len(argv) > 3 else 1.0)
    else:
        raise SystemExit(f"unknown scenario {what!r}; expected collectives | timeout")


if __name__ == "__main__":
    main(sys.argv)
