"""Two-batch overlap (issue 16) on the host backend under ``mpiexec -n T``: scenarios in
``tests/mpi/overlap_scenarios.py``.

- ``matrix``: DpAttention(micro_batches=2), both micro-batches' asynchronous gathers, logits
  gathers, scatters and logits scatters issued before any wait, for attn_tp 1 and 2 (those that
  divide T), transports auto (the shared-memory P2P twin) and nccl (MPI), two policies, graph
  buckets off/on, every forward mode; every row (padding included) against a NumPy reference and
  bit for bit against the same calls serialized on a micro_batches=1 DpAttention; the overlapped
  graph runner against the serialized runner, the gathered rows fn sees included; no allocation
  after the first step with max_tokens_per_rank.
- ``tests/gpu/overlap_smoke.py --backend host``: the CUDA test's script, on the host backend.
- ``examples/two_batch_overlap.py``: exit 0, overlapped == serialized bit for bit.
- ``badinput``: wait twice, result before wait, a reused view, another micro-batch's view or a
  stale / ambiguous plan, aliasing, micro_batch out of range (every rank, one rank), ranks syncing
  different micro-batches, a closed DpAttention, bad micro_batches, the overlapped runner's
  arguments: the named error, nothing of the caller's written, the next step works.

Every rank reports its result (``mpi_harness.report``); a hang fails the test (hard time limit).
"""

import pytest

from mpi_harness import MPI_SCRIPTS, check_mpi, needs_mpiexec, ranks_exited_zero, run_mpi

EXAMPLE = MPI_SCRIPTS.parent.parent / "examples" / "two_batch_overlap.py"

SCRIPT = MPI_SCRIPTS / "overlap_scenarios.py"

pytestmark = [pytest.mark.mpi, needs_mpiexec]


def _run(nprocs, *argv, timeout=150):
    res = check_mpi([SCRIPT, *map(str, argv)], nprocs, timeout=timeout)
    print(res.results[0])
    return res


@pytest.mark.parametrize("nprocs,dtypes,transports", [(2, "float32,bfloat16,int32", "auto,nccl"), (3, "float16", "auto,nccl"),
                                                      (4, "float32,bfloat16,int32", "auto,nccl"),
                                                      (2, "bfloat16,float16", "push,p2p")])
def test_overlap_matrix(nprocs, dtypes, transports):
    # auto takes the push for decode-sized steps and graph buckets, the pull above; both forced
    # get a run of their own
    res = _run(nprocs, "matrix", "--dtypes", dtypes, "--seed", 1600 + nprocs, "--transports", transports)
    nA = sum(1 for a in (1, 2) if nprocs % a == 0)
    configs = nA * 2 * 2 * 2 * len(dtypes.split(","))  # A x transports x policies x graph off/on x dtypes
    for r, got in res.results.items():
        assert (got["configs"], got["steps"]) == (configs, configs * 6), got
        assert got["graph_steps"] > 0, got


@pytest.mark.parametrize("nprocs,argv", [(2, ("--dtype", "bfloat16")),
                                         (4, ("--dtype", "float32", "--transport", "nccl"))])
def test_gpu_overlap_script_on_the_host_backend(nprocs, argv):
    """tests/gpu/overlap_smoke.py (the CUDA test's script) with --backend host: its schedule,
    references and the overlapped graph runner run in CI, so the device run only adds streams."""
    res = check_mpi([MPI_SCRIPTS.parent / "gpu" / "overlap_smoke.py", "--backend", "host", *argv], nprocs,
                    timeout=150)
    assert all(r["passed"] > 0 and r["runner_steps"] > 0 and r["bitdiffs"] == 0 for r in res.results.values()), \
        res.results


@pytest.mark.parametrize("nprocs", [2, 4])
def test_overlap_badinput(nprocs):
    _run(nprocs, "badinput", "--timeout", 10, timeout=90)


@pytest.mark.parametrize("nprocs,argv", [(2, ()), (4, ("--attn-tp", "2", "--steps", "4"))])
def test_example_two_batch_overlap(nprocs, argv):
    res = run_mpi(["run_cli.py", EXAMPLE, *argv], nprocs, timeout=120)
    assert res.returncode == 0 and ranks_exited_zero(res, nprocs)[0], ranks_exited_zero(res, nprocs)[1]
    assert "overlapped == serialized bit for bit: yes" in res.stdout, res.tail()
    assert "matches the single-process layer: yes" in res.stdout, res.tail()
