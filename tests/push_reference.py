"""NumPy references for the push transport, written from docs/push.md (never from the kernel).

- :func:`push_ref`: every rank's output of one ``p2p_push`` collective from every rank's input
  and descriptor (section "Descriptor": clamps, self-delivery, sums in source order), and the
  rows each source stored for each receiver. It refuses what the kernel cannot do right:
  ranks with different signatures (the kernel reports error 2) and descriptors that read rows
  no send record stored (the kernel would wait for them: error 1).
- :func:`gather_expected` / :func:`combine_expected`: what the data plane's gather and combine
  must produce (docs/design.md section 4), computed from the counts alone, without any
  descriptor: the oracle for the ``push`` entries of ``dpgather._layout.Descriptor``.

Nothing here imports the library's kernels or layout code.
"""

from __future__ import annotations

import numpy as np

import pull_reference

HEADER, SEND, JOB = 4, 5, 7
INDEX_MAX = 2**31 - 1


class SignatureMismatch(Exception):
    """The ranks' descriptors carry different signatures: the kernel reports error 2."""


class NotSent(Exception):
    """A job reads a row its source did not store for this rank: the kernel would time out."""


def host_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _clamp(x):
    return max(-INDEX_MAX, min(INDEX_MAX, x))


def decode(desc, off):
    """``(sig, sends, jobs, self_row)`` at ``desc[off:]``, record counts cut to what fits."""
    d = [int(v) for v in np.asarray(desc, np.int64)]
    left = len(d) - off - HEADER
    n_send = min(max(d[off + 1], 0), left // SEND)
    left -= SEND * n_send
    n_jobs = min(max(d[off + 2], 0), left // JOB)
    p = off + HEADER
    sends = [tuple(d[p + SEND * i:p + SEND * (i + 1)]) for i in range(n_send)]
    p += SEND * n_send
    jobs = [tuple(d[p + JOB * i:p + JOB * (i + 1)]) for i in range(n_jobs)]
    return d[off] & 0xFFFFFFFF, sends, jobs, max(d[off + 3], 0)


def make_desc(sig, sends=(), jobs=(), self_row=0, out=None, off=0):
    """Encode one push collective's descriptor (docs/push.md, "Descriptor"): ``sends`` are
    ``(in_row, rows, slot_row, dest_first, dest_count)``, ``jobs`` the pull's 7-tuples."""
    return pull_reference.make_desc(sig, sends, jobs, out, off, first_words=SEND, word3=self_row)


def desc_words(n_send, n_jobs):
    """int64 entries of a push descriptor with ``n_send`` send records and ``n_jobs`` jobs."""
    return HEADER + SEND * int(n_send) + JOB * int(n_jobs)


def cap_rows_of(row_bytes, cap_bytes):
    """Rows per region: 8 data bytes per line, each row a whole number of lines."""
    return (cap_bytes // 8) // (-(-row_bytes // 8))


def _rows(a, row_bytes):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], row_bytes)


def _sum(rows, dtype):
    """Element-wise sum of byte rows in order, in the dtype's arithmetic (docs/design.md s4);
    one row is a byte copy."""
    if len(rows) == 1:
        return rows[0].copy()
    dt = host_dtype(dtype)
    vals = [r.view(dt) for r in rows]
    if dtype in ("float16", "bfloat16"):
        acc = vals[0].astype(np.float32)
        for v in vals[1:]:
            acc = acc + v.astype(np.float32)
        return acc.astype(dt).view(np.uint8)
    acc = vals[0].copy()
    with np.errstate(over="ignore"):
        for v in vals[1:]:
            acc = (acc + v).astype(dt)  # integers wrap; float32 rounds at every add
    return acc.view(np.uint8)


def _stored(ins, decoded, t, cap, rb):
    """``{(src, dst): {slot row: bytes}}``: what every send record stores (docs/push.md "Send")."""
    stored = {}
    for s, (_, sends, _, _) in enumerate(decoded):
        n_in = ins[s].shape[0]
        for in_row, rows, slot_row, dest_first, dest_count in sends:
            in_row, rows, slot_row = max(in_row, 0), max(rows, 0), max(slot_row, 0)
            rows_c = min(rows, cap - slot_row) if slot_row < cap else 0
            first = _clamp(max(dest_first, 0))
            dests = [d for d in range(first, first + min(max(dest_count, 0), t)) if 0 <= d < t and d != s]
            for d in dests:
                region = stored.setdefault((s, d), {})
                for i in range(rows_c):
                    if slot_row + i in region:
                        raise NotSent(f"rank {s} stores slot row {slot_row + i} for rank {d} twice")
                    k = in_row + i
                    region[slot_row + i] = ins[s][k] if k < n_in else np.zeros(rb, np.uint8)
    return stored


def _job_rows(r, job, ins, stored, self_row, t, cap, n_out):
    """``(dst_row, [row bytes or None for zero])`` of one job of rank ``r``."""
    dst_row, cnt, span, src_row, first, count, stride = job
    dst_row, cnt, span, src_row = (max(v, 0) for v in (dst_row, cnt, span, src_row))
    first, stride, count = _clamp(max(first, 0)), _clamp(stride), min(max(count, 0), t)
    span_c = min(span, n_out - dst_row) if dst_row < n_out else 0
    sources = [s for s in (first + k * stride for k in range(count)) if 0 <= s < t]
    cnt_c = min(cnt, span_c, cap - src_row) if sources and src_row < cap else 0
    rb = ins[r].shape[1]
    rows = []
    for i in range(span_c):
        if i >= cnt_c:
            rows.append(None)
            continue
        parts = []
        for s in sources:
            if s == r:
                k = self_row + src_row + i
                parts.append(ins[r][k] if k < ins[r].shape[0] else np.zeros(rb, np.uint8))
            elif src_row + i in stored.get((s, r), {}):
                parts.append(stored[(s, r)][src_row + i])
            else:
                raise NotSent(f"rank {r} reads slot row {src_row + i} from rank {s}, which did not store it")
        rows.append(parts)
    return dst_row, rows


def push_ref(inputs, descs, desc_off, row_bytes, dtype, out_rows, cap_bytes, outs=None):
    """Every rank's output of one push collective, and the rows each pair carried.

    Args:
        inputs: ``T`` arrays ``[in_rows_t, width]`` with rows of ``row_bytes`` bytes.
        descs: ``T`` int64 descriptors (or one for all); ``desc_off``: an int or ``T`` ints.
        dtype: logical dtype of the sums. out_rows: an int or ``T`` ints.
        cap_bytes: the transport's capacity (rounded to 256, as the window has it).
        outs: the outputs before the call (rows no job writes keep them); zeros when ``None``.

    Returns:
        ``(outputs, traffic)``: ``T`` arrays ``[out_rows_t, width]`` of the inputs' dtype, and
        ``{(src, dst): rows stored}``.

    Raises:
        SignatureMismatch, NotSent: see the module docstring.
    """
    t = len(inputs)
    rb = int(row_bytes)
    descs = list(descs) if isinstance(descs, (list, tuple)) else [descs] * t
    offs = list(desc_off) if isinstance(desc_off, (list, tuple)) else [int(desc_off)] * t
    n_outs = list(out_rows) if isinstance(out_rows, (list, tuple)) else [int(out_rows)] * t
    cap = cap_rows_of(rb, int(cap_bytes))
    ins = [_rows(a, rb) for a in inputs]
    decoded = [decode(descs[r], offs[r]) for r in range(t)]
    if len({sig for sig, _, _, _ in decoded}) > 1:
        raise SignatureMismatch([hex(sig) for sig, _, _, _ in decoded])
    stored = _stored(ins, decoded, t, cap, rb)
    results = []
    for r, (_, _, jobs, self_row) in enumerate(decoded):
        res = np.zeros((n_outs[r], rb), np.uint8) if outs is None else _rows(outs[r], rb).copy()
        for job in jobs:
            dst_row, rows = _job_rows(r, job, ins, stored, self_row, t, cap, n_outs[r])
            for i, parts in enumerate(rows):
                if parts is None:
                    res[dst_row + i] = 0
                else:
                    res[dst_row + i] = _sum(parts, dtype)
        results.append(res.view(inputs[r].dtype).reshape(n_outs[r], inputs[r].shape[1]))
    return results, {k: len(v) for k, v in stored.items()}


# ---------------------------------------------------------------------------- data plane semantics

def gather_expected(inputs, counts, offsets, slots, A, partial, dtype, total=None):
    """The gathered buffer of docs/design.md section 4 (identical on every rank).

    ``inputs[r]`` is rank ``r``'s ``x`` (``T = D * A`` ranks; a replica's ranks hold the same
    rows for replicate); replica ``d``'s slot ``[o_d, o_d + slot_d)`` holds its first ``n_d``
    rows (rows the replica did not provide, and the rest of the slot, zero): attn-TP rank 0's
    rows (replicate) or the sum over the replica's ranks in rank order (partial).
    """
    rb = inputs[0].shape[1] * inputs[0].dtype.itemsize
    total = int(offsets[-1]) if total is None else total
    g = np.zeros((total, rb), np.uint8)
    for d, n in enumerate(counts):
        ranks = range(d * A, d * A + A) if partial else [d * A]
        for i in range(n):
            parts = [_rows(inputs[r], rb)[i] if i < inputs[r].shape[0] else np.zeros(rb, np.uint8)
                     for r in ranks]
            g[offsets[d] + i] = _sum(parts, dtype)
    return g.view(inputs[0].dtype).reshape(total, inputs[0].shape[1])


def combine_expected(ys, counts, offsets, A, rank, out_rows, dtype):
    """Rank ``rank``'s combine output: ``y[i] = sum over all T ranks in rank order of
    Y_t[o_own + i]`` for ``i < n_own``, zero up to ``out_rows``."""
    rb = ys[0].shape[1] * ys[0].dtype.itemsize
    d = rank // A
    y = np.zeros((out_rows, rb), np.uint8)
    for i in range(min(counts[d], out_rows)):
        y[i] = _sum([_rows(Y, rb)[offsets[d] + i] for Y in ys], dtype)
    return y.view(ys[0].dtype).reshape(out_rows, ys[0].shape[1])
