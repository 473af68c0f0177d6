#!/usr/bin/env python3
"""GPU self-test of the CUDA row kernels (kernels/_cuda.py + kernels/copy.cu).

One process, one GPU. Checks ``copy_rows`` and ``mask_rows`` against NumPy references of
the docs/internals.md semantics over random shapes, odd widths, every dtype, misaligned
base pointers (byte-offset views), descriptors past the end / negative / huge, every
vector path (16/8/4/2/1 bytes), non-default streams, src == dst with disjoint rows, a CUDA
graph replayed with new descriptor contents, large grid-stride cases and the argument
errors. Every output buffer is poisoned and surrounded by guard bytes that must survive.

    python tests/gpu/gpu_selftest.py [--cases 400] [--seed 1] [--device 0] [-v]

Prints ``N passed, M failed`` last and reports it (``mpi_harness.report``); exit status 1 if
anything failed.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

try:
    import cupy
except ImportError:  # pragma: no cover
    print("0 passed, 1 failed (CuPy is not importable)")
    sys.exit(1)

from dpgather.core.errors import InputError
from dpgather.kernels import _cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpi"))  # scenario_kit
from scenario_kit import Checker  # noqa: E402  (FAIL lines as they happen; PASS ones with -v)

DTYPES = ["uint8", "int8", "uint16", "int16", "float16", "float32", "int32", "int64", "float64"]
WIDTHS = [1, 2, 3, 5, 7, 8, 13, 16, 31, 64, 127, 128, 129, 1000, 7168, 7169]
GUARD = 64


#: how many copy cases took each vector path (bytes per access)
VEC_SEEN: dict[int, int] = {}


# ---------------------------------------------------------------- NumPy references


def ref_copy_rows(src_b: np.ndarray, dst_b: np.ndarray, desc: np.ndarray, i: int) -> None:
    """docs/internals.md copy_rows on uint8 row views ``[rows, row_bytes]`` (dst in place)."""
    s0, nv, d0, nr = (max(int(x), 0) for x in desc[4 * i: 4 * i + 4])
    rows = max(0, min(nr, dst_b.shape[0] - d0))
    valid = max(0, min(nv, src_b.shape[0] - s0, rows))
    if rows:
        dst_b[d0: d0 + valid] = src_b[s0: s0 + valid]
        dst_b[d0 + valid: d0 + rows] = 0


def ref_mask_rows(ids: np.ndarray, desc: np.ndarray, i: int, num_slots: int, fill: int) -> None:
    total = ids.shape[0]
    for s in range(num_slots):
        off, nt, sr = (max(int(x), 0) for x in desc[i + 3 * s: i + 3 * s + 3])
        r0, r1 = min(off + nt, total), min(off + sr, total)
        if r1 > r0:
            ids[r0:r1] = fill


# ---------------------------------------------------------------- helpers


def view(base, offset: int, rows: int, width: int, dtype) -> "cupy.ndarray":
    """C-contiguous [rows, width] ``dtype`` view at byte ``offset`` of ``base`` (any alignment)."""
    return cupy.ndarray((rows, width), dtype=dtype, memptr=base.data + offset)


def desc_value(rng, rows: int) -> int:
    pick = rng.integers(0, 10)
    if pick < 5:
        return int(rng.integers(0, rows + 1))
    if pick < 7:
        return int(rng.integers(rows, rows + 20))
    if pick == 7:
        return -int(rng.integers(1, 5))
    if pick == 8:
        return int(rng.choice([2**31, 2**40, 2**62]))
    return 0


def copy_case(res: Checker, rng, case: int, *, dtype=None, width=None, src_off=None,
              dst_off=None, src_rows=None, dst_rows=None, stream_kind=None, desc=None) -> None:
    dtype = np.dtype(dtype or rng.choice(DTYPES))
    width = int(width if width is not None else (rng.choice(WIDTHS) if rng.random() < 0.6
                                                 else rng.integers(1, 300)))
    rb = width * dtype.itemsize
    src_rows = int(src_rows if src_rows is not None else rng.integers(0, 40))
    dst_rows = int(dst_rows if dst_rows is not None else rng.integers(0, 40))
    src_off = int(src_off if src_off is not None else rng.choice([0, 0, 16, 32, 8, 4, 2, 1, 3,
                                                                  rng.integers(0, 16)]))
    dst_off = int(dst_off if dst_off is not None else rng.choice([0, 0, 16, 48, 8, 4, 2, 1, 5,
                                                                  rng.integers(0, 16)]))
    if desc is None:
        nrec = int(rng.integers(1, 4))
        desc = np.array([desc_value(rng, src_rows if k % 4 < 2 else dst_rows)
                         for k in range(4 * nrec)], dtype=np.int64)
    i = int(rng.integers(0, desc.size // 4))
    name = (f"copy[{case}] {dtype} w={width} rb={rb} src={src_rows}@{src_off} "
            f"dst={dst_rows}@{dst_off} desc={desc[4 * i: 4 * i + 4].tolist()}")
    try:
        src_host = rng.integers(0, 256, GUARD + src_off + src_rows * rb + GUARD, dtype=np.uint8)
        poison = int(rng.integers(1, 256))
        dst_host = np.full(GUARD + dst_off + dst_rows * rb + GUARD, poison, dtype=np.uint8)
        src_base = cupy.asarray(src_host)
        dst_base = cupy.asarray(dst_host)
        src = view(src_base, GUARD + src_off, src_rows, width, dtype)
        dst = view(dst_base, GUARD + dst_off, dst_rows, width, dtype)
        vec = _cuda.vector_bytes(rb, src.data.ptr, dst.data.ptr)
        VEC_SEEN[vec] = VEC_SEEN.get(vec, 0) + 1
        d_desc = cupy.asarray(desc)

        kind = stream_kind or rng.choice(["current", "stream", "ptr"])
        s = cupy.cuda.Stream(non_blocking=True) if kind != "current" else None
        if kind == "current":
            _cuda.copy_rows(src, dst, d_desc, i)
            cupy.cuda.get_current_stream().synchronize()
        else:
            cupy.cuda.get_current_stream().synchronize()
            _cuda.copy_rows(src, dst, d_desc, i, stream=s if kind == "stream" else s.ptr)
            s.synchronize()

        expect = dst_host.copy()
        if dst_rows and rb:
            ref_copy_rows(
                src_host[GUARD + src_off: GUARD + src_off + src_rows * rb].reshape(src_rows, rb),
                expect[GUARD + dst_off: GUARD + dst_off + dst_rows * rb].reshape(dst_rows, rb),
                desc, i)
        got = cupy.asnumpy(dst_base)
        bad = np.flatnonzero(got != expect)
        res.check(name + f" vec={vec}", bad.size == 0,
                  f"{bad.size} wrong bytes, first at {bad[:5].tolist()}")
        res.check(name + " src untouched", bool((cupy.asnumpy(src_base) == src_host).all()))
    except Exception:
        res.error(name)


def mask_case(res: Checker, rng, case: int) -> None:
    dtype = np.dtype(rng.choice(["int32", "int64"]))
    rows = int(rng.integers(0, 80))
    k = int(rng.integers(1, 10))
    off_items = int(rng.choice([0, 1, 3]))  # element-aligned offsets only (kernel contract)
    num_slots = int(rng.integers(0, 9))
    lead = int(rng.integers(0, 4))
    desc = np.array([desc_value(rng, rows) for _ in range(lead + 3 * num_slots + 2)],
                    dtype=np.int64)
    fill = int(rng.choice([-1, 0, 7, np.iinfo(dtype).min, np.iinfo(dtype).max]))
    name = f"mask[{case}] {dtype} rows={rows} k={k} slots={num_slots} i={lead} fill={fill}"
    try:
        g = GUARD // dtype.itemsize
        host = rng.integers(-1000, 1000, g + off_items + rows * k + g).astype(dtype)
        base = cupy.asarray(host)
        ids = cupy.ndarray((rows, k), dtype=dtype,
                           memptr=base.data + (g + off_items) * dtype.itemsize)
        _cuda.mask_rows(ids, cupy.asarray(desc), lead, num_slots, fill)
        cupy.cuda.get_current_stream().synchronize()
        expect = host.copy()
        ref_mask_rows(expect[g + off_items: g + off_items + rows * k].reshape(rows, k),
                      desc, lead, num_slots, fill)
        got = cupy.asnumpy(base)
        bad = np.flatnonzero(got != expect)
        res.check(name, bad.size == 0, f"{bad.size} wrong items, first at {bad[:5].tolist()}")
    except Exception:
        res.error(name)


def graph_case(res: Checker, rng) -> None:
    """One captured graph (copy + mask) replayed for several descriptor contents."""
    name = "graph replay"
    try:
        width, dtype = 7168, np.dtype("uint16")
        rb = width * 2
        src_rows, dst_rows = 64, 96
        src_h = rng.integers(0, 2**16, (src_rows, width), dtype=np.uint16)
        src = cupy.asarray(src_h)
        dst = cupy.empty((dst_rows, width), dtype=dtype)
        ids = cupy.zeros((dst_rows, 8), dtype=cupy.int32)
        desc = cupy.zeros(4 + 3 * 3, dtype=cupy.int64)
        s = cupy.cuda.Stream(non_blocking=True)
        _cuda.warm()
        cupy.cuda.Device().synchronize()  # buffers were filled on the default stream
        with s:
            s.begin_capture()
            _cuda.copy_rows(src, dst, desc, 0, stream=s)
            _cuda.mask_rows(ids, desc, 4, 3, -1, stream=s)
            graph = s.end_capture()
        for trial in range(6):
            d = np.array([desc_value(rng, src_rows), desc_value(rng, src_rows),
                          desc_value(rng, dst_rows), desc_value(rng, dst_rows)]
                         + [desc_value(rng, dst_rows) for _ in range(9)], dtype=np.int64)
            poison = np.full((dst_rows, width), 0xBEEF, dtype=np.uint16)
            dst.set(poison, stream=s)
            ids_h = rng.integers(0, 100, (dst_rows, 8)).astype(np.int32)
            ids.set(ids_h, stream=s)
            desc.set(d, stream=s)
            graph.launch(s)
            s.synchronize()
            exp = poison.copy()
            ref_copy_rows(src_h.view(np.uint8).reshape(src_rows, rb),
                          exp.view(np.uint8).reshape(dst_rows, rb), d, 0)
            exp_ids = ids_h.copy()
            ref_mask_rows(exp_ids, d, 4, 3, -1)
            res.check(f"{name} #{trial} copy desc={d[:4].tolist()}",
                      bool((cupy.asnumpy(dst) == exp).all()))
            res.check(f"{name} #{trial} mask", bool((cupy.asnumpy(ids) == exp_ids).all()))
        del graph
    except Exception:
        res.error(name)


def large_cases(res: Checker, rng) -> None:
    """Multi-trip grid-stride loops: more vectors than the capped grid covers in one pass."""
    for rows, dst_rows, d in [
        (5000, 5000, [0, 5000, 0, 5000]),
        (5000, 12000, [0, 5000, 3000, 9000]),      # 4000 zero rows after the copy
        (12000, 4000, [7000, 4000, 10, 4000]),     # clamped on both sides
        (100, 20000, [0, 100, 0, 20000]),          # large capacity, small copy, long zero tail
    ]:
        copy_case(res, rng, -1, dtype="uint16", width=7168, src_off=0, dst_off=0,
                  src_rows=rows, dst_rows=dst_rows, stream_kind="stream",
                  desc=np.array(d, dtype=np.int64))


def same_buffer_cases(res: Checker) -> None:
    """src is dst: zero a tail in place (n_valid = 0), and move rows to a disjoint range."""
    host = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)
    for d in ([0, 0, 7, 3], [0, 0, 4, 100], [0, 3, 6, 4], [6, 2, 0, 3]):
        name = f"same buffer desc={d}"
        try:
            a = cupy.asarray(host)
            _cuda.copy_rows(a, a, cupy.asarray(np.array(d, dtype=np.int64)), 0)
            exp = host.copy()
            ref_copy_rows(host.view(np.uint8).reshape(10, 24).copy(),
                          exp.view(np.uint8).reshape(10, 24), np.array(d), 0)
            res.check(name, bool((cupy.asnumpy(a) == exp).all()))
        except Exception:
            res.error(name)


def error_cases(res: Checker) -> None:
    a = cupy.zeros((4, 8), dtype=cupy.float32)
    b = cupy.zeros((4, 8), dtype=cupy.float16)  # half the row bytes
    desc = cupy.zeros(8, dtype=cupy.int64)
    cases = {
        "row bytes differ": lambda: _cuda.copy_rows(a, b, desc, 0),
        "desc too short": lambda: _cuda.copy_rows(a, a.copy(), desc, 2),
        "desc host array": lambda: _cuda.copy_rows(a, a.copy(), np.zeros(4, np.int64), 0),
        "desc int32": lambda: _cuda.copy_rows(a, a.copy(), desc.astype(cupy.int32), 0),
        "negative i": lambda: _cuda.copy_rows(a, a.copy(), desc, -1),
        "non-contiguous": lambda: _cuda.copy_rows(a[:, ::2], b, desc, 0),
        "1-D": lambda: _cuda.copy_rows(a.ravel(), a.copy().ravel(), desc, 0),
        "numpy src": lambda: _cuda.copy_rows(np.zeros((4, 8), np.float32), a, desc, 0),
        "mask float ids": lambda: _cuda.mask_rows(a, desc, 0, 1, -1),
        "mask desc short": lambda: _cuda.mask_rows(cupy.zeros((4, 2), cupy.int32), desc, 0, 3, -1),
        "mask fill range": lambda: _cuda.mask_rows(cupy.zeros((4, 2), cupy.int32), desc, 0, 1,
                                                   2**40),
    }
    for name, fn in cases.items():
        try:
            fn()
        except InputError:
            res.check(f"error: {name}", True)
        except Exception as exc:
            res.check(f"error: {name}", False, f"raised {type(exc).__name__}: {exc}")
        else:
            res.check(f"error: {name}", False, "no InputError")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=400, help="random copy cases (mask: half)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    cupy.cuda.Device(args.device).use()
    rng = np.random.default_rng(args.seed)
    res = Checker(echo=True, verbose=args.verbose)
    name = cupy.cuda.runtime.getDeviceProperties(args.device)["name"].decode()
    print(f"# device {args.device}: {name}, cupy {cupy.__version__}, seed {args.seed}")

    _cuda.warm()
    # Every vector path at least once (pointer offsets chosen to force each width).
    for vec, (dtype, width, off) in {16: ("uint16", 7168, 0), 8: ("float32", 6, 8),
                                     4: ("float32", 3, 4), 2: ("uint16", 3, 2),
                                     1: ("uint8", 7, 0)}.items():
        copy_case(res, rng, -vec, dtype=dtype, width=width, src_off=off, dst_off=off,
                  src_rows=9, dst_rows=11, desc=np.array([1, 6, 2, 8], dtype=np.int64))
    for case in range(args.cases):
        copy_case(res, rng, case)
    for case in range(max(1, args.cases // 2)):
        mask_case(res, rng, case)
    large_cases(res, rng)
    graph_case(res, rng)
    same_buffer_cases(res)
    error_cases(res)
    for vec in (16, 8, 4, 2, 1):
        res.check(f"vector path {vec} B exercised", VEC_SEEN.get(vec, 0) > 0,
                  f"counts {VEC_SEEN}")
    print(f"# vector paths exercised: {dict(sorted(VEC_SEEN.items()))}")
    print(f"{res.passed} passed, {res.failed} failed")
    from mpi_harness import report

    report(0, failures=[f"{res.failed} kernel checks failed (see the output)"] if res.failed else [],
           passed=res.passed)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
