"""A user's program that tells dpgather its device (DpAttention(device=...)): mypy must accept it."""

import dpgather as dg


def make(kind: str) -> dg.DpAttention:
    if kind == "int":
        return dg.DpAttention(hidden_size=8, dtype="bfloat16", device=0)
    if kind == "str":
        return dg.DpAttention(hidden_size=8, dtype="bfloat16", device="cuda:1")
    return dg.DpAttention(hidden_size=8, dtype="bfloat16", device=None)
