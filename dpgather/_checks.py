"""Argument checks of the data-plane calls: plain functions, each raising ``InputError`` that
names the argument, the value received and what was expected. Nothing here writes anything."""

import numpy as np

from dpgather.core import InputError
from dpgather.core.dtypes import BF16_STORAGE, DTYPES
from dpgather.core.rows import check_rows

__all__ = ["rows", "any_rows", "ids", "no_alias", "overlap", "contribution", "flag", "fill", "index"]

#: Storage dtypes ``scatter_logits`` accepts besides the logical ones (logits may be wider or
#: kept as raw 2-byte storage).
_EXTRA_LOGITS_STORAGE = ("uint16", "int16", "float64")


def rows(backend, x, name, storage, logical, width, writable=False):
    """``(array, origin)``: ``x`` as a C-contiguous ``[rows, width]`` backend array in the
    configured ``storage`` (no copy); ``origin`` says which framework it came from.
    ``writable``: the call writes into ``x`` (``out=``)."""
    arr, origin = backend.wrap(x, name, writable)
    if arr.dtype != storage:
        if logical == "bfloat16" and arr.dtype == BF16_STORAGE:
            arr = arr.view(storage)  # the documented bfloat16 storage on NumPy too
        else:
            raise InputError(_dtype_message(name, arr.dtype, logical))
    return check_rows(arr, name, width=width), origin


def any_rows(backend, a, name, writable=False):
    """``(array, origin)``: ``a`` as a C-contiguous 2-D backend array of any supported dtype."""
    arr, origin = backend.wrap(a, name, writable)
    if arr.dtype.name not in DTYPES and arr.dtype.name not in _EXTRA_LOGITS_STORAGE:
        raise InputError(f"{name} has unsupported dtype {arr.dtype}")
    return check_rows(arr, name), origin


def ids(backend, topk_ids, need):
    """``topk_ids`` as a C-contiguous 2-D int32/int64 backend array of at least ``need`` rows."""
    arr, _ = backend.wrap(topk_ids, "topk_ids", True)
    if arr.dtype not in (np.int32, np.int64):
        raise InputError(f"topk_ids must be int32 or int64, got {arr.dtype}")
    check_rows(arr, "topk_ids")
    if arr.shape[0] < need:
        raise InputError(f"topk_ids must have at least plan.gathered_rows={need} rows, got {arr.shape[0]}")
    return arr


def no_alias(backend, a, name, roles, st, micro_batches):
    """``a`` must not overlap the buffers of ``roles`` of step ``st``'s arena (the call writes
    them)."""
    role = st.arena.contains(backend.ptr(a), a.nbytes)
    if role in roles:
        where = f" of micro-batch {st.mb}" if micro_batches > 1 else ""
        raise InputError(f"{name} overlaps dpgather's '{role}' buffer{where}, which this call writes; "
                         "pass a copy (views returned earlier are reused by later calls)")


def overlap(backend, a, b):
    """True when the bytes of ``a`` and ``b`` overlap."""
    pa, pb = backend.ptr(a), backend.ptr(b)
    return a.nbytes > 0 and b.nbytes > 0 and pa < pb + b.nbytes and pb < pa + a.nbytes


def contribution(value):
    """``"replicate"`` -> 0, ``"partial"`` -> 1."""
    if value not in ("replicate", "partial"):
        raise InputError(f"contribution must be 'replicate' or 'partial', got {value!r}")
    return int(value == "partial")


def flag(value, name):
    """A bool argument (``reduce``) as 0 or 1; no other value is taken as one."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r}")
    return int(value)


def fill(value, dtype):
    """``mask_topk_ids``' ``fill``: an int that fits ``dtype``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"fill must be an int, got {value!r}")
    info = np.iinfo(dtype)
    if not info.min <= int(value) <= info.max:
        raise InputError(f"fill={value} does not fit topk_ids' dtype {dtype} [{info.min}, {info.max}]")
    return int(value)


def index(value, name, n, hint=""):
    """An int in ``[0, n)`` (a micro-batch number)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise InputError(f"{name} must be an int in [0, {n}), got {value!r}{hint}")
    return int(value)


def _dtype_message(name, got, logical):
    hint = ""
    if logical == "bfloat16":
        hint = ("; bfloat16 data is ml_dtypes.bfloat16 or uint16 storage on the host backend, uint16 "
                "storage (or a torch bfloat16 tensor) on the CUDA backend"
                + ("; if these int16 values are bfloat16 bits, pass x.view(uint16)" if str(got) == "int16" else ""))
    return f"{name} must have dtype {logical} (this DpAttention's dtype), got {got}{hint}"
