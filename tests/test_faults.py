"""No hangs: a late, failing or dead rank turns into CollectiveTimeout on every survivor, fast.

Each scenario (tests/mpi/fault_scenarios.py) runs in its own mpiexec under a hard time limit.

- With the launcher set to keep the job alive when a rank fails (``recovery=True``: MPICH's
  ``-disable-auto-cleanup``, Open MPI's recovery mode), every survivor must report
  ``CollectiveTimeout`` within ``timeout_s`` plus a margin, and the aborted DpAttention must
  refuse further use.
- With the launcher's defaults, a rank that dies without MPI_Finalize makes the launcher end
  the whole job (MPICH and Open MPI alike): the test asserts that the job ends promptly and
  reports the failure (non-zero exit code) — the "clean abort" of docs/reliability.md.
"""

import pytest

from mpi_harness import launcher, needs_mpiexec, run_mpi

TIMEOUT_S = 2.0
MARGIN_S = 3.0


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nranks,scenario", [(t, s) for t in (2, 4) for s in ("nosync", "raise", "exit")]
                         + [(8, "nosync"), (8, "exit")])
def test_fault_gives_prompt_timeout_on_every_survivor(scenario, nranks):
    res = run_mpi(["fault_scenarios.py", scenario, "--timeout", str(TIMEOUT_S)], nranks, timeout=60,
                  recovery=True)
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
@pytest.mark.parametrize("nranks", [2, 4])
def test_dead_rank_under_launcher_defaults_ends_the_job(nranks):
    res = run_mpi(["fault_scenarios.py", "exit", "--timeout", "30"], nranks, timeout=60)
    assert not res.timed_out, f"the job hung\n{res.tail()}"
    assert res.returncode != 0, f"{launcher().label}: a dead rank went unreported\n{res.tail()}"
    assert res.wall_s < 25, f"{launcher().label}: the job took {res.wall_s:.0f} s to end\n{res.tail()}"
