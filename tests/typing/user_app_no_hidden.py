"""A user's program that leaves out the required hidden_size: mypy must report line 5."""

import dpgather as dg

dp = dg.DpAttention(dtype="float32")  # error: hidden_size is required (a ConfigError at run time)
