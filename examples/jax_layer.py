"""One transformer layer with DP attention and a tensor-parallel SwiGLU MLP, in JAX, on dpgather.

    mpiexec -n 4 python examples/jax_layer.py                         # host backend, JAX CPU arrays
    mpiexec -n 4 python examples/jax_layer.py --attn-tp 2             # 2 replicas of 2 ranks
    mpirun -n 2 python examples/jax_layer.py --backend cuda           # one GPU per rank

The layer is JAX: each DP replica prefills its own sequence (a replica with no tokens is IDLE);
attention heads are split over the replica's attn_tp ranks, so every rank's o_proj output is a
partial sum; the MLP is split over all T ranks (gate/up by columns, down by rows). dpgather takes
the JAX arrays as they are (bfloat16 included, zero-copy through DLPack) and hands back JAX arrays
of the same dtype on the same device: ``gather`` collects every replica's tokens for the MLP,
``scatter`` reduce-scatters its partial output back to each replica's own rows.

Results are views of dpgather's buffers, valid until the next call of the same kind (a JAX array
over them changes when dpgather reuses the buffer, although JAX arrays are otherwise immutable):
a result kept past that call must be copied (``jnp.array(y, copy=True)``); one consumed at once
by the next JAX operation, as here, needs no copy.

On the cuda backend the engine chooses its GPU (here: the node-local rank's) and tells dpgather
with ``DpAttention(device=...)``; JAX is kept from preallocating 75% of every GPU in every rank,
and on the host backend from the GPUs altogether (``JAX_PLATFORMS=cpu``).

Each rank checks its tokens against the whole layer computed in one process in float32: within
3e-2 of the largest value for bfloat16 (three roundings to 8 bits of mantissa), 1e-4 for float32.
"""
import argparse
import os

ap = argparse.ArgumentParser()
ap.add_argument("--attn-tp", type=int, default=1)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--backend", default="host", choices=["host", "cuda"])
ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
args = ap.parse_args()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # one process per GPU: take what is used
if args.backend == "host":  # CPU arrays only: JAX leaves the GPUs alone
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import dpgather as dg  # noqa: E402

comm = MPI.COMM_WORLD
T, rank, A = comm.size, comm.rank, args.attn_tp
NH, hd, F = 4 * A, 16, 96 * T           # heads (split over attn_tp), head size, MLP width (over T)
H = NH * hd
DT = jnp.dtype(args.dtype)
TOL = 3e-2 if args.dtype == "bfloat16" else 1e-4

if args.backend == "cuda":              # the engine's choice of GPU, passed on to dpgather
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    gpus = jax.local_devices(backend="gpu")
    device = gpus[local.rank % len(gpus)]
    local.Free()
    dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=args.dtype, backend="cuda", device=device)
else:
    device = jax.devices("cpu")[0]
    dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=args.dtype, backend="host")
d, a, D = dp.dp_rank, dp.attn_tp_rank, dp.topology.dp_size

w = np.random.default_rng(0)            # the same weights on every rank; each keeps its shard
Wqkv = w.standard_normal((3, H, H), dtype=np.float32) / H ** 0.5
Wo = w.standard_normal((H, H), dtype=np.float32) / H ** 0.5
Wg, Wu = w.standard_normal((2, H, F), dtype=np.float32) / H ** 0.5
Wd = w.standard_normal((F, H), dtype=np.float32) / F ** 0.5
heads = slice(a * H // A, (a + 1) * H // A)      # q/k/v columns and o_proj rows of this rank
cols = slice(rank * F // T, (rank + 1) * F // T)  # gate/up columns and down rows of this rank
mine = [jax.device_put(m, device) for m in (Wqkv[:, :, heads], Wo[heads], Wg[:, cols], Wu[:, cols], Wd[cols])]


def attention(x, wqkv, wo):             # causal self-attention over one sequence, in float32
    x = x.astype(jnp.float32)
    n = x.shape[0]
    q, k, v = ((x @ wqkv[i]).reshape(n, -1, hd).transpose(1, 0, 2) for i in range(3))
    s = q @ k.transpose(0, 2, 1) / hd ** 0.5 + jnp.triu(jnp.full((n, n), -1e9, jnp.float32), 1)
    return (jax.nn.softmax(s, axis=-1) @ v).transpose(1, 0, 2).reshape(n, -1) @ wo


def swiglu(g, wg, wu, wd):
    g = g.astype(jnp.float32)
    return (jax.nn.silu(g @ wg) * (g @ wu)) @ wd


attention_jit = jax.jit(lambda x, wqkv, wo: attention(x, wqkv, wo).astype(DT))
swiglu_jit = jax.jit(lambda g, wg, wu, wd: swiglu(g, wg, wu, wd).astype(DT))

ok, kinds = True, set()
for step in range(args.steps):
    n = np.random.default_rng(step).integers(0, 24, size=D).tolist()  # tokens per replica
    x = np.random.default_rng([step, d]).standard_normal((n[d], H), dtype=np.float32)
    batch = dg.LocalBatch(dg.ForwardMode.EXTEND, 1, n[d]) if n[d] else dg.LocalBatch(dg.ForwardMode.IDLE)
    plan = dp.sync(batch)                                   # one host all-gather, same plan everywhere
    if plan.skip:
        continue
    xj = jax.device_put(x.astype(DT), device)               # the replica's hidden states, in the model's dtype
    h = attention_jit(xj, *mine[:2]) if n[d] else jnp.zeros((0, H), DT, device=device)
    g = dp.gather(h, plan, contribution="partial")          # every replica's tokens, on every rank
    y = dp.scatter(swiglu_jit(g, *mine[2:]), plan, reduce=True)[:n[d]]   # this replica's own rows
    kinds.add(f"{'jax.Array' if isinstance(y, jax.Array) else type(y).__module__} {y.dtype}")
    ref = np.asarray(swiglu(attention(jnp.asarray(x), Wqkv, Wo), Wg, Wu, Wd)) if n[d] else np.zeros((0, H))
    got = np.asarray(jnp.asarray(y).astype(jnp.float32))
    ok &= bool(np.allclose(got, ref, rtol=TOL, atol=TOL * max(1.0, float(np.abs(ref).max(initial=0)))))
    if rank == 0:
        print(f"step {step}: tokens per replica {n} -> {plan.mode.name}, {plan.gathered_rows} gathered rows")

ok = comm.allreduce(ok, op=MPI.LAND)
if rank == 0:
    print(f"results: {', '.join(sorted(kinds))}")
    print(f"T={T} ranks, D={D} replicas x attn_tp {A}, {dp.backend} backend, {args.dtype}: every rank's output "
          + ("matches the single-process layer" if ok else "DIFFERS from the single-process layer")
          + f" (tolerance {TOL:g})")
dp.close()
raise SystemExit(0 if ok else 1)
