"""Arrays in and out through DLPack: the caller's array without copying, results as the caller's type.

docs/interop.md is the contract; this module is the mechanism the two backends share.

- **In.** :func:`import_dlpack` asks any DLPack producer for a capsule (``__dlpack__(stream=...,
  max_version=(1, 0), copy=False)``, a legacy producer without those keywords is asked again with
  ``stream`` alone) and reads its ``DLTensor`` with ctypes: NumPy cannot import a bfloat16
  capsule and CuPy before 14 cannot either. The capsule is not consumed (never renamed): the
  backend array made over its memory holds it, and when that array is freed the producer's
  capsule destructor calls the producer's deleter, which releases the producer's array. Device
  type and id, dtype, C-contiguity, byte offset and the read-only / copied flags are checked
  here; a bad one raises :class:`InputError` naming the argument.
- **Which framework.** :func:`framework_of` tells PyTorch and JAX objects by the modules of their
  type (cached per type): importing dpgather never imports either.
- **Out.** :class:`Exported` offers a backend array through DLPack, relabelled as bfloat16 where
  the caller's data is (the backends store bfloat16 as 2-byte integers): the consumer's
  ``from_dlpack`` gets the framework's own bfloat16, zero-copy, with the producer's (NumPy's or
  CuPy's) stream handling and deleter. :class:`ViewCache` keeps one exported object per arena
  view, for frameworks whose arrays may be handed out again (PyTorch; never JAX: see
  docs/interop.md).
"""

import ctypes
import weakref
from typing import NamedTuple

import numpy as np

from dpgather.core.dtypes import BF16_STORAGE
from dpgather.core.errors import InputError

__all__ = ["Origin", "origin", "framework_of", "import_dlpack", "Imported", "Exported", "ViewCache", "plain_alias",
           "KDL_CPU", "KDL_CUDA", "KDL_CUDA_HOST", "KDL_CUDA_MANAGED"]

# dlpack.h (v1.0): device types, dtype codes, flags
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_KDL_INT, _KDL_UINT, _KDL_FLOAT, _KDL_BFLOAT, _KDL_BOOL = 0, 1, 2, 4, 6
_FLAG_READ_ONLY, _FLAG_IS_COPIED = 1, 2
_DEVICE_NAMES = {KDL_CPU: "cpu", KDL_CUDA: "cuda", KDL_CUDA_HOST: "cuda_host (pinned host memory)", 4: "opencl",
                 7: "vulkan", 8: "metal", 10: "rocm", 11: "rocm_host", KDL_CUDA_MANAGED: "cuda_managed"}


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8),
                ("lanes", ctypes.c_uint16), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_NAME, _NAME_VERSIONED = b"dltensor", b"dltensor_versioned"
_CODE_AT = {_NAME: _DLTensor.code.offset,
            _NAME_VERSIONED: _DLManagedTensorVersioned.dl_tensor.offset + _DLTensor.code.offset}

# Own prototypes (ctypes.pythonapi's function objects are shared with every other user in the process).
_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))

#: (DLPack dtype code, bits) -> the NumPy dtype of the backend array; bfloat16 is 2-byte storage.
_DTYPES = {(_KDL_INT, 8): np.dtype(np.int8), (_KDL_INT, 16): np.dtype(np.int16), (_KDL_INT, 32): np.dtype(np.int32),
           (_KDL_INT, 64): np.dtype(np.int64), (_KDL_UINT, 8): np.dtype(np.uint8),
           (_KDL_UINT, 16): np.dtype(np.uint16), (_KDL_UINT, 32): np.dtype(np.uint32),
           (_KDL_UINT, 64): np.dtype(np.uint64), (_KDL_FLOAT, 16): np.dtype(np.float16),
           (_KDL_FLOAT, 32): np.dtype(np.float32), (_KDL_FLOAT, 64): np.dtype(np.float64),
           (_KDL_BFLOAT, 16): BF16_STORAGE, (_KDL_BOOL, 8): np.dtype(np.bool_)}
_UNSIGNED = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


# -- the caller's framework --------------------------------------------------------------------

class Origin(NamedTuple):
    """Where a call's main input came from (``wrap`` returns it, ``export`` reads it).

    ``kind``: ``"native"`` (the backend's own array type: NumPy or CuPy), ``"torch"``, ``"jax"``
    or ``"dlpack"`` (any other producer: results are backend arrays). ``bfloat16``: the caller's
    data is bfloat16, which the backend array holds as 2-byte storage.
    """

    kind: str
    bfloat16: bool


_ORIGINS = {(k, b): Origin(k, b) for k in ("native", "torch", "jax", "dlpack") for b in (False, True)}


def origin(kind, bfloat16):
    """The interned :class:`Origin` (``None`` for a native array that is not bfloat16: nothing to do)."""
    if kind == "native" and not bfloat16:
        return None
    return _ORIGINS[kind, bool(bfloat16)]


_KINDS = {}  # type -> "torch" | "jax" | "dlpack"


def framework_of(x):
    """``"torch"``, ``"jax"`` or ``"dlpack"`` for any other type; never imports a framework."""
    t = type(x)
    kind = _KINDS.get(t)
    if kind is None:
        roots = {(getattr(c, "__module__", None) or "").split(".")[0] for c in t.__mro__}
        kind = "torch" if "torch" in roots else "jax" if roots & {"jax", "jaxlib"} else "dlpack"
        _KINDS[t] = kind
    return kind


# -- in: a DLPack producer's array, read without copying -----------------------------------------

class Imported(NamedTuple):
    """A producer's array as read from its capsule (see :func:`import_dlpack`).

    ``ptr``: address of the first element (data + byte_offset); ``shape``: tuple of ints;
    ``dtype``: the backend array's NumPy dtype (bfloat16 as ``uint16`` storage);
    ``bfloat16``: the producer's dtype is bfloat16; ``device_id``: the DLPack device id;
    ``readonly``: the producer marked the memory read-only; ``capsule``: keeps the producer's array
    alive while the backend array over ``ptr`` exists.
    """

    ptr: int
    shape: tuple
    dtype: np.dtype
    bfloat16: bool
    device_id: int
    readonly: bool
    capsule: object


def _capsule(x, stream, name, devices, device_id):
    try:
        try:
            return x.__dlpack__(stream=stream, max_version=(1, 0), copy=False)
        except TypeError:  # a producer from before DLPack 1.0 (no max_version / copy)
            return x.__dlpack__(stream=stream)
    except Exception as e:  # noqa: BLE001 - the producer's own refusal, named
        # A producer may refuse because of where its array is (PyTorch: a tensor on another GPU than
        # its current one; NumPy: a stream for host memory): then say where it is.
        try:
            dev_type, dev_id = (int(v) for v in x.__dlpack_device__())
        except Exception:  # noqa: BLE001 - only for the message
            dev_type = dev_id = None
        if dev_type is not None and (dev_type not in devices or (device_id is not None and dev_id != device_id)):
            raise InputError(_wrong_device(name, dev_type, dev_id, devices, device_id)) from None
        where = "" if dev_type is None else \
            f" on {_DEVICE_NAMES.get(dev_type, f'DLPack device type {dev_type}')}:{dev_id}"
        raise InputError(f"{name} ({type(x).__name__}{where}) could not be exported through DLPack without a "
                         f"copy: {type(e).__name__}: {e}") from None


def import_dlpack(x, name, *, devices, device_id, stream, writable):
    """``x``'s memory through DLPack, as :class:`Imported` (no copy).

    Args:
        x: an object with ``__dlpack__``.
        name: the argument's name, for messages.
        devices: the DLPack device types the backend can address (``{KDL_CPU, KDL_CUDA_HOST}`` on
            the host backend, ``{KDL_CUDA, KDL_CUDA_MANAGED}`` on CUDA).
        device_id: the CUDA device the data must be on (None: any).
        stream: passed to ``__dlpack__``: the consumer's stream (CUDA: the current CuPy stream,
            ``1`` for the legacy default stream), None on the host.
        writable: the call writes into ``x`` (``out=``, ``topk_ids``): a read-only or copied
            export is refused.

    Raises:
        InputError: the producer refused, or the capsule's device, dtype, layout or flags do not
            fit, naming ``name`` and the value.
    """
    capsule = _capsule(x, stream, name, devices, device_id)
    cname = _capsule_name(capsule)
    flags = 0
    if cname == _NAME_VERSIONED:
        m = _DLManagedTensorVersioned.from_address(_capsule_pointer(capsule, cname))
        if m.major != 1:
            raise InputError(f"{name}: a DLPack {m.major}.{m.minor} capsule; dpgather reads DLPack 1.x")
        flags = m.flags
    elif cname == _NAME:
        m = _DLManagedTensor.from_address(_capsule_pointer(capsule, cname))
    else:
        raise InputError(f"{name}: __dlpack__ returned a capsule named {cname!r}, not a DLPack tensor")
    t = m.dl_tensor
    dev_type, dev_id = t.device_type, t.device_id
    if dev_type not in devices or (device_id is not None and dev_id != device_id):
        raise InputError(_wrong_device(name, dev_type, dev_id, devices, device_id))
    code, bits, lanes = t.code, t.bits, t.lanes
    dtype = _DTYPES.get((code, bits)) if lanes == 1 else None
    if dtype is None:
        raise InputError(f"{name} has a DLPack dtype dpgather does not move (code {code}, {bits} bits, "
                         f"{lanes} lanes); the data types are float32, float16, bfloat16, int32, int64, uint8")
    ndim = t.ndim
    shape = tuple(t.shape[:ndim]) if ndim else ()
    strides = t.strides
    if strides and ndim:
        st = strides[:ndim]
        if not (ndim == 2 and st[1] == 1 and st[0] == shape[1]):  # the row buffers' case, checked at once
            _check_c_contiguous(name, shape, st, dtype.itemsize)
    if writable and flags & (_FLAG_READ_ONLY | _FLAG_IS_COPIED):
        why = "read-only" if flags & _FLAG_READ_ONLY else "a copy (writes would not reach it)"
        raise InputError(f"{name} is written by this call, but its DLPack export is {why}; pass a writable array")
    return Imported((t.data or 0) + t.byte_offset, shape, dtype, code == _KDL_BFLOAT, dev_id,
                    bool(flags & _FLAG_READ_ONLY), capsule)


def _wrong_device(name, dev_type, dev_id, devices, device_id):
    got = f"{_DEVICE_NAMES.get(dev_type, f'DLPack device type {dev_type}')}:{dev_id}"
    if KDL_CPU in devices:
        return f"{name} is on {got}; the host backend takes host (CPU) arrays: copy it to the host first"
    if dev_type in (KDL_CUDA, KDL_CUDA_MANAGED):
        return (f"{name} is on cuda:{dev_id}, but this DpAttention uses cuda:{device_id}: pass arrays on its "
                "device (DpAttention(device=...) chooses it)")
    return f"{name} is on {got}; the cuda backend takes CUDA device arrays (on cuda:{device_id}): copy it there first"


def _check_c_contiguous(name, shape, strides, itemsize):
    """DLPack strides are in elements; dimensions of size 1 may have any stride."""
    if 0 in shape:
        return
    expect = 1
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expect:
            raise InputError(f"{name} must be C-contiguous, got shape {tuple(shape)} with strides "
                             f"{tuple(v * itemsize for v in strides)} (bytes); pass a contiguous copy")
        expect *= n


# -- out: a backend array offered to a framework ----------------------------------------------------

def plain_alias(arr):
    """A new array object over ``arr``'s memory with a plain dtype NumPy and CuPy export through
    DLPack (2-byte storage of bfloat16 stays ``uint16``); it does not reference ``arr`` itself, so
    an exported object that holds it does not keep the view ``arr`` alive."""
    dt = arr.dtype
    return arr.view(_UNSIGNED[dt.itemsize]) if dt.kind == "V" or dt.name == "bfloat16" else arr.view()


class Exported:
    """``arr`` (a NumPy or CuPy array) offered through DLPack, as bfloat16 when ``bfloat16``.

    The capsule is the array's own (``arr.__dlpack__``: NumPy's or CuPy's stream handling and
    deleter), with the dtype code of a 2-byte array rewritten to bfloat16 before it is handed over.
    Use :func:`plain_alias` for ``arr``.
    """

    __slots__ = ("_arr", "_bf16", "_host")

    def __init__(self, arr, bfloat16):
        self._arr = arr
        self._bf16 = bfloat16
        self._host = isinstance(arr, np.ndarray)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        kw = {}
        if max_version is not None:
            kw["max_version"] = max_version
        if dl_device is not None:
            kw["dl_device"] = dl_device
        if copy is not None:
            kw["copy"] = copy
        if not self._host:  # NumPy takes no stream (a consumer may pass its CPU "stream" anyway)
            kw["stream"] = stream
        capsule = self._arr.__dlpack__(**kw)
        if self._bf16:
            _relabel_bfloat16(capsule)
        return capsule


def _relabel_bfloat16(capsule):
    name = _capsule_name(capsule)
    addr = _capsule_pointer(capsule, name) + _CODE_AT[name]
    if ctypes.c_uint8.from_address(addr + 1).value != 16:  # DLDataType.bits
        raise InputError("only a 2-byte array can be handed out as bfloat16")
    ctypes.c_uint8.from_address(addr).value = _KDL_BFLOAT


class ViewCache:
    """One exported object per backend array (arena views are cached objects: steady state hands
    out the same few), dropped when the array is freed.

    An entry holds the array weakly: the exported object must not reference the array itself
    (export a :func:`plain_alias` of it), else the entry would keep the array alive. Arrays that
    own their memory are not cached for the same reason.
    """

    _LIMIT = 256  # entries; a safety net (the arenas keep at most 64 views per role)

    def __init__(self):
        self._entries = {}

    def get(self, arr, key):
        e = self._entries.get(id(arr))
        if e is not None and e[1] == key and e[0]() is arr:
            return e[2]
        return None

    def put(self, arr, key, value):
        if getattr(arr, "base", None) is None:
            return  # arr owns its memory: whatever was exported keeps it alive
        entries = self._entries
        if len(entries) >= self._LIMIT:
            entries.clear()
        k = id(arr)

        def drop(ref, k=k, entries=entries):
            e = entries.get(k)
            if e is not None and e[0] is ref:
                del entries[k]

        entries[k] = (weakref.ref(arr, drop), key, value)

    def clear(self):
        self._entries.clear()
