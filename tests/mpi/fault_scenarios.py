"""Faults under mpiexec: every surviving rank must raise promptly and every process must end.

    mpiexec -n T python fault_scenarios.py SCENARIO [--timeout S] [--attn-tp A]

Scenarios (the faulty rank is the last one, F = T-1):
  noctor   F never constructs its DpAttention (it sleeps, then leaves normally): the others get
           CollectiveTimeout from the constructor, within timeout_s.
  nosync   F never calls sync (it sleeps, then leaves normally): the others get CollectiveTimeout
           from sync.
  raise    F raises an uncaught exception between sync and gather (an application error): its
           interpreter exits through the traceback, the at-exit close (local: it must not wait
           for the peers) and MPI_Finalize; the others get CollectiveTimeout from the step.
  exit     F dies (os._exit(1), no MPI_Finalize) right after sync: the others get CollectiveTimeout.

Every rank reports with ``mpi_harness.report``: the survivors ``error`` (the exception class),
``elapsed`` (seconds from the step's start to the error) and whether the aborted DpAttention
refused further use; F reports ``role="fault"`` before it leaves. Survivors then leave normally,
except after ``exit``: once a peer died without MPI_Finalize, MPICH's MPI_Finalize waits for it
forever (measured with Hydra's -disable-auto-cleanup), so they leave with os._exit.
"""

import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import dpgather as dg
from mpi_harness import report

ap = argparse.ArgumentParser()
ap.add_argument("scenario", choices=("noctor", "nosync", "raise", "exit"))
ap.add_argument("--timeout", type=float, default=2.0)
ap.add_argument("--attn-tp", type=int, default=1)
ap.add_argument("--transport", choices=("auto", "nccl", "p2p", "push"), default="auto")
args = ap.parse_args()

comm = MPI.COMM_WORLD
R, T = comm.rank, comm.size
F = T - 1

if args.scenario == "noctor":
    if R == F:
        report(R, role="fault", scenario=args.scenario)
        time.sleep(args.timeout + 1.0)
        sys.exit(0)
    t0 = time.monotonic()
    result = {"role": "survivor", "scenario": args.scenario}
    try:
        dg.DpAttention(comm, hidden_size=8, dtype="float32", backend="host", timeout_s=args.timeout)
        result["failures"] = ["the constructor returned although the last rank never constructed"]
    except dg.CollectiveTimeout as e:
        result["elapsed"] = time.monotonic() - t0
        result["error"] = type(e).__name__
    report(R, **result)
    sys.exit(0)

dp = dg.DpAttention(comm, attn_tp_size=args.attn_tp, hidden_size=8, dtype="float32", backend="host",
                    timeout_s=args.timeout, policy="varlen", transport=args.transport)
batch = dg.LocalBatch(dg.ForwardMode.DECODE, 3)
x = np.ones((3, 8), np.float32)
plan = dp.sync(batch)  # one good step first: everyone is alive and agrees
G = dp.gather(x, plan)
dp.scatter(G, plan)


def flush_and_exit(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if R == F:
    report(R, role="fault", scenario=args.scenario)
    if args.scenario == "nosync":
        time.sleep(args.timeout + 1.0)
        sys.exit(0)
    plan = dp.sync(batch)
    if args.scenario == "exit":
        flush_and_exit(1)  # dies like a crashed process: no MPI_Finalize, non-zero status
    raise RuntimeError("application error between sync and gather")

t0 = time.monotonic()
result = {"role": "survivor", "scenario": args.scenario}
try:
    plan = dp.sync(batch)
    G = dp.gather(x, plan)
    dp.scatter(G, plan)
    dp.sync(batch)
    result["failures"] = ["no error although the last rank failed"]
except dg.CollectiveTimeout as e:
    result["elapsed"] = time.monotonic() - t0
    result["error"] = type(e).__name__
    try:
        dp.sync(batch)
        result["failures"] = ["the aborted DpAttention accepted another sync"]
    except dg.CollectiveTimeout as again:
        result["refusal"] = str(again)
        if "aborted" not in str(again):
            result["failures"] = [f"unclear refusal: {again}"]
except Exception as e:  # noqa: BLE001 - reported
    result["failures"] = [f"{type(e).__name__}: {e}"]
report(R, **result)
if args.scenario == "exit":
    flush_and_exit(0)
