"""Communicators and the per-step sync under mpiexec -n 1..4 (host backend; the CUDA binding of
the same suite runs in tests/test_gpu.py). Scenarios: tests/mpi/comm_scenarios.py and
tests/mpi/sync_scenarios.py; the protocol suite: tests/comm_suite.py."""


import numpy as np
import pytest

from mpi_harness import MPI_SCRIPTS, check_mpi, launcher, needs_mpiexec

COMM = MPI_SCRIPTS / "comm_scenarios.py"
SYNC = MPI_SCRIPTS / "sync_scenarios.py"


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_protocol_suite_host(nprocs):
    check_mpi([COMM, "collectives", "--backend", "host"], nprocs, timeout=120)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs,op", [(2, "all_reduce"), (3, "all_gatherv"), (4, "barrier"), (2, "split")])
def test_timeout_breaks_communicator(nprocs, op):
    # rank 0 skips `op`; the others raise CollectiveTimeout within ~1 s and fail fast after;
    # then every rank leaves normally (MPI_Finalize with the abandoned request pending).
    check_mpi([COMM, "timeout", op, "1.0", "--backend", "host"], nprocs, timeout=40)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs,shm", [(1, ""), (2, ""), (3, ""), (4, ""), (2, "1"), (4, "1")])
def test_step_sync_exchange(nprocs, shm):
    res = check_mpi([SYNC, "exchange"], nprocs, timeout=60, env={"DPGATHER_NO_SHM_SYNC": shm} if shm else None)
    expect = "mpi" if shm else "shm"
    got = {r["transport"] for r in res.results.values()}
    assert got == {expect}, f"{launcher().label}: transport {got}, expected {expect}"


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs,shm", [(2, ""), (3, ""), (3, "1")])
def test_step_sync_timeout(nprocs, shm):
    check_mpi([SYNC, "timeout", "1.0"], nprocs, timeout=40, env={"DPGATHER_NO_SHM_SYNC": shm} if shm else None)


def test_single_process_comm_self():
    # Without mpiexec (singleton MPI): the protocol works on COMM_SELF; close() is idempotent.
    from mpi4py import MPI

    from dpgather.core.errors import CollectiveTimeout, InputError
    from dpgather.dist import Communicator, MpiHostCommunicator, StepSync

    c = MpiHostCommunicator(MPI.COMM_SELF, timeout_s=5)
    assert isinstance(c, Communicator) and (c.rank, c.size, c.timeout_s) == (0, 1, 5.0)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.full_like(x, -1)
    c.all_reduce(x, y)
    assert (y == x).all()
    with pytest.raises(InputError, match="recv"):
        c.all_gather(x, np.empty((3, 3), np.float32))
    with pytest.raises(InputError, match="comm"):
        MpiHostCommunicator(object())
    with pytest.raises(InputError, match="timeout_s"):
        MpiHostCommunicator(MPI.COMM_SELF, timeout_s=-1)
    c.close()
    c.close()
    with pytest.raises(CollectiveTimeout, match="broken"):
        c.barrier()
    s = StepSync(MPI.COMM_SELF.Dup(), 8, 5)
    t = s.exchange(np.arange(8, dtype=np.int32))
    assert t.tolist() == [list(range(8))]
    assert s.allgather_obj("x") == ["x"]
    s.close()
