"""dpgather.dist: communicators (one protocol, two backends), the per-step sync, the P2P transport.

- :class:`Communicator` (:mod:`.base`): the protocol; checked methods plus trusted ``ops``.
- :class:`MpiHostCommunicator` (:mod:`.host`): mpi4py on NumPy row buffers; ``host_available()``.
- ``NcclCommunicator`` (:mod:`.nccl`): NCCL through CuPy on CuPy row buffers; ``nccl_available``.
- :class:`StepSync` (:mod:`.sync`): the per-step record exchange (shared memory on one node).
- the P2P transport (``transport="p2p"``, the pull protocol): ``CudaPull`` / ``HostPull``
  (:mod:`.pull`) over per-rank shared windows (:mod:`.windows`), built with bounded exchanges
  (:mod:`.bootstrap`); node topology and the probe in :mod:`.nodes`. The backends build them.

Importing ``dpgather.dist`` imports neither CuPy nor mpi4py and never fails on a CPU machine;
the NCCL module loads on first attribute access.
"""

from .base import Communicator, Ops
from .host import MpiHostCommunicator, host_available
from .sync import StepSync

__all__ = ["Communicator", "Ops", "MpiHostCommunicator", "host_available", "StepSync", "NcclCommunicator",
           "nccl_available"]

_LAZY = ("NcclCommunicator", "nccl_available")


def __getattr__(name):
    if name in _LAZY:
        from . import nccl

        return getattr(nccl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
