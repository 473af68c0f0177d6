"""dpgather.kernels: row copy kernels with one semantics on two backends, and the pull kernel.

- host (NumPy arrays): Numba twins in :mod:`._host` — ``copy_rows``, ``mask_rows``, and their
  pure-NumPy references ``copy_rows_ref``, ``mask_rows_ref``; ``numba_available()``.
- CUDA (CuPy arrays): ``kernels/copy.cu`` through :mod:`._cuda` (``kernels.cuda``), which also
  holds ``load_cupy``, the one CuPy loader.
- the P2P transport's pull kernel: ``kernels/pull.cu`` through :mod:`._pull` (``kernels.pull``:
  loader, window layout, launch rules).

Modules above ``kernels/`` reach them as ``dpgather.kernels.host``, ``.cuda`` and ``.pull``.
Everything loads on first attribute access: importing ``dpgather.kernels`` needs neither Numba
nor CuPy. A missing backend raises ``BackendUnavailable`` when a kernel is called.
docs/internals.md states the semantics.
"""

import importlib

__all__ = ["host", "cuda", "pull", "copy_rows", "mask_rows", "copy_rows_ref", "mask_rows_ref", "numba_available"]

_MODULES = {"host": "._host", "cuda": "._cuda", "pull": "._pull"}
_HOST_NAMES = ("copy_rows", "mask_rows", "copy_rows_ref", "mask_rows_ref", "numba_available")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(_MODULES[name], __name__)
    if name in _HOST_NAMES:
        return getattr(importlib.import_module("._host", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(__all__))
