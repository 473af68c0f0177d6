"""Property tests of the host kernels (Numba) and their NumPy twins against an independent model.

The model below is a plain per-row loop written from docs/internals.md, sharing no code with
dpgather.kernels._host. Destinations are poisoned (never zeros), every row is compared as bytes
(so NaN payloads and bfloat16 compare exactly), and the source must come back unchanged.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpgather.core.errors import InputError
from dpgather.kernels import _host

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64, np.uint8]
IMPLS = [pytest.param(_host.copy_rows, id="numba"), pytest.param(_host.copy_rows_ref, id="numpy")]
MASKS = [pytest.param(_host.mask_rows, id="numba"), pytest.param(_host.mask_rows_ref, id="numpy")]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# descriptor values: small (in and around the buffers), negative, and far past the end
desc_value = st.one_of(
    st.integers(-3, 24),
    st.integers(-(2**62), -1),
    st.integers(2**40, 2**62),
)


def model_copy(src, dst, d):
    """dst[ds + j] = src[ss + j] if j < valid else 0, for j < rows (clamped; negatives -> 0)."""
    ss, nv, ds, nr = (v if v > 0 else 0 for v in (int(x) for x in d))
    out = dst.copy()
    s8 = np.frombuffer(src.tobytes(), np.uint8).reshape(src.shape[0], src.shape[1] * src.itemsize)
    o8 = np.frombuffer(bytearray(out.tobytes()), np.uint8).reshape(out.shape[0], out.shape[1] * out.itemsize)
    valid = max(min(nv, src.shape[0] - ss), 0)
    rows = max(min(nr, dst.shape[0] - ds), 0)
    for j in range(rows):
        o8[ds + j] = s8[ss + j] if j < valid else 0
    return o8.view(dst.dtype).reshape(dst.shape)


def model_mask(ids, d, i, num_slots, fill):
    out = ids.copy()
    for s in range(num_slots):
        off, n, sr = (v if v > 0 else 0 for v in (int(x) for x in d[i + 3 * s : i + 3 * s + 3]))
        for r in range(off + n, off + sr):
            if r >= out.shape[0]:
                break
            out[r, :] = fill
    return out


def poisoned(shape, dtype, rng):
    """Random non-zero bytes: a kernel that forgets a row (or zero-fills wrongly) shows up."""
    a = np.empty(shape, dtype=dtype)
    a.view(np.uint8)[...] = rng.integers(1, 256, size=a.view(np.uint8).shape, dtype=np.uint8)
    return a


@pytest.mark.parametrize("copy", IMPLS)
@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    src_rows=st.integers(0, 20),
    dst_rows=st.integers(0, 20),
    width=st.integers(0, 9),
    i=st.integers(0, 3),
    fields=st.lists(desc_value, min_size=4, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    readonly_src=st.booleans(),
)
def test_copy_rows(copy, dtype, src_rows, dst_rows, width, i, fields, seed, readonly_src):
    rng = np.random.default_rng(seed)
    src = poisoned((src_rows, width), dtype, rng)
    src_before = src.copy()
    if readonly_src:
        src.flags.writeable = False
    dst = poisoned((dst_rows, width), dtype, rng)
    desc = rng.integers(-5, 50, size=4 * (i + 1) + int(rng.integers(0, 3))).astype(np.int64)
    desc[4 * i : 4 * i + 4] = fields
    desc_before = desc.copy()
    expect = model_copy(src, dst, fields)
    assert copy(src, dst, desc, i) is dst
    assert np.array_equal(dst.view(np.uint8), expect.view(np.uint8))
    assert np.array_equal(src.view(np.uint8), src_before.view(np.uint8))
    assert np.array_equal(desc, desc_before)


@pytest.mark.parametrize("copy", IMPLS)
@SETTINGS
@given(
    src_dtype=st.sampled_from(DTYPES),
    dst_dtype=st.sampled_from(DTYPES),
    width=st.integers(1, 8),
    rows=st.integers(0, 6),
    fields=st.lists(st.integers(-2, 8), min_size=4, max_size=4),
)
def test_copy_rows_across_dtypes(copy, src_dtype, dst_dtype, width, rows, fields):
    # Rows move as bytes: any pair of dtypes with equal row bytes works (bfloat16 <-> uint16...).
    rng = np.random.default_rng(rows * 131 + width)
    src = poisoned((rows, width * 8 // np.dtype(src_dtype).itemsize), src_dtype, rng)
    dst = poisoned((rows + 2, width * 8 // np.dtype(dst_dtype).itemsize), dst_dtype, rng)
    expect8 = model_copy(src, dst.view(src.dtype).reshape(dst.shape[0], src.shape[1]), fields)
    copy(src, dst, np.array(fields, np.int64), 0)
    assert np.array_equal(dst.view(np.uint8), expect8.view(np.uint8))


@pytest.mark.parametrize("mask", MASKS)
@SETTINGS
@given(
    id_dtype=st.sampled_from([np.int32, np.int64]),
    rows=st.integers(0, 30),
    k=st.integers(1, 9),
    i=st.integers(0, 5),
    num_slots=st.integers(0, 5),
    values=st.lists(desc_value, min_size=15, max_size=15),
    fill=st.sampled_from([-1, 0, 7, -(2**31)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_mask_rows(mask, id_dtype, rows, k, i, num_slots, values, fill, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(rows, k)).astype(id_dtype)
    desc = rng.integers(-3, 40, size=i + 3 * num_slots + int(rng.integers(0, 3))).astype(np.int64)
    desc[i : i + 3 * num_slots] = values[: 3 * num_slots]
    desc_before = desc.copy()
    expect = model_mask(ids, desc, i, num_slots, fill)
    assert mask(ids, desc, i, num_slots, fill) is ids
    assert ids.dtype == np.dtype(id_dtype)
    assert np.array_equal(ids, expect)
    assert np.array_equal(desc, desc_before)


def test_mask_rows_slot_layout():
    # Plan-like layout: 3 slots of 4 rows holding 2, 4 and 0 tokens.
    ids = np.arange(24, dtype=np.int32).reshape(12, 2)
    desc = np.array([0, 2, 4, 4, 4, 4, 8, 0, 4], np.int64)
    _host.mask_rows(ids, desc, 0, 3, -1)
    masked = [r for r in range(12) if (ids[r] == -1).all()]
    assert masked == [2, 3, 8, 9, 10, 11]


@pytest.mark.parametrize("copy", IMPLS)
def test_copy_rows_errors(copy):
    f32 = np.zeros((4, 3), np.float32)
    d = np.zeros(4, np.int64)
    with pytest.raises(InputError, match="bytes"):
        copy(f32, np.zeros((4, 3), np.float16), d, 0)
    with pytest.raises(InputError, match="desc"):
        copy(f32, f32.copy(), np.zeros(4, np.int32), 0)
    with pytest.raises(InputError, match="at least 8"):
        copy(f32, f32.copy(), d, 1)
    with pytest.raises(InputError, match="i must be"):
        copy(f32, f32.copy(), d, -1)
    with pytest.raises(InputError, match="C-contiguous"):
        copy(np.zeros((4, 6), np.float32)[:, ::2], f32.copy(), d, 0)
    with pytest.raises(InputError, match="2-D"):
        copy(np.zeros(12, np.float32), f32.copy(), d, 0)
    ro = f32.copy()
    ro.flags.writeable = False
    with pytest.raises(InputError, match="writable"):
        copy(f32, ro, d, 0)


@pytest.mark.parametrize("mask", MASKS)
def test_mask_rows_errors(mask):
    d = np.zeros(6, np.int64)
    with pytest.raises(InputError, match="int32 or int64"):
        mask(np.zeros((4, 2), np.float32), d, 0, 2, -1)
    with pytest.raises(InputError, match="at least 9"):
        mask(np.zeros((4, 2), np.int32), d, 3, 2, -1)
    with pytest.raises(InputError, match="fill"):
        mask(np.zeros((4, 2), np.int32), d, 0, 2, 2**40)
    with pytest.raises(InputError, match="num_slots"):
        mask(np.zeros((4, 2), np.int64), d, 0, -1, -1)


def test_large_copy_matches_numpy():
    # One big copy through the vectorised path, unaligned start rows and an odd row size.
    rng = np.random.default_rng(0)
    src = rng.standard_normal((3001, 257)).astype(ml_dtypes.bfloat16)
    dst = poisoned((4000, 257), ml_dtypes.bfloat16, rng)
    desc = np.array([7, 2500, 13, 3000], np.int64)
    expect = model_copy(src, dst, desc)
    _host.copy_rows(src, dst, desc, 0)
    assert np.array_equal(dst.view(np.uint8), expect.view(np.uint8))
