"""The independent reference of the P2P pull transport, and the tests' descriptor encoder.

docs/p2p.md is the specification; this module implements it on its own, importing nothing of
``dpgather`` (so the oracle cannot share a mistake with the library):

- :func:`make_desc` from explicit records, and the data plane's shapes :func:`gather_desc`
  (replicate / partial) and :func:`combine_desc`; :func:`decode_desc` reads one back;
- :func:`signature`, a 32-bit CRC-32 operation signature for test descriptors (the data plane
  uses its own, FNV-1a, in ``dpgather/_layout.py``: any value works as long as the ranks agree);
- :func:`pull_ref`: every rank's output of one collective from every rank's input, row by row
  (the oracle of the host twin, the CPU emulation of the kernel and the GPU self-test).

Descriptor (int64; every entry in rows)::

    desc[off:]  = [sig, n_pack, n_jobs, 0]
                + n_pack x (in_row, rows, src_row)
                + n_jobs x (dst_row, cnt, span, src_row, first, count, stride)
"""

from __future__ import annotations

import zlib

import numpy as np

#: Descriptor record sizes in int64 words (docs/p2p.md).
HEADER_WORDS, PACK_WORDS, JOB_WORDS = 4, 3, 7
#: Ranks of one transport at most (docs/p2p.md: one polling thread per rank of a 256-thread block).
MAX_RANKS = 256
_INDEX_MAX = 2**31 - 1  # first/stride clamp (docs/p2p.md)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "uint8": 1}


def host_dtype(dtype):
    """NumPy dtype of host buffers of logical ``dtype`` (``ml_dtypes.bfloat16`` for bfloat16)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


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


def make_desc(sig: int, packs=(), jobs=(), out=None, off: int = 0, *, first_words: int = PACK_WORDS,
              word3: int = 0) -> np.ndarray:
    """Encode one collective's descriptor.

    Args:
        sig: operation signature (low 32 bits are used; see :func:`signature`).
        packs: ``(in_row, rows, src_row)`` triples (records of ``first_words`` words: the push
            transport's send records have 5, tests/push_reference.py).
        jobs: ``(dst_row, cnt, span, src_row, first, count, stride)`` 7-tuples.
        out: optional int64 array to write into at ``out[off:]`` (e.g. a pinned staging
            buffer); allocated when ``None``.
        off: first entry in ``out``.
        word3: the header's last word (0 for the pull; the push's ``self_row``).

    Returns:
        ``out`` (or a new 1-D int64 array of ``4 + first_words*len(packs) + 7*len(jobs)`` entries).
    """
    packs = np.asarray(packs, dtype=np.int64).reshape(-1, first_words)
    jobs = np.asarray(jobs, dtype=np.int64).reshape(-1, JOB_WORDS)
    n = HEADER_WORDS + packs.size + jobs.size
    if out is None:
        out = np.empty(off + n, dtype=np.int64)
    elif out.dtype != np.int64 or out.ndim != 1 or out.shape[0] < off + n:
        raise ValueError(
            f"out: expected a 1-D int64 array of at least {off + n} entries, got "
            f"{out.dtype} {out.shape}"
        )
    out[off : off + HEADER_WORDS] = (int(sig) & 0xFFFFFFFF, len(packs), len(jobs), int(word3))
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
        raise ValueError(
            f"slot_offsets: expected {d} or {d + 1} entries for {d} replicas, got {offsets.shape[0]}"
        )
    rows = counts if slot_rows is None else np.asarray(slot_rows, dtype=np.int64).ravel()
    if rows.shape[0] != d:
        raise ValueError(f"slot_rows: expected {d} entries, got {rows.shape[0]}")
    if (counts < 0).any() or (rows < 0).any() or (offsets < 0).any():
        raise ValueError(
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
        raise ValueError(
            f"rank/attn_tp: expected attn_tp >= 1 and 0 <= rank < {counts.shape[0]} * attn_tp, "
            f"got rank={rank}, attn_tp={attn_tp}"
        )
    if contribution not in ("replicate", "partial"):
        raise ValueError(f"contribution: expected 'replicate' or 'partial', got {contribution!r}")
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
        raise ValueError(
            f"rank/attn_tp: expected attn_tp >= 1 and 0 <= rank < {counts.shape[0]} * attn_tp, "
            f"got rank={rank}, attn_tp={attn_tp}"
        )
    own = int(rank) // a
    packs = [(int(offsets[d]), int(counts[d]), int(offsets[d])) for d in range(counts.shape[0])]
    job = (0, int(counts[own]), int(out_rows), int(offsets[own]), 0, t, 1)
    return make_desc(sig, packs, [job], out=out, off=off)


# ---------------------------------------------------------------------------- reference

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
        raise ValueError(
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


def pull_ref(inputs_per_rank, desc, desc_off, row_bytes, dtype, out_rows, cap_rows, outs=None):
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
        ValueError: the ranks' signatures differ (the kernel would report error 2), or a
            job reads ``src`` rows that no pack segment of that rank wrote in this
            collective (the kernel would read the rows of the collective two before).
    """
    ins = list(inputs_per_rank)
    t = len(ins)
    if not 1 <= t <= MAX_RANKS:
        raise ValueError(f"inputs_per_rank: expected 1..{MAX_RANKS} arrays, got {t}")
    rb = int(row_bytes)
    if rb < 1:
        raise ValueError(f"row_bytes: expected >= 1, got {row_bytes}")
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype: expected one of {sorted(ITEMSIZE)}, got {dtype!r}")
    dt = host_dtype(dtype)
    if rb % dt.itemsize:
        raise ValueError(f"row_bytes: {rb} is not a multiple of the {dtype} item size {dt.itemsize}")

    def per_rank(v, name):
        if isinstance(v, (int, np.integer)):
            return [int(v)] * t
        v = [int(x) for x in v]
        if len(v) != t:
            raise ValueError(f"{name}: expected an int or {t} ints, got {len(v)}")
        return v

    descs = [desc] * t if isinstance(desc, np.ndarray) else list(desc)
    if len(descs) != t:
        raise ValueError(f"desc: expected one array or {t} arrays, got {len(descs)}")
    offs = per_rank(desc_off, "desc_off")
    o_rows = per_rank(out_rows, "out_rows")
    cap = int(cap_rows)
    inb = []
    for r, a in enumerate(ins):
        a = np.ascontiguousarray(a)
        if a.ndim != 2 or a.shape[1] * a.dtype.itemsize != rb:
            raise ValueError(
                f"inputs_per_rank[{r}]: expected [rows, width] with rows of {rb} bytes, got "
                f"{a.dtype} {a.shape}"
            )
        inb.append(a.reshape(a.shape[0], rb) if a.dtype == np.uint8 else a.view(np.uint8).reshape(a.shape[0], rb))
    decoded = [decode_desc(descs[r], offs[r]) for r in range(t)]
    sigs = [s for s, _, _ in decoded]
    if len(set(sigs)) > 1:
        raise ValueError(f"desc: the ranks' signatures differ ({[hex(s) for s in sigs]}): error 2")

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
                raise ValueError(f"outs[{r}]: expected {n_out} rows of {rb} bytes, got {o.dtype} {o.shape}")
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
                        raise ValueError(
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
