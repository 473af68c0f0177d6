"""Bringing up what moves a ``DpAttention``'s rows: communicators, the P2P transport, the cost model.

:func:`bring_up` runs once per construction, after the configuration agreement, and gives every
rank the same outcome (every decision below is made from exchanged facts or agreed values):

- the ``tp`` communicator over all ranks and, for ``attn_tp_size > 1``, the ``attn``
  sub-communicator of the own replica (the backend makes them: NCCL or MPI);
- the P2P transport where it can run (docs/p2p.md): the nodes (host identity, or
  ``DPGATHER_P2P_NODES`` pretend nodes), the probe of every pair of devices, the windows, and
  over several nodes the ``inter`` communicator of the ranks at the same place of every node.
  The backend builds its own transport (``backend.p2p_probe`` / ``backend.p2p``); a failure on
  any node turns P2P off on every rank, with the reason;
- the cost model: the one given, else the calibration ``dpgather calibrate`` cached for this
  machine (rank 0 reads it and sends it to every rank), else the built-in constants.
"""

import os
from typing import Any, NamedTuple, Optional

from dpgather.core import BackendUnavailable, ConfigError, CostModel, p2p_window_rows

from ._log import get_logger

__all__ = ["Links", "bring_up"]

log = get_logger("facade")

class Links(NamedTuple):
    """What :func:`bring_up` made. ``tp``/``attn``/``inter``: communicators (``attn`` None when
    ``A = 1``, ``inter`` None unless P2P runs over several nodes); ``pull``: the P2P transport or
    None; ``node_size``: ranks of one P2P group; ``p2p_rows``: rows its windows hold per
    collective (0 without P2P); ``reason``: why P2P is off (None when on); ``cost`` and
    ``cost_source``: the planner's cost model (before ``row_bytes``) and where it came from."""

    tp: Any
    attn: Any
    inter: Any
    pull: Any
    node_size: int
    p2p_rows: int
    reason: Optional[str]
    cost: CostModel
    cost_source: str

    def communicators(self):
        """The communicators, sub-communicators first (the order of abort and close)."""
        return tuple(c for c in (self.inter, self.attn, self.tp) if c is not None)


def bring_up(private, sync, backend, config, topology, rank, row_bytes) -> Links:
    """Make the communicators, the P2P transport and the cost model (module docstring).

    Collective over ``private`` (dpgather's duplicate of the caller's communicator); ``sync`` is
    the per-step exchange, used for the few object exchanges. On failure everything made here is
    closed before the error propagates (the same error on every rank).
    """
    made = []
    try:
        tp = backend.communicator(private, config.timeout_s)
        made.append(tp)
        attn = None
        A = topology.attn_tp_size
        if A > 1:
            attn = tp.split(rank // A, rank % A)
            made.append(attn)
        pull, inter, node_size, cap, reason = _p2p(private, sync, backend, config, topology, rank, row_bytes, tp)
        made.extend(c for c in (pull, inter) if c is not None)
        cost, source = (config.cost, "given (cost=...)") if config.cost is not None else _cached_cost(
            sync, backend, topology.world_size, rank)
        log.info("cost model: %s", source)
        return Links(tp, attn, inter, pull, node_size, cap, reason, cost, source)
    except BaseException:
        for obj in reversed(made):
            try:
                obj.close()
            except Exception:
                pass
        raise


def _p2p(private, sync, backend, config, topology, rank, row_bytes, tp):
    """``(transport, inter, node_size, rows, reason)``: the P2P transport where it can run."""
    T, A = topology.world_size, topology.attn_tp_size
    if config.transport == "nccl":
        return None, None, T, 0, "transport='nccl' was asked for"
    if T == 1:
        return None, None, T, 0, "one rank: nothing to move"
    from dpgather.dist.nodes import host_id, node_size

    facts = sync.allgather_obj((host_id(), os.environ.get("DPGATHER_P2P_NODES", "")),
                               "DpAttention construction (nodes)")
    L, reason = node_size([h for h, _ in facts], facts[0][1], A)
    pull = None
    if L > 0:
        node_comm = private.Split(rank // L, rank % L) if L < T else private
        try:
            pull, reason = _windows(node_comm, sync, backend, config, _window_rows(topology, config) * row_bytes,
                                several=L < T)
        finally:
            if node_comm is not private:
                node_comm.Free()
    if pull is not None:
        inter = tp.split(rank % L, rank // L) if L < T else None
        return pull, inter, L, _window_rows(topology, config), None
    reason = f"P2P is not available: {reason}"
    if config.transport == "p2p":
        raise ConfigError(f"transport='p2p' but {reason}; use transport='auto' or 'nccl'")
    log.info("%s; the step's collectives go over %s", reason, backend.collectives.upper())
    return None, None, T, 0, reason


def _window_rows(topology, config):
    return p2p_window_rows(topology, config.graph_buckets, config.max_tokens_per_rank)


def _windows(node_comm, sync, backend, config, nbytes, several):
    """The probe and the windows over one node (``several``: verdicts shared by every node).
    Returns ``(transport or None, reason)``, the same on every rank."""
    ok, reason = backend.p2p_probe(node_comm, config.timeout_s)
    if several:
        ok, reason = _node_verdict(sync, ok, reason, "P2P probe verdicts")
    if not ok:
        return None, reason
    pull = None
    try:
        pull = backend.p2p(node_comm, nbytes, config.timeout_s)
    except (ConfigError, BackendUnavailable) as e:  # the same verdict on every rank of the node
        ok, reason = False, str(e)
    if several:
        ok, reason = _node_verdict(sync, ok, reason, "P2P windows")
    if not ok and pull is not None:  # another node failed: every rank goes without P2P
        pull.close()
        pull = None
    return pull, reason


def _node_verdict(sync, ok, reason, what):
    """Each node decided ``(ok, reason)`` over its own ranks (whose messages number ranks within
    the node); one object exchange gives every rank the first failure, named by the global rank
    that saw it, or ``(True, "")``."""
    for r, (ok_r, reason_r) in enumerate(sync.allgather_obj((ok, reason), f"DpAttention construction ({what})")):
        if not ok_r:
            return False, f"on the node of rank {r}: {reason_r}"
    return True, ""


def _cached_cost(sync, backend, T, rank):
    """The cost model ``dpgather calibrate`` cached for this machine (a GPU backend, T > 1), else the
    defaults; returns ``(model, source)``. Rank 0 reads its cache file and sends the constants
    to every rank (one object exchange), so all ranks plan alike. ``DPGATHER_NO_COST_CACHE=1``
    on rank 0 keeps the defaults."""
    if backend.device_name() is None or T == 1:
        return CostModel(), "defaults"
    payload = _read_cache(backend, T) if rank == 0 else None
    data, source = sync.allgather_obj(payload, "DpAttention construction (cost model)")[0]
    return (CostModel() if data is None else CostModel.from_dict(data)), source


def _read_cache(backend, T):
    """Rank 0's ``(constants or None, source)`` from the calibration cache of this machine."""
    if os.environ.get("DPGATHER_NO_COST_CACHE", "") not in ("", "0"):
        return None, "defaults (DPGATHER_NO_COST_CACHE is set)"
    try:
        from dpgather.core.cost import cache_path

        path = cache_path(backend.device_name(), T, backend.nccl_version())
        if not os.path.isfile(path):
            return None, f"defaults (no calibration cached at {path}; run `dpgather calibrate`)"
        return CostModel.load(path).to_dict(), f"calibrated ({path})"
    except Exception as e:  # noqa: BLE001 - an unreadable cache never stops construction
        return None, f"defaults (the cached calibration could not be read: {e})"
