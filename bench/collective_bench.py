"""Gather + combine per padding mode on token-count patterns, beside raw NCCL and torch (issue 4).

    mpirun -n 4 python bench/collective_bench.py [--hidden 7168] [--reps 20] [--warmup 3]
        [--patterns decode64,decode256,skew,onehot,random,prefill-mix,idle]
        [--attn-tp2 decode64,skew] [--no-graph] [--no-torch] [--target-us 2000] [--seed 0]
        [--json PATH]

One rank per GPU, bfloat16 rows of ``--hidden`` elements. Counts are tokens per DP replica (D =
T/A replicas; a pattern written for 4 replicas is cycled/truncated to D):

    decode64 [64]*D, decode256 [256]*D            DECODE
    skew [8192,1,1,1]                             EXTEND 8192, the others DECODE 1
    onehot [0,512,0,0]                            one EXTEND replica, the others IDLE
    random                                        EXTEND, seeded uniform 1..2048
    prefill-mix [4096,2048,64,0]                  EXTEND, EXTEND, DECODE, IDLE
    idle [128,0,128,0]                            DECODE / IDLE

With A=1 (``contribution="replicate"``) every pattern runs; with A=2 (``"partial"``) the
``--attn-tp2`` subset. For each pattern, ``DpAttention.gather`` and ``DpAttention.scatter(reduce=
True)`` are timed with the plan forced to MAX_LEN, SUM_LEN and VARLEN over NCCL, VARLEN over the
P2P pull (``P2P``) and the P2P push (``PUSH``; each left out where it cannot run, the push also
on patterns its windows do not hold) and with ``auto`` (transport and policy
``auto``) -- one ``DpAttention`` per variant, each step's plan from its own ``sync``. When auto's
layout and transport equal a forced variant's, that measurement is reused: it is the same sequence
of kernels and collectives. Beside them:

    nccl-raw     CuPy's NCCL binding (cupy.cuda.nccl, no dpgather in between): allGather of D*M/T
                 rows per rank into D*M rows (M = the padded
                 slot) and reduce_scatter of the D*M rows: the padded bytes, no packing.
    torch SUM    (torch importable) SGLang's SUM_LEN recipe with torch.distributed (NCCL):
                 zero the sum-sized buffer, copy own slot, all_reduce; combine = all_reduce, copy
                 own slot (SGLang's choice for extend batches).
    torch MAX    (A=1) pad + all_gather_into_tensor; combine = reduce_scatter_tensor.

Timing (the protocol of ``dpgather.tools.timing.Timer``, shared with the other benches and
``dg.calibrate``): for each operation, ``k`` back-to-back iterations (``k`` makes one repetition
about ``--target-us``; agreed over ranks) on one stream, inputs rotating over a few buffers, between CUDA
events, after ``--warmup`` repetitions; per rank the median of ``--reps`` repetitions divided by
``k``; reported: the maximum over ranks. ``graph`` timings capture the ``k`` iterations into one
CUDA graph (no Python launch cost: the collectives' own time); ``eager`` timings launch them from
Python (what an eager step pays). dpgather and nccl-raw are timed both ways (the table shows graph
numbers, plus the eager total); torch is timed eagerly. A host barrier precedes each repetition.

fp8 (``--fp8-group G``, default 128; ``--fp8-group 0``: off): the forced variants' DpAttentions
are built with ``fp8=Fp8Format(G)`` (their policy and transport are forced, so their plans are
the ones the bf16 gather gets; auto's DpAttention has no fp8, so its choices stay those of bf16
rows) and ``DpAttention.gather_fp8`` is timed beside ``gather`` on the same plans and inputs, by
the same protocol: column ``gather-fp8`` and ``fp8/bf16`` (its time over the bf16 gather's, both
graph or both eager); ``N/A`` where not measured (auto, nccl-raw, torch rows). Checked before
timing: every replica's wire rows equal ``dpgather.kernels.cuda.quantize_rows`` of its expected
rows (the exactness contract, docs/fp8.md), padding rows zero (counted in #wrong).

Checks (#wrong): before timing, each mode's gathered buffer is compared element by element with
the expected rows (inputs are small multiples of 1/8, so bfloat16 sums are exact in any order)
and zero padding, and each mode's combine output with the exact sum over ranks. The torch recipes
are checked the same way (combine: the real rows only).

Columns (nccl-tests style): real(B) = real rows x row bytes; moved(B) = rows of the buffer the
mode moves x row bytes; total = gather + combine; algbw = 2 x real(B) / total (gather and combine
each move the real rows once); busbw = algbw x (T-1)/T (nccl-tests' all-gather factor).

Targets (summary): (a) VARLEN total <= 1.05 x min(MAX_LEN, SUM_LEN) wherever VARLEN moves at
most 70 % of the padded bytes (sum n <= 0.7 D M) and gather + combine move >= 4 MiB in total
(2 x real(B)); (b) auto <= 1.05 x the best
forced variant on every pattern; (c) on skew (A=1) our best mode >= 1.5x faster than torch SUM_LEN
(eager against eager). Rank 0 prints progress, then the tables; ``--json`` writes everything.
"""

import argparse
import datetime
import os
import socket
import sys

import numpy as np

from dpgather.core.files import write_json_atomic
from dpgather.tools.timing import (
    Column,
    CupyEvents,
    Timer,
    TorchEvents,
    algbw_GBps,
    busbw_factor,
    gpus_on_every_rank,
    nccl_columns,
    print_table,
)

MODES = ("max_len", "sum_len", "varlen")
#: Forced variants: the three padding modes over NCCL, and VARLEN over the P2P pull and push
#: (a pattern the push's windows do not hold has no push row).
VARIANTS = MODES + ("p2p", "push")
MODE_NAME = {"max_len": "MAX_LEN", "sum_len": "SUM_LEN", "varlen": "VARLEN", "p2p": "P2P", "push": "PUSH"}
#: The transport of each variant (what its plans must use to be timed as that variant).
TRANSPORT = {"p2p": "p2p", "push": "push"}


def _chosen(plan):
    """A plan's mode, with its P2P transport: ``VARLEN/p2p``, ``VARLEN/push``."""
    return plan.mode.name + ("" if plan.transport == "nccl" else "/" + plan.transport)
ALL_PATTERNS = ("decode64", "decode256", "skew", "onehot", "random", "prefill-mix", "idle")
ROTATE_BYTES = 256 << 20
MAX_ROT = 8
KMAX = 64
FOUR_MIB = 4 << 20


# -- patterns ---------------------------------------------------------------------------------

def pattern_counts(name, D, seed):
    """``[(kind, n)] * D`` with kind one of IDLE/DECODE/EXTEND. A name ``[n0/n1/...]`` (from
    ``--counts``) is that layout, cycled to D: DECODE n, IDLE for 0."""
    def cyc(base):
        return [base[i % len(base)] for i in range(D)]

    if name.startswith("[") and name.endswith("]"):
        return cyc([("DECODE", n) if n else ("IDLE", 0) for n in parse_counts(name[1:-1])])

    if name == "decode64":
        return [("DECODE", 64)] * D
    if name == "decode256":
        return [("DECODE", 256)] * D
    if name == "skew":
        return [("EXTEND", 8192)] + [("DECODE", 1)] * (D - 1)
    if name == "onehot":
        out = [("IDLE", 0)] * D
        out[1 % D] = ("EXTEND", 512)
        return out
    if name == "random":
        rng = np.random.default_rng(seed)
        return [("EXTEND", int(n)) for n in rng.integers(1, 2049, size=D)]
    if name == "prefill-mix":
        return cyc([("EXTEND", 4096), ("EXTEND", 2048), ("DECODE", 64), ("IDLE", 0)])
    if name == "idle":
        return cyc([("DECODE", 128), ("IDLE", 0)])
    raise ValueError(f"unknown pattern {name!r}; expected one of {ALL_PATTERNS}")


def parse_counts(text):
    """``"8192/1"`` -> ``[8192, 1]`` (tokens per replica, >= 0)."""
    try:
        counts = [int(v) for v in text.split("/")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise ValueError(f"counts {text!r}: expected tokens per replica like 8192/1")
    return counts


def make_batch(dg, kind, n):
    if kind == "IDLE" or n == 0:
        return dg.LocalBatch(dg.ForwardMode.IDLE)
    if kind == "EXTEND":
        return dg.LocalBatch(dg.ForwardMode.EXTEND, batch_size=1, extend_tokens=n)
    return dg.LocalBatch(dg.ForwardMode.DECODE, n)


def same_layout(p, q):
    return (p.mode == q.mode and p.transport == q.transport and p.gathered_rows == q.gathered_rows
            and np.array_equal(p.num_tokens, q.num_tokens)
            and np.array_equal(p.slot_rows, q.slot_rows)
            and np.array_equal(p.slot_offsets, q.slot_offsets))


# -- deterministic bf16 data ------------------------------------------------------------------

_GEN_BODY = r"""
    unsigned long long r = (unsigned long long)(i / width), c = (unsigned long long)(i % width);
    unsigned long long z = seed * 0x9E3779B97F4A7C15ULL + (r + 1) * 0xBF58476D1CE4E5B9ULL
                         + (c + 1) * 0x94D049BB133111EBULL;
    z ^= z >> 31; z *= 0xD6E8FEB86659FD93ULL; z ^= z >> 32; z *= 0x9E3779B97F4A7C15ULL; z ^= z >> 29;
    float v = (float)((int)(z % 31ULL) - 15) * 0.125f;
"""


class Gen:
    """Row data: element (r, c) of stream ``seed`` is a multiple of 1/8 in [-15/8, 15/8], so
    bfloat16 sums of up to 16 such values are exact in any order."""

    def __init__(self, cupy):
        self.cupy = cupy
        # raw output + explicit size: the loop size never depends on broadcasting rules
        self._bits = cupy.ElementwiseKernel(
            "uint64 seed, int64 width", "raw uint16 out",
            _GEN_BODY + "out[i] = (unsigned short)(__float_as_uint(v) >> 16);", "dpg_bench_gen_bf16")
        self._float = cupy.ElementwiseKernel(
            "uint64 seed, int64 width", "raw float32 out", _GEN_BODY + "out[i] = v;",
            "dpg_bench_gen_f32")

    def fill(self, a, seed):
        """Fill the C-contiguous uint16 ``[rows, w]`` array ``a`` (bf16 bits)."""
        assert a.flags.c_contiguous and a.dtype.itemsize == 2
        if a.size:
            self._bits(np.uint64(seed), np.int64(a.shape[1]), a, size=a.size)
        return a

    def bf16_sum(self, rows, width, seeds):
        """bf16 bits of the sum of the streams ``seeds`` over ``[rows, width]`` (exact)."""
        cupy = self.cupy
        acc = cupy.zeros((rows, width), dtype=cupy.float32)
        tmp = cupy.empty((rows, width), dtype=cupy.float32)
        for s in seeds:
            if acc.size:
                self._float(np.uint64(s), np.int64(width), tmp, size=tmp.size)
                acc += tmp
        return (acc.view(cupy.uint32) >> 16).astype(cupy.uint16)


def seed_x(pi, d, a):
    return 1_000_003 * (pi + 1) + 1009 * d + a + 1


def seed_y(pi, t, d):
    return 7_777_777 + 1_000_003 * (pi + 1) + 1009 * t + d


# -- raw NCCL (CuPy's binding, no dpgather in between) ---------------------------------------------

class RawNccl:
    """``cupy.cuda.nccl.NcclCommunicator`` over the ranks of ``world`` (one GPU per rank, the
    current device): the padded all-gather / reduce-scatter baseline, bf16, on a given stream."""

    def __init__(self, world):
        from cupy.cuda import nccl

        self.nccl = nccl
        uid = world.bcast(nccl.get_unique_id() if world.Get_rank() == 0 else None, root=0)
        try:
            self.comm = nccl.NcclCommunicator(world.Get_size(), uid, world.Get_rank())
        except TypeError:  # unique id as bytes (CuPy >= 14) vs a tuple of signed bytes (older)
            alt = (tuple(b - 256 if b > 127 else b for b in uid) if isinstance(uid, (bytes, bytearray))
                   else bytes(b & 0xFF for b in uid))
            self.comm = nccl.NcclCommunicator(world.Get_size(), alt, world.Get_rank())
        self.bf16 = getattr(nccl, "NCCL_BFLOAT16", 9)  # ncclBfloat16; old CuPy lacks the name

    def all_gather(self, send, recv, stream):
        """``recv[T * n] <- send[n]`` of every rank (uint16 storage of bf16, C-contiguous)."""
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self.bf16, stream.ptr)

    def reduce_scatter(self, send, recv, stream):
        """``recv[n] <- sum over ranks of send[rank * n:(rank + 1) * n]``."""
        self.comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, self.bf16,
                                self.nccl.NCCL_SUM, stream.ptr)

    def close(self):
        self.comm.destroy()


# -- torch.distributed (optional) ---------------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_setup(MPI, world, device_id, want):
    """``(torch, dist, note)``; torch is None (on every rank) when it cannot run here."""
    note = None
    torch = dist = None
    if want:
        try:
            import torch
            import torch.distributed as dist

            if not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()):
                note = "torch has no CUDA/NCCL here"
        except Exception as e:  # noqa: BLE001
            note = f"torch not importable ({type(e).__name__}: {e})"
    else:
        note = "--no-torch"
    notes = [n for n in world.allgather(note) if n]
    if notes:
        return None, None, notes[0]
    rank, size = world.Get_rank(), world.Get_size()
    port = world.bcast(_free_port() if rank == 0 else None, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(device_id))
    err = None
    try:
        torch.cuda.set_device(device_id)
        dev = torch.device("cuda", device_id)
        kw = dict(backend="nccl", init_method="env://", rank=rank, world_size=size,
                  timeout=datetime.timedelta(seconds=120))
        try:
            dist.init_process_group(device_id=dev, **kw)
        except TypeError:  # older torch: no device_id
            dist.init_process_group(**kw)
        t = torch.ones(8, device=dev)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        if float(t[0].item()) != size:
            err = f"torch all_reduce self-check gave {float(t[0].item())}, expected {size}"
    except Exception as e:  # noqa: BLE001
        err = f"torch.distributed init failed ({type(e).__name__}: {e})"
    errs = [e for e in world.allgather(err) if e]
    if errs:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        return None, None, errs[0]
    try:
        v = torch.cuda.nccl.version()
        v = ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    except Exception:  # noqa: BLE001
        v = "?"
    return torch, dist, f"torch {torch.__version__}, NCCL {v}"


# -- one pattern ---------------------------------------------------------------------------------

class Ctx:
    """Everything the per-pattern code shares."""


def run_pattern(c, pi, pname, A):
    """Measure every mode of one pattern at attn_tp ``A``; returns the result dict."""
    cupy, dg = c.cupy, c.dg
    dps = c.dps[A]
    T, rank = c.T, c.rank
    D = T // A
    d, a = rank // A, rank % A
    H, R = c.hidden, c.hidden * 2
    partial = A > 1
    contrib = "partial" if partial else "replicate"
    spec = pattern_counts(pname, D, c.seed + pi)
    batches = [make_batch(dg, k, n) for k, n in spec]
    counts = [n for _, n in spec]
    with c.stream:  # the plans' descriptor uploads go on the bench stream
        plans = {v: dp.sync(batches[d]) for v, dp in dps.items()}
    auto = plans["auto"]
    plans["sglang"] = dg.Planner(dps["auto"].topology, policy="sglang",
                                 cost=dps["auto"].planner.cost).plan_batches(batches)
    variants = [v for v in c.variants if v in dps and plans[v].transport == TRANSPORT.get(v, "nccl")]
    pmax = plans["max_len"]
    M = int(pmax.slot_rows[0])
    S = int(sum(counts))
    n_own = counts[d]
    real_b, padded_b = S * R, D * M * R
    res = {"pattern": pname, "attn_tp": A, "dp": D, "counts": counts, "contribution": contrib,
           "real_bytes": real_b, "padded_bytes": padded_b, "auto_mode": _chosen(auto),
           "sglang_mode": plans["sglang"].mode.name,
           "predicted_us": dict(zip(("MAX_LEN", "SUM_LEN", "VARLEN"), auto.predicted_us)),
           "rows": []}
    c.say(f"# [{pname} A={A}] counts {counts}: auto -> {res['auto_mode']}, sglang -> "
          f"{plans['sglang'].mode.name}, predicted MAX/SUM/V "
          + "/".join(f"{t:.0f}" for t in auto.predicted_us) + " us")

    # buffers: inputs X (own rows), combine inputs Y (the largest gathered layout)
    ymax = max(int(plans[m].gathered_rows) for m in MODES)
    per_iter = max(ymax * R, 1)
    nrot = max(2, min(MAX_ROT, ROTATE_BYTES // per_iter))
    xr = max(n_own, 1)
    X = cupy.empty((nrot, xr, H), dtype=cupy.uint16)
    for j in range(nrot):
        c.gen.fill(X[j], seed_x(pi, d, a if partial else 0) + 7919 * j)
    Y = cupy.empty((nrot, max(ymax, 1), H), dtype=cupy.uint16)
    for j in range(nrot):
        c.gen.fill(Y[j], seed_y(pi, rank, d) + 7919 * j)
    xs = [X[j, :n_own] for j in range(nrot)]

    # expected rows: gathered slot d (all replicas) and this rank's combine output
    exp_x = []
    for dd in range(D):
        seeds = [seed_x(pi, dd, aa) for aa in range(A)] if partial else [seed_x(pi, dd, 0)]
        exp_x.append(c.gen.bf16_sum(counts[dd], H, seeds))
    exp_y = c.gen.bf16_sum(n_own, H, [seed_y(pi, t, d) for t in range(T)])
    cupy.cuda.Device().synchronize()  # generated on the null stream; the bench stream is non-blocking

    def check_gather(G, p):
        wrong = 0 if int(G.shape[0]) == int(p.gathered_rows) else 1
        for dd in range(D):
            o, n, sr = int(p.slot_offsets[dd]), counts[dd], int(p.slot_rows[dd])
            if n:
                wrong += int(cupy.count_nonzero(G[o:o + n] != exp_x[dd]))
            if sr > n:
                wrong += int(cupy.count_nonzero(G[o + n:o + sr]))
        return wrong

    def make_yv(p):
        Yv = cupy.empty((max(int(p.gathered_rows), 1), H), dtype=cupy.uint16)
        for dd in range(D):
            o, sr = int(p.slot_offsets[dd]), int(p.slot_rows[dd])
            c.gen.fill(Yv[o:o + sr], seed_y(pi, rank, dd))
        return Yv

    def check_combine(y, zero_tail=True):
        wrong = 0
        if n_own:
            wrong += int(cupy.count_nonzero(y[:n_own] != exp_y))
        if zero_tail and y.shape[0] > n_own:
            wrong += int(cupy.count_nonzero(y[n_own:]))
        return wrong

    exp_q = []
    if c.fp8_group:
        W = H + 4 * (H // c.fp8_group)
        for dd in range(D):
            q = cupy.zeros((counts[dd], W), dtype=cupy.uint8)
            if counts[dd]:
                desc = cupy.asarray(np.array([0, counts[dd], 0, counts[dd]], np.int64))
                c.kernels.quantize_rows(exp_x[dd], q, desc, 0, c.fp8_group, False, "bfloat16")
            exp_q.append(q)
        cupy.cuda.Device().synchronize()

    def check_fp8(wire, p):
        """Wrong bytes of a gather_fp8's wire rows: each replica's quantized rows, zero padding."""
        wrong = 0 if int(wire.shape[0]) == int(p.gathered_rows) else 1
        for dd in range(D):
            o, n, sr = int(p.slot_offsets[dd]), counts[dd], int(p.slot_rows[dd])
            if n:
                wrong += int(cupy.count_nonzero(wire[o:o + n] != exp_q[dd]))
            if sr > n:
                wrong += int(cupy.count_nonzero(wire[o + n:o + sr]))
        return wrong

    def agree_wrong(w):
        return int(c.world.allreduce(int(w), op=c.MPI.SUM))

    stream = c.stream
    # warm every variant once (arena high-water marks, NCCL channels), then verify + time each
    with stream:
        for m in variants + ["auto"]:
            p, dp = plans[m], dps[m]
            dp.scatter(Y[0, :p.gathered_rows], p, reduce=True)
            dp.gather(xs[0], p, contribution=contrib)
            if m in c.fp8_variants:
                dp.gather_fp8(xs[0], p, contribution=contrib)
        stream.synchronize()

    measured = {}
    for m in variants + ["auto"]:
        p, dp = plans[m], dps[m]
        reuse = None
        if m == "auto":
            reuse = next((f for f in variants if same_layout(p, plans[f])), None)
        if reuse is not None:
            row = dict(measured[reuse])
            row.update(mode="auto", chosen=p.mode.name, reused=reuse)
            res["rows"].append(row)
            continue
        with stream:
            G = dp.gather(xs[0], p, contribution=contrib)
            wg = check_gather(G, p)
            Yv = make_yv(p)
            y = dp.scatter(Yv, p, reduce=True)
            wc = check_combine(y)
            stream.synchronize()
            del Yv
        wf = 0
        if m in c.fp8_variants:
            with stream:
                wf = check_fp8(dp.gather_fp8(xs[0], p, contribution=contrib).wire, p)
                stream.synchronize()
        wrong = agree_wrong(wg + wc + wf)
        rows = int(p.gathered_rows)
        tg = c.timer.measure(lambda j, dp=dp, p=p: dp.gather(xs[j % nrot], p, contribution=contrib))
        tf = (c.timer.measure(lambda j, dp=dp, p=p: dp.gather_fp8(xs[j % nrot], p, contribution=contrib))
              if m in c.fp8_variants else None)
        tc = c.timer.measure(lambda j, dp=dp, p=p: dp.scatter(Y[j % nrot, :rows], p, reduce=True))
        row = {"mode": m, "chosen": _chosen(p), "how": "graph",
               "moved_bytes": rows * R, "gather": tg, "combine": tc, "gather_fp8": tf, "wrong": wrong,
               "wrong_gather": agree_wrong(wg), "wrong_combine": agree_wrong(wc), "wrong_fp8": agree_wrong(wf)}
        measured[m] = row
        res["rows"].append(row)
        c.say(f"#   {MODE_NAME.get(m, m):8s} gather {_fmt_t(tg)} combine {_fmt_t(tc)} #wrong {wrong}"
              + (f"; gather_fp8 {_fmt_t(tf)}" if tf else ""))

    # raw NCCL over the padded bytes: all-gather of D*M/T rows per rank, reduce-scatter of D*M
    if M > 0:
        per = D * M // T
        with stream:
            send = cupy.empty((nrot, per, H), dtype=cupy.uint16)
            for j in range(nrot):
                c.gen.fill(send[j], seed_x(pi, d, a) + 104729 * j)
            recv = cupy.empty((D * M, H), dtype=cupy.uint16)
            out = cupy.empty((per, H), dtype=cupy.uint16)
            stream.synchronize()
        raw = c.raw
        tg = c.timer.measure(lambda j: raw.all_gather(send[j % nrot], recv, stream))
        tc = c.timer.measure(lambda j: raw.reduce_scatter(Y[j % nrot, :D * M], out, stream))
        res["rows"].append({"mode": "nccl-raw", "chosen": "AG/RS(pad)", "how": "graph",
                            "moved_bytes": D * M * R, "gather": tg, "combine": tc, "wrong": None})
        c.say(f"#   nccl-raw gather {_fmt_t(tg)} combine {_fmt_t(tc)}")
        del send, recv, out

    # torch.distributed: SGLang's recipes
    if c.torch is not None:
        res["rows"].extend(torch_rows(c, pi, plans, counts, X, Y, nrot, n_own, A, partial,
                                      check_gather, make_yv, check_combine, agree_wrong))
    return res


def torch_rows(c, pi, plans, counts, X, Y, nrot, n_own, A, partial, check_gather, make_yv,
               check_combine, agree_wrong):
    torch, dist, cupy = c.torch, c.dist, c.cupy
    H, R, T, rank = c.hidden, c.hidden * 2, c.T, c.rank
    d, a = rank // A, rank % A
    out_rows = []
    c.stream.synchronize()
    cupy.cuda.Device().synchronize()

    def tview(arr):  # zero-copy torch bf16 view of a CuPy uint16 array
        return torch.from_dlpack(arr.view(cupy.int16)).view(torch.bfloat16)

    def cview(t):
        return cupy.from_dlpack(t.view(torch.int16)).view(cupy.uint16)

    xt = [tview(X[j, :max(n_own, 1)])[:n_own] for j in range(nrot)]
    # SUM_LEN (SGLang for extend batches): zeroed sum buffer, own slot, all_reduce
    ps = plans["sum_len"]
    S = int(ps.gathered_rows)
    o = int(ps.slot_offsets[d])
    writes = partial or a == 0
    buf = torch.empty((max(S, 1), H), dtype=torch.bfloat16, device="cuda")[:S]

    def sum_gather(j):
        buf.zero_()
        if writes and n_own:
            buf[o:o + n_own].copy_(xt[j % nrot])
        dist.all_reduce(buf)

    yt = [tview(Y[j, :max(S, 1)])[:S] for j in range(nrot)]
    local = torch.empty((max(n_own, 1), H), dtype=torch.bfloat16, device="cuda")[:n_own]

    def sum_combine(j):
        g = yt[j % nrot]
        dist.all_reduce(g)
        if n_own:
            local.copy_(g[o:o + n_own])

    sum_gather(0)
    torch.cuda.synchronize()
    wg = check_gather(cview(buf), ps) if S else 0
    Yv = make_yv(ps)
    cupy.cuda.Device().synchronize()
    Yvt = tview(Yv)[:S]
    dist.all_reduce(Yvt)
    if n_own:
        local.copy_(Yvt[o:o + n_own])
    torch.cuda.synchronize()
    wc = check_combine(cview(local), zero_tail=False) if n_own else 0
    del Yv, Yvt
    wrong = agree_wrong(wg + wc)
    tg = c.ttimer.measure(sum_gather)
    tc = c.ttimer.measure(sum_combine)
    out_rows.append({"mode": "torch-sum", "chosen": "SUM_LEN", "how": "eager", "moved_bytes": S * R,
                     "gather": tg, "combine": tc, "wrong": wrong})
    c.say(f"#   torch SUM_LEN gather {_fmt_t(tg)} combine {_fmt_t(tc)} #wrong {wrong}")

    if A == 1:
        pm = plans["max_len"]
        M = int(pm.slot_rows[0])
        D = T // A
        send = torch.empty((max(M, 1), H), dtype=torch.bfloat16, device="cuda")[:M]
        G = torch.empty((max(D * M, 1), H), dtype=torch.bfloat16, device="cuda")[:D * M]
        out = torch.empty((max(M, 1), H), dtype=torch.bfloat16, device="cuda")[:M]
        ym = [tview(Y[j, :max(D * M, 1)])[:D * M] for j in range(nrot)]

        def max_gather(j):
            if n_own:
                send[:n_own].copy_(xt[j % nrot])
            if M > n_own:
                send[n_own:].zero_()
            dist.all_gather_into_tensor(G, send)

        def max_combine(j):
            dist.reduce_scatter_tensor(out, ym[j % nrot])

        if M > 0:
            max_gather(0)
            torch.cuda.synchronize()
            wg = check_gather(cview(G), pm)
            Yv = make_yv(pm)
            cupy.cuda.Device().synchronize()
            dist.reduce_scatter_tensor(out, tview(Yv)[:D * M])
            torch.cuda.synchronize()
            wc = check_combine(cview(out), zero_tail=False) if n_own else 0
            del Yv
            wrong = agree_wrong(wg + wc)
            tg = c.ttimer.measure(max_gather)
            tc = c.ttimer.measure(max_combine)
            out_rows.append({"mode": "torch-max", "chosen": "MAX_LEN", "how": "eager",
                             "moved_bytes": D * M * R, "gather": tg, "combine": tc, "wrong": wrong})
            c.say(f"#   torch MAX_LEN gather {_fmt_t(tg)} combine {_fmt_t(tc)} #wrong {wrong}")
    torch.cuda.synchronize()
    return out_rows


# -- reporting ----------------------------------------------------------------------------------

def _fmt_t(t):
    g = t.get("graph")
    return f"{g:.1f} us (graph) / {t['eager']:.1f} us (eager), k={t['k']}" if g is not None else \
        f"{t['eager']:.1f} us (eager), k={t['k']}"


def primary(t):
    return t["graph"] if t.get("graph") is not None else t["eager"]


def finish_row(row, res, T):
    """Fill a row's times and bandwidths: gather + combine move the real rows once each, so
    algbw = 2 x real(B) / total and busbw uses the all-gather / reduce-scatter factor (T-1)/T."""
    g, cm = row["gather"], row["combine"]
    row["how"] = "graph" if (g.get("graph") is not None and cm.get("graph") is not None) else "eager"
    row["gather_us"] = primary(g) if row["how"] == "graph" else g["eager"]
    row["combine_us"] = primary(cm) if row["how"] == "graph" else cm["eager"]
    row["total_us"] = row["gather_us"] + row["combine_us"]
    row["eager_total_us"] = g["eager"] + cm["eager"]
    f = row.get("gather_fp8")
    if f is not None:  # like with like: both graph-timed, else both eager
        both_graph = row["how"] == "graph" and f.get("graph") is not None
        row["gather_fp8_us"] = f["graph"] if both_graph else f["eager"]
        row["fp8_ratio"] = row["gather_fp8_us"] / (row["gather_us"] if both_graph else g["eager"])
    row["algbw_GBps"] = algbw_GBps(2 * res["real_bytes"], row["total_us"])
    row["busbw_GBps"] = row["algbw_GBps"] * busbw_factor("all_gather", T)
    return row


def label(row):
    m = row["mode"]
    if m == "auto":
        return f"auto->{row['chosen']}"
    if m in MODE_NAME:
        return MODE_NAME[m]
    return {"nccl-raw": "nccl-raw", "torch-sum": "torch-SUM", "torch-max": "torch-MAX"}.get(m, m)


#: The result table: nccl-tests' columns (size = real bytes, time = gather + combine) around
#: the bench's own.
COLUMNS = nccl_columns(
    lead=(Column("pattern", "pattern", width=12), Column("attn_tp", "A", "", "d"),
          Column("label", "mode", width=15), Column("how", "how")),
    size="real", size_key="real_bytes",
    mid=(Column("moved_bytes", "moved", "(B)", "d"), Column("gather_us", "gather", "(us)", ".1f"),
         Column("gather_fp8_us", "gather-fp8", "(us)", ".1f"), Column("fp8_ratio", "fp8/bf16", "(x)", ".2f"),
         Column("combine_us", "combine", "(us)", ".1f")),
    time="total", time_key="total_us", time_fmt=".1f", bw_fmt=".1f",
    tail=(Column("eager_total_us", "eager total", "(us)", ".1f"),))


def table_rows(results):
    """One flat dict per measured row, for :data:`COLUMNS`."""
    return [{"pattern": res["pattern"], "attn_tp": res["attn_tp"], "real_bytes": res["real_bytes"],
             **row, "label": label(row)} for res in results for row in res["rows"]]


def targets(results):
    """The issue's three checks; returns (lines, dict)."""
    lines, out = [], {"a": [], "b": [], "c": []}
    for res in results:
        by = {r["mode"]: r for r in res["rows"]}
        fixed = [by[m] for m in MODES if m in by]
        if len(fixed) < 3:
            continue
        tot = {m: by[m]["total_us"] for m in MODES}
        ratio_pad = res["real_bytes"] / res["padded_bytes"] if res["padded_bytes"] else 1.0
        tag = f"{res['pattern']} A={res['attn_tp']}"
        if ratio_pad <= 0.7 and 2 * res["real_bytes"] >= FOUR_MIB:
            ref = min(tot["max_len"], tot["sum_len"])
            r = tot["varlen"] / ref
            ok = r <= 1.05
            out["a"].append({"pattern": tag, "varlen_us": tot["varlen"], "best_padded_us": ref,
                             "ratio": r, "ok": ok})
            lines.append(f"# (a) {tag:18s} VARLEN {tot['varlen']:9.1f} us vs best of MAX/SUM {ref:9.1f} us"
                         f" = {r:5.3f}x (moves {100 * ratio_pad:4.1f} % of padded)  "
                         f"{'OK' if ok else 'FAILED'}")
        else:
            why = (f"moves {100 * ratio_pad:.0f} % of padded" if ratio_pad > 0.7
                   else f"gather + combine move {2 * res['real_bytes']} B < 4 MiB")
            lines.append(f"# (a) {tag:18s} not applicable ({why})")
        if "auto" in by:
            tot.update({v: by[v]["total_us"] for v in VARIANTS if v in by})
            best_m = min((v for v in VARIANTS if v in tot), key=lambda m: tot[m])
            r = by["auto"]["total_us"] / tot[best_m]
            ok = r <= 1.05
            out["b"].append({"pattern": tag, "auto_mode": res["auto_mode"], "auto_us": by["auto"]["total_us"],
                             "best_mode": MODE_NAME[best_m], "best_us": tot[best_m], "ratio": r, "ok": ok})
            lines.append(f"# (b) {tag:18s} auto->{res['auto_mode']:8s} {by['auto']['total_us']:9.1f} us, best "
                         f"{MODE_NAME[best_m]:8s} {tot[best_m]:9.1f} us = {r:5.3f}x  {'OK' if ok else 'FAILED'}")
        if res["pattern"] == "skew" and res["attn_tp"] == 1:
            ts = by.get("torch-sum")
            if ts is None:
                lines.append("# (c) skew: torch recipe not measured (torch unavailable)")
            else:
                best_e = min(MODES, key=lambda m: by[m]["eager_total_us"])
                sp = ts["eager_total_us"] / by[best_e]["eager_total_us"]
                best_g = min(MODES, key=lambda m: tot[m])
                sp_g = ts["eager_total_us"] / tot[best_g]
                ok = sp >= 1.5
                out["c"].append({"torch_sum_us": ts["eager_total_us"], "best_mode": MODE_NAME[best_e],
                                 "best_eager_us": by[best_e]["eager_total_us"], "speedup": sp,
                                 "best_graph_us": tot[best_g], "speedup_vs_graph": sp_g, "ok": ok})
                lines.append(f"# (c) skew: torch SUM_LEN {ts['eager_total_us']:.1f} us vs our best "
                             f"{MODE_NAME[best_e]} {by[best_e]['eager_total_us']:.1f} us (eager) = "
                             f"{sp:.2f}x (>= 1.5x: {'OK' if ok else 'FAILED'}); vs graph-timed "
                             f"{MODE_NAME[best_g]} {tot[best_g]:.1f} us = {sp_g:.2f}x")
    return lines, out


# -- main ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="run under mpirun/mpiexec with one rank per GPU")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (median; >= 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--target-us", type=float, default=2000.0,
                    help="aim of one repetition (sets the iterations per repetition)")
    ap.add_argument("--patterns", default=",".join(ALL_PATTERNS))
    ap.add_argument("--counts", default="", metavar="N/N/..;..",
                    help="extra layouts, ';'-separated tokens per replica (e.g. '512/0;8192/1'), "
                         "each run as a pattern named [512/0]")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"forced variants to time (auto always runs); default {','.join(VARIANTS)}")
    ap.add_argument("--attn-tp2", default="decode64,skew",
                    help="patterns also run with attn_tp_size 2 (partial contribution); '' for none")
    ap.add_argument("--no-graph", action="store_true", help="eager timing only")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--fp8-group", type=int, default=128,
                    help="also time gather_fp8 with this fp8 group size on the forced variants; 0: off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="DpAttention/NCCL timeout_s")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.reps < 20:
        ap.error("--reps must be >= 20 (median of at least 20 samples)")
    pats = [p for p in args.patterns.split(",") if p]
    pats2 = [p for p in args.attn_tp2.split(",") if p]
    for p in pats + pats2:
        if p not in ALL_PATTERNS:
            ap.error(f"unknown pattern {p!r}; expected some of {','.join(ALL_PATTERNS)}")
    for text in (t for t in args.counts.split(";") if t.strip()):
        try:
            pats.append(f"[{'/'.join(map(str, parse_counts(text.strip())))}]")
        except ValueError as e:
            ap.error(f"--counts: {e}")
    if args.fp8_group < 0 or (args.fp8_group and (args.hidden % args.fp8_group or args.hidden % 4)):
        ap.error(f"--fp8-group: 0 (off) or a group size dividing --hidden {args.hidden} (a multiple of 4); "
                 f"got {args.fp8_group}")
    variants = tuple(v for v in args.variants.split(",") if v)
    if not set(variants) <= set(VARIANTS) or not set(MODES) & set(variants):
        ap.error(f"--variants: some of {','.join(VARIANTS)}, at least one NCCL mode; got {args.variants!r}")

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, T = world.Get_rank(), world.Get_size()
    if not gpus_on_every_rank(world, "collective_bench"):
        return 2

    import cupy

    import dpgather as dg
    from cupy.cuda import nccl

    c = Ctx()
    c.cupy, c.dg, c.MPI, c.world, c.rank, c.T = cupy, dg, MPI, world, rank, T
    c.hidden, c.seed, c.variants = args.hidden, args.seed, variants
    c.fp8_group = args.fp8_group
    fp8 = dg.Fp8Format(group_size=args.fp8_group) if args.fp8_group else None
    c.say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if not (pats2 and T % 2 == 0 and T >= 4):
        pats2 = []
    # one DpAttention per variant (a plan belongs to the DpAttention whose sync made it); the
    # P2P windows hold the largest pattern, so P2P and auto may pick P2P on every pattern
    cap = max(n for p in pats + pats2 for _, n in pattern_counts(p, T, args.seed)) or 1
    cap = max(cap, 2048)  # the random pattern's bound at any seed
    c.dps = {}
    for A in (1, 2) if pats2 else (1,):
        c.dps[A] = {}
        for v in VARIANTS + ("auto",):
            policy = {"p2p": "varlen", "push": "varlen", "auto": "auto"}.get(v, v)
            transport = {**TRANSPORT, "auto": "auto"}.get(v, "nccl")
            try:
                c.dps[A][v] = dg.DpAttention(world, attn_tp_size=A, hidden_size=args.hidden, dtype="bfloat16",
                                             backend="cuda", policy=policy, transport=transport,
                                             max_tokens_per_rank=cap, timeout_s=args.timeout,
                                             fp8=None if v == "auto" else fp8)
            except dg.DpGatherError as e:  # the same outcome on every rank
                if v in MODES + ("auto",):
                    raise
                c.say(f"# variant {v} A={A}: unavailable ({e})")
    c.raw = RawNccl(world)
    from dpgather.kernels import _cuda as _kernels

    _kernels.warm()  # load the copy kernels before any capture
    c.kernels = _kernels
    c.fp8_variants = set(VARIANTS) if fp8 else set()
    dev = cupy.cuda.Device().id
    c.stream = cupy.cuda.Stream(non_blocking=True)
    c.gen = Gen(cupy)
    c.timer = Timer(CupyEvents(c.stream), comm=world, reps=args.reps, warmup=args.warmup,
                    target_us=args.target_us, kmax=KMAX, graph=not args.no_graph)
    c.torch, c.dist, torch_note = torch_setup(MPI, world, dev, not args.no_torch)
    c.ttimer = (Timer(TorchEvents(c.torch), comm=world, reps=args.reps, warmup=args.warmup,
                      target_us=args.target_us, kmax=KMAX) if c.torch else None)
    props = cupy.cuda.runtime.getDeviceProperties(dev)
    meta = {
        "bench": "collective_bench", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "ranks": T, "hidden": args.hidden, "dtype": "bfloat16", "row_bytes": 2 * args.hidden,
        "nccl": int(nccl.get_version()), "cupy": cupy.__version__, "reps": args.reps,
        "warmup": args.warmup, "target_us": args.target_us, "torch": torch_note,
        "cost_model": dict(c.dps[1]["auto"].planner.cost.to_dict()), "seed": args.seed,
        "fp8_group": args.fp8_group,
    }
    c.say(f"# collective_bench: {T} ranks on {meta['device']}, NCCL {meta['nccl']}, hidden "
          f"{args.hidden} bf16 ({2 * args.hidden} B rows), median of {args.reps}; torch: {torch_note}")

    results = []
    jobs = [(p, 1) for p in pats] + [(p, 2) for p in pats2]
    for pi, (pname, A) in enumerate(jobs):
        res = run_pattern(c, (ALL_PATTERNS.index(pname) if pname in ALL_PATTERNS else 10 + pi) + 100 * A,
                          pname, A)
        cupy.cuda.Device().synchronize()
        cupy.get_default_memory_pool().free_all_blocks()  # the pattern's buffers are gone
        for row in res["rows"]:
            finish_row(row, res, T)
        results.append(res)

    meta["graph"] = (not args.no_graph) and c.timer.graph_error is None
    meta["graph_error"] = c.timer.graph_error
    # teardown: graphs are gone (each was deleted after timing); torch, raw comm, dp
    c.stream.synchronize()
    if c.torch is not None:
        try:
            c.torch.cuda.synchronize()
            c.dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    c.raw.close()
    for group in c.dps.values():
        for dp in group.values():
            dp.close()

    tlines, tdict = targets(results)
    wrong_total = sum(r["wrong"] or 0 for res in results for r in res["rows"] if r["mode"] != "auto")
    if rank == 0:
        print("#")
        print(f"# collective_bench results: {T} ranks, {meta['device']}, NCCL {meta['nccl']}; "
              f"timing: {'graph (eager total beside)' if meta['graph'] else 'eager'}"
              + (f"; graph capture failed: {c.timer.graph_error}" if c.timer.graph_error else ""))
        print("# algbw = 2 x real(B) / total; busbw = algbw x (T-1)/T; auto rows reuse the measurement "
              "of the forced mode whose layout they share")
        print_table(table_rows(results), COLUMNS)
        print("#")
        print(f"# {'pattern':>12} {'A':>2} {'counts':>28} {'auto':>8} {'sglang':>8} "
              f"{'pred MAX/SUM/V (us)':>22} {'meas MAX/SUM/V (us)':>22}")
        for res in results:
            by = {r["mode"]: r for r in res["rows"]}
            pred = "/".join(f"{res['predicted_us'][k]:.0f}" for k in ("MAX_LEN", "SUM_LEN", "VARLEN"))
            meas = "/".join(f"{by[m]['total_us']:.0f}" for m in MODES if m in by)
            print(f"# {res['pattern']:>12} {res['attn_tp']:>2} {str(res['counts']):>28} "
                  f"{res['auto_mode']:>8} {res['sglang_mode']:>8} {pred:>22} {meas:>22}")
        print("#")
        print("# Targets")
        for line in tlines:
            print(line)
        all_ok = all(x["ok"] for k in ("a", "b", "c") for x in tdict[k])
        print(f"# Wrong values : {wrong_total} {'OK' if wrong_total == 0 else 'FAILED'}")
        print(f"# Targets      : {'OK' if all_ok else 'FAILED'}")
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "results": results, "targets": tdict, "wrong": wrong_total},
                              indent=1, default=_json_default)
            print(f"# wrote {args.json}")
    return 0 if wrong_total == 0 else 1


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
