"""CUDA backend tests: run only where CuPy sees GPUs (one rank per GPU); skipped with a reason on CPU CI.

They drive the GPU scripts of ``tests/gpu/`` (kernels against NumPy twins, the whole DpAttention
data plane incl. graph replay == eager) and the communicator protocol suite bound to NCCL
(tests/comm_suite.py via tests/mpi/comm_scenarios.py: every collective, a timeout, a captured
graph, prompt exit after a captured NCCL graph) under ``mpirun`` with a hard time limit each.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_harness import MPI_SCRIPTS, assert_ok, check_mpi, find_mpiexec, run_local

GPU_DIR = Path(__file__).parent / "gpu"
COMM = MPI_SCRIPTS / "comm_scenarios.py"


def _gpu_count():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


NGPU = _gpu_count()
LIMIT = int(os.environ.get("DPGATHER_TEST_GPU_LIMIT", NGPU))
NGPU = min(NGPU, LIMIT)
ENV = {"NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(NGPU < 1, reason="no GPU visible to CuPy (CUDA backend tests run on GPU nodes only)"),
]


def _ranks():
    return [t for t in (2, 4, 8) if t <= NGPU] or [1]


def test_kernels_against_numpy_twins():
    res = run_local([str(GPU_DIR / "gpu_selftest.py")], timeout=600, env=ENV)
    assert_ok(res, 1, "gpu_selftest")


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
@pytest.mark.parametrize("nranks", _ranks())
def test_protocol_suite_nccl(nranks):
    check_mpi([COMM, "collectives", "--backend", "cuda"], nranks, timeout=400, env=ENV)


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
def test_nccl_timeout_and_graph():
    n = _ranks()[-1]
    check_mpi([COMM, "timeout", "all_reduce", "3.0", "--backend", "cuda"], n, timeout=120, env=ENV)
    check_mpi([COMM, "graph", "--backend", "cuda"], n, timeout=120, env=ENV)


_FACADE = [(t, d, "auto") for t in _ranks() for d in ("bfloat16", "float16", "float32")
           if t == _ranks()[-1] or d == "bfloat16"] + [(_ranks()[-1], "bfloat16", "nccl")]


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
@pytest.mark.parametrize("nranks,dtype,transport", _FACADE)
def test_facade_cuda(nranks, dtype, transport):
    """Every divisor A, every policy and forward mode (incl. DRAFT_EXTEND with fewer real rows),
    both contributions, logits, masks, and graph replay == eager with zero allocations per replay;
    bf16 at every rank count. transport="auto" takes P2P where the GPUs share a node (small steps,
    every graph step); "nccl" keeps every step on NCCL. Every gather's bits are checked too, in each
    padding mode forced (-0.0, signalling NaNs, NaN payloads, integer extremes: docs/design.md
    section 4), so SUM_LEN's byte all-reduce runs over NCCL in the "nccl" run."""
    steps = os.environ.get("DPGATHER_GPU_STEPS", "4")
    res = check_mpi([str(GPU_DIR / "facade_smoke.py"), "--backend", "cuda", "--dtype", dtype, "--graphs",
                     "--steps", steps, "--transport", transport], nranks, timeout=500, env=ENV)
    assert all(r["passed"] > 0 for r in res.results.values()), res.results
    if transport == "nccl":
        assert res.results[0]["transports_used"] == ["nccl"], res.results[0]


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
def test_facade_cuda_p2p_over_pretend_nodes():
    """P2P over several nodes on one machine: DPGATHER_P2P_NODES splits the GPUs into pretend
    nodes (one GPU each on 2 or 3 GPUs, two each on 4 or more), so each step
    pulls inside the node and NCCL all-gathers / reduce-scatters the node blocks between them;
    forced P2P at every A a node holds, every policy and forward mode, graph replay == eager,
    every row checked."""
    n = _ranks()[-1]
    if n < 2:
        pytest.skip("pretend nodes need 2 GPUs")
    nodes = n if n < 4 else n // 2
    A = ",".join(str(a) for a in range(1, n // nodes + 1) if (n // nodes) % a == 0)
    steps = os.environ.get("DPGATHER_GPU_STEPS", "4")
    res = check_mpi([str(GPU_DIR / "facade_smoke.py"), "--backend", "cuda", "--dtype", "bfloat16", "--graphs",
                     "--steps", steps, "--transport", "p2p", "--A", A], n, timeout=300,
                    env={**ENV, "DPGATHER_P2P_NODES": str(nodes)})
    r0 = res.results[0]
    assert all(r["passed"] > 0 for r in res.results.values()), res.results
    assert r0["transports_used"] == ["p2p"], r0


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
@pytest.mark.parametrize("transport,dtype", [("auto", "bfloat16"), ("nccl", "float32")])
def test_overlap_cuda(transport, dtype):
    """Two-batch overlap (issue 16): async gathers/scatters/logits calls of two micro-batches on a
    communication stream beside the compute stream (and synchronous calls of one micro-batch while
    the other's are in flight) equal the same step serialized bit for bit and the NumPy
    reference; the overlapped graph runner (fork/join capture) equals the serialized runner; no
    allocation and no new CUDA event per step once warm; a bad stream= raises InputError.
    transport="auto" runs small steps and every graph step over P2P where the GPUs allow it."""
    n = _ranks()[-1]
    steps = os.environ.get("DPGATHER_GPU_STEPS", "4")
    res = check_mpi([str(GPU_DIR / "overlap_smoke.py"), "--backend", "cuda", "--transport", transport,
                     "--dtype", dtype, "--steps", steps, "--timeout", "20", "--watchdog", "100"],
                    n, timeout=150, env=ENV)
    r0 = res.results[0]
    assert all(r["passed"] > 0 and r["runner_steps"] > 0 for r in res.results.values()), res.results
    if transport == "nccl":
        assert r0["transports_used"] == ["nccl"], r0
    elif n > 1 and r0["transports_available"] == ["p2p"]:
        assert "p2p" in r0["transports_used"], r0


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
def test_example_two_batch_overlap_cuda():
    """examples/two_batch_overlap.py on the GPUs: the overlapped step (compute and communication
    streams) equals the serialized step bit for bit and the single-process layer to rounding."""
    example = Path(__file__).resolve().parent.parent / "examples" / "two_batch_overlap.py"
    res = check_mpi_rc([str(example), "--backend", "cuda"], _ranks()[-1])
    assert "cuda backend" in res.stdout and "bit for bit: yes" in res.stdout, res.tail()


def check_mpi_rc(args, n, timeout=300):
    from mpi_harness import run_mpi

    res = run_mpi(args, n, timeout=timeout, env=ENV)
    assert res.returncode == 0 and not res.timed_out, res.tail()
    return res


def test_p2p_kernels_loopback(tmp_path):
    """Both P2P kernels on one GPU, 2-4 virtual ranks in one process (tests/gpu/loopback.py):
    every push case against the reference, the data-plane cases on the pull, the push's epoch
    wrap; outputs poisoned, every byte checked, error words 0. Runs with a single GPU."""
    res = run_local([str(GPU_DIR / "loopback.py"), "--skip", "timing", "--out", str(tmp_path / "lb.json")],
                    timeout=400, env=ENV)
    assert_ok(res, 1, "loopback")
    assert sum(c["push"] for c in res.results[0]["cases"].values()) > 100, res.results[0]


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
def test_p2p_transport_selftest(tmp_path):
    """CudaPull against the NumPy reference for every descriptor shape the data plane uses, eager and
    replayed from a CUDA graph with rewritten counts, plus a rank that skips a collective."""
    n = _ranks()[-1]
    if n < 2:
        pytest.skip("the P2P transport needs 2 GPUs")
    check_mpi([str(GPU_DIR / "p2p_selftest.py"), "--out", str(tmp_path / "p2p.json")], n, timeout=400, env=ENV)


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
def test_process_exits_after_captured_nccl_graph():
    check_mpi([COMM, "exit-hazard", "--backend", "cuda"], _ranks()[-1], timeout=120, env=ENV)


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpirun/mpiexec on PATH")
def test_calibration_is_cached_and_loaded(tmp_path):
    """``dg.calibrate`` (graph-timed, P2P included where it runs) writes this machine's cache and a
    new ``DpAttention(cost=None)`` plans with it on every rank."""
    n = _ranks()[-1]
    if n < 2:
        pytest.skip("calibration needs 2 GPUs")
    res = check_mpi([str(GPU_DIR / "calibrate_cache.py")], n, timeout=300,
                    env={**ENV, "DPGATHER_CACHE_DIR": str(tmp_path)})
    assert all(r["cost_model"].startswith("calibrated") for r in res.results.values()), res.results



def test_fp8_quantized_gather(tmp_path):
    """The CUDA quantize kernel bit for bit against tests/fp8_reference.py (random bits, every
    source dtype, groups, power-of-two scales, a poisoned window) and ``gather_fp8`` / the fp8
    graph runner on one GPU (tests/gpu/fp8_check.py); runs with a single GPU."""
    res = run_local([str(GPU_DIR / "fp8_check.py"), "--skip", "timing", "--out", str(tmp_path / "fp8.json")],
                    timeout=400, env=ENV)
    assert_ok(res, 1, "fp8_check")
    assert res.results[0]["checks"] > 300, res.results[0]
