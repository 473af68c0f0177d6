"""Host backend progress: a large uneven all-gatherv through dpgather's host communicator
against the same ``Iallgatherv`` completed by a plain ``Wait()`` and by a busy ``Test()`` spin.

    python -m dpgather.tools.launch -n 4 bench/host_progress_bench.py [--mib 488] [--reps 3] [--json PATH]

Rank ``r`` sends a share proportional to ``r + 1`` of ``--mib`` MiB (uneven, as a VARLEN gather
of a skewed step). dpgather's wait loop (``dist.base.poll_until``: spin, then ``sched_yield``, then
sleeps of at most 200 us between ``Test()`` calls) must keep MPI's progress engine moving: the
target is dpgather <= 2x ``Wait()``. Reported: the median over ``--reps`` of the slowest rank,
in seconds, and the ratios. Exit 1 if any gathered byte is wrong.
"""

import argparse
import sys
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=488.0, help="total MiB gathered")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    args = ap.parse_args(argv)

    from mpi4py import MPI

    from dpgather.dist.host import MpiHostCommunicator
    from dpgather.dist.base import exclusive_offsets

    world = MPI.COMM_WORLD
    rank, T = world.Get_rank(), world.Get_size()
    W = 1024  # bytes per row
    rows_total = int(args.mib * 2**20) // W
    shares = np.arange(1, T + 1, dtype=np.float64)
    counts = np.floor(rows_total * shares / shares.sum()).astype(np.int64)
    counts[-1] += rows_total - counts.sum()
    offs = np.asarray(exclusive_offsets(tuple(int(c) for c in counts)), dtype=np.int64)[:T]
    send = np.full((int(counts[rank]), W), rank + 1, dtype=np.uint8)
    recv = np.empty((rows_total, W), dtype=np.uint8)
    expect = np.repeat(np.arange(1, T + 1, dtype=np.uint8), counts)
    comm = MpiHostCommunicator(world, timeout_s=600)
    rowtype = MPI.BYTE.Create_contiguous(W).Commit()

    def ours():
        comm.all_gatherv(send, recv, counts)

    def raw(spin):
        req = world.Iallgatherv([send, rowtype], [recv, (counts, offs), rowtype])
        if spin:
            while not req.Test():
                pass
        else:
            req.Wait()

    results, wrong = {}, 0
    for name, fn in (("dpgather", ours), ("Wait", lambda: raw(False)), ("Test spin", lambda: raw(True))):
        times = []
        for _ in range(args.reps):
            recv.fill(0xAB)  # poison
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            times.append(dt)
            wrong += int(world.allreduce(int(np.count_nonzero(recv[:, 0] != expect)
                                             + np.count_nonzero(recv != recv[:, :1])), op=MPI.SUM))
        results[name] = float(np.median(times))
    rowtype.Free()
    comm.close()
    if rank == 0:
        lib = MPI.Get_library_version().splitlines()[0]
        print(f"# host all-gatherv of {args.mib:g} MiB, uneven shares 1..{T}, {T} ranks, {lib}")
        print(f"# median of {args.reps} (slowest rank), seconds")
        for name, t in results.items():
            print(f"{name:>10s} {t:8.3f} s  {t / results['Wait']:5.2f}x Wait")
        ok = results["dpgather"] <= 2 * results["Wait"]
        print(f"# target dpgather <= 2x Wait: {'OK' if ok else 'FAILED'}; #wrong {wrong}")
        if args.json:
            from dpgather.core.files import write_json_atomic

            write_json_atomic(args.json, {"mpi": lib, "ranks": T, "mib": args.mib, "seconds": results, "wrong": wrong},
                              indent=1)
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
