"""The pull kernel of the P2P transport: loader of ``kernels/pull.cu``, window layout, launch rules.

docs/p2p.md is the specification. This module holds everything about one ``p2p_pull``
collective that needs no communicator:

- the window layout (:func:`window_layout`, :func:`initial_header`) and the error codes
  (:data:`ERR_TIMEOUT`, ...);
- how the kernel reads a descriptor (:func:`read_desc`, the host twin's reading of it);
- the CUDA side: :data:`NAME_EXPRESSIONS`, :func:`warm`, :func:`grid_size`,
  :func:`pick_vector`, :func:`kernel_name`, and the argument packing of :data:`KERNEL_PARAMS`
  (:func:`call_args`, :func:`window_args`), used by :class:`dpgather.dist.pull.CudaPull`;
- :func:`timeout_ns`: the one place ``timeout_s`` becomes the kernel's nanoseconds.

Descriptor (int64; every entry in rows; ``row_bytes`` is a kernel argument)::

    desc[off:]  = [sig, n_pack, n_jobs, 0]
                + n_pack x (in_row, rows, src_row)
                + n_jobs x (dst_row, cnt, span, src_row, first, count, stride)

The data plane's descriptors are written by :class:`dpgather._layout.Descriptor`; the tests
build theirs with their own encoder (``tests/pull_reference.py``).

Importing this module never imports CuPy (nor mpi4py, Numba or ml_dtypes); the CUDA
functions raise :class:`~dpgather.core.errors.BackendUnavailable` without CuPy or a GPU.
"""

from __future__ import annotations

import math
import os
import re
from typing import NamedTuple

import numpy as np

from dpgather.core.dtypes import DTYPES
from dpgather.core.errors import InputError

from ._cuda import COPY_CTYPES, CudaSource, sm_count, vector_bytes

__all__ = [
    "ERR_OK",
    "ERR_SIGNATURE",
    "ERR_TIMEOUT",
    "ERROR_NAMES",
    "HEADER_WORDS",
    "JOB_WORDS",
    "KERNEL_PARAMS",
    "MAX_RANKS",
    "NAME_EXPRESSIONS",
    "PACK_WORDS",
    "PULL",
    "THREADS",
    "WindowLayout",
    "call_args",
    "clamp_index",
    "compile_options",
    "grid_size",
    "initial_header",
    "kernel_name",
    "kernel_source",
    "max_blocks",
    "pick_vector",
    "read_desc",
    "round_capacity",
    "timeout_ns",
    "warm",
    "window_args",
    "window_layout",
]

#: Every specialisation compiled into the module: each element type (the dtype table's C
#: type) with each vector at least as wide as the element (tests/test_cuda_compile.py checks).
NAME_EXPRESSIONS = tuple(
    f"p2p_pull<{d.ctype}, {v}>"
    for d in DTYPES.values()
    for width, v in COPY_CTYPES.items()
    if width >= d.itemsize
)

#: NVRTC options; CuPy adds the CUDA include directory (cuda_fp16.h, cuda_bf16.h) itself.
COMPILE_OPTIONS = ("-std=c++17",)
#: Tuning switches of pull.cu for experiments, ``NAME=VALUE`` pairs separated by commas, names
#: starting with ``DPG_P2P_`` (e.g. ``DPG_P2P_FLAG_FENCE=0,DPG_P2P_RELAXED_POLL=1``).
_DEFINES_VAR = "DPGATHER_P2P_DEFINES"


def compile_options():
    """:data:`COMPILE_OPTIONS` plus ``-D`` options from ``DPGATHER_P2P_DEFINES``."""
    extra = []
    for item in os.environ.get(_DEFINES_VAR, "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        if not re.fullmatch(r"DPG_P2P_[A-Z0-9_]+", name) or not re.fullmatch(r"-?[0-9]+", value or "1"):
            raise InputError(f"{_DEFINES_VAR}: expected NAME=INT pairs with names DPG_P2P_*, got {item!r}")
        extra.append(f"-D{name}={value or '1'}")
    return COMPILE_OPTIONS + tuple(extra)


#: Error codes in the device copy ``state.err`` and the host error word.
ERR_OK = 0
ERR_TIMEOUT = 1  # a wait outlived timeout_s: a peer did not enter the collective in time
ERR_SIGNATURE = 2  # a peer entered the same epoch with a different signature
ERROR_NAMES = {
    ERR_OK: "ok",
    ERR_TIMEOUT: "timeout: a peer did not reach the collective within timeout_s",
    ERR_SIGNATURE: "signature mismatch: the ranks issued different collectives",
}

#: Descriptor record sizes in int64 words.
HEADER_WORDS, PACK_WORDS, JOB_WORDS = 4, 3, 7
#: Threads per block (== dpg_p2p::kThreads; any other block size traps).
THREADS = 256
#: Ranks of one transport: the kernel polls with one thread per rank of a 256-thread block.
MAX_RANKS = THREADS

_ALIGN = 256  # data_off and cap_bytes alignment: every src buffer starts 256-byte aligned
_INDEX_MAX = 2**31 - 1  # first/stride clamp (== dpg_p2p::kIndexMax)
_BYTES_PER_BLOCK = THREADS * 16 * 4  # one 16-byte reduce tile: the grid sizing unit
_MAX_BLOCKS_VAR = "DPGATHER_P2P_MAX_BLOCKS"
_NS_MAX = 2**63 - 1


# ---------------------------------------------------------------------------- layout

class WindowLayout(NamedTuple):
    """Byte offsets inside one rank's window (identical on every rank).

    Attributes:
        flag_off: ``flag[2][T]`` uint64, ``(epoch << 32) | sig`` stored by peer ``t``.
        state_off: ``state[4]`` uint64: ``epoch, arrive, depart, err`` (this rank only).
        data_off: ``src[0]``; ``src[1]`` at ``data_off + cap_bytes``.
        cap_bytes: bytes of one ``src`` buffer (a multiple of 256).
        window_bytes: total bytes of the window.
    """

    flag_off: int
    state_off: int
    data_off: int
    cap_bytes: int
    window_bytes: int


def round_capacity(capacity_bytes) -> int:
    """``capacity_bytes`` rounded up to a multiple of 256 (so ``src[1]`` stays aligned)."""
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, (int, np.integer)):
        raise InputError(f"capacity_bytes: expected an int, got {capacity_bytes!r}")
    cap = int(capacity_bytes)
    if cap < 1:
        raise InputError(f"capacity_bytes: expected >= 1 byte, got {cap}")
    return -(-cap // _ALIGN) * _ALIGN


def window_layout(nranks: int, capacity_bytes: int) -> WindowLayout:
    """The window of a transport of ``nranks`` ranks with ``capacity_bytes`` per ``src``."""
    nranks = int(nranks)
    if not 1 <= nranks <= MAX_RANKS:
        raise InputError(f"nranks: expected 1 <= nranks <= {MAX_RANKS}, got {nranks}")
    cap = round_capacity(capacity_bytes)
    state_off = 2 * nranks * 8
    data_off = -(-(state_off + 32) // _ALIGN) * _ALIGN
    return WindowLayout(0, state_off, data_off, cap, data_off + 2 * cap)


def initial_header(nranks, layout, epoch0):
    """The flags and state words a window starts with (uint64 ``[data_off // 8]``).

    ``state.epoch = epoch0`` and ``flag[p][t]`` holds the last epoch ``<= epoch0`` of
    parity ``p`` (mod 2^32), signature 0: neither of the next two epochs can match it.
    """
    words = np.zeros(layout.data_off // 8, np.uint64)
    for p in (0, 1):
        last = epoch0 - ((epoch0 - p) & 1)
        words[p * nranks : (p + 1) * nranks] = np.uint64((last & 0xFFFFFFFF) << 32)
    words[layout.state_off // 8] = np.uint64(epoch0)
    return words


# ---------------------------------------------------------------------------- descriptors

def clamp_index(x: int) -> int:
    """``first``/``stride`` of a job clamped to +-(2^31 - 1), as the kernel does."""
    return max(-_INDEX_MAX, min(_INDEX_MAX, x))


def read_desc(desc, desc_off: int = 0):
    """``(sig, packs, jobs)`` of the descriptor at ``desc[desc_off:]``, as the kernel reads it.

    ``sig`` is the low 32 bits of ``desc[off]``; ``n_pack``/``n_jobs`` are cut to the records
    that fit in ``desc`` (negative counts as 0); records are Python int tuples, not yet clamped.
    ``desc`` is a 1-D int64 array with at least ``desc_off + HEADER_WORDS`` entries (checked by
    the caller).
    """
    off = int(desc_off)
    sig = int(desc[off]) & 0xFFFFFFFF
    left = desc.shape[0] - off - HEADER_WORDS
    n_pack = min(max(int(desc[off + 1]), 0), left // PACK_WORDS)
    left -= PACK_WORDS * n_pack
    n_jobs = min(max(int(desc[off + 2]), 0), left // JOB_WORDS)
    p = off + HEADER_WORDS
    packs = desc[p : p + PACK_WORDS * n_pack].reshape(n_pack, PACK_WORDS).tolist()
    p += PACK_WORDS * n_pack
    jobs = desc[p : p + JOB_WORDS * n_jobs].reshape(n_jobs, JOB_WORDS).tolist()
    return sig, packs, jobs


# ---------------------------------------------------------------------------- CUDA side

PULL = CudaSource("pull.cu", NAME_EXPRESSIONS, compile_options)
kernel_source = PULL.text
#: Compile and load every ``p2p_pull`` specialisation on a device (default: current). Call
#: before capturing a CUDA graph (``CudaPull`` does it in its constructor), so that no
#: compilation or module load happens inside a capture.
warm = PULL.warm


def timeout_ns(timeout_s) -> int:
    """The kernel's ``timeout_ns`` for ``timeout_s`` seconds (``math.inf`` -> 0, the kernel's
    "no limit"; a finite limit is at least 1 ns). The one place this conversion happens."""
    if math.isinf(timeout_s):
        return 0
    ns = timeout_s * 1e9
    return _NS_MAX if ns >= _NS_MAX else max(1, int(ns))


def max_blocks(device_id: int) -> int:
    """The grid cap: the SM count, or ``DPGATHER_P2P_MAX_BLOCKS`` when smaller (MPS limits)."""
    cap = sm_count(device_id)
    env = os.environ.get(_MAX_BLOCKS_VAR, "").strip()
    if env.isdigit() and int(env) > 0:
        cap = min(cap, int(env))
    return cap


def grid_size(in_rows: int, out_rows: int, row_bytes: int, cap_bytes: int, limit: int) -> int:
    """Blocks of one launch, from capacities only (graph-safe), at most ``limit``.

    One block per 16 KiB (one 16-byte reduce tile: 256 threads x 4 vectors) of the
    larger of what a launch may write: ``out_rows`` rows pulled, or the input rows that fit
    in ``src``. At least 1; never more than ``limit`` (the SM count: co-residency).
    """
    work = max(int(out_rows) * int(row_bytes), min(int(in_rows) * int(row_bytes), int(cap_bytes)))
    return max(1, min(-(-work // _BYTES_PER_BLOCK), int(limit)))


#: The kernel's parameters in order, with their C types: :func:`call_args` packs the first
#: eight, :func:`window_args` the rest; tests/test_cuda_compile.py checks this list against the
#: signature in ``pull.cu``.
KERNEL_PARAMS = (
    ("inp", "const V*"), ("in_rows", "long long"), ("out", "V*"), ("out_rows", "long long"),
    ("desc", "const long long*"), ("desc_off", "long long"), ("desc_len", "long long"),
    ("row_bytes", "long long"), ("windows", "unsigned char* const*"), ("me", "int"),
    ("nranks", "int"), ("data_off", "long long"), ("cap_bytes", "long long"),
    ("host_err", "int*"), ("timeout_ns", "long long"),
)


def call_args(inp, in_rows, out, out_rows, desc, desc_off, desc_len, row_bytes):
    """The per-call kernel arguments (pointers as device addresses ``int``) as NumPy scalars of
    the sizes CuPy passes by value: pointers ``uint64``, ``long long`` ``int64``."""
    i64 = np.int64
    return (np.uint64(inp), i64(in_rows), np.uint64(out), i64(out_rows), np.uint64(desc), i64(desc_off),
            i64(desc_len), i64(row_bytes))


def window_args(windows, me, nranks, data_off, cap_bytes, host_err, timeout):
    """The per-transport kernel arguments: ``windows`` (device address of the ``nranks`` window
    base pointers), this rank ``me``, the layout, the mapped host error word ``host_err`` and
    ``timeout`` (nanoseconds, :func:`timeout_ns`)."""
    return (np.uint64(windows), np.int32(me), np.int32(nranks), np.int64(data_off), np.int64(cap_bytes),
            np.uint64(host_err), np.int64(timeout))


def kernel_name(dtype: str, vec: int) -> str:
    """The name expression of the specialisation for logical ``dtype`` and ``vec``-byte vectors."""
    return f"p2p_pull<{DTYPES[dtype].ctype}, {COPY_CTYPES[vec]}>"


def pick_vector(row_bytes: int, itemsize: int, *pointers: int) -> int:
    """Widest vector width (16..1 bytes, >= ``itemsize``) dividing ``row_bytes`` and pointers."""
    vec = vector_bytes(int(row_bytes), *pointers)
    if vec < itemsize:
        raise InputError(
            f"row_bytes/pointers: {row_bytes}-byte rows at {[hex(p) for p in pointers]} are not "
            f"aligned to the {itemsize}-byte elements"
        )
    return vec
