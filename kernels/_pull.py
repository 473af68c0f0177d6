"""The pull kernel of the P2P transport: loader of ``kernels/pull.cu``, window layout, launch rules.

docs/p2p.md is the specification. This module holds everything about one ``p2p_pull``
collective that needs no communicator:

- the window layout (:func:`window_layout`, :func:`initial_header`);
- how the kernel reads a descriptor (:func:`read_desc`, the host twin's reading of it);
- the CUDA side: :data:`NAME_EXPRESSIONS`, :func:`warm`, :func:`grid_size`, :func:`kernel_name`,
  used by :class:`dpgather.dist.pull.CudaPull`.

What the pull and the push kernels share (error codes, parameters and their packing, access
width, grid cap, compile options, ``timeout_ns``) is :mod:`._p2p`.

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

from typing import NamedTuple

import numpy as np

from ._cuda import CudaSource
from ._p2p import ALIGN, THREADS, compile_options, specialisation, specialisations, window_sizes
from ._p2p import read_desc as _read_desc

__all__ = [
    "NAME_EXPRESSIONS",
    "PACK_WORDS",
    "PULL",
    "WindowLayout",
    "grid_size",
    "initial_header",
    "kernel_name",
    "kernel_source",
    "read_desc",
    "warm",
    "window_layout",
]

#: Every specialisation compiled into the module: each element type (the dtype table's C
#: type) with each vector at least as wide as the element (tests/test_cuda_compile.py checks).
NAME_EXPRESSIONS = specialisations("p2p_pull", (16, 8, 4, 2, 1))

#: Descriptor words of one pack record (the header and jobs: :mod:`._p2p`).
PACK_WORDS = 3

_BYTES_PER_BLOCK = THREADS * 16 * 4  # one 16-byte reduce tile: the grid sizing unit

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

def window_layout(nranks: int, capacity_bytes: int) -> WindowLayout:
    """The window of a transport of ``nranks`` ranks with ``capacity_bytes`` per ``src``."""
    nranks, cap = window_sizes(nranks, capacity_bytes)
    state_off = 2 * nranks * 8
    data_off = -(-(state_off + 32) // ALIGN) * ALIGN
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

def read_desc(desc, desc_off: int = 0):
    """``(sig, packs, jobs)`` of the descriptor at ``desc[desc_off:]``, as the kernel reads it
    (:func:`dpgather.kernels._p2p.read_desc` with pack records)."""
    sig, packs, jobs, _ = _read_desc(desc, desc_off, PACK_WORDS)
    return sig, packs, jobs

# ---------------------------------------------------------------------------- CUDA side

PULL = CudaSource("pull.cu", NAME_EXPRESSIONS, compile_options)
kernel_source = PULL.text
#: Compile and load every ``p2p_pull`` specialisation on a device (default: current). Call
#: before capturing a CUDA graph (``CudaPull`` does it in its constructor), so that no
#: compilation or module load happens inside a capture.
warm = PULL.warm

def grid_size(in_rows: int, out_rows: int, row_bytes: int, cap_bytes: int, limit: int) -> int:
    """Blocks of one launch, from capacities only (graph-safe), at most ``limit``.

    One block per 16 KiB (one 16-byte reduce tile: 256 threads x 4 vectors) of the
    larger of what a launch may write: ``out_rows`` rows pulled, or the input rows that fit
    in ``src``. At least 1; never more than ``limit`` (the SM count: co-residency).
    """
    work = max(int(out_rows) * int(row_bytes), min(int(in_rows) * int(row_bytes), int(cap_bytes)))
    return max(1, min(-(-work // _BYTES_PER_BLOCK), int(limit)))

def kernel_name(dtype: str, vec: int) -> str:
    """The name expression of the specialisation for logical ``dtype`` and ``vec``-byte vectors."""
    return specialisation("p2p_pull", dtype, vec)
