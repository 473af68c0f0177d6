"""The P2P test matrix, shared by tests/mpi/p2p_scenarios.py (HostPull) and tests/gpu/p2p_selftest.py.

:func:`build_cases` lists, for ``T`` ranks, every descriptor shape the data plane uses (gather
replicate / partial with A = 1, 2; combine; exact slots and graph buckets (span > cnt); zero
counts; inputs shorter than the counts, zero-filled; inputs longer, not sent) in every dtype,
plus hand-written clamping cases (rows past ``out`` or past the capacity, negative entries,
sources out of range or repeated, counts larger than the descriptor, an in-place all-reduce,
far-out-of-range offsets). Every rank builds the identical list (seeded by ``(seed, T)``);
:func:`case_input` gives rank ``r``'s input of a case, so each rank computes every peer's input
and the reference (:func:`pull_reference.pull_ref`, independent of the library) locally.

Outputs are poisoned with :data:`POISON` (never zeros) before each call; :func:`check` compares
every byte of every row, the rows no job writes included (they must keep the poison).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

import pull_reference as ref
from pull_reference import host_dtype

DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8")
POISON = 0xA5
#: capacity_bytes of the transports under test: 128 rows of the widest test row (64 bytes)
CAP_BYTES = 8192


class Case(NamedTuple):
    """One collective: per-rank descriptors and buffer sizes (rows of ``width`` elements)."""

    name: str
    dtype: str
    width: int
    in_rows: tuple  # per rank
    out_rows: tuple  # per rank
    descs: tuple  # per rank, int64 arrays
    desc_off: int = 0
    inplace: bool = False  # inp is out (then in_rows == out_rows)

    @property
    def row_bytes(self):
        return self.width * ref.ITEMSIZE[self.dtype]


def storage_dtype(dtype):
    """NumPy dtype of CuPy buffers (CuPy has no bfloat16: uint16 storage)."""
    return np.dtype("uint16") if dtype == "bfloat16" else np.dtype(dtype)


def case_input(seed, index, rank, rows, width, dtype):
    """Rank ``rank``'s input of case ``index``: normals for floats (sums round), the whole range
    for integers (sums wrap)."""
    rng = np.random.default_rng([seed, index, rank, zlib.crc32(dtype.encode())])
    dt = host_dtype(dtype)
    if dtype in ("float32", "float16", "bfloat16"):
        return (rng.standard_normal((rows, width)) * 4).astype(np.float32).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=(rows, width), endpoint=True, dtype=dt)


def poisoned(rows, width, dtype):
    out = np.empty((rows, width), host_dtype(dtype))
    out.view(np.uint8)[...] = POISON
    return out


def expected(case, seed, index, nranks):
    """Every rank's expected output of ``case`` (poisoned rows stay poisoned)."""
    ins = [case_input(seed, index, r, case.in_rows[r], case.width, case.dtype) for r in range(nranks)]
    outs = ins if case.inplace else [poisoned(case.out_rows[r], case.width, case.dtype)
                                     for r in range(nranks)]
    cap_rows = CAP_BYTES // case.row_bytes
    return ins, ref.pull_ref(ins, list(case.descs), case.desc_off, case.row_bytes, case.dtype,
                             list(case.out_rows), cap_rows, outs=outs)


def check(got, exp):
    """``None`` if ``got`` equals ``exp`` byte for byte, else a short description."""
    if got.shape != exp.shape or got.dtype.itemsize != exp.dtype.itemsize:
        return f"shape {got.shape} {got.dtype} != {exp.shape} {exp.dtype}"
    rb = got.shape[1] * got.dtype.itemsize
    g = np.ascontiguousarray(got).view(np.uint8).reshape(got.shape[0], rb)
    e = np.ascontiguousarray(exp).view(np.uint8).reshape(exp.shape[0], rb)
    rows = np.flatnonzero((g != e).any(axis=1))
    if rows.size == 0:
        return None
    return f"{rows.size}/{g.shape[0]} rows differ, first {rows[:6].tolist()}"


def _widths(dtype):
    # 16-byte rows and odd rows (narrower vectors: 8/4/2/1 bytes)
    return {"float32": (8, 3), "float16": (8, 5), "bfloat16": (16, 3), "int32": (4, 1),
            "int64": (2, 3), "uint8": (32, 7)}[dtype]


def build_cases(nranks, seed=1234, dtypes=DTYPES, clamp=True):
    """Every case for ``nranks`` ranks, identical on every rank (see the module docstring)."""
    t = int(nranks)
    rng = np.random.default_rng([seed, t])
    cases = []

    def add(name, dtype, width, in_rows, out_rows, descs, **kw):
        cases.append(Case(name, dtype, width, tuple(int(v) for v in in_rows),
                          tuple(int(v) for v in out_rows), tuple(descs), **kw))

    for dtype in dtypes:
        for width in _widths(dtype):
            rb = width * ref.ITEMSIZE[dtype]
            for a in (1, 2):
                if t % a:
                    continue
                d = t // a
                for layout in ("exact", "bucket", "zero", "short", "long"):
                    counts = rng.integers(0, 6, d)
                    if layout == "zero":
                        counts[:] = 0
                    if layout in ("bucket", "zero"):
                        bucket = int(counts.max()) + int(rng.integers(1, 4))
                        slot_rows = np.full(d, -(-bucket // a) * a)
                    else:
                        slot_rows = counts.copy()
                    offsets = np.concatenate([[0], np.cumsum(slot_rows)])
                    total = int(offsets[-1])
                    own = [int(counts[r // a]) for r in range(t)]
                    if layout == "short":  # fewer rows than counted: the rest is zero-filled
                        in_rows = [max(0, n - int(rng.integers(1, 3))) for n in own]
                    elif layout == "long":  # more rows than counted: the extra ones stay home
                        in_rows = [n + 2 for n in own]
                    else:
                        in_rows = own
                    for contribution in ("replicate", "partial"):
                        sig = ref.signature("gather", len(cases), dtype, rb)
                        descs = [ref.gather_desc(sig, rank=r, attn_tp=a, counts=counts,
                                                 slot_offsets=offsets, slot_rows=slot_rows,
                                                 contribution=contribution) for r in range(t)]
                        # one extra output row that no job covers: must keep the poison
                        add(f"gather {contribution} A={a} {layout} counts={counts.tolist()}",
                            dtype, width, in_rows, [total + 1] * t, descs)
                    # combine: every rank holds the gathered layout, gets its own slot summed
                    sig = ref.signature("combine", len(cases), dtype, rb)
                    out_rows = [int(slot_rows[r // a]) for r in range(t)]
                    descs = [ref.combine_desc(sig, rank=r, attn_tp=a, counts=counts,
                                              slot_offsets=offsets, out_rows=out_rows[r])
                             for r in range(t)]
                    y_rows = total if layout != "short" else max(0, total - 1)
                    add(f"combine A={a} {layout} counts={counts.tolist()}", dtype, width,
                        [y_rows] * t, [n + 1 for n in out_rows], descs)
            # logits-style gather: a different row width in the same run
            counts = rng.integers(0, 4, t)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            sig = ref.signature("logits", len(cases), dtype, rb)
            descs = [ref.gather_desc(sig, rank=r, attn_tp=1, counts=counts, slot_offsets=offsets)
                     for r in range(t)]
            add(f"logits gather counts={counts.tolist()}", dtype, width + 1, counts,
                [int(offsets[-1])] * t, descs)
        if clamp:
            cases += _clamp_cases(t, dtype, len(cases))
    return cases


def _clamp_cases(t, dtype, base):
    """Descriptors that exercise every clamp of docs/p2p.md (same on every rank unless noted)."""
    out = []
    width = _widths(dtype)[0]
    rb = width * ref.ITEMSIZE[dtype]
    cap = CAP_BYTES // rb
    big = 2**62

    def add(name, in_rows, out_rows, packs, jobs, **kw):
        sig = ref.signature("clamp", base + len(out), dtype, rb)
        desc = ref.make_desc(sig, packs, jobs)
        out.append(Case(f"clamp {name}", dtype, width, (in_rows,) * t, (out_rows,) * t,
                        (desc,) * t, **kw))

    # rows past the end of out are never written; span past out is cut
    add("dst past out", 6, 7, [(0, 6, 0)], [(5, 6, 9, 0, 0, 1, 1), (big, 3, 3, 0, 0, 1, 1)])
    # packs and jobs cut at the capacity: rows past it read as zero
    add("src past capacity", 8, 10, [(0, 8, cap - 3), (0, 2, big)],
        [(0, 8, 10, cap - 3, 0, t, 1)])
    # negative entries count as 0 (stride too is then a plain value: 0 = the same source)
    add("negative entries", 5, 6, [(-1, 3, -5)], [(-3, 2, 4, -1, -2, 1, 0)])
    # sources: out of range skipped, repeated ones summed twice, none -> zeros, far first
    add("sources", 4, 20, [(0, 4, 0)], [
        (0, 3, 3, 0, t - 1, 3, 1),  # only the last rank is in range: a copy
        (3, 3, 4, 0, t + 1, t, -1),  # descending, the first two skipped
        (7, 2, 2, 0, 0, 2, 0),  # stride 0: rank 0 twice
        (9, 2, 3, 0, 0, 0, 1),  # count 0: zeros
        (12, 2, 2, 0, 2**40, t, 1 - 2**40),  # clamped to +-(2^31-1): source 0 at k = 1
        (14, 4, 6, 0, 0, 2 * t + 5, 1),  # count > T: cut to T
    ])
    # input offsets past the input: the packed rows are zeros
    add("input past end", 3, 5, [(2, 4, 0), (big, 2, 4)], [(0, 6, 6, 0, 0, t, 1)])
    # counts claiming more records than the array holds are cut to what it holds
    desc = ref.make_desc(ref.signature("clamp", base + len(out), dtype, rb),
                          [(0, 3, 0)], [(0, 3, 4, 0, 0, t, 1)])
    desc[2] = 1000  # n_jobs
    out.append(Case("clamp n_jobs past the array", dtype, width, (3,) * t, (5,) * t, (desc,) * t))
    desc = ref.make_desc(ref.signature("clamp", base + len(out), dtype, rb), [(0, 3, 0)], [])
    desc[1] = 7  # n_pack: 1 real record, 0 jobs fit
    out.append(Case("clamp n_pack past the array", dtype, width, (3,) * t, (2,) * t, (desc,) * t))
    # the descriptor at an offset inside a larger array
    inner = ref.make_desc(ref.signature("clamp", base + len(out), dtype, rb),
                           [(0, 2, 0)], [(1, 2, 3, 0, 0, t, 1)])
    desc = np.concatenate([np.full(5, -9, np.int64), inner, np.full(3, 77, np.int64)])
    out.append(Case("clamp desc_off", dtype, width, (2,) * t, (4,) * t, (desc,) * t, desc_off=5))
    # in place: an all-reduce of rows [0, 4) of the very array that is packed
    add("in-place all-reduce", 6, 6, [(0, 4, 0)], [(0, 4, 5, 0, 0, t, 1)], inplace=True)
    return out
