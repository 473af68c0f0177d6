"""No hangs: a late, failing or dead rank turns into CollectiveTimeout on every survivor, fast.

Each scenario (tests/mpi/fault_scenarios.py) runs in its own mpiexec under a hard time limit.

- With the launcher set to keep the job alive when a rank fails (``recovery=True``: MPICH's
  ``-disable-auto-cleanup``, Open MPI's recovery mode), every survivor must report
  ``CollectiveTimeout`` within ``timeout_s`` plus a margin, and the aborted DpAttention must
  refuse further use.
- With dpgather's default launcher settings (``dpgather.tools.launch``), a rank that dies
  without MPI_Finalize ends the job one of two ways, both prompt and both reported by a non-zero
  exit code: the launcher kills every rank at once (MPICH's Hydra; Open MPI 5) — the "clean
  abort" — or it lets the survivors run (Open MPI 4 with ``orte_abort_on_non_zero_status=0``) and
  they end in ``CollectiveTimeout`` after ``timeout_s``. docs/reliability.md has the table.
"""

import pytest

from mpi_harness import launcher, needs_mpiexec, run_mpi

TIMEOUT_S = 2.0
MARGIN_S = 3.0


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nranks,scenario", [(t, s) for t in (2, 4) for s in ("noctor", "nosync", "raise", "exit")]
                         + [(8, "nosync"), (8, "exit")])
def test_fault_gives_prompt_timeout_on_every_survivor(scenario, nranks):
    res = run_mpi(["fault_scenarios.py", scenario, "--timeout", str(TIMEOUT_S)], nranks, timeout=60,
                  recovery=True)
    _assert_prompt_timeouts(res, nranks)


def _assert_prompt_timeouts(res, nranks):
    """The last rank was the faulty one; every other rank got CollectiveTimeout within the margin."""
    assert not res.timed_out, f"the job hung\n{res.tail()}"
    assert res.results.get(nranks - 1, {}).get("role") == "fault", res.tail()
    for r in range(nranks - 1):
        got = res.results.get(r)
        assert got is not None, f"rank {r} reported nothing\n{res.tail()}"
        assert got["ok"] and got.get("error") == "CollectiveTimeout", f"rank {r}: {got}\n{res.tail()}"
        assert got["elapsed"] < TIMEOUT_S + MARGIN_S, f"rank {r} took {got['elapsed']:.1f} s"
    assert res.wall_s < 50, f"processes took {res.wall_s:.0f} s to finish"


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("transport", ["p2p", "push"])
@pytest.mark.parametrize("scenario", ["raise", "exit"])
def test_fault_over_p2p_in_pretend_nodes(scenario, transport):
    # a P2P transport (the pull, the push) inside 2 pretend nodes of 2 ranks, MPI between them: a
    # rank that raises or dies mid-step gives CollectiveTimeout on every survivor, through the
    # P2P collectives or the inter-node collectives, whichever it reaches first
    res = run_mpi(["fault_scenarios.py", scenario, "--timeout", str(TIMEOUT_S), "--transport", transport], 4,
                  timeout=60, recovery=True, env={"DPGATHER_P2P_NODES": "2"})
    _assert_prompt_timeouts(res, 4)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nranks", [2, 4])
def test_dead_rank_under_launcher_defaults_ends_the_job(nranks):
    timeout_s = 4.0
    res = run_mpi(["fault_scenarios.py", "exit", "--timeout", str(timeout_s)], nranks, timeout=60)
    label = launcher().label
    assert not res.timed_out, f"{label}: the job hung\n{res.tail()}"
    assert res.returncode != 0, f"{label}: a dead rank went unreported\n{res.tail()}"
    assert res.wall_s < timeout_s + 15, f"{label}: the job took {res.wall_s:.0f} s to end\n{res.tail()}"
    survivors = [res.results.get(r) for r in range(nranks - 1)]
    if any(s is not None for s in survivors):  # the launcher let the survivors run: they must all time out
        for r, got in enumerate(survivors):
            assert got is not None and got.get("error") == "CollectiveTimeout", f"{label}: rank {r}: {got}"


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("mode,expect", [("ok", 0), ("exit3", 3), ("raise", 1), ("kill", None), ("osexit", 1)])
def test_launcher_returns_the_ranks_exit_status(mode, expect):
    """``python -m dpgather.tools.launch`` returns what the ranks did, under Open MPI too (whose
    mpirun returns 0 for a failed rank with dpgather's settings)."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "mpi", "exit_status.py")
    # Open MPI 4 keeps a job whose rank was killed by a signal until the launcher's time limit
    # (MPIEXEC_TIMEOUT): a short one keeps that case at seconds; the code is non-zero either way.
    limit = "15" if mode == "kill" else "60"
    proc = subprocess.run([sys.executable, "-m", "dpgather.tools.launch", "-n", "2", "--timeout", limit, script, mode],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    label = launcher().label
    detail = f"{label}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    if expect is None:
        assert proc.returncode != 0, detail
    else:
        assert proc.returncode == expect, detail
