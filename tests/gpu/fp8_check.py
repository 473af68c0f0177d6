#!/usr/bin/env python3
"""The quantized gather on ONE GPU: the CUDA quantize kernel bit for bit, the data plane, timing.

    python tests/gpu/fp8_check.py [--skip kernel,plane,timing] [--out fp8.json]

Phases:
  kernel   ``dpgather.kernels.cuda.quantize_rows`` (kernels/copy.cu: the 16-byte and the scalar
           kernel, an unaligned source taking the scalar one) against the NumPy reference
           tests/fp8_reference.py, bit for bit: random bit patterns (NaN, infinities, subnormals)
           and normal values over 45 decades for float32, float16 and bfloat16, groups 1, 16, 128
           and H, power-of-two scales on and off, a window inside a poisoned output (rows past
           the valid ones zero, nothing outside the window written)
  plane    ``DpAttention(fp8=...)`` with one rank on this GPU: ``gather_fp8`` (every policy, both
           contributions, each dtype), the graph runner with ``fp8=True`` replayed with rewritten
           counts, and the results in PyTorch and JAX where they import; the wire rows against
           the reference
  timing   the quantize kernel against ``copy_rows`` of the same bf16 rows (hidden 7168, group
           128) in the same run, eager and in a CUDA graph (dpgather.tools.timing's Timer):
           the local cost the quantized gather adds before its transfer. Bytes moved: read 2H and
           write H + H/32 per row (quantize), read and write 2H (copy)

Output: a table, a JSON summary at --out, exit code 0 iff every check passed.
"""

import argparse
import itertools
import json
import os
import sys

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "mpi")]

from fp8_reference import quantize  # noqa: E402
from mpi_harness import report  # noqa: E402
from scenario_kit import Checker  # noqa: E402

DTYPES = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}


def random_rows(g, dtype, rows, H, kind):
    """Host rows of ``dtype`` storage: raw random bits (every special value) or normal values."""
    bits = DTYPES[dtype]
    if kind == "bits":
        b = g.integers(0, np.iinfo(bits).max, size=(rows, H), dtype=bits, endpoint=True)
        return b.view(np.float32) if dtype == "float32" else b
    v = g.standard_normal((rows, H)) * 10.0 ** g.integers(-20 if dtype != "float32" else -40, 5, size=(rows, 1))
    if dtype == "float32":
        return v.astype(np.float32)
    if dtype == "float16":
        return v.astype(np.float16).view(bits)
    return (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _storage(x, dtype):
    """Rows as the DpAttention of ``dtype`` takes them on CUDA (float16 as float16; bfloat16 bits)."""
    return x.view(np.float16) if dtype == "float16" else x


def kernel_phase(chk):
    import cupy

    from dpgather.kernels import cuda

    g = np.random.default_rng(2024)
    H, n = 256, 48
    for dtype in DTYPES:
        for kind in ("bits", "values"):
            x = random_rows(g, dtype, n, H, kind)
            shifted = cupy.empty(x.size + 1, dtype=x.dtype)[1:].reshape(x.shape)  # not 16-byte aligned
            shifted[...] = cupy.asarray(x)
            for group, pow2, xd in itertools.product((1, 16, 128, H), (False, True), (cupy.asarray(x), shifted)):
                path = "16-byte" if xd.data.ptr % 16 == 0 and group * x.itemsize % 16 == 0 else "scalar"
                chk.ctx = f"kernel {dtype} {kind} group={group} pow2={pow2} {path}"
                W = H + 4 * (H // group)
                out = cupy.full((n + 4, W), 0xA5, dtype=cupy.uint8)
                desc = cupy.asarray(np.array([3, n - 7, 2, n - 1], dtype=np.int64))
                cuda.quantize_rows(xd, out, desc, 0, group, pow2, dtype)
                got = out.get()
                exp = quantize(x[3:n - 4], dtype, group, pow2)
                bad = np.argwhere(got[2:n - 5] != exp)
                chk.ok(len(bad) == 0, lambda: f"{len(bad)} bytes differ, first at {bad[0].tolist()}: "
                       f"got {got[2:n - 5][tuple(bad[0])]:#x}, expected {exp[tuple(bad[0])]:#x}")
                chk.ok(not got[n - 5:n + 1].any(), "rows past the valid ones are not zero")
                chk.ok((got[:2] == 0xA5).all() and (got[n + 1:] == 0xA5).all(), "wrote outside the window")


def plane_phase(chk):
    import cupy
    import ml_dtypes

    import dpgather as dg

    H, group = 256, 32
    fmt = dg.Fp8Format(group_size=group)
    g = np.random.default_rng(7)
    for dtype in DTYPES:
        for policy in ("max_len", "sum_len", "varlen"):
            dp = dg.DpAttention(hidden_size=H, dtype=dtype, backend="cuda", policy=policy, fp8=fmt,
                                graph_buckets=(8, 16))
            try:
                for contribution in ("replicate", "partial"):
                    for n in (0, 1, 5, 13):
                        chk.ctx = f"plane {dtype} {policy} {contribution} n={n}"
                        x = _storage(random_rows(g, dtype, n + 2, H, "values"), dtype)
                        batch = dg.LocalBatch(dg.ForwardMode.DECODE if n else dg.ForwardMode.IDLE, n)
                        plan = dp.sync(batch)
                        rows = dp.gather_fp8(cupy.asarray(x), plan, contribution)
                        wire = cupy.asnumpy(rows.wire)
                        exp = np.zeros_like(wire)
                        exp[:n] = quantize(x[:n], dtype, group)
                        chk.ok(np.array_equal(wire, exp), "wire rows differ from the reference")
                        chk.ok(np.array_equal(cupy.asnumpy(rows.q), wire[:, :H])
                               and np.array_equal(cupy.asnumpy(rows.scales), wire[:, H:].copy().view("<f4")),
                               "q / scales are not the wire rows' views")
                chk.ctx = f"plane {dtype} {policy} graph runner"
                storage = dp._path.storage

                def fn(r):  # captured: every replay turns the gathered fp8 bytes into the output rows
                    return r.q.astype(storage)

                runner = dp.graph_runner(fn, fp8=True, reduce=False)
                for n in (3, 8, 11):
                    x = _storage(random_rows(g, dtype, n, H, "values"), dtype)
                    plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, n, can_run_graph=True))
                    y = cupy.asnumpy(runner.run(cupy.asarray(x), plan))
                    exp = quantize(x, dtype, group)[:, :H].astype(storage)
                    chk.ok(np.array_equal(y[:n], exp) and not y[n:].any(), f"graph replay n={n}: rows differ")
                runner.close()
                if dtype == "bfloat16" and policy == "varlen":
                    _frameworks(chk, dp, H, group, g, ml_dtypes)
            finally:
                dp.close()


def _frameworks(chk, dp, H, group, g, ml_dtypes):
    """Fp8Rows in PyTorch and JAX (device arrays), where the framework imports."""
    import dpgather as dg

    x = random_rows(g, "bfloat16", 6, H, "values")
    exp = quantize(x, "bfloat16", group)
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install is a skip, not a failure
        print(f"torch: skipped ({type(e).__name__}: {e})")
    else:
        chk.ctx = "torch"
        plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, 6))
        rows = dp.gather_fp8(torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda(), plan)
        chk.ok(isinstance(rows.q, torch.Tensor) and rows.q.dtype == torch.uint8, f"q is {type(rows.q)}")
        chk.ok(np.array_equal(rows.wire.cpu().numpy(), exp), "torch wire rows differ")
        q8 = rows.q.view(torch.float8_e4m3fn).float().cpu().numpy()
        chk.ok(np.array_equal(q8, exp[:, :H].copy().view(ml_dtypes.float8_e4m3fn).astype(np.float32),
                              equal_nan=True), "torch float8 view differs")
    try:
        import jax
        import jax.numpy as jnp
    except Exception as e:  # noqa: BLE001
        print(f"jax: skipped ({type(e).__name__}: {e})")
    else:
        chk.ctx = "jax"
        plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, 6))
        xj = jax.device_put(jnp.asarray(x.view(ml_dtypes.bfloat16)), jax.devices("gpu")[0])
        rows = dp.gather_fp8(xj, plan)
        chk.ok(np.array_equal(np.asarray(rows.wire), exp), "jax wire rows differ")
        chk.ok(np.array_equal(np.asarray(rows.scales), exp[:, H:].copy().view("<f4")), "jax scales differ")


def timing_phase(rows_list):
    import cupy

    from dpgather.kernels import cuda
    from dpgather.tools.timing import CupyEvents, Timer

    H, group = 7168, 128
    W = H + 4 * (H // group)
    timer = Timer(CupyEvents(), reps=20, warmup=3, target_us=2000.0, kmax=64)
    out = []
    for n in rows_list:
        x = cupy.asarray(random_rows(np.random.default_rng(n), "bfloat16", n, H, "values"))
        q = cupy.empty((n, W), dtype=cupy.uint8)
        c = cupy.empty((n, H), dtype=cupy.uint16)
        desc = cupy.asarray(np.array([0, n, 0, n], dtype=np.int64))
        mq = timer.measure(lambda j: cuda.quantize_rows_unchecked(x, q, desc, 0, group, False, "bfloat16"))
        mc = timer.measure(lambda j: cuda.copy_rows_unchecked(x, c, desc, 0))
        res = {"rows": n, "quantize_us": mq["graph"] or mq["eager"], "copy_us": mc["graph"] or mc["eager"],
               "quantize_eager_us": mq["eager"], "copy_eager_us": mc["eager"],
               "quantize_GBps": n * (2 * H + W) / ((mq["graph"] or mq["eager"]) * 1e3),
               "copy_GBps": n * 4 * H / ((mc["graph"] or mc["eager"]) * 1e3)}
        out.append(res)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", default="", help="phases to skip: kernel,plane,timing")
    ap.add_argument("--rows", default="1,64,1024,8192")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import cupy

    skip = set(a.skip.split(","))
    chk = Checker("fp8", keep=40, echo=True)
    summary = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    for name, phase in (("kernel", kernel_phase), ("plane", plane_phase)):
        if name not in skip:
            try:
                phase(chk)
            except Exception:  # noqa: BLE001 - reported as a failure with its traceback
                chk.error(name)
            print(f"{name}: {chk.passed}/{chk.checks} checks passed", flush=True)
    if "timing" not in skip:
        summary["timing"] = timing_phase([int(r) for r in a.rows.split(",")])
        print(f"{'rows':>6} {'quantize us':>12} {'copy us':>9} {'ratio':>6} {'quantize GB/s':>14} {'copy GB/s':>10}"
              "  (bf16 H=7168 group 128; graph-launched; same run)")
        for r in summary["timing"]:
            print(f"{r['rows']:>6} {r['quantize_us']:12.2f} {r['copy_us']:9.2f} {r['quantize_us'] / r['copy_us']:6.2f} "
                  f"{r['quantize_GBps']:14.1f} {r['copy_GBps']:10.1f}", flush=True)
    summary.update(checks=chk.checks, passed=chk.passed, failures=chk.fails)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print("fp8_check:", "PASS" if not chk.failed else f"FAIL ({chk.failed})", flush=True)
    report(0, failures=chk.fails, checks=chk.checks, passed=chk.passed)
    return 0 if not chk.failed else 1


if __name__ == "__main__":
    sys.exit(main())
