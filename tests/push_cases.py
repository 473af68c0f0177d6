"""The push test matrix, for the emulated kernel (test_push_emulated.py) and the layout tests.

:func:`layout_case` builds one collective of the data plane from counts: the ``push`` entries of
``dpgather._layout.Descriptor`` (at their offsets in the whole step descriptor) for every rank of
one node, the ranks' inputs, and the data plane's expected outputs from
:func:`push_reference.gather_expected` / :func:`push_reference.combine_expected`.
:func:`build_cases` lists those over modes, attn-TP sizes, pretend nodes, graph buckets, zero
counts, short and long inputs and every dtype, plus hand-written clamping cases
(:func:`clamp_cases`). :func:`special_values` puts ``-0.0``, NaN payloads, infinities,
subnormals and integer extremes in the rows (no NaN or infinity where rows are summed: the GPU
and x86 disagree on the bits of a NaN produced by an addition).

Outputs are poisoned (``p2p_cases.poisoned``) before a run; ``p2p_cases.check`` compares every byte
of every row, including the rows no job writes (they must keep the poison).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

import push_reference as ref
from dpgather._layout import Descriptor, Layout
from dpgather.core import PaddingMode
from dpgather.kernels import _push
from p2p_cases import _widths, check, poisoned  # noqa: F401  (the pull matrix's helpers)

DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "uint8": 1}
OPS = ("gather_replicate", "gather_partial", "combine", "logits")
#: capacity_bytes of the emulated transports: 64 rows of the widest test row (128 bytes)
CAP_BYTES = 8192
#: the step's signatures, one per descriptor entry (``"wire"``: the quantized gather's fp8 rows,
#: moved as gather replicate; tests/test_push_layout.py runs it, OPS leaves it out of the kernels' cases)
_SIGS = {name: 0x1000 + i for i, name in enumerate(OPS + ("wire",))}


class Case(NamedTuple):
    """One collective of the ``T`` ranks of one node (rows of ``width`` elements)."""

    name: str
    dtype: str
    inputs: tuple  # per rank
    out_rows: tuple  # per rank
    descs: tuple  # per rank, int64 arrays
    desc_off: tuple  # per rank
    expect: tuple | None = None  # per rank: the data plane's semantics (None: clamp cases)

    @property
    def row_bytes(self):
        a = self.inputs[0]
        return a.shape[1] * a.dtype.itemsize


def special_values(rng, rows, width, dtype, summed):
    """Rows of ``dtype`` (bfloat16 as ml_dtypes) with the bit patterns that must survive."""
    dt = ref.host_dtype(dtype)
    if dtype in ("int32", "int64", "uint8"):
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=(rows, width), endpoint=True, dtype=dt)
        extremes = np.array([info.min, info.max, 0, info.max - 1, info.min + 1], dt)
    else:
        a = (rng.standard_normal((rows, width)) * 4).astype(np.float32).astype(dt)
        ui = np.uint16 if dt.itemsize == 2 else np.uint32
        top = ui(1 << (8 * dt.itemsize - 1))
        extremes = np.array([0, 1, top], ui)  # +0.0, the smallest subnormal, -0.0
        if not summed:  # a quiet and a signalling NaN with payloads, -inf
            nan = {2: (0x7E01, 0x7C03, 0xFC00) if dtype == "float16" else (0x7FC1, 0x7F83, 0xFF80),
                   4: (0x7FC00123, 0x7F800321, 0xFF800000)}[dt.itemsize]
            extremes = np.concatenate([extremes, np.array(nan, ui)])
        extremes = extremes.view(dt)
    if a.size:
        flat = a.reshape(-1)
        pick = rng.integers(0, flat.size, size=min(flat.size, 3 * extremes.size))
        flat[pick] = np.resize(extremes, pick.size)
    return a


def _layout(counts, slots, rank, A):
    offsets = [0] + np.cumsum(slots).tolist()
    mode = PaddingMode.MAX_LEN if len(set(slots)) == 1 and slots[0] % A == 0 else PaddingMode.VARLEN
    return Layout(mode, counts, slots, offsets, offsets[-1], rank // A, rank % A, A)


def layout_case(name, T, A, L, node, counts, slots, op, dtype, width, in_mode, seed):
    """One ``op`` of node ``node`` (ranks ``node*L ..``) of a ``T``-rank topology (see the module
    docstring). ``counts``/``slots``: the op's layout (the logits layout for ``"logits"``);
    ``in_mode``: ``"exact" | "short" | "long"`` rows of ``x`` against the counts."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    D = T // A
    desc = Descriptor(D, A, L)
    ranks = range(node * L, node * L + L)
    offsets = [0] + np.cumsum(slots).tolist()
    summed = op in ("gather_partial", "combine")
    if op == "combine":
        d0, dn = node * L // A, L // A
        base = offsets[d0]
        block = offsets[d0 + dn] - base  # the node block of the gathered layout, staged
        inputs = [special_values(rng, block, width, dtype, True) for _ in ranks]
        outs = [slots[r // A] + 1 for r in ranks]
        node_counts, node_offsets = counts[d0:d0 + dn], [o - base for o in offsets[d0:d0 + dn + 1]]
        expect = [ref.combine_expected(inputs, node_counts, node_offsets, A, r - node * L, outs[i], dtype)
                  for i, r in enumerate(ranks)]
    else:
        def rows_of(n):
            return {"exact": n, "short": max(0, n - 2), "long": n + 2}[in_mode]

        per_replica = {d: special_values(rng, rows_of(counts[d]), width, dtype, summed) for d in range(D)}
        every = [special_values(rng, rows_of(counts[r // A]), width, dtype, True) if op == "gather_partial"
                 else per_replica[r // A].copy() for r in range(T)]
        inputs = [every[r] for r in ranks]
        g = ref.gather_expected(every, counts, offsets, slots, A, op == "gather_partial", dtype)
        outs = [offsets[-1] + 1] * L  # one row no job covers: keeps the poison
        expect = []
        for _ in ranks:
            e = poisoned(outs[0], width, dtype)
            for d in range(node * L // A, (node + 1) * L // A):
                e[offsets[d]:offsets[d] + slots[d]] = g[offsets[d]:offsets[d] + slots[d]]
            expect.append(e)
    descs = []
    for r in ranks:
        lay = _layout(counts, slots, r, A)
        descs.append(desc.write(np.zeros(desc.size, np.int64), None, lay, lay, r, _SIGS))
    return Case(name, dtype, tuple(inputs), tuple(outs), tuple(descs), (desc.push[op],) * L, tuple(expect))


def build_cases(T, seed=1234, dtypes=DTYPES, clamp=True):
    """Every case for ``T`` ranks (one node, and pretend nodes of whole replicas)."""
    rng = np.random.default_rng([seed, T])
    cases = []
    for dtype in dtypes:
        for width in _widths(dtype):
            for A in (a for a in (1, 2) if T % a == 0):
                for L in sorted({T, A} | ({T // 2} if T % (2 * A) == 0 else set())):
                    for layout in ("exact", "bucket", "zero", "short", "long"):
                        counts = rng.integers(0, 6, T // A).tolist()
                        if layout == "zero":
                            counts = [0] * (T // A)
                        slots = counts
                        if layout in ("bucket", "zero"):
                            bucket = -(-(max(counts) + int(rng.integers(1, 4))) // A) * A
                            slots = [bucket] * (T // A)
                        in_mode = layout if layout in ("short", "long") else "exact"
                        node = int(rng.integers(0, T // L))
                        for op in OPS:
                            c, s = counts, slots
                            if op == "logits":  # its own layout: at most the hidden counts
                                c = [int(rng.integers(0, n + 1)) for n in counts]
                                s = c if layout != "bucket" else slots
                            name = f"{op} A={A} L={L} node={node} {layout} counts={c} [{dtype} w={width}]"
                            cases.append(layout_case(name, T, A, L, node, c, s, op, dtype, width, in_mode,
                                                     seed))
        if clamp:
            cases += clamp_cases(T, dtype, seed)
    return cases


def clamp_cases(T, dtype, seed):
    """Descriptors that exercise every clamp of docs/push.md (the same on every rank unless noted)."""
    width = _widths(dtype)[0]
    rb = width * ITEMSIZE[dtype]
    cap = ref.cap_rows_of(rb, CAP_BYTES)
    big = 2**62
    rng = np.random.default_rng([seed, T, zlib.crc32(dtype.encode())])
    out = []

    def add(name, in_rows, out_rows, sends, jobs, self_row=0, per_rank=None, pad=0):
        descs = []
        for r in range(T):
            s, j, sr = per_rank(r) if per_rank else (sends, jobs, self_row)
            d = ref.make_desc(0x77 + len(out), s, j, sr)
            descs.append(np.concatenate([np.full(pad, -9, np.int64), d, np.full(3, 55, np.int64)]))
        inputs = tuple(special_values(rng, in_rows, width, dtype, True) for _ in range(T))
        out.append(Case(f"clamp {name} [{dtype}]", dtype, inputs, (out_rows,) * T, tuple(descs), (pad,) * T))

    everyone = [(0, 4, 0, 0, T)]
    # rows past the end of out are never written; a span past out is cut
    add("dst past out", 4, 7, everyone, [(5, 4, 9, 0, 0, 1, 1), (big, 3, 3, 0, 0, 1, 1)])
    # sends and jobs cut at the capacity: the rest of the span is zero
    add("capacity", 8, 12, [(0, 8, cap - 3, 0, T), (0, 2, big, 0, T)], [(0, 8, 10, cap - 3, 0, T, 1)])
    # negative entries count as 0 (stride too is then a plain value: 0 = the same source twice)
    add("negative entries", 5, 6, [(-1, 3, -5, -2, T + 5)], [(-3, 2, 4, -1, -2, 2, 0)], self_row=-4)
    # sources: out of range skipped, repeated ones summed twice, none -> zeros, far first, count > T
    add("sources", 4, 22, everyone, [
        (0, 3, 3, 0, T - 1, 3, 1),  # only the last rank is in range: a copy
        (3, 3, 4, 0, T + 1, T, -1),  # descending, the first two skipped
        (7, 2, 2, 0, 0, 2, 0),  # stride 0: rank 0 twice
        (9, 2, 3, 0, 0, 0, 1),  # count 0: zeros
        (12, 2, 2, 0, 2**40, T, 1 - 2**40),  # clamped to +-(2^31-1): source 0 at k = 1
        (14, 4, 6, 0, 0, 2 * T + 5, 1),  # count > T: cut to T
        (20, 2, 2, 1, 0, T, 1),  # from slot row 1 on
    ])
    # input rows past the input: zeros are sent; self rows past it read as zeros
    add("input past end", 3, 6, [(2, 4, 0, 0, T), (big, 2, 4, 0, T)], [(0, 6, 6, 0, 0, T, 1)], self_row=2)
    add("self row far away", 3, 4, everyone, [(0, 4, 4, 0, 0, T, 1)], self_row=big)
    # destinations: clamped, me skipped, far away (nothing stored, nothing read)
    add("destinations", 4, 4, [(0, 4, 0, -3, 2 * T), (0, 4, 0, 2**40, 3)], [(0, 4, 4, 0, 0, T, 1)])
    # record counts claiming more than the array holds are cut to what it holds
    add("n_jobs past the array", 3, 5, everyone, [(0, 3, 4, 0, 0, T, 1)])
    for d in out[-1].descs:
        d[2] = 1000
    add("n_send past the array", 3, 2, everyone, [])
    for d in out[-1].descs:
        d[1] = 7  # one real record fits, then no job
    # per-rank descriptors: a rank sends only to the next one, which reads only from it
    add("ring", 3, 4, None, None, per_rank=lambda r: ([(0, 3, 0, (r + 1) % T, 1)],
                                                      [(1, 3, 3, 0, (r - 1) % T, 1, 1)], 0), pad=5)
    return out
