"""What every data-plane scenario on the host backend shares (facade_scenarios.py,
overlap_scenarios.py): deterministic inputs, the poison pattern, the row checker that collects
this rank's failures, and the report.

A scenario calls :func:`set_seed` once (from its ``--seed``) before drawing any input, checks
through :data:`CHK` and ends with :func:`finish`, whose JSON result the harness asserts on.

:class:`Checker` is every test script's pass/fail collector (tests/comm_suite.py, the MPI
scenarios, the GPU scripts under tests/gpu/). Importing this module starts no MPI (``RANK`` and
``T`` ask ``mpi4py`` when first read), so a one-process script imports it as well: from
tests/mpi/ it is on ``sys.path`` already; tests/ and tests/gpu/ put tests/mpi/ there first.
"""

import zlib

import ml_dtypes
import numpy as np

from mpi_harness import report

BF16 = np.dtype(ml_dtypes.bfloat16)
POISON = 0x7B
MAX_FAIL_LINES = 40

_SEED = None


def __getattr__(name):
    """``RANK`` and ``T``: this process's rank in, and the size of, ``MPI.COMM_WORLD`` (MPI starts
    at the first read)."""
    if name in ("RANK", "T"):
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank() if name == "RANK" else MPI.COMM_WORLD.Get_size()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """This process's check results: how many checks ran and passed, and a line for each failure.

    The one pass/fail collector of the test scripts (MPI scenarios, tests/comm_suite.py, the GPU
    scripts); its fields are what ``mpi_harness.report`` sends back (``failures``, ``nfailures``,
    ``checks``, ``passed``). A failure line reads ``"{label} {ctx}: {message}"``: ``label`` names
    the collector (a string, or a callable asked at the first failure -- :data:`CHK` says the MPI
    rank only then, so that importing this module starts no MPI), ``ctx`` the case now running
    (the caller sets it as it goes). ``keep`` bounds the lines kept (``nfailures`` counts all);
    ``echo`` prints each failure as it happens (``FAIL line``), ``verbose`` each pass too
    (``PASS name``); ``tol`` is :meth:`close`'s tolerance.

    Two spellings of one check: ``ok(cond, message)`` (message may be a callable, asked only on
    failure) and ``check(name, cond, detail="")``."""

    def __init__(self, label="", *, keep=None, echo=False, verbose=False, tol=0.0):
        self.label = label
        self.ctx = ""
        self.fails = []
        self.nfailures = 0
        self.checks = 0
        self.passed = 0
        self.keep = keep
        self.echo = echo
        self.verbose = verbose
        self.tol = tol

    @property
    def failed(self):
        return self.nfailures

    def fail(self, msg):
        """Record one failure (not counted as a check: for a failure outside any check)."""
        if callable(self.label):
            self.label = self.label()
        prefix = " ".join(p for p in (self.label, self.ctx) if p)
        line = f"{prefix}: {msg}" if prefix else str(msg)
        self.nfailures += 1
        if self.keep is None or len(self.fails) < self.keep:
            self.fails.append(line)
        if self.echo:
            print(f"FAIL {line}", flush=True)
        return False

    def ok(self, cond, msg):
        self.checks += 1
        if cond:
            self.passed += 1
            if self.verbose:
                print(f"PASS {msg() if callable(msg) else msg}")
            return True
        return self.fail(msg() if callable(msg) else msg)

    def check(self, name, cond, detail=""):
        if cond or not detail:
            return self.ok(cond, name)
        return self.ok(cond, f"{name}: {detail}")

    def raises(self, exc, fn, what):
        """``fn()`` raises ``exc`` (another exception, or none, is a failure)."""
        try:
            fn()
        except exc:
            return self.ok(True, what)
        except Exception as e:  # noqa: BLE001 - reported
            return self.ok(False, f"{what}: raised {type(e).__name__}: {e}")
        return self.ok(False, f"{what}: did not raise {exc.__name__}")

    def error(self, name):
        """A check that ended in the exception being handled now (its traceback is the detail)."""
        import traceback

        return self.ok(False, f"{name}: exception\n{traceback.format_exc()}")

    def merge(self, other):
        """Take in the results of another collector (its lines keep its label)."""
        self.checks += other.checks
        self.passed += other.passed
        self.nfailures += other.nfailures
        room = len(other.fails) if self.keep is None else max(0, self.keep - len(self.fails))
        self.fails += other.fails[:room]

    def close(self, a, b):
        """``a`` equals ``b`` in shape and within ``tol`` (relative, and absolute against ``b``'s
        largest magnitude), compared in float64. A predicate: pass it to :meth:`check`."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        return a.shape == b.shape and np.allclose(a, b, atol=self.tol * max(1.0, np.abs(b).max(initial=0)),
                                                  rtol=self.tol)

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


def _rank_label():
    rank, size = __getattr__("RANK"), __getattr__("T")
    return f"FAIL rank={rank}/{size}"


#: The scenarios' collector: its lines start ``FAIL rank=R/T``.
CHK = Checker(_rank_label)


def finish(scenario, extra=None):
    """Report this rank's failures (the harness asserts on every rank's result)."""
    report(__getattr__("RANK"), failures=CHK.fails[:MAX_FAIL_LINES], nfailures=CHK.nfailures, checks=CHK.checks,
           scenario=scenario, **(extra or {}))
