"""kernels/pull.cu executed on the CPU (emu.h + emu_api.cpp), driven from Python.

:func:`build` compiles the kernel source with g++ into a shared library; :class:`Cluster` holds
``T`` ranks' windows in ordinary memory (the layout of ``window_layout``, initialised like
``CudaPull``) and runs collectives with :meth:`Cluster.pull`: every launched rank's blocks run
concurrently as OS threads, 256 fibers each. The kernel's own arguments, vector width and grid
rules are the ones :mod:`dpgather.kernels._pull` uses on the GPU.

What the push emulator (``tests/push_emu``) shares with this one lives here once:
:func:`compile_library` (the g++ build), :class:`Ranks` (the windows, error words and the
packed launch of every rank: the arguments go through
:class:`dpgather.kernels._p2p.PackedParams`, the packer of the programmatic dependent launch,
or, with ``boxed=True``, one buffer per value as CuPy's ``RawKernel`` passes them).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess

import numpy as np

from dpgather.core.dtypes import DTYPES
from dpgather.kernels import _p2p, _pull

HERE = pathlib.Path(__file__).resolve().parent
KERNELS = HERE.parent.parent / "kernels"

_P = ctypes.c_void_p
_LL = ctypes.c_longlong


def compile_library(source, lib_name, out_dir, defines=()) -> ctypes.CDLL:
    """Compile ``source`` (a .cpp that includes a kernel of ``kernels/``) with g++ and
    ``-DDPG_P2P_EMULATION`` plus ``defines`` (``NAME=VALUE``) into ``out_dir/lib_name``; load it."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) on PATH")
    lib = pathlib.Path(out_dir) / lib_name
    cmd = [cxx, "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unused-function",
           "-Wno-unknown-pragmas", "-DDPG_P2P_EMULATION", *(f"-D{d}" for d in defines), f"-I{KERNELS}",
           str(source), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{res.stderr}")
    so = ctypes.CDLL(str(lib))
    so.emu_set_stagger.argtypes = [ctypes.c_longlong]
    so.build_log = res.stderr
    return so


def build(out_dir, active_bytes=None, defines=()) -> ctypes.CDLL:
    """Compile emu_api.cpp (which includes kernels/pull.cu) and load it; needs g++.

    ``active_bytes`` overrides the kernel's bytes of work per active block (a small value makes
    every block of the grid active, so the multi-block barrier runs on the small test cases;
    the default makes small cases take the one-block path). ``defines``: e.g.
    ``"DPG_P2P_RELAXED_POLL=1"``."""
    extra = tuple(defines) + ((f"DPG_P2P_ACTIVE_BYTES={int(active_bytes)}LL",) if active_bytes is not None else ())
    so = compile_library(HERE / "emu_api.cpp", "libp2pemu.so", out_dir, extra)
    so.emu_count.restype = ctypes.c_int
    so.emu_name.restype = ctypes.c_char_p
    so.emu_name.argtypes = [ctypes.c_int]
    so.emu_arity.restype = ctypes.c_int
    so.emu_launch_packed.restype = ctypes.c_int
    so.emu_launch_packed.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, _P, _P]
    if so.emu_arity() != len(_p2p.KERNEL_PARAMS):
        raise RuntimeError(f"the kernel takes {so.emu_arity()} parameters, KERNEL_PARAMS lists "
                           f"{len(_p2p.KERNEL_PARAMS)}")
    return so


def aligned(nbytes, align=256):
    """A zeroed uint8 buffer of ``nbytes`` whose address is a multiple of ``align``."""
    raw = np.zeros(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes]


def aligned_like(a, align=256, shift=0):
    """A copy of the 2-D array ``a`` at an address ``shift`` bytes past an ``align`` boundary."""
    buf = aligned(a.nbytes + shift, align)[shift:]
    out = buf.view(a.dtype).reshape(a.shape) if a.size else np.empty(a.shape, a.dtype)
    out[...] = a
    return out


class Ranks:
    """``T`` emulated ranks' windows (each ``window_bytes``, 256-byte aligned, its first bytes
    ``header``), host error words and the kernel's timeout; :meth:`packed` packs one launch.

    Args: nranks, window_bytes, header (uint8-viewable, written at offset 0 of every window),
    timeout_s (``<= 0``: forever), boxed (pack every value in its own buffer, as CuPy does,
    instead of :class:`~dpgather.kernels._p2p.PackedParams`).
    """

    def __init__(self, nranks, window_bytes, header, timeout_s, boxed=False):
        self.t = int(nranks)
        head = np.ascontiguousarray(header).view(np.uint8).reshape(-1)
        self.windows = []
        for _ in range(self.t):
            w = aligned(window_bytes)
            w[: head.size] = head
            self.windows.append(w)
        self.errors = [np.zeros(1, np.int32) for _ in range(self.t)]
        self.timeout_ns = _p2p.timeout_ns(timeout_s) if timeout_s > 0 else 0
        self.boxed = boxed

    def packed(self, inputs, outputs, descs, desc_off, row_bytes, data_off, cap_bytes):
        """``(params, keep)``: the ``void**[T]`` argument of a launch (every rank's parameters,
        packed by :func:`~dpgather.kernels._p2p.call_args` + ``window_args``, the functions the
        CUDA transports use) and the buffers that must stay alive until it returned."""
        t = self.t
        descs = [np.ascontiguousarray(d, np.int64) for d in descs]
        offs = desc_off if isinstance(desc_off, (list, tuple)) else [desc_off] * t
        table = (ctypes.c_void_p * t)(*[w.ctypes.data for w in self.windows])
        keep, addresses = [descs, table], []
        for r in range(t):
            args = _p2p.call_args(
                inputs[r].ctypes.data, inputs[r].shape[0], outputs[r].ctypes.data, outputs[r].shape[0],
                descs[r].ctypes.data, int(offs[r]), descs[r].shape[0], row_bytes,
            ) + _p2p.window_args(ctypes.addressof(table), r, t, data_off, cap_bytes, self.errors[r].ctypes.data,
                                 self.timeout_ns)
            if self.boxed:
                boxed = [np.array(a) for a in args]  # each value in its own buffer, as CuPy does
                ptrs = (ctypes.c_void_p * len(boxed))(*[b.ctypes.data for b in boxed])
                keep += [boxed, ptrs]
                addresses.append(ctypes.addressof(ptrs))
            else:
                pp = _p2p.PackedParams()
                keep.append(pp)
                addresses.append(pp.set(args))
        params = (ctypes.c_void_p * t)(*addresses)
        keep.append(params)
        return params, keep


class Cluster(Ranks):
    """``T`` emulated ranks sharing one process (one launch runs every rank's kernel)."""

    def __init__(self, so, nranks, capacity_bytes, timeout_s=30.0, epoch0=0, grid=None, boxed=True):
        self.so = so
        self.layout = _pull.window_layout(nranks, capacity_bytes)
        super().__init__(nranks, self.layout.window_bytes, _pull.initial_header(nranks, self.layout, epoch0),
                         timeout_s, boxed)
        self.grid = grid

    def state(self, r):
        """``(epoch, arrive, depart, err)`` of rank ``r``'s window."""
        lay = self.layout
        return tuple(int(v) for v in self.windows[r][lay.state_off : lay.state_off + 32].view(np.uint64))

    def pull(self, inputs, outputs, descs, desc_off, row_bytes, dtype, launch=None, grid=None):
        """Run one collective; ``inputs``/``outputs``/``descs`` are per-rank NumPy arrays
        (written in place); ``launch``: ranks that enter it (default all). Returns the host
        error words."""
        t = self.t
        launch = [1] * t if launch is None else [int(bool(x)) for x in launch]
        ptrs = [a.ctypes.data for a in list(inputs) + list(outputs)]
        vec = _p2p.pick_vector(row_bytes, DTYPES[dtype].itemsize, *ptrs)
        name = _pull.kernel_name(dtype, vec)
        if grid is None:
            grid = self.grid
        if grid is None:
            grid = max(_pull.grid_size(inputs[r].shape[0], outputs[r].shape[0], row_bytes,
                                      self.layout.cap_bytes, 4) for r in range(t))
        params, keep = self.packed(inputs, outputs, descs, desc_off, row_bytes, self.layout.data_off,
                                   self.layout.cap_bytes)
        rc = self.so.emu_launch_packed(name.encode(), t, int(grid), (ctypes.c_int * t)(*launch), params)
        del keep  # alive (in this frame) until the launch returned
        if rc != 0:
            raise RuntimeError(f"emu_launch_packed({name}) returned {rc}")
        return [int(e[0]) for e in self.errors]


def available():
    return shutil.which("g++") is not None and os.uname().machine in ("x86_64", "AMD64")
