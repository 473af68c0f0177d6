"""``DpAttention``: the per-step data plane of DP attention — configuration, agreement, lifecycle.

One object per process (one rank of the TP group). Each step::

    plan = dp.sync(batch)                               # the step's one host collective + plan
    g = dp.gather(x, plan, contribution="partial")      # [plan.gathered_rows, H] on every rank
    y = dp.scatter(mlp(g), plan, reduce=True)           # this replica's rows, summed over TP

This module owns what is not row movement: checking arguments once at the public API, the
agreement between ranks (at construction, and per step through the sync record), the step's
layouts and descriptor, the arenas, the asynchronous calls and their handles
(:class:`~dpgather.AsyncHandle`), micro-batches, and the order of teardown. Rows move in
:mod:`dpgather._dataplane`; layouts come from :mod:`dpgather._layout`; the per-step exchange is
:class:`dpgather.dist.sync.StepSync`.

The step record every rank sends at ``sync()`` is the planner's record (``RECORD_WIDTH`` fields)
followed by five control fields: the step sequence number, a hash and a count of the data-plane
calls this rank issued since its previous ``sync()``, a status (a call of the previous step
failed its checks here; the P2P transport reported a device error) and the micro-batch this
``sync()`` plans. So one host collective per
step also tells every rank whether all ranks issued the same operations on the same plans — see
docs/reliability.md for the exact guarantee.
"""

import atexit
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Literal, Optional, Union

import numpy as np

from dpgather.core import (
    POLICIES,
    TRANSPORTS,
    BackendUnavailable,
    RECORD_WIDTH,
    CollectiveTimeout,
    ConfigError,
    CostModel,
    InconsistentBatchError,
    InconsistentStepError,
    InputError,
    LocalBatch,
    Plan,
    Planner,
    SpecConfig,
    Topology,
)
from dpgather.core.dtypes import BF16_STORAGE, DTYPES, normalize_dtype

from ._arena import Arena
from ._backends import make_backend
from ._chain import EventPool, StreamChain
from ._dataplane import DataPlane
from ._handle import AsyncHandle
from ._log import get_logger, set_rank
from ._layout import (
    OP_GATHER,
    OP_GATHER_LOGITS,
    OP_GRAPH,
    OP_MASK,
    OP_SCATTER,
    OP_SCATTER_LOGITS,
    Descriptor,
    Layout,
    signature,
)

__all__ = ["DpAttention", "MAX_MICRO_BATCHES"]

if TYPE_CHECKING:
    from ._graph import GraphRunner

#: What ``dtype=`` accepts: a logical name or alias, or a NumPy dtype / type.
DTypeLike = Union[str, "np.dtype[Any]", type]

log = get_logger("facade")

# Control fields after the planner's record.
_C_SEQ, _C_OPS, _C_NOPS, _C_STATUS, _C_MB = range(RECORD_WIDTH, RECORD_WIDTH + 5)
SYNC_WIDTH = RECORD_WIDTH + 5
# Status codes of the control field.
_ST_OK, _ST_INPUT, _ST_DEVICE, _ST_MISMATCH = 0, 1, 2, 3
_DEFAULT_TIMEOUT_S = 60.0
#: Per-replica rows the P2P windows hold at least (decode batches and EAGLE steps fit).
P2P_DEFAULT_ROWS = 256
#: The largest ``micro_batches`` (each micro-batch has its own arenas).
MAX_MICRO_BATCHES = 16


class _Step:
    """One step of one micro-batch on this rank: the plan, its layouts, the descriptor (host and
    device) and the micro-batch's arena."""

    __slots__ = ("plan", "hidden", "logits", "desc", "desc_host", "sigs", "call_sigs", "p2p", "mb", "arena")


class _Guard:
    """Context manager: a ``CollectiveTimeout`` inside aborts the DpAttention, then propagates."""

    __slots__ = ("dp", "op")

    def __init__(self, dp, op):
        self.dp, self.op = dp, op

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if typ is not None and issubclass(typ, CollectiveTimeout):
            self.dp.abort(f"{self.op} timed out ({exc})")
        return False


class DpAttention:
    """The DP-attention data plane of one rank.

    Args:
        comm: an mpi4py communicator spanning the TP group (default ``MPI.COMM_WORLD``). dpgather
            works on a private duplicate, so its messages never mix with the caller's.
        attn_tp_size: ranks per DP replica (``A``); must divide ``comm.size``.
        hidden_size: row width ``H`` of gathered hidden states.
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
            this machine, else built-in constants; ``row_bytes`` is
            set from ``hidden_size`` and ``dtype``).
        transport: ``"auto"`` (default: the plan picks NCCL or P2P per step, P2P where the ranks
            share a node with peer access and it is predicted faster; graph steps use P2P
            whenever it is available), ``"nccl"`` or ``"p2p"`` (P2P for every step that fits its
            windows; ConfigError where it cannot run). On the host backend "nccl" means MPI.
        strict: debug option. Every data-plane call first agrees with every rank over the host
            (one small exchange per call): a bad argument on any rank then raises on every rank
            *at that call* and nothing moves anywhere. Without it (default) a bad argument raises
            at once on its rank, the rank still issues the step's collectives (with zero rows) so
            no peer is left waiting, and every rank raises at the next ``sync()``.
        micro_batches: how many micro-batches may be in flight at once (default 1; at most
            :data:`MAX_MICRO_BATCHES`). Each has its own arenas (``max_tokens_per_rank`` reserves
            every one of them) and its own current plan: ``sync(batch, micro_batch=i)`` plans
            micro-batch ``i``, and a call with that plan writes only micro-batch ``i``'s buffers,
            so two-batch overlap (one micro-batch's MLP beside the other's gather or combine, see
            :meth:`gather_async`) never overwrites a view still in use. docs/overlap.md.

    Views returned by ``gather``/``scatter``/``gather_logits``/``scatter_logits`` live in
    per-role arenas of the plan's micro-batch and stay valid until the next call that uses the
    same role on that micro-batch (gather -> ``gathered``, scatter -> ``output``, gather_logits ->
    ``logits``, scatter_logits -> ``logits_output``); copy them to keep them longer.

    Streams (CUDA backend): a synchronous call runs on the current CuPy stream, an asynchronous
    one on its ``stream=``. Every gather and combine of this DpAttention runs after the previous
    one, whatever streams they were issued on (an event chain: NCCL collectives on one
    communicator and P2P pulls on one window never run concurrently).

    Raises:
        ConfigError: invalid arguments on any rank, or ranks configured differently (raised on
            every rank, naming the field, the values and the ranks).
        CollectiveTimeout: some rank did not construct its DpAttention within ``timeout_s``.
        BackendUnavailable: the requested backend cannot run here (with the install command).
    """

    def __init__(self, comm: Any = None, attn_tp_size: int = 1, hidden_size: Optional[int] = None,
                 dtype: DTypeLike = "bfloat16", backend: Literal["auto", "host", "cuda"] = "auto",
                 spec: Optional[SpecConfig] = None,
                 policy: Literal["auto", "sglang", "max_len", "sum_len", "varlen"] = "auto",
                 graph_buckets: Optional[Iterable[int]] = (), max_tokens_per_rank: Optional[int] = None,
                 timeout_s: float = 60.0, cost: Optional[CostModel] = None, strict: bool = False,
                 transport: Literal["auto", "nccl", "p2p"] = "auto", micro_batches: int = 1) -> None:
        from dpgather.dist.host import load_mpi

        MPI = load_mpi()
        self._closed = False
        self._aborted = None
        self._backend = None
        self._tp = self._attn = self._inter = None
        self._p2p = None
        self._sync = None
        self._runners = []
        self._arena = None
        self._arenas = []
        self._private = None
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise ConfigError(f"comm must be an mpi4py intra-communicator such as MPI.COMM_WORLD, got {comm!r}")
        # Every argument is checked locally first, without raising: a rank that raised before the
        # agreement below would leave its peers waiting in it.
        canon, errors = _canonical_config(comm.Get_size(), attn_tp_size, hidden_size, dtype, backend,
                                          spec, policy, graph_buckets, max_tokens_per_rank, timeout_s,
                                          cost, strict, transport, micro_batches)
        bound = canon["timeout_s"] if "timeout_s" not in errors else _DEFAULT_TIMEOUT_S
        from dpgather.dist.base import bounded_wait
        from dpgather.dist.sync import StepSync

        orphans = []
        private, req = comm.Idup()
        bounded_wait(req, bound, "DpAttention construction (duplicating comm)", orphans, private)
        self._private = private
        self._sync = StepSync(private, SYNC_WIDTH, bound)
        objects = {k: canon.pop(k) for k in _PRIVATE_KEYS if k in canon}  # not sent: compared via repr
        everyone = self._sync.allgather_obj((canon, errors), "DpAttention construction (configuration agreement)")
        _raise_if_disagree(everyone)
        self._configure(MPI, {**canon, **objects})
        _register_at_exit(self)

    # -- set-up ---------------------------------------------------------------------------
    def _configure(self, MPI, c):
        """Build backend, communicators, planner and arenas from the agreed configuration ``c``."""
        self.timeout_s = c["timeout_s"]
        self.hidden_size = c["hidden_size"]
        self.dtype = c["dtype"]
        self.strict = c["strict"]
        self.topology = Topology(c["world_size"], c["attn_tp_size"])
        self.rank = self._private.Get_rank()
        set_rank(self.rank, self.topology.world_size)
        A = self.topology.attn_tp_size
        self.dp_rank, self.attn_tp_rank = self.rank // A, self.rank % A
        be = self._backend = make_backend(c["backend"])
        self.backend = be.name
        self._storage = be.storage_dtype(self.dtype)
        self._row_bytes = self.hidden_size * self._storage.itemsize
        self._tp = be.communicator(self._private, self.timeout_s)
        if A > 1:
            self._attn = self._tp.split(self.dp_rank, self.attn_tp_rank)
        p2p_rows = self._make_p2p(c)
        model = c["cost_model"]
        self._cost_source = "given (cost=...)"
        if model is None:
            model, self._cost_source = self._cached_cost()
        cost = model.with_row_bytes(self._row_bytes)
        self.planner = Planner(self.topology, spec=c["spec_obj"], policy=c["policy"],
                               graph_buckets=c["graph_buckets"], cost=cost, transport=c["transport"],
                               p2p_rows=p2p_rows, p2p_node_size=self._node_size if p2p_rows else 0)
        self._desc_layout = Descriptor(self.topology.dp_size, A, self._node_size)
        self._plane = DataPlane(be, self._tp, self._attn, self._p2p, self._desc_layout, self.attn_tp_rank, A,
                                self.dtype, self._storage, self._inter)
        N = self.micro_batches = c["micro_batches"]
        self._events = None
        self._retired = []  # (event, buffer): arena buffers replaced while the device may still read them
        if be.name == "cuda":
            self._plane.chain = StreamChain(be.cupy)
            self._events = EventPool(be.cupy)
            if N > 1:
                self._plane.chain.start()
        self._arenas = [Arena(be.alloc, retire=self._retire) for _ in range(N)]
        self._arena = self._arenas[0]
        self._record = np.zeros(SYNC_WIDTH, dtype=np.int32)
        self._ctl_expect = np.zeros(SYNC_WIDTH - RECORD_WIDTH, dtype=np.int32)
        self._steps = [None] * N  # the current step of each micro-batch
        self._prev_fp = [None] * N  # the fingerprint of each micro-batch's previous plan
        self._last_mb = 0  # the micro-batch of the latest sync()
        self._layouts = {}  # plan fingerprint -> (hidden, logits, sigs): steady state repeats plans
        self._seq = 0
        self._ophash = 0
        self._nops = 0
        self._status = _ST_OK
        self._status_msg = None
        self._dtype_code = DTYPES[self.dtype].code
        self._empty = be.xp.empty((0, self.hidden_size), dtype=self._storage)
        if c["max_tokens_per_rank"]:
            self._preallocate(c["max_tokens_per_rank"])
        log.info("DpAttention: %s backend, T=%d A=%d H=%d %s, policy %s, P2P %s", be.name,
                 self.topology.world_size, A, self.hidden_size, self.dtype, c["policy"],
                 "available" if self._p2p is not None else f"off ({self._transport_reason})")

    def _cached_cost(self):
        """The cost model ``dpgather calibrate`` cached for this machine (CUDA, T > 1), else the
        defaults; returns ``(model, source)``. Rank 0 reads its cache file and sends the
        constants to every rank (one object exchange at construction), so all ranks plan alike.
        ``DPGATHER_NO_COST_CACHE=1`` on rank 0 keeps the defaults."""
        if self._backend.name != "cuda" or self.topology.world_size == 1:
            return CostModel(), "defaults"
        payload = None
        if self.rank == 0:
            import os

            from dpgather.core.cost import cache_path

            if os.environ.get("DPGATHER_NO_COST_CACHE", "") not in ("", "0"):
                payload = (None, "defaults (DPGATHER_NO_COST_CACHE is set)")
            else:
                try:
                    from cupy.cuda import nccl

                    props = self._backend.cupy.cuda.runtime.getDeviceProperties(self._backend.device.id)
                    name = props["name"]
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    path = cache_path(name, self.topology.world_size, int(nccl.get_version()))
                    if os.path.isfile(path):
                        payload = (CostModel.load(path).to_dict(), f"calibrated ({path})")
                    else:
                        payload = (None, f"defaults (no calibration cached at {path}; run `dpgather calibrate`)")
                except Exception as e:  # noqa: BLE001 - an unreadable cache never stops construction
                    payload = (None, f"defaults (the cached calibration could not be read: {e})")
        data, source = self._sync.allgather_obj(payload, "DpAttention construction (cost model)")[0]
        if data is None:
            log.info("cost model: %s", source)
            return CostModel(), source
        log.info("cost model: %s", source)
        return CostModel.from_dict(data), source

    def _make_p2p(self, c):
        """The P2P transport where it can run (collective; the same outcome on every rank).

        Its windows hold ``D x cap`` rows: ``cap`` is the largest of ``max_tokens_per_rank``, the
        largest graph bucket and :data:`P2P_DEFAULT_ROWS` (per replica), so every decode-sized step
        and every graph step fits; larger steps go over NCCL (the plan says which). Returns the
        window's rows (0 without P2P) and records the reason in :meth:`info`.

        Over several nodes (real ones, or ``DPGATHER_P2P_NODES`` pretend ones) the transport runs
        inside each node and ``self._inter`` (the ranks at the same place of every node) carries
        the node blocks between them (docs/p2p.md, "Several nodes"); ``self._node_size`` is the
        ranks per node (all ranks on one node).
        """
        import os

        self._transport_reason = None
        self._node_size = self.topology.world_size
        want = c["transport"]
        T, D, A = self.topology.world_size, self.topology.dp_size, self.topology.attn_tp_size
        if want == "nccl":
            self._transport_reason = "transport='nccl' was asked for"
            return 0
        if T == 1:
            self._transport_reason = "one rank: nothing to move"
            return 0
        from dpgather.dist.p2p import CudaP2P, HostP2P, host_id, node_size, probe_p2p

        cuda = self._backend.name == "cuda"
        device = self._backend.device.id if cuda else None
        facts = self._sync.allgather_obj((host_id(), os.environ.get("DPGATHER_P2P_NODES", "")),
                                         "DpAttention construction (nodes)")
        L, reason = node_size([h for h, _ in facts], facts[0][1], A)
        ok = L > 0
        node_comm = self._private
        if ok and L < T:
            node_comm = self._private.Split(self.rank // L, self.rank % L)
        try:
            if ok:
                ok, reason = probe_p2p(node_comm, device, self.timeout_s, backend=self._backend.name)
                if L < T:
                    ok, reason = self._node_verdict(ok, reason, "P2P probe verdicts")
            if ok:
                buckets = c["graph_buckets"]
                cap = max(c["max_tokens_per_rank"] or 0, buckets[-1] if buckets else 0, P2P_DEFAULT_ROWS)
                cap = -(-cap // A) * A
                try:
                    self._p2p = (CudaP2P if cuda else HostP2P)(node_comm, D * cap * self._row_bytes,
                                                              self.timeout_s, device)
                except (ConfigError, BackendUnavailable) as e:  # the same verdict on every rank of the node
                    ok, reason = False, str(e)
                if L < T:
                    ok, reason = self._node_verdict(ok, reason, "P2P windows")
                if ok:
                    if L < T:
                        self._inter = self._tp.split(self.rank % L, self.rank // L)
                        self._node_size = L
                    return D * cap
                if self._p2p is not None:  # another node failed: every rank goes without P2P
                    self._p2p.close()
                    self._p2p = None
        finally:
            if node_comm is not self._private:
                node_comm.Free()
        self._transport_reason = f"P2P is not available: {reason}"
        if want == "p2p":
            raise ConfigError(f"transport='p2p' but {self._transport_reason}; use transport='auto' or 'nccl'")
        log.info("%s; the step's collectives go over %s", self._transport_reason, self._backend.name == "cuda"
                 and "NCCL" or "MPI")
        return 0

    def _node_verdict(self, ok, reason, what):
        """Each node decided ``(ok, reason)`` over its own ranks (whose messages number ranks within
        the node); one object exchange gives every rank the first failure, named by the global
        rank that saw it, or ``(True, "")``."""
        for r, (ok_r, reason_r) in enumerate(self._sync.allgather_obj(
                (ok, reason), f"DpAttention construction ({what})")):
            if not ok_r:
                return False, f"on the node of rank {r}: {reason_r}"
        return True, ""

    def _preallocate(self, tokens):
        """Reserve every role for ``tokens`` per replica; agreed, so every rank raises alike."""
        D, A, row = self.topology.dp_size, self.topology.attn_tp_size, self._row_bytes
        M = -(-tokens // A) * A
        buckets = self.planner.graph_buckets
        if buckets:
            M = max(M, buckets[-1])
        sizes = {"gathered": D * M * row, "staging": 2 * M * row + 1024, "combine": D * M * row + 1024,
                 "output": M * row, "logits": D * M * row}
        error = None
        try:
            for arena in self._arenas:
                for role, nbytes in sizes.items():
                    arena.reserve(role, nbytes)
        except (MemoryError, ValueError, OverflowError) as e:
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        except Exception as e:  # CuPy's OutOfMemoryError and friends
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        errors = [m for m in self._sync.allgather_obj(error, "DpAttention construction (preallocation)") if m]
        if errors:
            total = sum(sizes.values()) * len(self._arenas)
            raise ConfigError(
                f"max_tokens_per_rank={tokens} needs {total / 2**20:.1f} MiB of arenas per rank "
                f"({D} replicas x {M} rows x {row} bytes per row, {len(self._arenas)} micro-batch(es)), "
                "which could not be allocated: "
                + "; ".join(errors) + ". Lower max_tokens_per_rank or leave it None (grow on demand)")

    # -- the per-step sync ----------------------------------------------------------------
    def sync(self, batch: LocalBatch, micro_batch: int = 0) -> Plan:
        """Exchange this rank's batch with every rank (one host collective) and plan the step.

        Args:
            batch: this rank's :class:`LocalBatch`; the ``attn_tp_size`` ranks of a replica must
                pass equal batches.
            micro_batch: which micro-batch this plans, ``0 <= micro_batch < micro_batches``
                (every rank passes the same). The plan replaces that micro-batch's previous one
                and binds the calls made with it to that micro-batch's arenas; the other
                micro-batches' plans stay current.

        Returns:
            The step's :class:`Plan`, identical on every rank.

        Raises:
            InconsistentBatchError: the ranks of a replica disagree (on every rank).
            InputError: a rank passed an invalid batch or micro_batch, or a data-plane call since
                the previous ``sync()`` failed its checks on some rank (on every rank, naming the
                rank and the error; the outputs of those calls are invalid everywhere, this step
                is not planned, call ``sync()`` again).
            InconsistentStepError: ranks issued different calls or plans since the previous
                ``sync()``, called ``sync()`` a different number of times or for different
                micro-batches (on every rank; aborts).
            CollectiveTimeout: some rank did not reach ``sync`` within ``timeout_s``, or a device
                transfer of the previous step failed (aborts).
        """
        self._check_open()
        rec = self._record
        batch_error = None
        mb = micro_batch
        N = self.micro_batches
        try:
            if isinstance(mb, (bool, np.bool_)) or not isinstance(mb, (int, np.integer)) or not 0 <= mb < N:
                mb = -1
                raise InputError(
                    f"micro_batch must be an int in [0, {N}) (this DpAttention has micro_batches={N}), got "
                    f"{micro_batch!r}; pass " + ("micro_batch=0 (or construct DpAttention(micro_batches=K))"
                                                 if N == 1 else f"one of 0..{N - 1}"))
            mb = int(mb)
            if not isinstance(batch, LocalBatch):
                raise InputError(f"batch must be a dpgather.LocalBatch, got {batch!r}")
            self.planner.record(batch, out=rec[:RECORD_WIDTH])
        except Exception as e:
            batch_error = e
            rec[:RECORD_WIDTH] = 0  # magic 0 marks "this rank's batch failed"; field 1 says how
            rec[1] = 2 if isinstance(e, ConfigError) else 1
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        rec[_C_SEQ] = self._seq
        rec[_C_OPS] = self._ophash - (1 << 32) if self._ophash >= 1 << 31 else self._ophash
        rec[_C_NOPS] = self._nops
        rec[_C_STATUS] = self._status
        rec[_C_MB] = mb
        msg = self._status_msg
        if self._p2p is not None:
            code = self._p2p.error()  # a read of the pinned error word: no CUDA call, no sync
            if code:
                rec[_C_STATUS] = _ST_MISMATCH if code == 2 else _ST_DEVICE
                msg = f"the P2P transport reported error {code} on rank {self.rank} (1: a peer did not arrive " \
                      f"within timeout_s, 2: the ranks issued different operations)"
        self._ophash = self._nops = 0
        self._status, self._status_msg = _ST_OK, None
        try:
            table = self._sync.exchange(rec)
        except CollectiveTimeout as e:
            self.abort(f"sync timed out ({e})")
            raise
        ctl = table[:, RECORD_WIDTH:]
        expect = self._ctl_expect
        expect[0], expect[1], expect[2], expect[4] = rec[_C_SEQ], rec[_C_OPS], rec[_C_NOPS], mb  # status 0
        if (ctl != expect).any():  # a rank differs from this one, or reports a failure
            if (ctl[:, :4] != expect[:4]).any():
                self._step_failed(ctl, msg)
            mbs = ctl[:, 4]
            if (mbs >= 0).all():  # (an invalid micro_batch is an invalid batch: below)
                self.abort("ranks called sync() for different micro-batches")
                raise InconsistentStepError(
                    f"ranks called sync() for different micro-batches (micro_batch per rank: {mbs.tolist()}); "
                    "every rank must sync the same micro-batch at the same point. The DpAttention is aborted")
        if not table[:, 0].all():  # a zero magic: every rank sees it, so all raise the same class
            failed = np.flatnonzero(table[:, 0] == 0)
            msgs = self._sync.allgather_obj(None if batch_error is None else f"{type(batch_error).__name__}: {batch_error}",
                                            "sync (sharing an invalid batch's error)")
            if batch_error is not None:
                raise batch_error
            cls = ConfigError if (table[failed, 1] == 2).any() else InputError
            raise cls(f"rank(s) {failed.tolist()} passed an invalid batch to sync(); nothing was planned. "
                      f"rank {failed[0]}: {msgs[failed[0]]}")
        plan = self.planner.plan_table(table[:, :RECORD_WIDTH])
        self._prepare(plan, mb)
        if self._retired:
            self._release_retired()
        return plan

    def _step_failed(self, ctl, msg):
        """Raise the same error on every rank for a previous step that went wrong somewhere."""
        msgs = self._sync.allgather_obj(msg, "sync (sharing the previous step's errors)")
        T = ctl.shape[0]
        seq = ctl[:, 0].tolist()
        if len(set(seq)) > 1:
            self.abort("ranks called sync() a different number of times")
            raise InconsistentStepError(
                f"ranks called sync() a different number of times (sync count per rank: {seq}); "
                "every rank must call sync() once per step. The DpAttention is aborted")
        status = ctl[:, 3].tolist()
        bad = [r for r in range(T) if status[r]]
        detail = "; ".join(f"rank {r}: {msgs[r]}" for r in bad if msgs[r])
        if any(s == _ST_MISMATCH for s in status):
            self.abort(f"the ranks issued different operations ({detail})")
            raise InconsistentStepError(f"the ranks issued different operations in the previous step (the P2P "
                                        f"transport's signatures differ): {detail}. The DpAttention is aborted")
        if any(s == _ST_DEVICE for s in status):
            self.abort(f"a device transfer failed ({detail})")
            raise CollectiveTimeout(f"a device transfer of the previous step failed on rank(s) "
                                    f"{[r for r in bad if status[r] == _ST_DEVICE]}: {detail}. "
                                    "The DpAttention is aborted")
        if (ctl[:, 1] != ctl[0, 1]).any() or (ctl[:, 2] != ctl[0, 2]).any():
            calls = ctl[:, 2].tolist()
            self.abort("ranks issued different data-plane calls")
            raise InconsistentStepError(
                "in the previous step the ranks issued different data-plane calls (operation, plan, "
                f"contribution/reduce, dtype or width): calls per rank {calls}, call hashes "
                f"{[int(h) & 0xFFFFFFFF for h in ctl[:, 1].tolist()]}"
                + (f"; {detail}" if detail else "")
                + ". Every rank must issue the same calls with the plan of its latest sync(). "
                  "The DpAttention is aborted (mismatched collectives may be pending)")
        raise InputError(f"a data-plane call of the previous step failed its checks on rank(s) {bad}: "
                         f"{detail}. That step's outputs are invalid on every rank; this sync() planned "
                         "nothing: call sync() again")

    def _prepare(self, plan, mb=0):
        """Layouts and descriptor of ``plan`` for this rank's micro-batch ``mb``; uploads the
        descriptor once (into the micro-batch's own ring of device descriptors)."""
        st = _Step()
        st.plan = plan
        st.mb = mb
        st.arena = self._arenas[mb]
        st.p2p = plan.transport == "p2p"
        fp = plan.fingerprint
        hit = self._layouts.get(fp)
        if hit is None:
            d, a = self.dp_rank, self.attn_tp_rank
            hidden, logits = Layout.hidden(plan, d, a), Layout.logits(plan, d, a)
            sigs = {"gather_replicate": signature(OP_GATHER, fp, 0, self._dtype_code, self.hidden_size),
                    "gather_partial": signature(OP_GATHER, fp, 1, self._dtype_code, self.hidden_size),
                    "combine": signature(OP_SCATTER, fp, 1, self._dtype_code, self.hidden_size),
                    "logits": signature(OP_GATHER_LOGITS, fp, 0, self._dtype_code, self.hidden_size)}
            desc = np.zeros(self._desc_layout.size, dtype=np.int64)
            self._desc_layout.write(desc, plan, hidden, logits, self.rank, sigs)
            desc.flags.writeable = False
            if len(self._layouts) > 256:
                self._layouts.clear()
            hit = self._layouts[fp] = (hidden, logits, sigs, desc, {})
        st.hidden, st.logits, st.sigs, st.desc_host, st.call_sigs = hit
        prev = self._steps[mb]
        if prev is not None and prev.plan.fingerprint == fp:
            st.desc = prev.desc  # same layout: the device copy is already right
        else:
            st.desc = self._backend.upload(st.desc_host, ring=mb)
        if prev is not None:
            self._prev_fp[mb] = prev.plan.fingerprint
        self._steps[mb] = st
        self._last_mb = mb
        return st

    def _retire(self, buf):
        """An arena's replaced buffer (its role grew). While every operation ran on one stream the
        memory pool reuses it in stream order: drop it. Otherwise keep it until an event recorded
        now -- after the chain's previous operations -- has completed."""
        chain = self._plane.chain
        if not chain.chained:
            return
        s = self._backend.current_stream()
        if s.is_capturing():  # no event can be queried later: keep it until close()
            self._retired.append((None, buf))
            return
        ev = self._events.get()
        ev.record(s)
        self._retired.append((ev, buf))

    def _release_retired(self):
        """Drop the retired buffers whose event completed (a query each: no synchronisation)."""
        keep = []
        for ev, buf in self._retired:
            if ev is not None and ev.done:
                self._events.put(ev)
            else:
                keep.append((ev, buf))
        self._retired = keep

    # -- the checks of every call ---------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise InputError("this DpAttention is closed")
        if self._aborted is not None:
            raise CollectiveTimeout(f"this DpAttention was aborted: {self._aborted}; create a new one on every rank")

    def _current(self, plan):
        """The current step for ``plan`` (of the micro-batch whose latest ``sync()`` returned it,
        or an equal plan), or raise InputError (a plan of another step)."""
        for st in self._steps:
            if st is not None and st.plan is plan:
                return st
        if not isinstance(plan, Plan):
            raise InputError(f"plan must be a dpgather.Plan (from sync()), got {plan!r}")
        steps = [st for st in self._steps if st is not None]
        if not steps:
            raise InputError("no step is open: call sync() first and pass the plan it returned")
        same = [st for st in steps if plan.fingerprint == st.plan.fingerprint
                and plan.dp_size == self.topology.dp_size and plan.attn_tp_size == self.topology.attn_tp_size]
        if len(same) == 1:
            return same[0]
        if same:
            raise InputError(
                f"plan equals the current plans of micro-batches {[st.mb for st in same]}, so it does not say "
                "which one it is for: pass the Plan object returned by sync(batch, micro_batch=i)")
        if self.micro_batches == 1:
            raise InputError(
                f"plan is not the plan of this step (fingerprint {plan.fingerprint:#x}, this step "
                f"{steps[0].plan.fingerprint:#x}): pass the plan returned by the latest sync()")
        stale = [i for i, fp in enumerate(self._prev_fp) if fp == plan.fingerprint]
        raise InputError(
            f"plan is not the current plan of any micro-batch (fingerprint {plan.fingerprint:#x}"
            + (f", an earlier plan of micro-batch {stale[0]}" if stale else "")
            + "): pass the plan returned by the latest sync(batch, micro_batch=i) of the micro-batch")

    def _lookup(self, plan):
        """The step a call with ``plan`` issues collectives for, without raising: the step of
        ``plan``; for a plan that fails its checks, the step its peers most likely use (the
        micro-batch an earlier plan with its fingerprint belonged to, else the latest one synced),
        so the failing rank still issues the step's collectives with zero rows. None before the
        first sync()."""
        steps = self._steps
        for st in steps:
            if st is not None and st.plan is plan:
                return st
        if len(steps) == 1:
            return steps[0]
        fp = getattr(plan, "fingerprint", None) if isinstance(plan, Plan) else None
        if fp is not None:
            for st in steps:
                if st is not None and st.plan.fingerprint == fp:
                    return st
            for i, prev in enumerate(self._prev_fp):
                if prev == fp and steps[i] is not None:
                    return steps[i]
        return steps[self._last_mb]

    def _rows(self, x, name, width=None):
        """``x`` as a C-contiguous 2-D backend array in the configured storage (no copy)."""
        arr, _ = self._backend.wrap(x, name)
        if arr.dtype != self._storage:
            if self.dtype == "bfloat16" and arr.dtype == BF16_STORAGE:
                arr = arr.view(self._storage)  # the documented bfloat16 storage on NumPy too
            else:
                raise InputError(_dtype_message(name, arr.dtype, self.dtype))
        if arr.ndim != 2:
            raise InputError(f"{name} must be 2-D [rows, {width or 'width'}], got shape {tuple(arr.shape)}")
        if width is not None and arr.shape[1] != width:
            raise InputError(f"{name} must have {width} columns (hidden_size), got shape {tuple(arr.shape)}")
        if not arr.flags.c_contiguous:
            raise InputError(f"{name} must be C-contiguous, got shape {tuple(arr.shape)} with strides "
                             f"{tuple(arr.strides)}; pass a contiguous copy")
        return arr

    def _any_rows(self, a, name):
        arr, _ = self._backend.wrap(a, name)
        if arr.dtype.name not in DTYPES and arr.dtype.name not in ("uint16", "int16", "float64"):
            raise InputError(f"{name} has unsupported dtype {arr.dtype}")
        if arr.ndim != 2:
            raise InputError(f"{name} must be 2-D [rows, width], got shape {tuple(arr.shape)}")
        if not arr.flags.c_contiguous:
            raise InputError(f"{name} must be C-contiguous; pass a contiguous copy")
        return arr

    def _no_alias(self, a, name, roles, st):
        """``a`` must not overlap the buffers of ``roles`` of ``st``'s micro-batch (the call writes
        them)."""
        role = st.arena.contains(self._backend.ptr(a), a.nbytes)
        if role in roles:
            where = f" of micro-batch {st.mb}" if self.micro_batches > 1 else ""
            raise InputError(f"{name} overlaps dpgather's '{role}' buffer{where}, which this call writes; "
                             "pass a copy (views returned earlier are reused by later calls)")

    def _overlap(self, a, b):
        be = self._backend
        pa, pb = be.ptr(a), be.ptr(b)
        return a.nbytes > 0 and b.nbytes > 0 and pa < pb + b.nbytes and pb < pa + a.nbytes

    def _call(self, op, plan, flag, width, check, run, dummy=None, extra=0):
        """One data-plane call: record it in the step's hash, check, then run (see ``strict``).

        ``check()`` validates and returns the arguments of ``run(*args)``. On an ``InputError``
        the rank still issues the step's collectives through ``dummy(step)`` (zero rows; outputs
        only in dpgather's own buffers), records the failure for the next ``sync()`` and raises.
        ``extra``: a 32-bit value mixed into the call's signature (what ``plan`` does not say).
        """
        if self._closed or self._aborted is not None:
            self._check_open()
        st = self._lookup(plan)
        # What this rank issues: the step's collectives (a call with another plan fails its checks
        # and issues the collectives of the step its peers most likely use, with zero rows), so
        # ranks that issue the same collectives hash alike whatever a failing call was passed. The
        # micro-batch is part of the signature: the ranks must interleave micro-batches alike.
        if st is None:
            sig = signature(op, 0, flag, self._dtype_code, width)
        else:
            cache = st.call_sigs
            key = (op, flag, width, st.mb)
            sig = cache.get(key)
            if sig is None:
                sig = cache[key] = signature(op, st.plan.fingerprint, flag + (st.mb << 8), self._dtype_code, width)
        if extra:
            sig = ((sig ^ (extra & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
        self._ophash = ((self._ophash ^ sig) * 0x01000193) & 0xFFFFFFFF
        self._nops += 1
        error = None
        try:
            args = check()
        except InputError as e:
            error = e
        if self.strict:
            self._agree_call(op, sig, error)
        if error is None:
            try:
                return run(*args)
            except (CollectiveTimeout, InconsistentStepError) as e:
                self.abort(f"{_OP_NAMES[op]} failed ({e})")
                raise
            except InputError as e:  # a buffer could not grow: raised before any collective
                error = e
        self._status = _ST_INPUT
        self._status_msg = f"{type(error).__name__}: {error}"
        if dummy is not None and st is not None:
            try:
                dummy(st)
            except InputError:
                pass  # the dummy could not run either (e.g. out of memory): peers time out
            except CollectiveTimeout as e:
                self.abort(f"{_OP_NAMES[op]} timed out ({e})")
                raise
        raise error

    def _agree_call(self, op, sig, error):
        """strict=True: one small exchange per call; every rank raises if any rank failed or the
        ranks disagree on the call."""
        rec = np.zeros(SYNC_WIDTH, dtype=np.int32)
        rec[0] = 0 if error is None else 1
        rec[1] = sig - (1 << 32) if sig >= 1 << 31 else sig
        with _Guard(self, _OP_NAMES[op]):
            table = self._sync.exchange(rec)
        bad = np.flatnonzero(table[:, 0]).tolist()
        mismatch = bool((table[:, 1] != table[0, 1]).any())
        if not bad and not mismatch:
            return
        msgs = self._sync.allgather_obj(None if error is None else f"{type(error).__name__}: {error}",
                                        f"{_OP_NAMES[op]} (strict agreement)")
        if bad:
            if error is not None:
                raise error
            raise InputError(f"{_OP_NAMES[op]}() failed its checks on rank(s) {bad}: "
                             + "; ".join(f"rank {r}: {msgs[r]}" for r in bad) + ". Nothing was moved")
        raise InconsistentStepError(
            f"{_OP_NAMES[op]}(): the ranks called different operations or passed different plans, "
            f"contributions, dtypes or widths (call signatures {[int(v) & 0xFFFFFFFF for v in table[:, 1]]}). "
            "Nothing was moved")

    # -- asynchronous calls ---------------------------------------------------------------
    def _async(self, name, st, s, work, refs, role):
        """Run ``work()`` (one call's copies and collectives) on stream ``s`` after the work
        enqueued so far on the current stream, and return its :class:`AsyncHandle`.

        ``refs``: the caller's arrays the handle keeps until ``wait()``; ``role``: the arena role
        the result is a view of (None: the caller's ``out=``). On the host backend (``s`` None)
        ``work()`` completes here.
        """
        arena = st.arena if role is not None else None
        if s is None:
            return AsyncHandle(self, name, st.mb, st.plan, None, None, work(), refs, arena, role)
        chain = self._plane.chain
        if not chain.chained:
            chain.start()
        events = self._events
        cur = self._backend.current_stream()
        if cur.ptr != s.ptr:  # the inputs (and the sync's descriptor upload) were enqueued on cur
            ev = events.get()
            ev.record(cur)
            s.wait_event(ev)
            events.put(ev)  # safe: the wait above was issued with the current record
        with s:
            res = work()
        done = events.get()
        done.record(s)
        return AsyncHandle(self, name, st.mb, st.plan, s, done, res, refs, arena, role)

    @staticmethod
    def _on(s, fn):
        """``fn()`` with ``s`` as the current stream (``s`` None: as it is)."""
        if s is None:
            return fn()
        with s:
            return fn()

    # -- gather ---------------------------------------------------------------------------
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
        return self._gather(x, plan, contribution, False, None)

    def gather_async(self, x: Any, plan: Plan, contribution: Literal["replicate", "partial"] = "replicate",
                     stream: Any = None) -> AsyncHandle:
        """:meth:`gather` enqueued on ``stream``; returns an :class:`AsyncHandle` at once.

        Args:
            x, plan, contribution: as for :meth:`gather`. The handle holds ``x`` until ``wait()``.
            stream: where the gather runs (CUDA backend): None (the current stream), a
                ``cupy.cuda.Stream`` / ``ExternalStream``, a raw ``cudaStream_t`` int or a
                ``torch.cuda.Stream``. It first waits for the work enqueued so far on the current
                stream (which produced ``x``), then runs after the previous gather/combine of this
                DpAttention, whatever stream that used. Ignored on the host backend, where the
                gather completes before this returns.

        Returns:
            A handle: ``h.wait(stream=None)`` orders ``stream`` after the gather and returns the
            result, the view :meth:`gather` returns (also ``h.result`` after ``wait()``).
            docs/overlap.md has the rules.
        """
        return self._gather(x, plan, contribution, True, stream)

    def _gather(self, x, plan, contribution, asynchronous, stream):
        partial = contribution == "partial"
        box = [None]  # the call's stream once checked (asynchronous calls on CUDA)

        def check():
            st = self._current(plan)
            if contribution not in ("replicate", "partial"):
                raise InputError(f"contribution must be 'replicate' or 'partial', got {contribution!r}")
            xr = self._rows(x, "x", self.hidden_size)
            self._no_alias(xr, "x", ("gathered", "staging"), st)
            if asynchronous:
                box[0] = self._backend.stream(stream, "stream")
            return st, xr

        def work(st, xr):
            return self._plane.gather(st.arena, xr, st.hidden, st.desc, partial, st.p2p)

        if asynchronous:
            def run(st, xr):
                return self._async("gather", st, box[0], lambda: work(st, xr), (x,), "gathered")
        else:
            run = work

        def dummy(st):
            self._on(box[0], lambda: self._plane.gather(st.arena, self._empty, st.hidden, st.desc, partial, st.p2p))

        # the flag hashed is what this rank issues (an invalid contribution issues "replicate")
        return self._call(OP_GATHER, plan, int(partial), self.hidden_size, check, run, dummy)

    def gather_logits(self, h: Any, plan: Plan) -> Any:
        """Replicate-gather the rows that reach the LM head over the logits layout.

        Args:
            h: ``[rows, hidden_size]`` pruned hidden states of this replica (replicated over
                attn_tp), in the configured dtype.

        Returns:
            ``[plan.logits_rows, hidden_size]`` view of the micro-batch's ``logits`` arena.
        """
        return self._gather_logits(h, plan, False, None)

    def gather_logits_async(self, h: Any, plan: Plan, stream: Any = None) -> AsyncHandle:
        """:meth:`gather_logits` enqueued on ``stream`` (as :meth:`gather_async`); returns an
        :class:`AsyncHandle` whose result is the view :meth:`gather_logits` returns."""
        return self._gather_logits(h, plan, True, stream)

    def _gather_logits(self, h, plan, asynchronous, stream):
        box = [None]

        def check():
            st = self._current(plan)
            hr = self._rows(h, "h", self.hidden_size)
            self._no_alias(hr, "h", ("logits", "staging"), st)
            if asynchronous:
                box[0] = self._backend.stream(stream, "stream")
            return st, hr

        def work(st, hr):
            return self._plane.gather(st.arena, hr, st.logits, st.desc, False, st.p2p, "logits")

        if asynchronous:
            def run(st, hr):
                return self._async("gather_logits", st, box[0], lambda: work(st, hr), (h,), "logits")
        else:
            run = work

        def dummy(st):
            self._on(box[0], lambda: self._plane.gather(st.arena, self._empty, st.logits, st.desc, False, st.p2p,
                                                        "logits"))

        return self._call(OP_GATHER_LOGITS, plan, 0, self.hidden_size, check, run, dummy)

    # -- scatter --------------------------------------------------------------------------
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
        return self._scatter(Y, plan, reduce, out, False, None)

    def scatter_async(self, Y: Any, plan: Plan, reduce: bool = True, out: Any = None,
                      stream: Any = None) -> AsyncHandle:
        """:meth:`scatter` enqueued on ``stream`` (as :meth:`gather_async`: after the current
        stream's work so far, which produced ``Y``); returns an :class:`AsyncHandle` whose result
        is what :meth:`scatter` returns. The handle holds ``Y`` and ``out`` until ``wait()``."""
        return self._scatter(Y, plan, reduce, out, True, stream)

    def _scatter(self, Y, plan, reduce, out, asynchronous, stream):
        valid = isinstance(reduce, (bool, np.bool_))
        flag = int(reduce) if valid else 1  # an invalid reduce issues the reduction (dummy below)
        box = [None]

        def check():
            st = self._current(plan)
            if not valid:
                raise InputError(f"reduce must be True or False, got {reduce!r}")
            Yr = self._rows(Y, "Y", self.hidden_size)
            if Yr.shape[0] < st.hidden.total:
                raise InputError(f"Y must have at least plan.gathered_rows={st.hidden.total} rows, got {Yr.shape[0]}")
            self._no_alias(Yr, "Y", ("combine", "output"), st)
            o = None
            if out is not None:
                o = self._rows(out, "out", self.hidden_size)
                self._no_alias(o, "out", ("combine", "staging"), st)
                if self._overlap(Yr, o):
                    raise InputError("out must not alias Y (the input is never written)")
            if asynchronous:
                box[0] = self._backend.stream(stream, "stream")
            return st, Yr, o

        def work(st, Yr, o):
            y = self._plane.combine(st.arena, Yr, st.hidden, st.desc, bool(flag), o, st.p2p)
            L = st.hidden
            if o is None and L.slot != L.n:  # this replica's own rows (a cached view, no copy)
                y = st.arena.view("output", L.n, Yr.shape[1], Yr.dtype)
            return y

        if asynchronous:
            def run(st, Yr, o):
                return self._async("scatter", st, box[0], lambda: work(st, Yr, o), (Y, out),
                                   "output" if o is None else None)
        else:
            run = work

        def dummy(st):
            if flag:
                def zeros():
                    Z = st.arena.view("staging", st.hidden.total, self.hidden_size, self._storage)
                    self._backend.zero(Z)
                    self._plane.combine(st.arena, Z, st.hidden, st.desc, True, None, st.p2p)

                self._on(box[0], zeros)

        return self._call(OP_SCATTER, plan, flag, self.hidden_size, check, run, dummy)

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
        return self._scatter_logits(L_rows, plan, out, False, None)

    def scatter_logits_async(self, L_rows: Any, plan: Plan, out: Any = None, stream: Any = None) -> AsyncHandle:
        """:meth:`scatter_logits` enqueued on ``stream`` (as :meth:`gather_async`; a local copy,
        no collective); returns an :class:`AsyncHandle` whose result is what
        :meth:`scatter_logits` returns."""
        return self._scatter_logits(L_rows, plan, out, True, stream)

    def _scatter_logits(self, L_rows, plan, out, asynchronous, stream):
        box = [None]

        def check():
            st = self._current(plan)
            Lr = self._any_rows(L_rows, "L")
            if Lr.shape[0] < st.logits.total:
                raise InputError(f"L must have at least plan.logits_rows={st.logits.total} rows, got {Lr.shape[0]}")
            self._no_alias(Lr, "L", ("logits_output",), st)
            o = None
            if out is not None:
                o = self._any_rows(out, "out")
                if o.dtype != Lr.dtype or o.shape[1] != Lr.shape[1]:
                    raise InputError(f"out must be [rows, {Lr.shape[1]}] of dtype {Lr.dtype}, got "
                                     f"{tuple(o.shape)} {o.dtype}")
                if self._overlap(Lr, o):
                    raise InputError("out must not alias L (the input is never written)")
            if asynchronous:
                box[0] = self._backend.stream(stream, "stream")
            return st, Lr, o

        def work(st, Lr, o):
            if o is not None:
                return self._plane.unpack_logits(Lr, o, st.desc)
            L = st.logits
            y = st.arena.view("logits_output", L.slot, Lr.shape[1], Lr.dtype)
            self._plane.unpack_logits(Lr, y, st.desc)
            return y if L.slot == L.n else st.arena.view("logits_output", L.n, Lr.shape[1], Lr.dtype)

        if asynchronous:
            def run(st, Lr, o):
                return self._async("scatter_logits", st, box[0], lambda: work(st, Lr, o), (L_rows, out),
                                   "logits_output" if o is None else None)
        else:
            run = work

        return self._call(OP_SCATTER_LOGITS, plan, 0, 0, check, run)

    # -- MoE routing mask -----------------------------------------------------------------
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

        def check():
            st = self._current(plan)
            ids, _ = self._backend.wrap(topk_ids, "topk_ids")
            if ids.dtype not in (np.int32, np.int64):
                raise InputError(f"topk_ids must be int32 or int64, got {ids.dtype}")
            if ids.ndim != 2 or not ids.flags.c_contiguous:
                raise InputError(f"topk_ids must be a C-contiguous 2-D [rows, k] array, got shape {tuple(ids.shape)}")
            if ids.shape[0] < st.hidden.total:
                raise InputError(f"topk_ids must have at least plan.gathered_rows={st.hidden.total} rows, "
                                 f"got {ids.shape[0]}")
            if isinstance(fill, (bool, np.bool_)) or not isinstance(fill, (int, np.integer)):
                raise InputError(f"fill must be an int, got {fill!r}")
            info = np.iinfo(ids.dtype)
            if not info.min <= int(fill) <= info.max:
                raise InputError(f"fill={fill} does not fit topk_ids' dtype {ids.dtype} [{info.min}, {info.max}]")
            return st, ids

        def run(st, ids):
            self._plane.mask(ids, st.desc, int(fill))
            return topk_ids

        return self._call(OP_MASK, plan, 0, 0, check, run)

    # -- graphs ---------------------------------------------------------------------------
    def graph_runner(self, fn: Callable[[Any], Any], contribution: Literal["replicate", "partial"] = "replicate",
                     reduce: bool = True, micro_batches: int = 1) -> "GraphRunner":
        """Capture ``pack -> gather -> fn(G) -> combine -> unpack`` for every graph bucket.

        Returns a :class:`~dpgather.GraphRunner` whose ``run(x, plan)`` replays the bucket of
        ``plan`` (``plan.graph`` must be True) with no per-step allocation. On the host backend it
        runs eagerly with the same API. Closed by :meth:`close` (graphs are destroyed before the
        communicators).

        ``micro_batches=N > 1`` captures the *overlapped* step of ``N`` micro-batches instead: one
        graph per bucket in which the gathers and combines run on a second stream forked from the
        capture stream, each micro-batch's ``fn`` on the capture stream overlapping the next
        micro-batch's gather and the previous one's combine; ``run(xs, plans)`` takes one input
        and one plan (from ``sync(batch, micro_batch=i)``) per micro-batch. docs/overlap.md.
        """
        self._check_open()
        from ._graph import GraphRunner, RunnerContext

        ctx = RunnerContext(plane=self._plane, backend=self._backend, planner=self.planner,
                            descriptor=self._desc_layout, rank=self.rank, dp_rank=self.dp_rank,
                            attn_tp_rank=self.attn_tp_rank, hidden_size=self.hidden_size,
                            storage=self._storage, rows=self._rows, current=self._current, call=self._call,
                            guard=lambda op: _Guard(self, op), empty=self._empty)
        runner = GraphRunner(ctx, fn, contribution=contribution, reduce=reduce, micro_batches=micro_batches)
        self._runners.append(runner)
        return runner

    # -- bookkeeping ----------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        """What this DpAttention runs on, as a dict: ``backend``, ``world_size``,
        ``attn_tp_size``, ``dtype``, ``hidden_size``, ``policy``, ``strict``, ``sync`` (the
        per-step exchange: ``"shm"`` or ``"mpi"``, known after the first ``sync()``), ``transport``
        (``"p2p"`` where available, else ``"nccl"``/``"mpi"``), ``transport_reason`` (why P2P is
        not used, when it is not), ``p2p_rows`` (rows the P2P windows hold per collective),
        ``p2p_node_size`` (ranks of one P2P group: the world size on one node; with P2P over
        several nodes, the ranks per node, NCCL carrying the node blocks between them; 0
        without P2P), ``micro_batches``, ``host_collectives`` (host collectives issued so far:
        the per-step sync's exchanges plus the agreements; one per step on the default path) and
        ``cost_model`` (where the planner's constants come from: given, calibrated with the
        cache file, or defaults)."""
        return {
            "backend": self.backend, "world_size": self.topology.world_size,
            "attn_tp_size": self.topology.attn_tp_size, "dtype": self.dtype,
            "hidden_size": self.hidden_size, "policy": self.planner.policy, "strict": self.strict,
            "sync": self._sync.transport if self._sync is not None else None,
            "transport": "p2p" if self._p2p is not None else ("nccl" if self.backend == "cuda" else "mpi"),
            "transport_reason": self._transport_reason,
            "p2p_rows": self.planner.p2p_rows,
            "p2p_node_size": self._node_size if self._p2p is not None else 0,
            "host_collectives": self._sync.host_collectives if self._sync is not None else 0,
            "cost_model": self._cost_source,
            "micro_batches": self.micro_batches,
        }

    def memory_stats(self, micro_batch: Optional[int] = None) -> Dict[str, Dict[str, int]]:
        """Arena usage per role: ``reserved_bytes``, ``peak_view_bytes``, ``allocations``,
        ``requests``; plus ``total``. Summed over the micro-batches' arenas, or of one
        (``micro_batch=i``)."""
        if micro_batch is not None:
            N = self.micro_batches
            if isinstance(micro_batch, (bool, np.bool_)) or not isinstance(micro_batch, (int, np.integer)) \
                    or not 0 <= micro_batch < N:
                raise InputError(f"micro_batch must be None or an int in [0, {N}), got {micro_batch!r}")
            return self._arenas[int(micro_batch)].stats()
        if len(self._arenas) == 1:
            return self._arena.stats()
        out = None
        for arena in self._arenas:
            st = arena.stats()
            if out is None:
                out = st
                continue
            for role, v in st.items():
                acc = out[role]
                for k, n in v.items():
                    acc[k] += n
        return out

    def wait(self, stream: Any = None) -> None:
        """Block until this rank's data-plane work on ``stream`` finished, within ``timeout_s``
        (the CUDA backend's collectives are asynchronous; the host backend's are not)."""
        self._check_open()
        with _Guard(self, "wait"):
            for c in (self._tp, self._attn, self._inter):
                if c is not None:
                    c.wait(stream)

    def abort(self, reason: str = "abort() was called") -> None:
        """Abort the communicators (local, immediate) and refuse further use on this rank
        (the P2P transport's kernels already refuse once its error word is set)."""
        if self._aborted is None:
            self._aborted = reason
            log.warning("DpAttention aborted: %s", reason)
        for c in (self._inter, self._attn, self._tp):
            if c is not None:
                try:
                    c.abort()
                except Exception:
                    pass

    def close(self) -> None:
        """Release graphs, arenas, communicators and the sync, in that order. Local (it never waits
        for a peer, so it is safe after any error) and idempotent."""
        if self._closed:
            return
        self._closed = True
        self._steps = [None] * len(self._steps) if getattr(self, "_steps", None) else []
        for runner in self._runners:
            runner.close()
        self._runners = []
        if self._p2p is not None:  # after the graphs that captured its kernel, before the buffers
            self._p2p.close()
        for arena in self._arenas:
            arena.release()
        self._retired = []
        for c in (self._inter, self._attn, self._tp):
            if c is not None:
                c.close()
        self._inter = self._attn = self._tp = None
        if self._backend is not None:
            self._backend.close()
        if self._sync is not None:
            self._sync.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"DpAttention(rank={getattr(self, 'rank', '?')}, {getattr(self, 'topology', '')}, "
                f"hidden_size={getattr(self, 'hidden_size', '?')}, dtype={getattr(self, 'dtype', '?')}, "
                f"backend={getattr(self, 'backend', None)})")


_OP_NAMES = {OP_GATHER: "gather", OP_GATHER_LOGITS: "gather_logits", OP_SCATTER: "scatter",
             OP_SCATTER_LOGITS: "scatter_logits", OP_MASK: "mask_topk_ids", OP_GRAPH: "GraphRunner.run"}


def _dtype_message(name, got, logical):
    hint = ""
    if logical == "bfloat16":
        hint = ("; bfloat16 data is ml_dtypes.bfloat16 or uint16 storage on the host backend, uint16 "
                "storage (or a torch bfloat16 tensor) on the CUDA backend"
                + ("; if these int16 values are bfloat16 bits, pass x.view(uint16)" if str(got) == "int16" else ""))
    return f"{name} must have dtype {logical} (this DpAttention's dtype), got {got}{hint}"


# -- configuration: local canonicalisation and the agreement ---------------------------------------

def _canonical_config(world_size, attn_tp_size, hidden_size, dtype, backend, spec, policy, graph_buckets,
                      max_tokens_per_rank, timeout_s, cost, strict, transport, micro_batches=1):
    """``(canonical values, {field: error message})`` of the constructor's arguments on this rank.

    Nothing raises: every rank exchanges both, so a value that is invalid on one rank only makes
    every rank raise the same ConfigError.
    """
    import dpgather

    canon = {"version": dpgather.__version__, "world_size": int(world_size)}
    errors = {}

    def field(key, fn, raw):
        try:
            canon[key] = fn(raw)
        except Exception as e:
            errors[key] = f"{key}={raw!r}: {e}"
            canon[key] = f"invalid {raw!r}"

    def pos_int(v, what):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{what} must be a positive int")
        return int(v)

    field("attn_tp_size", lambda v: pos_int(v, "attn_tp_size"), attn_tp_size)

    def micro_fn(v):
        v = pos_int(v, "micro_batches")
        if v > MAX_MICRO_BATCHES:
            raise ValueError(f"micro_batches must be at most {MAX_MICRO_BATCHES} (each has its own arenas)")
        return v

    field("micro_batches", micro_fn, micro_batches)
    field("hidden_size", lambda v: pos_int(v, "hidden_size"), hidden_size)
    field("dtype", lambda v: normalize_dtype(v, error=ValueError), dtype)
    field("backend", lambda v: v if v in ("auto", "host", "cuda") else _raise(
        "backend must be 'auto', 'host' or 'cuda'"), backend)
    field("policy", lambda v: v if isinstance(v, str) and v in POLICIES else _raise(f"policy must be one of {POLICIES}"), policy)
    field("transport", lambda v: v if isinstance(v, str) and v in TRANSPORTS else _raise(
        f"transport must be one of {TRANSPORTS}"), transport)

    def spec_fn(v):
        if v is not None and not isinstance(v, SpecConfig):
            raise ValueError("spec must be a dpgather.SpecConfig or None")
        canon["spec_obj"] = v
        return repr(v)

    field("spec", spec_fn, spec)

    def buckets_fn(v):
        if v is None:
            return ()
        if isinstance(v, (str, bytes)):
            raise ValueError("graph_buckets must be an iterable of positive ints (or None)")
        out = tuple(sorted(set(pos_int(b, "every graph bucket") for b in v)))
        for b in out:
            if b >= 2**31:
                raise ValueError(f"graph buckets must be < 2**31 (the per-step record is int32), got {b}")
        return out

    field("graph_buckets", buckets_fn, graph_buckets)

    def max_tokens_fn(v):
        if v is None:
            return None
        v = pos_int(v, "max_tokens_per_rank")
        if v >= 2**31:
            raise ValueError("max_tokens_per_rank must be < 2**31 (the per-step record is int32)")
        return v

    field("max_tokens_per_rank", max_tokens_fn, max_tokens_per_rank)

    def timeout_fn(v):
        if isinstance(v, (bool, np.bool_)) or v is None:
            raise ValueError("timeout_s must be a positive number of seconds")
        f = float(v)
        if not f > 0:  # also NaN
            raise ValueError("timeout_s must be a positive number of seconds (float('inf'): no limit)")
        return 0.0 if f == float("inf") else f

    field("timeout_s", timeout_fn, timeout_s)

    def cost_fn(v):
        if v is None:
            canon["cost_model"] = None
            return CostModel().to_dict()
        if not isinstance(v, CostModel):
            raise ValueError("cost must be a dpgather.CostModel or None")
        canon["cost_model"] = v
        return v.to_dict()

    field("cost", cost_fn, cost)
    field("strict", lambda v: v if isinstance(v, (bool, np.bool_)) else _raise("strict must be True or False"), strict)
    if "strict" in canon:
        canon["strict"] = bool(canon["strict"]) if "strict" not in errors else canon["strict"]
    if "attn_tp_size" not in errors and int(world_size) % canon["attn_tp_size"]:
        errors["attn_tp_size"] = (f"attn_tp_size={attn_tp_size!r} must divide the number of ranks "
                                  f"{world_size}")
    if "graph_buckets" not in errors and "attn_tp_size" not in errors:
        bad = [b for b in canon["graph_buckets"] if b % canon["attn_tp_size"]]
        if bad:
            errors["graph_buckets"] = f"graph_buckets={graph_buckets!r}: {bad} are not multiples of attn_tp_size={attn_tp_size}"
    return canon, errors


def _raise(msg):
    raise ValueError(msg)


_PRIVATE_KEYS = ("spec_obj", "cost_model")


def _raise_if_disagree(everyone):
    """Raise one ConfigError, the same on every rank, for invalid or differing configurations."""
    errors = [(r, key, msg) for r, (_, errs) in enumerate(everyone) for key, msg in sorted(errs.items())]
    if errors:
        by_msg = {}
        for r, key, msg in errors:
            by_msg.setdefault(msg, []).append(r)
        raise ConfigError("invalid DpAttention arguments: " + "; ".join(
            f"{msg} (rank{'s' if len(rs) > 1 else ''} {rs if len(rs) > 1 else rs[0]})" for msg, rs in by_msg.items()))
    keys = list(everyone[0][0])
    diffs = []
    for key in keys:
        values = {}
        for r, (cfg, _) in enumerate(everyone):
            values.setdefault(repr(cfg.get(key)), []).append(r)
        if len(values) > 1:
            diffs.append(f"{key}: " + "; ".join(f"{v} on ranks {rs}" for v, rs in values.items()))
    if diffs:
        raise ConfigError("ranks were configured differently: " + " | ".join(diffs)
                          + ". Every rank must construct DpAttention with the same arguments")


# -- closing at exit ---------------------------------------------------------------------------------

_LIVE = weakref.WeakSet()
_HOOKED = False


def _close_all():
    for dp in list(_LIVE):
        try:
            dp.close()
        except Exception:
            pass


def _register_at_exit(dp):
    """Close every live DpAttention at interpreter exit, before mpi4py finalizes MPI (atexit runs
    handlers in reverse order and mpi4py registered its own when MPI was imported). Closing is
    local, so a rank whose peers are gone exits promptly."""
    global _HOOKED
    _LIVE.add(dp)
    if not _HOOKED:
        atexit.register(_close_all)
        _HOOKED = True
