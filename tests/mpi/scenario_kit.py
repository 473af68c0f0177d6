"""What every data-plane scenario on the host backend shares (facade_scenarios.py,
overlap_scenarios.py): deterministic inputs, the poison pattern, the row checker that collects
this rank's failures, and the report.

A scenario calls :func:`set_seed` once (from its ``--seed``) before drawing any input, checks
through :data:`CHK` and ends with :func:`finish`, whose JSON result the harness asserts on.
"""

import zlib

import ml_dtypes
import numpy as np
from mpi4py import MPI

from mpi_harness import report

RANK = MPI.COMM_WORLD.Get_rank()
T = MPI.COMM_WORLD.Get_size()
BF16 = np.dtype(ml_dtypes.bfloat16)
POISON = 0x7B
MAX_FAIL_LINES = 40

_SEED = None


def set_seed(seed):
    """The scenario's seed: every :func:`rng` stream derives from it."""
    global _SEED
    _SEED = int(seed)


def rng(*tag):
    """A generator determined by the seed and ``tag`` alone (the same on every rank)."""
    return np.random.default_rng([_SEED & 0xFFFFFFFF, zlib.crc32(repr(tag).encode())])


def rand_rows(tag, rows, width, dt):
    """Deterministic non-zero values of dtype dt (floats ~N(0, 2), ints in +-[1, 1000])."""
    g = rng(*tag)
    if dt.kind in "iu":
        v = g.integers(1, 1001, size=(rows, width)) * g.choice(np.array([-1, 1]), size=(rows, width))
        return v.astype(dt)
    v = g.standard_normal((rows, width)) * 2.0
    v[np.abs(v) < 1e-3] = 0.5
    return v.astype(dt)


def poison(shape, dt):
    a = np.empty(shape, dtype=dt)
    a.view(np.uint8)[...] = POISON
    return a


def poisoned_alloc(nbytes):
    return np.full(nbytes, POISON, dtype=np.uint8)


def bits(a):
    """The bytes of ``a`` (bit-exact comparisons)."""
    return np.ascontiguousarray(a).view(np.uint8)


def fmt_row(r):
    return np.array2string(np.asarray(r, dtype=np.float64), precision=4, max_line_width=200, threshold=12)


def eps_of(dt):
    return float(ml_dtypes.finfo(dt).eps) if dt == BF16 else float(np.finfo(dt).eps)


def tiny_of(dt):
    return float(ml_dtypes.finfo(dt).smallest_subnormal) if dt == BF16 else float(np.finfo(dt).smallest_subnormal)


class Checker:
    """Collects failures of this rank; ``ctx`` is prefixed to each line."""

    def __init__(self):
        self.fails = []
        self.ctx = ""
        self.checks = 0

    def fail(self, msg):
        self.fails.append(f"FAIL rank={RANK}/{T} {self.ctx}: {msg}")

    def ok(self, cond, msg):
        self.checks += 1
        if not cond:
            self.fail(msg() if callable(msg) else msg)
        return bool(cond)

    def shape(self, what, got, shape, dt):
        return self.ok(isinstance(got, np.ndarray) and got.shape == tuple(shape) and got.dtype == dt,
                       lambda: f"{what}: expected shape {tuple(shape)} {dt}, got "
                               f"{getattr(got, 'shape', type(got))} {getattr(got, 'dtype', '')}")

    def exact(self, what, got, ref):
        """Every row equal (values; -0.0 == 0.0)."""
        if not self.shape(what, got, ref.shape, ref.dtype):
            return False
        if got.size == 0:
            return True
        eq = got == ref if got.dtype.kind in "iu" else (got.astype(np.float64) == ref.astype(np.float64))
        bad = np.flatnonzero(~eq.reshape(eq.shape[0], -1).all(axis=1))
        return self.ok(bad.size == 0, lambda: f"{what}: {bad.size}/{got.shape[0]} rows differ, first row "
                                              f"{bad[0]}: got {fmt_row(got[bad[0]])} expected {fmt_row(ref[bad[0]])}")

    def summed(self, what, got, acc, absum, nterms, dt):
        """A sum of nterms inputs: exact for ints; floats within nterms*eps*sum|x| (+eps*|ref|);
        elements whose inputs are all zero (padding) must be exactly zero."""
        if not self.shape(what, got, acc.shape, dt):
            return False
        if got.size == 0:
            return True
        if dt.kind in "iu":
            return self.exact(what, got, acc.astype(dt))
        g = got.astype(np.float64)
        eps = eps_of(dt)
        tol = nterms * eps * absum + eps * np.abs(acc) + nterms * tiny_of(dt)
        good = np.where(absum == 0, g == 0, np.abs(g - acc) <= tol)
        bad = np.flatnonzero(~good.all(axis=1))
        return self.ok(bad.size == 0, lambda: f"{what}: {bad.size}/{got.shape[0]} rows off the "
                                              f"reference, first row {bad[0]}: got {fmt_row(got[bad[0]])} "
                                              f"expected {fmt_row(acc[bad[0]])}")

    def same(self, what, got, ser):
        """Bit-exact equality of an overlapped result and its serialized twin."""
        ok = (isinstance(got, np.ndarray) and got.shape == ser.shape and got.dtype == ser.dtype
              and np.array_equal(bits(got), bits(ser)))
        return self.ok(ok, lambda: f"{what}: overlapped result differs from the serialized one "
                                   f"({getattr(got, 'shape', None)} vs {ser.shape})")


CHK = Checker()


def finish(scenario, extra=None):
    """Report this rank's failures (the harness asserts on every rank's result)."""
    report(RANK, failures=CHK.fails[:MAX_FAIL_LINES], nfailures=len(CHK.fails), checks=CHK.checks,
           scenario=scenario, **(extra or {}))
