"""A user's program, type-checked against dpgather's public API by tests/test_packaging.py (mypy)."""

import numpy as np

import dpgather as dg


def step(dp: dg.DpAttention, x: np.ndarray) -> np.ndarray:
    plan: dg.Plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, batch_size=x.shape[0]))
    g = dp.gather(x, plan, contribution="replicate")
    y = dp.scatter(g * 2, plan, reduce=True)
    return np.asarray(y)


def overlapped(dp: dg.DpAttention, x: np.ndarray) -> np.ndarray:
    p0: dg.Plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, batch_size=x.shape[0]), micro_batch=0)
    h: dg.AsyncHandle = dp.gather_async(x, p0, contribution="partial", stream=None)
    g = h.wait()
    s = dp.scatter_async(g * 2, p0, reduce=True)
    done: bool = s.done
    print(done, h.micro_batch, h.op, dp.memory_stats(micro_batch=0)["total"]["allocations"])
    return np.asarray(s.wait())


def main() -> None:
    dp = dg.DpAttention(hidden_size=8, dtype="float32", backend="host", policy="varlen")
    topo: dg.Topology = dg.Topology(world_size=2, attn_tp_size=1)
    p = dg.plan([dg.LocalBatch(dg.ForwardMode.IDLE)] * 2, topo)
    print(p.gathered_rows + 1, step(dp, np.ones((3, 8), np.float32)).shape)
    dp.close()
