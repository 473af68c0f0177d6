"""Every gather moves bits exactly, whatever the planner picks (issue 26 item 6):
``tests/mpi/bits_scenarios.py`` under ``mpiexec -n T`` for T = 2 and 4.

Each run covers A = 1 and 2 (where A divides T) x the three transports of the host backend (MPI
and the shared-memory twins of the P2P pull and push) x the three padding modes (policy forced) x
float32, float16,
bfloat16, int32, int64 and uint8, with rows full of ``-0.0``, signalling and quiet NaNs with
payloads, infinities, subnormals and integer extremes; ``gather(replicate)``,
``gather(partial)`` and ``gather_logits`` land in poisoned arenas and every element is compared
as bits with the NumPy reference of the scenario (docs/design.md section 4 states the rule).
"""

import pytest

from mpi_harness import MPI_SCRIPTS, check_mpi, needs_mpiexec

SCRIPT = MPI_SCRIPTS / "bits_scenarios.py"

pytestmark = [pytest.mark.mpi, needs_mpiexec]


@pytest.mark.parametrize("nprocs", [2, 4])
def test_every_gather_is_bit_exact(nprocs):
    res = check_mpi([SCRIPT, "--seed", str(26 + nprocs)], nprocs, timeout=240)
    configs = 2 * 3 * 3 * 6  # A in {1, 2} x transports x modes x dtypes
    for r, got in res.results.items():
        assert got["configs"] == configs and got["checks"] > 1000, got
