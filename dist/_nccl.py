"""Thin adapter over ``cupy.cuda.nccl``: device pointers, element counts, NCCL names.

This layer knows nothing about arrays, shapes or streams objects. Every function takes
the CuPy ``NcclCommunicator`` object first, then the arguments of the NCCL C call of the
same name in the same order (``sendbuff``/``recvbuff`` as ``int`` device pointers,
``count`` in elements of ``datatype``, ``stream`` as an ``int`` ``cudaStream_t``). Calls
only enqueue work on the stream; they return before it runs. The array-level,
snake_case API is :class:`dpgather.dist.nccl.NcclCommunicator`.

CuPy is imported on first use, so importing this module never fails on a machine without
CuPy, NCCL or a GPU; :func:`available` says whether the functions can be used.

.. seealso:: https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/api/colls.html
"""

from __future__ import annotations

import functools
import warnings

from dpgather.core.errors import BackendUnavailable, ConfigError

__all__ = [
    "DTYPE_NAMES",
    "NCCL_SUM",
    "allGather",
    "allReduce",
    "available",
    "broadcast",
    "commAbort",
    "commDestroy",
    "commGetAsyncError",
    "commInitRank",
    "commSplit",
    "datatype",
    "error_type",
    "getUniqueId",
    "getVersion",
    "groupEnd",
    "groupStart",
    "has_comm_split",
    "reduce",
    "reduceScatter",
]

#: Logical dtype names (docs/internals.md) that have an NCCL datatype, and the item size
#: in bytes each must have in memory.
DTYPE_NAMES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "int8": 1,
    "float64": 8,
}

NCCL_SUM = 0  # ncclSum, fixed by the NCCL ABI (ncclRedOp_t)

#: Minimum NCCL version (``getVersion()`` encoding) that has ``ncclCommSplit``.
COMM_SPLIT_VERSION = 21801


@functools.cache
def _import():
    """``(cupy, cupy.cuda.nccl)``, or ``None`` if either cannot be imported."""
    try:
        with warnings.catch_warnings():
            # cupy.cuda.nccl warns (UserWarning) when libnccl cannot be loaded.
            warnings.simplefilter("ignore")
            import cupy
            from cupy.cuda import nccl
    except Exception:
        return None
    return cupy, nccl


@functools.cache
def available() -> bool:
    """True iff CuPy imports, its NCCL binding loaded libnccl, and a GPU is visible."""
    mods = _import()
    if mods is None:
        return False
    cupy, nccl = mods
    if not getattr(nccl, "available", False) or not hasattr(nccl, "NcclCommunicator"):
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def lib():
    """The ``cupy.cuda.nccl`` module; raises :class:`BackendUnavailable` if unusable."""
    if not available():
        raise BackendUnavailable(
            "NCCL is not usable here: it needs CuPy with its NCCL binding (libnccl.so.2, e.g. "
            "pip install 'nvidia-nccl-cu12>=2.18.1,<3') and at least one visible GPU"
        )
    return _import()[1]


def error_type():
    """The exception class CuPy raises for NCCL failures (``NcclError``, has ``.status``)."""
    return lib().NcclError


def datatype(name: str) -> int:
    """NCCL datatype enum for a logical dtype name (``"bfloat16"`` -> ``NCCL_BFLOAT16``)."""
    if name not in DTYPE_NAMES:
        raise ConfigError(
            f"dtype: {name!r} has no NCCL datatype; expected one of {sorted(DTYPE_NAMES)}"
        )
    return int(getattr(lib(), "NCCL_" + name.upper()))


def getVersion() -> int:  # noqa: N802
    """Runtime NCCL version as ``major*10000 + minor*100 + patch`` (2.28.9 -> 22809)."""
    return int(lib().get_version())


def has_comm_split() -> bool:
    """True iff this CuPy exposes ``commSplit`` and the loaded NCCL is 2.18.1 or newer."""
    nccl = lib()
    return hasattr(nccl.NcclCommunicator, "commSplit") and getVersion() >= COMM_SPLIT_VERSION


def getUniqueId():  # noqa: N802
    """``ncclGetUniqueId``: 128 bytes (CuPy >= 14: ``bytes``, older: a tuple of ints), to
    broadcast to every rank out of band (picklable either way)."""
    return lib().get_unique_id()


def commInitRank(nranks: int, unique_id, rank: int):  # noqa: N802
    """``ncclCommInitRank`` on the current CUDA device; blocks until all ``nranks`` joined."""
    ctor = lib().NcclCommunicator
    if isinstance(unique_id, (bytes, bytearray)):
        forms = (bytes(unique_id), tuple(b - 256 if b > 127 else b for b in unique_id))
    else:
        forms = (tuple(unique_id), bytes(b & 0xFF for b in unique_id))
    try:
        return ctor(int(nranks), forms[0], int(rank))
    except TypeError:  # the other CuPy generation's commId type
        return ctor(int(nranks), forms[1], int(rank))


def commSplit(comm, color: int, key: int):  # noqa: N802
    """``ncclCommSplit``: collective over ``comm``; ``color=-1`` gives ``None``."""
    return comm.commSplit(int(color), int(key))


def groupStart() -> None:  # noqa: N802
    lib().groupStart()


def groupEnd() -> None:  # noqa: N802
    lib().groupEnd()


def allGather(comm, sendbuff: int, recvbuff: int, sendcount: int, dtype: int,  # noqa: N802
              stream: int):
    comm.allGather(sendbuff, recvbuff, sendcount, dtype, stream)


def allReduce(comm, sendbuff: int, recvbuff: int, count: int, dtype: int, op: int,  # noqa: N802
              stream: int):
    comm.allReduce(sendbuff, recvbuff, count, dtype, op, stream)


def reduceScatter(comm, sendbuff: int, recvbuff: int, recvcount: int, dtype: int,  # noqa: N802
                  op: int, stream: int):
    comm.reduceScatter(sendbuff, recvbuff, recvcount, dtype, op, stream)


def broadcast(comm, sendbuff: int, recvbuff: int, count: int, dtype: int, root: int,
              stream: int):
    """``ncclBroadcast``: ``sendbuff`` is read on ``root`` only, ``recvbuff`` written everywhere."""
    comm.broadcast(sendbuff, recvbuff, count, dtype, root, stream)


def reduce(comm, sendbuff: int, recvbuff: int, count: int, dtype: int, op: int, root: int,
           stream: int):
    """``ncclReduce``: ``recvbuff`` is written on ``root`` only."""
    comm.reduce(sendbuff, recvbuff, count, dtype, op, root, stream)


def commGetAsyncError(comm) -> None:  # noqa: N802
    """``ncclCommGetAsyncError``: raises CuPy's ``NcclError`` if the comm hit an async error."""
    comm.check_async_error()


def commAbort(comm) -> None:  # noqa: N802
    """``ncclCommAbort``: local, frees the comm; pending kernels of the comm are stopped."""
    comm.abort()


def commDestroy(comm) -> None:  # noqa: N802
    """``ncclCommDestroy``: waits for the comm's pending work (needs the peers alive)."""
    comm.destroy()
