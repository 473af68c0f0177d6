"""``DpAttention``: the per-step data plane of DP attention (DESIGN sections 4-6).

One object per process (one rank of the TP group). Each step::

    plan = dp.sync(batch)                               # one host all-gather + plan
    g = dp.gather(x, plan, contribution="partial")      # [plan.gathered_rows, H] on every rank
    y = dp.scatter(mlp(g), plan, reduce=True)           # [plan.slot_rows[own], H]

The algorithm below is written once for both backends; the backend supplies arrays, kernels
and the communicator. Every decision that selects a collective depends only on the plan and
the configuration (identical on every rank); per-rank data (row counts, ``out=`` shapes) only
changes local copies.
"""

import atexit
import weakref

import numpy as np

from dpgather.core import (
    POLICIES,
    CollectiveTimeout,
    ConfigError,
    CostModel,
    InputError,
    LocalBatch,
    PaddingMode,
    Plan,
    Planner,
    RECORD_WIDTH,
    SpecConfig,
    Topology,
)

from ._arena import Arena
from ._backends import make_backend, normalize_dtype

__all__ = ["DpAttention"]

_BIG = 1 << 62
_MAX, _SUM, _VAR = PaddingMode.MAX_LEN, PaddingMode.SUM_LEN, PaddingMode.VARLEN

# Descriptor entries of one layout (4 int64 each; see kernels' copy_rows).
_PACK, _CHUNK, _SUMW, _UNPACK, _OUTCOPY, _ZTAIL = range(6)
_PER_LAYOUT = 6
_HIDDEN, _LOGITS = 0, _PER_LAYOUT
_MASK_AT = 4 * 2 * _PER_LAYOUT  # int offset of the (offset, n, slot_rows) x D mask triples

# Error codes of the collective input check (strict mode).
_OK, _BAD_INPUT = 0, 1


class _Layout:
    """One rank's view of one layout of a plan: the hidden-state gather or the logits gather."""

    __slots__ = ("mode", "total", "slot", "n", "off", "counts", "tp_counts", "attn_counts",
                 "chunk_off", "chunk_len", "base", "M")

    def __init__(self, mode, n_arr, slot_arr, off_arr, total, d, a, A, base, desc):
        self.mode = mode
        self.total = int(total)
        self.base = base
        n = int(n_arr[d])
        slot = int(slot_arr[d])
        off = int(off_arr[d])
        self.n, self.slot, self.off = n, slot, off
        self.M = int(slot_arr[0]) if len(slot_arr) else 0
        self.counts = np.ascontiguousarray(slot_arr, dtype=np.int64)
        if mode == _MAX:
            c = slot // A
            self.chunk_off, self.chunk_len = a * c, c
            self.tp_counts = self.attn_counts = None
        else:
            q, r = np.divmod(np.asarray(slot_arr, dtype=np.int64), A)
            idx = np.arange(A, dtype=np.int64)
            chunks = q[:, None] + (idx[None, :] < r[:, None])
            self.tp_counts = np.ascontiguousarray(chunks.reshape(-1))
            self.attn_counts = np.ascontiguousarray(chunks[d])
            self.chunk_off = a * int(q[d]) + min(a, int(r[d]))
            self.chunk_len = int(chunks[d, a])
        b = 4 * base
        desc[b + 4 * _PACK: b + 4 * _PACK + 4] = (0, n, 0, slot)
        desc[b + 4 * _CHUNK: b + 4 * _CHUNK + 4] = (self.chunk_off, n - self.chunk_off, 0, self.chunk_len)
        desc[b + 4 * _SUMW: b + 4 * _SUMW + 4] = (0, n, off, slot)
        desc[b + 4 * _UNPACK: b + 4 * _UNPACK + 4] = (off, n, 0, _BIG)
        desc[b + 4 * _OUTCOPY: b + 4 * _OUTCOPY + 4] = (0, n, 0, _BIG)
        desc[b + 4 * _ZTAIL: b + 4 * _ZTAIL + 4] = (0, 0, n, _BIG)


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


class _Step:
    """Everything one plan needs on this rank: layouts and the uploaded descriptor."""

    __slots__ = ("plan", "hidden", "logits", "desc", "desc_host")


class DpAttention:
    """The DP-attention data plane of one rank.

    Args:
        comm: an mpi4py communicator spanning the TP group (default ``MPI.COMM_WORLD``).
        attn_tp_size: ranks per DP replica (``A``); must divide ``comm.size``.
        hidden_size: row width ``H`` of gathered hidden states.
        dtype: ``"bfloat16"`` (default), ``"float16"``, ``"float32"``, ``"int32"``, ``"int64"``,
            ``"uint8"`` (or NumPy dtypes / aliases like ``"bf16"``).
        backend: ``"auto"`` (CUDA when CuPy sees a GPU), ``"cuda"`` or ``"host"``.
        spec: :class:`SpecConfig` for speculative decoding.
        policy: padding policy (``"auto"``, ``"sglang"``, ``"max_len"``, ``"sum_len"``,
            ``"varlen"``).
        graph_buckets: per-replica token capacities with captured graphs.
        max_tokens_per_rank: preallocate the arenas for this many tokens per replica.
        timeout_s: bound of every collective and of the sync (``CollectiveTimeout`` after it).
        cost: :class:`CostModel` for ``"auto"`` (default: built-in constants; ``row_bytes`` is
            set from ``hidden_size`` and ``dtype``).
        strict: check inputs collectively: a bad argument on any rank raises on every rank
            before any data moves (one small host all-gather per call). With ``strict=False``
            only the offending rank raises and its peers see ``CollectiveTimeout``.

    Views returned by ``gather``/``scatter``/``gather_logits``/``scatter_logits`` live in
    per-role arenas and stay valid until the next call that uses the same role (gather ->
    ``gathered``, scatter -> ``output``, gather_logits -> ``logits``, scatter_logits ->
    ``logits_output``); copy them to keep them longer.

    Raises:
        ConfigError: invalid sizes, policy, buckets, or ranks configured differently (raised on
            every rank, naming the field and the ranks).
        BackendUnavailable: the requested backend cannot run here.
    """

    def __init__(self, comm=None, attn_tp_size=1, hidden_size=None, dtype="bfloat16",
                 backend="auto", spec=None, policy="auto", graph_buckets=(),
                 max_tokens_per_rank=None, timeout_s=60.0, cost=None, strict=True):
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self._mpi = comm
        self._backend = None
        self._attn = None
        self._closed = False
        self._aborted = None
        self._runners = []
        self._arena = None
        # Agree first, on the raw arguments: a rank that raised on its own before this collective
        # would leave the others blocked in it. Past it, every rank validates identical values.
        self._check_config_agreement(attn_tp_size, hidden_size, dtype, backend, spec, policy,
                                     graph_buckets, cost, strict)
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, (int, np.integer)) or hidden_size <= 0:
            raise ConfigError(f"hidden_size must be a positive int, got {hidden_size!r}")
        try:
            timeout_s = float(timeout_s)
        except (TypeError, ValueError):
            raise ConfigError(f"timeout_s must be a number of seconds, got {timeout_s!r}") from None
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        try:
            self.dtype = normalize_dtype(dtype)
        except InputError as e:
            raise ConfigError(str(e)) from None
        self.hidden_size = int(hidden_size)
        self.topology = Topology(comm.Get_size(), attn_tp_size)
        self.rank = comm.Get_rank()
        A = self.topology.attn_tp_size
        self.dp_rank = self.rank // A
        self.attn_tp_rank = self.rank % A
        self.strict = bool(strict)
        self.timeout_s = timeout_s
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        if spec is not None and not isinstance(spec, SpecConfig):
            raise ConfigError(f"spec must be a dpgather.SpecConfig or None, got {spec!r}")
        self._backend = make_backend(backend, comm, timeout_s)
        self.backend = self._backend.name
        self._storage = self._backend.storage_dtype(self.dtype)
        if cost is None:
            cost = CostModel()
        if not isinstance(cost, CostModel):
            raise ConfigError(f"cost must be a dpgather.CostModel, got {cost!r}")
        cost = cost.with_row_bytes(self.hidden_size * self._storage.itemsize)
        self.planner = Planner(self.topology, spec=spec, policy=policy,
                               graph_buckets=graph_buckets, cost=cost)
        tp = self._backend.tp
        self._tp = tp
        if A > 1:
            self._attn = tp.split(self.dp_rank, self.attn_tp_rank)
        self._arena = Arena(self._backend.alloc)
        self._record = np.zeros(RECORD_WIDTH, dtype=np.int32)
        self._table = np.zeros((self.topology.world_size, RECORD_WIDTH), dtype=np.int32)
        self._chk = np.zeros(2, dtype=np.int32)
        self._chk_table = np.zeros((self.topology.world_size, 2), dtype=np.int32)
        self._step = None
        self._desc_host = np.zeros(_MASK_AT + 3 * self.topology.dp_size, dtype=np.int64)
        if max_tokens_per_rank:
            self._preallocate(int(max_tokens_per_rank))
        _register_at_exit(self)

    # -- set-up ---------------------------------------------------------------------------
    def _check_config_agreement(self, attn_tp_size, hidden_size, dtype, backend, spec, policy,
                                graph_buckets, cost, strict):
        """One object all-gather of the (canonicalised, not yet validated) arguments."""
        import dpgather

        mine = {
            "version": dpgather.__version__,
            "world_size": self._mpi.Get_size(),
            "attn_tp_size": _canon(_as_int, attn_tp_size),
            "hidden_size": _canon(_as_int, hidden_size),
            "dtype": _canon(normalize_dtype, dtype),
            "backend": repr(backend),
            "spec": repr(spec),
            "policy": repr(policy),
            "graph_buckets": _canon(lambda b: tuple(sorted(int(v) for v in b)), graph_buckets),
            # "auto" plans depend on the cost model: ranks must plan alike
            "cost": _canon(lambda c: (CostModel() if c is None else c).to_dict(), cost),
            "strict": repr(bool(strict)),  # strict mode adds a collective to every call
        }
        everyone = self._mpi.allgather(mine)
        diffs = []
        for key in mine:
            values = {}
            for r, cfg in enumerate(everyone):
                values.setdefault(repr(cfg.get(key)), []).append(r)
            if len(values) > 1:
                diffs.append(f"{key}: " + "; ".join(f"{v} on ranks {rs}" for v, rs in values.items()))
        if diffs:
            raise ConfigError("ranks were configured differently: " + " | ".join(diffs)
                              + ". Every rank must construct DpAttention with the same arguments")

    def _preallocate(self, tokens):
        D, A, H = self.topology.dp_size, self.topology.attn_tp_size, self.hidden_size
        item = self._storage.itemsize
        M = -(-tokens // A) * A
        buckets = self.planner.graph_buckets
        if buckets:
            M = max(M, buckets[-1])
        row = H * item
        self._arena.reserve("gathered", D * M * row)
        self._arena.reserve("staging", 2 * M * row + 1024)
        self._arena.reserve("combine", D * M * row + 1024)
        self._arena.reserve("output", M * row)
        self._arena.reserve("logits", D * M * row)

    # -- the per-step sync ----------------------------------------------------------------
    def sync(self, batch):
        """Exchange this rank's batch with every rank (one host all-gather) and plan the step.

        Args:
            batch: this rank's :class:`LocalBatch`; the ``attn_tp_size`` ranks of a replica must
                pass equal batches.

        Returns:
            The step's :class:`Plan`, identical on every rank.

        Raises:
            InconsistentBatchError: the ranks of a replica disagree (on every rank).
            InputError: a malformed record table (ranks running different versions).
            CollectiveTimeout: some rank did not reach ``sync`` within ``timeout_s``.
        """
        self._check_open()
        error = None
        try:
            if not isinstance(batch, LocalBatch):
                raise InputError(f"batch must be a dpgather.LocalBatch, got {batch!r}")
            self.planner.record(batch, out=self._record)
        except Exception as e:
            error = e
            self._record[:] = 0  # magic 0 marks "this rank's batch failed"; field 1 says how
            self._record[1] = 2 if isinstance(e, ConfigError) else 1
        with self._guard("sync"):
            self._tp.allgather_record(self._record, self._table)
        failed = np.flatnonzero(self._table[:, 0] == 0)
        if failed.size:  # every rank sees it: share the message, raise the same class everywhere
            msgs = self._mpi.allgather(None if error is None else f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            cls = ConfigError if (self._table[failed, 1] == 2).any() else InputError
            raise cls(f"rank(s) {failed.tolist()} passed an invalid batch to sync(); nothing was planned. "
                      f"rank {failed[0]}: {msgs[failed[0]]}")
        plan = self.planner.plan_table(self._table)
        self._prepare(plan)
        return plan

    def _prepare(self, plan):
        """Layouts and descriptors of ``plan`` for this rank; uploads the descriptor once."""
        st = _Step()
        st.plan = plan
        d, a, A = self.dp_rank, self.attn_tp_rank, self.topology.attn_tp_size
        desc = self._desc_host
        st.hidden = _Layout(plan.mode, plan.num_tokens, plan.slot_rows, plan.slot_offsets,
                            plan.gathered_rows, d, a, A, _HIDDEN, desc)
        st.logits = _Layout(plan.logits_mode, plan.logits_tokens, plan.logits_slot_rows,
                            plan.logits_offsets, plan.logits_rows, d, a, A, _LOGITS, desc)
        D = self.topology.dp_size
        tri = desc[_MASK_AT:_MASK_AT + 3 * D].reshape(D, 3)
        tri[:, 0] = plan.slot_offsets[:D]
        tri[:, 1] = plan.num_tokens
        tri[:, 2] = plan.slot_rows
        st.desc_host = desc
        st.desc = self._backend.upload(desc)
        self._step = st
        return st

    def _state(self, plan):
        if not isinstance(plan, Plan):
            raise InputError(f"plan must be a dpgather.Plan (from sync() or dpgather.plan()), got {plan!r}")
        st = self._step
        if st is not None and st.plan is plan:
            return st
        if (plan.dp_size != self.topology.dp_size or plan.attn_tp_size != self.topology.attn_tp_size):
            raise InputError(
                f"plan is for dp_size={plan.dp_size}, attn_tp_size={plan.attn_tp_size}; this "
                f"DpAttention has dp_size={self.topology.dp_size}, attn_tp_size={self.topology.attn_tp_size}")
        return self._prepare(plan)

    # -- input checks ---------------------------------------------------------------------
    def _check_open(self):
        if self._aborted is not None:
            raise CollectiveTimeout(f"this DpAttention was aborted after {self._aborted}; every rank must "
                                    f"create a new one (and new communicators) to continue")
        if self._closed:
            raise InputError("this DpAttention is closed; create a new one")

    def abort(self, reason="abort() was called"):
        """Abort the communicators (NCCL: ``ncclCommAbort``, freeing kernels stuck on a lost peer)
        and refuse further use. Local: it never kills the process. Called automatically when a
        collective or the sync times out."""
        if self._aborted is None:
            self._aborted = reason
        for comm in (self._attn, self._tp if self._backend is not None else None):
            if comm is not None:
                try:
                    comm.abort()
                except Exception:
                    pass

    def wait(self):
        """Block until this rank's enqueued work has finished, within ``timeout_s``.

        CUDA backend: polls an event on the current stream together with NCCL's async error
        state; on timeout the communicators are aborted and ``CollectiveTimeout`` raised. Host
        backend: collectives are already complete when they return; this is a no-op. Not needed
        for correctness (stream order is kept); call it at a step boundary to bound device hangs.
        """
        self._check_open()
        waiter = getattr(self._tp, "wait", None)
        if waiter is not None and self._backend.name == "cuda":
            with self._guard("wait"):
                waiter()

    def _guard(self, op):
        return _Guard(self, op)

    def _rows(self, x, name, width, logical=None):
        """Validate a caller's 2-D row array; returns it as a backend array (no copy)."""
        logical = logical or self.dtype
        storage = self._storage if logical == self.dtype else self._backend.storage_dtype(logical)
        x = self._backend.as_rows(x, name, storage, logical)
        if x.ndim != 2:
            raise InputError(f"{name} must be 2-D [rows, {width if width else 'width'}], got shape {tuple(x.shape)}")
        if width is not None and x.shape[1] != width:
            raise InputError(f"{name} must have hidden size {width} (shape [rows, {width}]), got shape {tuple(x.shape)}")
        if not x.flags.c_contiguous:
            raise InputError(f"{name} must be C-contiguous (got strides {x.strides} for shape {tuple(x.shape)}); "
                             f"pass a contiguous copy")
        return x

    def _no_alias(self, x, name, roles):
        role = self._arena.contains(self._backend.ptr(x), x.nbytes)
        if role in roles:
            raise InputError(
                f"{name} aliases dpgather's '{role}' buffer that this call writes (a view returned by "
                f"an earlier call); copy it first")

    def _agree(self, error):
        """Strict mode: every rank learns whether any rank's arguments were bad; all raise."""
        if not self.strict:
            if error is not None:
                raise error
            return
        self._chk[0] = _OK if error is None else _BAD_INPUT
        self._chk[1] = self.rank
        with self._guard("the input check"):
            self._tp.allgather_record(self._chk, self._chk_table)
        bad = np.flatnonzero(self._chk_table[:, 0])
        if not bad.size:
            return
        # every rank is here (all saw the same table): share the offending ranks' messages
        msgs = self._mpi.allgather(None if error is None else str(error))
        if error is not None:
            raise error
        raise InputError(f"rank(s) {bad.tolist()} passed invalid arguments to this call; nothing was "
                         f"written on any rank. rank {bad[0]}: {msgs[bad[0]]}")

    def _validated(self, fn):
        try:
            result = fn()
        except InputError as e:
            self._agree(e)
            raise
        self._agree(None)
        return result

    # -- gather ---------------------------------------------------------------------------
    def gather(self, x, plan, contribution="replicate"):
        """Gather every replica's rows into the gathered buffer (identical on all T ranks).

        Args:
            x: ``[rows, hidden_size]`` this rank's token rows (any ``rows``: rows past
                ``plan.num_tokens[own]`` are ignored, missing rows read as zero). Never modified.
            plan: the step's plan (from :meth:`sync`).
            contribution: ``"replicate"`` (every rank of the replica holds the same rows; attn_tp
                rank 0's count) or ``"partial"`` (rows are summands over the replica's ranks).

        Returns:
            ``G``: ``[plan.gathered_rows, hidden_size]`` view of the ``gathered`` arena, replica
            ``d``'s rows at ``plan.slot_offsets[d]``, padding rows zero.
        """
        self._check_open()

        def check():
            st = self._state(plan)
            if contribution not in ("replicate", "partial"):
                raise InputError(f"contribution must be 'replicate' or 'partial', got {contribution!r}")
            xr = self._rows(x, "x", self.hidden_size)
            self._no_alias(xr, "x", ("gathered", "staging"))
            return st, xr

        st, xr = self._validated(check)
        with self._guard("gather"):
            return self._gather_into(self._arena, xr, st, st.hidden, contribution == "partial")

    def gather_logits(self, h, plan):
        """Replicate-gather the rows that reach the LM head over the logits layout.

        Args:
            h: ``[rows, width]`` pruned hidden states of this replica (replicated over attn_tp),
                any supported dtype of the configured one.

        Returns:
            ``[plan.logits_rows, width]`` view of the ``logits`` arena.
        """
        self._check_open()

        def check():
            st = self._state(plan)
            hr = self._rows(h, "h", self.hidden_size)
            self._no_alias(hr, "h", ("logits", "staging"))
            return st, hr

        st, hr = self._validated(check)
        with self._guard("gather_logits"):
            return self._gather_into(self._arena, hr, st, st.logits, False, "logits")

    def _gather_into(self, arena, x, st, L, partial, role="gathered"):
        """The gather algorithm (DESIGN mode table) on ``arena``'s buffers; see :meth:`gather`."""
        be, tp, attn, A = self._backend, self._tp, self._attn, self.topology.attn_tp_size
        H = x.shape[1]
        dt = x.dtype
        desc, base = st.desc, L.base
        logical = self.dtype if dt == self._storage else None
        G = arena.view(role, L.total, H, dt)
        if L.total == 0:
            return G
        if L.mode == _MAX:
            M, c = L.slot, L.chunk_len
            if A == 1:
                send = arena.view("staging", M, H, dt)
                be.copy_rows(x, send, desc, base + _PACK)
                tp.all_gather(send, G, dtype=logical)
            elif partial:
                send, chunk = arena.views("staging", ((M, H, dt), (c, H, dt)))
                be.copy_rows(x, send, desc, base + _PACK)
                attn.reduce_scatter(send, chunk, dtype=logical)
                tp.all_gather(chunk, G, dtype=logical)
            else:
                chunk = arena.view("staging", c, H, dt)
                be.copy_rows(x, chunk, desc, base + _CHUNK)
                tp.all_gather(chunk, G, dtype=logical)
        elif L.mode == _SUM:
            be.zero(G)
            if partial or self.attn_tp_rank == 0:
                be.copy_rows(x, G, desc, base + _SUMW)
            tp.all_reduce(G, G, dtype=logical)
        else:
            n = L.n
            if A == 1:
                if x.shape[0] >= n:
                    send = x
                else:
                    send = arena.view("staging", n, H, dt)
                    be.copy_rows(x, send, desc, base + _PACK)
                tp.all_gatherv(send, G, L.tp_counts, dtype=logical)
            elif partial:
                send, chunk = arena.views("staging", ((n, H, dt), (L.chunk_len, H, dt)))
                be.copy_rows(x, send, desc, base + _PACK)
                attn.reduce_scatterv(send, chunk, L.attn_counts, dtype=logical)
                tp.all_gatherv(chunk, G, L.tp_counts, dtype=logical)
            else:
                lo, hi = L.chunk_off, L.chunk_off + L.chunk_len
                if x.shape[0] >= hi:
                    send = x[lo:hi]
                else:
                    send = arena.view("staging", L.chunk_len, H, dt)
                    be.copy_rows(x, send, desc, base + _CHUNK)
                tp.all_gatherv(send, G, L.tp_counts, dtype=logical)
        return G

    # -- scatter --------------------------------------------------------------------------
    def scatter(self, Y, plan, reduce=True, out=None):
        """Bring the MLP output back to this replica's rows.

        Args:
            Y: ``[>= plan.gathered_rows, hidden_size]``: TP-partial (``reduce=True``, a
                row-parallel MLP's output before its all-reduce) or already replicated
                (``reduce=False``). Never modified.
            reduce: sum ``Y`` over all T ranks (True) or copy (False).
            out: optional ``[R, hidden_size]`` destination (any ``R``: rows past
                ``num_tokens[own]`` are zeroed, rows past ``R`` dropped).

        Returns:
            ``y``: ``out``, or a ``[plan.slot_rows[own], hidden_size]`` view of the ``output``
            arena; ``y[i] = sum_t Y_t[slot_offsets[own] + i]`` for ``i < num_tokens[own]``, zero
            after.
        """
        self._check_open()

        def check():
            st = self._state(plan)
            Yr = self._rows(Y, "Y", self.hidden_size)
            if Yr.shape[0] < st.hidden.total:
                raise InputError(f"Y must have at least plan.gathered_rows={st.hidden.total} rows, "
                                 f"got {Yr.shape[0]}")
            self._no_alias(Yr, "Y", ("combine", "output"))
            o = None
            if out is not None:
                o = self._rows(out, "out", self.hidden_size)
                self._no_alias(o, "out", ("combine", "staging"))
                if _overlap(self._backend, Yr, o):
                    raise InputError("out must not alias Y (the input is never written)")
            return st, Yr, o

        st, Yr, o = self._validated(check)
        with self._guard("scatter"):
            return self._scatter_into(self._arena, Yr, st, st.hidden, bool(reduce), o)

    def scatter_logits(self, L_rows, plan, out=None):
        """Copy this replica's logits rows out of the gathered logits (no collective).

        Args:
            L_rows: ``[>= plan.logits_rows, W]``: logits of every replica's rows (the vocabulary
                shard or the full vocabulary; any width and any supported dtype).
            out: optional ``[R, W]`` destination, same dtype as ``L_rows``.

        Returns:
            ``[plan.logits_slot_rows[own], W]`` (or ``out``), rows past
            ``logits_tokens[own]`` zero.
        """
        self._check_open()

        def check():
            st = self._state(plan)
            Lr = self._any_rows(L_rows, "L")
            if Lr.shape[0] < st.logits.total:
                raise InputError(f"L must have at least plan.logits_rows={st.logits.total} rows, got {Lr.shape[0]}")
            self._no_alias(Lr, "L", ("logits_output",))
            o = None
            if out is not None:
                o = self._any_rows(out, "out")
                if o.dtype != Lr.dtype or o.shape[1] != Lr.shape[1]:
                    raise InputError(f"out must be [rows, {Lr.shape[1]}] of dtype {Lr.dtype}, got "
                                     f"{tuple(o.shape)} {o.dtype}")
                if _overlap(self._backend, Lr, o):
                    raise InputError("out must not alias L (the input is never written)")
            return st, Lr, o

        st, Lr, o = self._validated(check)
        L = st.logits
        y = o if o is not None else self._arena.view("logits_output", L.slot, Lr.shape[1], Lr.dtype)
        self._backend.copy_rows(Lr, y, st.desc, L.base + _UNPACK)
        return y

    def _any_rows(self, a, name):
        a = self._backend.wrap(a, name)
        logical = a.dtype.name
        if logical not in ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "uint16", "int16", "float64"):
            raise InputError(f"{name} has unsupported dtype {a.dtype}")
        if a.ndim != 2:
            raise InputError(f"{name} must be 2-D [rows, width], got shape {tuple(a.shape)}")
        if not a.flags.c_contiguous:
            raise InputError(f"{name} must be C-contiguous; pass a contiguous copy")
        return a

    def _scatter_into(self, arena, Y, st, L, reduce, out):
        """The combine algorithm (DESIGN mode table) on ``arena``'s buffers; see :meth:`scatter`."""
        be, tp, attn, A = self._backend, self._tp, self._attn, self.topology.attn_tp_size
        H = Y.shape[1]
        dt = Y.dtype
        logical = self.dtype
        desc, base = st.desc, L.base
        y = out if out is not None else arena.view("output", L.slot, H, dt)
        direct = y.shape[0] == L.slot
        if L.total == 0:
            if y.shape[0]:
                be.copy_rows(y, y, desc, base + _ZTAIL)
            return y
        Yv = Y[:L.total] if Y.shape[0] != L.total else Y
        if not reduce:
            be.copy_rows(Yv, y, desc, base + _UNPACK)
            return y
        if L.mode == _MAX:
            M = L.slot
            if A == 1:
                dst = y if direct else arena.view("combine", M, H, dt)
                tp.reduce_scatter(Yv, dst, dtype=logical)
            else:
                if direct:
                    chunk = arena.view("combine", L.chunk_len, H, dt)
                    dst = y
                else:
                    chunk, dst = arena.views("combine", ((L.chunk_len, H, dt), (M, H, dt)))
                tp.reduce_scatter(Yv, chunk, dtype=logical)
                attn.all_gather(chunk, dst, dtype=logical)
            if direct:
                be.copy_rows(y, y, desc, base + _ZTAIL)
            else:
                be.copy_rows(dst, y, desc, base + _OUTCOPY)
        elif L.mode == _SUM:
            full = arena.view("combine", L.total, H, dt)
            tp.all_reduce(Yv, full, dtype=logical)
            be.copy_rows(full, y, desc, base + _UNPACK)
        else:
            n = L.n
            if A == 1:
                dst = y if direct else arena.view("combine", n, H, dt)
                tp.reduce_scatterv(Yv, dst, L.tp_counts, dtype=logical)
            else:
                if direct:
                    chunk = arena.view("combine", L.chunk_len, H, dt)
                    dst = y
                else:
                    chunk, dst = arena.views("combine", ((L.chunk_len, H, dt), (n, H, dt)))
                tp.reduce_scatterv(Yv, chunk, L.tp_counts, dtype=logical)
                attn.all_gatherv(chunk, dst, L.attn_counts, dtype=logical)
            if not direct:
                be.copy_rows(dst, y, desc, base + _OUTCOPY)
        return y

    # -- MoE routing mask -----------------------------------------------------------------
    def mask_topk_ids(self, topk_ids, plan, fill=-1):
        """Mark the padding rows of the gathered buffer in an MoE router's ``topk_ids``, in place.

        Args:
            topk_ids: ``[>= plan.gathered_rows, k]`` int32 or int64 expert ids of the gathered rows.
            fill: the id written into every padding row (rows of a slot past
                ``plan.num_tokens[d]``); ``-1`` makes the MoE skip them.

        Returns:
            ``topk_ids`` (modified in place; counts are read from device memory on the CUDA
            backend, so the call can be captured in a graph).
        """
        self._check_open()

        def check():
            st = self._state(plan)
            be = self._backend
            ids = be.wrap(topk_ids, "topk_ids")
            if ids.dtype not in (np.int32, np.int64):
                raise InputError(f"topk_ids must be int32 or int64, got {ids.dtype}")
            if ids.ndim != 2 or not ids.flags.c_contiguous:
                raise InputError(f"topk_ids must be a C-contiguous 2-D [rows, k] array, got shape {tuple(ids.shape)}")
            if ids.shape[0] < st.hidden.total:
                raise InputError(f"topk_ids must have at least plan.gathered_rows={st.hidden.total} rows, "
                                 f"got {ids.shape[0]}")
            return st, ids

        st, ids = self._validated(check)
        self._backend.mask_rows(ids, st.desc, _MASK_AT, self.topology.dp_size, int(fill))
        return topk_ids

    # -- graphs ---------------------------------------------------------------------------
    def graph_runner(self, fn, contribution="replicate", reduce=True):
        """Capture ``pack -> gather -> fn(G) -> combine -> unpack`` for every graph bucket.

        Returns a :class:`~dpgather._graph.GraphRunner` whose ``run(x, plan)`` replays the
        bucket of ``plan`` (``plan.graph`` must be True) with no per-step allocation. On the host
        backend it runs eagerly with the same API. Closed by :meth:`close` (graphs are destroyed
        before the communicators).
        """
        self._check_open()
        from ._graph import GraphRunner

        runner = GraphRunner(self, fn, contribution=contribution, reduce=reduce)
        self._runners.append(runner)
        return runner

    # -- bookkeeping ----------------------------------------------------------------------
    def memory_stats(self):
        """Arena usage per role: ``reserved_bytes``, ``peak_view_bytes``, ``allocations``,
        ``requests``; plus ``total``."""
        return self._arena.stats()

    def close(self):
        """Release arenas and communicators (sub-communicator first). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._step = None
        for runner in self._runners:
            runner.close()
        self._runners = []
        if self._arena is not None:
            self._arena.release()
        if self._attn is not None:
            self._attn.close()
            self._attn = None
        if self._backend is not None:
            self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"DpAttention(rank={self.rank}, {self.topology}, hidden_size={self.hidden_size}, "
                f"dtype={self.dtype}, backend={getattr(self, 'backend', None)}, policy={self.planner.policy})")


_LIVE = weakref.WeakSet()
_HOOKED = False


def _close_all():
    for dp in list(_LIVE):
        try:
            dp.close()
        except Exception:
            pass


def _register_at_exit(dp):
    """Close every live DpAttention at interpreter exit, before mpi4py finalizes MPI (atexit
    runs handlers in reverse order and mpi4py registered its own when MPI was imported)."""
    global _HOOKED
    _LIVE.add(dp)
    if not _HOOKED:
        atexit.register(_close_all)
        _HOOKED = True


def _as_int(v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(v)
    return int(v)


def _canon(fn, value):
    """``repr(fn(value))``, or a marker naming the raw value when ``fn`` rejects it."""
    try:
        return repr(fn(value))
    except Exception:
        return f"invalid {value!r}"


def _overlap(be, a, b):
    pa, pb = be.ptr(a), be.ptr(b)
    return a.nbytes > 0 and b.nbytes > 0 and pa < pb + b.nbytes and pb < pa + a.nbytes
