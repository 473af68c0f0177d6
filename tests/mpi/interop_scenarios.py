#!/usr/bin/env python3
"""DpAttention with the caller's own arrays, on either backend (docs/interop.md).

    mpiexec -n 2 python tests/mpi/interop_scenarios.py --backend host --framework jax --dtype bfloat16
    mpirun -n 2 python tests/mpi/interop_scenarios.py --backend cuda --framework torch --dtype bfloat16

Inputs are made in ``--framework`` (``numpy``, ``cupy``, ``torch``, ``jax``, or ``dlpack``: a
plain object that only forwards CuPy's ``__dlpack__``, on the host tests/dlpack_producer.py) on
the backend's device; every rank derives every
rank's inputs from seeds and checks every row of gather (both contributions), scatter, scatter
into ``out=``, gather_logits, scatter_logits and mask_topk_ids against a NumPy reference.

Two verdicts per rank: ``failures`` (the values: must hold now) and ``type_failures`` (each result
in the caller's framework, dtype and device; JAX arrays refused where a call writes): that half
needs the facade to call ``backend.export`` / ``wrap(writable=True)``; tests mark it.
"""

import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dlpack_producer  # noqa: E402
from dlpack_producer import Forward  # noqa: E402
import dpgather as dg  # noqa: E402
from mpi_harness import report  # noqa: E402
from scenario_kit import Checker  # noqa: E402

comm = MPI.COMM_WORLD
RANK, T = comm.rank, comm.size
ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="host", choices=("host", "cuda"))
ap.add_argument("--framework", default="numpy", choices=("numpy", "cupy", "torch", "jax", "dlpack"))
ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
ap.add_argument("--hidden", type=int, default=24)
ap.add_argument("--steps", type=int, default=3)
args = ap.parse_args()

import ml_dtypes  # noqa: E402

NPDT = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(args.dtype)
H, FW, CUDA = args.hidden, args.framework, args.backend == "cuda"
tally = Checker(tol={"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}[args.dtype])
types = Checker(tol=0)


class Framework:
    """Make the caller's arrays (from NumPy values in the logical dtype), read results back, and
    name what a result is: ``(framework, dtype, device kind)``."""

    def __init__(self, fw, dev):
        self.fw, self.dev = fw, dev
        if fw == "torch":
            import torch

            self.t = torch
            self.device = torch.device("cuda", dev) if CUDA else torch.device("cpu")
        elif fw == "jax":
            import jax

            self.jax = jax
            self.device = [d for d in jax.devices("gpu") if d.local_hardware_id == dev][0] if CUDA else \
                jax.devices("cpu")[0]
        if CUDA:
            import cupy

            self.cp = cupy

    def make(self, a):
        if self.fw == "torch":
            if a.dtype.name == "bfloat16":
                return self.t.from_numpy(a.astype(np.float32)).to(device=self.device, dtype=self.t.bfloat16)
            return self.t.from_numpy(a.copy()).to(self.device)
        if self.fw == "jax":
            return self.jax.device_put(a, self.device)
        if CUDA:
            d = self.cp.asarray(a.view(np.uint16) if a.dtype.name == "bfloat16" else a)
            return Forward(d) if self.fw == "dlpack" else d
        if self.fw == "dlpack":  # NumPy exports no bfloat16: the tests' own producer does
            bf16 = a.dtype.name == "bfloat16"
            return dlpack_producer.Producer(a.view(np.uint16).copy() if bf16 else a.copy(),
                                            code=dlpack_producer.BFLOAT if bf16 else None)
        return a.copy()

    def values(self, r, like):
        """``r`` as float64 NumPy values (``like``: the logical NumPy dtype of the data)."""
        if isinstance(r, (Forward, dlpack_producer.Producer)):
            r = r.a if isinstance(r, Forward) else r.base
        if self.fw == "torch" and isinstance(r, self.t.Tensor):
            return (r.float() if r.is_floating_point() else r).cpu().numpy().astype(np.float64)
        if self.fw == "jax" and isinstance(r, self.jax.Array):
            return np.asarray(r.astype(np.float32) if str(r.dtype) == "bfloat16" else r).astype(np.float64)
        h = self.cp.asnumpy(r) if CUDA else np.asarray(r)
        if h.dtype == np.uint16 and like is not None and like.name == "bfloat16":
            h = h.view(like)
        return h.astype(np.float64)

    def what(self, r):
        mod = type(r).__module__.split(".")[0]
        if mod == "torch":
            return "torch", str(r.dtype).replace("torch.", ""), r.device.type
        if mod in ("jax", "jaxlib"):
            return "jax", str(r.dtype), next(iter(r.devices())).platform.replace("cuda", "gpu")
        return mod, r.dtype.name, "gpu" if mod == "cupy" else "cpu"

    def expected(self, dtype_name):
        """What a result of data in ``dtype_name`` should be (a set of acceptable answers)."""
        if self.fw == "torch":
            return {("torch", dtype_name, "cuda" if CUDA else "cpu")}
        if self.fw == "jax":
            return {("jax", dtype_name, "gpu" if CUDA else "cpu")}
        if CUDA:  # CuPy: bfloat16 as CuPy's own (>= 14 with ml_dtypes) where a caller's data was bfloat16
            if dtype_name != "bfloat16":
                return {("cupy", dtype_name, "gpu")}
            return {("cupy", "uint16", "gpu")} if self.fw == "cupy" else {("cupy", "uint16", "gpu"),
                                                                           ("cupy", "bfloat16", "gpu")}
        return {("numpy", dtype_name, "cpu")}


def rows(seed, n, width=H, dt=None):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32).astype(dt or NPDT)


def check_type(name, r, dtype_name):
    got = fw.what(r)
    types.check(f"{name}: got {got}, expected one of {sorted(fw.expected(dtype_name))}",
                got in fw.expected(dtype_name))


for A in [a for a in (1, 2) if T % a == 0]:
    D, d = T // A, RANK // A
    dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=args.dtype, backend=args.backend)
    fw = Framework(FW, dp._backend.device.id if CUDA else None)
    for step in range(args.steps):
        bs = np.random.default_rng([step, A]).integers(0, 6, size=D)
        plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, int(bs[d])) if bs[d] else dg.LocalBatch(dg.ForwardMode.IDLE))
        if plan.skip:
            continue
        n, o = plan.num_tokens, plan.slot_offsets
        tag = f"A={A} step {step} {plan.mode.name}"
        for contrib in ("replicate", "partial"):
            xs = {r: rows(100 * step + (r if contrib == "partial" else (r // A) * A), int(n[r // A])) for r in range(T)}
            ref = np.zeros((plan.gathered_rows, H))
            for r in range(T):
                if contrib == "partial" or r % A == 0:
                    ref[o[r // A]:o[r // A] + int(n[r // A])] += xs[r].astype(np.float64)
            x = fw.make(xs[RANK])
            G = dp.gather(x, plan, contribution=contrib)
            tally.check(f"{tag} gather {contrib}", tally.close(fw.values(G, NPDT), ref))
            check_type(f"{tag} gather {contrib}", G, args.dtype)
        Ys = {r: rows(1000 + 100 * step + r, plan.gathered_rows) for r in range(T)}
        total = sum(Ys[r].astype(np.float64) for r in range(T))
        k = int(n[d])
        y = dp.scatter(fw.make(Ys[RANK]), plan, reduce=True)
        tally.check(f"{tag} scatter", tally.close(fw.values(y, NPDT), total[o[d]:o[d] + k]))
        check_type(f"{tag} scatter", y, args.dtype)
        if FW != "jax":
            out = fw.make(np.full((k + 2, H), 7, np.float32).astype(NPDT))  # poisoned
            r_out = dp.scatter(fw.make(Ys[0]), plan, reduce=False, out=out)
            want = np.zeros((k + 2, H))
            want[:k] = Ys[0][o[d]:o[d] + k]
            tally.check(f"{tag} scatter into out=", tally.close(fw.values(out, NPDT), want))
            types.check(f"{tag} scatter out= returns the caller's out", r_out is out)
        hl = rows(3000 + step * 10 + d, int(plan.logits_tokens[d]))
        Lg = dp.gather_logits(fw.make(hl), plan)
        lref = np.zeros((plan.logits_rows, H))
        for r in range(D):
            lref[plan.logits_offsets[r]:plan.logits_offsets[r] + int(plan.logits_tokens[r])] = \
                rows(3000 + step * 10 + r, int(plan.logits_tokens[r]))
        tally.check(f"{tag} gather_logits", tally.close(fw.values(Lg, NPDT), lref))
        check_type(f"{tag} gather_logits", Lg, args.dtype)
        V = rows(4000 + step, plan.logits_rows, 5, np.dtype(np.float32))
        ls = dp.scatter_logits(fw.make(V), plan)
        lo = plan.logits_offsets[d]
        tally.check(f"{tag} scatter_logits", tally.close(fw.values(ls, None), V[lo:lo + plan.logits_tokens[d]]))
        check_type(f"{tag} scatter_logits", ls, "float32")
        if FW != "jax":
            ids = np.full((plan.gathered_rows, 3), 5, np.int32)
            t_ids = fw.make(ids)
            r_ids = dp.mask_topk_ids(t_ids, plan)
            iref = ids.copy()
            for r in range(D):
                iref[o[r] + n[r]:o[r + 1]] = -1
            tally.check(f"{tag} mask_topk_ids in place", np.array_equal(fw.values(t_ids, None), iref))
            types.check(f"{tag} mask_topk_ids returns the caller's ids", r_ids is t_ids)
    if FW == "jax":  # every rank makes the same refused call, so the next sync() raises on every rank alike
        plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, 2))
        try:
            dp.scatter(fw.make(rows(5, plan.gathered_rows)), plan, out=fw.make(rows(6, 2)))
            types.check(f"A={A}: a JAX out= is refused (JAX arrays are immutable)", False)
        except dg.InputError as e:
            types.check(f"A={A}: a JAX out= is refused: {e}", "immutable" in str(e))
    dp.close()

report(RANK, failures=tally.fails[:40], nfailures=tally.nfailures, passed=tally.passed,
       type_failures=types.fails[:40], types_passed=types.passed, backend=args.backend, framework=FW,
       dtype=args.dtype)
