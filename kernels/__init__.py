"""dpgather.kernels: row copy kernels with one semantics on two backends.

- host (NumPy arrays): Numba twins in :mod:`._host` — ``copy_rows``, ``mask_rows``, and their
  pure-NumPy references ``copy_rows_ref``, ``mask_rows_ref``; ``numba_available()``.
- CUDA (CuPy arrays): ``kernels/copy.cu`` through :mod:`._cuda`.

Everything loads on first attribute access: importing ``dpgather.kernels`` needs neither Numba
nor CuPy. A missing backend raises ``BackendUnavailable`` when a kernel is called.
docs/internals.md states the semantics.
"""

__all__ = ["host", "copy_rows", "mask_rows", "copy_rows_ref", "mask_rows_ref", "numba_available"]

_HOST_NAMES = ("copy_rows", "mask_rows", "copy_rows_ref", "mask_rows_ref", "numba_available")


def __getattr__(name):
    if name == "host":
        from . import _host

        return _host
    if name in _HOST_NAMES:
        from . import _host

        return getattr(_host, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(__all__))
