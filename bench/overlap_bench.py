"""Two-batch overlap (issue 16): the step of two micro-batches overlapped against the same step serialized.

    mpirun -n 2 python bench/overlap_bench.py [--hidden 7168] [--inter 2048]
        [--tokens 256,512,1024,2048,4096,8192] [--modes eager,graph] [--attn-tp 1]
        [--transport auto|nccl|p2p] [--reps 20] [--warmup 3] [--target-us 20000] [--json PATH]
    python -m dpgather.tools.launch -n 2 bench/overlap_bench.py --backend host --hidden 16 \\
        --inter 8 --tokens 8,16                         # a CPU smoke run of the same code (no timing value)

One rank per GPU, bfloat16 rows of ``--hidden``; ``n`` tokens per replica (``--tokens``) split in
two micro-batches of ``n/2`` (``DpAttention(micro_batches=3)``: micro-batches 0 and 1, and 2 for the
unsplit step). The MLP is one rank's slice of a SwiGLU MLP (``gate_up = G @ W1[H, 2I]``,
``silu(gate) * up``, ``@ W2[I, H]``, ``I = --inter`` per rank) with its matmuls through
``dpgather.tools.cublas`` (capturable), bench/graph_bench.py's ``Mlp``. A step (per layer) is:

    overlap   compute: G0 = gather_async(x0).wait()  Y0 = mlp(G0)          G1 = wait  Y1 = mlp(G1)  waits
              comm:    gather(x0)  gather(x1)  ...      scatter_async(Y0)   ...       scatter_async(Y1)
              (mlp(G0) runs beside gather 1, mlp(G1) beside combine 0; the first gather and the
              last combine cannot be hidden without attention to overlap them with)
    serial    the same micro-batches, synchronous calls on one stream: gather, mlp, scatter, twice
    single    the unsplit step: gather, mlp, scatter of n tokens (eager only; what not splitting costs)
    comm      gathers and scatters of both micro-batches alone (no MLP) -- the communication
    mlp       the MLP of both micro-batches alone -- the computation

``--modes graph`` replays ``dp.graph_runner(mlp, micro_batches=2)`` (one graph per bucket, the
overlapped schedule captured with a fork/join onto a second stream) against
``dp.graph_runner(mlp)`` run once per micro-batch (serialized replays). Graph buckets are the
micro-batch sizes.

Correctness before timing (#wrong, #bitdiff): the overlapped step's rows must equal the serialized
step's bit for bit (same plans, same GEMM shapes on the same stream: any difference is wrong), the
overlapped replay the serialized replay bit for bit and the eager serialized step within bf16
rounding, and the unsplit step within bf16 rounding (other GEMM shapes). A wrong result exits 1.

Timing: dpgather.tools.timing's protocol (``k`` steps back to back between CUDA events on the
compute stream, median of ``--reps``, maximum over ranks); ``dp.sync`` is not timed. Arena
allocations over the timed steps are reported (0 once warm). The summary gives serial / overlap
per point and the target of the issue: >= 1.25x where comm and mlp are within 2x of each other.
"""

import argparse
import contextlib
import datetime
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dpgather.core.files import write_json_atomic  # noqa: E402
from dpgather.tools.timing import Column, CupyEvents, HostClock, Timer, gpus_on_every_rank, print_table  # noqa: E402

KMAX = 256
NROT = 4

#: Columns of the table (rows: the ``points`` of the JSON output).
COLUMNS = (
    Column("mode", "mode", width=5, left=True), Column("tokens", "tokens", "(/rank)", "d"),
    Column("micro", "micro", "", ""), Column("transport", "transport", ""),
    Column("comm_us", "comm", "(us)", ".1f"), Column("mlp_us", "mlp", "(us)", ".1f"),
    Column("single_us", "single", "(us)", ".1f"), Column("serial_us", "serial", "(us)", ".1f"),
    Column("overlap_us", "overlap", "(us)", ".1f"), Column("speedup", "speedup", "(x)", ".2f"),
    Column("allocs", "allocs", "", "d"), Column("wrong", "#wrong", "", "d"), Column("bitdiff", "#bitdiff", "", "d"),
)


# -- the two backends: device arrays, the MLP, copies to the host -------------------------------------

class CudaEnv:
    """CuPy arrays (bf16 as uint16), graph_bench's Kernels/Mlp, a compute and a comm stream."""

    dtype = "bfloat16"
    name = "cuda"

    def __init__(self, args, rank, world):
        import cupy

        from graph_bench import Kernels, Mlp

        self.cupy = cupy
        self.compute = cupy.cuda.Stream(non_blocking=True)
        self.comm = cupy.cuda.Stream(non_blocking=True)
        self.kern = Kernels(cupy)
        from dpgather.tools.cublas import Cublas

        with self.compute:
            self.blas = Cublas(cupy)
        self.mlp = Mlp(cupy, self.blas, self.kern, args.hidden, args.inter, rank)
        self.clock = CupyEvents(self.compute)
        dev = cupy.cuda.Device().id
        props = cupy.cuda.runtime.getDeviceProperties(dev)
        self.device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.meta = {"cublas": {"path": self.blas.path, "version": self.blas.version}, "cupy": cupy.__version__}

    def inputs(self, nmax, H, seed):
        X = self.cupy.empty((NROT, nmax, H), dtype=self.cupy.uint16)
        for j in range(NROT):
            self.kern.fill(X[j], seed + 1_000_003 * (j + 1))
        self.cupy.cuda.Device().synchronize()
        return X

    def warm(self, D, H):
        with self.compute:  # compile the MLP's kernels, run cuBLAS once on the compute stream
            self.mlp(self.cupy.zeros((D, H), dtype=self.cupy.uint16))
            self.compute.synchronize()

    def host(self, a):
        return self.cupy.asnumpy(a)

    def synchronize(self):
        self.cupy.cuda.Device().synchronize()

    def close(self):
        self.blas.close()


class HostEnv:
    """NumPy float32 with a NumPy SwiGLU slice: a smoke run of the bench's code on CPUs."""

    dtype = "float32"
    name = "host"
    compute = comm = None
    device = "cpu"
    meta = {}

    def __init__(self, args, rank, world):
        g = np.random.default_rng(1234 + rank)
        H, inter = args.hidden, args.inter
        self.W1 = (g.standard_normal((H, 2 * inter)) / np.sqrt(H)).astype(np.float32)
        self.W2 = (g.standard_normal((inter, H)) / np.sqrt(inter)).astype(np.float32)
        self.clock = HostClock()

        def mlp(G, W1=self.W1, W2=self.W2, inter=inter):
            gu = G @ W1
            gate = gu[:, :inter]
            return np.ascontiguousarray((gate / (1 + np.exp(-gate)) * gu[:, inter:]) @ W2)

        self.mlp = mlp

    def inputs(self, nmax, H, seed):
        g = np.random.default_rng(seed)
        return (g.integers(-15, 16, size=(NROT, nmax, H)) * 0.125).astype(np.float32)

    def warm(self, D, H):
        pass

    def host(self, a):
        return np.array(a, copy=True)

    def synchronize(self):
        pass

    def close(self):
        pass


def compare(a, b, exact, bf16):
    """``(bitdiff, wrong)`` of two host arrays: elements not bit-equal, and those that count as
    wrong: any difference when ``exact``, else a difference beyond the rounding of a differently
    ordered sum (bf16: 2^-6 relative plus 2^-10 of the largest magnitude; float32: 1e-4), or NaN."""
    if a.shape != b.shape:
        return max(a.size, b.size, 1), max(a.size, b.size, 1)
    u = np.dtype(f"u{a.dtype.itemsize}")
    bitdiff = int(np.count_nonzero(a.view(u) != b.view(u)))
    if exact or bitdiff == 0:
        return bitdiff, bitdiff
    if bf16:
        fa = (a.astype(np.uint32) << 16).view(np.float32)
        fb = (b.astype(np.uint32) << 16).view(np.float32)
        rel, absf = 2.0 ** -6, 2.0 ** -10
    else:
        fa, fb, rel, absf = a, b, 1e-4, 1e-4
    scale = float(np.abs(fb).max()) if fb.size else 0.0
    bad = (np.abs(fa - fb) > np.abs(fb) * rel + scale * absf) | np.isnan(fa) | np.isnan(fb)
    return bitdiff, int(np.count_nonzero(bad))


# -- the bench --------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="run under mpirun/mpiexec with one rank per GPU")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048, help="MLP intermediate size per rank")
    ap.add_argument("--tokens", default="256,512,1024,2048,4096,8192",
                    help="tokens per replica (even: two micro-batches of half)")
    ap.add_argument("--modes", default="eager,graph", help="eager and/or graph")
    ap.add_argument("--attn-tp", type=int, default=1)
    ap.add_argument("--transport", default="auto", choices=("auto", "nccl", "p2p"))
    ap.add_argument("--backend", default="cuda", choices=("cuda", "host"),
                    help="host: a CPU smoke run of the bench's code (NumPy MLP, float32; no timing value)")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (median; >= 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--target-us", type=float, default=20000.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.reps < 20:
        ap.error("--reps must be >= 20 (median of at least 20 samples)")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    modes = [m for m in args.modes.split(",") if m]
    if not tokens or any(t < 2 or t % 2 for t in tokens):
        ap.error("--tokens must be even integers >= 2 (two micro-batches of half)")
    if not modes or any(m not in ("eager", "graph") for m in modes):
        ap.error(f"--modes must be eager and/or graph, got {args.modes!r}")
    if args.hidden < 1 or args.inter < 1:
        ap.error("--hidden and --inter must be positive")

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, T = world.Get_rank(), world.Get_size()
    if args.backend == "cuda" and not gpus_on_every_rank(world, "overlap_bench",
                                                         "; --backend host runs a CPU smoke test"):
        return 2
    A = args.attn_tp
    micro = sorted({t // 2 for t in tokens})
    if A < 1 or T % A or any(m % A for m in micro):
        if rank == 0:
            print(f"overlap_bench: --attn-tp {A} must divide the world size {T} and every micro-batch size "
                  f"{micro}", file=sys.stderr)
        return 2

    import dpgather as dg

    say = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    H, D, d, a = args.hidden, T // A, rank // A, rank % A
    contrib = "partial" if A > 1 else "replicate"
    # DpAttention picks this rank's GPU: create it before any stream or array.
    dp = dg.DpAttention(world, attn_tp_size=A, hidden_size=H, dtype="bfloat16" if args.backend == "cuda" else "float32",
                        backend=args.backend, policy="auto", graph_buckets=micro if "graph" in modes else (),
                        timeout_s=args.timeout, transport=args.transport, micro_batches=3)
    env = (CudaEnv if args.backend == "cuda" else HostEnv)(args, rank, world)
    bf16 = env.dtype == "bfloat16"
    nmax = max(tokens)
    X = env.inputs(nmax, H, 1009 * d + (a if A > 1 else 0) + 7)
    env.warm(D, H)
    timer = Timer(env.clock, comm=world, reps=args.reps, warmup=args.warmup, target_us=args.target_us, kmax=KMAX,
                  graph=False)
    mlp, comp, cs = env.mlp, env.compute, env.comm
    meta = {"bench": "overlap_bench", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": env.device, "backend": args.backend, "ranks": T, "attn_tp": A, "hidden": H,
            "inter": args.inter, "tokens": tokens, "modes": modes, "reps": args.reps, "warmup": args.warmup,
            "transport": args.transport, "info": {k: str(v) for k, v in dp.info().items()}, **env.meta}
    say(f"# overlap_bench: {T} ranks (A={A}) on {env.device}, hidden {H} x inter {args.inter} {env.dtype}, "
        f"tokens per replica {tokens}, modes {modes}, median of {args.reps}")

    def on():  # the compute stream current (CUDA)
        return comp if comp is not None else contextlib.nullcontext()

    def halves(j, n):
        h = n // 2
        return X[j % NROT, :h], X[j % NROT, h:n]

    def overlapped(j, ps, n):
        x0, x1 = halves(j, n)
        h0 = dp.gather_async(x0, ps[0], contribution=contrib, stream=cs)
        h1 = dp.gather_async(x1, ps[1], contribution=contrib, stream=cs)
        s0 = dp.scatter_async(mlp(h0.wait()), ps[0], reduce=True, stream=cs)  # mlp 0 beside gather 1
        s1 = dp.scatter_async(mlp(h1.wait()), ps[1], reduce=True, stream=cs)  # mlp 1 beside combine 0
        return s0.wait(), s1.wait()

    def serial(j, ps, n):
        return tuple(dp.scatter(mlp(dp.gather(x, p, contribution=contrib)), p, reduce=True)
                     for x, p in zip(halves(j, n), ps))

    def single(j, p, n):
        return dp.scatter(mlp(dp.gather(X[j % NROT, :n], p, contribution=contrib)), p, reduce=True)

    points, wrong_total, failed = [], 0, None
    runners = {}
    try:
        if "graph" in modes:
            with on():
                runners["overlap"] = dp.graph_runner(mlp, contribution=contrib, micro_batches=2)
                runners["serial"] = dp.graph_runner(mlp, contribution=contrib)
            say(f"# captured {len(micro)} buckets x 2 runners; static bytes "
                f"{_static(runners['overlap'])} (overlapped) + {_static(runners['serial'])} (serialized)")
        for n in tokens:
            h = n // 2
            with on():
                batch = dg.LocalBatch(dg.ForwardMode.DECODE, h)
                ps = [dp.sync(batch, micro_batch=i) for i in (0, 1)]
                pf = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, n), micro_batch=2)
            if "eager" in modes:
                pt = {"mode": "eager", "tokens": n, "micro": f"{h}+{h}", "transport": ps[0].transport}
                with on():
                    yo = [env.host(y) for y in overlapped(0, ps, n)]
                    ys = [env.host(y) for y in serial(0, ps, n)]
                    yf = env.host(single(0, pf, n))
                bd, wr = 0, 0
                for o, s in zip(yo, ys):  # same plans, same GEMMs: bit for bit
                    b, w = compare(o, s, True, bf16)
                    bd, wr = bd + b, wr + w
                b, w = compare(np.concatenate(yo), yf, False, bf16)  # other GEMM shapes: rounding
                wr += w
                pt["bitdiff"] = int(world.allreduce(bd, op=MPI.SUM))
                pt["wrong"] = int(world.allreduce(wr, op=MPI.SUM))
                wrong_total += pt["wrong"]
                a0 = dp.memory_stats()["total"]["allocations"]
                pt["overlap_us"] = timer.measure(lambda j: overlapped(j, ps, n), graph=False)["eager"]
                pt["serial_us"] = timer.measure(lambda j: serial(j, ps, n), graph=False)["eager"]
                pt["single_us"] = timer.measure(lambda j: single(j, pf, n), graph=False)["eager"]
                with on():
                    Gs = [dp.gather(x, p, contribution=contrib).copy() for x, p in zip(halves(0, n), ps)]
                    Ys = [mlp(G) for G in Gs]

                def comm_only(j):  # the gathers and combines of both micro-batches, no MLP
                    for x, p, Y in zip(halves(j, n), ps, Ys):
                        dp.gather(x, p, contribution=contrib)
                        dp.scatter(Y, p, reduce=True)

                pt["comm_us"] = timer.measure(comm_only, graph=False)["eager"]
                pt["mlp_us"] = timer.measure(lambda j: [mlp(G) for G in Gs], graph=False)["eager"]
                pt["allocs"] = int(world.allreduce(dp.memory_stats()["total"]["allocations"] - a0, op=MPI.MAX))
                pt["speedup"] = pt["serial_us"] / pt["overlap_us"] if pt["overlap_us"] > 0 else 0.0
                points.append(pt)
                say(f"#   eager n={n:5d} ({pt['transport']}): comm {pt['comm_us']:9.1f}  mlp {pt['mlp_us']:9.1f}  "
                    f"single {pt['single_us']:9.1f}  serial {pt['serial_us']:9.1f}  overlap {pt['overlap_us']:9.1f} us"
                    f"  x{pt['speedup']:.2f}  #wrong {pt['wrong']} #bitdiff {pt['bitdiff']}")
            if "graph" in modes:
                with on():
                    gb = dg.LocalBatch(dg.ForwardMode.DECODE, h, can_run_graph=True)
                    gps = [dp.sync(gb, micro_batch=i) for i in (0, 1)]
                ok = bool(gps[0].graph and gps[1].graph)
                if not world.allreduce(ok, op=MPI.LAND):
                    raise RuntimeError(f"micro-batches of {h} tokens are not graph steps: {gps[0]!r}")
                r2, r1 = runners["overlap"], runners["serial"]
                pt = {"mode": "graph", "tokens": n, "micro": f"{h}+{h}", "transport": gps[0].transport}

                def g_overlap(j):
                    return r2.run(list(halves(j, n)), gps)

                def g_serial(j):
                    return [r1.run(x, p) for x, p in zip(halves(j, n), gps)]

                with on():
                    go = [env.host(y) for y in g_overlap(0)]
                    gs = []
                    for x, p in zip(halves(0, n), gps):
                        gs.append(env.host(r1.run(x, p)))  # copy before the next run reuses the output
                    es = [env.host(y) for y in serial(0, gps, n)]
                bd, wr = 0, 0
                for o, s, e in zip(go, gs, es):
                    b, w = compare(o, s, True, bf16)  # the same graph per micro-batch: bit for bit
                    bd, wr = bd + b, wr + w
                    wr += compare(o, e, False, bf16)[1]  # replay vs eager: rounding at most
                pt["bitdiff"] = int(world.allreduce(bd, op=MPI.SUM))
                pt["wrong"] = int(world.allreduce(wr, op=MPI.SUM))
                wrong_total += pt["wrong"]
                a0 = dp.memory_stats()["total"]["allocations"]
                pt["overlap_us"] = timer.measure(g_overlap, graph=False)["eager"]
                pt["serial_us"] = timer.measure(g_serial, graph=False)["eager"]
                pt["allocs"] = int(world.allreduce(dp.memory_stats()["total"]["allocations"] - a0, op=MPI.MAX))
                pt["speedup"] = pt["serial_us"] / pt["overlap_us"] if pt["overlap_us"] > 0 else 0.0
                points.append(pt)
                say(f"#   graph n={n:5d} ({pt['transport']}): serial {pt['serial_us']:9.1f}  overlap "
                    f"{pt['overlap_us']:9.1f} us  x{pt['speedup']:.2f}  #wrong {pt['wrong']} #bitdiff {pt['bitdiff']}")
            env.synchronize()
    except Exception as e:  # noqa: BLE001 - reported, then re-raised after the cleanup
        failed = e
        raise
    finally:
        for r in runners.values():
            r.close()
        env.synchronize()
        dp.close()
        env.close()

    if rank == 0:
        print("#")
        print(f"# overlap_bench results: {T} ranks (A={A}), {env.device}, hidden {H} x inter {args.inter} "
              f"{env.dtype}; time per step (us) = max over ranks of the median; speedup = serial / overlap")
        print_table(points, COLUMNS)
        print("#")
        near = [p for p in points if p.get("comm_us") and p.get("mlp_us")
                and 0.5 <= p["comm_us"] / p["mlp_us"] <= 2.0]
        tag = {p["tokens"] for p in near}
        near = [p for p in points if p["tokens"] in tag]
        ok = bool(near) and all(p["speedup"] >= 1.25 for p in near)
        if near:
            worst = min(near, key=lambda p: p["speedup"])
            print(f"# target: overlap >= 1.25x serial where comm and mlp are within 2x ({sorted(tag)} tokens): "
                  f"worst {worst['mode']} n={worst['tokens']} x{worst['speedup']:.2f}  {'OK' if ok else 'NOT MET'}")
        else:
            print("# target: no point has comm and mlp within 2x of each other")
        losses = [f"{p['mode']} n={p['tokens']} x{p['speedup']:.2f}" for p in points if p["speedup"] < 1.0]
        print(f"# overlap loses at: {', '.join(losses) if losses else 'no point'}")
        print(f"# Wrong values : {wrong_total} {'OK' if wrong_total == 0 else 'FAILED'}")
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "points": points, "target_met": ok, "wrong": wrong_total},
                              indent=1)
            print(f"# wrote {args.json}")
    return 0 if wrong_total == 0 and failed is None else 1


def _static(runner):
    s = runner.memory_stats()
    return sum(int(v.get("reserved_bytes", v.get("total_bytes", 0))) for k, v in s.items()
               if k != "total" and isinstance(v, dict))


if __name__ == "__main__":
    sys.exit(main())
