"""A user's program with type errors mypy must report (tests/test_packaging.py)."""

import dpgather as dg

dp = dg.DpAttention(hidden_size="oops")  # error: hidden_size is an int
plan = dp.sync(3)  # error: a LocalBatch
dp.gather(None, plan, contribution="sum")  # error: "replicate" or "partial"
