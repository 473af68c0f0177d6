#!/usr/bin/env python3
"""Multi-rank self-test of the P2P (pull) transport (dpgather.dist.pull.CudaPull), one GPU per rank.

    mpirun -n 2 python tests/gpu/p2p_selftest.py --out p2p.json      (any n >= 1 on one node)
    mpiexec -n 2 python tests/gpu/p2p_selftest.py --transport host --out p2p.json   (CPU: the
        same flow on HostPull; graph, timing and NCCL phases are skipped)

Phases (each bounded; a phase that cannot finish in time is reported as failed, never hangs):
  matrix   every case of tests/p2p_cases.py (gather replicate/partial A=1,2, combine, zero and
           short counts, graph buckets, clamps, in place; all six dtypes), eager, each against
           pull_ref (tests/pull_reference.py): outputs poisoned first, every byte of every row compared, error() == 0
  graph    one CUDA graph per shape (gather replicate, gather partial, combine) captured once,
           replayed with rewritten descriptors (different counts per replay) and inputs,
           interleaved with eager collectives on the same transport
  timing   one collective per graph node: gather of 1, 16, 1024 rows of 14336 bytes per rank
           (bf16 hidden 7168): p2p_pull next to NCCL allGather of the same bytes, both in CUDA
           graphs of --graph-n collectives; median over --reps replays, max over ranks; the
           outputs of both are checked
           With --breakdown, each size is also timed in parts (docs/p2p.md, "Where the time
           goes"): an empty kernel per graph node (the launch floor), the flag barrier alone (a
           descriptor with no pack and no job), pack + barrier, and barrier + pull without the
           pack (the rows already in the window, as callers writing into it would leave them)
  link     (with --link) the raw NVLink ceiling our pulls are held to: one copy kernel of the pull
           kernel's shape (a 256-thread block per SM, 8 x 16-byte vectors in flight per thread)
           between raw cudaMalloc buffers shared by CUDA IPC, reading a peer's buffer (pull) or
           writing into it (push), by rank 0 only (one-sided) or by every rank at once toward
           the next rank (two-sided), and "split": rank 1's rows reach rank 0 half pushed by
           rank 1, half pulled by rank 0; GB/s of data moved per direction, max time over ranks
  timeout  the last rank skips one collective: every other rank must see error() == 1 within
           timeout + margin; nobody hangs

Output: a short table on rank 0, a JSON summary at --out (rank 0; every rank's results), exit
code 0 iff every phase passed on every rank. --deadline bounds the whole run (default 480 s):
faulthandler kills a process that outlives it by 60 s, after printing its stacks.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import pickle
import platform
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import p2p_cases as pc  # noqa: E402
from dpgather.core.errors import CollectiveTimeout  # noqa: E402
from dpgather.dist.base import poll_until  # noqa: E402
import pull_reference as ref  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpi"))  # scenario_kit
from scenario_kit import Checker  # noqa: E402
from dpgather.kernels import _p2p, _pull  # noqa: E402

from mpi4py import MPI  # noqa: E402

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
ROW_BYTES_TIMED = 14336  # bf16 hidden 7168


class Stuck(RuntimeError):
    """The GPU (or a peer) did not finish within its bound: the run cannot continue."""


class Run:
    """Deadline, MPI helpers bounded by it, and this rank's results."""

    def __init__(self, deadline_s, out):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.out = out
        self.chk = Checker(keep=60)
        self.res = {"rank": RANK, "size": SIZE, "host": platform.node(), "phases": {},
                    "failures": self.chk.fails, "passed": 0, "failed": 0}

    def left(self):
        return self.deadline - time.monotonic()

    def check(self, name, ok, detail=""):
        self.chk.check(name, ok, detail)
        self.res["passed"], self.res["failed"] = self.chk.passed, self.chk.failed

    def wait(self, req, what, limit=None):
        limit = min(self.left(), limit) if limit is not None else self.left()
        if not poll_until(req.Test, max(limit, 0.001)):
            raise Stuck(f"MPI {what} did not complete within {limit:.1f} s (a peer is gone or stuck)")

    def barrier(self, what="barrier", limit=60.0):
        self.wait(WORLD.Ibarrier(), what, limit)

    def allreduce(self, value, op, limit=60.0):
        send = np.array([value], np.float64)
        recv = np.empty(1, np.float64)
        self.wait(WORLD.Iallreduce(send, recv, op=op), "allreduce", limit)
        return float(recv[0])

    def allgather_obj(self, obj, limit=60.0):
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        n = np.array([data.size], np.int64)
        sizes = np.empty(SIZE, np.int64)
        self.wait(WORLD.Iallgather(n, sizes), "allgather (sizes)", limit)
        recv = np.empty(int(sizes.sum()), np.uint8)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.wait(WORLD.Iallgatherv(data, [recv, (sizes, displs), MPI.BYTE]), "allgatherv", limit)
        return [pickle.loads(recv[d : d + s].tobytes()) for d, s in zip(displs, sizes)]


class CudaBackend:
    """CuPy buffers on this rank's GPU and bounded stream synchronisation."""

    name = "cuda"

    def __init__(self, run, timeout_s):
        import cupy

        self.cp = cupy
        self.run = run
        count = cupy.cuda.runtime.getDeviceCount()
        self.dev = RANK % count
        cupy.cuda.Device(self.dev).use()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.event = cupy.cuda.Event(block=False, disable_timing=True)
        self.timeout_s = timeout_s
        props = cupy.cuda.runtime.getDeviceProperties(self.dev)
        run.res["device"] = f"{self.dev}: {props['name'].decode()}"
        run.res["versions"] = {"cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}

    def put(self, a):
        host = np.ascontiguousarray(a).view(pc.storage_dtype(_logical(a)))
        d = self.cp.empty(host.shape, host.dtype)
        d.set(host, stream=self.stream)
        return d

    def poisoned(self, rows, width, dtype):
        d = self.cp.empty((rows, width), pc.storage_dtype(dtype))
        with self.stream:
            d.view(self.cp.uint8).fill(pc.POISON)
        return d

    def desc(self, d):
        out = self.cp.empty(d.shape, self.cp.int64)
        out.set(np.ascontiguousarray(d, np.int64), stream=self.stream)
        return out

    def get(self, d):
        h = d.get(stream=self.stream)
        self.sync("copy to host")
        return h

    def sync(self, what, limit=None):
        limit = limit if limit is not None else self.timeout_s + 30.0
        limit = max(0.001, min(limit, self.run.left()))
        self.event.record(self.stream)
        if not poll_until(lambda: self.event.done, limit):
            raise Stuck(f"the GPU did not finish {what} within {limit:.1f} s")

    def transport(self, cap, timeout_s, **kw):
        from dpgather.dist.pull import CudaPull

        return CudaPull(WORLD, cap, timeout_s, device=self.dev, **kw)


class HostBackend:
    """The same flow on NumPy and HostPull (pulls are synchronous)."""

    name = "host"
    stream = None

    def __init__(self, run, timeout_s):
        self.run = run
        run.res["device"] = "host"

    def put(self, a):
        return np.ascontiguousarray(a).copy()

    def poisoned(self, rows, width, dtype):
        return pc.poisoned(rows, width, dtype)

    def desc(self, d):
        return np.ascontiguousarray(d, np.int64).copy()

    def get(self, d):
        return d

    def sync(self, what, limit=None):
        pass

    def transport(self, cap, timeout_s, **kw):
        from dpgather.dist.pull import HostPull

        return HostPull(WORLD, cap, timeout_s, **kw)


def _logical(a):
    return "bfloat16" if a.dtype == pc.host_dtype("bfloat16") else a.dtype.name


def same_bytes(got, exp):
    return pc.check(np.ascontiguousarray(got).view(exp.dtype) if got.dtype != exp.dtype else got, exp)


# ---------------------------------------------------------------------------------- phases

def phase_matrix(run, be, t, seed):
    cases = pc.build_cases(SIZE, seed)
    n = 0
    for i, case in enumerate(cases):
        if run.left() < 30:
            run.check("matrix", False, f"out of time after {i} of {len(cases)} cases")
            break
        ins, exp = pc.expected(case, seed, i, SIZE)
        inp = be.put(ins[RANK])
        out = inp if case.inplace else be.poisoned(case.out_rows[RANK], case.width, case.dtype)
        desc = be.desc(case.descs[RANK])
        name = f"matrix #{i} {case.name} [{case.dtype} w={case.width}]"
        try:
            t.pull(inp, out, desc, case.desc_off, row_bytes=case.row_bytes, dtype=case.dtype,
                   stream=be.stream)
            be.sync(name)
        except CollectiveTimeout as e:
            run.check(name, False, f"raised {e}")
            break
        bad = same_bytes(be.get(out), exp[RANK])
        run.check(name, bad is None and t.error() == 0, f"{bad} error()={t.error()}")
        if not case.inplace:
            run.check(f"{name} input kept", same_bytes(be.get(inp), ins[RANK]) is None)
        n += 1
        if t.error():
            break
    return {"cases": len(cases), "run": n}


def _graph_shapes():
    a2 = 2 if SIZE % 2 == 0 else 1
    return [("gather replicate A=1", "gather", 1, "replicate"),
            (f"gather partial A={a2}", "gather", a2, "partial"),
            ("combine A=1", "combine", 1, None)]


def phase_graph(run, be, t, seed, replays=6, bucket=8):
    cp, s = be.cp, be.stream
    results = {}
    dtype, width = "bfloat16", 64  # 128-byte rows: 16-byte vectors
    rb = width * 2
    for si, (label, kind, a, contribution) in enumerate(_graph_shapes()):
        d = SIZE // a
        in_rows = bucket + 2 if kind == "gather" else d * bucket
        out_rows = d * bucket + 1 if kind == "gather" else bucket + 1
        sig = ref.signature(f"graph {label}", si, dtype, rb)
        counts0 = np.full(d, bucket)
        desc_dev = be.desc(_graph_desc_for(kind, a, contribution, counts0, bucket, sig, RANK))
        inp = be.put(pc.case_input(seed, 10_000 + si, RANK, in_rows, width, dtype))
        out = be.poisoned(out_rows, width, dtype)
        be.sync("graph setup")
        graph = None
        ok = 0
        try:
            with s:
                s.begin_capture()
                try:
                    t.pull(inp, out, desc_dev, 0, row_bytes=rb, dtype=dtype, stream=s)
                finally:
                    graph = s.end_capture()
            for k in range(replays):
                rng = np.random.default_rng([seed, si, k])
                counts = rng.integers(0, bucket + 1, d)
                if k == 0:
                    counts[:] = 0
                ins = [pc.case_input(seed, 20_000 + 100 * si + k, r, in_rows, width, dtype) for r in range(SIZE)]
                outs0 = [pc.poisoned(out_rows, width, dtype) for _ in range(SIZE)]
                descs = [_graph_desc_for(kind, a, contribution, counts, bucket, sig, r) for r in range(SIZE)]
                exp = ref.pull_ref(ins, descs, 0, rb, dtype, out_rows, pc.CAP_BYTES // rb, outs=outs0)
                desc_dev.set(descs[RANK], stream=s)
                inp.set(ins[RANK].view(np.uint16), stream=s)
                with s:
                    out.view(cp.uint8).fill(pc.POISON)
                graph.launch(s)
                be.sync(f"graph {label} replay {k}")
                bad = same_bytes(be.get(out), exp[RANK])
                run.check(f"graph {label} replay {k} counts={counts.tolist()}", bad is None and t.error() == 0,
                          f"{bad} error()={t.error()}")
                ok += bad is None
                # an eager collective between replays: the epochs are shared
                x = be.put(np.full((2, 4), RANK + 1, np.int32))
                y = be.poisoned(2, 4, "int32")
                t.pull(x, y, be.desc(ref.make_desc(77, [(0, 2, 0)], [(0, 2, 2, 0, 0, SIZE, 1)])), 0,
                       row_bytes=16, dtype="int32", stream=s)
                total = SIZE * (SIZE + 1) // 2
                run.check(f"eager between replays ({label}, {k})", (be.get(y) == total).all())
        except CollectiveTimeout as e:
            run.check(f"graph {label}", False, f"raised {e}")
        except Stuck:
            raise
        except Exception:  # noqa: BLE001
            run.check(f"graph {label}", False, traceback.format_exc(limit=4))
        finally:
            del graph
        results[label] = f"{ok}/{replays}"
    return results


def _graph_desc_for(kind, a, contribution, counts, bucket, sig, rank):
    d = SIZE // a
    offsets = np.arange(d + 1) * bucket
    if kind == "gather":
        return ref.gather_desc(sig, rank=rank, attn_tp=a, counts=counts, slot_offsets=offsets,
                               slot_rows=[bucket] * d, contribution=contribution)
    return ref.combine_desc(sig, rank=rank, attn_tp=a, counts=counts, slot_offsets=offsets,
                            out_rows=bucket)


_EMPTY_KERNEL = r'''extern "C" __global__ void dpg_empty(int* p) { if (p && threadIdx.x == 1024) *p = 0; }'''


def phase_timing(run, be, timeout_s, rows_list, graph_n, reps, breakdown=False):
    from dpgather.dist.nccl import NcclCommunicator

    cp, s = be.cp, be.stream
    width = ROW_BYTES_TIMED // 2
    cap = max(rows_list) * ROW_BYTES_TIMED
    tt = be.transport(cap, timeout_s)
    nccl = NcclCommunicator(WORLD, timeout_s=max(timeout_s, 30.0), device=be.dev)
    ev0, ev1 = cp.cuda.Event(), cp.cuda.Event()
    table = []
    try:
        for rows in rows_list:
            if run.left() < 60:
                run.check(f"timing {rows} rows", False, "out of time")
                break
            rng = np.random.default_rng([RANK, rows])
            send = be.put(rng.integers(0, 2**16, (rows, width), dtype=np.uint16))
            with s:  # on the test stream: it does not synchronise with the legacy default stream
                out_p = cp.zeros((SIZE * rows, width), cp.uint16)
                out_n = cp.zeros((SIZE * rows, width), cp.uint16)
            sig = ref.signature("timed gather", rows, "bfloat16", ROW_BYTES_TIMED)
            full = ref.gather_desc(sig, rank=RANK, attn_tp=1, counts=[rows] * SIZE,
                                   slot_offsets=np.arange(SIZE + 1) * rows)
            desc = be.desc(full)

            def pull(d):
                tt.pull(send, out_p, d, 0, row_bytes=ROW_BYTES_TIMED, dtype="bfloat16", stream=s)

            bodies = [("p2p", lambda: pull(desc)), ("nccl", lambda: nccl.all_gather(send, out_n, stream=s))]
            if breakdown:  # the same launch with parts of the descriptor left out
                _, packs, jobs = ref.decode_desc(full)
                parts = {"barrier": be.desc(ref.make_desc(sig)),
                         "pack": be.desc(ref.make_desc(sig, packs)),
                         "pull": be.desc(ref.make_desc(sig, (), jobs))}
                empty = cp.RawKernel(_EMPTY_KERNEL, "dpg_empty")
                scratch = cp.zeros(1, cp.int32)
                bodies += [(f"p2p_{k}", lambda d=d: pull(d)) for k, d in parts.items()]
                bodies.append(("empty", lambda: empty((1,), (256,), (scratch,), stream=s)))
            be.sync("timing setup")
            graphs = {}
            try:
                for name, body in bodies:
                    with s:
                        s.begin_capture()
                        try:
                            for _ in range(graph_n):
                                body()
                        finally:
                            graphs[name] = s.end_capture()
                times = {}
                for name, g in graphs.items():
                    for _ in range(2):
                        g.launch(s)
                    be.sync(f"timing warm-up {name} {rows}")
                    samples = []
                    for _ in range(reps):
                        run.barrier(f"timing barrier {name}", limit=min(60.0, run.left()))
                        ev0.record(s)
                        g.launch(s)
                        ev1.record(s)
                        be.sync(f"timing {name} {rows}")
                        samples.append(cp.cuda.get_elapsed_time(ev0, ev1) * 1e3 / graph_n)
                    times[name] = run.allreduce(statistics.median(samples), MPI.MAX)
                g = None  # noqa: F841 - no graph reference may outlive the loop (NCCL teardown)
                expect = np.concatenate([
                    np.random.default_rng([r, rows]).integers(0, 2**16, (rows, width), dtype=np.uint16)
                    for r in range(SIZE)])
                if breakdown:  # the parts left out_p as the last full gather wrote it
                    pull(desc)
                    be.sync(f"timing check {rows}")
                ok_p = bool((be.get(out_p) == expect).all())
                ok_n = bool((be.get(out_n) == expect).all())
                run.check(f"timing p2p output {rows} rows", ok_p and tt.error() == 0, f"error()={tt.error()}")
                run.check(f"timing nccl output {rows} rows", ok_n)
                table.append({"rows": rows, "bytes_per_rank": rows * ROW_BYTES_TIMED,
                              "p2p_us": times["p2p"], "nccl_us": times["nccl"],
                              "ratio": times["nccl"] / times["p2p"] if times["p2p"] > 0 else None,
                              "check": "ok" if ok_p and ok_n else "WRONG",
                              **{f"{k}_us": v for k, v in times.items() if k not in ("p2p", "nccl")}})
            finally:
                graphs.clear()  # graphs that captured NCCL go before the communicator
    finally:
        be.sync("timing teardown", limit=timeout_s + 30)
        tt.close()
        nccl.close()
    return table


_LINK_KERNEL = r'''
extern "C" __global__ void dpg_link_copy(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                         long long n) {
    const long long step = (long long)gridDim.x * blockDim.x * 8;
    for (long long b = (long long)blockIdx.x * blockDim.x * 8 + threadIdx.x; b < n; b += step) {
        uint4 r[8];
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (b + u * blockDim.x < n) r[u] = src[b + u * blockDim.x];
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (b + u * blockDim.x < n) dst[b + u * blockDim.x] = r[u];
    }
}
'''


def phase_link(run, be, sizes_bytes, reps):
    """Raw NVLink copy bandwidth between rank r and rank (r + 1) % SIZE (see the module doc)."""
    if SIZE < 2:
        return {"note": "one rank: no link"}
    cp, s = be.cp, be.stream
    rt = cp.cuda.runtime
    cap = max(sizes_bytes)
    mine = rt.malloc(2 * cap)  # [0, cap): what peers read or write; [cap, 2 cap): local side
    rt.memset(mine, 1, 2 * cap)
    rt.deviceSynchronize()
    handles = WORLD.allgather(bytes(rt.ipcGetMemHandle(mine)))
    nxt, prv = (RANK + 1) % SIZE, (RANK - 1) % SIZE
    peers = {t: rt.ipcOpenMemHandle(handles[t]) for t in {nxt, prv}}
    kern = cp.RawKernel(_LINK_KERNEL, "dpg_link_copy")
    grid = cp.cuda.runtime.getDeviceProperties(be.dev)["multiProcessorCount"]
    ev0, ev1 = cp.cuda.Event(), cp.cuda.Event()
    rows = []
    try:
        for nbytes in sizes_bytes:
            for mode in ("pull", "push"):
                for sides in ("one", "two"):
                    active = sides == "two" or RANK == 0
                    # pull: read the next rank's buffer; push: write into the next rank's buffer
                    src, dst = (peers[nxt], mine + cap) if mode == "pull" else (mine + cap, peers[nxt])
                    rows.append({"bytes": nbytes, "mode": mode, "sides": sides,
                                 **_link_time(run, cp, kern, grid, src, dst, nbytes, active, reps, s, ev0, ev1)})
            # split: the data of rank 1 reaches rank 0; rank 1 pushes the first half, rank 0 pulls the rest
            half = (nbytes // 32) * 16
            if RANK == 1:
                args = (mine + cap, peers[prv], half)
            elif RANK == 0:
                args = (peers[nxt] + half, mine + cap + half, nbytes - half)
            else:
                args = None
            rows.append({"bytes": nbytes, "mode": "split", "sides": "one",
                         **_link_time(run, cp, kern, grid, *(args[:2] if args else (0, 0)),
                                      args[2] if args else 0, args is not None, reps, s, ev0, ev1)})
    finally:
        rt.deviceSynchronize()
        run.barrier("link teardown")
        for p in peers.values():
            rt.ipcCloseMemHandle(p)
        rt.free(mine)
    return rows


def _link_time(run, cp, kern, grid, src, dst, nbytes, active, reps, s, ev0, ev1):
    n = nbytes // 16
    k = max(1, min(64, int(2e6 // max(nbytes, 1))))  # about 2 ms of copies per repetition
    samples = []
    for i in range(reps + 2):
        run.barrier("link barrier")
        ev0.record(s)
        if active and n:
            for _ in range(k):
                kern((grid,), (256,), (np.uint64(src), np.uint64(dst), np.int64(n)), stream=s)
        ev1.record(s)
        s.synchronize()
        if i >= 2:
            samples.append(cp.cuda.get_elapsed_time(ev0, ev1) * 1e3 / k)
    us = run.allreduce(statistics.median(samples) if active else 0.0, MPI.MAX)
    return {"us": us, "GBps": nbytes / (us * 1e3) if us > 0 else None}


def phase_timeout(run, be, timeout_s):
    t2 = be.transport(4096, timeout_s)
    skipper = SIZE - 1
    out = {"skipper": skipper}
    try:
        x = be.put(np.full((2, 4), RANK + 1, np.int32))
        desc = be.desc(ref.make_desc(5, [(0, 2, 0)], [(0, 2, 2, 0, 0, SIZE, 1)]))
        y = be.poisoned(2, 4, "int32")
        t2.pull(x, y, desc, 0, row_bytes=16, dtype="int32", stream=be.stream)
        be.sync("timeout case: the good collective")
        run.check("timeout case: good collective first", (be.get(y) == SIZE * (SIZE + 1) // 2).all())
        run.barrier("timeout case barrier")
        if SIZE == 1:
            out["note"] = "one rank: nobody to skip"
            return out
        if RANK != skipper:
            t0 = time.monotonic()
            raised = None
            try:
                t2.pull(x, y, desc, 0, row_bytes=16, dtype="int32", stream=be.stream)
                be.sync("timeout case: the skipped collective", limit=timeout_s + 30)
            except CollectiveTimeout as e:  # the host twin raises; the CUDA one reports
                raised = str(e)
            el = time.monotonic() - t0
            code = t2.error()
            out.update(elapsed_s=el, error=code, raised=raised)
            run.check("timeout case: error() == 1", code == _p2p.ERR_TIMEOUT, f"got {code}")
            run.check("timeout case: bounded", 0.9 * timeout_s <= el <= timeout_s + 5.0,
                      f"{el:.2f}s for timeout_s={timeout_s}")
            try:
                t2.pull(x, y, desc, 0, row_bytes=16, dtype="int32", stream=be.stream)
                run.check("timeout case: later calls refuse", False, "accepted")
            except CollectiveTimeout:
                run.check("timeout case: later calls refuse", True)
        run.barrier("timeout case end", limit=timeout_s + 60)
    finally:
        t2.close()
    return out


# ---------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="p2p_selftest.json", help="JSON summary path (rank 0)")
    ap.add_argument("--transport", choices=("cuda", "host"), default="cuda")
    ap.add_argument("--timeout", type=float, default=10.0, help="collective timeout_s")
    ap.add_argument("--timeout-case", type=float, default=1.0, help="timeout_s of the timeout phase")
    ap.add_argument("--deadline", type=float, default=480.0, help="bound of the whole run (s)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--rows", default="1,16,1024", help="rows per rank of the timed gathers")
    ap.add_argument("--graph-n", type=int, default=20, help="collectives per timed graph")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip")
    ap.add_argument("--link", default="", metavar="ROWS,..",
                    help="also run the link phase at these rows per rank (14336-byte rows), e.g. 64,1024,8192")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the pull's parts (launch floor, barrier, pack, pull) per size")
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(args.deadline + 60, exit=True)
    run = Run(args.deadline, args.out)
    skip = {p for p in args.skip.split(",") if p}
    if args.transport == "host":
        skip |= {"graph", "timing"}
    phases = run.res["phases"]
    fatal = None
    try:
        be = (CudaBackend if args.transport == "cuda" else HostBackend)(run, args.timeout)
        if args.transport == "cuda":
            _pull.warm(be.dev)  # compile before any bounded exchange (ranks compile at their own pace)
        run.barrier("start", limit=300)
        t = be.transport(pc.CAP_BYTES, args.timeout)
        try:
            for name, fn in (("matrix", lambda: phase_matrix(run, be, t, args.seed)),
                             ("graph", lambda: phase_graph(run, be, t, args.seed))):
                if name in skip:
                    phases[name] = "skipped"
                    continue
                before = run.res["failed"]
                t_start = time.monotonic()
                phases[name] = {"result": fn(), "failed": run.res["failed"] - before,
                                "seconds": round(time.monotonic() - t_start, 2)}
        finally:
            be.sync("before close", limit=args.timeout + 30)
            t.close()
        if "timing" in skip:
            phases["timing"] = "skipped"
        else:
            rows = [int(r) for r in args.rows.split(",") if r]
            phases["timing"] = phase_timing(run, be, args.timeout, rows, args.graph_n, args.reps,
                                            breakdown=args.breakdown)
        if args.link:
            sizes = [int(r) * ROW_BYTES_TIMED for r in args.link.split(",") if r]
            phases["link"] = phase_link(run, be, sizes, args.reps)
        if "timeout" in skip:
            phases["timeout"] = "skipped"
        else:
            phases["timeout"] = phase_timeout(run, be, args.timeout_case)
    except Stuck as e:
        fatal = f"stuck: {e}"
    except Exception:  # noqa: BLE001 - reported
        fatal = traceback.format_exc()
    if fatal:
        run.check("fatal", False, fatal)
    run.res["seconds"] = round(time.monotonic() - run.t0, 1)
    run.res["ok"] = run.res["failed"] == 0

    if fatal and fatal.startswith("stuck"):
        # a peer or the GPU is gone: no collective can be trusted; leave this rank's own record
        path = f"{args.out}.rank{RANK}"
        with open(path, "w") as f:
            json.dump(run.res, f, indent=1, default=str)
        print(f"[rank {RANK}] FATAL {fatal}; wrote {path}", flush=True)
        os._exit(2)
    try:
        every = run.allgather_obj(run.res, limit=120.0)
    except Stuck as e:
        every = [run.res]
        run.res["failures"].append(f"final gather: {e}")
        run.res["ok"] = False
    ok = all(r.get("ok") for r in every) and len(every) == SIZE
    try:  # under the test harness: this rank's result for the test to assert on
        from mpi_harness import report

        report(RANK, failures=list(run.res.get("failures", []))[:20] or ([] if run.res["ok"] else ["failed"]))
    except ImportError:
        pass
    if RANK == 0:
        summary = {"ok": ok, "transport": args.transport, "size": SIZE, "args": vars(args), "ranks": every}
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        print_table(summary)
    sys.stdout.flush()
    return 0 if ok else 1


def print_table(summary):
    ranks = summary["ranks"]
    print(f"# p2p selftest: {summary['size']} ranks, transport {summary['transport']}, "
          f"devices {[r.get('device') for r in ranks]}")
    print(f"# checks passed {sum(r['passed'] for r in ranks)}, failed {sum(r['failed'] for r in ranks)}")
    p0 = ranks[0]["phases"]
    for name in ("matrix", "graph"):
        print(f"# {name}: {p0.get(name)}")
    timing = p0.get("timing")
    if isinstance(timing, list) and timing:
        print("# one gather per graph node, us per collective, max over ranks (median of replays)")
        print(f"{'rows/rank':>10} {'bytes/rank':>11} {'p2p_pull':>9} {'nccl_ag':>9} {'ratio':>6} check")
        for row in timing:
            ratio = f"{row['ratio']:.2f}" if row["ratio"] else "-"
            print(f"{row['rows']:>10} {row['bytes_per_rank']:>11} {row['p2p_us']:>9.2f} "
                  f"{row['nccl_us']:>9.2f} {ratio:>6} {row['check']}")
        parts = ("empty_us", "p2p_barrier_us", "p2p_pack_us", "p2p_pull_us")
        if all(k in timing[0] for k in parts):
            print("# the same gather in parts, us per launch: an empty kernel (launch floor), the flag "
                  "barrier alone, pack + barrier, barrier + pull (no pack)")
            print(f"{'rows/rank':>10} {'empty':>7} {'barrier':>8} {'+pack':>7} {'+pull':>7} {'whole':>7}")
            for row in timing:
                print(f"{row['rows']:>10} " + " ".join(f"{row[k]:>{w}.2f}" for k, w in zip(parts, (7, 8, 7, 7)))
                      + f" {row['p2p_us']:>7.2f}")
    link = p0.get("link")
    if isinstance(link, list) and link:
        print("# raw NVLink copies, GB/s per direction (max time over ranks): pull = read the peer, "
              "push = write the peer; one = rank 0 only, two = every rank at once; split = half pushed "
              "by the sender, half pulled by the receiver")
        print(f"{'bytes':>11} {'mode':>6} {'sides':>5} {'us':>9} {'GB/s':>7}")
        for row in link:
            print(f"{row['bytes']:>11} {row['mode']:>6} {row['sides']:>5} {row['us']:>9.2f} "
                  f"{row['GBps'] or 0:>7.1f}")
    print(f"# timeout: {[r['phases'].get('timeout') for r in ranks]}")
    for r in ranks:
        for f in r["failures"][:10]:
            print(f"FAIL rank {r['rank']}: {f}")
    print("OK" if summary["ok"] else "FAILED", flush=True)


if __name__ == "__main__":
    code = main()
    sys.exit(code)
