"""kernels/push.cu executed on the CPU (push_emu.h + push_api.cpp), driven from Python.

:func:`build` compiles the kernel with g++ into a shared library (on top of tests/p2p_emu's
fiber scheduler); :class:`Cluster` holds ``T`` ranks' windows in ordinary memory (the layout
of :func:`dpgather.kernels._push.window_layout`, zeroed, ``state.epoch = epoch0``, as the
transport initialises them) and runs collectives with :meth:`Cluster.push`: every launched
rank's blocks run concurrently as OS threads of 256 fibers. The kernel's arguments, vector
width and grid rule are the ones :mod:`dpgather.kernels._push` uses on the GPU.
"""

from __future__ import annotations

import ctypes
import pathlib

import numpy as np

from dpgather.core.dtypes import DTYPES
from dpgather.kernels import _p2p, _push
from p2p_emu import Ranks, compile_library

HERE = pathlib.Path(__file__).resolve().parent

_P = ctypes.c_void_p


def build(out_dir, defines=()) -> ctypes.CDLL:
    """Compile push_api.cpp (which includes kernels/push.cu) and load it; needs g++.

    ``defines``: extra ``NAME=VALUE`` macros, e.g. ``DPG_P2P_PUSH_ACTIVE_BYTES=1`` (every block
    of the grid active, so the multi-block paths run on small cases)."""
    so = compile_library(HERE / "push_api.cpp", "libpushemu.so", out_dir, defines)
    so.push_count.restype = ctypes.c_int
    so.push_name.restype = ctypes.c_char_p
    so.push_name.argtypes = [ctypes.c_int]
    so.push_arity.restype = ctypes.c_int
    so.push_set_chaos.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
    so.push_stats.argtypes = [_P]
    so.push_launch_packed.restype = ctypes.c_int
    so.push_launch_packed.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, _P, _P, _P]
    if so.push_arity() != len(_p2p.KERNEL_PARAMS):
        raise RuntimeError(f"the kernel takes {so.push_arity()} parameters, KERNEL_PARAMS lists "
                           f"{len(_p2p.KERNEL_PARAMS)}")
    return so


def stats(so):
    """``(torn loads seen, stores deferred)`` so far in this library."""
    out = np.zeros(2, np.int64)
    so.push_stats(out.ctypes.data)
    return int(out[0]), int(out[1])


class Cluster(Ranks):
    """``T`` emulated ranks sharing one process (one launch runs every rank's kernel).

    Args:
        so: the library from :func:`build`. nranks: ``T``. capacity_bytes: the transport's
        capacity (rounded up to 256). timeout_s: the kernel's poll bound (``<= 0``: forever).
        epoch0: ``state.epoch`` of every window. grid: default blocks per rank (``None``: the
        loader's :func:`~dpgather.kernels._push.grid_size` with a limit of 4). boxed: pack the
        arguments as CuPy does (default: as the programmatic dependent launch does).
    """

    def __init__(self, so, nranks, capacity_bytes, timeout_s=30.0, epoch0=1, grid=None, boxed=False):
        self.so = so
        self.layout = _push.window_layout(nranks, capacity_bytes)
        super().__init__(nranks, self.layout.window_bytes, _push.initial_state(epoch0), timeout_s, boxed)
        self.grid = grid

    def state(self, r):
        """``(epoch, depart, err)`` of rank ``r``'s window."""
        return tuple(int(v) for v in self.windows[r][:24].view(np.uint64))

    def region(self, r, set_, peer_slot):
        """Rank ``r``'s ``region[set_][peer_slot]`` as a ``[lines, 2]`` uint64 view."""
        lay = self.layout
        at = lay.data_off + (set_ * (self.t - 1) + peer_slot) * lay.region_bytes
        return self.windows[r][at:at + lay.region_bytes].view(np.uint64).reshape(-1, 2)

    def headers(self, r, set_):
        """Rank ``r``'s ``hdr[set_]`` as a ``[T-1, 2]`` uint64 view."""
        at = self.layout.hdr_off + set_ * (self.t - 1) * _push.LINE_BYTES
        return self.windows[r][at:at + (self.t - 1) * _push.LINE_BYTES].view(np.uint64).reshape(-1, 2)

    def push(self, inputs, outputs, descs, desc_off, row_bytes, dtype, launch=None, grid=None, delay_us=None):
        """Run one collective; ``inputs``/``outputs``/``descs`` are per-rank NumPy arrays
        (outputs written in place); ``launch``: ranks that enter it (default all); ``delay_us``:
        per-rank start delays. Returns the host error words."""
        t = self.t
        launch = [1] * t if launch is None else [int(bool(x)) for x in launch]
        delays = np.asarray([0] * t if delay_us is None else delay_us, np.int64)
        vec = _push.pick_vector(row_bytes, DTYPES[dtype].itemsize,
                                *[a.ctypes.data for a in list(inputs) + list(outputs)])
        name = _push.kernel_name(dtype, vec)
        grid = grid if grid is not None else self.grid
        if grid is None:
            grid = max(_push.grid_size(inputs[r].shape[0], outputs[r].shape[0], row_bytes,
                                       self.layout.cap_bytes, t, 4) for r in range(t))
        params, keep = self.packed(inputs, outputs, descs, desc_off, row_bytes, self.layout.data_off,
                                   self.layout.cap_bytes)
        flags = np.asarray(launch, np.int32)
        rc = self.so.push_launch_packed(name.encode(), t, int(grid), flags.ctypes.data, delays.ctypes.data,
                                        params)
        del keep  # alive (in this frame) until the launch returned
        if rc != 0:
            raise RuntimeError(f"push_launch_packed({name}) returned {rc}")
        return [int(e[0]) for e in self.errors]
