"""Rows whose bits arithmetic would change, and the bit-exact reference of a gather (issue 26
item 6), shared by ``tests/mpi/bits_scenarios.py`` (host backend, every transport and mode) and
``tests/gpu/facade_smoke.py`` (either backend). NumPy and ml_dtypes only: no MPI, no CuPy.

The rule checked (docs/design.md section 4): a row with one contributor (``replicate``, or
``A = 1``) arrives bit for bit; a ``partial`` row with ``A > 1`` is the dtype's sum of its
replica's summands (float16 and bfloat16 in float32 and rounded: for two summands the same as
the correctly rounded sum), bit for bit except the payload and sign of a NaN result, which are
the hardware's (x86 keeps an operand's payload, NVIDIA GPUs return the canonical NaN); rows
past what a replica provided are ``+0.0``.
"""

import zlib

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
#: logical name -> NumPy dtype on the host (bfloat16: ml_dtypes)
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16,
          "int32": np.dtype(np.int32), "int64": np.dtype(np.int64), "uint8": np.dtype(np.uint8)}
#: bit patterns arithmetic would alter, per float dtype: -0.0, +0.0, signalling NaNs with payloads
#: (both signs), quiet NaNs with payloads, infinities, the smallest subnormals
SPECIAL_BITS = {
    "float32": (0x80000000, 0x00000000, 0x7FA00001, 0xFF800123, 0x7FC00042, 0xFFC12345, 0x7F800000,
                0xFF800000, 0x00000001, 0x80000001),
    "float16": (0x8000, 0x0000, 0x7D01, 0xFC05, 0x7E42, 0xFE11, 0x7C00, 0xFC00, 0x0001, 0x8001),
    "bfloat16": (0x8000, 0x0000, 0x7F81, 0xFF85, 0x7FC1, 0xFFC3, 0x7F80, 0xFF80, 0x0001, 0x8001),
}
NEG0 = {"float32": 0x80000000, "float16": 0x8000, "bfloat16": 0x8000}


def gen(seed, *tag):
    """A generator determined by ``seed`` and ``tag`` alone (the same on every rank)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(repr(tag).encode())])


def ubits(a):
    """``a`` viewed as unsigned integers of its itemsize (bit-exact comparisons)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def special_rows(g, rows, width, name):
    """``[rows, width]`` of dtype ``name`` where about half the elements are special values
    (integers: the extremes and their neighbours)."""
    dt = DTYPES[name]
    if dt.kind in "iu":
        info = np.iinfo(dt)
        pool = np.array([info.min, info.max, info.min + 1, info.max - 1, 0, 1, -1 if dt.kind == "i" else 2],
                        dtype=dt)
        v = g.integers(info.min // 2, info.max // 2, size=(rows, width), endpoint=True).astype(dt)
    else:
        pool = np.array(SPECIAL_BITS[name], dtype=f"u{dt.itemsize}").view(dt)
        v = (g.standard_normal((rows, width)) * 3).astype(dt)
    pick = g.random((rows, width)) < 0.5
    v[pick] = pool[g.integers(0, pool.size, size=int(pick.sum()))]
    return v


def isnan(a, name):
    return np.zeros(a.shape, bool) if DTYPES[name].kind in "iu" else np.isnan(a.astype(np.float32))


def summed(parts, name):
    """The dtype's sum of ``parts`` in order (float16/bfloat16 in float32, rounded once)."""
    dt = DTYPES[name]
    with np.errstate(all="ignore"):
        if dt.kind in "iu":
            acc = parts[0].copy()
            for p in parts[1:]:
                acc = np.add(acc, p, dtype=dt)
            return acc
        acc = parts[0].astype(np.float32)
        for p in parts[1:]:
            acc = acc + p.astype(np.float32)
        return acc.astype(dt)


class BitStep:
    """One decode step of ``D = T // A`` replicas with special rows: every rank's inputs and the
    bit-exact references (every rank computes all of them).

    Attributes: ``n`` (tokens per replica; one replica idle when ``D > 1``), ``rows`` (rows each
    replica provides: ``n`` - 2 .. ``n`` + 2), ``batches``, ``x_rep[d]`` (replica ``d``'s rows, the
    same on its ``A`` ranks), ``x_part[t]`` (rank ``t``'s summand; some elements ``-0.0`` in every
    summand of a replica: a ``-0.0`` sum).
    """

    def __init__(self, dg, seed, T, A, name, width, s):
        self.T, self.A, self.D, self.name, self.width = T, A, T // A, name, width
        g = gen(seed, "batch", A, name, s)
        bs = g.integers(0, 9, size=self.D)
        if self.D > 1:
            bs[int(g.integers(0, self.D))] = 0
        self.n = [int(b) for b in bs]
        self.rows = [max(0, n + int(g.integers(-2, 3))) for n in self.n]
        self.batches = [dg.LocalBatch(dg.ForwardMode.DECODE, n) if n else dg.LocalBatch(dg.ForwardMode.IDLE)
                        for n in self.n]
        tag = (A, name, s)
        self.x_rep = [special_rows(gen(seed, *tag, "rep", d), self.rows[d], width, name) for d in range(self.D)]
        self.x_part = [special_rows(gen(seed, *tag, "part", t), self.rows[t // A], width, name) for t in range(T)]
        if name in NEG0:
            for d in range(self.D):
                both = gen(seed, *tag, "neg0", d).random((self.rows[d], width)) < 0.15
                for a in range(A):
                    ubits(self.x_part[d * A + a])[both] = NEG0[name]

    def reference(self, plan, partial, logits=False, any_nan=False):
        """``(reference, nan_only)`` of ``gather`` (``logits``: ``gather_logits``): ``nan_only``
        marks the elements checked for NaN-ness only: partial sums (``A > 1``) where two summands
        are NaN, or with ``any_nan`` (GPU arithmetic) wherever the sum is a NaN."""
        total = int(plan.logits_rows if logits else plan.gathered_rows)
        offs = plan.logits_offsets if logits else plan.slot_offsets
        counts = plan.logits_tokens if logits else plan.num_tokens
        ref = np.zeros((total, self.width), DTYPES[self.name])
        nan_only = np.zeros(ref.shape, bool)
        for d in range(self.D):
            k, o = min(int(counts[d]), self.rows[d]), int(offs[d])
            if not partial:
                ref[o:o + k] = self.x_rep[d][:k]
                continue
            parts = [self.x_part[d * self.A + a][:k] for a in range(self.A)]
            ref[o:o + k] = parts[0] if self.A == 1 else summed(parts, self.name)
            if self.A > 1:
                nans = np.sum([isnan(p, self.name) for p in parts], axis=0)
                nan_only[o:o + k] = isnan(ref[o:o + k], self.name) if any_nan else nans >= 2
        return ref, nan_only


def bits_differ(got, ref, nan_only, name):
    """None when every element of ``got`` has the bits of ``ref`` (NaN-ness only where
    ``nan_only``), else a one-line description of the first difference."""
    got = np.asarray(got)
    if got.shape != ref.shape or ubits(got).dtype != ubits(ref).dtype:
        return f"shape/dtype {got.shape} {got.dtype}, expected {ref.shape} {ref.dtype}"
    same = ubits(got) == ubits(ref)
    if nan_only.any():
        same |= nan_only & isnan(got.view(ref.dtype), name)
    bad = np.argwhere(~same)
    if not bad.size:
        return None
    i = tuple(int(v) for v in bad[0])
    return (f"{len(bad)} elements differ in their bits, first at {i}: got {int(ubits(got)[i]):#x}, "
            f"expected {int(ubits(ref)[i]):#x}")
