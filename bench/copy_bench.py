"""Row-copy kernels vs cudaMemcpyAsync: ``copy_rows`` pack and unpack against a device-to-device
``cudaMemcpyAsync`` of the same bytes, one GPU.

Rows are one token's hidden state: ``--hidden 7168`` elements of ``--itemsize 2`` bytes (bf16
storage, 14336-byte rows). For each size from 64 KiB to 1 GiB (powers of two, rounded down to
whole rows):

- memcpy:  ``cudaMemcpyAsync(G_j + rows*row_bytes, L_j, bytes, DeviceToDevice)``
- pack:    ``copy_rows(L_j, G_j, desc, 0)`` with ``desc = (0, rows, rows, rows)``: the local
           rows into slot 1 of a two-slot gathered buffer ``G_j`` of ``2*rows`` rows (the grid is
           sized from that capacity, as in the real pack)
- unpack:  ``copy_rows(G_j, L_j, desc, 1)`` with ``desc = (rows, rows, 0, rows)``

``j`` rotates over enough buffer sets that consecutive operations touch ~768 MB of distinct
memory, so small sizes are not served from L2 (50 MB on H100). Timing (``dpgather.tools.timing``,
shared with the other benches): ``reps`` operations are captured into one CUDA graph
(``--eager`` launches them from Python instead, adding the host cost of each call), timed with
CUDA events around the launch after ``--warmup`` launches; the table shows the median over
``--iters`` launches divided by ``reps``. Bandwidth counts bytes
read + written (2x the row bytes). Every size is checked afterwards: the packed slot equals the
source, the other slot keeps its poison, the unpacked rows equal the packed ones (#wrong).

    python bench/copy_bench.py [--min-bytes 65536] [--max-bytes 1073741824] [--hidden 7168]
        [--itemsize 2] [--iters 20] [--warmup 5] [--eager] [--blocks-per-sm 4[,8,...]]
        [--threshold 90] [--json PATH] [--device 0]

Target (docs/internals.md / issue 4): pack and unpack >= 90 % of the memcpy bandwidth from 8 MB
up; the footer prints the average over those sizes and OK/FAILED against ``--threshold``.

``--mode quantize`` (docs/fp8.md) times instead, in the same run and on the same bfloat16 rows
(``--hidden`` elements, normal values; size = the input bytes):

- copy:      ``copy_rows(L_j, C_j, desc, 0)`` with ``desc = (0, rows, 0, rows)``: the rows as they are
- quantize:  ``quantize_rows(L_j, Q_j, desc, 0, group, False, "bfloat16")``: the same rows into
             fp8 wire rows of ``H + 4 * H / --group`` bytes

Bandwidth counts the input read + the output written (copy: 2 x size; quantize: size + rows x
wire bytes); ``q/copy`` is the quantize time over the copy time. #wrong: the wire rows of the
first buffer set against the host kernel (``dpgather.kernels.host.quantize_rows``, bit-identical
by contract) on up to 256 rows.
"""

import argparse
import datetime
import math
import statistics
import sys
import time

import numpy as np

from dpgather.core.files import write_json_atomic
from dpgather.tools.timing import Column, CupyEvents, Timer, algbw_GBps, format_table, gpu_count

ROTATE_BYTES = 768 << 20
MAX_ROTATE = 1024
TARGET_GRAPH_MS = 1.5
FROM_BYTES = 8 << 20


def parse_size(text):
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def sizes_between(lo, hi):
    out, s = [], 1
    while s < lo:
        s *= 2
    while s <= hi:
        out.append(s)
        s *= 2
    return out


class Case:
    """Buffers, descriptor and per-op argument lists for one size."""

    def __init__(self, cupy, rows, width, dtype, rotate=True):
        self.rows, self.width = rows, width
        self.row_bytes = width * np.dtype(dtype).itemsize
        self.bytes = rows * self.row_bytes
        self.nrot = max(1, min(MAX_ROTATE, ROTATE_BYTES // (3 * self.bytes))) if rotate else 1
        self.poison = int(np.iinfo(dtype).max)
        self.L = cupy.random.randint(0, 1 << 7, (self.nrot * rows, width), dtype=cupy.int32)
        self.L = self.L.astype(dtype)
        self.G = cupy.full((self.nrot * 2 * rows, width), self.poison, dtype=dtype)
        self.desc = cupy.asarray(np.array([0, rows, rows, rows, rows, rows, 0, rows], np.int64))

    def local(self, j):
        j %= self.nrot
        return self.L[j * self.rows:(j + 1) * self.rows]

    def gathered(self, j):
        j %= self.nrot
        return self.G[j * 2 * self.rows:(j + 1) * 2 * self.rows]


def make_ops(cupy, kernels, case, stream):
    rt = cupy.cuda.runtime
    kind = rt.memcpyDeviceToDevice
    rb = case.row_bytes

    def memcpy(j):
        rt.memcpyAsync(case.gathered(j).data.ptr + case.rows * rb, case.local(j).data.ptr,
                       case.bytes, kind, stream.ptr)

    def pack(j):
        kernels.copy_rows(case.local(j), case.gathered(j), case.desc, 0, stream)

    def unpack(j):
        kernels.copy_rows(case.gathered(j), case.local(j), case.desc, 1, stream)

    return {"memcpy": memcpy, "pack": pack, "unpack": unpack}


def time_op(timer, op, reps, eager):
    """Median microseconds per operation: ``reps`` operations per launch (one CUDA graph, or
    ``--eager`` Python launches), timed by ``timer`` (``--iters`` launches after ``--warmup``)."""
    if eager:
        def launch():
            for j in range(reps):
                op(j)
    else:
        graph = timer.capture(op, reps)
        if graph is None:
            raise RuntimeError(f"graph capture failed: {timer.graph_error}")
        launch = timer.clock.launcher(graph)
    return timer.median_us(launch, reps)


def host_cost_us(cupy, kernels, case, stream, calls=2000):
    """Host time of one eager ``copy_rows`` call (enqueue only; the GPU is not waited for)."""
    src, dst = case.local(0), case.gathered(0)
    kernels.copy_rows(src, dst, case.desc, 0, stream)
    stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        kernels.copy_rows(src, dst, case.desc, 0, stream)
    t = (time.perf_counter() - t0) / calls * 1e6
    stream.synchronize()
    return t


def run_size(cupy, kernels, size, args, timer, dtype):
    width = args.hidden
    row_bytes = width * args.itemsize
    rows = max(1, size // row_bytes)
    case = Case(cupy, rows, width, dtype)
    stream = timer.clock.stream
    ops = make_ops(cupy, kernels, case, stream)
    est_us = 2.5 + 2 * case.bytes / 2.0e6  # launch + ~2 TB/s of read+write traffic
    reps = max(1, min(MAX_ROTATE, math.ceil(TARGET_GRAPH_MS * 1e3 / est_us)))
    cupy.cuda.Device().synchronize()
    row = {"size": case.bytes, "rows": rows, "reps": reps, "rotate": case.nrot,
           "vec": kernels.vector_bytes(row_bytes, case.local(0).data.ptr,
                                       case.gathered(0).data.ptr)}
    row["memcpy_us"] = time_op(timer, ops["memcpy"], reps, args.eager)
    case.G.fill(case.poison)
    stream.synchronize()
    cupy.cuda.Device().synchronize()
    row["pack_us"] = time_op(timer, ops["pack"], reps, args.eager)
    g0, l0 = case.gathered(0), case.local(0)
    wrong = int((g0[rows:] != l0).sum()) + int((g0[:rows] != case.poison).sum())
    saved = l0.copy()
    case.L.fill(0)
    cupy.cuda.Device().synchronize()
    row["unpack_us"] = time_op(timer, ops["unpack"], reps, args.eager)
    wrong += int((case.local(0) != saved).sum())
    row["wrong"] = wrong
    for k in ("memcpy", "pack", "unpack"):
        row[f"{k}_gbps"] = algbw_GBps(2 * case.bytes, row[f"{k}_us"])  # read + written
    row["pack_pct"] = 100.0 * row["memcpy_us"] / row["pack_us"]
    row["unpack_pct"] = 100.0 * row["memcpy_us"] / row["unpack_us"]
    row["overhead_us"] = row["pack_us"] - row["memcpy_us"]
    del case, ops
    cupy.get_default_memory_pool().free_all_blocks()
    return row


#: The table (rows printed as each size is measured, so every column has a fixed width).
COLUMNS = (
    Column("size", "size", "(B)", "d", 12), Column("rows", "rows", "", "d", 7),
    Column("vec", "vec", "(B)", "d", 3), Column("memcpy_us", "memcpy", "(us)", ".2f", 10),
    Column("pack_us", "pack", "(us)", ".2f", 9), Column("unpack_us", "unpack", "(us)", ".2f", 10),
    Column("memcpy_gbps", "memcpy", "(GB/s)", ".0f", 8), Column("pack_gbps", "pack", "(GB/s)", ".0f", 8),
    Column("pack_pct", "pack/mc", "(%)", ".1f", 7), Column("unpack_pct", "unpk/mc", "(%)", ".1f", 7),
    Column("overhead_us", "ovh", "(us)", ".2f", 7), Column("wrong", "#wrong", "", "d", 6),
)


class QuantCase:
    """``--mode quantize`` buffers of one size: bf16 inputs ``L``, copy outputs ``C``, wire rows ``Q``."""

    def __init__(self, cupy, rows, width, group):
        self.rows, self.wire = rows, width + 4 * (width // group)
        self.bytes = rows * width * 2
        self.nrot = max(1, min(MAX_ROTATE, ROTATE_BYTES // (3 * self.bytes)))
        x = cupy.random.standard_normal((self.nrot * rows, width), dtype=cupy.float32)
        self.L = ((x.view(cupy.uint32) + 0x8000) >> 16).astype(cupy.uint16)  # bf16 bits
        self.C = cupy.zeros((self.nrot * rows, width), dtype=cupy.uint16)
        self.Q = cupy.zeros((self.nrot * rows, self.wire), dtype=cupy.uint8)
        self.desc = cupy.asarray(np.array([0, rows, 0, rows], np.int64))

    def part(self, a, j):
        j %= self.nrot
        return a[j * self.rows:(j + 1) * self.rows]


def run_quantize_size(cupy, kernels, size, args, timer):
    """One ``--mode quantize`` row: copy and quantize of the same rows, timed in turn."""
    rows = max(1, size // (args.hidden * 2))
    case = QuantCase(cupy, rows, args.hidden, args.group)
    stream = timer.clock.stream

    def copy(j):
        kernels.copy_rows(case.part(case.L, j), case.part(case.C, j), case.desc, 0, stream)

    def quantize(j):
        kernels.quantize_rows(case.part(case.L, j), case.part(case.Q, j), case.desc, 0, args.group, False,
                              "bfloat16", stream)

    est_us = 2.5 + 2 * case.bytes / 2.0e6
    reps = max(1, min(MAX_ROTATE, math.ceil(TARGET_GRAPH_MS * 1e3 / est_us)))
    cupy.cuda.Device().synchronize()
    row = {"size": case.bytes, "rows": rows, "reps": reps, "rotate": case.nrot, "wire_bytes": case.wire}
    row["copy_us"] = time_op(timer, copy, reps, args.eager)
    row["quant_us"] = time_op(timer, quantize, reps, args.eager)
    stream.synchronize()
    from dpgather.kernels import host

    n = min(rows, 256)
    src = cupy.asnumpy(case.L[:n])
    ref = host.quantize_rows(src, np.zeros((n, case.wire), np.uint8), np.array([0, n, 0, n], np.int64), 0,
                             args.group, False, "bfloat16")
    row["wrong"] = int((cupy.asnumpy(case.Q[:n]) != ref).sum()) + int((cupy.asnumpy(case.C[:n]) != src).sum())
    row["copy_gbps"] = algbw_GBps(2 * case.bytes, row["copy_us"])
    row["quant_gbps"] = algbw_GBps(case.bytes + rows * case.wire, row["quant_us"])
    row["ratio"] = row["quant_us"] / row["copy_us"]
    del case
    cupy.get_default_memory_pool().free_all_blocks()
    return row


#: The ``--mode quantize`` table.
QUANT_COLUMNS = (
    Column("size", "size", "(B)", "d", 12), Column("rows", "rows", "", "d", 7),
    Column("copy_us", "copy", "(us)", ".2f", 10), Column("quant_us", "quantize", "(us)", ".2f", 10),
    Column("copy_gbps", "copy", "(GB/s)", ".0f", 8), Column("quant_gbps", "quantize", "(GB/s)", ".0f", 8),
    Column("ratio", "q/copy", "(x)", ".2f", 6), Column("wrong", "#wrong", "", "d", 6),
)


def quantize_main(cupy, kernels, args, sizes, timer, meta):
    """``--mode quantize``: the table, the average from 8 MB up, ``--json``; exit 1 on a wrong byte."""
    meta.update(mode_op="quantize", group=args.group, wire_bytes=args.hidden + 4 * (args.hidden // args.group))
    print(f"# quantize_rows vs copy_rows: bf16 rows of {args.hidden} -> fp8 wire rows of {meta['wire_bytes']} B "
          f"(group {args.group}); bandwidth = (input read + output written) / time")
    print("\n".join(format_table([], QUANT_COLUMNS)))
    rows = []
    for size in sizes:
        if size < args.hidden * 2:
            continue
        row = run_quantize_size(cupy, kernels, size, args, timer)
        rows.append(row)
        print(format_table([row], QUANT_COLUMNS, header=False)[0], flush=True)
    big = [r for r in rows if r["size"] >= FROM_BYTES]
    wrong = sum(r["wrong"] for r in rows)
    print(f"# Wrong values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    if big:
        print(f"# Avg from {FROM_BYTES >> 20} MB: copy {statistics.mean(r['copy_gbps'] for r in big):.0f} GB/s, "
              f"quantize {statistics.mean(r['quant_gbps'] for r in big):.0f} GB/s, quantize/copy time "
              f"{statistics.mean(r['ratio'] for r in big):.2f}x")
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "results": [{"rows": rows, "wrong": wrong}]}, indent=1)
        print(f"# wrote {args.json}")
    return 0 if wrong == 0 else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-bytes", default="64K")
    ap.add_argument("--max-bytes", default="1G")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--itemsize", type=int, default=2, choices=(1, 2, 4, 8))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="launch from Python instead of a graph")
    ap.add_argument("--blocks-per-sm", default=None,
                    help="grid cap(s) in blocks per SM, comma-separated (default: the loader's)")
    ap.add_argument("--threshold", type=float, default=90.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--mode", default="copy", choices=("copy", "quantize"),
                    help="copy: pack/unpack vs memcpy; quantize: quantize_rows vs copy_rows of bf16 rows")
    ap.add_argument("--group", type=int, default=128, help="--mode quantize: channels per fp8 scale")
    args = ap.parse_args(argv)
    if args.iters < 20:
        ap.error("--iters must be >= 20 (median of at least 20 samples)")
    if args.mode == "quantize" and (args.itemsize != 2 or args.group < 1 or args.hidden % args.group):
        ap.error(f"--mode quantize: bfloat16 rows (--itemsize 2) and a --group dividing --hidden; got "
                 f"--itemsize {args.itemsize}, --group {args.group}, --hidden {args.hidden}")

    gpus = gpu_count()
    if gpus <= args.device:
        print(f"copy_bench: needs CuPy and GPU {args.device} (CuPy sees {gpus})", file=sys.stderr)
        return 2

    import cupy

    from dpgather.kernels import _cuda as kernels

    cupy.cuda.Device(args.device).use()
    kernels.warm()
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[args.itemsize]
    props = cupy.cuda.runtime.getDeviceProperties(args.device)
    name = props["name"].decode()
    bps_list = ([int(x) for x in args.blocks_per_sm.split(",")] if args.blocks_per_sm
                else [kernels._BLOCKS_PER_SM])
    sizes = sizes_between(parse_size(args.min_bytes), parse_size(args.max_bytes))
    stream = cupy.cuda.Stream(non_blocking=True)
    timer = Timer(CupyEvents(stream), reps=args.iters, warmup=args.warmup)
    meta = {
        "bench": "copy_bench", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": name, "sm_count": props["multiProcessorCount"],
        "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "driver": cupy.cuda.runtime.driverGetVersion(), "mode": "eager" if args.eager else "graph",
        "hidden": args.hidden, "itemsize": args.itemsize, "row_bytes": args.hidden * args.itemsize,
        "iters": args.iters, "warmup": args.warmup, "threads": kernels._THREADS,
    }
    print(f"# copy_bench: {name} ({meta['sm_count']} SMs), cupy {cupy.__version__}, CUDA runtime "
          f"{meta['cuda_runtime']}, {meta['mode']} timing, median of {args.iters}")
    print(f"# rows of {args.hidden} x {args.itemsize} B = {meta['row_bytes']} B; pack = local -> "
          "slot 1 of a 2-slot gathered buffer, unpack = back; bandwidth = 2 x bytes / time")
    if args.mode == "quantize":
        return quantize_main(cupy, kernels, args, sizes, timer, meta)
    results, ok_all = [], True
    for bps in bps_list:
        kernels._BLOCKS_PER_SM = bps
        print(f"#\n# grid cap: {bps} blocks/SM x {kernels._THREADS} threads")
        print("\n".join(format_table([], COLUMNS)))
        rows = []
        for size in sizes:
            if size < meta["row_bytes"]:
                continue
            row = run_size(cupy, kernels, size, args, timer, dtype)
            row["blocks_per_sm"] = bps
            rows.append(row)
            print(format_table([row], COLUMNS, header=False)[0], flush=True)
        big = [r for r in rows if r["size"] >= FROM_BYTES]
        pack_avg = statistics.mean(r["pack_pct"] for r in big) if big else float("nan")
        unpack_avg = statistics.mean(r["unpack_pct"] for r in big) if big else float("nan")
        wrong = sum(r["wrong"] for r in rows)
        fast = not big or min(pack_avg, unpack_avg) >= args.threshold
        ok = wrong == 0 and fast
        ok_all &= ok
        print(f"# Wrong values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
        verdict = "no size >= 8 MB" if not big else ("OK" if fast else "FAILED")
        print(f"# Avg bw vs memcpy from {FROM_BYTES >> 20} MB: pack {pack_avg:.1f} %, unpack "
              f"{unpack_avg:.1f} %  (threshold {args.threshold:g} %: {verdict})")
        results.append({"blocks_per_sm": bps, "rows": rows, "pack_avg_pct": pack_avg,
                        "unpack_avg_pct": unpack_avg, "wrong": wrong, "ok": ok})
    kernels._BLOCKS_PER_SM = bps_list[0]
    host_case = Case(cupy, 64, args.hidden, dtype, rotate=False)
    host_us = host_cost_us(cupy, kernels, host_case, stream)
    print(f"# host cost of one copy_rows call (Python wrapper + launch, 64 rows): {host_us:.1f} us")
    meta["host_call_us"] = host_us
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "results": results}, indent=1)
        print(f"# wrote {args.json}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
