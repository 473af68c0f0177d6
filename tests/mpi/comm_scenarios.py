"""MPI scenarios of the communicators: ``mpiexec -n N python comm_scenarios.py SCENARIO --backend B``.

    collectives           the protocol suite (tests/comm_suite.py) on a fresh communicator of
                          backend B (host: MpiHostCommunicator, cuda: NcclCommunicator)
    timeout OP [S]        rank 0 skips OP (all_reduce | all_gatherv | barrier | split) that the
                          others enter; they must raise CollectiveTimeout within ~S seconds (on
                          CUDA collectives are asynchronous: the wait() after them times out),
                          then every later call fails at once; then every rank leaves normally
                          (MPI_Finalize with the abandoned request pending returns at once under
                          MPICH 4 and Open MPI 4.1 / 5.0: measured)
    graph                 (cuda) all_gather + all_gatherv + all_reduce(bf16) captured in one CUDA
                          graph, replayed with new data, checked
    exit-hazard           (cuda) leave with a live graph that captured NCCL calls and an open
                          communicator: the process must still exit promptly

Every rank reports its failures with ``mpi_harness.report`` (the test asserts on them).
"""

import argparse
import time
import traceback

import numpy as np
from mpi4py import MPI

from comm_suite import BF16, Binding, data, run_suite, same, total
from dpgather.core.errors import CollectiveTimeout
from mpi_harness import report

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def make(backend, timeout_s, comm=None):
    if backend == "host":
        from dpgather.dist import MpiHostCommunicator

        return MpiHostCommunicator(comm or WORLD.Dup(), timeout_s=timeout_s)
    from dpgather.dist import NcclCommunicator

    return NcclCommunicator(comm or WORLD, timeout_s=timeout_s)


def scenario_collectives(bd):
    world = make(bd.name, 60)
    fails, checks = run_suite(bd, world, bd.name, lambda: make(bd.name, 60))
    world.close()
    world.close()
    report(RANK, failures=fails[:50], nfailures=len(fails), checks=checks)


def scenario_timeout(bd, op, timeout_s):
    fails = []
    try:
        comm = make(bd.name, timeout_s)
        comm.barrier()
        xp = bd.xp
        x = xp.ones((4, 3), xp.float32)
        y = xp.empty_like(x)
        # one complete collective first: NCCL connects peers lazily
        comm.all_reduce(x, y)
        comm.wait()
        calls = {
            "all_reduce": lambda: comm.all_reduce(x, y),
            "all_gatherv": lambda: comm.all_gatherv(x, xp.empty((4 * SIZE, 3), xp.float32), [4] * SIZE),
            "barrier": comm.barrier,
            "split": lambda: comm.split(0, RANK),
        }
        if RANK != 0:
            t0 = time.monotonic()
            try:
                calls[op]()
                comm.wait()
                fails.append(f"{op} returned although rank 0 never entered it")
            except CollectiveTimeout as e:
                el = time.monotonic() - t0
                text = str(e)
                if not (0.95 * timeout_s <= el <= timeout_s + 3.0):
                    fails.append(f"timeout took {el:.3f}s for timeout_s={timeout_s}")
                elif f"{timeout_s:g}" not in text or f"rank {RANK}" not in text:
                    fails.append(f"message does not name rank/timeout: {text}")
            for name in ("all_reduce", "barrier"):
                t0 = time.monotonic()
                try:
                    calls[name]()
                    fails.append(f"{name} after the timeout did not raise")
                except CollectiveTimeout as e:
                    el = time.monotonic() - t0
                    if el > 0.5 or "broken" not in str(e):
                        fails.append(f"{name} after the timeout: {el:.3f}s, {e}")
        comm.close()
    except BaseException:  # noqa: BLE001 - report whatever happened
        fails.append(traceback.format_exc())
    report(RANK, failures=fails)


def scenario_graph(bd):
    import cupy

    fails = []
    comm = make("cuda", 60)
    n, me = comm.size, comm.rank
    m, w = 5, 7168
    counts = [(k * 3) % 4 for k in range(n)]  # includes zeros
    s = cupy.cuda.Stream(non_blocking=True)
    send = cupy.zeros((m, w), cupy.uint16)
    ag = cupy.zeros((n * m, w), cupy.uint16)
    agv = cupy.zeros((int(sum(counts)), w), cupy.uint16)
    ar = cupy.zeros((m, w), cupy.uint16)
    cupy.cuda.Device().synchronize()
    comm.all_gather(send, ag, stream=s)
    comm.wait(s)
    with s:
        s.begin_capture()
        comm.all_gather(send, ag, stream=s)
        comm.all_gatherv(send, agv, counts, stream=s)
        comm.all_reduce(send, ar, dtype="bfloat16", stream=s)
        graph = s.end_capture()
    for trial in range(3):
        ins = [data(("graph", trial), r, m, w, BF16) for r in range(n)]
        send.set(ins[me].view(np.uint16), stream=s)
        graph.launch(s)
        comm.wait(s)
        if not same(cupy.asnumpy(ag).view(BF16), np.concatenate(ins)):
            fails.append(f"graph #{trial} all_gather")
        if not same(cupy.asnumpy(agv).view(BF16), np.concatenate([x[:c] for x, c in zip(ins, counts)])):
            fails.append(f"graph #{trial} all_gatherv")
        if not same(cupy.asnumpy(ar).view(BF16), total(ins, BF16)):
            fails.append(f"graph #{trial} all_reduce bf16")
    del graph  # graphs hold NCCL references: destroy before the communicator
    comm.close()
    report(RANK, failures=fails)


_KEEP_ALIVE = []


def scenario_exit_hazard(bd):
    import cupy

    comm = make("cuda", 30)
    s = cupy.cuda.Stream(non_blocking=True)
    send = cupy.full((3, 8), RANK, cupy.int32)
    recv = cupy.zeros((3 * SIZE, 8), cupy.int32)
    cupy.cuda.Device().synchronize()
    with s:
        s.begin_capture()
        comm.all_gather(send, recv, stream=s)
        graph = s.end_capture()
    graph.launch(s)
    comm.wait(s)
    exp = np.concatenate([np.full((3, 8), r, np.int32) for r in range(SIZE)])
    ok = same(cupy.asnumpy(recv), exp)
    report(RANK, failures=[] if ok else ["captured all_gather gave wrong rows"])
    _KEEP_ALIVE.extend([comm, graph, s])  # alive until interpreter exit: the exit must not hang


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=("collectives", "timeout", "graph", "exit-hazard"))
    ap.add_argument("op", nargs="?", default="all_reduce")
    ap.add_argument("timeout", nargs="?", type=float, default=1.0)
    ap.add_argument("--backend", choices=("host", "cuda"), default="host")
    args = ap.parse_args()
    bd = Binding(args.backend)
    try:
        if args.scenario == "collectives":
            scenario_collectives(bd)
        elif args.scenario == "timeout":
            scenario_timeout(bd, args.op, args.timeout)
        elif args.scenario == "graph":
            scenario_graph(bd)
        else:
            scenario_exit_hazard(bd)
    except BaseException:  # noqa: BLE001
        report(RANK, failures=[traceback.format_exc()])
        raise


if __name__ == "__main__":
    main()
