"""Bringing up what moves a ``DpAttention``'s rows: communicators, the P2P transports, the cost model.

:func:`bring_up` runs once per construction, after the configuration agreement, and gives every
rank the same outcome (every decision below is made from exchanged facts or agreed values):

- the ``tp`` communicator over all ranks and, for ``attn_tp_size > 1``, the ``attn``
  sub-communicator of the own replica (the backend makes them: NCCL or MPI);
- the P2P transports where they can run (docs/p2p.md, docs/push.md): the nodes (host identity,
  or ``DPGATHER_P2P_NODES`` pretend nodes), the probe of every pair of devices, the windows of
  the pull and, beside it on the same node groups and probe verdict, the push's (sized for
  decode steps: :func:`dpgather.core.push_window_rows` rows per replica), and over several
  nodes the ``inter`` communicator of the ranks at the same place of every node. The backend
  builds its own transports (``backend.p2p_probe`` / ``backend.p2p`` / ``backend.push``); a
  failure on any node turns that transport off on every rank, with the reason;
- the cost model: the one given, else the calibration ``dpgather calibrate`` cached for this
  machine (rank 0 reads it and sends it to every rank), else the built-in constants.
"""

import os
from typing import Any, NamedTuple, Optional

from dpgather.core import BackendUnavailable, ConfigError, CostModel, p2p_window_rows, push_window_rows

from ._log import get_logger

__all__ = ["Links", "bring_up"]

log = get_logger("facade")

class Links(NamedTuple):
    """What :func:`bring_up` made. ``tp``/``attn``/``inter``: communicators (``attn`` None when
    ``A = 1``, ``inter`` None unless a P2P transport runs over several nodes); ``pull``: the P2P
    pull transport or None; ``push``: the push transport or None; ``node_size``: ranks of one P2P
    group; ``p2p_rows``: rows the pull's windows hold per collective (0 without it);
    ``push_rows``: rows of one replica the push's windows hold (0 without it); ``reason``,
    ``push_reason``: why the pull, the push is off (None when on); ``cost`` and ``cost_source``:
    the planner's cost model (before ``row_bytes``) and where it came from."""

    tp: Any
    attn: Any
    inter: Any
    pull: Any
    node_size: int
    p2p_rows: int
    reason: Optional[str]
    cost: CostModel
    cost_source: str
    push: Any = None
    push_rows: int = 0
    push_reason: Optional[str] = None

    def communicators(self):
        """The communicators, sub-communicators first (the order of abort and close)."""
        return tuple(c for c in (self.inter, self.attn, self.tp) if c is not None)

    def transports(self):
        """The P2P transports made, by their public names (``{"p2p": pull, "push": push}``)."""
        return {t.name: t for t in (self.pull, self.push) if t is not None}

    def describe(self, collectives):
        """The transport keys of ``DpAttention.info()``: ``transports`` (what the plans may use:
        ``"push"``, ``"p2p"`` where available, then ``collectives``: ``"nccl"``/``"mpi"``);
        ``transport`` (``"p2p"`` where the pull is available, else ``collectives``);
        ``transport_reason``, ``push_reason`` (why not the pull, the push; None when available);
        ``p2p_node_size`` (ranks of one P2P group: all ranks on one node, the ranks per node over
        several; 0 without a P2P transport); ``push_pdl`` (the push kernels are programmatic
        dependent launches; None without the CUDA push); ``cost_model`` (given, calibrated with
        its cache file, or defaults)."""
        made = self.transports()
        return {"transports": [*sorted(made, reverse=True), collectives],
                "transport": "p2p" if self.pull is not None else collectives,
                "transport_reason": self.reason, "push_reason": self.push_reason,
                "p2p_node_size": self.node_size if made else 0, "push_pdl": getattr(self.push, "pdl", None),
                "cost_model": self.cost_source}

    def error(self):
        """The first device error code of the P2P transports (0 when healthy): reads of pinned
        memory, no CUDA call."""
        for t in (self.pull, self.push):
            code = t.error() if t is not None else 0
            if code:
                return code
        return 0


def bring_up(private, sync, backend, config, topology, rank, row_bytes) -> Links:
    """Make the communicators, the P2P transports and the cost model (module docstring).

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
        p2p = _p2p(private, sync, backend, config, topology, rank, row_bytes, tp)
        made.extend(c for c in (p2p.pull, p2p.push, p2p.inter) if c is not None)
        cost, source = (config.cost, "given (cost=...)") if config.cost is not None else _cached_cost(
            sync, backend, topology.world_size, rank)
        log.info("cost model: %s", source)
        return p2p._replace(tp=tp, attn=attn, cost=cost, cost_source=source)
    except BaseException:
        for obj in reversed(made):
            try:
                obj.close()
            except Exception:
                pass
        raise


def _p2p(private, sync, backend, config, topology, rank, row_bytes, tp):
    """The P2P transports where they can run, as :class:`Links` fields (``tp``, ``attn`` and the
    cost model left for the caller)."""
    T, A = topology.world_size, topology.attn_tp_size
    off = Links(None, None, None, None, T, 0, None, None, "", None, 0, None)
    if config.transport == "nccl":
        why = "transport='nccl' was asked for"
        return off._replace(reason=why, push_reason=why)
    if T == 1:
        return off._replace(reason="one rank: nothing to move", push_reason="one rank: nothing to move")
    from dpgather.dist.nodes import host_id, node_size

    facts = sync.allgather_obj((host_id(), os.environ.get("DPGATHER_P2P_NODES", "")),
                               "DpAttention construction (nodes)")
    L, reason = node_size([h for h, _ in facts], facts[0][1], A)
    push_reason = reason
    made = off
    if L > 0:
        node_comm = private.Split(rank // L, rank % L) if L < T else private
        try:
            made = _windows(node_comm, sync, backend, config, topology, row_bytes, several=L < T)
        finally:
            if node_comm is not private:
                node_comm.Free()
        reason, push_reason = made.reason, made.push_reason
    reason = None if made.pull is not None else f"P2P is not available: {reason}"
    push_reason = None if made.push is not None else (
        "transport='p2p' was asked for (the pull only)" if config.transport == "p2p" else
        f"the push transport is not available: {push_reason}")
    for name, t, why in (("p2p", made.pull, reason), ("push", made.push, push_reason)):
        if config.transport == name and t is None:
            for other in (made.pull, made.push):
                if other is not None:
                    other.close()
            raise ConfigError(f"transport={name!r} but {why}; use transport='auto' or 'nccl'")
    if made.pull is None and made.push is None:
        log.info("%s; the step's collectives go over %s", reason, backend.collectives.upper())
        return off._replace(reason=reason, push_reason=push_reason)
    inter = tp.split(rank % L, rank // L) if L < T else None
    return made._replace(inter=inter, node_size=L, reason=reason, push_reason=push_reason)


def _window_rows(topology, config):
    return p2p_window_rows(topology, config.graph_buckets, config.max_tokens_per_rank)


def _windows(node_comm, sync, backend, config, topology, row_bytes, several):
    """The probe and the windows over one node (``several``: verdicts shared by every node): the
    pull's, and the push's beside it (not for ``transport="p2p"``). Returns a :class:`Links`
    with ``pull``, ``push``, their rows and reasons set, the same on every rank."""
    ok, reason = backend.p2p_probe(node_comm, config.timeout_s)
    if several:
        ok, reason = _node_verdict(sync, ok, reason, "P2P probe verdicts")
    out = Links(None, None, None, None, 0, 0, reason, None, "", None, 0, reason)
    if not ok:
        return out
    pull, reason = _make(lambda: backend.p2p(node_comm, _window_rows(topology, config) * row_bytes,
                                             config.timeout_s), sync, several, "P2P windows")
    push, push_reason = None, ""
    if config.transport != "p2p":
        rows = push_window_rows(topology)
        push, push_reason = _make(lambda: backend.push(node_comm, rows * (-(-row_bytes // 8) * 8),
                                                       config.timeout_s), sync, several, "push windows")
    return out._replace(pull=pull, p2p_rows=_window_rows(topology, config) if pull is not None else 0,
                        reason=reason, push=push, push_rows=push_window_rows(topology) if push is not None else 0,
                        push_reason=push_reason)


def _make(build, sync, several, what):
    """``(transport or None, reason)`` of ``build()`` (a collective over the node), the same on
    every rank: a failure on any node closes it on every node."""
    t, ok, reason = None, True, ""
    try:
        t = build()
    except (ConfigError, BackendUnavailable) as e:  # the same verdict on every rank of the node
        ok, reason = False, str(e)
    if several:
        ok, reason = _node_verdict(sync, ok, reason, what)
    if not ok and t is not None:  # another node failed: every rank goes without it
        t.close()
        t = None
    return t, reason


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
