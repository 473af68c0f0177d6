"""The two array backends the facade composes: host (NumPy + Numba + MPI) and CUDA (CuPy + NCCL).

A backend bundles what differs between them: the array module, how to allocate arena memory,
how to accept a caller's array (zero-copy), the storage dtype of each logical dtype, the copy
kernels, the descriptor upload and the tp communicator. The data-plane algorithm in
``_facade.py`` is written once against this interface.
"""

import sys

import numpy as np

from dpgather.core.errors import BackendUnavailable, InputError
from dpgather.dist.base import LOGICAL_DTYPES

__all__ = ["make_backend", "LOGICAL_DTYPES", "normalize_dtype"]

_ALIASES = {
    "fp32": "float32", "f32": "float32", "float": "float32",
    "fp16": "float16", "f16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "i32": "int32", "i64": "int64", "u8": "uint8", "byte": "uint8",
}


def normalize_dtype(dtype, name="dtype"):
    """Logical dtype name of ``dtype`` (a string, NumPy dtype or type, ml_dtypes.bfloat16)."""
    if isinstance(dtype, str):
        key = _ALIASES.get(dtype.lower(), dtype.lower())
        if key in LOGICAL_DTYPES:
            return key
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is not None:
            if dt.name in LOGICAL_DTYPES:
                return dt.name
            if dt.name == "bfloat16":
                return "bfloat16"
    raise InputError(f"{name} must be one of {LOGICAL_DTYPES} (or an alias such as 'bf16'), got {dtype!r}")


def _as_storage(x, name, storage, logical):
    """``x`` viewed as ``storage`` (bfloat16 may arrive as any 2-byte integer storage), or raise."""
    if x.dtype != storage:
        if logical == "bfloat16" and x.dtype.itemsize == 2 and x.dtype.kind in "ui":
            return x.view(storage)
        raise InputError(f"{name} must have dtype {logical}, got {x.dtype}")
    return x


def _ptr_np(a):
    return a.__array_interface__["data"][0]


class HostBackend:
    """NumPy arrays, Numba kernels, MPI collectives."""

    name = "host"

    def __init__(self, mpi_comm, timeout_s):
        from dpgather.dist.host import MpiHostCommunicator
        from dpgather.kernels import _host

        self.xp = np
        self.copy_rows = _host.copy_rows
        self.mask_rows = _host.mask_rows
        self.tp = MpiHostCommunicator(mpi_comm, timeout_s)
        self.device = None

    def storage_dtype(self, logical):
        if logical == "bfloat16":
            try:
                import ml_dtypes
            except ImportError as e:  # pragma: no cover
                raise BackendUnavailable("bfloat16 on the host backend needs ml_dtypes: pip install ml_dtypes") from e
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(logical)

    def alloc(self, nbytes):
        return np.empty(nbytes, dtype=np.uint8)

    def wrap(self, x, name):
        """``x`` as a NumPy array without copying (any dtype)."""
        if isinstance(x, np.ndarray):
            return x
        if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
            return np.asarray(x)
        raise InputError(f"{name} must be a NumPy array (host backend), got {type(x).__name__}")

    def as_rows(self, x, name, storage, logical):
        """``x`` as a NumPy array of ``storage`` dtype, without copying."""
        return _as_storage(self.wrap(x, name), name, storage, logical)

    def ptr(self, a):
        return _ptr_np(a)

    def upload(self, desc):
        return desc

    def zero(self, a):
        a.view(np.uint8).fill(0)

    def synchronize(self):
        pass

    def close(self):
        self.tp.close()


class CudaBackend:
    """CuPy arrays, CUDA RawModule kernels, NCCL collectives on the current CuPy stream.

    bfloat16 travels as 2-byte storage (CuPy has no bfloat16 dtype); descriptors are uploaded
    from a ring of pinned host buffers so the upload never synchronises the device.
    """

    name = "cuda"
    _RING = 8

    def __init__(self, mpi_comm, timeout_s):
        try:
            import cupy
        except ImportError as e:
            raise BackendUnavailable(f"backend='cuda' needs CuPy: {e}") from e
        from dpgather.dist.nccl import NcclCommunicator
        from dpgather.kernels import _cuda

        self.cupy = cupy
        self.xp = cupy
        self.tp = NcclCommunicator(mpi_comm, timeout_s=timeout_s)
        self.device = cupy.cuda.Device()
        self._copy = _cuda.copy_rows_unchecked
        self._mask = _cuda.mask_rows
        self._ring = []
        self._slot = 0

    def copy_rows(self, src, dst, desc, i, stream=None):
        self._copy(src, dst, desc, i, stream)

    def mask_rows(self, ids, desc, i, num_slots, fill, stream=None):
        self._mask(ids, desc, i, num_slots, fill, stream)

    def storage_dtype(self, logical):
        return np.dtype(np.uint16) if logical == "bfloat16" else np.dtype(logical)

    def alloc(self, nbytes):
        return self.cupy.empty(nbytes, dtype=self.cupy.uint8)

    def wrap(self, x, name):
        """``x`` as a CuPy array without copying (CuPy, ``__cuda_array_interface__`` or DLPack;
        a torch bfloat16 tensor is viewed as int16 first, torch being imported by the caller)."""
        cupy = self.cupy
        if isinstance(x, cupy.ndarray):
            return x
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
        if hasattr(x, "__cuda_array_interface__"):
            return cupy.asarray(x)
        if hasattr(x, "__dlpack__"):
            return cupy.from_dlpack(x)
        raise InputError(
            f"{name} must be a CuPy array or expose __cuda_array_interface__ / DLPack "
            f"(cuda backend), got {type(x).__name__}")

    def as_rows(self, x, name, storage, logical):
        """``x`` as a CuPy array of ``storage`` dtype, without copying."""
        return _as_storage(self.wrap(x, name), name, storage, logical)

    def ptr(self, a):
        return a.data.ptr

    def upload(self, desc):
        """Copy the int64 host descriptor to the device (async, pinned, ring-buffered)."""
        cupy = self.cupy
        n = desc.size
        if not self._ring or self._ring[0][1].size < n:
            self._ring = []
            for _ in range(self._RING):
                mem = cupy.cuda.alloc_pinned_memory(max(n, 64) * 8)
                host = np.frombuffer(mem, dtype=np.int64, count=max(n, 64))
                dev = cupy.empty(max(n, 64), dtype=cupy.int64)
                self._ring.append([mem, host, dev, None])
        slot = self._ring[self._slot]
        self._slot = (self._slot + 1) % self._RING
        mem, host, dev, ev = slot
        if ev is not None:
            ev.synchronize()  # the upload issued RING steps ago has long finished
        host[:n] = desc
        stream = cupy.cuda.get_current_stream()
        dev[:n].set(host[:n], stream=stream)
        ev = cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        slot[3] = ev
        return dev

    def zero(self, a):
        self.cupy.cuda.runtime.memsetAsync(
            a.data.ptr, 0, a.nbytes, self.cupy.cuda.get_current_stream().ptr)

    def synchronize(self):
        self.cupy.cuda.get_current_stream().synchronize()

    def close(self):
        self._ring = []
        self.tp.close()


def cuda_usable():
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def make_backend(kind, mpi_comm, timeout_s):
    if kind not in ("auto", "host", "cuda"):
        from dpgather.core.errors import ConfigError

        raise ConfigError(f"backend must be 'auto', 'host' or 'cuda', got {kind!r}")
    if kind == "auto":
        kind = "cuda" if cuda_usable() else "host"
    if kind == "cuda":
        if not cuda_usable():
            raise BackendUnavailable("backend='cuda' but CuPy sees no GPU; use backend='host'")
        return CudaBackend(mpi_comm, timeout_s)
    return HostBackend(mpi_comm, timeout_s)
