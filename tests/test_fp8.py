"""The quantized gather (issue 24, docs/fp8.md): the host kernel, the reference, the facade.

- The NumPy reference ``tests/fp8_reference.py`` is itself checked: on hand-computed wire rows
  and against a brute-force float8 e4m3fn encoder written here (nearest of the 127 finite
  magnitudes, ties to the even code, saturation at 448) that shares nothing with ml_dtypes' cast.
- The Numba ``quantize_rows`` must equal the reference bit for bit: over random bit patterns
  (NaN, +-Inf, subnormals included) and finite values of every magnitude, for float32, float16
  and bfloat16, groups 1, 16, 128 and H, pow2 scales on and off; over hand-picked edge cases;
  over descriptor windows (``copy_rows``' clamps, hypothesis; the destination poisoned and
  compared whole); its argument errors are InputErrors naming the argument.
- ``DpAttention.gather_fp8`` under ``mpiexec`` (host backend): ``tests/mpi/fp8_scenarios.py``
  (see its docstring): the gather matrix, the asynchronous, micro-batched and graph-runner
  paths, the failure path and the configuration errors, and the caller's PyTorch / JAX arrays.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fp8_reference as R
from bit_patterns import SPECIAL_BITS
from dpgather.core.errors import InputError
from dpgather.kernels import _host
from frameworks import require
from mpi_harness import MPI_SCRIPTS, check_mpi, needs_mpiexec

NAMES = ("float32", "float16", "bfloat16")
STORAGE = {"float32": np.dtype(np.uint32), "float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.uint16)}
LOGICAL = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
SCRIPT = MPI_SCRIPTS / "fp8_scenarios.py"


def quantize(src, name, group, pow2, rows=None):
    """The Numba kernel over the whole of ``src`` into a poisoned destination."""
    n = src.shape[0] if rows is None else rows
    H = src.shape[1]
    dst = np.full((n, H + 4 * (H // group)), 0xA5, np.uint8)
    out = _host.quantize_rows(src, dst, np.array([0, src.shape[0], 0, n], np.int64), 0, group, pow2, name)
    assert out is dst
    return dst


def as_bits(values, name):
    """float64 values -> the storage bits of dtype ``name`` (exactly representable values)."""
    return np.ascontiguousarray(np.asarray(values, np.float64).astype(LOGICAL[name])).view(STORAGE[name])


def f32_bytes(v):
    return list(np.array([v], "<f4").view(np.uint8))


# -- a brute-force e4m3fn encoder: the reference's reference -------------------------------------

def _e4m3_table():
    """(finite magnitudes, their codes) of float8 e4m3fn, from the format's definition."""
    vals, codes = [], []
    for code in range(0x7F):  # 0x7F is NaN
        e, m = code >> 3, code & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
        codes.append(code)
    return np.array(vals), np.array(codes)


_VALS, _CODES = _e4m3_table()


def brute_e4m3(v):
    """The e4m3fn code of float ``v``: nearest finite magnitude, ties to the even code,
    saturation at 448, NaN -> 0x7F, the sign kept (-0.0 -> 0x80)."""
    if np.isnan(v):
        return 0x7F
    sign = 0x80 if np.signbit(v) else 0
    a = abs(float(v))
    if a >= 448.0:
        return sign | 0x7E
    d = np.abs(_VALS - a)
    best = np.flatnonzero(d == d.min())
    code = int(_CODES[best[0]]) if best.size == 1 else int(next(c for c in _CODES[best] if c % 2 == 0))
    return sign | code


def test_the_brute_force_encoder_knows_the_format():
    assert _VALS[0x7E] == 448.0 and _VALS[0x08] == 2.0 ** -6 and _VALS[0x01] == 2.0 ** -9
    assert [brute_e4m3(v) for v in (1.0, -2.0, 0.5, 448.0, 1e9, -0.0, 2.0 ** -9)] == [0x38, 0xC0, 0x30, 0x7E, 0x7E,
                                                                                       0x80, 0x01]
    # the codes agree with ml_dtypes' decoding
    assert np.array_equal(np.arange(0x7F, dtype=np.uint8).view(E4M3).astype(np.float64), _VALS)


# -- the reference, checked by hand ------------------------------------------------------------------

def test_reference_hand_computed_rows():
    # one group, amax 448: the scale is exactly 1 and each value its own e4m3 code
    x = np.array([[448.0, 1.0, -2.0, 0.5, 0.0, -0.0, 2.0 ** -9, 2.0 ** -6]], np.float32)
    w = R.quantize(x, "float32", 8)
    assert list(w[0, :8]) == [0x7E, 0x38, 0xC0, 0x30, 0x00, 0x80, 0x01, 0x08]
    assert list(w[0, 8:]) == [0x00, 0x00, 0x80, 0x3F]  # 1.0f little-endian
    # amax 896: scale 2 (0x40000000)
    w = R.quantize(np.array([[896.0, -4.0, 1.0, 0.0]], np.float32), "float32", 4)
    assert list(w[0]) == [0x7E, 0xC0, 0x30, 0x00, 0x00, 0x00, 0x00, 0x40]
    # amax 3: scale 3/448 as float32; pow2 rounds it up to 2**-7 (0x3C000000) and 3 -> 384 (0x7C)
    w = R.quantize(np.array([[3.0, 1.5, 0.0, -3.0]], np.float32), "float32", 4, pow2=False)
    assert w[0, 4:].view("<f4")[0] == np.float32(3.0) / np.float32(448.0)
    assert list(w[0, :4]) == [0x7E, 0x76, 0x00, 0xFE]  # 1.5 / (3 / 448) = 224 = 1.75 * 2**7
    w = R.quantize(np.array([[3.0, 1.5, 0.0, -3.0]], np.float32), "float32", 4, pow2=True)
    assert list(w[0]) == [0x7C, 0x74, 0x00, 0xFC, 0x00, 0x00, 0x00, 0x3C]  # 1.5 * 128 = 192 = 1.5 * 2**7
    # two groups: an all-zero group has a zero scale, an Inf group scale Inf (finite -> +-0, Inf -> NaN)
    w = R.quantize(np.array([[0.0, 0.0, np.inf, -1.0]], np.float32), "float32", 2)
    assert list(w[0]) == [0, 0, 0x7F, 0x80] + [0, 0, 0, 0] + [0x00, 0x00, 0x80, 0x7F]
    # a group of NaNs: no finite amax, scale 0, every channel 0x7F
    w = R.quantize(np.array([[np.nan, -np.nan]], np.float32), "float32", 2)
    assert list(w[0]) == [0x7F, 0x7F, 0, 0, 0, 0]
    # bfloat16 and float16 sources read their bits
    assert np.array_equal(R.quantize(as_bits([[448.0, -1.0]], "bfloat16"), "bfloat16", 2),
                          [[0x7E, 0xB8, 0, 0, 0x80, 0x3F]])
    assert np.array_equal(R.quantize(as_bits([[448.0, 0.5]], "float16"), "float16", 1),
                          [[0x7E, 0x7E] + f32_bytes(1.0) + f32_bytes(np.float32(0.5) / np.float32(448.0))])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pow2", [False, True])
def test_reference_matches_the_brute_force_encoder(name, pow2):
    # finite values of many magnitudes: every q byte is the brute-force code of x / s (s from the
    # wire row), NaN-free groups only (NaN is 0x7F)
    g = np.random.default_rng([7, len(name), pow2])
    rows, H, group = 24, 32, 8
    lo, hi = (-12, 12) if name == "float16" else (-40, 40)  # finite in the source dtype
    x = g.standard_normal((rows, H)) * 2.0 ** g.integers(lo, hi, size=(rows, 1))
    x[g.random(x.shape) < 0.05] = 0.0
    src = as_bits(x, name)
    w = R.quantize(src, name, group, pow2)
    x32 = R.as_float32(src, name)
    q, s = R.split(w, H, group)
    for r in range(rows):
        for c in range(H):
            sc = s[r, c // group]
            v = x32[r, c] if sc == 0 else np.float32(x32[r, c]) / sc
            assert q[r, c] == brute_e4m3(v), (r, c, x32[r, c], sc)
    # the scale: amax / 448 in float32 (pow2: the next power of two up)
    amax = np.abs(x32).reshape(rows, -1, group).max(axis=2)
    want = (amax / np.float32(448.0)).astype(np.float32)
    if pow2:
        want = np.where(want == 0, 0, 2.0 ** np.ceil(np.log2(want.astype(np.float64)))).astype(np.float32)
    assert np.array_equal(s, want)
    # dequantized within the e4m3 step (1/16 relative) plus the smallest subnormal step of the group
    deq = R.dequantize(w, H, group)
    tol = np.abs(x32) / 16 + np.repeat(s, group, axis=1) * 2.0 ** -10
    assert (np.abs(deq - x32) <= tol).all()


# -- the Numba kernel against the reference -------------------------------------------------------

def mixed_rows(g, rows, H, name):
    """Source bits: rows of random bit patterns (NaN, +-Inf, subnormals and every exponent), rows
    of finite values at one magnitude per row (float32 down to its subnormals), rows of finite
    values with a sprinkle of the special values of tests/bit_patterns.py."""
    bits = STORAGE[name]
    out = g.integers(0, np.iinfo(bits).max, size=(rows, H), dtype=bits, endpoint=True)
    lo, hi = {"float32": (-150, 120), "float16": (-26, 14), "bfloat16": (-135, 120)}[name]
    for r in range(rows):
        kind = r % 3
        if kind == 0:
            continue
        with np.errstate(all="ignore"):
            v = g.standard_normal(H) * 2.0 ** int(g.integers(lo, hi))
            out[r] = as_bits(v, name)
        if kind == 2:
            pick = g.random(H) < 0.03
            out[r, pick] = np.array(SPECIAL_BITS[name], bits)[g.integers(0, len(SPECIAL_BITS[name]), int(pick.sum()))]
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("group", [1, 16, 128, "H"])
@pytest.mark.parametrize("pow2", [False, True])
def test_kernel_equals_the_reference_bit_for_bit(name, group, pow2):
    g = np.random.default_rng([11, NAMES.index(name), str(group).__hash__() & 0xFFFF, pow2])
    for H in (128, 256):
        grp = H if group == "H" else group
        src = mixed_rows(g, 60, H, name)
        before = src.copy()
        got = quantize(src, name, grp, pow2)
        want = R.quantize(src, name, grp, pow2)
        bad = np.argwhere(got != want)
        assert not bad.size, (f"H={H} group={grp}: {len(bad)} bytes differ, first {tuple(bad[0])}: "
                              f"got {got[tuple(bad[0])]:#x} want {want[tuple(bad[0])]:#x}")
        assert np.array_equal(src, before)  # the source is read only
        # the logical dtype's own array is accepted as storage too (bfloat16: ml_dtypes)
        got2 = quantize(src.view(LOGICAL[name]), name, grp, pow2)
        assert np.array_equal(got2, want)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pow2", [False, True])
def test_kernel_edge_cases(name, pow2):
    rows, want_rows = [], []

    def case(values, expect_q=None, expect_s=None):
        rows.append(values)
        want_rows.append((expect_q, expect_s))

    inf, nan = np.inf, np.nan
    case([0.0] * 8, [0] * 8, 0.0)                                   # all zeros: zero scale, zero bytes
    case([-0.0, 0.0] * 4, [0x80, 0] * 4, 0.0)                        # -0.0 keeps its sign
    case([448.0, -448.0, 0.0, -0.0, 1.0, -1.0, 0.5, 2.0],             # scale exactly 1
         [0x7E, 0xFE, 0, 0x80, 0x38, 0xB8, 0x30, 0x40], 1.0)
    # RNE ties in the normal range (scale 1): 1+1/16 -> 1 (even), 1+3/16 -> 1.25 (even),
    # 432 (between 416 and 448) -> 448 (even mantissa 110), 424 -> 416, 440 -> 448, 17 -> 16
    case([448.0, 1.0625, 1.1875, 432.0, 424.0, 440.0, 17.0, 19.0],
         [0x7E, 0x38, 0x3A, 0x7E, 0x7D, 0x7E, 0x58, 0x5A], 1.0)
    # ties in the subnormal e4m3 range (scale 1, step 2**-9): 0.5, 1.5, 2.5 steps -> 0, 2, 2;
    # 7.5 steps -> 8 (the smallest normal, 2**-6)
    t = 2.0 ** -10
    case([448.0, t, 3 * t, 5 * t, 15 * t, -3 * t, 2.0 ** -6, 7 * 2.0 ** -9],
         [0x7E, 0x00, 0x02, 0x02, 0x08, 0x82, 0x08, 0x07], 1.0)
    case([nan] * 8, [0x7F] * 8, 0.0)                                  # NaNs only: scale 0, NaN bytes
    case([nan, 1.0, -nan, -1.0, 0.0, 2.0, 4.0, 448.0], [0x7F, 0x38, 0x7F, 0xB8, 0, 0x40, 0x48, 0x7E], 1.0)
    case([inf, 1.0, -1.0, 0.0, -0.0, nan, 3.0, -2.0],                 # Inf: scale Inf, finite -> +-0, Inf -> NaN
         [0x7F, 0, 0x80, 0, 0x80, 0x7F, 0, 0x80], inf)
    case([-inf, 448.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0x7F] + [0] * 7, inf)
    case([896.0, -448.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0x7E, 0xF6, 0x30, 0, 0, 0, 0, 0], 2.0)  # scale 2
    src = as_bits(rows, name)
    H = 8
    for group in (8, 4, 1):
        got = quantize(src, name, group, pow2)
        want = R.quantize(src, name, group, pow2)
        assert np.array_equal(got, want), (group, np.argwhere(got != want)[:4])
    got = quantize(src, name, 8, pow2)
    q, s = R.split(got, H, 8)
    for r, (eq, es) in enumerate(want_rows):
        if eq is not None:
            assert list(q[r]) == eq, (r, rows[r], [hex(v) for v in q[r]])
        if es is not None:
            assert s[r, 0] == es or (np.isinf(es) and np.isinf(s[r, 0]) and s[r, 0] > 0), (r, s[r, 0])


def test_kernel_saturates_values_past_448_after_a_coarse_subnormal_scale():
    # a float32 subnormal amax of 600 * 2**-149 gives the scale 1 * 2**-149 (600/448 rounded to
    # the subnormal grid), so x / s = k exactly for x = k * 2**-149: every integer 0..600 goes
    # through the encoder, 448 <= k <= 600 (across 464 and 480) saturating to 448, ties to even
    H = 608
    k = np.arange(H, dtype=np.uint32)
    k[k > 600] = 0
    src = np.stack([k, k | np.uint32(0x80000000)])
    got = quantize(src, "float32", H, False)
    assert np.array_equal(got, R.quantize(src, "float32", H, False))
    q, s = R.split(got, H, H)
    assert s[0, 0].view(np.uint32) == 1 and s[1, 0].view(np.uint32) == 1
    assert list(q[0]) == [brute_e4m3(float(v)) for v in k]
    assert list(q[1]) == [0x80 | brute_e4m3(float(v)) for v in k]
    assert (q[0, 448:601] == 0x7E).all() and q[0, 447] == 0x7E and q[0, 17] == 0x58 and q[0, 9] == 0x51
    # pow2: the scale is clamped up to 2**-126, the values become e4m3 zeros
    got = quantize(src, "float32", H, True)
    assert np.array_equal(got, R.quantize(src, "float32", H, True))
    q, s = R.split(got, H, H)
    assert s[0, 0] == 2.0 ** -126 and (q[0] == 0).all() and (q[1, 1:601] == 0x80).all()


def test_kernel_amax_whose_scale_underflows_to_zero():
    # amax = 2**-149 * 3: amax / 448 rounds to 0 in float32; the reference (and the kernel) then
    # keep the values as they are, which encode as e4m3 zeros; the scale is 0 with pow2 too
    src = np.array([[3, 1, 0x80000002, 0]], np.uint32)
    for pow2 in (False, True):
        got = quantize(src, "float32", 4, pow2)
        assert np.array_equal(got, R.quantize(src, "float32", 4, pow2))
        assert list(got[0]) == [0, 0, 0x80, 0, 0, 0, 0, 0]


# descriptor values: small (in and around the buffers), negative, and far past the end
desc_value = st.one_of(st.integers(-3, 24), st.integers(-(2**62), -1), st.integers(2**40, 2**62))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), src_rows=st.integers(0, 20), dst_rows=st.integers(0, 20),
       hg=st.sampled_from([(4, 1), (8, 4), (16, 16), (32, 8)]), pow2=st.booleans(), i=st.integers(0, 3),
       fields=st.lists(desc_value, min_size=4, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_kernel_descriptor_window(name, src_rows, dst_rows, hg, pow2, i, fields, seed):
    # copy_rows' record and clamps: dst[d0 + j] = quantize(src[s0 + j]) for j < valid, zero bytes
    # for valid <= j < rows, nothing else written (dst poisoned); src and desc untouched
    H, group = hg
    g = np.random.default_rng(seed)
    src = mixed_rows(g, src_rows, H, name)
    W = H + 4 * (H // group)
    dst = g.integers(1, 256, size=(dst_rows, W), dtype=np.uint8)
    desc = g.integers(-5, 50, size=4 * (i + 1) + int(g.integers(0, 3))).astype(np.int64)
    desc[4 * i:4 * i + 4] = fields
    s0, nv, d0, nr = (max(int(v), 0) for v in fields)
    valid = max(min(nv, src_rows - s0), 0)
    rows = max(min(nr, dst_rows - d0), 0)
    expect = dst.copy()
    for j in range(rows):
        expect[d0 + j] = R.quantize(src[s0 + j:s0 + j + 1], name, group, pow2)[0] if j < valid else 0
    src_before, desc_before = src.copy(), desc.copy()
    assert _host.quantize_rows(src, dst, desc, i, group, pow2, name) is dst
    assert np.array_equal(dst, expect)
    assert np.array_equal(src, src_before) and np.array_equal(desc, desc_before)


def test_kernel_argument_errors_name_the_argument():
    src = np.zeros((4, 8), np.float32)
    dst = np.zeros((4, 16), np.uint8)  # H=8, group 4: 8 + 2*4
    d = np.array([0, 4, 0, 4], np.int64)
    q = _host.quantize_rows
    q(src, dst, d, 0, 4, False, "float32")  # the valid call
    cases = [
        (lambda: q(src, dst, d, 0, 4, False, "int32"), "dtype"),
        (lambda: q(src, dst, d, 0, 4, False, "float64"), "dtype"),
        (lambda: q(src, dst, d, 0, 4, False, "float16"), "src"),          # 4-byte items, not float16 storage
        (lambda: q(src.astype(np.float16), dst, d, 0, 4, False, "float32"), "src"),
        (lambda: q(src, dst, d, 0, 3, False, "float32"), "group"),         # does not divide 8
        (lambda: q(src, dst, d, 0, 0, False, "float32"), "group"),
        (lambda: q(src, dst, d, 0, -4, False, "float32"), "group"),
        (lambda: q(src, np.zeros((4, 15), np.uint8), d, 0, 4, False, "float32"), "dst"),  # wrong wire width
        (lambda: q(src, np.zeros((4, 16), np.int8), d, 0, 4, False, "float32"), "dst"),
        (lambda: q(src, np.zeros((4, 4), np.float32), d, 0, 4, False, "float32"), "dst"),
        (lambda: q(np.zeros((4, 16), np.float32)[:, ::2], dst, d, 0, 4, False, "float32"), "src"),
        (lambda: q(np.zeros(32, np.float32), dst, d, 0, 4, False, "float32"), "src"),
        (lambda: q(src, np.zeros((4, 32), np.uint8)[:, ::2], d, 0, 4, False, "float32"), "dst"),
        (lambda: q(src, d, d, 0, 4, False, "float32"), "dst"),
        (lambda: q(src, dst, d.astype(np.int32), 0, 4, False, "float32"), "desc"),
        (lambda: q(src, dst, d, 1, 4, False, "float32"), "desc"),          # record 1 needs 8 entries
        (lambda: q(src, dst, d, -1, 4, False, "float32"), "i"),
        (lambda: q(src, dst, d.reshape(2, 2), 0, 4, False, "float32"), "desc"),
    ]
    ro = dst.copy()
    ro.flags.writeable = False
    cases.append((lambda: q(src, ro, d, 0, 4, False, "float32"), "dst"))
    for k, (fn, arg) in enumerate(cases):
        with pytest.raises(InputError) as ei:
            fn()
        msg = str(ei.value)
        assert msg.startswith(f"quantize_rows: {arg}") and msg[len(f"quantize_rows: {arg}")] in " =", (k, arg, msg)


# -- DpAttention.gather_fp8 under mpiexec (host backend): tests/mpi/fp8_scenarios.py --------------------

def _run(nprocs, *argv, timeout=180):
    res = check_mpi([SCRIPT, *map(str, argv)], nprocs, timeout=timeout)
    print(res.results[0])
    return res


# (T, argv): T = 2 runs every A in {1, 2} x nccl / p2p / push x max_len / sum_len / varlen / auto x
# float32 / float16 / bfloat16 (the format cycling over group 16, H, 4, 1 and pow2 on/off); T = 3
# (A = 1, three replicas) the P2P transports in bfloat16 and float16; T = 4 every A, transport and
# policy in bfloat16; T = 4 in two pretend nodes (DPGATHER_P2P_NODES=2: the P2P
# transports inside each node, the node blocks over the inter-node all-gather)
MATRIX = [
    (2, (), None),
    (3, ("--transports", "p2p,push", "--dtypes", "bfloat16,float16", "--seed", 3), None),
    (4, ("--dtypes", "bfloat16", "--seed", 4), None),
    (4, ("--transports", "p2p,push", "--dtypes", "float16", "--policies", "auto", "--seed", 42), 2),
]


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs,argv,nodes", MATRIX, ids=["T2", "T3", "T4", "T4-2nodes"])
def test_gather_fp8_wire_rows_are_the_reference_bit_for_bit(nprocs, argv, nodes):
    res = check_mpi([SCRIPT, "matrix", "--steps", "3", *map(str, argv)], nprocs, timeout=180,
                    env={"DPGATHER_P2P_NODES": nodes} if nodes else None)
    A = len([a for a in (1, 2) if nprocs % a == 0])
    count = {k: argv[argv.index(k) + 1].count(",") + 1 if k in argv else n
             for k, n in (("--transports", 3), ("--dtypes", 3), ("--policies", 4))}
    for got in res.results.values():
        assert got["configs"] == A * count["--transports"] * count["--dtypes"] * count["--policies"], got
        assert got["checks"] > 50 * got["configs"], got


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs,argv", [(2, ()), (4, ("--A", "2", "--transports", "push", "--dtypes",
                                                                 "bfloat16", "--seed", 44))], ids=["T2", "T4-A2"])
def test_gather_fp8_async_micro_batches_and_the_graph_runner(nprocs, argv):
    res = _run(nprocs, "overlap", *argv)
    for got in res.results.values():
        assert got["graph_steps"] > 0 and got["checks"] > 100, got


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs,argv", [(2, ()), (4, ("--transports", "nccl", "--dtypes", "float16"))],
                         ids=["T2", "T4"])
def test_gather_fp8_failure_path_and_config_errors(nprocs, argv):
    res = _run(nprocs, "badinput", "--timeout", 10, *argv)
    for got in res.results.values():
        assert got["checks"] > 100, got


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("framework,dtype", [("torch", "bfloat16"), ("torch", "float32"), ("jax", "bfloat16")])
def test_gather_fp8_returns_the_callers_framework(framework, dtype):
    require(framework)
    res = _run(2, "interop", "--framework", framework, "--dtypes", dtype, "--steps", 3)
    mods = {"torch": ("torch",), "jax": ("jax", "jaxlib")}[framework]
    for got in res.results.values():
        # each field in the framework (the scenario also checks the classes, dtypes and values)
        types = [t.split(":") for t in got["types"]]
        assert sorted((f, dt) for f, _, dt in types) == [("q", "uint8"), ("scales", "float32"), ("wire", "uint8")], got
        assert all(m in mods for _, m, _ in types), got
        assert got["checks"] > 100, got


@pytest.mark.parametrize("rows", [0, 3])
def test_jax_split_of_wire_rows_including_a_step_of_no_rows(rows):
    # Fp8Views.export for a JAX caller splits the wire rows with XLA; with no rows its
    # reshape(n, -1, 4) divided by zero (ZeroDivisionError from gather_fp8 on a step whose
    # gathered_rows is 0): fixed in dpgather/_fp8.py by naming the group count
    jax = require("jax")
    from dpgather._backends import HostBackend
    from dpgather._fp8 import Fp8Views
    from dpgather.core import Fp8Format

    H, fmt = 32, Fp8Format(8, False)
    g = np.random.default_rng(rows)
    src = as_bits(g.standard_normal((rows, H)), "float32")
    G = R.quantize(src, "float32", 8) if rows else np.zeros((0, fmt.wire_bytes(H)), np.uint8)
    q, s, w = Fp8Views(HostBackend(), H, fmt).export(np.ascontiguousarray(G), ("jax", False))
    assert all(isinstance(a, jax.Array) for a in (q, s, w))
    assert (q.shape, s.shape, w.shape) == ((rows, H), (rows, H // 8), G.shape)
    assert (str(q.dtype), str(s.dtype), str(w.dtype)) == ("uint8", "float32", "uint8")
    rq, rs = R.split(G, H, 8)
    assert np.array_equal(np.asarray(q), rq) and np.array_equal(np.asarray(s), rs) and np.array_equal(np.asarray(w), G)
