"""Two-batch overlap: a DP-attention + TP SwiGLU layer whose step is split into two micro-batches,
one micro-batch's MLP running while the other's rows are gathered or combined.

    python -m dpgather.tools.launch -n 2 examples/two_batch_overlap.py               # host backend
    python -m dpgather.tools.launch -n 4 examples/two_batch_overlap.py --attn-tp 2
    mpirun -n 4 python examples/two_batch_overlap.py --backend cuda                  # one GPU per rank

Each DP replica serves a few requests (prefill chunks of different lengths; a replica may be idle).
The step splits every replica's requests into two micro-batches (the first half of its requests,
then the rest) and runs, on the CUDA backend with a compute stream and a communication stream:

    compute  attn(mb0)          attn(mb1)            mlp(mb0)             mlp(mb1)
    comm                gather(mb0)          gather(mb1)         combine(mb0)         combine(mb1)

``dp.gather_async(h, plan, stream=comm)`` enqueues the gather on the communication stream after
the compute stream's work so far and returns a handle; ``handle.wait()`` makes the compute
stream wait for it (an event, no host synchronisation) and returns the gathered rows. Each
micro-batch has its own plan (``dp.sync(batch, micro_batch=i)``) and its own buffers, so
micro-batch 1's gather never overwrites the rows micro-batch 0's MLP is reading. On the host
backend every call completes at once and the same code runs unchanged.

The result is checked against the same step serialized (the same two micro-batches, synchronous
calls, one after the other, on a DpAttention without micro-batches): bit for bit; and against the
whole layer computed in one process (to rounding). Exit status 0 when both hold on every rank, 1
otherwise.
"""
import argparse
import contextlib

import numpy as np
from mpi4py import MPI

import dpgather as dg

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--attn-tp", type=int, default=1)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--backend", default="host", choices=["auto", "host", "cuda"])
args = ap.parse_args()
comm = MPI.COMM_WORLD
T, rank, A = comm.size, comm.rank, args.attn_tp
NH, hd, F = 4 * A, 16, 96 * T           # heads (split over attn_tp), head size, MLP width (over T)
H = NH * hd
kw = dict(attn_tp_size=A, hidden_size=H, dtype="float32", backend=args.backend)
dp = dg.DpAttention(comm, micro_batches=2, **kw)   # the overlapped step: two micro-batches
ser = dg.DpAttention(comm, **kw)                   # the same step serialized, for the check
xp = np
compute = comm_stream = None
if dp.backend == "cuda":
    import cupy as xp

    compute = xp.cuda.Stream(non_blocking=True)      # attention and MLP
    comm_stream = xp.cuda.Stream(non_blocking=True)  # gathers and combines
d, a, D = dp.dp_rank, dp.attn_tp_rank, dp.topology.dp_size

w = np.random.default_rng(0)            # the same weights on every rank; each keeps its shard
Wqkv = w.standard_normal((3, H, H), dtype=np.float32) / H ** 0.5
Wo = w.standard_normal((H, H), dtype=np.float32) / H ** 0.5
Wg, Wu = w.standard_normal((2, H, F), dtype=np.float32) / H ** 0.5
Wd = w.standard_normal((F, H), dtype=np.float32) / F ** 0.5
heads = slice(a * H // A, (a + 1) * H // A)      # q/k/v columns and o_proj rows of this rank
cols = slice(rank * F // T, (rank + 1) * F // T)  # gate/up columns and down rows of this rank
mine = [xp.asarray(m) for m in (Wqkv[:, :, heads], Wo[heads], Wg[:, cols], Wu[:, cols], Wd[cols])]
if xp is not np:
    xp.cuda.Device().synchronize()  # copied on the default stream; used on the non-blocking ones


def attention(x, lens, wqkv, wo, m=np):
    """Causal self-attention of each request (``lens`` rows each, consecutive in ``x``)."""
    outs, o = [], 0
    for n in lens:
        q, k, v = ((x[o:o + n] @ wqkv[i]).reshape(n, -1, hd).transpose(1, 0, 2) for i in range(3))
        s = q @ k.transpose(0, 2, 1) / hd ** 0.5 + m.triu(m.full((n, n), -1e9, dtype=m.float32), 1)
        p = m.exp(s - s.max(-1, keepdims=True))
        outs.append(((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, -1) @ wo)
        o += n
    return m.concatenate(outs) if outs else m.zeros((0, wo.shape[1]), m.float32)


def swiglu(g, wg, wu, wd, m=np):
    z = g @ wg
    return (z / (1 + m.exp(-z)) * (g @ wu)) @ wd


def batch_of(lens):
    n = int(sum(lens))
    return dg.LocalBatch(dg.ForwardMode.EXTEND, len(lens), n) if n else dg.LocalBatch(dg.ForwardMode.IDLE)


def on(stream):
    return stream if stream is not None else contextlib.nullcontext()


def to_host(y):
    """A host copy (a returned view is valid only until the next call of its kind)."""
    return y.copy() if xp is np else xp.asnumpy(y)


exact = close = True
for step in range(args.steps):
    g = np.random.default_rng([step, d])
    lens = g.integers(1, 12, size=int(g.integers(0, 5))).tolist()   # this replica's requests
    if step % 3 == 2 and d == D - 1:
        lens = []                                                     # an idle replica
    x = g.standard_normal((int(sum(lens)), H), dtype=np.float32)
    half = (len(lens) + 1) // 2
    mb = [lens[:half], lens[half:]]                                   # requests of micro-batch 0 and 1
    rows = [slice(0, sum(mb[0])), slice(sum(mb[0]), sum(lens))]

    # -- the overlapped step ------------------------------------------------------------------
    with on(compute):
        xs = [xp.asarray(x[r]) for r in rows]                             # copied on the compute stream
        plans = [dp.sync(batch_of(mb[i]), micro_batch=i) for i in (0, 1)]  # one host all-gather each
        gathers = []
        for i in (0, 1):
            h = attention(xs[i], mb[i], *mine[:2], m=xp)                   # overlaps gather i-1
            gathers.append(dp.gather_async(h, plans[i], contribution="partial", stream=comm_stream))
        combines = []
        for i in (0, 1):
            G = gathers[i].wait()                                          # every replica's rows of mb i
            Y = swiglu(G, *mine[2:], m=xp)                                 # overlaps gather 1 / combine 0
            combines.append(dp.scatter_async(Y, plans[i], reduce=True, stream=comm_stream))
        y = np.concatenate([to_host(combines[i].wait()) for i in (0, 1)])  # this replica's rows

    # -- the same step serialized ---------------------------------------------------------------
    with on(compute):
        parts = []
        for i in (0, 1):
            p = ser.sync(batch_of(mb[i]))
            h = attention(xs[i], mb[i], *mine[:2], m=xp)
            G = ser.gather(h, p, contribution="partial")
            parts.append(to_host(ser.scatter(swiglu(G, *mine[2:], m=xp), p, reduce=True)))
        y_ser = np.concatenate(parts)

    ref = swiglu(attention(x, lens, Wqkv, Wo), Wg, Wu, Wd)             # the whole layer, one process
    exact &= y.shape == y_ser.shape and np.array_equal(y.view(np.uint32), y_ser.view(np.uint32))
    close &= bool(np.allclose(y, ref, rtol=1e-4, atol=1e-4))
    if rank == 0:
        print(f"step {step}: micro-batch tokens per replica {[int(n) for n in plans[0].num_tokens]} + "
              f"{[int(n) for n in plans[1].num_tokens]} -> {plans[0].mode.name} / {plans[1].mode.name}")

exact = comm.allreduce(exact, op=MPI.LAND)
close = comm.allreduce(close, op=MPI.LAND)
if rank == 0:
    print(f"T={T} ranks, D={D} replicas x attn_tp {A}, {dp.backend} backend, two micro-batches per step: "
          f"overlapped == serialized bit for bit: {'yes' if exact else 'NO'}; "
          f"matches the single-process layer: {'yes' if close else 'NO'}")
dp.close()
ser.close()
raise SystemExit(0 if exact and close else 1)
