"""Faults under mpiexec: every surviving rank must raise promptly and every process must end.

    mpiexec -n T python fault_scenarios.py SCENARIO [--timeout S]

Scenarios (the faulty rank is the last one, F = T-1):
  nosync   F never calls sync (it sleeps, then leaves): the others get CollectiveTimeout from sync.
  raise    F raises between sync and gather (an application error) and leaves: the others get
           CollectiveTimeout from gather/scatter.
  exit     F exits abruptly (os._exit) right after sync: the others get CollectiveTimeout.
After the timeout every survivor checks that the DpAttention refuses further use, prints
``FAULT-OK rank=r/T elapsed=...`` and leaves with os._exit(0) (a pending MPI request would
block MPI_Finalize). The faulty rank prints ``FAULT-SOURCE rank=F/T``.
"""

import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import dpgather as dg

ap = argparse.ArgumentParser()
ap.add_argument("scenario", choices=("nosync", "raise", "exit"))
ap.add_argument("--timeout", type=float, default=2.0)
ap.add_argument("--attn-tp", type=int, default=1)
args = ap.parse_args()

comm = MPI.COMM_WORLD
R, T = comm.rank, comm.size
F = T - 1
dp = dg.DpAttention(comm, attn_tp_size=args.attn_tp, hidden_size=8, dtype="float32", backend="host",
                    timeout_s=args.timeout, policy="varlen")
batch = dg.LocalBatch(dg.ForwardMode.DECODE, 3)
x = np.ones((3, 8), np.float32)
plan = dp.sync(batch)  # one good step first: everyone is alive and agrees
G = dp.gather(x, plan)
dp.scatter(G, plan)


def leave(code, line):
    print(line, flush=True)
    sys.stdout.flush()
    os._exit(code)


if R == F:
    if args.scenario == "nosync":
        time.sleep(args.timeout * 3)
        leave(0, f"FAULT-SOURCE rank={R}/{T}")
    plan = dp.sync(batch)
    if args.scenario == "exit":
        leave(0, f"FAULT-SOURCE rank={R}/{T}")
    try:
        raise RuntimeError("application error between sync and gather")
    except RuntimeError:
        leave(0, f"FAULT-SOURCE rank={R}/{T}")

t0 = time.monotonic()
try:
    plan = dp.sync(batch)
    G = dp.gather(x, plan)
    dp.scatter(G, plan)
    dp.sync(batch)
    leave(1, f"FAULT-MISSING rank={R}/{T}: no error")
except dg.CollectiveTimeout as e:
    elapsed = time.monotonic() - t0
    try:
        dp.sync(batch)
        leave(1, f"FAULT-REUSED rank={R}/{T}: the aborted DpAttention accepted another sync")
    except dg.CollectiveTimeout as again:
        reason = str(again)
    if "aborted" not in reason:
        leave(1, f"FAULT-UNCLEAR rank={R}/{T}: {reason}")
    leave(0, f"FAULT-OK rank={R}/{T} elapsed={elapsed:.2f} error={type(e).__name__}")
