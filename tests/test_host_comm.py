"""MpiHostCommunicator under mpiexec -n 1..4 (scenarios in tests/mpi/comm_scenarios.py)."""

import subprocess
import sys

import numpy as np
import pytest

from mpi_harness import MPI_SCRIPTS, check_mpi, needs_mpiexec

SCRIPT = MPI_SCRIPTS / "comm_scenarios.py"


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_collectives(nprocs):
    check_mpi([SCRIPT, "collectives"], nprocs, timeout=90)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs", [2, 4])
def test_collectives_without_shared_memory_sync(nprocs):
    # the record all-gather's MPI path (multi-node or non-x86 machines use it throughout)
    check_mpi([SCRIPT, "collectives"], nprocs, timeout=90, env={"DPGATHER_NO_SHM_SYNC": "1"})


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize(
    "nprocs,op,shm", [(2, "all_reduce", "1"), (3, "allgather_record", "1"), (3, "allgather_record", ""),
                      (4, "barrier", "1"), (2, "all_gatherv", "1")]
)
def test_timeout_breaks_communicator(nprocs, op, shm):
    # rank 0 skips `op`; the others must raise CollectiveTimeout within ~1 s and fail fast after;
    # then every rank leaves normally (MPI_Finalize with the abandoned request pending).
    check_mpi([SCRIPT, "timeout", op, "1.0"], nprocs, timeout=30,
              env={} if shm else {"DPGATHER_NO_SHM_SYNC": "1"})


def test_import_has_no_side_effects():
    # Importing the packages must not import mpi4py (the constructor does), Numba or CUDA stacks.
    code = (
        "import sys, dpgather.dist, dpgather.kernels; "
        "bad = [m for m in ('mpi4py', 'cupy', 'numba', 'torch') if m in sys.modules]; "
        "assert not bad, bad; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_single_process_comm_self():
    # Without mpiexec (singleton MPI): the protocol works on COMM_SELF; close() is idempotent.
    from mpi4py import MPI

    from dpgather.core.errors import CollectiveTimeout, InputError
    from dpgather.dist import Communicator, MpiHostCommunicator

    c = MpiHostCommunicator(MPI.COMM_SELF, timeout_s=5)
    assert isinstance(c, Communicator) and (c.rank, c.size, c.timeout_s) == (0, 1, 5.0)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.full_like(x, -1)
    c.all_reduce(x, y)
    assert (y == x).all()
    t = np.full((1, 8), -1, np.int32)
    c.allgather_record(np.arange(8, dtype=np.int32), t)
    assert t.tolist() == [list(range(8))]
    with pytest.raises(InputError, match="recv"):
        c.all_gather(x, np.empty((3, 3), np.float32))
    with pytest.raises(InputError, match="comm"):
        MpiHostCommunicator(object())
    c.close()
    c.close()
    with pytest.raises(CollectiveTimeout, match="broken"):
        c.barrier()
