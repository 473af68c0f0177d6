#!/usr/bin/env python3
"""dg.calibrate on the GPUs writes this machine's cache; DpAttention(cost=None) then plans with it.

    DPGATHER_CACHE_DIR=/tmp/x mpirun -n 2 python tests/gpu/calibrate_cache.py

Checks: the calibration is graph-timed, no fit is flagged (every sample within
``calibrate.MAX_RESIDUAL`` of the model that prices it; a flagged fit is neither written nor
cached, and the flags are reported), it fits the P2P constants where P2P runs (``meta.p2p``),
the cache file exists on rank 0 under ``DPGATHER_CACHE_DIR``, and a new ``DpAttention`` reports
``info()["cost_model"]`` "calibrated (<path>)" with the planner's constants equal to the
calibrated model's on every rank. Each rank reports through ``mpi_harness.report``.
"""

import json
import os
import sys

from mpi4py import MPI

import dpgather as dg
from mpi_harness import report

comm = MPI.COMM_WORLD
failures = []
cache = os.environ.get("DPGATHER_CACHE_DIR")
if not cache:
    print("set DPGATHER_CACHE_DIR to a scratch folder", file=sys.stderr)
    sys.exit(2)
model, run_meta = dg.calibrate(comm, sizes=(1, 64, 1024), reps=5, hidden=7168, dtype="bfloat16",
                               return_meta=True)
for name, why in run_meta["flagged"].items():
    failures.append(f"calibration of {name} flagged (so not cached): {why}")
dp = dg.DpAttention(comm, hidden_size=7168, dtype="bfloat16", backend="cuda")
info = dp.info()
src = info["cost_model"]
if not src.startswith("calibrated"):
    failures.append(f"DpAttention did not load the calibration: {src}")
got = dp.planner.cost.to_dict()
want = model.with_row_bytes(got["row_bytes"]).to_dict()
if got != want:
    failures.append(f"planner constants differ from the calibrated model: {got} vs {want}")
meta = {}
if comm.rank == 0:
    files = [f for f in os.listdir(cache) if f.startswith("cost-") and f.endswith(".json")]
    if len(files) != 1:
        failures.append(f"expected one cache file in {cache}, found {files}")
    else:
        with open(os.path.join(cache, files[0])) as f:
            meta = json.load(f).get("meta", {})
        if info["transport"] == "p2p" and meta.get("p2p") != "measured":
            failures.append(f"P2P runs here but calibrate did not measure it: {meta.get('p2p')}")
dp.close()
report(failures=failures, cost_model=src, p2p=meta.get("p2p"), transport=info["transport"],
       p2p_params=model.params["p2p"], fit=meta.get("fit", {}).get("p2p"), flagged=run_meta["flagged"],
       fits={c: (f["rel_err_min"], f["rel_err_max"]) for c, f in run_meta["fit"].items()})
