"""The library as issue 14 wants it to behave for a user: least surprise at the API (integer
storage is never read as bfloat16 unless the caller says so, ``graph_buckets=None``, the default
``strict=False``, own rows from ``scatter``) and a CPU set-up without CUDA wheels."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dpgather as dg

ROOT = Path(__file__).resolve().parent.parent
M = dg.ForwardMode


@pytest.fixture
def self_comm():
    """COMM_SELF of this (singleton) process, initialised when the test runs, not at collection."""
    pytest.importorskip("numba", reason="the host backend needs Numba")
    from mpi4py import MPI

    return MPI.COMM_SELF


def _dp(comm, **kw):
    kw.setdefault("hidden_size", 4)
    return dg.DpAttention(comm, backend="host", timeout_s=10, **kw)


def test_integer_storage_is_not_read_as_bfloat16_unless_the_caller_says_so(self_comm):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with _dp(self_comm, dtype="bfloat16") as dp:
        p = dp.sync(dg.LocalBatch(M.DECODE, 3))
        with pytest.raises(dg.InputError, match=r"got int16.*pass x\.view\(uint16\)"):
            dp.gather(np.ones((3, 4), np.int16), p)  # 1 would have been read as 9.18e-41
        with pytest.raises(dg.InputError):  # strict=False: every rank learns at the next sync
            dp.sync(dg.LocalBatch(M.DECODE, 3))
        for x in (np.ones((3, 4), np.float32).astype(ml_dtypes.bfloat16),  # the bfloat16 dtype
                  np.full((3, 4), 0x3F80, np.uint16)):  # uint16 storage: the caller says "these are bits"
            p = dp.sync(dg.LocalBatch(M.DECODE, 3))
            g = dp.gather(x, p)
            assert g.dtype == ml_dtypes.bfloat16 and np.all(g.astype(np.float32) == 1.0)
    with _dp(self_comm, dtype="float16") as dp:
        p = dp.sync(dg.LocalBatch(M.DECODE, 2))
        with pytest.raises(dg.InputError, match="got uint16"):
            dp.gather(np.ones((2, 4), np.uint16), p)


def test_graph_buckets_none_means_no_graphs_and_scatter_returns_own_rows(self_comm):
    with _dp(self_comm, dtype="float32", graph_buckets=None) as dp:
        assert dp.planner.graph_buckets == ()
        p = dp.sync(dg.LocalBatch(M.DECODE, 3, can_run_graph=True))
        assert not p.graph
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        y = dp.scatter(dp.gather(x, p), p, reduce=True)
        assert y.shape == (3, 4) and np.array_equal(y, x)  # this replica's own rows, not slot_rows


def test_scatter_and_scatter_logits_return_own_rows_also_from_graph_slots(self_comm):
    with _dp(self_comm, dtype="float32", graph_buckets=(8,), policy="sglang") as dp:
        p = dp.sync(dg.LocalBatch(M.DECODE, 3, can_run_graph=True))
        assert p.graph and p.slot_rows[0] == 8 and p.logits_slot_rows[0] == 8  # padded slots
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        assert dp.scatter(dp.gather(x, p), p).shape == (3, 4)
        L = np.arange(p.logits_rows * 5, dtype=np.float32).reshape(p.logits_rows, 5)
        own = dp.scatter_logits(L, p)
        assert own.shape == (3, 5) and np.array_equal(own, L[:3])


def test_defaults_are_the_documented_decisions():
    params = inspect.signature(dg.DpAttention).parameters
    assert params["strict"].default is False  # docs/decisions.md, "bad arguments"
    assert params["transport"].default == "auto"  # docs/decisions.md, "transports"
    assert params["graph_buckets"].default == ()


def _make_n(*args):
    # A clean make: under `make test CUDA_CHECK=1` (CI) the outer make passes its command-line
    # variables down through MAKEFLAGS, and CUDA_CHECK / MPI may be in the environment. NODE=0:
    # the PyPI recipe (a GPU node would take the preinstalled-packages one).
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "CUDA_CHECK", "MPI", "VENV")}
    res = subprocess.run(["make", "-n", "-B", "VENV=/nonexistent/venv", "NODE=0", *args, "install"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_cpu_setup_pulls_no_cuda_wheels_unless_cuda_check():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("test", "host", "host-openmpi", "host-sysmpi", "cli"):
        cuda = [d for d in extras[name] if any(w in d.lower() for w in ("cupy", "cuda", "nvidia", "nvrtc"))]
        assert not cuda, f"extra {name!r} pulls CUDA wheels: {cuda}"
    assert any("nvrtc" in d for d in extras["cuda-check"])
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:  # pragma: no cover
        pytest.skip("make is not installed")
    plain, checked = _make_n(), _make_n("CUDA_CHECK=1")
    assert '".[test]"' in plain and "cuda-check" not in plain, plain
    assert '".[test,cuda-check]"' in checked, checked


_MISSING = """
import sys
sys.modules[sys.argv[1]] = None  # not installed
import dpgather as dg
try:
    dp = dg.DpAttention(hidden_size=8, dtype=sys.argv[2], backend="host")
except dg.BackendUnavailable as e:
    print("BackendUnavailable:", e)
"""


@pytest.mark.parametrize("module,dtype,pip", [("mpi4py", "float32", 'pip install "dpgather[host]"'),
                                              ("numba", "float32", "pip install numba"),
                                              ("ml_dtypes", "bfloat16", "pip install ml_dtypes")])
def test_missing_package_raises_backend_unavailable_with_the_pip_command(module, dtype, pip):
    res = subprocess.run([sys.executable, "-c", _MISSING, module, dtype], capture_output=True, text=True,
                         timeout=120, cwd=str(ROOT))
    assert res.returncode == 0 and res.stdout.startswith("BackendUnavailable:"), res.stdout + res.stderr
    assert pip in res.stdout and module.replace("_", "") in res.stdout.lower().replace("_", ""), res.stdout
