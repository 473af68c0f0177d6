"""The P2P transport's kernel: loader and launcher for ``kernels/p2p.cu``, descriptors, reference.

docs/p2p.md is the specification. This module holds everything about one ``p2p_pull``
collective that does not need a communicator:

- the window layout (:func:`window_layout`) and the error codes (:data:`ERR_TIMEOUT`, ...);
- the descriptor: :func:`make_desc` from explicit records, and the data plane's shapes
  :func:`gather_desc` (replicate / partial) and :func:`combine_desc`;
- :func:`p2p_pull_ref`, the pure-NumPy reference: every rank's output of one collective
  from every rank's input, row by row (the tests' oracle for both transports);
- the CUDA side: :data:`NAME_EXPRESSIONS`, :func:`warm`, :func:`grid_size` and
  :func:`launch`, used by :class:`dpgather.dist.p2p.CudaP2P`.

Descriptor (int64; every entry in rows; ``row_bytes`` is a kernel argument)::

    desc[off:]  = [sig, n_pack, n_jobs, 0]
                + n_pack x (in_row, rows, src_row)
                + n_jobs x (dst_row, cnt, span, src_row, first, count, stride)

Importing this module never imports CuPy (nor mpi4py, Numba or ml_dtypes); the CUDA
functions raise :class:`~dpgather.core.errors.BackendUnavailable` without CuPy or a GPU.
"""

from __future__ import annotations

import os
import re
import zlib
from typing import NamedTuple

import numpy as np

from dpgather.core.errors import BackendUnavailable, InputError

from ._cuda import COPY_CTYPES, CudaSource, sm_count, vector_bytes

__all__ = [
    "ELEM_CTYPES",
    "ERR_OK",
    "ERR_SIGNATURE",
    "ERR_TIMEOUT",
    "ERROR_NAMES",
    "HEADER_WORDS",
    "ITEMSIZE",
    "JOB_WORDS",
    "KERNEL_PARAMS",
    "MAX_RANKS",
    "NAME_EXPRESSIONS",
    "PACK_WORDS",
    "WindowLayout",
    "combine_desc",
    "desc_words",
    "gather_desc",
    "decode_desc",
    "grid_size",
    "kernel_args",
    "kernel_name",
    "kernel_source",
    "launch",
    "PULL",
    "make_desc",
    "p2p_pull_ref",
    "pick_vector",
    "round_capacity",
    "signature",
    "warm",
    "window_layout",
]

#: Logical dtype -> C++ element type of ``p2p_pull<E, V>`` (the reduction arithmetic).
ELEM_CTYPES = {
    "float32": "float",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "int32": "int",
    "int64": "long long",
    "uint8": "unsigned char",
}
#: Logical dtype -> element size in bytes.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "uint8": 1}

#: Every specialisation compiled into the module: each element type with each vector at
#: least as wide as the element (tests/test_cuda_compile.py compiles the same list).
NAME_EXPRESSIONS = tuple(
    f"p2p_pull<{e}, {v}>"
    for name, e in ELEM_CTYPES.items()
    for width, v in COPY_CTYPES.items()
    if width >= ITEMSIZE[name]
)

#: NVRTC options; CuPy adds the CUDA include directory (cuda_fp16.h, cuda_bf16.h) itself.
COMPILE_OPTIONS = ("-std=c++17",)
#: Tuning switches of p2p.cu for experiments, ``NAME=VALUE`` pairs separated by commas, names
#: starting with ``DPG_P2P_`` (e.g. ``DPG_P2P_FLAG_FENCE=0,DPG_P2P_RELAXED_POLL=1``).
_DEFINES_VAR = "DPGATHER_P2P_DEFINES"


def compile_options():
    """:data:`COMPILE_OPTIONS` plus ``-D`` options from ``DPGATHER_P2P_DEFINES``."""
    extra = []
    for item in os.environ.get(_DEFINES_VAR, "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        if not re.fullmatch(r"DPG_P2P_[A-Z0-9_]+", name) or not re.fullmatch(r"-?[0-9]+", value or "1"):
            raise InputError(f"{_DEFINES_VAR}: expected NAME=INT pairs with names DPG_P2P_*, got {item!r}")
        extra.append(f"-D{name}={value or '1'}")
    return COMPILE_OPTIONS + tuple(extra)

#: Error codes in the device copy ``state.err`` and the host error word.
ERR_OK = 0
ERR_TIMEOUT = 1  # a wait outlived timeout_s: a peer did not enter the collective in time
ERR_SIGNATURE = 2  # a peer entered the same epoch with a different signature
ERROR_NAMES = {
    ERR_OK: "ok",
    ERR_TIMEOUT: "timeout: a peer did not reach the collective within timeout_s",
    ERR_SIGNATURE: "signature mismatch: the ranks issued different collectives",
}

#: Descriptor record sizes in int64 words.
HEADER_WORDS, PACK_WORDS, JOB_WORDS = 4, 3, 7
#: Ranks of one transport: the kernel polls with one thread per rank of a 256-thread block.
MAX_RANKS = 256

_SOURCE_NAME = "p2p.cu"
_THREADS = 256  # == dpg_p2p::kThreads
_ALIGN = 256  # data_off and cap_bytes alignment: every src buffer starts 256-byte aligned
_INDEX_MAX = 2**31 - 1  # first/stride clamp (== dpg_p2p::kIndexMax)
_BYTES_PER_BLOCK = _THREADS * 16 * 4  # one 16-byte reduce tile: the grid sizing unit
_MAX_BLOCKS_VAR = "DPGATHER_P2P_MAX_BLOCKS"


# ---------------------------------------------------------------------------- layout

class WindowLayout(NamedTuple):
    """Byte offsets inside one rank's window (identical on every rank).

    Attributes:
        flag_off: ``flag[2][T]`` uint64, ``(epoch << 32) | sig`` stored by peer ``t``.
        state_off: ``state[4]`` uint64: ``epoch, arrive, depart, err`` (this rank only).
        data_off: ``src[0]``; ``src[1]`` at ``data_off + cap_bytes``.
        cap_bytes: bytes of one ``src`` buffer (a multiple of 256).
        window_bytes: total bytes of the window.
    """

    flag_off: int
    state_off: int
    data_off: int
    cap_bytes: int
    window_bytes: int


def round_capacity(capacity_bytes) -> int:
    """``capacity_bytes`` rounded up to a multiple of 256 (so ``src[1]`` stays aligned)."""
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, (int, np.integer)):
        raise InputError(f"capacity_bytes: expected an int, got {capacity_bytes!r}")
    cap = int(capacity_bytes)
    if cap < 1:
        raise InputError(f"capacity_bytes: expected >= 1 byte, got {cap}")
    return -(-cap // _ALIGN) * _ALIGN


def window_layout(nranks: int, capacity_bytes: int) -> WindowLayout:
    """The window of a transport of ``nranks`` ranks with ``capacity_bytes`` per ``src``."""
    nranks = int(nranks)
    if not 1 <= nranks <= MAX_RANKS:
        raise InputError(f"nranks: expected 1 <= nranks <= {MAX_RANKS}, got {nranks}")
    cap = round_capacity(capacity_bytes)
    state_off = 2 * nranks * 8
    data_off = -(-(state_off + 32) // _ALIGN) * _ALIGN
    return WindowLayout(0, state_off, data_off, cap, data_off + 2 * cap)


# ---------------------------------------------------------------------------- descriptors

def desc_words(n_pack: int, n_jobs: int) -> int:
    """int64 entries of a descriptor with ``n_pack`` segments and ``n_jobs`` jobs."""
    return HEADER_WORDS + PACK_WORDS * int(n_pack) + JOB_WORDS * int(n_jobs)


def signature(op: str, fingerprint: int = 0, dtype: str = "", row_bytes: int = 0,
              flags: int = 0) -> int:
    """A 32-bit operation signature (``desc[0]``): CRC-32 of its arguments.

    Ranks that issue the same collective must compute the same value; any difference
    in op, plan fingerprint, dtype, row size or flags makes the kernel report error 2.
    """
    text = f"{op}|{int(fingerprint) & (2**64 - 1):x}|{dtype}|{int(row_bytes)}|{int(flags)}"
    return zlib.crc32(text.encode())


def make_desc(sig: int, packs=(), jobs=(), out=None, off: int = 0) -> np.ndarray:
    """Encode one collective's descriptor.

    Args:
        sig: operation signature (low 32 bits are used; see :func:`signature`).
        packs: ``(in_row, rows, src_row)`` triples.
        jobs: ``(dst_row, cnt, span, src_row, first, count, stride)`` 7-tuples.
        out: optional int64 array to write into at ``out[off:]`` (e.g. a pinned staging
            buffer); allocated when ``None``.
        off: first entry in ``out``.

    Returns:
        ``out`` (or a new 1-D int64 array of :func:`desc_words` entries).
    """
    packs = np.asarray(packs, dtype=np.int64).reshape(-1, PACK_WORDS)
    jobs = np.asarray(jobs, dtype=np.int64).reshape(-1, JOB_WORDS)
    n = desc_words(len(packs), len(jobs))
    if out is None:
        out = np.empty(off + n, dtype=np.int64)
    elif out.dtype != np.int64 or out.ndim != 1 or out.shape[0] < off + n:
        raise InputError(
            f"out: expected a 1-D int64 array of at least {off + n} entries, got "
            f"{out.dtype} {out.shape}"
        )
    out[off : off + HEADER_WORDS] = (int(sig) & 0xFFFFFFFF, len(packs), len(jobs), 0)
    p = off + HEADER_WORDS
    out[p : p + packs.size] = packs.ravel()
    p += packs.size
    out[p : p + jobs.size] = jobs.ravel()
    return out


def _layout_args(counts, slot_offsets, slot_rows):
    counts = np.asarray(counts, dtype=np.int64).ravel()
    d = counts.shape[0]
    offsets = np.asarray(slot_offsets, dtype=np.int64).ravel()
    if offsets.shape[0] not in (d, d + 1):
        raise InputError(
            f"slot_offsets: expected {d} or {d + 1} entries for {d} replicas, got {offsets.shape[0]}"
        )
    rows = counts if slot_rows is None else np.asarray(slot_rows, dtype=np.int64).ravel()
    if rows.shape[0] != d:
        raise InputError(f"slot_rows: expected {d} entries, got {rows.shape[0]}")
    if (counts < 0).any() or (rows < 0).any() or (offsets < 0).any():
        raise InputError(
            f"counts/slot_rows/slot_offsets: must be >= 0, got {counts.tolist()}, "
            f"{rows.tolist()}, {offsets.tolist()}"
        )
    return counts, offsets[:d], rows


def gather_desc(sig, *, rank, attn_tp, counts, slot_offsets, slot_rows=None,
                contribution="replicate", out=None, off=0) -> np.ndarray:
    """The gather of docs/p2p.md: replica ``d``'s rows land in its slot on every rank.

    Args:
        sig: operation signature.
        rank: this rank (``0 <= rank < D * attn_tp``); its replica is ``rank // attn_tp``.
        attn_tp: ranks per replica ``A``.
        counts: ``n_d`` rows per replica (``D`` entries).
        slot_offsets: first row of each slot in the output (``D`` or ``D + 1`` entries).
        slot_rows: rows of each slot (default ``counts``); rows ``[n_d, slot_rows_d)`` of a
            slot are zero-filled (graph buckets).
        contribution: ``"replicate"`` (replica ``d``'s rows come from its rank ``d*A``) or
            ``"partial"`` (the element-wise sum over its ``A`` ranks).

    Pack: ``(0, n_own, 0)``. Jobs per replica: ``(o_d, n_d, slot_rows_d, 0, d*A, c, 1)``
    with ``c = 1`` (replicate) or ``A`` (partial).
    """
    counts, offsets, rows = _layout_args(counts, slot_offsets, slot_rows)
    a = int(attn_tp)
    if a < 1 or not 0 <= int(rank) < counts.shape[0] * a:
        raise InputError(
            f"rank/attn_tp: expected attn_tp >= 1 and 0 <= rank < {counts.shape[0]} * attn_tp, "
            f"got rank={rank}, attn_tp={attn_tp}"
        )
    if contribution not in ("replicate", "partial"):
        raise InputError(f"contribution: expected 'replicate' or 'partial', got {contribution!r}")
    c = 1 if contribution == "replicate" else a
    n_own = int(counts[int(rank) // a])
    jobs = [(int(offsets[d]), int(counts[d]), int(rows[d]), 0, d * a, c, 1)
            for d in range(counts.shape[0])]
    return make_desc(sig, [(0, n_own, 0)], jobs, out=out, off=off)


def combine_desc(sig, *, rank, attn_tp, counts, slot_offsets, out_rows,
                 out=None, off=0) -> np.ndarray:
    """The combine (reduce) of docs/p2p.md: this rank's slot summed over all ``T`` ranks.

    Every rank packs the real rows of every slot of its partial ``Y`` (``(o_d, n_d, o_d)``
    per replica: padding rows never cross NVLink) and runs one job
    ``(0, n_own, out_rows, o_own, 0, T, 1)``: ``out[i] = sum_t Y_t[o_own + i]`` for
    ``i < n_own``, zero up to ``out_rows``.
    """
    counts, offsets, _ = _layout_args(counts, slot_offsets, None)
    a = int(attn_tp)
    t = counts.shape[0] * a
    if a < 1 or not 0 <= int(rank) < t:
        raise InputError(
            f"rank/attn_tp: expected attn_tp >= 1 and 0 <= rank < {counts.shape[0]} * attn_tp, "
            f"got rank={rank}, attn_tp={attn_tp}"
        )
    own = int(rank) // a
    packs = [(int(offsets[d]), int(counts[d]), int(offsets[d])) for d in range(counts.shape[0])]
    job = (0, int(counts[own]), int(out_rows), int(offsets[own]), 0, t, 1)
    return make_desc(sig, packs, [job], out=out, off=off)


# ---------------------------------------------------------------------------- reference

def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise BackendUnavailable(
                "bfloat16 on the host needs ml_dtypes: `pip install ml_dtypes`"
            ) from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _clamp_index(x: int) -> int:
    return max(-_INDEX_MAX, min(_INDEX_MAX, x))


def decode_desc(desc, desc_off: int = 0):
    """``(sig, packs, jobs)`` of the descriptor at ``desc[desc_off:]``, as the kernel reads it.

    ``sig`` is the low 32 bits of ``desc[off]``; ``n_pack``/``n_jobs`` are cut to the
    records that fit in ``desc`` (negative counts as 0); records are Python int tuples,
    not yet clamped.
    """
    d = np.asarray(desc)
    off = int(desc_off)
    if d.dtype != np.int64 or d.ndim != 1 or off < 0 or d.shape[0] < off + HEADER_WORDS:
        raise InputError(
            f"desc: expected a 1-D int64 array with at least desc_off + 4 = {off + 4} entries, "
            f"got {d.dtype} {d.shape}"
        )
    sig = int(d[off]) & 0xFFFFFFFF
    left = d.shape[0] - off - HEADER_WORDS
    n_pack = min(max(int(d[off + 1]), 0), left // PACK_WORDS)
    left -= PACK_WORDS * n_pack
    n_jobs = min(max(int(d[off + 2]), 0), left // JOB_WORDS)
    p = off + HEADER_WORDS
    packs = [tuple(int(v) for v in d[p + PACK_WORDS * i : p + PACK_WORDS * (i + 1)])
             for i in range(n_pack)]
    p += PACK_WORDS * n_pack
    jobs = [tuple(int(v) for v in d[p + JOB_WORDS * i : p + JOB_WORDS * (i + 1)])
            for i in range(n_jobs)]
    return sig, packs, jobs


def _sum_rows(rows, dt, logical):
    """Element-wise sum of 1-D ``rows`` (arrays of ``dt``) in order, as the kernel does."""
    if logical in ("float16", "bfloat16"):
        acc = rows[0].astype(np.float32)
        for r in rows[1:]:
            acc = acc + r.astype(np.float32)
        return acc.astype(dt)
    acc = rows[0].copy()
    for r in rows[1:]:
        acc = np.add(acc, r, dtype=dt)  # integers wrap modulo 2**bits; float32 rounds per add
    return acc


def p2p_pull_ref(inputs_per_rank, desc, desc_off, row_bytes, dtype, out_rows, cap_rows,
                 outs=None):
    """Every rank's output of one ``p2p_pull`` collective (docs/p2p.md), row by row.

    Args:
        inputs_per_rank: ``T`` arrays ``[in_rows_t, width]`` (any dtype with rows of
            ``row_bytes`` bytes); rank ``t``'s ``inp``.
        desc: the int64 descriptor, one array for every rank or a sequence of ``T`` (the
            combine's jobs differ per rank).
        desc_off: first entry of the descriptor (an int, or ``T`` ints).
        row_bytes: bytes per row.
        dtype: logical dtype of the sums (``"float32" | "float16" | "bfloat16" | "int32" |
            "int64" | "uint8"``).
        out_rows: rows of every rank's ``out`` (an int, or ``T`` ints).
        cap_rows: rows of one ``src`` buffer (``cap_bytes // row_bytes``).
        outs: optional ``T`` arrays ``[out_rows, width]``: the outputs before the call
            (rows no job writes keep these contents); zeros when ``None``.

    Returns:
        ``T`` new arrays ``[out_rows, width]`` of the inputs' dtype.

    Raises:
        InputError: the ranks' signatures differ (the kernel would report error 2), or a
            job reads ``src`` rows that no pack segment of that rank wrote in this
            collective (the kernel would read the rows of the collective two before).
        BackendUnavailable: bfloat16 without ml_dtypes.
    """
    ins = list(inputs_per_rank)
    t = len(ins)
    if not 1 <= t <= MAX_RANKS:
        raise InputError(f"inputs_per_rank: expected 1..{MAX_RANKS} arrays, got {t}")
    rb = int(row_bytes)
    if rb < 1:
        raise InputError(f"row_bytes: expected >= 1, got {row_bytes}")
    if dtype not in ELEM_CTYPES:
        raise InputError(f"dtype: expected one of {sorted(ELEM_CTYPES)}, got {dtype!r}")
    dt = _np_dtype(dtype)
    if rb % dt.itemsize:
        raise InputError(f"row_bytes: {rb} is not a multiple of the {dtype} item size {dt.itemsize}")

    def per_rank(v, name):
        if isinstance(v, (int, np.integer)):
            return [int(v)] * t
        v = [int(x) for x in v]
        if len(v) != t:
            raise InputError(f"{name}: expected an int or {t} ints, got {len(v)}")
        return v

    descs = [desc] * t if isinstance(desc, np.ndarray) else list(desc)
    if len(descs) != t:
        raise InputError(f"desc: expected one array or {t} arrays, got {len(descs)}")
    offs = per_rank(desc_off, "desc_off")
    o_rows = per_rank(out_rows, "out_rows")
    cap = int(cap_rows)
    inb = []
    for r, a in enumerate(ins):
        a = np.ascontiguousarray(a)
        if a.ndim != 2 or a.shape[1] * a.dtype.itemsize != rb:
            raise InputError(
                f"inputs_per_rank[{r}]: expected [rows, width] with rows of {rb} bytes, got "
                f"{a.dtype} {a.shape}"
            )
        inb.append(a.reshape(a.shape[0], rb) if a.dtype == np.uint8 else a.view(np.uint8).reshape(a.shape[0], rb))
    decoded = [decode_desc(descs[r], offs[r]) for r in range(t)]
    sigs = [s for s, _, _ in decoded]
    if len(set(sigs)) > 1:
        raise InputError(f"desc: the ranks' signatures differ ({[hex(s) for s in sigs]}): error 2")

    # 1. pack: src[r] rows, and which of them this collective wrote
    src = [np.zeros((cap, rb), np.uint8) for _ in range(t)]
    packed = [np.zeros(cap, bool) for _ in range(t)]
    for r, (_, packs, _) in enumerate(decoded):
        for in_row, rows, src_row in packs:
            in_row, rows, src_row = max(in_row, 0), max(rows, 0), max(src_row, 0)
            rows_c = min(rows, cap - src_row) if src_row < cap else 0
            for i in range(rows_c):
                k = in_row + i
                src[r][src_row + i] = inb[r][k] if k < inb[r].shape[0] else 0
                packed[r][src_row + i] = True

    # 2. jobs
    results = []
    for r, (_, _, jobs) in enumerate(decoded):
        n_out = o_rows[r]
        if outs is None:
            res = np.zeros((n_out, rb), np.uint8)
        else:
            o = np.ascontiguousarray(outs[r])
            if o.shape[0] != n_out or o.shape[1] * o.dtype.itemsize != rb:
                raise InputError(f"outs[{r}]: expected {n_out} rows of {rb} bytes, got {o.dtype} {o.shape}")
            res = o.view(np.uint8).reshape(n_out, rb).copy()
        for dst_row, cnt, span, src_row, first, count, stride in jobs:
            dst_row, cnt, span, src_row = (max(v, 0) for v in (dst_row, cnt, span, src_row))
            first, stride = _clamp_index(max(first, 0)), _clamp_index(stride)
            count = min(max(count, 0), t)
            span_c = min(span, n_out - dst_row) if dst_row < n_out else 0
            sources = [first + k * stride for k in range(count)]
            sources = [s for s in sources if 0 <= s < t]
            cnt_c = min(cnt, span_c, cap - src_row) if sources and src_row < cap else 0
            for i in range(span_c):
                if i >= cnt_c:
                    res[dst_row + i] = 0
                    continue
                for s in sources:
                    if not packed[s][src_row + i]:
                        raise InputError(
                            f"desc: a job of rank {r} reads src row {src_row + i} of rank {s}, "
                            "which no pack segment of that rank wrote in this collective"
                        )
                if len(sources) == 1:
                    res[dst_row + i] = src[sources[0]][src_row + i]
                else:
                    rows = [src[s][src_row + i].view(dt) for s in sources]
                    res[dst_row + i] = _sum_rows(rows, dt, dtype).view(np.uint8)
        width = rb // ins[r].dtype.itemsize
        results.append(res.view(ins[r].dtype).reshape(n_out, width))
    return results


# ---------------------------------------------------------------------------- CUDA side

PULL = CudaSource(_SOURCE_NAME, NAME_EXPRESSIONS, compile_options)
kernel_source = PULL.text
#: Compile and load every ``p2p_pull`` specialisation on a device (default: current). Call
#: before capturing a CUDA graph (``CudaP2P`` does it in its constructor), so that no
#: compilation or module load happens inside a capture.
warm = PULL.warm


def max_blocks(device_id: int) -> int:
    """The grid cap: the SM count, or ``DPGATHER_P2P_MAX_BLOCKS`` when smaller (MPS limits)."""
    cap = sm_count(device_id)
    env = os.environ.get(_MAX_BLOCKS_VAR, "").strip()
    if env.isdigit() and int(env) > 0:
        cap = min(cap, int(env))
    return cap


def grid_size(in_rows: int, out_rows: int, row_bytes: int, cap_bytes: int, limit: int) -> int:
    """Blocks of one launch, from capacities only (graph-safe), at most ``limit``.

    One block per 16 KiB (one 16-byte reduce tile: 256 threads x 4 vectors) of the
    larger of what a launch may write: ``out_rows`` rows pulled, or the input rows that fit
    in ``src``. At least 1; never more than ``limit`` (the SM count: co-residency).
    """
    work = max(int(out_rows) * int(row_bytes), min(int(in_rows) * int(row_bytes), int(cap_bytes)))
    return max(1, min(-(-work // _BYTES_PER_BLOCK), int(limit)))


#: The kernel's parameters in order, with their C types; :func:`kernel_args` packs values in
#: this order and tests/test_cuda_compile.py checks it against the signature in ``p2p.cu``.
KERNEL_PARAMS = (
    ("inp", "const V*"), ("in_rows", "long long"), ("out", "V*"), ("out_rows", "long long"),
    ("desc", "const long long*"), ("desc_off", "long long"), ("desc_len", "long long"),
    ("row_bytes", "long long"), ("windows", "unsigned char* const*"), ("me", "int"),
    ("nranks", "int"), ("data_off", "long long"), ("cap_bytes", "long long"),
    ("host_err", "int*"), ("timeout_ns", "long long"),
)
_ARG_TYPES = {"long long": np.int64, "int": np.int32}


def kernel_args(**values):
    """The kernel's argument tuple (NumPy scalars in :data:`KERNEL_PARAMS` order).

    Pointers (device addresses as ``int``) become ``uint64``, ``long long`` ``int64``, ``int``
    ``int32``: CuPy passes NumPy scalars by value with exactly these sizes.

    Raises:
        InputError: a parameter is missing or unknown.
    """
    names = [n for n, _ in KERNEL_PARAMS]
    if set(values) != set(names):
        raise InputError(
            f"kernel_args: expected exactly {names}, missing {sorted(set(names) - set(values))}, "
            f"unknown {sorted(set(values) - set(names))}"
        )
    return tuple((np.uint64 if c.endswith("*") else _ARG_TYPES[c])(int(values[n]))
                 for n, c in KERNEL_PARAMS)


def kernel_name(dtype: str, vec: int) -> str:
    """The name expression of the specialisation for logical ``dtype`` and ``vec``-byte vectors."""
    return f"p2p_pull<{ELEM_CTYPES[dtype]}, {COPY_CTYPES[vec]}>"


def launch(*, dtype, vec, grid, device_id, stream=None, **params) -> None:
    """Enqueue one ``p2p_pull<E, V>`` on ``stream`` (arguments already validated).

    Args:
        dtype: logical dtype (picks ``E``). vec: vector bytes (picks ``V``).
        grid: blocks (see :func:`grid_size`). device_id: device of every pointer.
        stream: ``cupy.cuda.Stream`` (``None``: the current stream).
        **params: every kernel parameter of :data:`KERNEL_PARAMS` by name: ``inp``, ``out``,
            ``desc``, ``windows``, ``host_err`` device addresses (``int``; ``windows`` holds the
            ``nranks`` window base pointers, ``host_err`` is the mapped host error word);
            ``in_rows``, ``out_rows`` their row counts; ``desc_off``, ``desc_len`` the first
            entry and the length of the descriptor array; ``row_bytes``; ``me``, ``nranks``;
            ``data_off``, ``cap_bytes`` (the layout); ``timeout_ns`` (``<= 0``: forever).
    """
    kernel = PULL.function(device_id, kernel_name(dtype, vec))
    kernel((int(grid),), (_THREADS,), kernel_args(**params), stream=stream)


def pick_vector(row_bytes: int, itemsize: int, *pointers: int) -> int:
    """Widest vector width (16..1 bytes, >= ``itemsize``) dividing ``row_bytes`` and pointers."""
    vec = vector_bytes(int(row_bytes), *pointers)
    if vec < itemsize:
        raise InputError(
            f"row_bytes/pointers: {row_bytes}-byte rows at {[hex(p) for p in pointers]} are not "
            f"aligned to the {itemsize}-byte elements"
        )
    return vec
