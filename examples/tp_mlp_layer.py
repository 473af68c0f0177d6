"""One transformer layer with DP attention and a tensor-parallel SwiGLU MLP, on dpgather.

    mpiexec -n 4 python examples/tp_mlp_layer.py               # 4 replicas of 1 rank
    mpiexec -n 4 python examples/tp_mlp_layer.py --attn-tp 2    # 2 replicas of 2 ranks

Each DP replica prefills its own sequence (a replica with no tokens is IDLE). Attention heads are
split over the replica's attn_tp ranks, so every rank's o_proj output is a partial sum. The MLP
is split over all T ranks (gate/up by columns, down by rows): dpgather gathers every replica's
tokens for it and reduce-scatters its partial output back. Each rank checks its tokens against
the whole layer computed in one process. NumPy on the host backend, CuPy on the cuda backend.
"""
import argparse

import numpy as np
from mpi4py import MPI

import dpgather as dg

ap = argparse.ArgumentParser()
ap.add_argument("--attn-tp", type=int, default=1)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--backend", default="auto", choices=["auto", "host", "cuda"])
args = ap.parse_args()
comm = MPI.COMM_WORLD
T, rank, A = comm.size, comm.rank, args.attn_tp
NH, hd, F = 4 * A, 16, 96 * T           # heads (split over attn_tp), head size, MLP width (over T)
H = NH * hd
dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype="float32", backend=args.backend)
xp = np
if dp.backend == "cuda":
    import cupy as xp
d, a, D = dp.dp_rank, dp.attn_tp_rank, dp.topology.dp_size

w = np.random.default_rng(0)            # the same weights on every rank; each keeps its shard
Wqkv = w.standard_normal((3, H, H), dtype=np.float32) / H ** 0.5
Wo = w.standard_normal((H, H), dtype=np.float32) / H ** 0.5
Wg, Wu = w.standard_normal((2, H, F), dtype=np.float32) / H ** 0.5
Wd = w.standard_normal((F, H), dtype=np.float32) / F ** 0.5
heads = slice(a * H // A, (a + 1) * H // A)      # q/k/v columns and o_proj rows of this rank
cols = slice(rank * F // T, (rank + 1) * F // T)  # gate/up columns and down rows of this rank
mine = [xp.asarray(m) for m in (Wqkv[:, :, heads], Wo[heads], Wg[:, cols], Wu[:, cols], Wd[cols])]


def attention(x, wqkv, wo, m=np):       # causal self-attention over one sequence
    n = x.shape[0]
    q, k, v = ((x @ wqkv[i]).reshape(n, -1, hd).transpose(1, 0, 2) for i in range(3))
    s = q @ k.transpose(0, 2, 1) / hd ** 0.5 + m.triu(m.full((n, n), -1e9, dtype=m.float32), 1)
    p = m.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, -1) @ wo


def swiglu(g, wg, wu, wd, m=np):
    z = g @ wg
    return (z / (1 + m.exp(-z)) * (g @ wu)) @ wd


ok = True
for step in range(args.steps):
    n = np.random.default_rng(step).integers(0, 24, size=D).tolist()  # tokens per replica
    x = np.random.default_rng([step, d]).standard_normal((n[d], H), dtype=np.float32)
    batch = dg.LocalBatch(dg.ForwardMode.EXTEND, 1, n[d]) if n[d] else dg.LocalBatch(dg.ForwardMode.IDLE)
    plan = dp.sync(batch)                                   # one host all-gather, same plan everywhere
    if plan.skip:
        continue
    h = attention(xp.asarray(x), *mine[:2], m=xp) if n[d] else xp.zeros((0, H), xp.float32)
    g = dp.gather(h, plan, contribution="partial")          # every replica's tokens, on every rank
    y = dp.scatter(swiglu(g, *mine[2:], m=xp), plan, reduce=True)[:n[d]]
    ref = swiglu(attention(x, Wqkv, Wo), Wg, Wu, Wd) if n[d] else np.zeros((0, H), np.float32)
    ok &= bool(np.allclose(y if xp is np else xp.asnumpy(y), ref, rtol=1e-4, atol=1e-4))
    if rank == 0:
        print(f"step {step}: tokens per replica {n} -> {plan.mode.name}, {plan.gathered_rows} gathered rows")

ok = comm.allreduce(ok, op=MPI.LAND)
if rank == 0:
    print(f"T={T} ranks, D={D} replicas x attn_tp {A}, {dp.backend} backend: every rank's output "
          + ("matches the single-process layer" if ok else "DIFFERS from the single-process layer"))
dp.close()
raise SystemExit(0 if ok else 1)
