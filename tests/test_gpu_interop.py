"""The caller's arrays and device on the CUDA backend (docs/interop.md): GPU nodes only, skipped
with a reason on CPU CI. The host-backend twin is tests/test_interop.py.

- ``tests/gpu/interop_smoke.py arrays`` (one process): PyTorch, JAX, CuPy and any DLPack producer in
  and out of ``wrap`` / ``export`` zero-copy, bf16 as the framework's own dtype, stream ordering of
  a cached PyTorch result, device checks, no PyTorch import on the JAX path.
- ``tests/gpu/interop_smoke.py placement`` (2 ranks, also on a 1-GPU node): two ranks on one GPU
  refused on every rank; swapped devices work.
- ``tests/mpi/interop_scenarios.py --backend cuda``: DpAttention with PyTorch / JAX / CuPy / DLPack
  bf16 arrays, every row checked; the results' types once the facade calls ``export``.
"""

import os
from pathlib import Path

import pytest

from mpi_harness import MPI_SCRIPTS, assert_ok, find_mpiexec, run_local, run_mpi

GPU_DIR = Path(__file__).parent / "gpu"
SMOKE = GPU_DIR / "interop_smoke.py"
# JAX would otherwise take 75% of every visible GPU in every rank's process
ENV = {"NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def _gpu_count():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


NGPU = min(_gpu_count(), int(os.environ.get("DPGATHER_TEST_GPU_LIMIT", "64")))
RANKS = min(NGPU, 2) or 1
needs_mpiexec = pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(NGPU < 1, reason="no GPU visible to CuPy (CUDA backend tests run on GPU nodes only)")]


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_wrap_and_export_with_every_framework_installed():
    res = run_local([str(SMOKE), "arrays"], timeout=400, env=ENV)
    assert_ok(res, 1, "interop_smoke arrays")
    assert res.results[0]["passed"] >= 10, res.tail()


@needs_mpiexec
def test_placement_two_ranks_on_one_gpu_refused_swapped_devices_work():
    res = run_mpi([str(SMOKE), "placement"], 2, timeout=200, env=ENV)
    assert_ok(res, 2, "interop_smoke placement")


_RUNS = {}


def _scenario(framework):
    if framework in ("torch", "jax") and not _has(framework):
        pytest.skip(f"{framework} is not installed")
    if framework not in _RUNS:
        _RUNS[framework] = run_mpi([str(MPI_SCRIPTS / "interop_scenarios.py"), "--backend", "cuda", "--framework",
                                    framework, "--dtype", "bfloat16"], RANKS, timeout=400, env=ENV)
    return _RUNS[framework]


_FRAMEWORKS = ["cupy", "dlpack", "torch", "jax"]


@needs_mpiexec
@pytest.mark.parametrize("framework", _FRAMEWORKS)
def test_dpattention_with_bf16_arrays_of_every_framework_every_row(framework):
    res = _scenario(framework)
    assert not res.timed_out and res.returncode == 0 and len(res.results) == RANKS, res.tail()
    for r in res.results.values():
        assert r["failures"] == [] and r["passed"] >= 10, res.tail()


@needs_mpiexec
@pytest.mark.parametrize("framework", _FRAMEWORKS)
def test_dpattention_results_in_the_callers_framework_dtype_and_device(framework):
    res = _scenario(framework)
    assert len(res.results) == RANKS, res.tail()
    for r in res.results.values():
        assert r["type_failures"] == [] and r["types_passed"] >= 10, r["type_failures"][:5]


@needs_mpiexec
@pytest.mark.skipif(not _has("jax"), reason="JAX is not installed")
def test_example_jax_layer_cuda():
    """examples/jax_layer.py on the GPUs: the engine picks each rank's GPU in JAX and passes it as
    DpAttention(device=...); JAX bfloat16 arrays in and out, against the single-process layer."""
    example = Path(__file__).resolve().parent.parent / "examples" / "jax_layer.py"
    res = run_mpi([str(example), "--backend", "cuda"], RANKS, timeout=400, env=ENV)
    assert res.returncode == 0 and "matches the single-process layer" in res.stdout, res.tail()
    assert "results: jax.Array bfloat16\n" in res.stdout, res.tail()
