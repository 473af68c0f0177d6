"""Programmatic dependent launch (PDL) of the push kernel through ``cuda-bindings``.

CuPy's ``RawKernel`` launches with ``cuLaunchKernel``, which takes no launch attributes. The
push kernel (docs/push.md, "Programmatic dependent launch") is written to start early: its
first instruction is ``griddepcontrol.wait``, so a launch with
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` may schedule its blocks while the
previous kernel of the stream still runs (its prologue and launch latency overlap the
predecessor, in a graph too) without changing what it computes. This module makes such a
launch with ``cuda.bindings.driver.cuLaunchKernelEx`` where that package imports and the device
is sm_90 or newer, and says why not otherwise; the caller then launches through CuPy as usual.

- :func:`pdl_reason` (``None``: PDL can be used on that device, else why not), :func:`driver`
  (the ``cuda.bindings.driver`` module or None), :func:`pdl_switch` (``DPGATHER_PUSH_PDL``).
- :class:`ExLaunch`: one kernel at one grid; ``launch(args, stream_ptr)`` packs ``args`` with
  :class:`dpgather.kernels._p2p.PackedParams` (the driver copies the values at the call, so one
  buffer serves every launch) and enqueues it. Capturable: inside a stream capture the launch
  becomes a kernel node with a programmatic dependency on its predecessor.

Importing this module imports neither CuPy nor ``cuda-bindings``.
"""

from __future__ import annotations

import functools
import os

from dpgather.core.errors import BackendUnavailable

from ._p2p import KERNEL_PARAMS, PackedParams

__all__ = ["ExLaunch", "driver", "pdl_reason", "pdl_switch", "PDL_VAR"]

#: ``0`` turns programmatic dependent launch off (every push launch goes through CuPy).
PDL_VAR = "DPGATHER_PUSH_PDL"


def pdl_switch() -> bool:
    """False when ``DPGATHER_PUSH_PDL`` is ``0`` (or ``off``/``false``/``no``), else True."""
    return os.environ.get(PDL_VAR, "1").strip().lower() not in ("0", "off", "false", "no")


@functools.cache
def driver():
    """``cuda.bindings.driver`` (cuda-bindings 12.x/13.x), or None when it does not import."""
    try:
        from cuda.bindings import driver as drv
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    return drv if hasattr(drv, "cuLaunchKernelEx") else None


def pdl_reason(compute_capability, enabled=True):
    """None when a programmatic dependent launch can be used, else why not (one line).

    Args:
        compute_capability: the device's ``(major, minor)``. enabled: the caller's switch.
    """
    if not enabled:
        return f"turned off ({PDL_VAR}=0 or pdl=False)"
    if tuple(compute_capability) < (9, 0):
        return f"the device is sm_{compute_capability[0]}{compute_capability[1]}; PDL needs sm_90 or newer"
    if driver() is None:
        return "cuda-bindings does not import (pip install cuda-bindings); CuPy's launch takes no attributes"
    return None


class ExLaunch:
    """``function`` (a CuPy ``RawKernel`` of one device, taking :data:`KERNEL_PARAMS`) launched
    on ``grid`` blocks of ``threads`` with ``cuLaunchKernelEx`` and the programmatic-serialization
    attribute. Construct and call with that device current."""

    def __init__(self, function, grid: int, threads: int):
        drv = driver()
        if drv is None:
            raise BackendUnavailable(pdl_reason((9, 0)))
        self._drv = drv
        handle = getattr(function, "kernel", function)  # RawKernel -> cupy.cuda.function.Function
        self._fn = drv.CUfunction(int(handle.ptr))
        self._params = PackedParams(KERNEL_PARAMS)
        attr = drv.CUlaunchAttribute()
        attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        self._attrs = [attr]
        self._grid, self._threads = int(grid), int(threads)
        self._configs = {}  # stream pointer -> its launch configuration

    def _config(self, stream_ptr):
        cfg = self._configs.get(stream_ptr)
        if cfg is None:
            drv = self._drv
            cfg = drv.CUlaunchConfig()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = self._grid, 1, 1
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self._threads, 1, 1
            cfg.sharedMemBytes = 0
            cfg.hStream = drv.CUstream(int(stream_ptr))
            cfg.attrs = self._attrs
            cfg.numAttrs = len(self._attrs)
            self._configs[stream_ptr] = cfg
        return cfg

    def launch(self, args, stream_ptr: int) -> None:
        """Enqueue one launch with ``args`` (:func:`~dpgather.kernels._p2p.call_args` +
        ``window_args``) on the stream ``stream_ptr`` (a ``cudaStream_t`` as int; 0: legacy).

        Raises:
            RuntimeError: the driver refused the launch (with its error name).
        """
        (err,) = self._drv.cuLaunchKernelEx(self._config(stream_ptr), self._fn, self._params.set(args), 0)
        if int(err) != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed: {err!r}")
