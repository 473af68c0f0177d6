"""CUDA backend of the row kernels: loader for ``kernels/copy.cu`` and launch wrappers.

The two public functions have the same signatures and semantics as their Numba twins in
``kernels/_host.py`` (see docs/internals.md, "Kernels"):

``copy_rows(src, dst, desc, i, stream=None)``
    Copy up to ``n_valid`` whole rows of ``src`` into ``dst`` and zero the rest of an
    ``n_rows`` window, reading ``(src_start, n_valid, dst_start, n_rows)`` from the device
    descriptor ``desc[4*i : 4*i+4]``. Clamped: never reads outside ``src``, never writes
    outside the clamped window of ``dst``.

``mask_rows(ids, desc, i, num_slots, fill, stream=None)``
    For each of ``num_slots`` slots read ``(slot_offset, n_tokens, slot_rows)`` from
    ``desc[i + 3*s : i + 3*s + 3]`` and set rows ``[slot_offset + n_tokens,
    slot_offset + slot_rows)`` of ``ids`` (clamped) to ``fill``.

``quantize_rows(src, dst, desc, i, group, pow2, dtype, stream=None)``
    ``copy_rows``' record and clamps, quantizing the copied rows into fp8 wire rows (float8
    e4m3fn bytes, then one float32 scale per group of ``group`` channels; docs/fp8.md).

All enqueue one kernel on ``stream`` (a ``cupy.cuda.Stream``/``ExternalStream``, a raw
``cudaStream_t`` as ``int``, or ``None`` for the current CuPy stream) and return at once:
no host synchronisation, no device allocation, no per-row Python work. Counts live in
device memory, and the launch configuration depends only on buffer capacities, so a
CUDA graph that captured a launch serves any counts after the descriptor is rewritten.

Compilation: one ``cupy.RawModule`` over ``copy.cu`` holding every specialisation in
:data:`NAME_EXPRESSIONS`, built lazily on first use, once per process and device (CuPy's
on-disk cache, ``CUPY_CACHE_DIR``, makes later processes fast). Call :func:`warm` before
capturing a CUDA graph so no compilation or module load happens during capture.

Importing this module never touches CuPy or a GPU; using it without CuPy or a visible
GPU raises :class:`~dpgather.core.errors.BackendUnavailable`.
"""

from __future__ import annotations

import functools
import os
import importlib.resources
import pathlib
import re

import numpy

from dpgather.core.dtypes import DTYPES, ID_DTYPES
from dpgather.core.errors import BackendUnavailable, InputError
from dpgather.core.rows import check_desc, check_rows

__all__ = [
    "COPY",
    "COPY_CTYPES",
    "CudaSource",
    "MASK_CTYPES",
    "NAME_EXPRESSIONS",
    "copy_rows",
    "kernel_source",
    "load_cupy",
    "mask_rows",
    "quantize_rows",
    "quantize_rows_unchecked",
    "quantize_lanes",
    "QUANT_CTYPES",
    "sm_count",
    "vector_bytes",
    "warm",
]

#: Vector width in bytes -> C++ type of the ``copy_rows<V>`` specialisation.
COPY_CTYPES = {
    16: "uint4",
    8: "uint2",
    4: "unsigned int",
    2: "unsigned short",
    1: "unsigned char",
}

#: NumPy dtype name of ``ids`` -> C++ type of the ``mask_rows<T>`` specialisation.
MASK_CTYPES = {name: DTYPES[name].ctype for name in ID_DTYPES}

#: Logical dtype -> C++ type of the ``quantize_rows<E>`` specialisation (the fp8 sources).
QUANT_CTYPES = {name: DTYPES[name].ctype for name in ("float32", "float16", "bfloat16")}

#: Every specialisation compiled into the module (also compile-checked on CPU CI by
#: tests/test_cuda_compile.py, which imports this tuple).
NAME_EXPRESSIONS = tuple(f"copy_rows<{c}>" for c in COPY_CTYPES.values()) + tuple(
    f"mask_rows<{c}>" for c in MASK_CTYPES.values()
) + tuple(f"quantize_rows{v}<{c}>" for v in ("", "_v16") for c in QUANT_CTYPES.values())

#: NVRTC options; the architecture is chosen by CuPy for the device it compiles for.
COMPILE_OPTIONS = ("-std=c++17",)
_U16 = os.environ.get("DPGATHER_COPY_UNROLL16")
if _U16:  # tuning knob (bench/copy_bench.py sweeps): vectors in flight per thread, 16-byte path
    COMPILE_OPTIONS += (f"-DDPG_UNROLL16={int(_U16)}",)

_SOURCE_NAME = "copy.cu"
# Threads per block: must equal dpg::kThreads in copy.cu (the kernels trap otherwise).
_THREADS = 256
# Vectors in flight per thread and loop trip, by vector bytes: mirrors dpg::Unroll<V> in
# copy.cu (it only sizes the grid; a mismatch costs speed, never correctness).
_UNROLL = {16: int(_U16) if _U16 else 8, 8: 8, 4: 8, 2: 16, 1: 16}
# Grid cap in blocks per SM (8 x 256 threads = full occupancy at the kernels' 32
# registers on sm_90); the grid-stride loops cover any remainder.
_BLOCKS_PER_SM = 16


_INSTALL_CUPY = ("`pip install cupy-cuda12x` (CUDA 12) or `pip install cupy-cuda13x` (CUDA 13), "
                 "or use backend='host'")


@functools.cache
def load_cupy():
    """CuPy, imported on first use, once a GPU is visible (cached on success).

    The one CuPy loader of dpgather: the CUDA kernels, the NCCL communicator and the P2P
    transports get CuPy here.

    Raises:
        BackendUnavailable: CuPy does not import, or CUDA sees no GPU (with the install command).
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        raise BackendUnavailable(
            f"the CUDA backend needs CuPy, which failed to import ({exc!r}): {_INSTALL_CUPY}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendUnavailable(f"the CUDA backend needs a visible GPU; CUDA reports: {exc}") from exc
    if count < 1:
        raise BackendUnavailable("the CUDA backend needs a visible GPU; CUDA reports 0 devices")
    return cupy


@functools.cache
def sm_count(device_id: int) -> int:
    """Streaming multiprocessors of ``device_id`` (cached)."""
    cupy = load_cupy()
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


# A quoted include of one of this package's headers, on a line of its own.
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_]+\.cuh)"[ \t]*$', re.MULTILINE)


def _package_text(filename: str) -> str:
    """A file shipped next to this module (package data), as text."""
    if __package__:
        return importlib.resources.files(__package__).joinpath(filename).read_text()
    return pathlib.Path(__file__).with_name(filename).read_text()


class CudaSource:
    """One CUDA source of this package (``copy.cu``, ``p2p.cu``, ``push.cu``: package data next
    to this module), compiled with NVRTC through one ``cupy.RawModule`` per device; its
    functions are fetched once per device and cached.

    Args:
        filename: the source file's name.
        name_expressions: every specialisation the module holds (``RawModule`` name expressions).
        options: NVRTC options, or a function returning them (read at the first compile on a
            device: ``p2p.cu`` takes ``-D`` switches from the environment).
    """

    def __init__(self, filename, name_expressions, options):
        self.filename = filename
        self.name_expressions = tuple(name_expressions)
        self._options = options
        self._modules = {}
        self._functions = {}

    def text(self) -> str:
        """The CUDA C++ source, self-contained: every ``#include "name.cuh"`` of this package
        (kernels/dpg_device.cuh) is replaced by that file's text, each file once (NVRTC gets
        one text, with no include path to find)."""
        seen = set()

        def inline(match):
            name = match.group(1)
            if name in seen:
                return ""
            seen.add(name)
            return _INCLUDE.sub(inline, _package_text(name))

        return _INCLUDE.sub(inline, _package_text(self.filename))

    def function(self, device_id: int, name: str):
        """Compiled kernel ``name`` (one of the name expressions) on ``device_id``."""
        fn = self._functions.get((device_id, name))
        if fn is None:
            cupy = load_cupy()
            module = self._modules.get(device_id)
            if module is None:  # nothing compiles until a function is fetched
                options = self._options() if callable(self._options) else self._options
                module = self._modules[device_id] = cupy.RawModule(
                    code=self.text(), options=tuple(options), name_expressions=self.name_expressions)
            with cupy.cuda.Device(device_id):
                fn = self._functions[(device_id, name)] = module.get_function(name)
        return fn

    def warm(self, device=None) -> None:
        """Compile and load every specialisation on ``device`` (default: the current device).

        Call once per process before capturing CUDA graphs, so that the first launch inside a
        capture does not compile or load a module.
        """
        cupy = load_cupy()
        dev = cupy.cuda.runtime.getDevice() if device is None else int(device)
        sm_count(dev)
        for name in self.name_expressions:
            self.function(dev, name)


COPY = CudaSource(_SOURCE_NAME, NAME_EXPRESSIONS, COMPILE_OPTIONS)
kernel_source = COPY.text
warm = COPY.warm


def vector_bytes(row_bytes: int, *pointers: int) -> int:
    """Widest vector width (16, 8, 4, 2 or 1 bytes) dividing ``row_bytes`` and every pointer."""
    for width in (16, 8, 4, 2, 1):
        if row_bytes % width == 0 and all(p % width == 0 for p in pointers):
            return width
    return 1


def _grid(n_vectors: int, vec: int, device_id: int) -> int:
    per_block = _THREADS * _UNROLL[vec]
    blocks = -(-n_vectors // per_block)
    return max(1, min(blocks, sm_count(device_id) * _BLOCKS_PER_SM))


def _as_device_2d(cupy, arr, name: str, op: str, row_bytes=None):
    if not isinstance(arr, cupy.ndarray):
        if not hasattr(arr, "__cuda_array_interface__"):
            raise InputError(
                f"{op}: {name} must be a CuPy array (or an object with __cuda_array_interface__), "
                f"got {type(arr).__name__}"
            )
        arr = cupy.asarray(arr)
    return check_rows(arr, name, op=op, row_bytes=row_bytes)


def _stream_arg(cupy, stream):
    if stream is None or not isinstance(stream, int):
        return stream
    return cupy.cuda.ExternalStream(stream)


def _launch(cupy, device_id, name, grid, args, stream):
    kernel = COPY.function(device_id, name)
    if cupy.cuda.runtime.getDevice() == device_id:
        kernel((grid,), (_THREADS,), args, stream=stream)
    else:
        with cupy.cuda.Device(device_id):
            kernel((grid,), (_THREADS,), args, stream=stream)


def copy_rows(src, dst, desc, i, stream=None) -> None:
    """Enqueue ``dst[dst_start + j] = src[src_start + j] if j < valid else 0`` for the window.

    Args:
        src: CuPy C-contiguous 2-D array ``[src_rows, w_src]`` of any dtype (bfloat16 as
            ``uint16``/``int16`` storage); only read.
        dst: CuPy C-contiguous 2-D array ``[dst_rows, w_dst]`` with the same row size in
            bytes as ``src``; only rows ``[dst_start, dst_start + rows)`` are written. The
            source rows read and the destination rows written must not overlap; ``dst`` may
            be ``src`` itself (e.g. ``n_valid = 0`` to zero a tail in place).
        desc: CuPy int64 1-D array on the same device; ``desc[4*i : 4*i+4]`` holds
            ``(src_start, n_valid, dst_start, n_rows)`` in rows, read by the kernel at run
            time (negative entries count as 0, everything is clamped to the buffers).
        i: descriptor record index (``int >= 0``).
        stream: stream to launch on (``None``: the current CuPy stream).

    Raises:
        InputError: wrong types, shapes, contiguity, row sizes, devices, or a descriptor
            too short for record ``i``.
        BackendUnavailable: CuPy or a GPU is missing.

    The vector width (16/8/4/2/1 bytes) is the widest dividing the row size and both base
    pointers; the grid is sized from ``dst_rows`` (capacity), never from the counts.
    """
    cupy = load_cupy()
    src = _as_device_2d(cupy, src, "src", "copy_rows")
    row_bytes = src.shape[1] * src.itemsize
    dst = _as_device_2d(cupy, dst, "dst", "copy_rows", row_bytes)
    i = int(i)
    if i < 0:
        raise InputError(f"copy_rows: i: descriptor index must be >= 0, got {i}")
    desc = check_desc(desc, 4 * i + 4, op="copy_rows", of=cupy.ndarray)
    device_id = dst.data.device_id
    if src.data.device_id != device_id or desc.data.device_id != device_id:
        raise InputError(
            f"copy_rows: src/dst/desc must be on one device, got {src.data.device_id}/{device_id}/"
            f"{desc.data.device_id}"
        )
    dst_rows = dst.shape[0]
    if dst_rows == 0 or row_bytes == 0:
        return
    vec = vector_bytes(row_bytes, src.data.ptr, dst.data.ptr)
    grid = _grid(dst_rows * (row_bytes // vec), vec, device_id)
    args = (
        src,
        dst,
        desc,
        numpy.int64(i),
        numpy.int64(src.shape[0]),
        numpy.int64(dst_rows),
        numpy.int64(row_bytes),
    )
    _launch(cupy, device_id, f"copy_rows<{COPY_CTYPES[vec]}>", grid, args,
            _stream_arg(cupy, stream))


def mask_rows(ids, desc, i, num_slots, fill, stream=None) -> None:
    """Enqueue ``ids[r, :] = fill`` for the pad rows of every slot.

    Args:
        ids: CuPy C-contiguous ``[rows, k]`` int32 or int64 array (e.g. MoE top-k ids).
        desc: CuPy int64 1-D array; ``desc[i + 3*s : i + 3*s + 3]`` holds
            ``(slot_offset, n_tokens, slot_rows)`` for slot ``s < num_slots``, in rows.
        i: first descriptor entry (an element offset, not a record index).
        num_slots: number of slots (``int >= 0``).
        fill: value written (must fit the dtype of ``ids``).
        stream: stream to launch on (``None``: the current CuPy stream).

    Rows ``[slot_offset + n_tokens, slot_offset + slot_rows)`` outside ``ids`` are skipped.

    Raises:
        InputError: wrong dtype, shape, contiguity, alignment, device, counts, or a short
            descriptor.
        BackendUnavailable: CuPy or a GPU is missing.
    """
    cupy = load_cupy()
    ids = _as_device_2d(cupy, ids, "ids", "mask_rows")
    ctype = MASK_CTYPES.get(ids.dtype.name)
    if ctype is None:
        raise InputError(f"mask_rows: ids must be int32 or int64, got {ids.dtype}")
    i = int(i)
    num_slots = int(num_slots)
    if i < 0:
        raise InputError(f"mask_rows: i: descriptor offset must be >= 0, got {i}")
    if not 0 <= num_slots < 2**31:
        raise InputError(f"mask_rows: num_slots: expected 0 <= num_slots < 2**31, got {num_slots}")
    desc = check_desc(desc, i + 3 * num_slots, op="mask_rows", of=cupy.ndarray)
    info = numpy.iinfo(ids.dtype)
    fill = int(fill)
    if not info.min <= fill <= info.max:
        raise InputError(f"mask_rows: fill: {fill} does not fit {ids.dtype} [{info.min}, {info.max}]")
    if ids.data.ptr % ids.itemsize:
        raise InputError(
            f"mask_rows: ids: data pointer {ids.data.ptr:#x} is not aligned to its {ids.itemsize}-byte items"
        )
    device_id = ids.data.device_id
    if desc.data.device_id != device_id:
        raise InputError(
            f"mask_rows: ids/desc must be on one device, got {device_id}/{desc.data.device_id}"
        )
    rows, k = ids.shape
    if rows == 0 or k == 0 or num_slots == 0:
        return
    width = ids.itemsize
    grid = _grid(rows * k, width, device_id)
    scalar = numpy.int64 if width == 8 else numpy.int32
    args = (
        ids, desc, numpy.int64(i), numpy.int32(num_slots), numpy.int64(rows), numpy.int64(k),
        scalar(fill),
    )
    _launch(cupy, device_id, f"mask_rows<{ctype}>", grid, args, _stream_arg(cupy, stream))


_I64 = numpy.int64
_fast = {}


def copy_rows_unchecked(src, dst, desc, i, stream=None) -> None:
    """:func:`copy_rows` without argument validation, for callers that validated already.

    The facade's hot path: ``src``/``dst`` are C-contiguous 2-D CuPy arrays with equal row
    bytes on the current device, ``desc`` a device int64 array holding record ``i``. Saves the
    per-call checks and device queries (a few microseconds of host time per launch).
    """
    dst_rows = dst.shape[0]
    row_bytes = dst.shape[1] * dst.itemsize
    if dst_rows == 0 or row_bytes == 0:
        return
    sp, dp = src.data.ptr, dst.data.ptr
    vec = 16 if not (row_bytes | sp | dp) & 15 else vector_bytes(row_bytes, sp, dp)
    dev = dst.data.device_id
    key = (dev, vec)
    entry = _fast.get(key)
    if entry is None:
        entry = _fast[key] = (COPY.function(dev, f"copy_rows<{COPY_CTYPES[vec]}>"),
                              _THREADS * _UNROLL[vec], sm_count(dev) * _BLOCKS_PER_SM)
    kernel, per_block, cap = entry
    blocks = -(-(dst_rows * (row_bytes // vec)) // per_block)
    grid = blocks if blocks < cap else cap
    kernel((grid,), (_THREADS,),
           (src, dst, desc, _I64(i), _I64(src.shape[0]), _I64(dst_rows), _I64(row_bytes)),
           stream=stream)


def quantize_rows(src, dst, desc, i, group, pow2, dtype, stream=None) -> None:
    """Enqueue the fp8 quantizing copy of :func:`copy_rows`' window (docs/fp8.md).

    Args:
        src: CuPy C-contiguous ``[src_rows, H]`` rows of logical ``dtype`` (``"float32"``,
            ``"float16"``, ``"bfloat16"``; 2-byte storage for the last two); only read.
        dst: CuPy C-contiguous uint8 ``[dst_rows, H + 4 * H // group]``: each written row is
            ``H`` float8 e4m3fn bytes, then ``H // group`` float32 scales.
        desc, i, stream: as :func:`copy_rows`.
        group: channels per scale (divides ``H``). pow2: power-of-two scales.

    Raises:
        InputError: wrong types, shapes, contiguity, dtype, group, devices, or a short descriptor.
        BackendUnavailable: CuPy or a GPU is missing.
    """
    cupy = load_cupy()
    src = _as_device_2d(cupy, src, "src", "quantize_rows")
    dst = _as_device_2d(cupy, dst, "dst", "quantize_rows")
    H, group = src.shape[1], int(group)
    _check_quantize(src, dst, H, group, dtype, numpy.uint8)
    i = int(i)
    if i < 0:
        raise InputError(f"quantize_rows: i: descriptor index must be >= 0, got {i}")
    desc = check_desc(desc, 4 * i + 4, op="quantize_rows", of=cupy.ndarray)
    device_id = dst.data.device_id
    if src.data.device_id != device_id or desc.data.device_id != device_id:
        raise InputError(f"quantize_rows: src/dst/desc must be on one device, got {src.data.device_id}/"
                         f"{device_id}/{desc.data.device_id}")
    with cupy.cuda.Device(device_id):
        quantize_rows_unchecked(src, dst, desc, i, group, pow2, dtype, _stream_arg(cupy, stream))


def _check_quantize(src, dst, H, group, dtype, u8):
    """The quantize_rows checks both backends share (shapes, dtypes, group)."""
    if dtype not in QUANT_CTYPES:
        raise InputError(f"quantize_rows: dtype must be one of {tuple(QUANT_CTYPES)}, got {dtype!r}")
    if src.dtype.itemsize != DTYPES[dtype].itemsize:
        raise InputError(f"quantize_rows: src holds {src.dtype} ({src.dtype.itemsize}-byte items), "
                         f"not {dtype} storage")
    if group < 1 or H % group:
        raise InputError(f"quantize_rows: group={group} must be >= 1 and divide the row width {H}")
    wire = H + 4 * (H // group)
    if dst.dtype != u8 or dst.shape[1] != wire:
        raise InputError(f"quantize_rows: dst must be uint8 [rows, {wire}] (H={H} fp8 bytes and {H // group} "
                         f"float32 scales per row), got {dst.dtype} {tuple(dst.shape)}")


def quantize_lanes(row_bytes, group_bytes, wire, itemsize, *pointers) -> int:
    """Lanes per group of ``quantize_rows_v16`` (a power of two <= 32), or 0 where its 16-byte
    accesses do not fit the rows, the group or the pointers (then ``quantize_rows`` serves)."""
    vec = 16 // itemsize
    if row_bytes % 16 or group_bytes % 16 or wire % vec or any(p % 16 for p in pointers):
        return 0
    chunks = group_bytes // 16
    if chunks <= 32:
        return chunks if chunks & (chunks - 1) == 0 else 0
    return 32 if chunks % 32 == 0 else 0


def quantize_rows_unchecked(src, dst, desc, i, group, pow2, dtype, stream=None) -> None:
    """:func:`quantize_rows` without argument validation (the data plane's hot path, on the
    current device)."""
    dst_rows, H = dst.shape[0], src.shape[1]
    if dst_rows == 0 or H == 0:
        return
    dev, size = dst.data.device_id, src.itemsize
    lanes = quantize_lanes(H * size, group * size, dst.shape[1], size, src.data.ptr, dst.data.ptr)
    key = (dev, "q", dtype, lanes > 0)
    entry = _fast.get(key)
    if entry is None:
        name = f"quantize_rows{'_v16' if lanes else ''}<{QUANT_CTYPES[dtype]}>"
        entry = _fast[key] = (COPY.function(dev, name), sm_count(dev) * _BLOCKS_PER_SM)
    kernel, cap = entry
    items_per_warp = 32 // lanes if lanes else 1
    warps = -(-dst_rows * (H // group) // items_per_warp)
    blocks = -(-warps // (_THREADS // 32))
    grid = blocks if blocks < cap else cap
    args = (src, dst, desc, _I64(i), _I64(src.shape[0]), _I64(dst_rows), _I64(H), _I64(group),
            numpy.int32(bool(pow2)))
    kernel((grid,), (_THREADS,), args + ((numpy.int32(lanes),) if lanes else ()), stream=stream)
