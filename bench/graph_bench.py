"""Graph replay vs the eager gather -> fn -> scatter step, and bytes allocated per step (issue 5).

    mpirun -n 4 python bench/graph_bench.py [--hidden 7168] [--inter 2048]
        [--buckets 1,2,4,8,16,32,64,128,256] [--tokens 1,2,4,...,256] [--fns identity,mlp]
        [--steps 1000] [--reps 20] [--warmup 3] [--target-us 2000] [--attn-tp 1] [--strict]
        [--transport auto|nccl|p2p] [--json PATH]

One rank per GPU, bfloat16 (2-byte storage) rows of ``--hidden``. ``DpAttention(graph_buckets=
--buckets, max_tokens_per_rank=max bucket)``; for each ``fn`` a ``dp.graph_runner(fn)`` captures
pack -> gather -> fn -> combine -> unpack once per bucket. For every ``--tokens`` value n (every
replica decodes n tokens, so ``plan.graph`` holds and ``plan.bucket`` = the smallest bucket >= n):

    replay   runner.run(x, plan)                                   (one graph launch + input copy)
    eager    dp.scatter(fn(dp.gather(x, plan)), plan, reduce=True) (the same plan, launched op by op)

``fn``: ``identity`` is ``G + 0`` on the uint16 storage (a bit-exact copy, capturable);
``mlp`` is one rank's slice of a SwiGLU MLP: ``gate_up = G @ W1[H, 2*I]``,
``act = silu(gate) * up`` (a CuPy ElementwiseKernel on bf16 bits, fp32 math),
``Y = act @ W2[I, H]`` (``I = --inter`` per rank), the matmuls through
``dpgather.tools.cublas`` (ctypes cuBLAS: CuPy refuses cuBLAS inside a stream capture). Both paths call the same ``fn``.

Step latency, by the protocol of ``dpgather.tools.timing.Timer`` (eager launches): ``k``
back-to-back steps (``k`` makes one repetition about ``--target-us``, agreed over ranks) between
CUDA events on one stream, inputs rotating over a few buffers, after ``--warmup`` repetitions; per
rank the median of ``--reps`` repetitions / ``k``; reported: the maximum over ranks. A host
barrier precedes each repetition. ``dp.sync`` is not timed (the
"sync-free" step; its cost is bench/sync_bench.py's subject). ``--strict`` times the eager path with
DpAttention's collective argument check on (one host all-gather per call); off by default.

Correctness per point (#wrong): the replayed output equals the eager output element by element
(identity: also equals the exact sum over ranks, T x the replica's rows); rows past n are zero.

Memory per step: ``--steps`` steps of random counts (every replica 1..max bucket, seeded), each
``dp.sync`` + the step, first by replay then eagerly. Reported per step: bytes requested from CuPy's
allocator (a counting allocator around the default memory pool, installed for the measured steps
only), and over the whole run the deltas of the default pool's ``used_bytes()`` /
``total_bytes()``, of ``dp.memory_stats()`` (total reserved bytes and allocations) and of
``runner.memory_stats()``; beside SGLang before #8277: a zeroed ``sum(n) x H x 2``-byte gathered
buffer allocated every step, graph or not.

Targets: replay >= 2x faster than eager at <= 64 tokens per rank; 0 bytes allocated per replayed
step. Rank 0 prints progress, then the tables; ``--json`` writes everything. Runners are closed
before ``dp.close()`` (graphs that captured NCCL calls must go before the communicator).
"""

import argparse
import datetime
import math
import sys

import numpy as np

from dpgather.core.files import write_json_atomic
from dpgather.tools.timing import Column, CupyEvents, Timer, gpus_on_every_rank, print_table

DEFAULT_BUCKETS = "1,2,4,8,16,32,64,128,256"
KMAX = 256
MAX_ROT = 8

_GEN_BODY = r"""
    unsigned long long r = (unsigned long long)(i / width), c = (unsigned long long)(i % width);
    unsigned long long z = seed * 0x9E3779B97F4A7C15ULL + (r + 1) * 0xBF58476D1CE4E5B9ULL
                         + (c + 1) * 0x94D049BB133111EBULL;
    z ^= z >> 31; z *= 0xD6E8FEB86659FD93ULL; z ^= z >> 32; z *= 0x9E3779B97F4A7C15ULL; z ^= z >> 29;
    float v = (float)((int)(z % 31ULL) - 15) * 0.125f;
"""

_SILU_MUL = r"""
    float gf = __uint_as_float(((unsigned int)g) << 16);
    float uf = __uint_as_float(((unsigned int)u) << 16);
    float r = gf / (1.0f + __expf(-gf)) * uf;
    unsigned int b = __float_as_uint(r);
    b += 0x7FFFu + ((b >> 16) & 1u);
    o = (unsigned short)(b >> 16);
"""


class Kernels:
    """The bench's own CuPy kernels (compiled on first use; warm them before any capture)."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.gen = cupy.ElementwiseKernel(
            "uint64 seed, int64 width", "raw uint16 out",
            _GEN_BODY + "out[i] = (unsigned short)(__float_as_uint(v) >> 16);",
            "dpg_bench_gen_bf16")
        # act = silu(gate) * up on bf16 bits: fp32 math, round to nearest even (no NaN inputs)
        self.silu_mul = cupy.ElementwiseKernel("uint16 g, uint16 u", "uint16 o", _SILU_MUL,
                                               "dpg_bench_silu_mul_bf16")

    def fill(self, a, seed):
        if a.size:
            self.gen(np.uint64(seed), np.int64(a.shape[1]), a, size=a.size)
        return a


def to_bf16_bits(cupy, f32):
    """bf16 bits (uint16) of a float32 CuPy array, round to nearest even."""
    u = f32.view(cupy.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)


class Mlp:
    """One rank's SwiGLU slice, bf16: ``(silu(G W1[:, :I]) * G W1[:, I:]) W2``."""

    def __init__(self, cupy, blas, kern, hidden, inter, rank):
        self.cupy, self.blas, self.kern, self.inter = cupy, blas, kern, inter
        rs = cupy.random.RandomState(1234 + rank)
        self.W1 = to_bf16_bits(cupy, rs.standard_normal((hidden, 2 * inter), dtype=cupy.float32)
                               * np.float32(1.0 / math.sqrt(hidden)))
        self.W2 = to_bf16_bits(cupy, rs.standard_normal((inter, hidden), dtype=cupy.float32)
                               * np.float32(1.0 / math.sqrt(inter)))
        cupy.cuda.Device().synchronize()  # made on the null stream; used on non-blocking ones

    def __call__(self, G):
        cupy, I = self.cupy, self.inter
        gu = self.blas.matmul(G, self.W1)                      # [m, 2I]
        act = cupy.empty((G.shape[0], I), dtype=cupy.uint16)
        self.kern.silu_mul(gu[:, :I], gu[:, I:], act)
        return self.blas.matmul(act, self.W2)                  # [m, H]


def identity(G):
    return G + 0


#: Columns of the latency table (rows: the ``points`` of the JSON output).
POINT_COLUMNS = (
    Column("fn", "fn", width=9), Column("tokens", "tokens", "", "d"), Column("bucket", "bucket", "", "d"),
    Column("transport", "transport", ""),
    Column("eager_us", "eager", "(us)", ".1f"), Column("replay_us", "replay", "(us)", ".1f"),
    Column("speedup", "speedup", "(x)", ".2f"), Column("wrong", "#wrong", "", "d"),
    Column("bitdiff", "#bitdiff", "", "d"),
)
#: Columns of the memory table (one row per fn and path).
MEMORY_COLUMNS = (
    Column("fn", "fn", width=9), Column("path", "path"),
    Column("alloc_bytes_per_step", "alloc", "(B/step)", ".0f"),
    Column("alloc_calls_per_step", "allocs", "(/step)", ".2f"),
    Column("pool_used_delta", "pool used", "(B)", "d"), Column("pool_total_delta", "pool total", "(B)", "d"),
    Column("dp_reserved_delta", "dp arena", "(B)", "d"), Column("dp_allocations_delta", "dp allocs", "", "d"),
    Column("runner_delta", "runner", "(B)", "d"), Column("sglang", "sglang<8277", "(B/step)", ".0f"),
)


class CountingAllocator:
    """Counts the bytes requested from CuPy's allocator while installed (wraps the default pool)."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.pool = cupy.get_default_memory_pool()
        self.bytes = 0
        self.calls = 0

    def __call__(self, nbytes):
        self.bytes += int(nbytes)
        self.calls += 1
        return self.pool.malloc(nbytes)

    def __enter__(self):
        self.bytes = self.calls = 0
        self.cupy.cuda.set_allocator(self)
        return self

    def __exit__(self, *exc):
        self.cupy.cuda.set_allocator(self.pool.malloc)
        return False


def _stats_total(stats):
    t = stats.get("total", {})
    return int(t.get("reserved_bytes", 0)), int(t.get("allocations", 0))


def _runner_bytes(stats):
    """Sum of reserved bytes over the runner's roles + input + graph pool total."""
    total = 0
    for k, v in stats.items():
        if k == "total" or not isinstance(v, dict):
            continue
        total += int(v.get("reserved_bytes", v.get("total_bytes", 0)))
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="run under mpirun/mpiexec with one rank per GPU")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048, help="MLP intermediate size per rank")
    ap.add_argument("--buckets", default=DEFAULT_BUCKETS)
    ap.add_argument("--tokens", default=None, help="tokens per replica to time (default: the buckets)")
    ap.add_argument("--fns", default="identity,mlp")
    ap.add_argument("--steps", type=int, default=1000, help="random-count steps of the memory check")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (median; >= 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--target-us", type=float, default=2000.0)
    ap.add_argument("--attn-tp", type=int, default=1)
    ap.add_argument("--strict", action="store_true", help="DpAttention(strict=True) for the eager path")
    ap.add_argument("--transport", default="auto", choices=("auto", "nccl", "p2p"),
                    help="DpAttention(transport=...): auto runs graph steps over P2P where it can")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.reps < 20:
        ap.error("--reps must be >= 20 (median of at least 20 samples)")
    buckets = sorted({int(b) for b in args.buckets.split(",") if b})
    tokens = [int(t) for t in (args.tokens or args.buckets).split(",") if t]
    fns = [f for f in args.fns.split(",") if f]
    for f in fns:
        if f not in ("identity", "mlp"):
            ap.error(f"unknown fn {f!r}; expected identity and/or mlp")
    if not buckets or any(b <= 0 for b in buckets):
        ap.error("--buckets must be positive integers")
    if any(t <= 0 or t > buckets[-1] for t in tokens):
        ap.error(f"--tokens must be in 1..{buckets[-1]} (graph steps)")

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, T = world.Get_rank(), world.Get_size()
    if not gpus_on_every_rank(world, "graph_bench"):
        return 2

    import cupy

    A = args.attn_tp
    if A < 1 or T % A or any(b % A for b in buckets) or any(t % A for t in tokens):
        if rank == 0:
            print(f"# graph_bench: --attn-tp {A} must divide the world size {T}, every bucket and "
                  "every token count", file=sys.stderr)
        return 2

    import dpgather as dg

    say = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    H = args.hidden
    D = T // A
    d, a = rank // A, rank % A
    contrib = "partial" if A > 1 else "replicate"
    dp = dg.DpAttention(world, attn_tp_size=A, hidden_size=H, dtype="bfloat16", backend="cuda",
                        policy="auto", graph_buckets=buckets, max_tokens_per_rank=buckets[-1],
                        strict=args.strict, timeout_s=args.timeout, transport=args.transport)
    dev = cupy.cuda.Device().id
    stream = cupy.cuda.Stream(non_blocking=True)
    kern = Kernels(cupy)
    from dpgather.kernels import _cuda as _kernels

    _kernels.warm()  # load the copy kernels before any capture
    timer = Timer(CupyEvents(stream), comm=world, reps=args.reps, warmup=args.warmup,
                  target_us=args.target_us, kmax=KMAX)
    blas = None
    props = cupy.cuda.runtime.getDeviceProperties(dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    meta = {"bench": "graph_bench", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": name, "ranks": T, "attn_tp": A, "hidden": H, "inter": args.inter,
            "buckets": buckets, "tokens": tokens, "steps": args.steps, "reps": args.reps,
            "warmup": args.warmup, "strict": args.strict, "cupy": cupy.__version__,
            "transport": args.transport, "info": {k: str(v) for k, v in dp.info().items()}}
    say(f"# graph_bench: {T} ranks (A={A}) on {name}, hidden {H} bf16, buckets {buckets}, "
        f"median of {args.reps}")

    # inputs: own rows, rotating; values exact under sums over ranks
    nmax = buckets[-1]
    nrot = MAX_ROT
    X = cupy.empty((nrot, nmax, H), dtype=cupy.uint16)
    for j in range(nrot):
        kern.fill(X[j], 1_000_003 * (j + 1) + 1009 * d + (a if A > 1 else 0))
    cupy.cuda.Device().synchronize()

    points, memory, wrong_total = [], [], 0
    runner = None
    try:
        for fname in fns:
            if fname == "mlp":
                if blas is None:
                    from dpgather.tools.cublas import Cublas

                    with stream:
                        blas = Cublas(cupy)
                    meta["cublas"] = {"path": blas.path, "version": blas.version}
                    say(f"# cuBLAS: {blas.path} (version {blas.version})")
                fn = Mlp(cupy, blas, kern, H, args.inter, rank)
            else:
                fn = identity
            # compile fn's kernels and run cuBLAS once on this stream before any capture
            with stream:
                fn(cupy.zeros((D * buckets[0], H), dtype=cupy.uint16))
                stream.synchronize()
            runner = dp.graph_runner(fn, contribution=contrib, reduce=True)
            say(f"# [{fname}] captured {len(buckets)} buckets; runner static bytes "
                f"{_runner_bytes(runner.memory_stats())}")
            for n in tokens:
                with stream:  # the descriptor upload goes on the bench stream
                    plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, n, can_run_graph=True))
                ok_plan = bool(plan.graph) and plan.bucket >= n
                if not world.allreduce(ok_plan, op=MPI.LAND):
                    raise RuntimeError(f"plan for {n} tokens per replica is not a graph step: {plan!r}")
                xs = [X[j, :n] for j in range(nrot)]
                with stream:
                    yr = runner.run(xs[0], plan).copy()
                    G = dp.gather(xs[0], plan, contribution=contrib)
                    y_own = dp.scatter(fn(G), plan, reduce=True)  # this replica's own rows
                    ye = cupy.zeros_like(yr)  # the runner's static output has the bucket's rows
                    ye[:y_own.shape[0]] = y_own
                    bitdiff, wrong = _compare(cupy, yr, ye, exact=fname == "identity")
                    stream.synchronize()
                bitdiff = int(world.allreduce(bitdiff, op=MPI.SUM))
                if fname == "identity":  # every rank has the same n: the check is collective-safe
                    wrong += _identity_wrong(cupy, ye, xs[0], n, T, A, world)
                wrong = int(world.allreduce(wrong, op=MPI.SUM))
                wrong_total += wrong
                tr = timer.measure(lambda j: runner.run(xs[j % nrot], plan), graph=False)
                te = timer.measure(lambda j: dp.scatter(fn(dp.gather(xs[j % nrot], plan, contribution=contrib)),
                                                        plan, reduce=True), graph=False)
                pt = {"fn": fname, "tokens": n, "bucket": int(plan.bucket), "transport": plan.transport, "replay_us": tr["eager"],
                      "eager_us": te["eager"],
                      "speedup": te["eager"] / tr["eager"] if tr["eager"] > 0 else 0.0,
                      "k_replay": tr["k"], "k_eager": te["k"], "wrong": wrong, "bitdiff": bitdiff}
                points.append(pt)
                say(f"#   {fname:8s} n={n:4d} {plan.transport:4s} replay {tr['eager']:8.1f} us  eager {te['eager']:8.1f} us  "
                    f"x{pt['speedup']:.2f}  #wrong {wrong}")
            memory.append(memory_run(cupy, MPI, world, dg, dp, runner, fn, fname, X, nrot, buckets,
                                     args.steps, args.seed, stream, H, D, A, d, contrib, say))
            runner.close()
            runner = None
            cupy.cuda.Device().synchronize()
    finally:
        if runner is not None:
            runner.close()
        stream.synchronize()
        dp.close()
        if blas is not None:
            blas.close()

    if rank == 0:
        print("#")
        print(f"# graph_bench results: {T} ranks (A={A}), {name}, hidden {H} bf16; step = "
              f"gather -> fn -> combine; time = max over ranks of the median per step")
        print_table(points, POINT_COLUMNS)
        print("#")
        print(f"# bytes allocated per step over {args.steps} steps of random counts (1..{buckets[-1]} "
              "per replica); pool/arena columns: deltas over the whole run")
        rows = [{"fn": m["fn"], "path": path, **m[path],
                 "sglang": m["sglang_before_8277_bytes_per_step"]}
                for m in memory for path in ("replay", "eager")]
        print_table(rows, MEMORY_COLUMNS)
        print("#")
        print("# Targets")
        small = [p for p in points if p["tokens"] <= 64]
        ok_speed = bool(small) and all(p["speedup"] >= 2.0 for p in small)
        worst = min(small, key=lambda p: p["speedup"]) if small else None
        if worst:
            print(f"# replay >= 2x faster than eager at <= 64 tokens/rank: worst {worst['fn']} n={worst['tokens']} "
                  f"x{worst['speedup']:.2f}  {'OK' if ok_speed else 'FAILED'}")
        zero = all(m["replay"]["alloc_bytes_per_step"] == 0 and m["replay"]["pool_total_delta"] == 0
                   and m["replay"]["dp_reserved_delta"] == 0 and m["replay"]["runner_delta"] == 0
                   for m in memory)
        print(f"# 0 bytes allocated per replayed step: {'OK' if zero else 'FAILED'}")
        print(f"# Wrong values : {wrong_total} {'OK' if wrong_total == 0 else 'FAILED'}")
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "points": points, "memory": memory,
                                          "targets": {"replay_2x_le64": ok_speed, "zero_alloc_replay": zero},
                                          "wrong": wrong_total}, indent=1)
            print(f"# wrote {args.json}")
    return 0 if wrong_total == 0 else 1


def _compare(cupy, yr, ye, exact):
    """``(bitdiff, wrong)``: elements of replay ``yr`` not bit-equal to eager ``ye``, and those
    that count as wrong: any difference when ``exact``, else a difference beyond bf16 rounding of
    a differently ordered fp32 sum (2^-6 relative plus 2^-10 of the largest magnitude), or NaN."""
    if yr.shape != ye.shape:
        return 1, 1
    bitdiff = int(cupy.count_nonzero(yr != ye))
    if exact or bitdiff == 0:
        return bitdiff, bitdiff
    a = (yr.astype(cupy.uint32) << 16).view(cupy.float32)
    b = (ye.astype(cupy.uint32) << 16).view(cupy.float32)
    scale = float(cupy.abs(b).max()) if b.size else 0.0
    bad = (cupy.abs(a - b) > cupy.abs(b) * (2.0 ** -6) + scale * (2.0 ** -10)) | cupy.isnan(a) | cupy.isnan(b)
    return bitdiff, int(cupy.count_nonzero(bad))


def _identity_wrong(cupy, ye, x, n, T, A, world):
    """Elements of the eager identity output that differ from the exact expectation (collective).

    A=1: y = T x (every rank gathered the same replicated rows). A>1 (partial): y = T x the sum
    of the replica's A partial rows, which this rank gets from its attn_tp peers via MPI.
    Rows past ``n`` must be zero.
    """
    from mpi4py import MPI

    xf = (x.astype(cupy.uint32) << 16).view(cupy.float32)
    if A > 1:
        host = cupy.asnumpy(xf)
        sub = world.Split(world.Get_rank() // A, world.Get_rank() % A)
        tot = np.empty_like(host)
        sub.Allreduce(host, tot, op=MPI.SUM)
        sub.Free()
        xf = cupy.asarray(tot)
    exp = ((xf * np.float32(T)).view(cupy.uint32) >> 16).astype(cupy.uint16)
    wrong = int(cupy.count_nonzero(ye[:n] != exp))
    if ye.shape[0] > n:
        wrong += int(cupy.count_nonzero(ye[n:]))
    return wrong


def memory_run(cupy, MPI, world, dg, dp, runner, fn, fname, X, nrot, buckets, steps, seed, stream,
               H, D, A, d, contrib, say):
    """Bytes allocated per step over ``steps`` random-count steps, replay then eager."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, buckets[-1] // A + 1, size=(steps, D)) * A  # multiples of A
    sglang = float(counts.sum(axis=1).mean()) * H * 2
    out = {"fn": fname, "steps": steps, "sglang_before_8277_bytes_per_step": sglang}
    pool = cupy.get_default_memory_pool()
    for path in ("replay", "eager"):
        # warm: one step of the largest bucket on this path first (steady state)
        with stream:
            plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, int(buckets[-1]), can_run_graph=True))
            x = X[0, :buckets[-1]]
            if path == "replay":
                runner.run(x, plan)
            else:
                dp.scatter(fn(dp.gather(x, plan, contribution=contrib)), plan, reduce=True)
            stream.synchronize()
        used0, total0 = pool.used_bytes(), pool.total_bytes()
        dp0 = _stats_total(dp.memory_stats())
        rn0 = _runner_bytes(runner.memory_stats())
        with CountingAllocator(cupy) as ca, stream:
            for s in range(steps):
                n = int(counts[s, d])
                plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, n, can_run_graph=True))
                x = X[s % nrot, :n]
                if path == "replay":
                    runner.run(x, plan)
                else:
                    dp.scatter(fn(dp.gather(x, plan, contribution=contrib)), plan, reduce=True)
            stream.synchronize()
        dp1 = _stats_total(dp.memory_stats())
        r = {"alloc_bytes_per_step": ca.bytes / steps, "alloc_calls_per_step": ca.calls / steps,
             "alloc_bytes": ca.bytes, "alloc_calls": ca.calls,
             "pool_used_delta": int(pool.used_bytes() - used0),
             "pool_total_delta": int(pool.total_bytes() - total0),
             "dp_reserved_delta": dp1[0] - dp0[0], "dp_allocations_delta": dp1[1] - dp0[1],
             "runner_delta": _runner_bytes(runner.memory_stats()) - rn0}
        # every rank's numbers: report the maximum (the worst rank)
        for k in list(r):
            r[k] = world.allreduce(r[k], op=MPI.MAX)
        out[path] = r
        say(f"#   [{fname}] {path:6s}: {r['alloc_bytes_per_step']:.0f} B and {r['alloc_calls_per_step']:.2f} "
            f"allocations per step; pool used/total delta {r['pool_used_delta']}/{r['pool_total_delta']}; "
            f"dp arena delta {r['dp_reserved_delta']} B, {r['dp_allocations_delta']} allocations; "
            f"sglang before #8277: {sglang:.0f} B/step")
    return out


if __name__ == "__main__":
    sys.exit(main())
