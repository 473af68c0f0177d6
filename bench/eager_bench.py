"""Eager small decode steps: dpgather's sync + gather + combine against SGLang's recipe in torch.

    mpirun -n T python bench/eager_bench.py [--hidden 7168] [--tokens 1,4,16,64]
        [--transports nccl,p2p,auto] [--strict] [--reps 20] [--json PATH]

One rank per GPU, bfloat16 rows of ``--hidden`` elements, every replica decoding ``n`` tokens
(A = 1). A step is what an eager engine runs per layer and step, launched from Python:

    dpgather     plan = dp.sync(LocalBatch(DECODE, n)); G = dp.gather(x, plan);
                 y = dp.scatter(G, plan)                       (the MLP is the identity)
    torch+sync   SGLang's eager DP-attention step in torch.distributed (NCCL): the per-step
                 all-gather of the token counts and ``.tolist()`` (its sync), then MAX_LEN: pad to
                 the largest count, all_gather_into_tensor, reduce_scatter_tensor, own rows
    torch        the same without the count exchange (the collectives alone)

Timing: dpgather.tools.timing's protocol, eager (``k`` steps launched back to back between CUDA
events on the step's stream, median of ``--reps``, maximum over ranks). Before timing, every
variant's output is checked: ``y`` must be ``T * x`` for this rank's rows (inputs are small
integers, exact in bfloat16). The summary gives ``ours / torch+sync`` per transport (the issue's
target: <= 0.8 for 1-64 tokens per rank).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from collective_bench import torch_setup  # noqa: E402  (bench/ is not a package)

from dpgather.core.files import write_json_atomic  # noqa: E402
from dpgather.tools.timing import Column, CupyEvents, Timer, TorchEvents, print_table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--transports", default="nccl,p2p,auto")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--target-us", type=float, default=3000.0)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--strict", action="store_true",
                    help="also time the last transport with strict=True (one host all-gather per call)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    import cupy
    from mpi4py import MPI

    import dpgather as dg

    world = MPI.COMM_WORLD
    rank, T = world.Get_rank(), world.Get_size()
    H = args.hidden
    tokens = [int(t) for t in args.tokens.split(",")]
    nmax = max(tokens)
    # DpAttention picks this rank's GPU: create it before any stream or array.
    transports = [t for t in args.transports.split(",") if t]
    dps = {}
    variants = [(tr, False) for tr in transports] + ([(transports[-1], True)] if args.strict and transports else [])
    for tr, strict in variants:
        key = tr + (" strict" if strict else "")
        try:
            dps[key] = dg.DpAttention(world, hidden_size=H, dtype="bfloat16", backend="cuda", policy="auto",
                                      transport=tr, max_tokens_per_rank=nmax, timeout_s=120, strict=strict)
        except dg.DpGatherError as e:
            if rank == 0:
                print(f"# {key}: unavailable ({e})", flush=True)
    rows, meta = [], {"ranks": T, "hidden": H, "tokens": tokens}
    stream = cupy.cuda.Stream(non_blocking=True)
    timer = Timer(CupyEvents(stream), comm=world, reps=args.reps, warmup=args.warmup,
                  target_us=args.target_us, graph=False)
    rng = np.random.default_rng(rank)
    nrot = 4
    X = cupy.asarray(rng.integers(-4, 5, size=(nrot, nmax, H)).astype(np.float32).astype(cupy.float32))
    Xb = cupy.empty((nrot, nmax, H), cupy.uint16)
    Xb[...] = (X.view(cupy.uint32) >> 16).astype(cupy.uint16)  # bfloat16 bits of small integers
    expect = (X[:, :, :] * T)  # y = sum over T ranks of the replicated identity output = T * x

    def bf16_to_f32(a):
        return (a.astype(cupy.uint32) << 16).view(cupy.float32)

    for n in tokens:
        batch = dg.LocalBatch(dg.ForwardMode.DECODE, n)
        for tr, dp in dps.items():
            with stream:
                plan = dp.sync(batch)
                y = dp.scatter(dp.gather(Xb[0, :n], plan), plan)
                ok = bool(cupy.array_equal(bf16_to_f32(y), expect[0, :n]))
                stream.synchronize()
            wrong = int(world.allreduce(0 if ok else 1, op=MPI.SUM))

            def body(j, dp=dp, batch=batch, n=n):
                p = dp.sync(batch)
                dp.scatter(dp.gather(Xb[j % nrot, :n], p), p)

            t = timer.measure(body, graph=False)["eager"]
            rows.append({"n": n, "variant": f"dpgather {tr}", "transport": plan.transport, "mode": plan.mode.name,
                         "us": t, "wrong": wrong})
    torch_note = None
    if not args.no_torch:
        torch, dist, torch_note = torch_setup(MPI, world, cupy.cuda.runtime.getDevice(), True)
        if torch is not None:
            tt = Timer(TorchEvents(torch), comm=world, reps=args.reps, warmup=args.warmup,
                       target_us=args.target_us, graph=False)
            dev = torch.device("cuda", cupy.cuda.runtime.getDevice())
            Xt = torch.from_dlpack(Xb.view(cupy.int16)).view(torch.bfloat16)
            cnt = torch.zeros(1, dtype=torch.int64, device=dev)
            cnts = torch.zeros(T, dtype=torch.int64, device=dev)
            for n in tokens:
                pad = torch.zeros((n, H), dtype=torch.bfloat16, device=dev)
                G = torch.empty((T * n, H), dtype=torch.bfloat16, device=dev)
                out = torch.empty((n, H), dtype=torch.bfloat16, device=dev)

                def step(j, sync, n=n, pad=pad, G=G, out=out):
                    if sync:
                        cnt.fill_(n)
                        dist.all_gather_into_tensor(cnts, cnt)
                        m = max(cnts.tolist())  # the recipe's device->host sync
                    else:
                        m = n
                    pad[:m].copy_(Xt[j % nrot, :m])
                    dist.all_gather_into_tensor(G[:T * m], pad[:m])
                    dist.reduce_scatter_tensor(out[:m], G[:T * m])
                    return out[:n]

                got = step(0, True)
                torch.cuda.synchronize()
                ok = bool(torch.equal(got.float(), torch.from_dlpack(expect[0, :n])))
                wrong = int(world.allreduce(0 if ok else 1, op=MPI.SUM))
                for sync in (True, False):
                    t = tt.measure(lambda j, sync=sync: step(j, sync), graph=False)["eager"]
                    rows.append({"n": n, "variant": "torch+sync" if sync else "torch", "transport": "nccl",
                                 "mode": "MAX_LEN", "us": t, "wrong": wrong})
            dist.destroy_process_group()
    meta["torch"] = torch_note
    for dp in dps.values():
        dp.close()
    if rank == 0:
        base = {r["n"]: r["us"] for r in rows if r["variant"] == "torch+sync"}
        for r in rows:
            r["vs_torch"] = f"{r['us'] / base[r['n']]:.2f}x" if r["n"] in base else None
        print(f"# eager step: sync + gather + combine, T={T}, H={H} bf16, identity MLP; {torch_note}")
        print("# time = median per step of k back-to-back eager steps (CUDA events), max over ranks")
        cols = (Column("n", "tokens", "/rank", "d"), Column("variant", "variant", "", "", 18, left=True),
                Column("transport", "transport", ""), Column("mode", "mode", ""),
                Column("us", "time", "(us)", ".1f"), Column("vs_torch", "vs torch+sync", ""),
                Column("wrong", "#wrong", "", "d"))
        print_table(rows, cols)
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "rows": rows}, indent=1)
    return 0 if all(r["wrong"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
