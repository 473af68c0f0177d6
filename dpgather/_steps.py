"""The step table: each micro-batch's current step, the layouts of plans seen, and arena sizes.

A :class:`Step` is what one rank needs to run the calls of one plan on one micro-batch: the
plan, its hidden and logits :class:`~dpgather._layout.Layout`, the step descriptor (host copy and
device copy, uploaded once per plan change into the micro-batch's own ring), the signatures of
its P2P operations and the micro-batch's arena. :class:`StepTable` keeps the current step of
every micro-batch and caches layouts by plan fingerprint (a serving loop repeats a few plans), so
a decode step that repeats its plan costs one dictionary lookup. The graph runner uses the same
table for the descriptors of its buckets.

:func:`arena_sizes` is the one rule for how many bytes each arena role needs at a token capacity,
used by the preallocation of ``DpAttention(max_tokens_per_rank=...)`` and by every graph runner.
"""

from typing import Dict, List, Optional, Tuple

import numpy as np

from dpgather.core import ConfigError, InputError, PaddingMode, Plan

from ._layout import OP_GATHER, OP_GATHER_FP8, OP_GATHER_LOGITS, OP_GRAPH, OP_SCATTER, Descriptor, Layout, signature

__all__ = ["Step", "StepTable", "arena_sizes", "preallocate", "LAYOUT_CACHE"]

#: Distinct plans whose layouts are kept. A serving loop repeats a few plans (decode at each batch
#: size, graph buckets); a trace of ever-new prefill shapes must not grow memory without bound, so
#: the cache starts over when it is full (a miss costs one layout computation, ~20 us).
LAYOUT_CACHE = 256
#: Bytes of slack in roles that hand out two views per request: each view starts at a 256-byte
#: boundary (``_arena._ALIGN``), so a request may need up to 2 x 255 bytes more than its rows.
_VIEW_SLACK = 1024
#: The P2P descriptors of a step, by name (``Descriptor.p2p`` and ``Descriptor.push``), and the
#: operation of each (both transports' entries of an operation carry its one signature).
_P2P_OPS = (("gather_replicate", OP_GATHER, 0), ("gather_partial", OP_GATHER, 1), ("combine", OP_SCATTER, 1),
            ("logits", OP_GATHER_LOGITS, 0), ("wire", OP_GATHER_FP8, 0))


class Step:
    """One step of one micro-batch on this rank.

    Attributes:
        plan: the step's :class:`Plan`. mb: its micro-batch. arena: the micro-batch's arena.
        hidden, logits: the plan's layouts on this rank. desc_host: the host descriptor
        (read-only int64). desc: its device copy (the host array on the host backend).
        transport: the plan's transport (``"nccl"``, ``"p2p"``, ``"push"``). call_sigs: the cache of the step's
        call signatures (filled by the op path). held: the inputs of the step's synchronous
        calls, kept until the step is replaced: the device may still read them after a call
        returned, and an array imported from another framework must not go back to that
        framework's allocator before (its stream need not be ours).
    """

    __slots__ = ("plan", "mb", "arena", "hidden", "logits", "desc_host", "desc", "transport", "call_sigs", "held")


class StepTable:
    """The current step of every micro-batch of one ``DpAttention`` (module docstring).

    Args:
        backend: the array backend (``upload(desc, out=None, ring=...)``).
        descriptor: the :class:`Descriptor` of the topology (attribute ``descriptor``).
        rank, dp_rank, attn_tp_rank: this rank's place (attributes ``dp_rank``, ``attn_tp_rank``).
        dtype_code, hidden_size: the configured row format (in P2P signatures).
        arenas: one arena per micro-batch.
    """

    def __init__(self, backend, descriptor: Descriptor, rank: int, dp_rank: int, attn_tp_rank: int,
                 dtype_code: int, hidden_size: int, arenas):
        self._backend = backend
        self.descriptor = descriptor
        self._rank = rank
        self.dp_rank, self.attn_tp_rank = dp_rank, attn_tp_rank
        self._code, self._width = dtype_code, hidden_size
        self.arenas = arenas
        self.steps: List[Optional[Step]] = [None] * len(arenas)
        self._previous: List[Optional[int]] = [None] * len(arenas)  # each micro-batch's previous fingerprint
        self._cache: Dict[int, tuple] = {}
        self._relaid: Dict[Tuple[int, int], np.ndarray] = {}

    # -- opening a step ---------------------------------------------------------------------
    def open(self, plan: Plan, mb: int) -> Step:
        """Make ``plan`` the current step of micro-batch ``mb``; uploads its descriptor once
        (into the micro-batch's own ring of device descriptors) when the layout changed."""
        st = Step()
        st.plan, st.mb, st.arena, st.held = plan, mb, self.arenas[mb], []
        st.transport = plan.transport
        fp = plan.fingerprint
        hit = self._cache.get(fp)
        if hit is None:
            d, a = self.dp_rank, self.attn_tp_rank
            hidden, logits = Layout.hidden(plan, d, a), Layout.logits(plan, d, a)
            sigs = {name: signature(op, fp, flag, self._code, self._width) for name, op, flag in _P2P_OPS}
            desc = np.zeros(self.descriptor.size, dtype=np.int64)
            self.descriptor.write(desc, plan, hidden, logits, self._rank, sigs)
            desc.flags.writeable = False
            if len(self._cache) >= LAYOUT_CACHE:
                self._cache.clear()
            hit = self._cache[fp] = (hidden, logits, desc, {})
        st.hidden, st.logits, st.desc_host, st.call_sigs = hit
        prev = self.steps[mb]
        if prev is not None and prev.plan.fingerprint == fp:
            st.desc = prev.desc  # same layout: the device copy is already right
        else:
            st.desc = self._backend.upload(st.desc_host, ring=mb)
        if prev is not None:
            self._previous[mb] = prev.plan.fingerprint
        self.steps[mb] = st
        return st

    # -- finding a call's step ----------------------------------------------------------------
    def find(self, plan) -> Optional[Step]:
        """The current step ``plan`` denotes, without raising: the step whose plan it is, else
        the one current step with its fingerprint (a ``dg.plan()`` plan of the same layout);
        None otherwise."""
        for st in self.steps:
            if st is not None and st.plan is plan:
                return st
        if not isinstance(plan, Plan):
            return None
        same = [st for st in self.steps if st is not None and st.plan.fingerprint == plan.fingerprint
                and plan.dp_size == st.plan.dp_size and plan.attn_tp_size == st.plan.attn_tp_size]
        return same[0] if len(same) == 1 else None

    def resolve(self, plan) -> Step:
        """The current step of ``plan`` (as :meth:`find`), or an InputError that says why not."""
        st = self.find(plan)
        if st is not None:
            return st
        if not isinstance(plan, Plan):
            raise InputError(f"plan must be a dpgather.Plan (from sync()), got {plan!r}")
        steps = [st for st in self.steps if st is not None]
        if not steps:
            raise InputError("no step is open: call sync() first and pass the plan it returned")
        same = [st.mb for st in steps if plan.fingerprint == st.plan.fingerprint]
        if len(same) > 1:
            raise InputError(
                f"plan equals the current plans of micro-batches {same}, so it does not say which one it is for: "
                "pass the Plan object returned by sync(batch, micro_batch=i)")
        if len(self.steps) == 1:
            raise InputError(
                f"plan is not the plan of this step (fingerprint {plan.fingerprint:#x}, this step "
                f"{steps[0].plan.fingerprint:#x}): pass the plan returned by the latest sync()")
        stale = [i for i, fp in enumerate(self._previous) if fp == plan.fingerprint]
        raise InputError(
            f"plan is not the current plan of any micro-batch (fingerprint {plan.fingerprint:#x}"
            + (f", an earlier plan of micro-batch {stale[0]}" if stale else "")
            + "): pass the plan returned by the latest sync(batch, micro_batch=i) of the micro-batch")

    # -- graph buckets ------------------------------------------------------------------------
    def relaid(self, st: Step, bucket: int) -> np.ndarray:
        """The host descriptor of ``st``'s plan re-laid out for graph bucket ``bucket`` (larger than
        its own): MAX_LEN slots of ``bucket`` rows, the same counts; P2P signatures from
        (fingerprint, bucket), so ranks replaying different buckets never match."""
        plan = st.plan
        key = (plan.fingerprint, bucket)
        hit = self._relaid.get(key)
        if hit is None:
            D = plan.dp_size
            hidden = Layout(PaddingMode.MAX_LEN, plan.num_tokens, [bucket] * D, [i * bucket for i in range(D + 1)],
                            D * bucket, self.dp_rank, self.attn_tp_rank, plan.attn_tp_size)
            fp = plan.fingerprint ^ (bucket * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
            sigs = {name: signature(OP_GRAPH, fp, k, 0, self._width) for k, (name, _, _) in enumerate(_P2P_OPS)}
            hit = np.zeros(self.descriptor.size, dtype=np.int64)
            self.descriptor.write(hit, plan, hidden, st.logits, self._rank, sigs)
            if len(self._relaid) >= LAYOUT_CACHE:
                self._relaid.clear()
            self._relaid[key] = hit
        return hit


def arena_sizes(D: int, A: int, tokens: int, row_bytes: int, graph: bool = False,
                node_replicas: int = 0) -> Dict[str, int]:
    """Bytes each arena role needs for steps of up to ``tokens`` rows per replica.

    ``M`` is ``tokens`` aligned up to ``A``. ``gathered``/``logits``: every replica's slot
    (``D*M`` rows); ``staging``: a packed slot plus an attn-TP chunk (``2*M``); ``output``: one
    slot; ``combine``: eager steps need the SUM_LEN all-reduce's full buffer (``D*M``), a graph
    step (MAX_LEN) at most a chunk plus a slot (``2*M``) or, with P2P over several nodes, a node
    block (``node_replicas*M``). A graph runner (``graph=True``) has no ``logits`` role.
    """
    M = -(-tokens // A) * A
    combine = max(2, node_replicas) if graph else max(2, D)
    sizes = {"gathered": D * M * row_bytes, "staging": 2 * M * row_bytes + _VIEW_SLACK,
             "combine": combine * M * row_bytes + _VIEW_SLACK, "output": M * row_bytes}
    if not graph:
        sizes["logits"] = D * M * row_bytes
    return sizes


def preallocate(arenas, sync, rank, topology, config, row_bytes):
    """``max_tokens_per_rank``: reserve every role of every arena at construction. The outcome is
    agreed (one object exchange over ``sync``), so every rank raises the same ConfigError naming
    the size when any rank could not allocate."""
    D, A, tokens = topology.dp_size, topology.attn_tp_size, config.max_tokens_per_rank
    if config.fp8 is not None:  # the quantized gather's wire rows share the roles
        row_bytes = max(row_bytes, config.fp8.wire_bytes(config.hidden_size))
    sizes = arena_sizes(D, A, max(tokens, config.largest_bucket), row_bytes)
    error = None
    try:
        for arena in arenas:
            for role, nbytes in sizes.items():
                arena.reserve(role, nbytes)
    except Exception as e:  # MemoryError, ValueError, CuPy's OutOfMemoryError, InputError
        error = f"rank {rank}: {type(e).__name__}: {e}"
    errors = [m for m in sync.allgather_obj(error, "DpAttention construction (preallocation)") if m]
    if errors:
        total = sum(sizes.values()) * len(arenas)
        raise ConfigError(
            f"max_tokens_per_rank={tokens} needs {total / 2**20:.1f} MiB of arenas per rank ({D} replicas x {tokens} "
            f"rows x {row_bytes} bytes per row, {len(arenas)} micro-batch(es)), which could not be allocated: "
            + "; ".join(errors) + ". Lower max_tokens_per_rank or leave it None (grow on demand)")
