"""The two array backends: host (NumPy + Numba + MPI) and CUDA (CuPy + NCCL).

A backend bundles what differs between them: the array module, how to allocate arena memory,
how to accept a caller's array without copying, the storage dtype of each logical dtype, the
copy kernels, the descriptor upload and which communicator class moves its data. The data
plane (``_dataplane.py``) is written once against this interface.
"""

import sys

import numpy as np

from dpgather.core.dtypes import BF16_STORAGE, cuda_storage, host_storage
from dpgather.core.errors import BackendUnavailable, ConfigError, InputError

__all__ = ["make_backend", "canonical_device", "cuda_usable", "HostBackend", "CudaBackend"]


class HostBackend:
    """NumPy arrays, Numba kernels, MPI collectives."""

    name = "host"
    #: what carries the collectives NCCL would carry (``info()["transport"]`` without P2P)
    collectives = "mpi"
    #: whether graph runners capture CUDA graphs (the host backend runs their steps eagerly)
    graphs = False

    def __init__(self):
        from dpgather.kernels import _host

        _host.check_numba()  # loaded on the first kernel call
        self.xp = np
        self.copy_rows = _host.copy_rows_unchecked
        self.mask_rows = _host.mask_rows
        self.device = None

    @staticmethod
    def communicator(mpi_comm, timeout_s):
        from dpgather.dist.host import MpiHostCommunicator

        return MpiHostCommunicator(mpi_comm, timeout_s)

    @staticmethod
    def storage_dtype(logical):
        return host_storage(logical)

    @staticmethod
    def alloc(nbytes):
        return np.empty(nbytes, dtype=np.uint8)

    @staticmethod
    def wrap(x, name):
        """``(array, origin)``: ``x`` as a NumPy array without copying; ``origin`` tells
        :meth:`export` which framework (and logical dtype) the caller uses (None: NumPy)."""
        if isinstance(x, np.ndarray):
            return x, None
        if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
            return np.asarray(x), None
        raise InputError(f"{name} must be a NumPy array (host backend), got {type(x).__name__}")

    @staticmethod
    def export(arr, origin):
        """A result ``arr`` (a NumPy array in storage dtype) as the caller's framework's array
        (``origin`` from :meth:`wrap`), zero-copy."""
        return arr

    def p2p_probe(self, node_comm, timeout_s):
        """Whether the host twin of the pull transport can run over ``node_comm``: ``(ok,
        reason)``, the same on every rank (collective; :func:`dpgather.dist.nodes.probe`)."""
        from dpgather.dist.nodes import probe

        return probe(node_comm, timeout_s, backend="host")

    def p2p(self, node_comm, capacity_bytes, timeout_s):
        """The pull transport's host twin (:class:`dpgather.dist.pull.HostPull`) over ``node_comm``
        with ``src`` buffers of ``capacity_bytes`` (collective; the same ``ConfigError`` /
        ``BackendUnavailable`` on every rank when it cannot be made)."""
        from dpgather.dist.pull import HostPull

        return HostPull(node_comm, capacity_bytes, timeout_s)

    @staticmethod
    def warm():
        """Load every kernel this backend may launch (the Numba kernels; the host twin of the
        pull transport runs in Python)."""
        from dpgather.kernels import host

        host.warm()

    @staticmethod
    def ptr(a):
        return a.__array_interface__["data"][0]

    @staticmethod
    def upload(desc, out=None, ring=0):
        if out is None:
            return desc
        out[...] = desc
        return out

    @staticmethod
    def zero(a):
        a.view(np.uint8).fill(0)

    @staticmethod
    def copy_into(dst, src):
        """``dst[...] = src`` (equal sizes)."""
        dst[...] = src

    @staticmethod
    def launch_chain():
        """Every call completes before it returns: nothing to order (:mod:`dpgather._chain`)."""
        from ._chain import NullChain

        return NullChain()

    @staticmethod
    def event_pool():
        return None

    @staticmethod
    def device_name():
        """None: no device, no calibration cache (``dpgather calibrate`` measures GPUs)."""
        return None

    @staticmethod
    def stream(value, name="stream"):
        """The host backend has no streams: any ``stream=`` argument is accepted and ignored."""
        return None

    @staticmethod
    def current_stream():
        return None

    def close(self):
        pass


class CudaBackend:
    """CuPy arrays, CUDA RawModule kernels, NCCL collectives on the current CuPy stream.

    bfloat16 travels as 2-byte storage (CuPy has no bfloat16 dtype); descriptors are uploaded
    from rings of pinned host buffers so the upload never synchronises the device: one ring per
    micro-batch, so a micro-batch's descriptor (reused while its plan repeats) is never
    overwritten by another micro-batch's uploads.
    """

    name = "cuda"
    collectives = "nccl"
    graphs = True
    _RING = 8

    def __init__(self):
        try:
            import cupy
        except ImportError as e:
            raise BackendUnavailable(
                f"backend='cuda' needs CuPy ({e}): `pip install cupy-cuda12x` (CUDA 12) or "
                "`pip install cupy-cuda13x` (CUDA 13), or use backend='host'") from e
        from dpgather.kernels import _cuda

        self.cupy = cupy
        self.xp = cupy
        self.device = None  # the communicator picks this rank's GPU (see communicator)
        self.copy_rows = _cuda.copy_rows_unchecked
        self.mask_rows = _cuda.mask_rows
        self._rings = {}  # ring key (micro-batch) -> [slots, next slot]

    def communicator(self, mpi_comm, timeout_s):
        """The NCCL communicator of ``mpi_comm``; it picks and makes current this rank's GPU,
        which becomes :attr:`device` (the current device before it may be another rank's)."""
        from dpgather.dist.nccl import NcclCommunicator

        comm = NcclCommunicator(mpi_comm, timeout_s=timeout_s)
        self.device = self.cupy.cuda.Device(comm.device)
        return comm

    @staticmethod
    def storage_dtype(logical):
        return cuda_storage(logical)

    def alloc(self, nbytes):
        return self.cupy.empty(nbytes, dtype=self.cupy.uint8)

    def wrap(self, x, name):
        """``(array, origin)``: ``x`` as a CuPy array without copying (CuPy,
        ``__cuda_array_interface__`` or DLPack). A torch bfloat16 tensor (torch being imported by
        the caller) is viewed as 2-byte storage and reported with ``logical="bfloat16"``."""
        cupy = self.cupy
        if isinstance(x, cupy.ndarray):
            return x, None
        logical = None
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
            logical = "bfloat16"
        try:
            if hasattr(x, "__cuda_array_interface__"):
                arr = cupy.asarray(x)
            elif hasattr(x, "__dlpack__"):
                arr = cupy.from_dlpack(x)
            else:
                raise InputError(
                    f"{name} must be a CuPy array or expose __cuda_array_interface__ / DLPack "
                    f"(cuda backend), got {type(x).__name__}")
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{name} could not be viewed as a CuPy array ({e}); for bfloat16 data "
                             "pass a uint16 view of it") from None
        if logical is not None:
            arr = arr.view(BF16_STORAGE)
        return arr, logical

    @staticmethod
    def export(arr, origin):
        """A result ``arr`` (a CuPy array in storage dtype) as the caller's framework's array
        (``origin`` from :meth:`wrap`), zero-copy."""
        return arr

    #: the device this backend built a pull transport on (its kernel may then be launched)
    _pull_device = None

    def p2p_probe(self, node_comm, timeout_s):
        """Whether the pull transport can run over ``node_comm`` on this rank's device (every
        pair of devices with peer access): ``(ok, reason)``, the same on every rank (collective;
        :func:`dpgather.dist.nodes.probe`)."""
        from dpgather.dist.nodes import probe

        return probe(node_comm, timeout_s, backend="cuda", device=self._device_id())

    def p2p(self, node_comm, capacity_bytes, timeout_s):
        """The pull transport (:class:`dpgather.dist.pull.CudaPull`) over ``node_comm`` on this
        rank's device (collective; the same ``ConfigError``/``BackendUnavailable`` on every rank
        when it cannot be made). It compiles the pull kernel on construction."""
        from dpgather.dist.pull import CudaPull

        t = CudaPull(node_comm, capacity_bytes, timeout_s, self._device_id())
        self._pull_device = t.device
        return t

    def warm(self):
        """Compile and load every kernel this backend may launch on its device: the copy kernels,
        and the pull kernel once :meth:`p2p` built a transport. Call before a graph capture."""
        from dpgather import kernels

        kernels.cuda.warm(self._device_id())
        if self._pull_device is not None:
            kernels.pull.warm(self._pull_device)

    def _device_id(self):
        """This rank's device ordinal (None before :meth:`communicator` chose it)."""
        return None if self.device is None else self.device.id

    @staticmethod
    def ptr(a):
        return a.data.ptr

    def upload(self, desc, out=None, ring=0):
        """Copy the int64 host descriptor to the device (async, pinned, ring-buffered) on the
        current stream; into ``out`` (a device array) when given. ``ring``: which ring of
        :attr:`_RING` device slots (one per micro-batch)."""
        cupy = self.cupy
        n = desc.size
        r = self._rings.get(ring)
        if r is None or r[0][0][1].size < n:
            slots = []
            for _ in range(self._RING):
                mem = cupy.cuda.alloc_pinned_memory(max(n, 64) * 8)
                host = np.frombuffer(mem, dtype=np.int64, count=max(n, 64))
                dev = cupy.empty(max(n, 64), dtype=cupy.int64)
                slots.append([mem, host, dev, None])
            r = self._rings[ring] = [slots, 0]
        slot = r[0][r[1]]
        r[1] = (r[1] + 1) % self._RING
        mem, host, dev, ev = slot
        if ev is not None:
            ev.synchronize()  # the upload issued RING steps ago has long finished
        host[:n] = desc
        stream = cupy.cuda.get_current_stream()
        target = dev if out is None else out
        target[:n].set(host[:n], stream=stream)
        ev = cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        slot[3] = ev
        return target

    def zero(self, a):
        self.cupy.cuda.runtime.memsetAsync(a.data.ptr, 0, a.nbytes, self.cupy.cuda.get_current_stream().ptr)

    def copy_into(self, dst, src):
        """``dst[...] = src`` on the current stream (device to device, equal sizes)."""
        dst.data.copy_from_device_async(src.data, src.nbytes, self.cupy.cuda.get_current_stream())

    def launch_chain(self):
        """The launch chain ordering every transport launch (:mod:`dpgather._chain`)."""
        from ._chain import StreamChain

        return StreamChain(self.cupy)

    def event_pool(self):
        from ._chain import EventPool

        return EventPool(self.cupy)

    def device_name(self):
        """This rank's GPU's name (the calibration cache is per device model)."""
        name = self.cupy.cuda.runtime.getDeviceProperties(self.device.id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    @staticmethod
    def nccl_version():
        from cupy.cuda import nccl

        return int(nccl.get_version())

    def current_stream(self):
        return self.cupy.cuda.get_current_stream()

    def stream(self, value, name="stream"):
        """A ``stream=`` argument as a CuPy stream: None (the current stream), a
        ``cupy.cuda.Stream`` / ``ExternalStream``, a raw ``cudaStream_t`` int, or an object with
        an int ``cuda_stream`` attribute (``torch.cuda.Stream``). Raises InputError otherwise."""
        cupy = self.cupy
        if value is None:
            return cupy.cuda.get_current_stream()
        if hasattr(value, "ptr") and hasattr(value, "wait_event") and hasattr(value, "__enter__"):
            return value  # cupy.cuda.Stream / ExternalStream (the base class name changed over versions)
        raw = getattr(value, "cuda_stream", value)
        if isinstance(raw, (int, np.integer)) and not isinstance(raw, (bool, np.bool_)) and raw >= 0:
            return cupy.cuda.ExternalStream(int(raw), self.device.id if self.device is not None else -1)
        raise InputError(f"{name} must be None (the current stream), a cupy.cuda.Stream / ExternalStream, "
                         f"a raw cudaStream_t int or a torch.cuda.Stream, got {value!r}")

    def close(self):
        self._rings = {}


def cuda_usable():
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def canonical_device(value):
    """``DpAttention(device=...)`` as a plain value every rank can compare: None (the default
    rule) or a CUDA device ordinal. Pure and local; raises ValueError naming the value."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"device must be None or a CUDA device ordinal >= 0, got {value!r}")
    return int(value)


def make_backend(kind, device=None):
    """The backend for ``kind`` (``"auto"``: CUDA when CuPy sees a GPU, else host) on ``device``
    (``canonical_device``'s value; None: the default rule)."""
    if kind not in ("auto", "host", "cuda"):
        raise ConfigError(f"backend must be 'auto', 'host' or 'cuda', got {kind!r}")
    if kind == "auto":
        kind = "cuda" if cuda_usable() else "host"
    if kind == "cuda":
        if not cuda_usable():
            raise BackendUnavailable("backend='cuda' but CuPy sees no GPU (or CuPy is not installed: "
                                     "`pip install cupy-cuda12x`); use backend='host'")
        return CudaBackend()
    return HostBackend()
