"""An MoE layer with DP attention and an fp8 dispatch (``gather_fp8``), on dpgather.

    mpiexec -n 4 python examples/fp8_moe_layer.py               # 4 replicas of 1 rank
    mpiexec -n 4 python examples/fp8_moe_layer.py --attn-tp 2    # 2 replicas of 2 ranks

Each DP replica's attention output is random bfloat16 rows ``[n_d, H]`` (the same on the
replica's attn_tp ranks: ``contribution="replicate"``; replica ``d`` of step ``s`` draws from
seed ``[s, d]``, so every rank can recompute every replica's rows). The layer, on every rank:

    rows = dp.gather_fp8(x, plan)        every replica's rows as fp8 e4m3fn + float32 scales,
                                         one scale per 128 channels (docs/fp8.md)
    X = rms_norm(q * scales)             dequantized, float32 [gathered_rows, H], RMS 1 per row
    ids, w = top-k of X @ Wr             the router (E experts, top K, softmax over the K)
    dp.mask_topk_ids(ids, plan)          padding rows -> -1: no expert touches them
    Y = sum_k w_k * expert_ids_k(X)      only this rank's experts (expert e lives on rank e % T;
                                         each a SwiGLU of width F, float32 weights), Y = 0 elsewhere
    y = dp.scatter(bf16(Y), plan)        bfloat16 reduce-scatter: this replica's n_d rows

Checks, on every rank and every step (exit 1 with a message naming the step and the check):

(a) exactness: every replica's gathered wire rows equal this file's NumPy + ml_dtypes quantization
    of that replica's rows (per group: ``s = amax / 448`` in float32, ``q = e4m3fn(x / s)``
    rounded to nearest even, saturated at 448), byte for byte; padding rows are zero bytes.
(b) accuracy: the same layer on the bfloat16 ``dp.gather`` (no quantization; every step runs
    both) gives ``y_ref``; every token's normwise relative error ``|y - y_ref| / |y_ref|`` must be
    at most ``TOL = 2**-3``. Why: e4m3 keeps 3 mantissa bits, so rounding to nearest changes each
    normal value by at most ``2**-4`` of itself (e4m3 subnormals, values under ``2**-6 s``, by at
    most ``2**-10 s``), so a token's expert input is off by at most ``2**-4`` of its norm (the
    RMSNorm before the router and experts projects that error, it does not grow it). A GEMM with
    random weights passes a relative input error on about 1:1, the SwiGLU's product of the gate
    and up GEMMs adds two of them (``2 * 2**-4``), the down GEMM passes it on: ``2**-3`` is the
    first-order budget of one expert. An estimate, not a rigorous bound (a worst-case error
    direction can be amplified; the router's softmax weights move too), but rounding errors are
    independent across channels, so real tokens land well inside it (measured: at most 0.079
    over 40 steps at 4 ranks), while a layout or scale bug is off by O(1).
    The router runs on dequantized rows in one path and bfloat16 rows in the other, so a token
    whose K-th and (K+1)-th logits are closer than the quantization can move them may pick other
    experts: such a near-tie is allowed (and counted) when the gap is within the first-order bound
    ``2 * max_e ((2**-3 |X| + 2**-10 s / rms) @ |Wr|)_e`` (``X`` normed, ``rms`` the row's norm
    divisor), and the bfloat16 path then uses the fp8 path's experts for that token; a routing
    difference beyond it fails.

Steps cycle through decode (1-4 tokens per replica), prefill (8-48) and mixed (0-32, one replica
IDLE); a step where every replica is idle is skipped. NumPy on the host backend, CuPy on the cuda
backend (bfloat16 travels as uint16 bits either way; CuPy has no fp8 dtype, so the dequantize
decodes e4m3 bytes through a 256-entry table).
"""
import argparse

import ml_dtypes
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
H, GROUP, F, E, K = 512, 128, 64, 4 * T, 2   # hidden, channels per scale, expert width, experts, top-k
TOL = 2.0 ** -3                                # see (b) in the module docstring
dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype="bfloat16", backend=args.backend,
                    fp8=dg.Fp8Format(group_size=GROUP, pow2_scales=False))
xp = np
if dp.backend == "cuda":
    import cupy as xp
d, D = dp.dp_rank, dp.topology.dp_size


def host(a):
    return a if xp is np else xp.asnumpy(a)


w = np.random.default_rng(0)                   # the same weights on every rank; each keeps its experts
Wr = w.standard_normal((H, E), dtype=np.float32) / H ** 0.5
Wg, Wu = w.standard_normal((2, E, H, F), dtype=np.float32) / H ** 0.5
Wd = w.standard_normal((E, F, H), dtype=np.float32) / F ** 0.5
mine = [(e, *(xp.asarray(m[e]) for m in (Wg, Wu, Wd))) for e in range(rank, E, T)]
Wr_dev, absWr = xp.asarray(Wr), xp.asarray(np.abs(Wr))
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
DECODE = xp.asarray(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32))  # e4m3 byte -> value


def bf16_bits(x32):
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (finite inputs)."""
    m = np if isinstance(x32, np.ndarray) else xp
    b = x32.astype(m.float32).view(m.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(m.uint16)


def bf16_float(bits):
    """bfloat16 bits (any 2-byte storage) -> float32, exactly."""
    m = np if isinstance(bits, np.ndarray) else xp
    return (bits.view(m.uint16).astype(m.uint32) << 16).view(m.float32)


def quantize_ref(x32):
    """Wire rows ``[n, H + 4 H / GROUP]`` uint8 of float32 rows (docs/fp8.md; NaN-free input)."""
    n = x32.shape[0]
    g = x32.reshape(n, H // GROUP, GROUP)
    s = (np.abs(g).max(axis=2, initial=0) / np.float32(448)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(s[:, :, None] == 0, g, g / s[:, :, None])
    q = np.clip(r, -448, 448).astype(E4M3).view(np.uint8).reshape(n, H)
    return np.concatenate([q, s.view(np.uint8).reshape(n, 4 * (H // GROUP))], axis=1)


def replica_rows(step, dd, n):
    """Replica ``dd``'s attention output of ``step``: bfloat16 bits ``[n, H]``, row magnitudes
    spread over 2**-4 .. 2**4 (so the scales differ from row to row)."""
    r = np.random.default_rng([step, dd])
    x = r.standard_normal((n, H), dtype=np.float32) * np.exp2(r.uniform(-4, 4, (n, 1))).astype(np.float32)
    return bf16_bits(x)


def counts(step):
    """Tokens per replica and the step's kind: decode, prefill, mixed (one replica idle)."""
    r = np.random.default_rng(1000 + step)
    kind = ("decode", "prefill", "mixed")[step % 3]
    n = r.integers(*{"decode": (1, 5), "prefill": (8, 49), "mixed": (0, 33)}[kind], size=D)
    if kind == "mixed":
        n[step % D] = 0
    return kind, n.tolist()


def rms_norm(X):
    """The MoE block's input norm: float32 rows scaled to RMS 1 (zero rows stay zero)."""
    return X / xp.maximum(xp.sqrt((X * X).mean(axis=1, keepdims=True)), xp.float32(1e-30))


def route(X):
    """``(logits [rows, E], ids [rows, K] int64 by descending logit)`` of normed float32 rows."""
    logits = X @ Wr_dev
    return logits, xp.ascontiguousarray(xp.argsort(-logits, axis=1)[:, :K]).astype(xp.int64)


def experts(X, logits, ids):
    """This rank's share of the MoE output: ``[rows, H]`` float32, rows whose ids are -1 untouched."""
    top = xp.take_along_axis(logits, xp.maximum(ids, 0), axis=1)
    p = xp.exp(top - top.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    Y = xp.zeros((X.shape[0], H), dtype=xp.float32)
    for e, wg, wu, wd in mine:
        rows, k = xp.nonzero(ids == e)           # a row holds each expert at most once
        if rows.size:
            z = X[rows] @ wg
            Y[rows] += p[rows, k][:, None] * (((z / (1 + xp.exp(-z))) * (X[rows] @ wu)) @ wd)
    return Y


failures = []  # every rank finishes every step (its peers wait in the collectives), then all exit 1


def fail(step, what):
    failures.append(f"rank {rank}: step {step}: {what}")


worst, ties, done = 0.0, 0, 0
for step in range(args.steps):
    kind, n = counts(step)
    x = replica_rows(step, d, n[d])
    if n[d] == 0:
        batch = dg.LocalBatch(dg.ForwardMode.IDLE)
    elif kind == "decode":
        batch = dg.LocalBatch(dg.ForwardMode.DECODE, n[d])
    else:
        batch = dg.LocalBatch(dg.ForwardMode.EXTEND, 1, n[d])
    plan = dp.sync(batch)                                    # the same plan on every rank
    if plan.skip:
        continue
    xd = xp.asarray(x)

    # the fp8 layer
    q, s, wire = dp.gather_fp8(xd, plan)
    got = host(wire).copy()                                  # the next gather reuses the arena
    X = rms_norm(DECODE[q] * xp.repeat(s, GROUP, axis=1))
    logits, ids = route(X)
    dp.mask_topk_ids(ids, plan)
    y = host(bf16_float(dp.scatter(bf16_bits(experts(X, logits, ids)), plan, reduce=True)))

    # (a) the wire rows, byte for byte, of every replica
    if got.shape != (plan.gathered_rows, H + 4 * H // GROUP):
        fail(step, f"wire rows have shape {got.shape}, expected ({plan.gathered_rows}, {H + 4 * H // GROUP})")
    for dd in range(D):
        o, m, sr = int(plan.slot_offsets[dd]), n[dd], int(plan.slot_rows[dd])
        ref = quantize_ref(bf16_float(replica_rows(step, dd, m)))
        bad = int(np.count_nonzero(got[o:o + m] != ref)) + int(np.count_nonzero(got[o + m:o + sr]))
        if bad:
            fail(step, f"(a) replica {dd}'s gathered wire rows differ from its local quantization "
                       f"in {bad} bytes (data or padding)")

    # (b) the same layer on the bfloat16 gather
    Xraw = bf16_float(dp.gather(xd, plan).view(xp.uint16))
    Xb = rms_norm(Xraw)
    lb, ib = route(Xb)
    flip = xp.any(xp.sort(ib, axis=1) != xp.sort(ids, axis=1), axis=1)
    flip[ids[:, 0] < 0] = False                              # padding rows: masked in both paths
    if bool(flip.any()):
        srt = xp.sort(lb, axis=1)
        gap = srt[:, E - K] - srt[:, E - K - 1]              # K-th minus (K+1)-th logit
        r = xp.maximum(xp.sqrt((Xraw * Xraw).mean(axis=1, keepdims=True)), xp.float32(1e-30))
        err = (2.0 ** -3 * xp.abs(Xb) + 2.0 ** -10 * xp.repeat(s, GROUP, axis=1) / r) @ absWr
        beyond = flip & (gap > 2 * err.max(axis=1))
        if bool(beyond.any()):
            fail(step, f"(b) the router picked other experts for {int(beyond.sum())} token(s) whose logit "
                       "gap exceeds what the quantization can move")
        ties += int(flip.sum())
        ib[flip] = ids[flip]
    dp.mask_topk_ids(ib, plan)
    yb = host(bf16_float(dp.scatter(bf16_bits(experts(Xb, lb, ib)), plan, reduce=True)))
    if n[d]:
        rel = np.linalg.norm(y - yb, axis=1) / np.linalg.norm(yb, axis=1)
        worst = max(worst, float(rel.max()))
        if not rel.max() <= TOL:
            fail(step, f"(b) token {int(rel.argmax())}: relative error {rel.max():.4f} vs the bfloat16 "
                       f"layer exceeds {TOL}")
    done += 1
    if rank == 0:
        print(f"step {step}: {kind} tokens per replica {n} -> {plan.mode.name}, {plan.gathered_rows} "
              f"gathered rows")

worst = comm.allreduce(worst, op=MPI.MAX)
ties = comm.allreduce(ties, op=MPI.MAX)
failed = comm.allreduce(len(failures), op=MPI.SUM)
for line in failures[:3]:
    print(line, flush=True)
if rank == 0:
    print(f"T={T} ranks, D={D} replicas x attn_tp {A}, {dp.backend} backend, {done} steps: "
          + (f"FAILED, {failed} check(s) (each rank prints its first 3)" if failed else
             f"every rank's fp8 wire rows equal the local quantization; max relative error vs the "
             f"bf16 layer {worst:.4f} <= {TOL} ({ties} near-tie routings)"), flush=True)
dp.close()
raise SystemExit(1 if failed else 0)
