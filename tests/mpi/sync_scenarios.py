"""MPI scenarios of the per-step sync (dpgather.dist.sync.StepSync): ``mpiexec -n N python sync_scenarios.py S``.

    exchange    200 exchanges of changing records (the first over MPI, then shared memory where
                every rank maps it: reported as ``transport``), plus object all-gathers between them
    timeout S   rank 0 skips one exchange; the others must raise CollectiveTimeout within ~S s, and
                every later exchange must fail at once; close() is local, every rank exits normally

Every rank reports with ``mpi_harness.report``.
"""

import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

from dpgather.core.errors import CollectiveTimeout
from dpgather.dist import StepSync
from mpi_harness import report

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
W = 12


def scenario_exchange():
    fails = []
    sync = StepSync(WORLD.Dup(), W, 30)
    for step in range(200):
        rec = (np.arange(W, dtype=np.int32) * 3 + 1000 * RANK + step).astype(np.int32)
        table = sync.exchange(rec)
        exp = np.arange(W, dtype=np.int32)[None, :] * 3 + 1000 * np.arange(SIZE)[:, None] + step
        if not np.array_equal(table, exp):
            fails.append(f"exchange {step}: got {table.tolist()}")
        if step % 50 == 7:
            objs = sync.allgather_obj({"rank": RANK, "step": step, "text": "x" * RANK})
            if objs != [{"rank": r, "step": step, "text": "x" * r} for r in range(SIZE)]:
                fails.append(f"allgather_obj at step {step}: {objs}")
    transport = sync.transport
    sync.close()
    sync.close()
    try:
        sync.exchange(np.zeros(W, np.int32))
        fails.append("exchange after close did not raise")
    except CollectiveTimeout:
        pass
    report(RANK, failures=fails[:20], transport=transport)


def scenario_timeout(timeout_s):
    fails = []
    sync = StepSync(WORLD.Dup(), W, timeout_s)
    for _ in range(3):  # the first goes over MPI and sets up shared memory
        sync.exchange(np.full(W, RANK, np.int32))
    if RANK != 0:
        t0 = time.monotonic()
        try:
            sync.exchange(np.zeros(W, np.int32))
            fails.append("exchange returned although rank 0 skipped it")
        except CollectiveTimeout as e:
            el = time.monotonic() - t0
            if not 0.95 * timeout_s <= el <= timeout_s + 3:
                fails.append(f"timeout took {el:.2f} s for timeout_s={timeout_s}")
            if f"rank {RANK}" not in str(e):
                fails.append(f"message does not name the rank: {e}")
        t0 = time.monotonic()
        try:
            sync.exchange(np.zeros(W, np.int32))
            fails.append("exchange after a timeout did not raise")
        except CollectiveTimeout as e:
            if time.monotonic() - t0 > 0.1 or "broken" not in str(e):
                fails.append(f"exchange after a timeout: {e}")
    sync.close()
    report(RANK, failures=fails, transport=sync.transport)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "exchange":
            scenario_exchange()
        else:
            scenario_timeout(float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
    except BaseException:  # noqa: BLE001
        report(RANK, failures=[traceback.format_exc()])
        raise
