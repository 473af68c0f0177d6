"""What the two P2P kernels share: ``p2p_pull`` (kernels/pull.cu) and ``p2p_push`` (kernels/push.cu).

The pull loader (:mod:`._pull`, docs/p2p.md) and the push loader (:mod:`._push`, docs/push.md)
each own their kernel's window layout, grid rule and descriptor reading; neither imports the
other. What is the same for both lives here, once:

- the error codes of the device error word (:data:`ERR_TIMEOUT`, :data:`ERR_SIGNATURE`);
- the kernels' parameters (:data:`KERNEL_PARAMS`: the two kernels take the same list) and their
  packing: :func:`call_args` / :func:`window_args` as the NumPy scalars CuPy's ``RawKernel``
  passes, and :class:`PackedParams`, the ``void*[]`` array ``cuLaunchKernel(Ex)`` takes (the
  programmatic-dependent launch of :mod:`._launch`, and the CPU emulators in ``tests/``);
- the specialisation names (:func:`specialisations`, :func:`specialisation`), the NVRTC options
  with the ``DPGATHER_P2P_DEFINES`` tuning switches (:func:`compile_options`), the access width
  (:func:`pick_vector`), the grid cap (:func:`max_blocks`), the capacity rounding
  (:func:`round_capacity`), the index clamp (:func:`clamp_index`) and the one conversion of
  ``timeout_s`` into the kernels' nanoseconds (:func:`timeout_ns`).

Importing this module never imports CuPy (nor mpi4py, Numba or ml_dtypes).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from dpgather.core.dtypes import DTYPES
from dpgather.core.errors import InputError

from ._cuda import COPY_CTYPES, sm_count, vector_bytes

__all__ = [
    "ALIGN",
    "ERR_OK",
    "ERR_SIGNATURE",
    "ERR_TIMEOUT",
    "ERROR_NAMES",
    "HEADER_WORDS",
    "JOB_WORDS",
    "KERNEL_PARAMS",
    "MAX_RANKS",
    "PackedParams",
    "THREADS",
    "call_args",
    "clamp_index",
    "compile_options",
    "max_blocks",
    "pick_vector",
    "read_desc",
    "round_capacity",
    "specialisation",
    "specialisations",
    "timeout_ns",
    "window_args",
    "window_sizes",
]

#: Error codes in the device copy ``state.err`` and the host error word (both kernels).
ERR_OK = 0
ERR_TIMEOUT = 1  # a wait outlived timeout_s: a peer did not enter the collective in time
ERR_SIGNATURE = 2  # a peer entered the same epoch with a different signature
ERROR_NAMES = {
    ERR_OK: "ok",
    ERR_TIMEOUT: "timeout: a peer did not reach the collective within timeout_s",
    ERR_SIGNATURE: "signature mismatch: the ranks issued different collectives",
}

#: Threads per block of both kernels (any other block size traps).
THREADS = 256
#: Ranks of one transport: both kernels poll with one thread per rank (peer) of a block.
MAX_RANKS = THREADS
#: Descriptor words of the header ``[sig, n_a, n_b, x]`` and of one receive job, both kernels.
HEADER_WORDS, JOB_WORDS = 4, 7
#: Capacities and window regions are multiples of this: every buffer of a window starts aligned.
ALIGN = 256

_INDEX_MAX = 2**31 - 1  # first/stride clamp (== dpg_dev::kIndexMax)
_MAX_BLOCKS_VAR = "DPGATHER_P2P_MAX_BLOCKS"
_NS_MAX = 2**63 - 1

#: NVRTC options; CuPy adds the CUDA include directory (cuda_fp16.h, cuda_bf16.h) itself.
COMPILE_OPTIONS = ("-std=c++17",)
#: Tuning switches of pull.cu and push.cu for experiments, ``NAME=VALUE`` pairs separated by
#: commas, names starting with ``DPG_P2P_`` (e.g. ``DPG_P2P_FLAG_FENCE=1,DPG_P2P_PUSH_UNROLL=4``).
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


def specialisations(kernel: str, widths) -> tuple:
    """Name expressions of ``kernel<E, V>``: each element type of the dtype table with each
    access width of ``widths`` (bytes) at least as wide as the element."""
    return tuple(f"{kernel}<{d.ctype}, {COPY_CTYPES[w]}>" for d in DTYPES.values() for w in widths
                 if w >= d.itemsize)


def specialisation(kernel: str, dtype: str, vec: int) -> str:
    """The name expression of ``kernel`` for logical ``dtype`` and ``vec``-byte accesses."""
    return f"{kernel}<{DTYPES[dtype].ctype}, {COPY_CTYPES[vec]}>"


def round_capacity(capacity_bytes) -> int:
    """``capacity_bytes`` rounded up to a multiple of 256 (so every buffer stays aligned)."""
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, (int, np.integer)):
        raise InputError(f"capacity_bytes: expected an int, got {capacity_bytes!r}")
    cap = int(capacity_bytes)
    if cap < 1:
        raise InputError(f"capacity_bytes: expected >= 1 byte, got {cap}")
    return -(-cap // ALIGN) * ALIGN


def window_sizes(nranks, capacity_bytes):
    """``(nranks, cap)``: the rank count checked (1..:data:`MAX_RANKS`) and the capacity rounded
    (:func:`round_capacity`), the two sizes every window layout starts from."""
    nranks = int(nranks)
    if not 1 <= nranks <= MAX_RANKS:
        raise InputError(f"nranks: expected 1 <= nranks <= {MAX_RANKS}, got {nranks}")
    return nranks, round_capacity(capacity_bytes)


def clamp_index(x: int) -> int:
    """``first``/``stride`` (and a push send's ``dest_first``) clamped to +-(2^31 - 1), as the
    kernels do."""
    return max(-_INDEX_MAX, min(_INDEX_MAX, x))


def read_desc(desc, desc_off: int, first_words: int):
    """``(sig, firsts, jobs, word3)`` of a descriptor ``[sig, n_a, n_b, word3]`` at
    ``desc[desc_off:]`` followed by ``n_a`` records of ``first_words`` words (the pull's packs,
    the push's sends) and ``n_b`` jobs, as the kernels read it: ``sig`` is the low 32 bits of
    the first word, ``n_a``/``n_b`` are cut to the records that fit in ``desc`` (negative counts
    as 0), ``word3`` is made non-negative; records are Python int lists, not yet clamped.
    ``desc`` is a 1-D int64 array with at least ``desc_off + HEADER_WORDS`` entries (checked by
    the caller)."""
    off = int(desc_off)
    sig = int(desc[off]) & 0xFFFFFFFF
    left = desc.shape[0] - off - HEADER_WORDS
    n_a = min(max(int(desc[off + 1]), 0), left // first_words)
    left -= first_words * n_a
    n_b = min(max(int(desc[off + 2]), 0), left // JOB_WORDS)
    p = off + HEADER_WORDS
    firsts = desc[p : p + first_words * n_a].reshape(n_a, first_words).tolist()
    p += first_words * n_a
    jobs = desc[p : p + JOB_WORDS * n_b].reshape(n_b, JOB_WORDS).tolist()
    return sig, firsts, jobs, max(int(desc[off + 3]), 0)


def timeout_ns(timeout_s) -> int:
    """The kernels' ``timeout_ns`` for ``timeout_s`` seconds (``math.inf`` -> 0, the kernels'
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


def pick_vector(row_bytes: int, itemsize: int, *pointers: int, widest: int = 16) -> int:
    """Widest access (``widest``..1 bytes, >= ``itemsize``) dividing ``row_bytes`` and pointers."""
    vec = min(vector_bytes(int(row_bytes), *pointers), widest)
    if vec < itemsize:
        raise InputError(
            f"row_bytes/pointers: {row_bytes}-byte rows at {[hex(p) for p in pointers]} are not "
            f"aligned to the {itemsize}-byte elements"
        )
    return vec


#: The kernels' parameters in order, with their C types (``p2p_pull`` and ``p2p_push`` alike):
#: :func:`call_args` packs the first eight, :func:`window_args` the rest;
#: tests/test_cuda_compile.py checks this list against both signatures.
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


def _param_dtype(ctype: str) -> np.dtype:
    return np.dtype(np.uint64 if ctype.endswith("*") else np.int32 if ctype == "int" else np.int64)


class PackedParams:
    """The kernels' parameters as ``cuLaunchKernel``/``cuLaunchKernelEx`` take them: every value
    in its own 8-byte slot of one buffer, and :attr:`address`, a ``void*[n]`` array of the
    slots' addresses. :meth:`set` rewrites the values in place (the driver copies them at the
    launch call, so one instance serves every launch of a configuration).

    Args:
        params: ``(name, C type)`` pairs (default :data:`KERNEL_PARAMS`).
    """

    def __init__(self, params=KERNEL_PARAMS):
        self.dtype = np.dtype({"names": [n for n, _ in params], "formats": [_param_dtype(c) for _, c in params],
                               "offsets": [8 * i for i in range(len(params))], "itemsize": 8 * len(params)})
        self.values = np.zeros((), self.dtype)
        base = self.values.ctypes.data
        self.slots = np.arange(len(params), dtype=np.uint64) * np.uint64(8) + np.uint64(base)
        #: address of the ``void*`` array (what ``kernelParams`` takes)
        self.address = int(self.slots.ctypes.data)

    def set(self, args) -> int:
        """Store ``args`` (:func:`call_args` + :func:`window_args`, in parameter order); returns
        :attr:`address`."""
        self.values[()] = tuple(args)
        return self.address
