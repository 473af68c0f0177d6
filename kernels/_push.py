"""The push transport's kernel: loader of ``kernels/push.cu``, its window layout and launch rules.

docs/push.md is the specification. This module holds everything about one ``p2p_push``
collective that does not need a communicator: the window layout (:func:`window_layout`,
:func:`initial_state`), the row capacity of a region (:func:`capacity_rows`), how the kernel
reads a descriptor (:func:`read_desc`, the host twin's reading of it), and the CUDA side
(:data:`NAME_EXPRESSIONS`, :func:`warm`, :func:`pick_vector`, :func:`grid_size`,
:func:`kernel_name`), used by :class:`dpgather.dist.push.CudaPush`. What the pull and the push
kernels share (error codes, the parameters and their packing, the grid cap, compile options,
``timeout_ns``, the capacity rounding) is :mod:`._p2p`.

Descriptor (int64; every entry in rows)::

    desc[off:]  = [sig, n_send, n_jobs, self_row]
                + n_send x (in_row, rows, slot_row, dest_first, dest_count)
                + n_jobs x (dst_row, cnt, span, src_row, first, count, stride)

The data plane's descriptors are written by :class:`dpgather._layout.Descriptor`; the tests
build theirs with their own encoder (``tests/push_reference.py``).

Importing this module never imports CuPy; the CUDA functions raise
:class:`~dpgather.core.errors.BackendUnavailable` without CuPy or a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpgather.core.errors import InputError

from . import _p2p
from ._cuda import CudaSource
from ._p2p import ALIGN, THREADS, compile_options, specialisation, specialisations, window_sizes

__all__ = [
    "FIRST_EPOCH",
    "HDR_OFF",
    "LINE_BYTES",
    "NAME_EXPRESSIONS",
    "PHASES",
    "PUSH",
    "SEND_WORDS",
    "TIMES_OFF",
    "WIDTHS",
    "WindowLayout",
    "capacity_rows",
    "grid_size",
    "initial_state",
    "kernel_name",
    "kernel_source",
    "lines_per_row",
    "pick_vector",
    "read_desc",
    "warm",
    "window_layout",
]

#: Access widths of ``V`` in ``p2p_push<E, V>`` in bytes: at most the 8 data bytes of a line.
WIDTHS = (8, 4, 2, 1)
#: Every specialisation compiled into the module: each element type with each access at least
#: as wide as the element (tests/test_cuda_compile.py compiles the same list).
NAME_EXPRESSIONS = specialisations("p2p_push", WIDTHS)

#: Bytes of one LL line (8 data bytes and the epoch twice); the header lines start at HDR_OFF.
LINE_BYTES = 16
HDR_OFF = 256
#: The first epoch of a cycle (0 and 1 are never used; docs/push.md, "Epochs").
FIRST_EPOCH = 2
#: Descriptor words of one send record (the header and jobs: :mod:`._p2p`).
SEND_WORDS = 5
#: A build with ``DPGATHER_P2P_DEFINES=DPG_P2P_PUSH_PHASE_TIMES=1`` stores ``%globaltimer`` stamps
#: (ns) of block 0's phases as uint64 words at byte ``TIMES_OFF`` of each rank's window, in this
#: order (the last one by the launch's last block): entry, out of ``griddepcontrol.wait``, every
#: send of the block issued, the first header seen, rows received, departed, epoch published.
TIMES_OFF = 64
PHASES = ("entry", "wait", "sent", "header", "received", "departed", "published")

_TILE_BYTES = THREADS * 8 * LINE_BYTES  # one tile (256 threads x 8 lines): the grid sizing unit


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
    nranks, cap = window_sizes(nranks, capacity_bytes)
    peers = nranks - 1
    data_off = -(-(HDR_OFF + 2 * peers * LINE_BYTES) // ALIGN) * ALIGN
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


def read_desc(desc, desc_off: int = 0):
    """``(sig, sends, jobs, self_row)`` of the descriptor at ``desc[desc_off:]``, as the kernel
    reads it (:func:`dpgather.kernels._p2p.read_desc` with send records)."""
    return _p2p.read_desc(desc, desc_off, SEND_WORDS)


# ---------------------------------------------------------------------------- CUDA side

PUSH = CudaSource("push.cu", NAME_EXPRESSIONS, compile_options)
kernel_source = PUSH.text
#: Compile and load every ``p2p_push`` specialisation on a device (default: current). Call
#: before capturing a CUDA graph, so that no compilation happens inside a capture.
warm = PUSH.warm


def pick_vector(row_bytes: int, itemsize: int, *pointers: int) -> int:
    """Access width of ``inp``/``out``: the widest dividing ``row_bytes`` and the pointers, at
    most 8 bytes (one line's data). Raises ``InputError`` below ``itemsize``."""
    return _p2p.pick_vector(row_bytes, itemsize, *pointers, widest=8)


def grid_size(in_rows: int, out_rows: int, row_bytes: int, cap_bytes: int, nranks: int, limit: int) -> int:
    """Blocks of one launch, from capacities only (graph-safe), at most ``limit``.

    One block per tile (256 threads x 8 lines of 16 bytes) of the larger of what a launch may
    write into ``out`` and what it may store into the ``nranks - 1`` peers' windows; at least
    1, never more than ``limit`` (:func:`dpgather.kernels._p2p.max_blocks`: every block resident).
    """
    lpr = lines_per_row(row_bytes)
    sent = min(int(in_rows), capacity_rows(row_bytes, cap_bytes)) * (int(nranks) - 1)
    lines = max(int(out_rows), sent) * lpr
    return max(1, min(-(-lines * LINE_BYTES // _TILE_BYTES), int(limit)))


def kernel_name(dtype: str, vec: int) -> str:
    """The name expression for logical ``dtype`` and ``vec``-byte accesses."""
    return specialisation("p2p_push", dtype, vec)
