"""dpgather.kernels: row copy kernels with one semantics on two backends, and the P2P kernels.

- host (NumPy arrays): Numba twins in :mod:`._host` — ``copy_rows``, ``mask_rows``, and their
  pure-NumPy references ``copy_rows_ref``, ``mask_rows_ref``; ``numba_available()``.
- CUDA (CuPy arrays): ``kernels/copy.cu`` through :mod:`._cuda` (``kernels.cuda``), which also
  holds ``load_cupy``, the one CuPy loader.
- the P2P transports' kernels: ``kernels/pull.cu`` through :mod:`._pull` (``kernels.pull``) and
  ``kernels/push.cu`` through :mod:`._push` (``kernels.push``): loader, window layout, launch
  rules each; what both share in :mod:`._p2p` (``kernels.p2p``); the programmatic dependent
  launch of the push kernel in :mod:`._launch`.

Modules above ``kernels/`` reach them as ``dpgather.kernels.host``, ``.cuda``, ``.pull``, ``.push``
and ``.p2p``.
Everything loads on first attribute access: importing ``dpgather.kernels`` needs neither Numba
nor CuPy. A missing backend raises ``BackendUnavailable`` when a kernel is called.
docs/internals.md states the semantics.
"""

import importlib

__all__ = ["host", "cuda", "pull", "push", "p2p", "copy_rows", "mask_rows", "copy_rows_ref", "mask_rows_ref", "numba_available"]

_MODULES = {"host": "._host", "cuda": "._cuda", "pull": "._pull", "push": "._push", "p2p": "._p2p"}
_HOST_NAMES = ("copy_rows", "mask_rows", "copy_rows_ref", "mask_rows_ref", "numba_available")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(_MODULES[name], __name__)
    if name in _HOST_NAMES:
        return getattr(importlib.import_module("._host", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(__all__))
