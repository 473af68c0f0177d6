"""MPI scenarios for the host twins of the P2P transports; run with ``mpiexec -n N python p2p_scenarios.py SCENARIO [ARG] [--push]``.

Without ``--push`` they run the pull transport's twin (``HostPull``, tests/p2p_cases.py against
tests/pull_reference.py); with ``--push`` the push transport's (``HostPush``, tests/push_cases.py
against tests/push_reference.py). The failure scenarios are the same for both:

    matrix [SEED]        every case of tests/p2p_cases.py against pull_ref (all dtypes,
                         gather replicate/partial A=1,2, combine, zero and short counts, graph
                         buckets, clamps, in place), outputs poisoned, every row checked; then
                         the same cases again on a transport whose epoch starts at 2^32 - 3,
                         so the 32-bit epoch in the flags wraps; both parities throughout
    mismatch             the last rank enters one collective with another signature: every
                         rank raises InconsistentStepError at once with error() == 2, then refuses
    timeout [TIMEOUT_S]  rank 0 skips one collective: the others raise CollectiveTimeout within
                         timeout + margin (error 1); rank 0's late call completes (the others had
                         signalled that epoch), its next one times out as well
    close [TIMEOUT_S]    rank 0 closes (local, immediate) while the others call again: they time
                         out, nobody hangs; close is idempotent and later calls refuse
    config               ranks pass different capacities: ConfigError on every rank

Every rank reports with ``mpi_harness.report``; the tests assert on those results.
"""

import os
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import p2p_cases as pc  # noqa: E402
import push_cases  # noqa: E402
import push_reference  # noqa: E402
from mpi_harness import report  # noqa: E402
from dpgather.core.errors import CollectiveTimeout, ConfigError, InconsistentStepError, InputError  # noqa: E402
import pull_reference as ref  # noqa: E402
from dpgather.dist.pull import ERR_SIGNATURE, ERR_TIMEOUT, HostPull  # noqa: E402
from dpgather.dist.push import HostPush  # noqa: E402

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
PUSH = "--push" in sys.argv
#: The transport class, its checked entry, its word and its first epoch under test.
Transport = HostPush if PUSH else HostPull
VERB, NAME, SEGMENT = ("push", "push", "dpgather-push") if PUSH else ("pull", "p2p", "dpgather-pull")


def call(t, inp, out, desc, off, row_bytes, dtype):
    """The transport's checked entry: ``push`` or ``pull``."""
    getattr(t, VERB)(inp, out, desc, off, row_bytes=row_bytes, dtype=dtype)


def run_case(t, case, seed, index):
    """Run one case on transport ``t``; return a failure message or None."""
    ins, exp = pc.expected(case, seed, index, SIZE)
    inp = ins[RANK].copy()
    out = inp if case.inplace else pc.poisoned(case.out_rows[RANK], case.width, case.dtype)
    t.pull(inp, out, case.descs[RANK], case.desc_off, row_bytes=case.row_bytes, dtype=case.dtype)
    bad = pc.check(out, exp[RANK])
    if bad:
        return f"{case.name} [{case.dtype} w={case.width}]: {bad}"
    if not case.inplace and pc.check(inp, ins[RANK]):
        return f"{case.name}: the input was modified"
    return None


def expect_input_errors(calls, fails):
    """Every call of ``{what: fn}`` must raise InputError (a local refusal); else a failure."""
    for what, fn in calls.items():
        try:
            fn()
            fails.append(f"bad argument ({what}) was accepted")
        except InputError:
            pass
        except Exception as e:  # noqa: BLE001
            fails.append(f"bad argument ({what}) raised {type(e).__name__}: {e}")


def run_push_case(t, case):
    """One case of tests/push_cases.py on ``t``: poisoned output, every byte checked."""
    out = pc.poisoned(case.out_rows[RANK], case.inputs[RANK].shape[1], case.dtype)
    outs = [pc.poisoned(case.out_rows[r], case.inputs[r].shape[1], case.dtype) for r in range(SIZE)]
    exp, _ = push_reference.push_ref(list(case.inputs), list(case.descs), list(case.desc_off), case.row_bytes,
                                     case.dtype, list(case.out_rows), t.capacity_bytes, outs=outs)
    inp = case.inputs[RANK].copy()
    t.push(inp, out, case.descs[RANK], case.desc_off[RANK], row_bytes=case.row_bytes, dtype=case.dtype)
    bad = pc.check(out, exp[RANK])
    if case.expect is not None and not bad:
        bad = pc.check(out, case.expect[RANK])
    if bad:
        return f"{case.name}: {bad}"
    if pc.check(inp, case.inputs[RANK]):
        return f"{case.name}: the input was modified"
    return None


def scenario_push_matrix(seed):
    """Every case of tests/push_cases.py, then a transport starting at 2^32 - 3 (its set is cleared
    at the wrap, the epochs skip 0 and 1), then the local argument errors."""
    fails, n = [], 0
    cases = push_cases.build_cases(SIZE, seed)
    t = HostPush(WORLD, push_cases.CAP_BYTES, timeout_s=60)
    w = HostPush(WORLD, push_cases.CAP_BYTES, timeout_s=60, _epoch0=2**32 - 3)
    if (t.rank, t.size, t.name, t.capacity_bytes) != (RANK, SIZE, "push", push_cases.CAP_BYTES):
        fails.append(f"attributes: {t!r}")
    cases = [c for c in cases if len(c.inputs) == SIZE]  # pretend-node cases hold one node's ranks
    for tr, todo in ((t, cases), (w, cases[:12])):
        for case in todo:
            n += 1
            msg = run_push_case(tr, case)
            if msg:
                fails.append(msg)
    if w._epoch != 2 + 12 - 3:  # 2^32-2, 2^32-1, then 2, 3, ...
        fails.append(f"epoch after the wrap cases: {w._epoch}")
    x, buf = np.zeros((2, 4), np.float32), np.zeros((4, 4), np.float32)
    d = push_reference.make_desc(1, [(0, 2, 0, 0, SIZE)], [(0, 2, 2, 0, 0, 1, 1)])
    expect_input_errors({
        "dtype name": lambda: t.push(x, x.copy(), d, 0, row_bytes=16, dtype="float64"),
        "row bytes": lambda: t.push(x, x.copy(), d, 0, row_bytes=8, dtype="float32"),
        "over capacity": lambda: t.push(np.zeros((1, 4096), np.float32), np.zeros((1, 4096), np.float32),
                                        d, 0, row_bytes=16384, dtype="float32"),
        "in place": lambda: t.push(x, x, d, 0, row_bytes=16, dtype="float32"),
        "overlap": lambda: t.push(buf[:2], buf[1:3], d, 0, row_bytes=16, dtype="float32"),
        "short desc": lambda: t.push(x, x.copy(), d[:3], 0, row_bytes=16, dtype="float32"),
    }, fails)
    n += 1
    msg = run_push_case(t, cases[0])
    if msg:
        fails.append(f"after the argument errors: {msg}")
    if t.error() or w.error():
        fails.append(f"error() set on a healthy transport: {t.error()} {w.error()}")
    t.close()
    w.close()
    report(RANK, failures=fails[:50], nfailures=len(fails), collectives=n)


def scenario_matrix(seed):
    if PUSH:
        return scenario_push_matrix(seed)
    fails = []
    cases = pc.build_cases(SIZE, seed)
    n = 0
    t = HostPull(WORLD, pc.CAP_BYTES, timeout_s=60)
    if t.capacity_bytes != pc.CAP_BYTES or (t.rank, t.size) != (RANK, SIZE) or t.name != "p2p":
        fails.append(f"attributes: {t!r}")
    for i, case in enumerate(cases):
        msg = run_case(t, case, seed, i)
        n += 1
        if msg:
            fails.append(msg)
    # the 32-bit epoch in the flags wraps: 2^32 - 3 + k for k = 1.. crosses 2^32
    w = HostPull(WORLD, pc.CAP_BYTES, timeout_s=60, _epoch0=2**32 - 3)
    for i, case in enumerate(cases[:12]):
        msg = run_case(w, case, seed, i)
        n += 1
        if msg:
            fails.append(f"epoch wrap #{i}: {msg}")
    if w._epoch != 2**32 - 3 + 12:
        fails.append(f"epoch after the wrap cases: {w._epoch}")
    # errors that are local and leave the transport usable (nothing was signalled)
    x = np.zeros((2, 4), np.float32)
    d = ref.make_desc(1, [(0, 2, 0)], [(0, 2, 2, 0, 0, 1, 1)])
    expect_input_errors({
        "dtype name": lambda: t.pull(x, x.copy(), d, 0, row_bytes=16, dtype="float64"),
        "storage": lambda: t.pull(x, x.copy(), d, 0, row_bytes=16, dtype="int32"),
        "row bytes": lambda: t.pull(x, x.copy(), d, 0, row_bytes=8, dtype="float32"),
        "over capacity": lambda: t.pull(np.zeros((1, 4096), np.float32), np.zeros((1, 4096), np.float32),
                                        d, 0, row_bytes=16384, dtype="float32"),
        "short desc": lambda: t.pull(x, x.copy(), d[:3], 0, row_bytes=16, dtype="float32"),
        "desc dtype": lambda: t.pull(x, x.copy(), d.astype(np.int32), 0, row_bytes=16, dtype="float32"),
        "non-contiguous": lambda: t.pull(np.zeros((2, 8), np.float32)[:, ::2], x.copy(), d, 0,
                                         row_bytes=16, dtype="float32"),
        "read-only out": lambda: _readonly(t, x, d),
    }, fails)
    msg = run_case(t, cases[0], seed, 0)  # still in step after the local errors
    if msg:
        fails.append(f"after the argument errors: {msg}")
    if t.error() or w.error():
        fails.append(f"error() set on a healthy transport: {t.error()} {w.error()}")
    t.close()
    w.close()
    report(RANK, failures=fails[:50], nfailures=len(fails), collectives=n + 1)


def _readonly(t, x, d):
    ro = np.zeros((2, 4), np.float32)
    ro.flags.writeable = False
    t.pull(x, ro, d, 0, row_bytes=16, dtype="float32")


def _collective(t, sig=7):
    """Every rank's 3 rows summed over all ranks (a pull of every src, or a push to everyone)."""
    x = np.full((3, 2), RANK + 1, np.int32)
    out = np.zeros((3, 2), np.int32)
    job = [(0, 3, 3, 0, 0, SIZE, 1)]
    d = push_reference.make_desc(sig, [(0, 3, 0, 0, SIZE)], job) if PUSH else ref.make_desc(sig, [(0, 3, 0)], job)
    call(t, x, out, d, 0, 8, "int32")
    return out


def scenario_mismatch():
    fails = []
    t = Transport(WORLD, 4096, timeout_s=20)
    total = SIZE * (SIZE + 1) // 2
    for _ in range(2):
        if not (_collective(t) == total).all():
            fails.append("good collective before the mismatch")
    t0 = time.monotonic()
    try:
        _collective(t, sig=99 if RANK == SIZE - 1 else 7)
        fails.append("mismatched signatures were accepted")
    except InconsistentStepError as e:
        el = time.monotonic() - t0
        if el > 5:
            fails.append(f"the mismatch took {el:.2f}s to detect (a timeout, not a check?)")
        if "error 2" not in str(e) or "signature" not in str(e):
            fails.append(f"message does not name the mismatch: {e}")
    if t.error() != ERR_SIGNATURE:
        fails.append(f"error() = {t.error()}, expected {ERR_SIGNATURE}")
    t0 = time.monotonic()
    try:
        _collective(t)
        fails.append("a broken transport accepted another collective")
    except InconsistentStepError as e:  # the refusal names the first error's class
        if time.monotonic() - t0 > 0.05 or "broken" not in str(e):
            fails.append(f"refusal was slow or unclear: {e}")
    t.close()
    report(RANK, failures=fails)


def scenario_timeout(timeout_s):
    fails = []
    t = Transport(WORLD, 4096, timeout_s=timeout_s)
    _collective(t)
    WORLD.Barrier()
    if RANK == 0:
        # Rank 0 skips one collective and arrives late. Its late call completes: the others
        # had signalled that epoch before giving up (and never overwrite their src after).
        time.sleep(timeout_s * 1.5)
        try:
            _collective(t)
        except CollectiveTimeout as e:
            fails.append(f"the late call failed: {e}")
    t0 = time.monotonic()
    try:
        # the others' call of the skipped collective; rank 0's next one, which nobody enters
        _collective(t)
        fails.append("a collective returned although a peer never entered it")
    except CollectiveTimeout as e:
        el = time.monotonic() - t0
        if not 0.95 * timeout_s <= el <= timeout_s + 2.0:
            fails.append(f"timed out after {el:.2f}s for timeout_s={timeout_s}")
        if "error 1" not in str(e) or f"{timeout_s:g}" not in str(e) or f"rank {RANK}" not in str(e):
            fails.append(f"message does not name rank/timeout/error: {e}")
    if t.error() != ERR_TIMEOUT:
        fails.append(f"error() = {t.error()}, expected {ERR_TIMEOUT}")
    t0 = time.monotonic()
    try:
        _collective(t)
        fails.append("a broken transport accepted another collective")
    except CollectiveTimeout:
        if time.monotonic() - t0 > 0.05:
            fails.append("refusal was not immediate")
    t.close()
    report(RANK, failures=fails)


def scenario_close(timeout_s):
    fails = []
    t = Transport(WORLD, 4096, timeout_s=timeout_s)
    for _ in range(3):
        _collective(t)
    if RANK == 0:
        t0 = time.monotonic()
        t.close()
        t.close()
        if time.monotonic() - t0 > 0.1:
            fails.append("close() was not local/immediate")
        try:
            _collective(t)
            fails.append("a closed transport accepted a collective")
        except CollectiveTimeout as e:
            if "closed" not in str(e):
                fails.append(f"unclear refusal after close: {e}")
    else:
        t0 = time.monotonic()
        try:
            _collective(t)
            fails.append("the collective returned although rank 0 had closed")
        except CollectiveTimeout:
            el = time.monotonic() - t0
            if el > timeout_s + 2.0:
                fails.append(f"took {el:.2f}s to time out")
        t.close()
    report(RANK, failures=fails)


def scenario_config():
    fails = []
    try:
        Transport(WORLD, 4096 + 256 * (RANK % 2), timeout_s=20)
        fails.append("different capacities were accepted")
    except ConfigError as e:
        if SIZE == 1 or "capacity" not in str(e):
            fails.append(f"unexpected: {e}")
    except Exception as e:  # noqa: BLE001
        fails.append(f"{type(e).__name__}: {e}")
    if SIZE == 1 and fails == ["different capacities were accepted"]:
        fails = []  # one rank cannot disagree with itself
    left = [f for f in os.listdir("/dev/shm") if f.startswith(f"{SEGMENT}-{os.getpid()}-")]
    if left:
        fails.append(f"segment files left behind: {left}")
    report(RANK, failures=fails)


def main(argv):
    argv = [a for a in argv if a != "--push"]
    what = argv[1] if len(argv) > 1 else "matrix"
    try:
        if what == "matrix":
            scenario_matrix(int(argv[2]) if len(argv) > 2 else 1234)
        elif what == "mismatch":
            scenario_mismatch()
        elif what == "timeout":
            scenario_timeout(float(argv[2]) if len(argv) > 2 else 1.0)
        elif what == "close":
            scenario_close(float(argv[2]) if len(argv) > 2 else 1.0)
        elif what == "config":
            scenario_config()
        else:
            raise SystemExit(f"unknown scenario {what!r}")
    except BaseException:  # noqa: BLE001 - report whatever happened
        report(RANK, failures=[traceback.format_exc()])


if __name__ == "__main__":
    main(sys.argv)
