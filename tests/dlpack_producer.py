"""A DLPack producer written against dlpack.h with ctypes, independent of the library: legacy and
versioned (1.0) capsules over a NumPy array's memory, with any dtype code, shape, strides, byte
offset, device and flags, and a deleter that counts its calls (tests/test_interop.py).

The capsule follows the Python specification of DLPack: named ``dltensor`` or
``dltensor_versioned``; a consumer that takes ownership renames it ``used_...`` and calls the
deleter itself; otherwise the capsule's destructor calls the deleter when the capsule dies.
"""

import ctypes
from ctypes import POINTER, Structure, c_char_p, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

import numpy as np


class DLDevice(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [("data", c_void_p), ("device", DLDevice), ("ndim", c_int32), ("dtype", DLDataType),
                ("shape", POINTER(c_int64)), ("strides", POINTER(c_int64)), ("byte_offset", c_uint64)]


class DLManagedTensor(Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", c_void_p)]


class DLPackVersion(Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", c_void_p), ("deleter", c_void_p), ("flags", c_uint64),
                ("dl_tensor", DLTensor)]


READ_ONLY, IS_COPIED = 1, 2
CPU, CUDA = 1, 2
INT, UINT, FLOAT, BFLOAT = 0, 1, 2, 4
_NAMES = {False: b"dltensor", True: b"dltensor_versioned"}
_LIVE = {}  # address of a managed tensor -> (struct, shape, strides, producer)

_DELETER = ctypes.CFUNCTYPE(None, c_void_p)
_DESTRUCTOR = ctypes.CFUNCTYPE(None, c_void_p)
_get_name = ctypes.PYFUNCTYPE(c_char_p, c_void_p)(("PyCapsule_GetName", ctypes.pythonapi))
_get_pointer = ctypes.PYFUNCTYPE(c_void_p, c_void_p, c_char_p)(("PyCapsule_GetPointer", ctypes.pythonapi))
_new = ctypes.PYFUNCTYPE(ctypes.py_object, c_void_p, c_char_p, c_void_p)(("PyCapsule_New", ctypes.pythonapi))


@_DELETER
def _delete(addr, _live=_LIVE):
    entry = _live.pop(addr, None)
    if entry is not None:
        entry[3].deleted += 1


@_DESTRUCTOR
def _destroy(capsule, _names=tuple(_NAMES.values()), _name=_get_name, _pointer=_get_pointer, _free=_delete):
    name = _name(capsule)
    if name in _names:  # not consumed: the producer frees it
        _free(_pointer(capsule, name))


# Warning: a consumer's array (or an unconsumed capsule) may die during the interpreter's
# finalization, after this module was torn down; the two callbacks then still run. They are
# kept alive for good and read nothing global (freed trampolines crashed the interpreter at exit
# wherever an audit hook was installed: rc 139 on CPython 3.11).
for _callback in (_delete, _destroy):
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(_callback))


class Producer:
    """``__dlpack__`` over ``base`` (a NumPy array that keeps the memory).

    ``code``/``bits``: the DLPack dtype (default: ``base``'s); ``shape``/``strides`` (elements; None:
    C-contiguous without strides); ``byte_offset`` from ``base``'s first byte; ``device``: the
    ``(type, id)`` to claim; ``versioned``: a DLPack 1.0 capsule when the consumer asks for one;
    ``legacy``: ``__dlpack__`` takes ``stream`` only (a pre-1.0 producer). ``deleted`` counts deleter
    calls; ``calls`` records the keyword arguments of each ``__dlpack__`` call.
    """

    def __init__(self, base, *, code=None, bits=None, shape=None, strides=None, byte_offset=0, device=(CPU, 0),
                 versioned=True, flags=0, legacy=False):
        self.base = base
        kinds = {"i": INT, "u": UINT, "f": FLOAT}
        self.code = kinds[base.dtype.kind] if code is None else code
        self.bits = base.dtype.itemsize * 8 if bits is None else bits
        self.shape = tuple(base.shape if shape is None else shape)
        self.strides = strides
        self.byte_offset = byte_offset
        self.device = device
        self.versioned = versioned
        self.flags = flags
        self.legacy = legacy
        self.deleted = 0
        self.calls = []

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *, stream=None, max_version=None, copy=None, **unknown):
        if self.legacy and (max_version is not None or copy is not None or unknown):
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        self.calls.append({"stream": stream, "max_version": max_version, "copy": copy})
        versioned = self.versioned and max_version is not None and max_version >= (1, 0)
        m = DLManagedTensorVersioned() if versioned else DLManagedTensor()
        if versioned:
            m.version.major, m.version.minor, m.flags = 1, 0, self.flags
        t = m.dl_tensor
        t.data = self.base.__array_interface__["data"][0]
        t.device.device_type, t.device.device_id = self.device
        t.ndim = len(self.shape)
        t.dtype.code, t.dtype.bits, t.dtype.lanes = self.code, self.bits, 1
        shape = (c_int64 * max(1, len(self.shape)))(*self.shape)
        strides = None
        t.shape = shape
        if self.strides is not None:
            strides = (c_int64 * len(self.strides))(*self.strides)
            t.strides = strides
        t.byte_offset = self.byte_offset
        m.deleter = ctypes.cast(_delete, c_void_p)
        addr = ctypes.addressof(m)
        _LIVE[addr] = (m, shape, strides, self)
        return _new(addr, _NAMES[versioned], ctypes.cast(_destroy, c_void_p))


class Forward:
    """Any other DLPack producer: forwards the protocol of the array it holds (``a``), nothing else."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def live():
    """How many capsules this module made are still alive (not deleted)."""
    return len(_LIVE)


def bf16_bits(values):
    """bfloat16 bits (uint16) of small float values (exact: integers below 256)."""
    f = np.asarray(values, dtype=np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16)
