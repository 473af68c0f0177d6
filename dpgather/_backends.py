"""The two array backends: host (NumPy + Numba + MPI) and CUDA (CuPy + NCCL).

A backend bundles what differs between them: the array module, how to allocate arena memory,
how to accept a caller's array without copying and hand results back in the caller's array type
(``wrap`` / ``export``, over ``_interop.py``), the storage dtype of each logical dtype, the copy
kernels, the descriptor upload, its GPU (``_devices.py``) and which communicator class moves its
data. The data plane (``_dataplane.py``) is written once against this interface.
"""

import math
import sys

import numpy as np

from dpgather.core.dtypes import BF16_STORAGE, cuda_storage, host_storage
from dpgather.core.errors import BackendUnavailable, ConfigError, InputError

from . import _interop
from ._devices import canonical_device, place_device
from ._interop import KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED, Exported, framework_of, origin, plain_alias

__all__ = ["make_backend", "canonical_device", "cuda_usable", "HostBackend", "CudaBackend"]

_HOST_ALIGN = 256  # bytes: the start of every host arena buffer
_JAX_IMMUTABLE = ("{name} is a JAX array, which is immutable, and this call writes into it: pass a writable array "
                  "(NumPy, CuPy, PyTorch){hint}")


class _Exports:
    """``export``: a result as the caller's framework's array (the part both backends share).

    PyTorch results are cached per arena view (a tensor over the view, made once; each call hands
    out a ``detach()`` of it, so a caller's in-place metadata change never reaches the next call);
    JAX results are made per call (a JAX array may cache a host copy of its contents and is ordered
    on JAX's streams only when it is made: docs/interop.md).
    """

    _bf16 = None  # the backend's own bfloat16 dtype (ml_dtypes.bfloat16) where its arrays have one

    def export(self, arr, origin):
        """A result ``arr`` (an arena view, a backend array in storage dtype) as the caller's
        framework's array (``origin`` from :meth:`wrap`), zero-copy: a PyTorch tensor, a JAX
        array, or the backend array (as bfloat16 where the backend has the dtype and the caller's
        data is bfloat16)."""
        if origin is None:
            return arr
        kind, bf16 = origin
        if kind == "torch":
            return self._to_torch(arr, bf16)
        if kind == "jax":
            return sys.modules["jax"].dlpack.from_dlpack(Exported(plain_alias(arr), bf16))
        return arr.view(self._bf16) if bf16 and self._bf16 is not None else arr

    def _to_torch(self, arr, bf16):
        torch = sys.modules["torch"]
        t = self._exports.get(arr, bf16)
        if t is None:
            t = torch.from_dlpack(Exported(plain_alias(arr), bf16))  # orders torch's stream after ours
            self._exports.put(arr, bf16, t)
        else:
            self._order_torch(torch)
        return t.detach()

    def _order_torch(self, torch):
        """A cached tensor is handed out again: order torch's current stream after this backend's
        (what ``from_dlpack`` did when the tensor was made). Nothing to do on the host."""


class HostBackend(_Exports):
    """NumPy arrays, Numba kernels, MPI collectives."""

    name = "host"
    #: what carries the collectives NCCL would carry (``info()["transport"]`` without P2P)
    collectives = "mpi"
    #: whether graph runners capture CUDA graphs (the host backend runs their steps eagerly)
    graphs = False
    _DEVICES = frozenset({KDL_CPU, KDL_CUDA_HOST})

    def __init__(self):
        from dpgather.kernels import host

        host.check_numba()  # loaded on the first kernel call
        self.xp = np
        self.copy_rows = host.copy_rows_unchecked
        self.mask_rows = host.mask_rows
        self.quantize_rows = host.quantize_rows_unchecked
        self.device = None
        self._exports = _interop.ViewCache()
        try:
            import ml_dtypes

            self._bf16 = np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            pass

    @staticmethod
    def communicator(mpi_comm, timeout_s):
        from dpgather.dist.host import MpiHostCommunicator

        return MpiHostCommunicator(mpi_comm, timeout_s)

    @staticmethod
    def storage_dtype(logical):
        return host_storage(logical)

    @staticmethod
    def alloc(nbytes):
        """``nbytes`` of arena memory starting at a 256-byte boundary (NumPy aligns to 16 only:
        JAX takes a host buffer through DLPack without copying only from 64-byte boundaries)."""
        raw = np.empty(nbytes + _HOST_ALIGN, dtype=np.uint8)
        start = -raw.__array_interface__["data"][0] % _HOST_ALIGN
        return raw[start:start + nbytes]

    def wrap(self, x, name, writable=False):
        """``(array, origin)``: ``x`` as a NumPy array without copying; ``origin`` tells
        :meth:`export` which framework (and logical dtype) the caller uses (None: NumPy).

        NumPy arrays as they are; any DLPack producer on the host (PyTorch CPU tensors, JAX CPU
        arrays; bfloat16 as ``uint16`` storage) through ``_interop.import_dlpack``; other objects
        with ``__array_interface__`` / ``__array__`` through ``np.asarray``. ``writable``: the
        call writes into ``x`` (``out=``, ``topk_ids``): a read-only or immutable array is
        refused. Raises InputError naming ``name``."""
        if isinstance(x, np.ndarray):
            if writable and not x.flags.writeable:
                raise InputError(f"{name} is a read-only NumPy array, and this call writes into it")
            return x, None
        if hasattr(x, "__dlpack__"):
            kind = framework_of(x)
            if writable and kind == "jax":
                raise InputError(_JAX_IMMUTABLE.format(name=name, hint=""))
            im = _interop.import_dlpack(x, name, devices=self._DEVICES, device_id=None, stream=None,
                                        writable=writable)
            return _host_array(im), origin(kind, im.bfloat16)
        if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
            arr = np.asarray(x)
            if writable and not arr.flags.writeable:
                raise InputError(f"{name} cannot be written in place ({type(x).__name__}); pass a writable array")
            return arr, None
        raise InputError(f"{name} must be a NumPy array or a host array with DLPack (PyTorch, JAX) on the host "
                         f"backend, got {type(x).__name__}")

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

    def push(self, node_comm, capacity_bytes, timeout_s):
        """The push transport's host twin (:class:`dpgather.dist.push.HostPush`) over ``node_comm``
        with regions of ``capacity_bytes`` (collective; the same ``ConfigError`` /
        ``BackendUnavailable`` on every rank when it cannot be made)."""
        from dpgather.dist.push import HostPush

        return HostPush(node_comm, capacity_bytes, timeout_s)

    @staticmethod
    def warm():
        """Load every kernel this backend may launch (the Numba kernels; the host twins of the
        P2P transports run in Python)."""
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
        self._exports.clear()


class _HostMemory:
    """What ``np.asarray`` reads an imported capsule's memory from; it holds the capsule, so the
    NumPy array (whose ``base`` it becomes) keeps the producer's array alive."""

    __slots__ = ("__array_interface__", "_capsule")

    def __init__(self, interface, capsule):
        self.__array_interface__ = interface
        self._capsule = capsule


def _host_array(im):
    ptr, shape, dtype, _, _, readonly, capsule = im
    if 0 in shape:
        return np.empty(shape, dtype=dtype)
    return np.asarray(_HostMemory({"data": (ptr, readonly), "shape": shape, "typestr": dtype.str}, capsule))


class CudaBackend(_Exports):
    """CuPy arrays, CUDA RawModule kernels, NCCL collectives on the current CuPy stream.

    bfloat16 travels as 2-byte storage (CuPy before 14 has no bfloat16 dtype); descriptors are
    uploaded from rings of pinned host buffers so the upload never synchronises the device: one
    ring per micro-batch, so a micro-batch's descriptor (reused while its plan repeats) is never
    overwritten by another micro-batch's uploads.
    """

    name = "cuda"
    collectives = "nccl"
    graphs = True
    _RING = 8
    _DEVICES = frozenset({KDL_CUDA, KDL_CUDA_MANAGED})

    def __init__(self, device=None):
        from dpgather.kernels import cuda as _cuda

        cupy = _cuda.load_cupy()
        self.cupy = cupy
        self.xp = cupy
        self._asked = device  # canonical_device's value; the communicator places the rank (place_device)
        self.device = None  # cupy.cuda.Device once communicator() chose it
        self._device_id = None  # this rank's device ordinal, once communicator() chose it
        self.copy_rows = _cuda.copy_rows_unchecked
        self.mask_rows = _cuda.mask_rows
        self.quantize_rows = _cuda.quantize_rows_unchecked
        self._rings = {}  # ring key (micro-batch) -> [slots, next slot]
        self._exports = _interop.ViewCache()
        self._event = None  # orders a consumer's stream after ours when a cached export is handed out again

    def communicator(self, mpi_comm, timeout_s):
        """The NCCL communicator of ``mpi_comm`` on this rank's GPU: the device asked for, else the
        node-local rank modulo the visible GPUs, checked against every rank's placement (collective;
        ``_devices.place_device``). The device becomes :attr:`device` and the current CuPy device."""
        from dpgather.dist.nccl import NcclCommunicator

        dev = place_device(mpi_comm, self._asked, timeout_s)
        comm = NcclCommunicator(mpi_comm, timeout_s=timeout_s, device=dev)
        self.device = self.cupy.cuda.Device(dev)
        self._device_id = dev
        self._bf16 = _cupy_bfloat16(self.cupy)  # probed on this rank's GPU, never on another's
        return comm

    @staticmethod
    def storage_dtype(logical):
        return cuda_storage(logical)

    def alloc(self, nbytes):
        return self.cupy.empty(nbytes, dtype=self.cupy.uint8)

    def wrap(self, x, name, writable=False):
        """``(array, origin)``: ``x`` as a CuPy array on this backend's device without copying.

        CuPy arrays as they are (bfloat16 ones, CuPy >= 14, viewed as ``uint16`` storage); any
        DLPack producer (PyTorch, JAX, ...; bfloat16 included, versioned capsules included) through
        ``_interop.import_dlpack``, asked to make the data ready on the current CuPy stream;
        objects with only ``__cuda_array_interface__`` (Numba) through ``cupy.asarray``.
        ``writable``: the call writes into ``x`` (``out=``, ``topk_ids``): read-only, copied or
        immutable (JAX) exports are refused. Raises InputError naming ``name``."""
        cupy = self.cupy
        if isinstance(x, cupy.ndarray):
            if self._device_id is not None and x.data.device_id != self._device_id:
                raise InputError(f"{name} is on cuda:{x.data.device_id}, but this DpAttention uses "
                                 f"cuda:{self._device_id}: pass arrays on its device")
            if x.dtype.name == "bfloat16":
                return x.view(BF16_STORAGE), _interop.origin("native", True)
            return x, None
        if hasattr(x, "__dlpack__"):
            kind = framework_of(x)
            if writable and kind == "jax":
                raise InputError(_JAX_IMMUTABLE.format(name=name, hint=", or let dpgather return a new result"))
            ptr = cupy.cuda.get_current_stream().ptr
            im = _interop.import_dlpack(x, name, devices=self._DEVICES, device_id=self._device_id,
                                        stream=ptr or 1, writable=writable)  # 1: the legacy default stream
            return self._array(im), origin(kind, im.bfloat16)
        if hasattr(x, "__cuda_array_interface__"):
            if writable and x.__cuda_array_interface__["data"][1]:
                raise InputError(f"{name} is read-only (__cuda_array_interface__), and this call writes into it")
            try:
                return cupy.asarray(x), None
            except Exception as e:  # noqa: BLE001 - CuPy's refusal, named
                raise InputError(f"{name} could not be viewed as a CuPy array: {type(e).__name__}: {e}") from None
        raise InputError(f"{name} must be a CuPy array or a CUDA array with DLPack / __cuda_array_interface__ "
                         f"(PyTorch, JAX, Numba) on the cuda backend, got {type(x).__name__}")

    def _array(self, im):
        """The CuPy array over an imported capsule's memory (the capsule is its owner; no
        allocation, an empty array included)."""
        cupy = self.cupy
        mem = cupy.cuda.UnownedMemory(im.ptr, math.prod(im.shape) * im.dtype.itemsize, im.capsule, im.device_id)
        return cupy.ndarray(im.shape, im.dtype, cupy.cuda.MemoryPointer(mem, 0))

    def _order_torch(self, torch):
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton reads; public API otherwise
        dev = self._device_id
        theirs = raw(dev) if raw is not None else torch.cuda.current_stream(dev).cuda_stream
        ours = self.cupy.cuda.get_current_stream()
        if theirs != ours.ptr:
            if self._event is None:
                self._event = self.cupy.cuda.Event(block=False, disable_timing=True)
            self._event.record(ours)
            self.cupy.cuda.runtime.streamWaitEvent(theirs, self._event.ptr, 0)

    #: the devices this backend built P2P transports on, by kernel loader (``kernels.pull``,
    #: ``kernels.push``): their kernels may then be launched, so :meth:`warm` compiles them
    _p2p_devices = None

    def p2p_probe(self, node_comm, timeout_s):
        """Whether the pull transport can run over ``node_comm`` on this rank's device (every
        pair of devices with peer access): ``(ok, reason)``, the same on every rank (collective;
        :func:`dpgather.dist.nodes.probe`)."""
        from dpgather.dist.nodes import probe

        return probe(node_comm, timeout_s, backend="cuda", device=self._device_id)

    def p2p(self, node_comm, capacity_bytes, timeout_s):
        """The pull transport (:class:`dpgather.dist.pull.CudaPull`) over ``node_comm`` on this
        rank's device (collective; the same ``ConfigError``/``BackendUnavailable`` on every rank
        when it cannot be made). It compiles the pull kernel on construction."""
        from dpgather.dist.pull import CudaPull

        return self._built("pull", CudaPull(node_comm, capacity_bytes, timeout_s, self._device_id))

    def push(self, node_comm, capacity_bytes, timeout_s):
        """The push transport (:class:`dpgather.dist.push.CudaPush`) over ``node_comm`` on this
        rank's device, with regions of ``capacity_bytes`` (collective; the same
        ``ConfigError``/``BackendUnavailable`` on every rank when it cannot be made). It compiles
        the push kernel on construction; its launches are programmatic dependent launches where
        cuda-bindings imports (``DPGATHER_PUSH_PDL=0``: plain launches)."""
        from dpgather.dist.push import CudaPush

        return self._built("push", CudaPush(node_comm, capacity_bytes, timeout_s, self._device_id))

    def _built(self, kernel, t):
        self._p2p_devices = dict(self._p2p_devices or {}, **{kernel: t.device})
        return t

    def warm(self):
        """Compile and load every kernel this backend may launch on its device: the copy kernels,
        and the pull and push kernels once :meth:`p2p` / :meth:`push` built a transport. Call
        before a graph capture."""
        from dpgather import kernels

        kernels.cuda.warm(self._device_id)
        for kernel, device in (self._p2p_devices or {}).items():
            getattr(kernels, kernel).warm(device)

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
        self._exports.clear()


def _cupy_bfloat16(cupy):
    """CuPy's bfloat16 dtype (``ml_dtypes.bfloat16``, CuPy >= 14), or None where it has none."""
    try:
        import ml_dtypes

        cupy.empty(0, dtype=np.uint16).view(ml_dtypes.bfloat16)
        return np.dtype(ml_dtypes.bfloat16)
    except Exception:  # noqa: BLE001 - no ml_dtypes, or a CuPy without bfloat16
        return None


def cuda_usable():
    """True when CuPy imports and sees at least one GPU (never raises)."""
    from dpgather.kernels import cuda

    try:
        return cuda.load_cupy().cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def make_backend(kind, device=None):
    """The backend for ``kind`` (``"auto"``: CUDA when CuPy sees a GPU, else host) on ``device``
    (``canonical_device``'s value; None: the default rule). The host backend takes no device."""
    if kind not in ("auto", "host", "cuda"):
        raise ConfigError(f"backend must be 'auto', 'host' or 'cuda', got {kind!r}")
    if kind == "auto":
        kind = "cuda" if cuda_usable() else "host"
    if kind == "cuda":
        if not cuda_usable():
            raise BackendUnavailable("backend='cuda' but CuPy sees no GPU (or CuPy is not installed: "
                                     "`pip install cupy-cuda12x`); use backend='host'")
        return CudaBackend(device)
    if device is not None:
        raise ConfigError(f"device={device} names a GPU, but the backend is the host backend (NumPy + MPI, "
                          "no GPU): leave device=None or use backend='cuda'")
    return HostBackend()
