"""dpgather.dist: communicators (one protocol, two backends).

- :class:`MpiHostCommunicator` (:mod:`.host`): mpi4py on NumPy row buffers; ``host_available()``.
- ``NcclCommunicator`` (:mod:`.nccl`): NCCL through CuPy on CuPy row buffers; ``nccl_available``.
  Loaded lazily on first attribute access, so importing ``dpgather.dist`` never imports CuPy or
  mpi4py and never fails on a CPU machine.

The protocol is :class:`Communicator` (:mod:`.base`); docs/internals.md states it.
"""

from .base import Communicator
from .host import MpiHostCommunicator, host_available

__all__ = ["Communicator", "MpiHostCommunicator", "host_available", "NcclCommunicator", "nccl_available"]

_LAZY = ("NcclCommunicator", "nccl_available")


def _nccl_unavailable():
    """Fallback ``nccl_available`` when the NCCL module cannot be imported at all: False."""
    return False


def __getattr__(name):
    if name in _LAZY:
        try:
            from . import nccl
        except ImportError as e:
            if name == "nccl_available":
                return _nccl_unavailable
            from dpgather.core.errors import BackendUnavailable

            raise BackendUnavailable(
                f"dpgather.dist.NcclCommunicator cannot be loaded ({e}); the CUDA backend needs "
                'CuPy with NCCL: `pip install "cupy-cuda12x>=13"` (or `pip install dpgather[cuda]`)'
            ) from e
        return getattr(nccl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
