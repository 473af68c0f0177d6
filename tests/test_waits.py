"""The one timeout parser, the one bounded MPI wait and the poll loop's deadline (dist/base.py),
plus the one row-buffer check and the dtype table's storage rule; single process."""

import math
import time

import numpy as np
import pytest

from dpgather.core.dtypes import DTYPES, holds
from dpgather.core.errors import CollectiveTimeout, ConfigError, InputError
from dpgather.core.rows import check_desc, check_rows
from dpgather.dist import base


# -- parse_timeout: one meaning everywhere -------------------------------------------------------

@pytest.mark.parametrize("value,want", [
    (1, 1.0), (0.25, 0.25), (60, 60.0), (np.float32(2.5), 2.5), (np.int64(3), 3.0),
    (float("inf"), math.inf), (np.inf, math.inf), (1e-9, 1e-9),
])
def test_parse_timeout_accepts_positive_seconds_and_inf(value, want):
    got = base.parse_timeout(value)
    assert got == want and isinstance(got, float)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("-inf"), float("nan"), None, True, False,
                                   np.bool_(True), "5", "inf", [1], object()])
def test_parse_timeout_refuses_everything_else_naming_it(value):
    with pytest.raises(ConfigError, match=r"timeout_s must be a positive number of seconds") as e:
        base.parse_timeout(value)
    assert repr(value) in str(e.value)
    with pytest.raises(InputError, match="deadline_s"):
        base.parse_timeout(value, "deadline_s", InputError)


def test_every_dist_entry_refuses_zero_and_none():
    from mpi4py import MPI

    from dpgather.dist.host import MpiHostCommunicator
    from dpgather.dist.sync import StepSync

    for bad in (0, None, -1):
        with pytest.raises(InputError, match="timeout_s"):
            MpiHostCommunicator(MPI.COMM_SELF, bad)
        with pytest.raises(InputError, match="timeout_s"):
            StepSync(MPI.COMM_SELF, 4, bad)
    c = MpiHostCommunicator(MPI.COMM_SELF, float("inf"))
    assert c.timeout_s == math.inf
    c.barrier()  # no limit: completes
    c.close()


def test_teardown_limit_is_finite():
    assert base.teardown_limit(math.inf) == 60.0
    assert base.teardown_limit(2.0) == 2.0 and base.teardown_limit(2.0, 5.0) == 7.0


# -- poll_until: the deadline holds whatever the spin ----------------------------------------------

def test_poll_until_waits_forever_with_inf():
    calls = []

    def test():
        calls.append(1)
        return len(calls) >= 5000  # past the spin, the yields and into the sleeps

    assert base.poll_until(test, math.inf, spin=2) is True
    assert len(calls) == 5000


@pytest.mark.parametrize("spin", [10**9, base.SPIN_MAX])
def test_poll_until_times_out_on_time_with_a_huge_spin(spin):
    """Issue 26 item 8: a large spin count was spun through before the deadline was looked at
    (timeout_s=2 gave the timeout after ~12 s)."""
    calls = []

    def test():
        calls.append(1)
        time.sleep(1e-5)  # a test() as slow as an MPI Test under load
        return False

    t0 = time.monotonic()
    assert base.poll_until(test, 0.3, spin=spin) is False
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 0.3 + 0.25, elapsed


def test_poll_spin_setting_is_bounded(monkeypatch):
    monkeypatch.setattr(base, "_default_spin", None)
    monkeypatch.setenv("DPGATHER_POLL_SPIN", str(10**12))
    assert base.default_spin() == base.SPIN_MAX
    monkeypatch.setattr(base, "_default_spin", None)
    monkeypatch.setenv("DPGATHER_POLL_SPIN", "500")
    assert base.default_spin() == 500
    monkeypatch.setattr(base, "_default_spin", None)
    monkeypatch.setenv("DPGATHER_POLL_SPIN", "-3")  # not a non-negative integer: ignored
    assert base.default_spin() in (0, base._SPIN)
    monkeypatch.setattr(base, "_default_spin", None)


# -- bounded_wait: one bounded MPI wait -------------------------------------------------------------

class _Req:
    """A fake MPI request: completes after ``n`` Test() calls (never when None), or raises."""

    def __init__(self, n=None, error=None):
        self.n, self.error, self.calls = n, error, 0

    def Test(self):  # noqa: N802 - the MPI name
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.n is not None and self.calls >= self.n


def test_bounded_wait_returns_when_the_request_completes():
    orphans = []
    req = _Req(n=50)
    base.bounded_wait(req, 5.0, "the test exchange", orphans, "buffer")
    assert req.calls == 50 and orphans == []


def test_bounded_wait_times_out_and_keeps_the_buffers_alive():
    orphans = []
    buf = np.zeros(4)
    req = _Req()
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=r"the test exchange did not complete within timeout_s=0.2 s"):
        base.bounded_wait(req, 0.2, "the test exchange", orphans, buf)
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert orphans == [(req, (buf,))]


def test_bounded_wait_turns_an_mpi_error_into_a_timeout_with_its_cause():
    from mpi4py import MPI

    orphans = []
    err = MPI.Exception(MPI.ERR_TRUNCATE)
    req = _Req(error=err)
    with pytest.raises(CollectiveTimeout, match="failed with an MPI error") as e:
        base.bounded_wait(req, 5.0, "the test exchange", orphans)
    assert e.value.__cause__ is err and orphans == [(req, ())]
    with pytest.raises(ZeroDivisionError):  # anything else is not ours to translate
        base.bounded_wait(_Req(error=ZeroDivisionError()), 5.0, "x", [])


def test_the_host_communicator_reports_an_mpi_error_as_broken():
    from mpi4py import MPI

    from dpgather.dist.host import MpiHostCommunicator

    c = MpiHostCommunicator(MPI.COMM_SELF, 5.0)
    with pytest.raises(CollectiveTimeout, match="MPI error"):
        c.ops._wait(_Req(error=MPI.Exception(MPI.ERR_TRUNCATE)), "all_gather")
    assert "MPI error" in c.broken
    with pytest.raises(CollectiveTimeout, match="broken"):
        c.barrier()
    c.close()


# -- the one row-buffer check and the dtype table ----------------------------------------------------

def test_check_rows_names_the_argument_and_the_fix():
    a = np.zeros((4, 8), np.float32)
    assert check_rows(a, "x", op="op", of=np.ndarray, writable=True, row_bytes=32) is a
    cases = [
        (lambda: check_rows([[1.0]], "x", of=np.ndarray), "x must be a numpy.ndarray"),
        (lambda: check_rows(a[0], "x"), "x must be 2-D"),
        (lambda: check_rows(a, "x", width=4), "x must have 4 columns"),
        (lambda: check_rows(a[:, ::2], "x"), "x must be C-contiguous"),
        (lambda: check_rows(np.broadcast_to(a, a.shape), "x", writable=True), "x must be writable"),
        (lambda: check_rows(a, "x", op="copy_rows", row_bytes=16), r"copy_rows: x rows are 8 x float32 = 32"),
    ]
    for fn, match in cases:
        with pytest.raises(InputError, match=match):
            fn()
    d = np.zeros(8, np.int64)
    assert check_desc(d, 8, of=np.ndarray) is d
    for bad, match in ((np.zeros(8, np.int32), "int64"), (d[::2], "C-contiguous"), (d, "at least 9")):
        with pytest.raises(InputError, match=match):
            check_desc(bad, 9, op="mask_rows")


def test_storages_per_logical_dtype():
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert holds(bf16, "bfloat16") and holds(np.uint16, "bfloat16") and holds(np.int16, "bfloat16")
    assert holds(np.float16, "float16") and holds(np.uint16, "float16")
    assert not holds(np.float16, "bfloat16") and not holds(bf16, "float16")
    assert not holds(np.float32, "int32") and not holds(np.int64, "float32")
    for name, d in DTYPES.items():
        assert name in d.storages and all(np.dtype(s).itemsize == d.itemsize for s in d.storages
                                          if s != "bfloat16")
        assert d.acc == ("float32" if name in ("float16", "bfloat16") else name)
