"""Numba host twins of the copy kernels, plus their pure-NumPy references.

Semantics (docs/internals.md, identical to ``kernels/copy.cu``):

``copy_rows(src, dst, desc, i)`` with ``desc[4*i : 4*i+4] = (src_start, n_valid, dst_start, n_rows)``
writes ``dst[dst_start + j] = src[src_start + j] if j < valid else 0`` for ``j < rows``, where
``valid = min(n_valid, src.shape[0] - src_start)`` and ``rows = min(n_rows, dst.shape[0] - dst_start)``
are clamped at 0. Negative descriptor values count as 0. Nothing outside ``src`` is read and
nothing outside ``dst[dst_start : dst_start + rows]`` is written. Rows move as bytes, so one
compiled kernel serves every dtype (bfloat16 included); ``src`` and ``dst`` need the same row size
in bytes. Source and destination regions must not overlap.

``mask_rows(ids, desc, i, num_slots, fill)`` with
``desc[i + 3*s : i + 3*s + 3] = (slot_offset, n_tokens, slot_rows)`` sets
``ids[slot_offset + n_tokens : slot_offset + slot_rows, :] = fill`` for every slot ``s``, skipping
rows outside ``ids``. ``ids`` is a C-contiguous ``[rows, k]`` int32 or int64 array.

``quantize_rows(src, dst, desc, i, group, pow2, dtype)``: ``copy_rows``' record and clamps, the
copied rows quantized into fp8 wire rows (docs/fp8.md; the CUDA twin is ``quantize_rows<E>`` in
``kernels/copy.cu``, bit for bit): per group of ``group`` channels the scale ``s = amax / 448``
(float32 division; ``pow2``: a nonzero one rounded up to a power of two ``>= 2**-126``; 0 when ``amax`` is 0 or ``amax / 448`` underflows),
``amax`` the largest non-NaN ``|x|``, each channel ``e4m3fn(x / s)`` (``x`` itself when ``s`` is
0), nearest even, saturated to +-448, NaN -> 0x7F; rows past ``valid`` are zero bytes.

``stream`` is accepted for signature parity with the CUDA twins and ignored.
Numba is imported on first use: importing this module never fails without it.
"""

import numpy as np

from dpgather.core.dtypes import ID_DTYPES
from dpgather.core.errors import BackendUnavailable, InputError
from dpgather.core.rows import check_desc, check_rows

__all__ = ["copy_rows", "copy_rows_unchecked", "mask_rows", "copy_rows_ref", "mask_rows_ref",
           "quantize_rows", "quantize_rows_unchecked", "numba_available", "check_numba"]

_U8 = np.dtype(np.uint8)

_kernels = None  # (copy kernel, mask kernel, quantize kernel) once compiled
#: logical source dtype of quantize_rows -> (unsigned storage of its bits, kind code of the kernel)
_QUANT_KIND = {"float32": (np.dtype(np.uint32), 0), "float16": (np.dtype(np.uint16), 1),
               "bfloat16": (np.dtype(np.uint16), 2)}


def numba_available():
    """True when Numba can be imported (the host kernels need it; the ``*_ref`` twins do not)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _missing(detail):
    return BackendUnavailable("the host kernels need Numba: `pip install numba` (or `pip install dpgather[host]`); "
                              + detail)


def check_numba():
    """Raise :class:`BackendUnavailable` now when Numba is not installed, without importing it.

    Importing Numba and loading the kernels from its cache costs about 0.4 s of CPU per process;
    the host backend checks at construction and loads on its first kernel call (a P2P-only
    step never needs one)."""
    import importlib.util
    import sys

    if "numba" in sys.modules:  # imported already, or blocked (None)
        installed = sys.modules["numba"] is not None
    else:
        installed = importlib.util.find_spec("numba") is not None
    if not installed:
        raise _missing("it is not installed")


def _build():
    global _kernels
    try:
        from numba import njit
    except ImportError as e:
        raise _missing(f"importing it failed with: {e}") from e

    @njit(cache=True, nogil=True)
    def copy_kernel(src, dst, row_bytes, src_rows, dst_rows, desc, base):
        # src, dst: flat uint8 views of [src_rows, row_bytes] / [dst_rows, row_bytes].
        s0 = max(desc[base], 0)
        nv = max(desc[base + 1], 0)
        d0 = max(desc[base + 2], 0)
        nr = max(desc[base + 3], 0)
        valid = min(nv, max(src_rows - s0, 0))
        rows = min(nr, max(dst_rows - d0, 0))
        ncopy = min(valid, rows)
        a = d0 * row_bytes
        b = s0 * row_bytes
        nb = ncopy * row_bytes
        # Loops over 0-based local slices: LLVM turns these into vector moves/memset.
        d = dst[a : a + nb]
        s = src[b : b + nb]
        for k in range(nb):
            d[k] = s[k]
        z = dst[a + nb : (d0 + rows) * row_bytes]
        for k in range(z.shape[0]):
            z[k] = 0

    @njit(cache=True, nogil=True)
    def mask_kernel(ids, rows, width, desc, base, num_slots, fill):
        # ids: flat view of [rows, width]; every clamp keeps sums far from int64 overflow.
        for s in range(num_slots):
            p = base + 3 * s
            off = min(max(desc[p], 0), rows)
            n = min(max(desc[p + 1], 0), rows)
            sr = min(max(desc[p + 2], 0), rows)
            lo = min(off + n, rows)
            hi = min(off + sr, rows)
            if hi > lo:
                v = ids[lo * width : hi * width]
                for k in range(v.shape[0]):
                    v[k] = fill

    @njit(cache=True, nogil=True)
    def f32_bits(b, kind):
        # the float32 bits of one source element (exact): float32 as is, bfloat16 in the high
        # half, float16 widened (its subnormals are float32 normals)
        if kind == 0:
            return np.uint32(b)
        if kind == 2:
            return np.uint32(b) << np.uint32(16)
        h = np.uint32(b)
        sign = (h & np.uint32(0x8000)) << np.uint32(16)
        e = (h >> np.uint32(10)) & np.uint32(0x1F)
        m = h & np.uint32(0x3FF)
        if e == 31:
            return sign | np.uint32(0x7F800000) | (m << np.uint32(13))
        if e != 0:
            return sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
        if m == 0:
            return sign
        k = np.uint32(0)  # normalise m * 2^-24
        while (m & np.uint32(0x400)) == 0:
            m <<= np.uint32(1)
            k += np.uint32(1)
        return sign | ((np.uint32(113) - k) << np.uint32(23)) | ((m & np.uint32(0x3FF)) << np.uint32(13))

    @njit(cache=True, nogil=True)
    def e4m3(u, box, fbox):
        # float8 e4m3fn bits of the float32 with bits u (copy.cu's dpg::e4m3)
        sign = (u >> np.uint32(24)) & np.uint32(0x80)
        a = u & np.uint32(0x7FFFFFFF)
        if a > np.uint32(0x7F800000):
            return np.uint8(0x7F)
        if a >= np.uint32(0x43E00000):
            return np.uint8(sign | np.uint32(0x7E))
        if a < np.uint32(0x3C800000):
            box[0] = a
            return np.uint8(sign | np.uint32(np.rint(fbox[0] * np.float32(512.0))))
        return np.uint8(sign | (((a + np.uint32(0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20))
                                - np.uint32(960)))

    @njit(cache=True, nogil=True)
    def quant_kernel(src, dst, width, group, pow2, kind, src_rows, dst_rows, desc, base):
        # src: flat [src_rows * width] source bits; dst: flat uint8 [dst_rows * wire]
        s0 = max(desc[base], 0)
        nv = max(desc[base + 1], 0)
        d0 = max(desc[base + 2], 0)
        nr = max(desc[base + 3], 0)
        rows = min(nr, max(dst_rows - d0, 0))
        valid = min(min(nv, max(src_rows - s0, 0)), rows)
        groups = width // group
        wire = width + 4 * groups
        box = np.zeros(1, dtype=np.uint32)
        fbox = box.view(np.float32)
        for r in range(valid):
            srow = (s0 + r) * width
            q = (d0 + r) * wire
            for g in range(groups):
                m = np.uint32(0)
                for c in range(g * group, (g + 1) * group):
                    a = f32_bits(src[srow + c], kind) & np.uint32(0x7FFFFFFF)
                    if a <= np.uint32(0x7F800000) and a > m:
                        m = a
                sb = np.uint32(0)
                if m != 0:
                    box[0] = m
                    fbox[0] = fbox[0] / np.float32(448.0)
                    sb = box[0]
                    if pow2 and sb != 0:
                        if sb < np.uint32(0x00800000):
                            sb = np.uint32(0x00800000)
                        elif sb & np.uint32(0x007FFFFF):
                            sb = (sb & np.uint32(0x7F800000)) + np.uint32(0x00800000)
                box[0] = sb
                sc = fbox[0]
                for c in range(g * group, (g + 1) * group):
                    box[0] = f32_bits(src[srow + c], kind)
                    if sb != 0:
                        fbox[0] = fbox[0] / sc
                    dst[q + c] = e4m3(box[0], box, fbox)
                for k in range(4):
                    dst[q + width + 4 * g + k] = np.uint8((sb >> np.uint32(8 * k)) & np.uint32(0xFF))
        z = dst[(d0 + valid) * wire:(d0 + rows) * wire]
        for k in range(z.shape[0]):
            z[k] = 0

    _kernels = (copy_kernel, mask_kernel, quant_kernel)
    return _kernels


def _check_index(op, name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise InputError(f"{op}: {name} must be an int >= 0, got {v!r}")
    return int(v)


def _check_copy(src, dst, desc, i):
    check_rows(src, "src", op="copy_rows", of=np.ndarray)
    rb = src.shape[1] * src.dtype.itemsize
    check_rows(dst, "dst", op="copy_rows", of=np.ndarray, writable=True, row_bytes=rb)
    i = _check_index("copy_rows", "i", i)
    check_desc(desc, 4 * i + 4, op="copy_rows", of=np.ndarray)
    return rb, i


def _check_mask(ids, desc, i, num_slots, fill):
    check_rows(ids, "ids", op="mask_rows", of=np.ndarray, writable=True)
    if ids.dtype.name not in ID_DTYPES:
        raise InputError(f"mask_rows: ids must be int32 or int64, got {ids.dtype}")
    i = _check_index("mask_rows", "i", i)
    num_slots = _check_index("mask_rows", "num_slots", num_slots)
    check_desc(desc, i + 3 * num_slots, op="mask_rows", of=np.ndarray)
    info = np.iinfo(ids.dtype)
    if isinstance(fill, bool) or not isinstance(fill, (int, np.integer)) or not info.min <= fill <= info.max:
        raise InputError(f"mask_rows: fill must be an int representable as {ids.dtype}, got {fill!r}")
    return i, num_slots, int(fill)


def _flat_u8(a):
    return a.reshape(-1).view(_U8)


def copy_rows(src, dst, desc, i, stream=None):
    """Copy ``desc[4*i:4*i+4] = (src_start, n_valid, dst_start, n_rows)`` rows of ``src`` into
    ``dst`` with clamping and zero-fill (module docstring). Returns ``dst``.

    Raises:
        InputError: non-2-D / non-contiguous / read-only ``dst``, row sizes in bytes differ,
            ``desc`` is not a 1-D int64 array of at least ``4*i+4`` entries, ``i < 0``.
        BackendUnavailable: Numba is missing.
    """
    rb, i = _check_copy(src, dst, desc, i)
    k = _kernels or _build()
    if rb:
        k[0](_flat_u8(src), _flat_u8(dst), rb, src.shape[0], dst.shape[0], desc, 4 * i)
    return dst


def warm():
    """Compile (or load from Numba's cache) every kernel now, by running each once on a few
    bytes: the first call of a process otherwise takes seconds on a loaded machine, which one
    rank would pay inside a step while its peers wait in a collective."""
    rows = np.zeros((2, 4), dtype=np.uint8)
    desc = np.array([0, 1, 0, 2], dtype=np.int64)
    copy_rows_unchecked(rows, rows.copy(), desc, 0)
    for dt in (np.int32, np.int64):
        mask_rows(np.zeros((2, 1), dtype=dt), np.array([0, 1, 2], dtype=np.int64), 0, 1, -1)
    for name, (bits, _) in _QUANT_KIND.items():
        quantize_rows_unchecked(np.zeros((2, 4), dtype=bits), np.zeros((2, 8), dtype=_U8), desc, 0, 4, False, name)


def copy_rows_unchecked(src, dst, desc, i, stream=None):
    """:func:`copy_rows` without argument checks, for callers that validated already (the data
    plane): ``src``/``dst`` C-contiguous 2-D NumPy arrays with equal row bytes, ``desc`` a host
    int64 array holding record ``i``."""
    rb = dst.shape[1] * dst.dtype.itemsize
    if rb:
        (_kernels or _build())[0](_flat_u8(src), _flat_u8(dst), rb, src.shape[0], dst.shape[0], desc, 4 * i)
    return dst


def mask_rows(ids, desc, i, num_slots, fill, stream=None):
    """Set the padding rows of ``num_slots`` slots of ``ids`` to ``fill`` (module docstring).
    Returns ``ids``.

    Raises:
        InputError: ``ids`` not a C-contiguous writable 2-D int32/int64 array, ``desc`` shorter
            than ``i + 3*num_slots``, negative ``i``/``num_slots``, ``fill`` out of range.
        BackendUnavailable: Numba is missing.
    """
    i, num_slots, fill = _check_mask(ids, desc, i, num_slots, fill)
    k = _kernels or _build()
    if ids.size:
        k[1](ids.reshape(-1), ids.shape[0], ids.shape[1], desc, i, num_slots, fill)
    return ids


def quantize_rows(src, dst, desc, i, group, pow2, dtype, stream=None):
    """Quantize ``copy_rows``' window of ``src`` into the fp8 wire rows of ``dst`` (module
    docstring). ``src``: ``[src_rows, H]`` of logical ``dtype`` (float32, float16, bfloat16; any
    2-byte storage for the last two); ``dst``: uint8 ``[dst_rows, H + 4 * H // group]``. Returns
    ``dst``.

    Raises:
        InputError: bad shapes, dtypes, contiguity, ``group``, descriptor or index.
        BackendUnavailable: Numba is missing.
    """
    from ._cuda import _check_quantize

    check_rows(src, "src", op="quantize_rows", of=np.ndarray)
    check_rows(dst, "dst", op="quantize_rows", of=np.ndarray, writable=True)
    group = int(group)
    _check_quantize(src, dst, src.shape[1], group, dtype, _U8)
    i = _check_index("quantize_rows", "i", i)
    check_desc(desc, 4 * i + 4, op="quantize_rows", of=np.ndarray)
    return quantize_rows_unchecked(src, dst, desc, i, group, pow2, dtype)


def quantize_rows_unchecked(src, dst, desc, i, group, pow2, dtype, stream=None):
    """:func:`quantize_rows` without argument checks (the data plane's path)."""
    H = src.shape[1]
    if H and dst.shape[0]:
        bits, kind = _QUANT_KIND[dtype]
        (_kernels or _build())[2](src.reshape(-1).view(bits), dst.reshape(-1), H, group, bool(pow2), kind,
                                  src.shape[0], dst.shape[0], desc, 4 * i)
    return dst


# -- the NumPy twins (reference semantics, same validation) ----------------------------------

def copy_rows_ref(src, dst, desc, i, stream=None):
    """Pure-NumPy :func:`copy_rows` (same validation and semantics, no Numba)."""
    rb, i = _check_copy(src, dst, desc, i)
    s0, nv, d0, nr = (max(int(v), 0) for v in desc[4 * i : 4 * i + 4])
    valid = min(nv, max(src.shape[0] - s0, 0))
    rows = min(nr, max(dst.shape[0] - d0, 0))
    n = min(valid, rows)
    if rb:
        s = src.view(_U8).reshape(src.shape[0], rb)
        d = dst.view(_U8).reshape(dst.shape[0], rb)
        d[d0 : d0 + n] = s[s0 : s0 + n]
        d[d0 + n : d0 + rows] = 0
    return dst


def mask_rows_ref(ids, desc, i, num_slots, fill, stream=None):
    """Pure-NumPy :func:`mask_rows` (same validation and semantics, no Numba)."""
    i, num_slots, fill = _check_mask(ids, desc, i, num_slots, fill)
    rows = ids.shape[0]
    for s in range(num_slots):
        off, n, sr = (max(int(v), 0) for v in desc[i + 3 * s : i + 3 * s + 3])
        ids[min(off + n, rows) : min(off + sr, rows)] = fill
    return ids
