#!/usr/bin/env python3
"""A short replay for ``compute-sanitizer --tool memcheck``: DRAFT_EXTEND steps whose real rows
are fewer than advertised, through the graph runner and the eager path, plus descriptors that
point past the buffers. One process (COMM_SELF) so NCCL runs a 1-rank communicator.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/gpu/sanitize_replay.py
"""

import numpy as np
import cupy as cp
from mpi4py import MPI

import dpgather as dg
from dpgather.kernels import _cuda

H = 7168
spec = dg.SpecConfig(num_steps=3, topk=1, num_draft_tokens=4)
dp = dg.DpAttention(MPI.COMM_SELF, hidden_size=H, dtype="bfloat16", backend="cuda", spec=spec,
                    graph_buckets=(4, 16, 64, 128))
runner = dp.graph_runner(lambda G: G + 0, contribution="replicate", reduce=True)
rng = np.random.default_rng(0)
bad = 0
for step in range(40):
    bs = int(rng.integers(1, 32))
    plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DRAFT_EXTEND, bs, can_run_graph=True))
    n = int(plan.num_tokens[0])
    real = max(0, n - int(rng.integers(0, n)))               # fewer rows than advertised
    x = cp.asarray(rng.integers(0, 2**15, size=(real, H), dtype=np.uint16))
    y = runner.run(x, plan)
    G = dp.gather(x, plan)
    ye = dp.scatter(G + 0, plan, reduce=True)
    ids = cp.zeros((plan.gathered_rows, 8), dtype=cp.int32)
    dp.mask_topk_ids(ids, plan)
    L = dp.gather_logits(x[: min(real, int(plan.logits_tokens[0]))], plan)
    dp.scatter_logits(cp.zeros((plan.logits_rows, 64), cp.float32), plan)
    exp = cp.zeros((plan.slot_rows[0], H), cp.uint16)
    exp[:min(real, n)] = x[:n]
    bad += int(not (cp.array_equal(y, exp) and cp.array_equal(ye, exp)))
# descriptors far past both buffers
src = cp.ones((5, 64), cp.uint16)
dst = cp.ones((7, 64), cp.uint16)
desc = cp.asarray(np.array([10**12, 10**12, 10**12, 10**12, 3, 10**12, 2, 10**12, -5, -5, -5, -5], np.int64))
for i in range(3):
    _cuda.copy_rows(src, dst, desc, i)
cp.cuda.Device().synchronize()
runner.close()
dp.close()
print(f"sanitize_replay: {40 - bad} passed, {bad} failed", flush=True)
raise SystemExit(1 if bad else 0)
