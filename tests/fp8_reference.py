"""The independent NumPy reference of the quantized gather's wire rows (docs/fp8.md).

Written from the documented formula with NumPy and ``ml_dtypes`` (its float8_e4m3fn cast rounds to
nearest even); never imported by the library. :func:`quantize` is what "quantize each replica's
rows locally" means in the exactness contract: the gathered wire rows must equal it bit for bit.
"""

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def as_float32(rows, dtype):
    """Rows of logical ``dtype`` (any storage) as float32, exactly."""
    if dtype == "bfloat16":
        return rows.view(np.uint16).astype(np.uint32).__lshift__(16).view(np.float32)
    if dtype == "float16":
        return rows.view(np.float16).astype(np.float32)
    return rows.view(np.float32).astype(np.float32)


def scales(x32, group, pow2):
    """``[rows, H / group]`` float32 scales of float32 rows."""
    g = x32.reshape(x32.shape[0], x32.shape[1] // group, group)
    mag = np.abs(g)
    amax = np.where(np.isnan(mag), np.float32(0), mag).max(axis=2).astype(np.float32)
    with np.errstate(all="ignore"):
        s = (amax / np.float32(448.0)).astype(np.float32)
    s[amax == 0] = 0
    if pow2:
        b = s.view(np.uint32).copy()
        sub = (b != 0) & (b < 0x00800000)
        frac = (b >= 0x00800000) & ((b & 0x007FFFFF) != 0)
        b[sub] = 0x00800000
        b[frac] = (b[frac] & 0x7F800000) + 0x00800000
        s = b.view(np.float32)
    return s


def quantize(rows, dtype, group, pow2=False):
    """Wire rows ``[rows, H + 4 H / group]`` uint8 of ``rows`` (docs/fp8.md)."""
    x32 = as_float32(np.ascontiguousarray(rows), dtype)
    n, H = x32.shape
    s = scales(x32, group, pow2)
    g = x32.reshape(n, H // group, group)
    sb = np.broadcast_to(s[:, :, None], g.shape)
    with np.errstate(all="ignore"):
        r = np.where(sb == 0, g, g / sb).astype(np.float32)
    r = np.clip(r, -448.0, 448.0)  # saturation (NaN stays NaN)
    q = r.astype(E4M3).view(np.uint8).reshape(n, H).copy()
    q[np.isnan(r.reshape(n, H))] = 0x7F
    out = np.zeros((n, H + 4 * (H // group)), dtype=np.uint8)
    out[:, :H] = q
    out[:, H:] = s.astype("<f4").view(np.uint8).reshape(n, 4 * (H // group))
    return out


def split(wire, H, group):
    """``(q, scales)`` of wire rows: ``[rows, H]`` uint8 and ``[rows, H / group]`` float32."""
    wire = np.ascontiguousarray(wire)
    return wire[:, :H], wire[:, H:].copy().view("<f4")


def dequantize(wire, H, group):
    """float32 ``q * s`` of wire rows (the example's dequantize-then-GEMM)."""
    q, s = split(wire, H, group)
    v = q.copy().view(E4M3).astype(np.float32).reshape(q.shape[0], -1, group)
    return (v * s[:, :, None]).reshape(q.shape[0], H)
