"""The push transport's kernel: loader and launcher for ``kernels/push.cu``, its window and descriptor.

docs/push.md is the specification. This module holds everything about one ``p2p_push``
collective that does not need a communicator: the window layout (:func:`window_layout`,
:func:`initial_state`), the row capacity of a region (:func:`capacity_rows`), the descriptor
encoder for explicit records (:func:`make_desc`), and the CUDA side (:data:`NAME_EXPRESSIONS`,
:func:`warm`, :func:`pick_vector`, :func:`grid_size`, :func:`launch`). What both P2P kernels
share comes from :mod:`dpgather.kernels._p2p`: the element types, the error codes, the kernel
parameters and their packing (the two kernels take the same parameters), the grid cap, the
signature and the capacity rounding.

Descriptor (int64; every entry in rows)::

    desc[off:]  = [sig, n_send, n_jobs, self_row]
                + n_send x (in_row, rows, slot_row, dest_first, dest_count)
                + n_jobs x (dst_row, cnt, span, src_row, first, count, stride)

Importing this module never imports CuPy; the CUDA functions raise
:class:`~dpgather.core.errors.BackendUnavailable` without CuPy or a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpgather.core.errors import InputError

from . import _p2p
from ._cuda import COPY_CTYPES, CudaSource
from ._p2p import ELEM_CTYPES, ITEMSIZE, KERNEL_PARAMS, kernel_args, max_blocks, round_capacity

__all__ = [
    "ACCESS_CTYPES",
    "FIRST_EPOCH",
    "HDR_OFF",
    "HEADER_WORDS",
    "JOB_WORDS",
    "KERNEL_PARAMS",
    "LINE_BYTES",
    "MAX_RANKS",
    "NAME_EXPRESSIONS",
    "PUSH",
    "SEND_WORDS",
    "WindowLayout",
    "capacity_rows",
    "desc_words",
    "grid_size",
    "initial_state",
    "kernel_args",
    "kernel_name",
    "kernel_source",
    "launch",
    "lines_per_row",
    "make_desc",
    "max_blocks",
    "pick_vector",
    "warm",
    "window_layout",
]

#: Access width in bytes -> C++ type of ``V`` in ``p2p_push<E, V>``: at most the 8 data bytes of a line.
ACCESS_CTYPES = {w: c for w, c in COPY_CTYPES.items() if w <= 8}

#: Every specialisation compiled into the module: each element type with each access at least
#: as wide as the element (tests/test_cuda_compile.py compiles the same list).
NAME_EXPRESSIONS = tuple(
    f"p2p_push<{e}, {v}>"
    for name, e in ELEM_CTYPES.items()
    for width, v in ACCESS_CTYPES.items()
    if width >= ITEMSIZE[name]
)

#: Bytes of one LL line (8 data bytes and the epoch twice); the header lines start at HDR_OFF.
LINE_BYTES = 16
HDR_OFF = 256
#: The first epoch of a cycle (0 and 1 are never used; docs/push.md, "Epochs").
FIRST_EPOCH = 2
#: Descriptor record sizes in int64 words.
HEADER_WORDS, SEND_WORDS, JOB_WORDS = 4, 5, 7
#: Ranks of one transport: one header-polling thread per peer of a 256-thread block.
MAX_RANKS = 256

_SOURCE_NAME = "push.cu"
_THREADS = 256  # == dpg_push::kThreads
_TILE_BYTES = _THREADS * 8 * LINE_BYTES  # one tile (256 threads x 8 lines): the grid sizing unit


class WindowLayout(NamedTuple):
    """Byte offsets inside one rank's window (identical on every rank; docs/push.md, "Window").

    Attributes:
        state_off: ``state[4]`` uint64: ``epoch, depart, err, 0`` (this rank only).
        hdr_off: ``hdr[2][T-1]`` header lines, stored by the peers.
        data_off: ``region[2][T-1]``, ``region_bytes`` each, stored by the peers.
        cap_bytes: data bytes one source may send one receiver per collective (multiple of 256).
        region_bytes: ``2 * cap_bytes`` (``cap_bytes / 8`` lines of 16 bytes).
        window_bytes: total bytes of the window.
    """

    state_off: int
    hdr_off: int
    data_off: int
    cap_bytes: int
    region_bytes: int
    window_bytes: int


def window_layout(nranks: int, capacity_bytes: int) -> WindowLayout:
    """The window of a push transport of ``nranks`` ranks with ``capacity_bytes`` per region."""
    nranks = int(nranks)
    if not 1 <= nranks <= MAX_RANKS:
        raise InputError(f"nranks: expected 1 <= nranks <= {MAX_RANKS}, got {nranks}")
    cap = round_capacity(capacity_bytes)
    peers = nranks - 1
    data_off = -(-(HDR_OFF + 2 * peers * LINE_BYTES) // 256) * 256
    region = 2 * cap
    return WindowLayout(0, HDR_OFF, data_off, cap, region, data_off + 2 * peers * region)


def initial_state(epoch0: int = 1) -> np.ndarray:
    """The ``state`` words a zeroed window starts with (uint64 [4]): ``epoch = epoch0``.

    ``epoch0`` is the epoch of "the last completed collective", ``1 <= epoch0 < 2**32``; the
    first collective runs at the next epoch (2 by default).
    """
    if isinstance(epoch0, bool) or not isinstance(epoch0, (int, np.integer)) or not 1 <= epoch0 < 2**32:
        raise InputError(f"epoch0: expected an int in [1, 2**32), got {epoch0!r}")
    return np.array([int(epoch0), 0, 0, 0], np.uint64)


def lines_per_row(row_bytes: int) -> int:
    """LL lines one row of ``row_bytes`` bytes occupies (8 data bytes each)."""
    return -(-int(row_bytes) // 8)


def capacity_rows(row_bytes: int, cap_bytes: int) -> int:
    """Rows of ``row_bytes`` bytes one region holds: ``(cap_bytes / 8) / lines_per_row``."""
    return int(cap_bytes) // 8 // lines_per_row(row_bytes)


def desc_words(n_send: int, n_jobs: int) -> int:
    """int64 entries of a descriptor with ``n_send`` send records and ``n_jobs`` jobs."""
    return HEADER_WORDS + SEND_WORDS * int(n_send) + JOB_WORDS * int(n_jobs)


def make_desc(sig: int, sends=(), jobs=(), self_row: int = 0, out=None, off: int = 0) -> np.ndarray:
    """Encode one push collective's descriptor (docs/push.md, "Descriptor").

    Args:
        sig: operation signature (low 32 bits are used; :func:`dpgather.kernels._p2p.signature`).
        sends: ``(in_row, rows, slot_row, dest_first, dest_count)`` 5-tuples.
        jobs: ``(dst_row, cnt, span, src_row, first, count, stride)`` 7-tuples.
        self_row: the input row of slot row 0 of "the region from me" (self-delivery).
        out: optional int64 array to write into at ``out[off:]``; allocated when ``None``.
        off: first entry in ``out``.

    Returns:
        ``out`` (or a new 1-D int64 array of :func:`desc_words` entries).
    """
    sends = np.asarray(sends, dtype=np.int64).reshape(-1, SEND_WORDS)
    jobs = np.asarray(jobs, dtype=np.int64).reshape(-1, JOB_WORDS)
    head = np.array([int(sig) & 0xFFFFFFFF, len(sends), len(jobs), int(self_row)], np.int64)
    words = np.concatenate([head, sends.ravel(), jobs.ravel()])
    if out is None:
        out = np.zeros(off + words.size, np.int64)
    elif out.dtype != np.int64 or out.ndim != 1 or out.shape[0] < off + words.size:
        raise InputError(f"out: expected a 1-D int64 array of at least {off + words.size} entries, got "
                         f"{out.dtype} {out.shape}")
    out[off:off + words.size] = words
    return out


# ---------------------------------------------------------------------------- CUDA side

PUSH = CudaSource(_SOURCE_NAME, NAME_EXPRESSIONS, _p2p.compile_options)
kernel_source = PUSH.text
#: Compile and load every ``p2p_push`` specialisation on a device (default: current). Call
#: before capturing a CUDA graph, so that no compilation happens inside a capture.
warm = PUSH.warm


def pick_vector(row_bytes: int, itemsize: int, *pointers: int) -> int:
    """Access width of ``inp``/``out``: the pull's choice (:func:`dpgather.kernels._p2p.pick_vector`),
    at most 8 bytes (one line's data). Raises ``InputError`` below ``itemsize``."""
    return min(_p2p.pick_vector(row_bytes, itemsize, *pointers), 8)


def grid_size(in_rows: int, out_rows: int, row_bytes: int, cap_bytes: int, nranks: int, limit: int) -> int:
    """Blocks of one launch, from capacities only (graph-safe), at most ``limit``.

    One block per tile (256 threads x 8 lines of 16 bytes) of the larger of what a launch may
    write into ``out`` and what it may store into the ``nranks - 1`` peers' windows; at least
    1, never more than ``limit`` (:func:`max_blocks`: every block resident).
    """
    lpr = lines_per_row(row_bytes)
    sent = min(int(in_rows), capacity_rows(row_bytes, cap_bytes)) * (int(nranks) - 1)
    lines = max(int(out_rows), sent) * lpr
    return max(1, min(-(-lines * LINE_BYTES // _TILE_BYTES), int(limit)))


def kernel_name(dtype: str, vec: int) -> str:
    """The name expression for logical ``dtype`` and ``vec``-byte accesses."""
    return f"p2p_push<{ELEM_CTYPES[dtype]}, {ACCESS_CTYPES[vec]}>"


def launch(*, dtype, vec, grid, device_id, stream=None, **params) -> None:
    """Enqueue one ``p2p_push<E, V>`` on ``stream`` (arguments already validated).

    Args:
        dtype: logical dtype (picks ``E``). vec: access bytes (picks ``V``; :func:`pick_vector`).
        grid: blocks (:func:`grid_size`). device_id: device of every pointer.
        stream: ``cupy.cuda.Stream`` (``None``: the current stream).
        **params: every parameter of :data:`KERNEL_PARAMS` by name, as for the pull's
            :func:`dpgather.kernels._p2p.launch`; ``data_off`` and ``cap_bytes`` from
            :func:`window_layout`.
    """
    kernel = PUSH.function(device_id, kernel_name(dtype, vec))
    kernel((int(grid),), (_THREADS,), kernel_args(**params), stream=stream)
