#!/usr/bin/env python3
"""Both P2P kernels (the pull and the push) on ONE GPU: ``T`` virtual ranks in one process.

    python tests/gpu/loopback.py [--ranks 2,3,4] [--rows 1,4,16,64,256] [--out loopback.json]

A machine with one GPU cannot run the transports themselves (``CudaPull``/``CudaPush`` need one
GPU per rank), but it can run their kernels as they run in a step: every virtual rank has its
own window (``cudaMalloc``, the transport's layout and initial state), its own mapped error
word and its own stream, and one collective launches every rank's kernel with the arguments
the transports pass (:func:`dpgather.kernels._p2p.call_args` + ``window_args``), the loaders'
kernels, vector widths and grid rules, the grid capped at ``SMs / T`` blocks so every rank's
blocks are resident together (the kernels spin on each other). Peer stores and loads then go
to the same GPU's memory instead of over NVLink.

Phases:
  matrix   every case of tests/push_cases.py (every operation, dtype, attn-TP size, pretend
           node, graph bucket, short and long input, zero counts, every clamp) on the push;
           the data-plane cases (not the clamps) on the pull too, through the pull's entries of
           the same step descriptors. Outputs poisoned, every byte of every row against
           tests/push_reference.py (push) and the data-plane semantics (both); error words 0;
           then the push's epochs wrapped: a transport starting 6 collectives below 2^32
           runs the cases across the wrap
  timing   the decode shape (bf16, hidden 7168: 14336-byte rows), gather replicate and combine
           of 1..256 rows per replica, push next to pull, one collective per iteration (every
           rank's kernel), in a CUDA graph and launched from Python (dpgather.tools.timing's
           Timer: median of 20 repetitions). Not a link figure: it compares the two protocols
           (one trip with the signal in the data vs. flag barrier then pull) without NVLink.

Output: a table, a JSON summary at --out, exit code 0 iff every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import push_cases as pc  # noqa: E402
from mpi_harness import report  # noqa: E402
import push_reference as ref  # noqa: E402
from dpgather._layout import Descriptor  # noqa: E402
from dpgather.core.dtypes import DTYPES  # noqa: E402
from dpgather.kernels import _p2p, _pull, _push  # noqa: E402

KERNELS = {"push": _push, "pull": _pull}


def host_flushes_subnormals():
    """Whether this thread's float arithmetic flushes subnormals (x86 MXCSR FTZ/DAZ, which a
    library built with fast-math may set when it loads): the NumPy reference of a sum would then
    differ from the GPU, which keeps them."""
    return bool((np.array([1e-45], np.float32) + np.float32(0))[0] == 0)


def ieee_host():
    """Restore IEEE subnormals on this thread (glibc ``fesetenv(FE_DFL_ENV)``) where they are
    flushed; returns whether they were."""
    if not host_flushes_subnormals():
        return False
    import ctypes
    import ctypes.util

    ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").fesetenv(ctypes.c_void_p(-1))
    return True


def first_difference(got, exp):
    """``row, column: got 0x.. expected 0x..`` of the first differing element (storage bits)."""
    ui = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    g, e = np.ascontiguousarray(got).view(ui), np.ascontiguousarray(exp).view(ui)
    r, c = (int(v[0]) for v in np.nonzero(g != e))
    return f"[{r}, {c}]: got {int(g[r, c]):#x} expected {int(e[r, c]):#x}"


class Loopback:
    """``T`` virtual ranks of one transport kind (``"push"``/``"pull"``) on the current GPU."""

    def __init__(self, kind, nranks, capacity_bytes, timeout_s=10.0, epoch0=None):
        import cupy

        self.cp, self.kind, self.t = cupy, kind, int(nranks)
        mod = KERNELS[kind]
        self.layout = mod.window_layout(self.t, capacity_bytes)
        if kind == "push":
            header = _push.initial_state(1 if epoch0 is None else epoch0)
        else:
            header = _pull.initial_header(self.t, self.layout, 0 if epoch0 is None else epoch0)
        head = cupy.asarray(np.ascontiguousarray(header).view(np.uint8))
        self.windows = []
        for _ in range(self.t):
            w = cupy.zeros(self.layout.window_bytes, np.uint8)
            w[:head.size] = head
            self.windows.append(w)
        self.table = cupy.asarray(np.array([w.data.ptr for w in self.windows], np.uint64))
        rt = cupy.cuda.runtime
        self._host = rt.hostAlloc(4 * self.t, getattr(rt, "hostAllocMapped", 2) | getattr(rt, "hostAllocPortable", 1))
        self.errors = np.frombuffer((np.ctypeslib.ctypes.c_int32 * self.t).from_address(self._host), np.int32)
        self.errors[:] = 0
        self._err_dev = int(rt.pointerGetAttributes(self._host).devicePointer)
        dev = cupy.cuda.Device().id
        self.device = dev
        self.limit = max(1, _p2p.max_blocks(dev) // self.t)
        self.timeout_ns = _p2p.timeout_ns(timeout_s)
        self.streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(self.t)]
        self._fork = cupy.cuda.Event(disable_timing=True)
        self._joins = [cupy.cuda.Event(disable_timing=True) for _ in range(self.t)]
        mod.warm(dev)

    def close(self):
        self.cp.cuda.runtime.deviceSynchronize()
        self.cp.cuda.runtime.freeHost(self._host)
        self._host = None

    def launcher(self, inputs, outputs, descs, desc_off, row_bytes, dtype):
        """A zero-argument callable that enqueues one collective (every rank's kernel on its
        stream, forked from and joined into the current stream): capturable."""
        cp, mod, lay = self.cp, KERNELS[self.kind], self.layout
        ptrs = [a.data.ptr for a in list(inputs) + list(outputs)]
        pick = _push.pick_vector if self.kind == "push" else _p2p.pick_vector  # as CudaPush / CudaPull
        vec = pick(row_bytes, DTYPES[dtype].itemsize, *ptrs)
        fn = (_push.PUSH if self.kind == "push" else _pull.PULL).function(self.device, mod.kernel_name(dtype, vec))
        calls = []
        for r in range(self.t):
            i_rows, o_rows = inputs[r].shape[0], outputs[r].shape[0]
            if self.kind == "push":
                grid = _push.grid_size(i_rows, o_rows, row_bytes, lay.cap_bytes, self.t, self.limit)
            else:
                grid = _pull.grid_size(i_rows, o_rows, row_bytes, lay.cap_bytes, self.limit)
            args = _p2p.call_args(inputs[r].data.ptr, i_rows, outputs[r].data.ptr, o_rows, descs[r].data.ptr,
                                  int(desc_off[r]), descs[r].shape[0], row_bytes) + _p2p.window_args(
                self.table.data.ptr, r, self.t, lay.data_off, lay.cap_bytes, self._err_dev + 4 * r, self.timeout_ns)
            calls.append(((grid,), args))

        def launch():
            main = cp.cuda.get_current_stream()
            self._fork.record(main)
            for r, (grid, args) in enumerate(calls):
                s = self.streams[r]
                s.wait_event(self._fork)
                fn(grid, (_p2p.THREADS,), args, stream=s)
                self._joins[r].record(s)
            for ev in self._joins:
                main.wait_event(ev)

        return launch


def _device_rows(a):
    """A host array as CuPy ``[rows, row_bytes]`` uint8 (bfloat16 and every dtype alike)."""
    import cupy

    a = np.ascontiguousarray(a)
    return cupy.asarray(a.view(np.uint8).reshape(a.shape[0], a.shape[1] * a.dtype.itemsize))


def run_case(lb, case, desc_off, expect):
    """One case on loopback ``lb``: poisoned outputs, one collective, every byte checked.
    ``expect``: per-rank expected outputs (host arrays of the case's dtype). Returns faults."""
    t = lb.t
    host_dt = ref.host_dtype(case.dtype)
    inputs = [_device_rows(a) for a in case.inputs]
    outs = [_device_rows(pc.poisoned(case.out_rows[r], case.inputs[r].shape[1], case.dtype)) for r in range(t)]
    descs = [lb.cp.asarray(d) for d in case.descs]
    lb.launcher(inputs, outs, descs, desc_off, case.row_bytes, case.dtype)()
    lb.cp.cuda.runtime.deviceSynchronize()
    bad = []
    if lb.errors.any():
        bad.append(f"error words {lb.errors.tolist()}")
    for r in range(t):
        got = outs[r].get().view(host_dt).reshape(case.out_rows[r], case.inputs[r].shape[1])
        if (m := pc.check(got, expect[r])):
            bad.append(f"rank {r}: {m}" + (f", first {first_difference(got, expect[r])}"
                                           if got.shape == expect[r].shape else ""))
        if (m := pc.check(inputs[r].get().view(host_dt).reshape(case.inputs[r].shape), case.inputs[r])):
            bad.append(f"rank {r}: input modified: {m}")
    return [f"{lb.kind} {case.name}: {b}" for b in bad]


def matrix(ranks, seed, epoch0=None):
    """Every push case of ``ranks`` ranks over the push (and the data-plane ones over the pull)."""
    fails, counts = [], {"push": 0, "pull": 0}
    cases = pc.build_cases(ranks, seed=seed)
    loops = {}
    for case in cases:
        t = len(case.inputs)
        push = loops.setdefault(("push", t), Loopback("push", t, pc.CAP_BYTES, epoch0=epoch0))
        outs0 = [pc.poisoned(case.out_rows[r], case.inputs[r].shape[1], case.dtype) for r in range(t)]
        exp, _ = ref.push_ref(list(case.inputs), list(case.descs), list(case.desc_off), case.row_bytes,
                              case.dtype, list(case.out_rows), push.layout.cap_bytes, outs=outs0)
        fails += run_case(push, case, case.desc_off, exp)
        counts["push"] += 1
        if case.expect is not None:
            fails += [f"reference != semantics rank {r}: {case.name}" for r in range(t)
                      if pc.check(exp[r], case.expect[r])]
            if epoch0 is None:
                op = next(o for o in pc.OPS if case.name.startswith(o + " "))
                A = int(case.name.split(" A=")[1].split()[0])  # the case's topology: ranks x A, nodes of t
                pull_off = [Descriptor(ranks // A, A, t).p2p[op]] * t
                pull = loops.setdefault(("pull", t), Loopback("pull", t, pc.CAP_BYTES))
                fails += run_case(pull, case, pull_off, case.expect)
                counts["pull"] += 1
    for lb in loops.values():
        lb.close()
    return counts, fails


def timing(rows_list, nranks, timer):
    """Gather replicate and combine of ``rows`` per replica (bf16, hidden 7168) on both kernels."""
    import cupy

    H, dtype, out = 7168, "bfloat16", []
    rb = H * 2
    for op in ("gather_replicate", "combine"):
        for rows in rows_list:
            case = pc.layout_case(f"{op} timing", nranks, 1, nranks, 0, [rows] * nranks, [rows] * nranks, op,
                                  dtype, H, "exact", 7)
            cap = rows * (-(-rb // 8) * 8) * (nranks if op == "combine" else 1)
            res = {"op": op, "rows": rows, "ranks": nranks, "row_bytes": rb}
            for kind in ("push", "pull"):
                lb = Loopback(kind, nranks, cap)
                inputs = [_device_rows(a) for a in case.inputs]
                outs = [_device_rows(pc.poisoned(case.out_rows[r], H, dtype)) for r in range(nranks)]
                descs = [cupy.asarray(d) for d in case.descs]
                off = case.desc_off if kind == "push" else [Descriptor(nranks, 1, nranks).p2p[op]] * nranks
                launch = lb.launcher(inputs, outs, descs, off, rb, dtype)
                m = timer.measure(lambda j, launch=launch: launch())
                cupy.cuda.runtime.deviceSynchronize()
                ok = not lb.errors.any() and all(
                    pc.check(outs[r].get().view(ref.host_dtype(dtype)).reshape(case.out_rows[r], H),
                             case.expect[r]) is None for r in range(nranks))
                res[kind] = {"graph_us": m["graph"], "eager_us": m["eager"], "correct": ok}
                lb.close()
            out.append(res)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,3,4")
    ap.add_argument("--rows", default="1,4,16,64,256")
    ap.add_argument("--timing-ranks", type=int, default=2)
    ap.add_argument("--skip", default="", help="phases to skip: matrix,timing")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import cupy

    from dpgather.tools.timing import CupyEvents, Timer

    summary = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "matrix": {}, "timing": [],
               "host_subnormals_were_flushed": ieee_host()}
    print(f"host subnormals: {'flushed (FTZ/DAZ) by a loaded library; IEEE restored' if summary['host_subnormals_were_flushed'] else 'IEEE'}"
          f", now {'flushed' if host_flushes_subnormals() else 'IEEE'}", flush=True)
    fails = []
    skip = set(a.skip.split(","))
    if "matrix" not in skip:
        for t in (int(x) for x in a.ranks.split(",")):
            for label, e0 in (("", None), (" across the epoch wrap", 2**32 - 7)):
                counts, bad = matrix(t, 4321 + t, epoch0=e0)
                summary["matrix"][f"T={t}{label}"] = {"cases": counts, "failures": bad[:20], "failed": len(bad)}
                print(f"matrix T={t}{label}: {counts['push']} push and {counts['pull']} pull collectives, "
                      f"{len(bad)} failures", flush=True)
                for b in bad[:10]:
                    print("   ", b, flush=True)
                fails += bad
    if "timing" not in skip:
        timer = Timer(CupyEvents(), reps=20, warmup=3, target_us=2000.0, kmax=64)
        summary["timing"] = timing([int(x) for x in a.rows.split(",")], a.timing_ranks, timer)
        print(f"{'op':>16} {'rows':>5}  {'push graph':>10} {'pull graph':>10} {'ratio':>6}  {'push eager':>10} "
              f"{'pull eager':>10}  (us per collective, {a.timing_ranks} ranks on one GPU)")
        for r in summary["timing"]:
            p, q = r["push"], r["pull"]
            ratio = (p["graph_us"] / q["graph_us"]) if p["graph_us"] and q["graph_us"] else float("nan")
            print(f"{r['op']:>16} {r['rows']:>5}  {p['graph_us'] or float('nan'):10.2f} {q['graph_us'] or float('nan'):10.2f} "
                  f"{ratio:6.2f}  {p['eager_us']:10.2f} {q['eager_us']:10.2f}"
                  f"{'' if p['correct'] and q['correct'] else '  WRONG OUTPUT'}", flush=True)
            if not (p["correct"] and q["correct"]):
                fails.append(f"timing {r['op']} rows={r['rows']}: wrong output")
        if timer.graph_error:
            print("graph capture failed:", timer.graph_error)
    summary["ok"] = not fails
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print("loopback:", "PASS" if not fails else f"FAIL ({len(fails)})", flush=True)
    report(0, failures=fails[:40], cases={k: v["cases"] for k, v in summary["matrix"].items()})
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
