"""``DpAttention``: the per-step data plane of DP attention, composed of small rooms.

One object per process (one rank of the TP group). Each step::

    plan = dp.sync(batch)                               # the step's one host collective + plan
    g = dp.gather(x, plan, contribution="partial")      # [plan.gathered_rows, H] on every rank
    y = dp.scatter(mlp(g), plan, reduce=True)           # this replica's rows, summed over TP

This module composes the rooms and owns the order of construction and teardown
(docs/internals.md draws them): the configuration and its agreement (:mod:`._config`), the
communicators, P2P transport and cost model (:mod:`._links`), the per-step exchange
(:class:`dpgather.dist.sync.StepSync`), the step ledger (:mod:`._ledger`), the step table
(:mod:`._steps`), the data plane (:mod:`._dataplane`), the op path every call runs through
(:mod:`._ops`), the lifecycle state (:mod:`._lifecycle`) and the graph runners (:mod:`._graph`).
"""

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Literal, Optional, Union

import numpy as np

from dpgather.core import RECORD_WIDTH, CostModel, InputError, LocalBatch, Plan
from dpgather.core import Fp8Format, Planner, SpecConfig, Topology
from dpgather.core.dtypes import DTYPES

from dpgather.dist.base import Closing

from . import _checks
from ._arena import Arena
from ._backends import make_backend
from ._chain import Retired
from ._config import FALLBACK_TIMEOUT_S, MAX_MICRO_BATCHES, agree, canonical, intracomm
from ._dataplane import DataPlane
from ._fp8 import Fp8Rows
from ._handle import AsyncHandle
from ._layout import Descriptor
from ._ledger import SYNC_WIDTH, StepLedger
from ._lifecycle import State, free_duplicate, register_at_exit
from ._links import bring_up
from ._log import get_logger, set_rank
from ._ops import OPS, OpPath
from ._steps import StepTable, preallocate

__all__ = ["DpAttention", "MAX_MICRO_BATCHES"]

if TYPE_CHECKING:
    from ._graph import GraphRunner

#: What ``dtype=`` accepts: a logical name or alias, or a NumPy dtype / type.
DTypeLike = Union[str, "np.dtype[Any]", type]

log = get_logger("facade")

_GATHER, _GATHER_FP8, _GATHER_LOGITS, _SCATTER, _SCATTER_LOGITS, _MASK = (
    OPS[k] for k in ("gather", "gather_fp8", "gather_logits", "scatter", "scatter_logits", "mask_topk_ids"))


class DpAttention(Closing):
    """The DP-attention data plane of one rank.

    Args:
        comm: an mpi4py communicator spanning the TP group (default ``MPI.COMM_WORLD``). dpgather
            works on a private duplicate, so its messages never mix with the caller's. Every other
            argument is keyword-only.
        hidden_size: row width ``H`` of gathered hidden states (required).
        attn_tp_size: ranks per DP replica (``A``); must divide ``comm.size``.
        dtype: ``"bfloat16"`` (default), ``"float16"``, ``"float32"``, ``"int32"``, ``"int64"``,
            ``"uint8"`` (or NumPy dtypes / aliases like ``"bf16"``).
        backend: ``"auto"`` (CUDA when CuPy sees a GPU), ``"cuda"`` or ``"host"``.
        spec: :class:`SpecConfig` for speculative decoding.
        policy: padding policy (``"auto"``, ``"sglang"``, ``"max_len"``, ``"sum_len"``,
            ``"varlen"``).
        graph_buckets: per-replica token capacities with captured graphs (``None`` or ``()``:
            no graphs).
        max_tokens_per_rank: preallocate the arenas for this many tokens per replica (positive
            int or None).
        timeout_s: bound in seconds of every collective, of the sync and of the construction
            (``CollectiveTimeout`` after it); a positive number (``float("inf")``: no bound).
        cost: :class:`CostModel` for ``"auto"`` (default: the calibration `dpgather calibrate` cached for
            this machine, else built-in constants; ``row_bytes`` is set from ``hidden_size`` and
            ``dtype``).
        transport: ``"auto"`` (default: the plan picks NCCL, the P2P pull or the push per step
            where the ranks share a node with peer access; docs/design.md section 12), ``"nccl"``
            (MPI on the host backend), ``"p2p"`` (the pull for every step its windows hold) or
            ``"push"`` (the push for decode-sized steps, else as ``"p2p"``); the last two raise
            ConfigError where that transport cannot run.
        strict: debug option: every data-plane call first agrees over the host, so a bad
            argument on any rank raises on every rank at that call (default: on its rank at once,
            on every rank at the next ``sync()``; docs/reliability.md).
        micro_batches: micro-batches in flight at once (default 1; at most
            :data:`MAX_MICRO_BATCHES`), each with its own arenas and current plan
            (``sync(batch, micro_batch=i)``), for two-batch overlap (docs/overlap.md).
        device: this rank's GPU (CUDA backend): None (default: the node-local rank modulo the
            visible GPUs), a device ordinal or the caller's device object (docs/interop.md).
            Each rank names its own; two ranks of a node on one GPU is a ConfigError.
        fp8: :class:`Fp8Format` of :meth:`gather_fp8` (docs/fp8.md), or None (default). The
            planner then prices hidden-state gathers at its wire bytes.

    Results are views of the plan's micro-batch's arenas, valid until the next call that uses the
    same role there (docs/memory.md), in the caller's array type (docs/interop.md). On CUDA a call
    runs on the current CuPy stream (asynchronous ones on their ``stream=``), after this
    DpAttention's previous gather or combine whatever stream that used (docs/overlap.md).

    Raises:
        ConfigError: invalid arguments on any rank, or ranks configured differently (raised on
            every rank, naming the field, the values and the ranks).
        CollectiveTimeout: some rank did not construct its DpAttention within ``timeout_s``.
        BackendUnavailable: the requested backend cannot run here (with the install command).
    """

    def __init__(self, comm: Any = None, *, hidden_size: int, attn_tp_size: int = 1,
                 dtype: DTypeLike = "bfloat16", backend: Literal["auto", "host", "cuda"] = "auto",
                 spec: Optional[SpecConfig] = None,
                 policy: Literal["auto", "sglang", "max_len", "sum_len", "varlen"] = "auto",
                 graph_buckets: Optional[Iterable[int]] = (), max_tokens_per_rank: Optional[int] = None,
                 timeout_s: float = 60.0, cost: Optional[CostModel] = None, strict: bool = False,
                 transport: Literal["auto", "nccl", "p2p", "push"] = "auto", micro_batches: int = 1,
                 device: Any = None, fp8: Optional[Fp8Format] = None) -> None:
        from dpgather.dist.base import bounded_wait
        from dpgather.dist.sync import StepSync

        self._state = State()
        self._private = self._sync = self._links = self._backend = self._retired = None
        self._runners, self._arenas, self._orphans = [], [], []
        comm = intracomm(comm)
        # Every argument is checked locally first, without raising: a rank that raised before the
        # agreement below would leave its peers waiting in it.
        config, values, errors = canonical(
            comm.Get_size(), attn_tp_size=attn_tp_size, hidden_size=hidden_size, dtype=dtype, backend=backend,
            spec=spec, policy=policy, graph_buckets=graph_buckets, max_tokens_per_rank=max_tokens_per_rank,
            timeout_s=timeout_s, cost=cost, strict=strict, transport=transport, micro_batches=micro_batches,
            device=device, fp8=fp8)
        bound = FALLBACK_TIMEOUT_S if "timeout_s" in errors else float(timeout_s)
        try:
            private, req = comm.Idup()
            bounded_wait(req, bound, "DpAttention construction (duplicating comm)", self._orphans, private)
            self._private = private
            self._sync = StepSync(private, SYNC_WIDTH, bound)
            agree(self._sync.allgather_obj((values, errors), "DpAttention construction (configuration agreement)"))
            self._configure(config)
        except BaseException:
            self.close()
            raise
        register_at_exit(self)

    def _configure(self, config):
        """Build the rooms from the agreed configuration."""
        self.config = config
        self.timeout_s, self.hidden_size, self.dtype = config.timeout_s, config.hidden_size, config.dtype
        self.strict, self.micro_batches = config.strict, config.micro_batches
        self.topology = Topology(config.world_size, config.attn_tp_size)
        self.rank = self._private.Get_rank()
        set_rank(self.rank, config.world_size)
        A = config.attn_tp_size
        self.dp_rank, self.attn_tp_rank = self.rank // A, self.rank % A
        be = self._backend = make_backend(config.backend, config.device)
        self.backend = be.name
        storage = be.storage_dtype(self.dtype)
        row_bytes = self.hidden_size * storage.itemsize
        links = self._links = bring_up(self._private, self._sync, be, config, self.topology, self.rank, row_bytes)
        be.warm()  # every rank compiles now, together, not one rank inside a step while the others wait
        self._state.attach(links.communicators())
        self.planner = Planner(self.topology, spec=config.spec, policy=config.policy,
                               graph_buckets=config.graph_buckets, cost=links.cost.with_row_bytes(row_bytes),
                               transport=config.transport, p2p_rows=links.p2p_rows,
                               p2p_node_size=links.node_size if links.transports() else 0,
                               push_rows=links.push_rows,
                               wire_bytes=config.fp8.wire_bytes(self.hidden_size) if config.fp8 else 0)
        descriptor = Descriptor(self.topology.dp_size, A, links.node_size)
        plane = DataPlane(be, links.tp, links.attn, links.transports(), descriptor, self.attn_tp_rank, A,
                          self.dtype, storage, links.inter)
        events = be.event_pool()
        if config.micro_batches > 1:
            plane.chain.start()
        self._retired = Retired(plane.chain, events, be.current_stream)
        self._arenas = [Arena(be.alloc, retire=self._retired.retire) for _ in range(config.micro_batches)]
        code = DTYPES[self.dtype].code
        self._steps = StepTable(be, descriptor, self.rank, self.dp_rank, self.attn_tp_rank, code, self.hidden_size,
                                self._arenas)
        self._ledger = StepLedger(self._sync, self.rank, config.micro_batches)
        self._path = OpPath(self._state, self._ledger, self._steps, plane, be, events, config, storage, code)
        self._record = np.zeros(SYNC_WIDTH, dtype=np.int32)
        if config.max_tokens_per_rank:
            preallocate(self._arenas, self._sync, self.rank, self.topology, config, row_bytes)
        log.info("DpAttention: %s backend, T=%d A=%d H=%d %s, policy %s, P2P %s, push %s", be.name,
                 config.world_size, A, self.hidden_size, self.dtype, config.policy, links.reason or "available",
                 links.push_reason or "available")

    # -- the per-step sync ----------------------------------------------------------------
    def sync(self, batch: LocalBatch, micro_batch: int = 0) -> Plan:
        """Exchange this rank's batch with every rank (one host collective) and plan the step.

        Args:
            batch: this rank's :class:`LocalBatch`; the ``attn_tp_size`` ranks of a replica must
                pass equal batches.
            micro_batch: which micro-batch this plans (every rank the same); its plan replaces
                that micro-batch's previous one only.

        Returns:
            The step's :class:`Plan`, identical on every rank.

        Raises (every rank alike; docs/reliability.md):
            InconsistentBatchError: the ranks of a replica passed different batches.
            InputError: an invalid batch or micro_batch, or a call since the previous ``sync()``
                failed its checks on some rank (named; nothing planned: call ``sync()`` again).
            InconsistentStepError: ranks issued different calls, plans or syncs (aborts).
            CollectiveTimeout: some rank did not reach ``sync`` within ``timeout_s``, or a device
                transfer of the previous step failed (aborts).
        """
        self._state.check()
        rec, mb, batch_error = self._record, -1, None
        try:
            N = self.micro_batches
            mb = _checks.index(micro_batch, "micro_batch", N, f" (this DpAttention has micro_batches={N}); pass " + (
                "micro_batch=0 (or construct DpAttention(micro_batches=K))" if N == 1 else f"one of 0..{N - 1}"))
            if not isinstance(batch, LocalBatch):
                raise InputError(f"batch must be a dpgather.LocalBatch, got {batch!r}")
            self.planner.record(batch, out=rec[:RECORD_WIDTH])
        except Exception as e:
            batch_error = e
            StepLedger.bad_batch(rec, e)
        self._ledger.seal(rec, mb, self._links.error())  # reads of pinned memory
        with self._state.guard("sync"):
            table = self._sync.exchange(rec)
            verdict = self._ledger.verdict(table, rec, batch_error)
        if verdict is not None:
            if verdict.abort is not None:
                self._state.abort(verdict.abort)
            raise verdict.error
        plan = self.planner.plan_table(table[:, :RECORD_WIDTH])
        self._steps.open(plan, mb)
        self._ledger.synced(mb)
        self._retired.release()
        return plan

    # -- the data-plane calls (docs/design.md section 4; each one row of the op path) ------------
    def gather(self, x: Any, plan: Plan, contribution: Literal["replicate", "partial"] = "replicate") -> Any:
        """Gather every replica's rows into one buffer (docs/design.md section 4).

        Args:
            x: this rank's ``[rows, hidden_size]`` (rows beyond ``plan.num_tokens[own]`` are
                ignored, missing rows count as zero). Never modified.
            plan: the plan returned by this step's :meth:`sync` (of the micro-batch to gather).
            contribution: ``"replicate"`` (the replica's ranks hold the same rows; attn rank 0's
                are used) or ``"partial"`` (they hold summands).

        Returns:
            ``[plan.gathered_rows, hidden_size]`` view of the micro-batch's ``gathered`` arena,
            replica ``d``'s rows at ``plan.slot_offsets[d]``, padding rows zero.
        """
        return self._path.call(_GATHER, plan, (x, contribution), int(contribution == "partial"), self.hidden_size)

    def gather_async(self, x: Any, plan: Plan, contribution: Literal["replicate", "partial"] = "replicate",
                     stream: Any = None) -> AsyncHandle:
        """:meth:`gather` enqueued on ``stream``; returns an :class:`AsyncHandle` at once.

        ``stream``: None (the current stream), a ``cupy.cuda.Stream`` / ``ExternalStream``, a raw
        ``cudaStream_t`` int or a ``torch.cuda.Stream``. The gather first waits for the current
        stream's work so far (which produced ``x``) and runs after this DpAttention's previous
        gather/combine, whatever stream that used; ``h.wait(stream=None)`` orders ``stream`` after
        it and returns what :meth:`gather` returns (also ``h.result`` then). The handle holds ``x``
        until ``wait()``. The host backend completes the call before returning. docs/overlap.md.
        """
        return self._path.call(_GATHER, plan, (x, contribution), int(contribution == "partial"), self.hidden_size,
                               stream, True, (x,))

    def gather_fp8(self, x: Any, plan: Plan, contribution: Literal["replicate", "partial"] = "replicate") -> Fp8Rows:
        """The quantized gather (docs/fp8.md): :meth:`gather`'s rows, each quantized to float8
        e4m3fn with one float32 scale per ``group_size`` channels (``DpAttention(fp8=...)``),
        moving about half a bfloat16 row's bytes.

        ``x``, ``plan``, ``contribution``: as :meth:`gather` (``"partial"`` with ``A > 1`` first
        sums the replica's rows in the input dtype: one extra collective).

        Returns:
            :class:`Fp8Rows` ``(q, scales, wire)``: fp8 bits ``[gathered_rows, hidden_size]``
            and float32 scales ``[gathered_rows, hidden_size // group_size]``, views of the
            ``gathered`` arena; bit-identical to quantizing each replica's rows locally and
            gathering them; padding rows zero.
        """
        return self._path.call(_GATHER_FP8, plan, (x, contribution), int(contribution == "partial"),
                               self.hidden_size)

    def gather_fp8_async(self, x: Any, plan: Plan, contribution: Literal["replicate", "partial"] = "replicate",
                         stream: Any = None) -> AsyncHandle:
        """:meth:`gather_fp8` enqueued on ``stream`` (as :meth:`gather_async`); returns an
        :class:`AsyncHandle` whose result is the :class:`Fp8Rows` :meth:`gather_fp8` returns."""
        return self._path.call(_GATHER_FP8, plan, (x, contribution), int(contribution == "partial"),
                               self.hidden_size, stream, True, (x,))

    def gather_logits(self, h: Any, plan: Plan) -> Any:
        """Replicate-gather the rows that reach the LM head over the logits layout.

        Args:
            h: ``[rows, hidden_size]`` pruned hidden states of this replica (replicated over
                attn_tp), in the configured dtype.

        Returns:
            ``[plan.logits_rows, hidden_size]`` view of the micro-batch's ``logits`` arena.
        """
        return self._path.call(_GATHER_LOGITS, plan, (h,), 0, self.hidden_size)

    def gather_logits_async(self, h: Any, plan: Plan, stream: Any = None) -> AsyncHandle:
        """:meth:`gather_logits` enqueued on ``stream`` (as :meth:`gather_async`); returns an
        :class:`AsyncHandle` whose result is the view :meth:`gather_logits` returns."""
        return self._path.call(_GATHER_LOGITS, plan, (h,), 0, self.hidden_size, stream, True, (h,))

    def scatter(self, Y: Any, plan: Plan, reduce: bool = True, out: Any = None) -> Any:
        """Bring the MLP output back to this replica's rows.

        Args:
            Y: ``[>= plan.gathered_rows, hidden_size]``: TP-partial (``reduce=True``, a
                row-parallel MLP's output before its all-reduce) or already replicated
                (``reduce=False``). Never modified.
            reduce: sum ``Y`` over all T ranks (True) or copy (False); a bool.
            out: optional ``[R, hidden_size]`` destination (any ``R``: rows past
                ``num_tokens[own]`` are zeroed, rows past ``R`` dropped).

        Returns:
            ``y``: a ``[plan.num_tokens[own], hidden_size]`` view of the micro-batch's ``output``
            arena -- this replica's rows, ``y[i] = sum_t Y_t[slot_offsets[own] + i]``
            (``reduce``) or ``Y[slot_offsets[own] + i]`` -- or ``out`` (rows past
            ``num_tokens[own]`` zeroed, rows past its length dropped).
        """
        return self._path.call(_SCATTER, plan, (Y, reduce, out), _reduce_flag(reduce), self.hidden_size)

    def scatter_async(self, Y: Any, plan: Plan, reduce: bool = True, out: Any = None,
                      stream: Any = None) -> AsyncHandle:
        """:meth:`scatter` enqueued on ``stream`` (as :meth:`gather_async`: after the current
        stream's work so far, which produced ``Y``); returns an :class:`AsyncHandle` whose result
        is what :meth:`scatter` returns. The handle holds ``Y`` and ``out`` until ``wait()``."""
        return self._path.call(_SCATTER, plan, (Y, reduce, out), _reduce_flag(reduce), self.hidden_size, stream,
                               True, (Y, out))

    def scatter_logits(self, L_rows: Any, plan: Plan, out: Any = None) -> Any:
        """Copy this replica's logits rows out of the gathered logits (no collective).

        Args:
            L_rows: ``[>= plan.logits_rows, W]``: logits of every replica's rows (the vocabulary
                shard or the full vocabulary; any width and any supported dtype).
            out: optional ``[R, W]`` destination, same dtype as ``L_rows``.

        Returns:
            ``[plan.logits_tokens[own], W]``: this replica's own logits rows (or ``out``, rows past
            ``logits_tokens[own]`` zero).
        """
        return self._path.call(_SCATTER_LOGITS, plan, (L_rows, out), 0, 0)

    def scatter_logits_async(self, L_rows: Any, plan: Plan, out: Any = None, stream: Any = None) -> AsyncHandle:
        """:meth:`scatter_logits` enqueued on ``stream`` (as :meth:`gather_async`; a local copy,
        no collective); returns an :class:`AsyncHandle` whose result is what
        :meth:`scatter_logits` returns."""
        return self._path.call(_SCATTER_LOGITS, plan, (L_rows, out), 0, 0, stream, True, (L_rows, out))

    def mask_topk_ids(self, topk_ids: Any, plan: Plan, fill: int = -1) -> Any:
        """Mark the padding rows of the gathered buffer in an MoE router's ``topk_ids``, in place.

        Args:
            topk_ids: ``[>= plan.gathered_rows, k]`` int32 or int64 expert ids of the gathered rows.
            fill: the id written into every padding row (rows of a slot past
                ``plan.num_tokens[d]``), an int that fits the dtype; ``-1`` makes the MoE skip them.

        Returns:
            ``topk_ids`` (modified in place on the current stream; counts are read from device
            memory on the CUDA backend, so the call can be captured in a graph).
        """
        return self._path.call(_MASK, plan, (topk_ids, fill), 0, 0)

    # -- graphs ---------------------------------------------------------------------------
    def graph_runner(self, fn: Callable[[Any], Any], contribution: Literal["replicate", "partial"] = "replicate",
                     reduce: bool = True, micro_batches: int = 1, fp8: bool = False) -> "GraphRunner":
        """Capture ``pack -> gather -> fn(G) -> combine -> unpack`` for every graph bucket.

        Returns a :class:`~dpgather.GraphRunner`: ``run(x, plan)`` replays the bucket of a graph
        step with no per-step allocation (eagerly on the host backend). ``micro_batches=N > 1``:
        the overlapped step of ``N`` micro-batches (docs/overlap.md). ``fp8=True``: the gather is
        :meth:`gather_fp8`, ``fn`` receives its :class:`Fp8Rows` (backend arrays).
        """
        self._state.check()
        from ._graph import GraphRunner

        runner = GraphRunner(self._path, self.planner, fn, contribution=contribution, reduce=reduce,
                             micro_batches=micro_batches, fp8=fp8)
        self._runners.append(runner)
        return runner

    # -- bookkeeping ----------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        """What this DpAttention runs on: its configuration, ``device`` (GPU ordinal; None on the
        host), ``sync`` (``"shm"``/``"mpi"`` after the first ``sync()``), ``host_collectives``,
        ``p2p_rows`` / ``push_rows`` (rows the pull's windows hold, and of one replica the push's),
        ``fp8`` (the quantized gather's format or None) and the transports and cost model as
        :meth:`dpgather._links.Links.describe` says."""
        return {
            "backend": self.backend, "world_size": self.topology.world_size,
            "attn_tp_size": self.topology.attn_tp_size, "dtype": self.dtype,
            "hidden_size": self.hidden_size, "policy": self.planner.policy, "strict": self.strict,
            "sync": self._sync.transport, "host_collectives": self._sync.host_collectives,
            "p2p_rows": self.planner.p2p_rows, "push_rows": self.planner.push_rows,
            **self._links.describe(self._backend.collectives), "micro_batches": self.micro_batches,
            "device": None if self._backend.device is None else self._backend.device.id,
            "fp8": self.config.fp8 and {"group_size": self.config.fp8.group_size, "pow2_scales": self.config.fp8.pow2_scales},
        }

    def memory_stats(self, micro_batch: Optional[int] = None) -> Dict[str, Dict[str, int]]:
        """Arena usage per role (``reserved_bytes``, ``peak_view_bytes``, ``allocations``,
        ``requests``) and ``total``: summed over the micro-batches, or of ``micro_batch=i``."""
        if micro_batch is not None:
            return self._arenas[_checks.index(micro_batch, "micro_batch", self.micro_batches)].stats()
        return Arena.total(self._arenas)

    def wait(self, stream: Any = None) -> None:
        """Block until this rank's data-plane work on ``stream`` finished, within ``timeout_s``
        (the CUDA backend's collectives are asynchronous; the host backend's are not)."""
        self._state.check()
        with self._state.guard("wait"):
            for c in self._links.communicators():
                c.wait(stream)

    def abort(self, reason: str = "abort() was called") -> None:
        """Abort the communicators (local, immediate) and refuse further use on this rank."""
        self._state.abort(reason)

    def close(self) -> None:
        """Release graphs, the P2P transports, arenas, communicators, the sync and dpgather's
        duplicate of ``comm``, in that order. Local (it never waits for a peer, so it is safe
        after any error) and idempotent."""
        if self._state.closed:
            return
        self._state.closed = True
        for runner in self._runners:
            runner.close()
        self._runners = []
        links, self._links = self._links, None
        if links is not None:  # after the graphs that captured them, before the buffers
            for t in links.transports().values():
                t.close()
        for arena in self._arenas:
            arena.release()
        if links is not None:
            if self._retired is not None:  # None when the construction failed before the data plane
                self._retired.clear()
            for c in links.communicators():
                c.close()
        if self._backend is not None:
            self._backend.close()
        if self._sync is not None:
            self._sync.close()
        private, self._private = self._private, None
        free_duplicate(private, self._orphans, self._sync, links and links.tp)


    def __repr__(self):
        g = getattr
        return (f"DpAttention(rank={g(self, 'rank', '?')}, {g(self, 'topology', '')}, hidden_size="
                f"{g(self, 'hidden_size', '?')}, dtype={g(self, 'dtype', '?')}, backend={g(self, 'backend', None)})")


def _reduce_flag(reduce):
    """What a scatter issues: the reduction, unless ``reduce`` is False (an invalid value issues
    the reduction and fails its checks)."""
    return int(reduce) if isinstance(reduce, (bool, np.bool_)) else 1
