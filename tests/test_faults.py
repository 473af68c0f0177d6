"""No hangs: a late, failing or dead rank turns into CollectiveTimeout on every survivor, fast.

Each scenario runs in its own mpiexec under a hard time limit; the test asserts that every
process ended, that every survivor raised within ``timeout_s`` plus a margin, and that the
aborted DpAttention refuses further use.
"""

import re
import time

import pytest

import subprocess

from mpi_harness import find_mpiexec, needs_mpiexec, run_mpi


def _is_hydra():
    exe = find_mpiexec()
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except Exception:
        return False
    return "HYDRA" in out or "MPICH" in out

TIMEOUT_S = 2.0
MARGIN_S = 3.0


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nranks,scenario", [(t, s) for t in (2, 4) for s in ("nosync", "raise", "exit")]
                         + [(8, "nosync"), (8, "exit")])
def test_fault_gives_prompt_timeout_on_every_survivor(scenario, nranks):
    if not _is_hydra():
        pytest.skip("needs MPICH's mpiexec (hydra -disable-auto-cleanup); Open MPI kills every rank "
                    "once one leaves without MPI_Finalize")
    t0 = time.monotonic()
    # Hydra would otherwise kill the survivors as soon as one rank leaves without MPI_Finalize.
    res = run_mpi(["fault_scenarios.py", scenario, "--timeout", str(TIMEOUT_S)], nranks, timeout=60,
                  mpiexec_args=("-disable-auto-cleanup",))
    wall = time.monotonic() - t0
    assert not res.timed_out, f"the job hung\n{res.tail()}"
    assert f"FAULT-SOURCE rank={nranks - 1}/{nranks}" in res.stdout, res.tail()
    for r in range(nranks - 1):
        m = re.search(rf"FAULT-OK rank={r}/{nranks} elapsed=([0-9.]+) error=CollectiveTimeout", res.stdout)
        assert m, f"rank {r} did not report a prompt CollectiveTimeout\n{res.tail()}"
        assert float(m.group(1)) < TIMEOUT_S + MARGIN_S
    assert "FAULT-MISSING" not in res.stdout and "FAULT-REUSED" not in res.stdout
    assert wall < 50, f"processes took {wall:.0f} s to finish"
