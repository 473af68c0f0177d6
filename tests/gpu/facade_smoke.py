#!/usr/bin/env python3
"""DpAttention end to end on either backend, every divisor A, every policy, both contributions.

    mpirun -n 4 python tests/gpu/facade_smoke.py --backend cuda [--dtype bfloat16] [--graphs]

Every rank derives every rank's inputs from seeds and checks every row of ``gather``,
``scatter`` (reduce and copy), ``gather_logits``/``scatter_logits`` and ``mask_topk_ids``
against a NumPy reference; with ``--graphs`` also the graph runner (replay == eager) and zero
allocations over 100 replays of random counts (dpgather's arenas and CuPy's default pool; where
the pool changes, the replay index and the change are reported). Every A also checks the gathers'
bits (docs/design.md section 4): with the padding mode forced, ``gather`` (both contributions)
and ``gather_logits`` of rows full of ``-0.0``, signalling NaNs, NaN payloads, infinities and
subnormals (``--dtype``; float32 and ``--transport nccl`` runs add int32, int64 and uint8 at their
extremes) into an output
poisoned before the call, compared as bits with ``tests/bit_patterns.py``'s reference (partial
sums at A <= 2 only: more summands add in the collective's order; a NaN *sum* only as a NaN on
CUDA, whose arithmetic returns the canonical NaN). Each rank reports its
failures with ``mpi_harness.report``.
"""

import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

import dpgather as dg
from bit_patterns import BitStep, bits_differ
from mpi_harness import report, transports_as_expected

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpi"))  # scenario_kit
from scenario_kit import Checker  # noqa: E402

comm = MPI.COMM_WORLD
RANK, T = comm.rank, comm.size
ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="cuda")
ap.add_argument("--dtype", default="float32")
ap.add_argument("--hidden", type=int, default=40)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--graphs", action="store_true")
ap.add_argument("--transport", choices=("auto", "nccl", "p2p"), default="auto")
ap.add_argument("--A", default="", help="comma-separated attn_tp sizes (default: every divisor of T)")
args = ap.parse_args()

if args.backend == "cuda":
    import cupy as xp

    def to_dev(a):
        if a.dtype.name == "bfloat16":
            a = a.view(np.uint16)
        return xp.asarray(a)

    def to_host(a, like):
        h = xp.asnumpy(a)
        return h.view(like) if like is not None else h
else:
    xp = np

    def to_dev(a):
        return a.copy()

    def to_host(a, like):
        return np.asarray(a).copy()

if args.dtype == "bfloat16":
    import ml_dtypes

    NPDT = np.dtype(ml_dtypes.bfloat16)
else:
    NPDT = np.dtype(args.dtype)
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}.get(args.dtype, 0)
H = args.hidden
tally = Checker(tol=TOL)
check, close = tally.check, tally.close
USED = set()  # the plans' transports seen
AVAILABLE = set()  # info()["transport"] of every DpAttention: the first in the process included


def rows(seed, n, width=H):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32).astype(NPDT)


def check_bits(A):
    """The gathers move bits exactly in every padding mode (see the module docstring)."""
    d = RANK // A
    for policy in ("max_len", "sum_len", "varlen"):
        ints = args.dtype == "float32" or args.transport == "nccl"
        for name in [args.dtype] + (["int32", "int64", "uint8"] if ints else []):
            dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=name, backend=args.backend,
                                policy=policy, transport=args.transport)
            for s in range(3):
                st = BitStep(dg, 26, T, A, name, H, s)
                plan = dp.sync(st.batches[d])
                if plan.skip:
                    continue
                USED.add(plan.transport)
                l_own = int(plan.logits_tokens[d])
                calls = (("gather replicate", False, st.x_rep[d], lambda x: dp.gather(x, plan, contribution="replicate")),
                         ("gather partial", True, st.x_part[RANK], lambda x: dp.gather(x, plan, contribution="partial")),
                         ("gather_logits", False, st.x_rep[d][:l_own], lambda x: dp.gather_logits(x, plan)))
                for what, partial, x, call in calls:
                    if partial and A > 2:  # a sum of 3+ summands: its order is the collective's
                        continue
                    xd = to_dev(x)
                    call(xd).view(np.uint8).fill(0x7B)  # poison the output (the same view next call)
                    got = to_host(call(xd), None)
                    ref, nan_only = st.reference(plan, partial, logits=what == "gather_logits",
                                                 any_nan=args.backend == "cuda")
                    err = bits_differ(got, ref, nan_only, name)
                    check(f"bits A={A} {policy} {name} step {s} {plan.mode.name} {plan.transport} {what}: {err}",
                          err is None)
            dp.close()


spec = dg.SpecConfig(3, 2, 4)
MODES = [dg.ForwardMode.IDLE, dg.ForwardMode.DECODE, dg.ForwardMode.EXTEND, dg.ForwardMode.TARGET_VERIFY,
         dg.ForwardMode.DRAFT_DECODE, dg.ForwardMode.DRAFT_EXTEND]

for A in [int(a) for a in args.A.split(",")] if args.A else [a for a in range(1, T + 1) if T % a == 0]:
    D, d, a = T // A, RANK // A, RANK % A
    for policy in ("auto", "sglang", "max_len", "sum_len", "varlen"):
        dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=args.dtype, backend=args.backend,
                            spec=spec, policy=policy, transport=args.transport)
        info = dp.info()
        AVAILABLE.add((A, info["transport"], info["p2p_node_size"]))
        for step in range(args.steps):
            rng = np.random.default_rng(1000 * step + 7 * A)
            batches = []
            for _ in range(D):
                m = MODES[rng.integers(len(MODES))]
                bs = 0 if m == dg.ForwardMode.IDLE else int(rng.integers(1, 6))
                if m == dg.ForwardMode.EXTEND:
                    ext = bs + int(rng.integers(0, 300))
                    batches.append(dg.LocalBatch(m, bs, ext, int(rng.integers(bs, ext + 1))))
                else:
                    batches.append(dg.LocalBatch(m, bs))
            plan = dp.sync(batches[d])
            USED.add(plan.transport)
            n = plan.num_tokens
            real = [int(n[r]) - (int(rng.integers(0, max(1, int(n[r]) // 2) + 1)) if batches[r].mode == dg.ForwardMode.DRAFT_EXTEND else 0) for r in range(D)]
            tag = f"A={A} {policy} step {step} {plan.mode.name}"
            for contrib in ("replicate", "partial"):
                xs = {r: rows(10_000 * step + (r if contrib == "partial" else (r // A) * A) + 1, real[r // A]) for r in range(T)}
                ref = np.zeros((plan.gathered_rows, H), np.float64)
                for r in range(T):
                    o = plan.slot_offsets[r // A]
                    k = min(real[r // A], int(n[r // A]))
                    if contrib == "partial" or r % A == 0:
                        ref[o:o + k] += xs[r][:k].astype(np.float64)
                x = to_dev(xs[RANK])
                G = dp.gather(x, plan, contribution=contrib)
                check(f"{tag} gather {contrib}", close(to_host(G, NPDT), ref))
                check(f"{tag} input unchanged", np.array_equal(to_host(x, NPDT).view(np.uint8), xs[RANK].view(np.uint8)))
            Ys = {r: rows(20_000 * step + r + 5, plan.gathered_rows) for r in range(T)}
            tot = sum(Ys[r].astype(np.float64) for r in range(T))
            o, k = plan.slot_offsets[d], int(n[d])
            yref = tot[o:o + k]  # scatter returns this replica's own rows
            y = dp.scatter(to_dev(Ys[RANK]), plan, reduce=True)
            check(f"{tag} scatter reduce", close(to_host(y, NPDT), yref))
            out = to_dev(np.full((int(n[d]) + 3, H), 7, np.float32).astype(NPDT))
            y = dp.scatter(to_dev(Ys[0]), plan, reduce=False, out=out)
            yref = np.zeros((int(n[d]) + 3, H))
            yref[:k] = Ys[0][o:o + k]
            check(f"{tag} scatter copy out=", close(to_host(y, NPDT), yref))
            hl = rows(30_000 * step + d, int(plan.logits_tokens[d]))
            Lg = dp.gather_logits(to_dev(hl), plan)
            lref = np.zeros((plan.logits_rows, H))
            for r in range(D):
                lr = rows(30_000 * step + r, int(plan.logits_tokens[r]))
                lref[plan.logits_offsets[r]:plan.logits_offsets[r] + len(lr)] = lr
            check(f"{tag} gather_logits", close(to_host(Lg, NPDT), lref))
            V = np.random.default_rng(step).standard_normal((plan.logits_rows, 7)).astype(np.float32)
            ls = dp.scatter_logits(to_dev(V), plan)
            lo = plan.logits_offsets[d]
            sref = V[lo:lo + plan.logits_tokens[d]]
            check(f"{tag} scatter_logits", np.array_equal(to_host(ls, None), sref))
            ids = np.full((plan.gathered_rows, 3), 5, np.int32)
            res = to_host(dp.mask_topk_ids(to_dev(ids), plan), None)
            iref = ids.copy()
            for r in range(D):
                iref[plan.slot_offsets[r] + n[r]:plan.slot_offsets[r + 1]] = -1
            check(f"{tag} mask_topk_ids", np.array_equal(res, iref))
        dp.close()

    check_bits(A)

    if args.graphs:
        buckets = (A * 2, A * 8, A * 32)
        dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=args.dtype, backend=args.backend,
                            graph_buckets=buckets, spec=spec, transport=args.transport)
        # No cuBLAS here: CuPy refuses cuBLAS calls during stream capture (NotImplementedError);
        # bfloat16 travels as uint16 storage, so its stand-in MLP is a bit-exact copy.
        if args.dtype in ("float32", "float16"):
            fn = lambda G: G * 1.5 + 0.25  # noqa: E731
        else:
            fn = lambda G: G + 0  # noqa: E731
        for contrib in ("replicate", "partial"):
            runner = dp.graph_runner(fn, contribution=contrib, reduce=True)
            for step in range(12):
                rng = np.random.default_rng(500 + step)
                bs = rng.integers(0, A * 32 + 1, size=D)
                mode = [dg.ForwardMode.DECODE, dg.ForwardMode.DRAFT_DECODE, dg.ForwardMode.TARGET_VERIFY][step % 3]
                div = {dg.ForwardMode.DECODE: 1, dg.ForwardMode.DRAFT_DECODE: 2, dg.ForwardMode.TARGET_VERIFY: 4}[mode]
                plan = dp.sync(dg.LocalBatch(mode, int(bs[d]) // div, can_run_graph=True))
                x = rows(700 + step * T + (RANK if contrib == "partial" else d * A), int(plan.num_tokens[d]))
                yg = to_host(runner.run(to_dev(x), plan), NPDT).copy()
                G = dp.gather(to_dev(x), plan, contribution=contrib)
                y_own = to_host(dp.scatter(fn(G), plan, reduce=True), NPDT)  # own rows
                ye = np.zeros_like(yg)  # the runner's static output has the bucket's rows
                ye[:y_own.shape[0]] = y_own
                check(f"graph A={A} {contrib} step {step} bucket {plan.bucket}", plan.graph and close(yg, ye))
            # deferred allocation: replays of random counts (DRAFT_EXTEND with fewer real rows
            # included) allocate nothing, neither dpgather's arenas nor the CuPy pool
            host_rows = rows(900 + RANK, A * 32)
            if args.backend == "cuda":
                # count every allocation from CuPy's default pool during the replays (a free of an
                # earlier step's leftover is not an allocation: the check counts malloc calls)
                pool = xp.get_default_memory_pool()
                xp.cuda.Device().synchronize()
                mallocs = [0]

                def counting(nbytes, _pool=pool, _n=mallocs):
                    _n[0] += 1
                    return _pool.malloc(nbytes)

                xp.cuda.set_allocator(counting)
                total0 = pool.total_bytes()

            def allocs():
                rs = runner.memory_stats()
                return (dp.memory_stats()["total"]["allocations"], rs["total"]["allocations"],
                        rs["total"]["reserved_bytes"])

            stats0 = allocs()
            for step in range(100):
                rng = np.random.default_rng(9000 + step)
                bs = int(rng.integers(0, A * 32 // 4 + 1, size=D)[d])
                plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DRAFT_EXTEND, bs, can_run_graph=True))
                real = int(plan.num_tokens[d]) // 2
                view = runner.input_view(plan)
                if args.backend == "cuda":
                    view[:real].set(host_rows[:real].view(np.uint16) if NPDT.name == "bfloat16" else host_rows[:real])
                else:
                    view[:real] = host_rows[:real]
                runner.run(None, plan)
            if args.backend == "cuda":
                xp.cuda.Device().synchronize()
                xp.cuda.set_allocator(pool.malloc)
                check(f"graph A={A} {contrib}: no CuPy allocation over 100 replays ({mallocs[0]} mallocs, "
                      f"pool total {total0} -> {pool.total_bytes()} bytes)",
                      mallocs[0] == 0 and pool.total_bytes() == total0)
            check(f"graph A={A} {contrib}: no arena allocation over 100 replays",
                  allocs() == stats0)
            runner.close()
        dp.close()

ok, msg = transports_as_expected(AVAILABLE, T, args.backend, args.transport)
check(msg, ok)
report(RANK, failures=tally.fails[:50], nfailures=tally.nfailures, passed=tally.passed,
       backend=args.backend, dtype=args.dtype, T=T, transport=args.transport, transports_used=sorted(USED),
       transports_available=sorted({t for _, t, _ in AVAILABLE}))
