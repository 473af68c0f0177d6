"""The one dtype table of dpgather: every layer looks dtypes up here.

A *logical* dtype is what the data means (``"bfloat16"``); its *storage* is how the bytes sit in
an array of the backend. NumPy has bfloat16 only through ``ml_dtypes``; CuPy has none (cupy#7527),
so on the CUDA backend bfloat16 is stored as ``uint16`` and the logical name travels beside the
array (NCCL is told ``ncclBfloat16``).

Columns of :data:`DTYPES`:

- ``itemsize``: bytes per element.
- ``nccl``: the attribute of ``cupy.cuda.nccl`` naming the NCCL datatype.
- ``mpi``: the attribute of ``mpi4py.MPI`` the host backend moves the elements as (2-byte floats
  travel as ``UINT16_T`` words).
- ``mpi_sum``: ``"native"`` when ``MPI.SUM`` gives the dtype's own arithmetic in every MPI we
  test, ``"own"`` when the host backend sums with its own ``MPI.Op`` (float16/bfloat16: no MPI
  type; uint8: Open MPI's ``op/avx`` saturates 8- and 16-bit integer sums, open-mpi/ompi#8045).
- ``ctype``: the C++ element type of the CUDA kernels (``cuda_fp16.h`` / ``cuda_bf16.h``).
- ``code``: a small integer for operation signatures.
- ``storages``: NumPy dtype names of the arrays that may hold it (CuPy has no bfloat16 and
  float16/bfloat16 travel as 2-byte words: ``uint16``/``int16`` hold both).
- ``acc``: the NumPy dtype name sums are computed in (float32 for float16/bfloat16, the dtype
  itself otherwise).

Sums use the dtype's own arithmetic, as NCCL does: integers wrap modulo 2**bits, float16 and
bfloat16 are added in float32 and rounded back after each step.
"""

from typing import NamedTuple

import numpy as np

from .errors import BackendUnavailable, InputError

__all__ = [
    "DType", "DTYPES", "LOGICAL_DTYPES", "ALIASES", "normalize_dtype", "host_storage",
    "cuda_storage", "logical_of_host", "BF16_STORAGE", "ID_DTYPES", "holds",
]


class DType(NamedTuple):
    name: str
    itemsize: int
    nccl: str
    mpi: str
    mpi_sum: str
    ctype: str
    code: int
    storages: tuple
    acc: str


#: Logical dtype name -> :class:`DType`.
DTYPES = {
    "float32": DType("float32", 4, "NCCL_FLOAT32", "FLOAT", "native", "float", 1, ("float32",), "float32"),
    "float16": DType("float16", 2, "NCCL_FLOAT16", "UINT16_T", "own", "__half", 2,
                     ("float16", "uint16", "int16"), "float32"),
    "bfloat16": DType("bfloat16", 2, "NCCL_BFLOAT16", "UINT16_T", "own", "__nv_bfloat16", 3,
                      ("bfloat16", "uint16", "int16"), "float32"),
    "int32": DType("int32", 4, "NCCL_INT32", "INT32_T", "native", "int", 4, ("int32",), "int32"),
    "int64": DType("int64", 8, "NCCL_INT64", "INT64_T", "native", "long long", 5, ("int64",), "int64"),
    "uint8": DType("uint8", 1, "NCCL_UINT8", "UINT8_T", "own", "unsigned char", 6, ("uint8",), "uint8"),
}

#: Logical dtype names, in the order documentation lists them.
LOGICAL_DTYPES = tuple(DTYPES)

#: Short names accepted wherever a dtype is configured (API and command line).
ALIASES = {
    "fp32": "float32", "f32": "float32", "float": "float32",
    "fp16": "float16", "f16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "i32": "int32", "i64": "int64", "u8": "uint8", "byte": "uint8",
}

#: Logical dtypes of token-id buffers (``mask_rows`` on both backends).
ID_DTYPES = ("int32", "int64")

#: The storage of bfloat16 where the array library has no bfloat16 (CuPy; also accepted on NumPy).
BF16_STORAGE = np.dtype(np.uint16)


def normalize_dtype(dtype, name="dtype", error=InputError):
    """The logical name of ``dtype`` (a name, an alias, a NumPy dtype or type, ml_dtypes.bfloat16).

    Raises:
        error (default :class:`InputError`): anything else, naming ``name`` and the accepted values.
    """
    if isinstance(dtype, str):
        key = ALIASES.get(dtype.lower(), dtype.lower())
        if key in DTYPES:
            return key
    elif dtype is not None and not isinstance(dtype, bool):
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is not None and dt.name in DTYPES:
            return dt.name
    raise error(f"{name} must be one of {LOGICAL_DTYPES} (or an alias such as 'bf16'), got {dtype!r}")


def _ml_bfloat16():
    try:
        import ml_dtypes
    except ImportError as e:
        raise BackendUnavailable(
            "bfloat16 on the host backend needs ml_dtypes: `pip install ml_dtypes` "
            "(or `pip install dpgather[host]`)") from e
    return np.dtype(ml_dtypes.bfloat16)


def host_storage(logical):
    """NumPy dtype holding ``logical`` on the host backend (bfloat16: ``ml_dtypes.bfloat16``)."""
    return _ml_bfloat16() if logical == "bfloat16" else np.dtype(logical)


def cuda_storage(logical):
    """NumPy dtype of the CuPy storage of ``logical`` (bfloat16: ``uint16``)."""
    return BF16_STORAGE if logical == "bfloat16" else np.dtype(logical)


def logical_of_host(np_dtype):
    """Logical name of a NumPy array dtype, or None (``uint16`` is storage, not a logical dtype)."""
    name = np.dtype(np_dtype).name
    return name if name in DTYPES else None


def holds(np_dtype, logical):
    """True when an array of NumPy dtype ``np_dtype`` may hold ``logical`` data (``storages``)."""
    return np.dtype(np_dtype).name in DTYPES[logical].storages
