#!/usr/bin/env python3
"""Two-batch overlap end to end: async calls on a communication stream, two micro-batches, the
overlapped graph runner -- against the same step serialized, bit for bit, and a NumPy reference.

    mpirun -n 4 python tests/gpu/overlap_smoke.py --backend cuda [--transport auto|nccl|p2p]
        [--dtype bfloat16|float32] [--steps 4]

Per attn_tp size A in (1, 2) dividing T and per contribution: a ``DpAttention(micro_batches=2)``
and a ``DpAttention()`` (serialized), same configuration. Each step syncs two micro-batches (random
forward modes per replica, DRAFT_EXTEND with fewer real rows) and runs the two-batch-overlap
schedule on two streams (CUDA: a compute stream and a communication stream; host: no streams):

    compute: x0 -> gather_async(x0, p0, comm) ; gather_logits_async(h0, p0, comm)
             x1 -> gather_async(x1, p1, comm) ; gather_logits_async(h1, p1, comm)
             G0 = wait ; Y0 = fn(G0) -> scatter_async(Y0, p0, comm)   (fn(G0) overlaps gather 1)
             G1 = wait ; Y1 = fn(G1) -> scatter_async(Y1, p1, comm)   (fn(G1) overlaps combine 0)
             a synchronous scatter_logits / scatter(out=) of micro-batch 0 on the compute stream
             while micro-batch 1's scatter is in flight on the comm stream (the launch chain)
             y0, y1 = wait

and the same calls one after the other on the serialized DpAttention; every result must be bit
for bit equal, and within rounding of the NumPy reference. Graph steps (both micro-batches
can_run_graph, different buckets included) replay ``graph_runner(fn, micro_batches=2)`` and
``graph_runner(fn)`` twice; then 40 replays of random counts through ``input_view`` allocate
nothing (dpgather's arenas, CuPy's default pool), and 20 eager overlapped steps create no arena
buffer and no CUDA event once warm. A bad ``stream=`` raises InputError on every rank and the next
step works. Each rank reports with ``mpi_harness.report``.
"""

import argparse
import contextlib
import os
import sys

import numpy as np
from mpi4py import MPI

import dpgather as dg
from mpi_harness import report, transports_as_expected

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpi"))  # scenario_kit
from scenario_kit import Checker  # noqa: E402

comm = MPI.COMM_WORLD
RANK, T = comm.rank, comm.size
ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="cuda", choices=("cuda", "host"))
ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
ap.add_argument("--hidden", type=int, default=48)
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--transport", choices=("auto", "nccl", "p2p"), default="auto")
ap.add_argument("--timeout", type=float, default=60.0)
ap.add_argument("--watchdog", type=float, default=0.0,
                help="seconds: dump every thread's stack and exit 3 when the script outlives them (0: off)")
args = ap.parse_args()
if args.watchdog > 0:
    import faulthandler

    faulthandler.dump_traceback_later(args.watchdog, exit=True)


def phase(msg):
    """A progress line on stderr (a run that is killed shows where it was)."""
    sys.stderr.write(f"[overlap_smoke rank {comm.rank}] {msg}\n")
    sys.stderr.flush()

CUDA = args.backend == "cuda"
if args.dtype == "bfloat16":
    import ml_dtypes

    NPDT = np.dtype(ml_dtypes.bfloat16)
else:
    NPDT = np.dtype(np.float32)

if CUDA:
    import cupy as xp

    def to_dev(a):
        return xp.asarray(a.view(np.uint16) if a.dtype == NPDT and NPDT.name == "bfloat16" else a)

    def to_host(a, like=NPDT):
        h = xp.asnumpy(a)
        return h.view(like) if like is not None and h.dtype != like else h

    COMPUTE = COMM = None  # made after the first DpAttention, which makes this rank's GPU current
else:
    xp = np

    def to_dev(a):
        return a.copy()

    def to_host(a, like=NPDT):
        return np.asarray(a).copy()

    COMPUTE = COMM = None


def on(stream):
    return stream if stream is not None else contextlib.nullcontext()


if NPDT == np.float32:
    def fn(G):
        return G * 1.5 + 0.25

    def fn_ref(G):
        return G * 1.5 + 0.25
else:  # bf16 storage: a bit-exact stand-in MLP (no cuBLAS: it could not be captured)
    def fn(G):
        return G + 0

    def fn_ref(G):
        return G

TOL = {"float32": 1e-4, "bfloat16": 4e-2}[args.dtype]
H = args.hidden
tally = Checker(tol=TOL)
check, close = tally.check, tally.close
bitdiffs, runner_steps = 0, 0
USED, AVAILABLE = set(), set()
spec = dg.SpecConfig(3, 2, 4)
MODES = [dg.ForwardMode.IDLE, dg.ForwardMode.DECODE, dg.ForwardMode.EXTEND, dg.ForwardMode.TARGET_VERIFY,
         dg.ForwardMode.DRAFT_DECODE, dg.ForwardMode.DRAFT_EXTEND]


def same(name, a, b):
    """Bit-exact equality of an overlapped result and its serialized twin (host copies)."""
    global bitdiffs
    ok = a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                               np.ascontiguousarray(b).view(np.uint8))
    if not ok:
        bitdiffs += 1
    check(f"{name}: overlapped == serialized bit for bit", ok)


def rows(seed, n, width=H):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32).astype(NPDT)


def batches_of(step, i, D, A, graph):
    g = np.random.default_rng([step, i, 77])
    out = []
    for d in range(D):
        if graph:
            m = [dg.ForwardMode.DECODE, dg.ForwardMode.DRAFT_DECODE, dg.ForwardMode.TARGET_VERIFY][(d + i) % 3]
            div = {dg.ForwardMode.DECODE: 1, dg.ForwardMode.DRAFT_DECODE: 2, dg.ForwardMode.TARGET_VERIFY: 4}[m]
            out.append(dg.LocalBatch(m, int(g.integers(0, 12 * A * (i + 1))) // div, can_run_graph=True))
            continue
        m = MODES[g.integers(len(MODES))]
        bs = 0 if m == dg.ForwardMode.IDLE else int(g.integers(1, 6))
        if m == dg.ForwardMode.EXTEND:
            ext = bs + int(g.integers(0, 200))
            out.append(dg.LocalBatch(m, bs, ext, int(g.integers(bs, ext + 1))))
        else:
            out.append(dg.LocalBatch(m, bs))
    return out


class Micro:
    """Inputs (host and device) and references of one micro-batch."""

    def __init__(self, plan, step, i, A, contrib):
        D, d = T // A, RANK // A
        n = plan.num_tokens
        self.plan = plan
        real = [int(n[r]) - int(n[r]) // 3 * (r % 2) for r in range(D)]  # odd replicas: fewer real rows
        seed = 100_000 * step + 1000 * i
        xs = {r: rows(seed + (r if contrib == "partial" else (r // A) * A) + 1, real[r // A]) for r in range(T)}
        self.x = to_dev(xs[RANK])
        G = np.zeros((plan.gathered_rows, H), np.float64)
        for r in range(T):
            o, k = int(plan.slot_offsets[r // A]), min(real[r // A], int(n[r // A]))
            if contrib == "partial" or r % A == 0:
                G[o:o + k] += xs[r][:k].astype(np.float64)
        self.G = G
        # Y on every rank = fn(G): the combine sums fn(G) over the T ranks (G is the same everywhere)
        o, k = int(plan.slot_offsets[d]), int(n[d])
        self.y = T * fn_ref(G[o:o + k])
        self.h = to_dev(rows(seed + 500 + d, int(plan.logits_tokens[d])))
        Lg = np.zeros((plan.logits_rows, H))
        for r in range(D):
            lr = rows(seed + 500 + r, int(plan.logits_tokens[r]))
            Lg[plan.logits_offsets[r]:plan.logits_offsets[r] + len(lr)] = lr
        self.Lg = Lg
        self.V = to_dev(np.random.default_rng(seed + 9).standard_normal((plan.logits_rows, 7)).astype(np.float32))
        lo = int(plan.logits_offsets[d])
        self.ls = to_host(self.V, None)[lo:lo + int(plan.logits_tokens[d])]
        self.out_rows = int(n[d]) + 3


def overlapped(dp, ms, contrib):
    """The two-batch-overlap schedule of the module docstring; results copied to the host."""
    res = [dict() for _ in ms]
    with on(COMPUTE):
        hg = [dp.gather_async(m.x, m.plan, contribution=contrib, stream=COMM) for m in ms]
        hl = [dp.gather_logits_async(m.h, m.plan, stream=COMM) for m in ms]
        hs = []
        for m, r, h in zip(ms, res, hg):
            G = h.wait()
            r["G"] = to_host(G)
            hs.append(dp.scatter_async(fn(G), m.plan, reduce=True, stream=COMM))
        for r, h in zip(res, hl):
            r["logits"] = to_host(h.wait())
        # synchronous calls of micro-batch 0 on the compute stream beside micro-batch 1's pending
        # scatter on the comm stream: the launch chain orders the transports
        out0 = to_dev(np.full((ms[0].out_rows, H), 7, np.float32).astype(NPDT))
        ms[0].Yc = fn(to_dev(ms[0].G.astype(np.float32).astype(NPDT)))
        dp.scatter(ms[0].Yc, ms[0].plan, reduce=True, out=out0)
        res[0]["ls"] = to_host(dp.scatter_logits(ms[0].V, ms[0].plan), None)
        hls = dp.scatter_logits_async(ms[1].V, ms[1].plan, stream=COMM)
        for r, h in zip(res, hs):
            r["y"] = to_host(h.wait())
        res[0]["y_out"] = to_host(out0)
        res[1]["ls"] = to_host(hls.wait(), None)
    return res


def serialized(ser, batches_list, ms, contrib, d):
    res = []
    with on(COMPUTE):
        for i, (bs, m) in enumerate(zip(batches_list, ms)):
            p = ser.sync(bs[d])
            check(f"serialized plan == micro-batch {i}'s plan", p == m.plan)
            r = {}
            G = ser.gather(m.x, p, contribution=contrib)
            r["G"] = to_host(G)
            r["y"] = to_host(ser.scatter(fn(G), p, reduce=True))
            r["logits"] = to_host(ser.gather_logits(m.h, p))
            if i == 0:
                out0 = to_dev(np.full((m.out_rows, H), 7, np.float32).astype(NPDT))
                ser.scatter(m.Yc, p, reduce=True, out=out0)
                r["y_out"] = to_host(out0)
            r["ls"] = to_host(ser.scatter_logits(m.V, p), None)
            res.append(r)
    return res


for A in [a for a in (1, 2) if T % a == 0]:
    D, d = T // A, RANK // A
    buckets = (A * 2, A * 8, A * 32)
    kw = dict(attn_tp_size=A, hidden_size=H, dtype=args.dtype, backend=args.backend, spec=spec,
              graph_buckets=buckets, transport=args.transport, timeout_s=args.timeout)
    dp = dg.DpAttention(comm, micro_batches=2, **kw)
    ser = dg.DpAttention(comm, **kw)
    if CUDA and COMPUTE is None:  # a stream made before belongs to device 0 on every rank
        COMPUTE = xp.cuda.Stream(non_blocking=True)
        COMM = xp.cuda.Stream(non_blocking=True)
    AVAILABLE.add((A, dp.info()["transport"], dp.info()["p2p_node_size"]))
    phase(f"A={A}: transport {dp.info()['transport']}")
    for contrib in ("replicate", "partial"):
        phase(f"A={A} {contrib}: capturing the runners")
        with on(COMPUTE):
            r2 = dp.graph_runner(fn, contribution=contrib, micro_batches=2)
            r1 = ser.graph_runner(fn, contribution=contrib)
        for step in range(args.steps):
            graph = step % 2 == 1
            tag = f"A={A} {contrib} step {step}{' graph' if graph else ''}"
            phase(tag)
            bl = [batches_of(step, i, D, A, graph) for i in (0, 1)]
            with on(COMPUTE):
                plans = [dp.sync(bl[i][d], micro_batch=i) for i in (0, 1)]
            USED.update(p.transport for p in plans)
            with on(COMPUTE):  # device inputs made on the compute stream (the comm stream forks from it)
                ms = [Micro(p, step, i, A, contrib) for i, p in enumerate(plans)]
            got = overlapped(dp, ms, contrib)
            ref = serialized(ser, bl, ms, contrib, d)
            for i, (m, r, s) in enumerate(zip(ms, got, ref)):
                t = f"{tag} micro-batch {i} ({m.plan.mode.name}, {m.plan.transport})"
                check(f"{t} gather", close(r["G"], m.G))
                check(f"{t} scatter", close(r["y"], m.y))
                check(f"{t} gather_logits", close(r["logits"], m.Lg))
                check(f"{t} scatter_logits", np.array_equal(r["ls"], m.ls))
                if i == 0:
                    want = np.zeros((m.out_rows, H))
                    want[:m.y.shape[0]] = m.y
                    check(f"{t} synchronous scatter(out=) beside the pending scatter", close(r["y_out"], want))
                for k in r:
                    same(f"{t} {k}", r[k], s[k])
            if graph and all(p.graph for p in plans):
                runner_steps += 1
                with on(COMPUTE):
                    outs = [to_host(o) for o in r2.run([m.x for m in ms], plans)]
                    sers = []
                    for i, m in enumerate(ms):
                        ps = ser.sync(bl[i][d])
                        sers.append(to_host(r1.run(m.x, ps)))
                for i, (m, o, so) in enumerate(zip(ms, outs, sers)):
                    want = np.zeros((int(m.plan.bucket), H))
                    want[:m.y.shape[0]] = m.y
                    t = f"{tag} runner micro-batch {i} buckets {[int(p.bucket) for p in plans]}"
                    check(f"{t} == reference", close(o, want))
                    if plans[0].bucket == plans[1].bucket:
                        same(t, o, so)
                    else:
                        check(f"{t} serialized runner == reference", close(so, want))
        phase(f"A={A} {contrib}: a bad stream=")
        # a bad stream= on every rank: InputError naming it; the next sync raises; recovery
        with on(COMPUTE):
            plans = [dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, 2), micro_batch=i) for i in (0, 1)]
            x = to_dev(rows(5, 2))
            if CUDA:
                try:
                    dp.gather_async(x, plans[0], stream="comm")
                    check(f"A={A} {contrib}: a bad stream= raised nothing", False)
                except dg.InputError as e:
                    check(f"A={A} {contrib}: a bad stream= names it: {e}", "stream" in str(e) and "'comm'" in str(e))
                try:
                    dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, 2), micro_batch=0)
                    check(f"A={A} {contrib}: the sync after a bad stream= raised nothing", False)
                except dg.InputError:
                    check("the sync after a bad stream= raised InputError", True)
        # steady state: overlapped eager steps and overlapped replays allocate nothing
        if args.steps >= 2:
            phase(f"A={A} {contrib}: steady state")
            with on(COMPUTE):
                big = [dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, A * 32, can_run_graph=True), micro_batch=i)
                       for i in (0, 1)]
                xb = to_dev(rows(11, A * 32))
                # warm-up: the largest micro-batches, in the loop's pattern (as many handles in flight)
                hs = [dp.gather_async(xb, p, contribution=contrib, stream=COMM) for p in big]
                ys = [dp.scatter_async(fn(h.wait()), p, stream=COMM) for h, p in zip(hs, big)]
                for h in ys:
                    h.wait()
                r2.run([xb, xb], big)
                if CUDA:
                    xp.cuda.Device().synchronize()
                ev0 = dp._path.events.created if CUDA else 0  # test only
                st0 = (dp.memory_stats()["total"]["allocations"], r2.memory_stats()["total"]["allocations"])
                if CUDA:
                    pool = xp.get_default_memory_pool()
                    mallocs = [0]

                    def counting(nbytes, _pool=pool, _n=mallocs):
                        _n[0] += 1
                        return _pool.malloc(nbytes)

                rng = np.random.default_rng(4242 + A)
                for k in range(40):
                    ns = [int(v) for v in rng.integers(0, A * 32 + 1, size=(2, D))[:, d]]
                    ps = [dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, ns[i], can_run_graph=True), micro_batch=i)
                          for i in (0, 1)]
                    if k < 20:  # eager overlapped (fn allocates its output: not dpgather's)
                        hs = [dp.gather_async(xb[:ns[i]], p, contribution=contrib, stream=COMM)
                              for i, p in enumerate(ps)]
                        ys = [dp.scatter_async(fn(h.wait()), p, stream=COMM) for h, p in zip(hs, ps)]
                        for h in ys:
                            h.wait()
                        continue
                    for i, p in enumerate(ps):
                        view = r2.input_view(p, i)
                        view[:ns[i]] = xb[:ns[i]]
                    if CUDA and k == 20:
                        xp.cuda.Device().synchronize()
                        xp.cuda.set_allocator(counting)
                    r2.run(None, ps)
                if CUDA:
                    xp.cuda.Device().synchronize()
                    xp.cuda.set_allocator(pool.malloc)
                    check(f"A={A} {contrib}: no CuPy allocation over 20 overlapped replays ({mallocs[0]})",
                          mallocs[0] == 0)
                    check(f"A={A} {contrib}: no CUDA event created once warm ({ev0} -> {dp._path.events.created})",
                          dp._path.events.created == ev0)
                st1 = (dp.memory_stats()["total"]["allocations"], r2.memory_stats()["total"]["allocations"])
                check(f"A={A} {contrib}: no arena allocation over 40 overlapped steps ({st0} -> {st1})", st0 == st1)
        r2.close()
        r1.close()
    dp.close()
    ser.close()

ok, msg = transports_as_expected(AVAILABLE, T, args.backend, args.transport)
check(msg, ok)
if tally.fails:
    sys.stdout.write(f"rank {RANK}: {tally.nfailures} failures, first: {tally.fails[:3]}\n")
report(RANK, failures=tally.fails[:50], nfailures=tally.nfailures, passed=tally.passed, bitdiffs=bitdiffs,
       runner_steps=runner_steps,
       backend=args.backend, dtype=args.dtype, T=T, transport=args.transport, transports_used=sorted(USED),
       transports_available=sorted({t for _, t, _ in AVAILABLE}))
