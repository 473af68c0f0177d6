"""Transitional names for the facade of this branch (issue 22): delete at merge.

The facade still builds its P2P transport from these names; once it asks the backend
(``backend.p2p_probe``, ``backend.p2p``) and the data plane calls ``run``, this module goes.
Nothing else may import it: the transports are :mod:`dpgather.dist.pull`, node topology and
the probe :mod:`dpgather.dist.nodes`.
"""

from .nodes import host_id, node_size, probe
from .pull import ERR_OK, ERR_SIGNATURE, ERR_TIMEOUT, CudaPull, HostPull

__all__ = ["CudaP2P", "HostP2P", "probe_p2p", "node_size", "host_id", "ERR_OK", "ERR_TIMEOUT", "ERR_SIGNATURE"]


class CudaP2P(CudaPull):
    """:class:`~dpgather.dist.pull.CudaPull` under the facade's old name."""

    pull_trusted = CudaPull.run


class HostP2P(HostPull):
    """:class:`~dpgather.dist.pull.HostPull` under the facade's old name."""

    pull_trusted = HostPull.run


def probe_p2p(mpi_comm, device=None, timeout_s=60.0, *, backend="cuda"):
    """:func:`dpgather.dist.nodes.probe` with the facade's old argument order."""
    return probe(mpi_comm, timeout_s, backend=backend, device=device)
