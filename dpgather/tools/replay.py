"""Replay a multi-replica serving trace through the data plane and check every row.

``mpirun -n T dpgather replay [--trace FILE | --synthetic NAME] --verify --out DIR`` runs, on
every rank and for every step of the trace, what a DP-attention + TP-MLP layer does:

1. ``plan = dp.sync(batch)``: the rank's replica batch from the trace, one host all-gather.
2. ``G = dp.gather(x, plan, contribution)``: ``x`` holds the replica's *real* rows (for
   DRAFT_EXTEND only ``sum(accept_i + 1)``, fewer than advertised); with ``attn_tp > 1`` every
   rank holds a partial summand of its replica's rows (``contribution="partial"``).
3. A stand-in TP MLP: ``Y_t = G @ W_t``. ``W`` is a fixed sparse random integer ``[H, H]`` map
   and the ``W_t`` partition its entries over the T ranks (``W = sum_t W_t``), so every ``Y_t``
   is a genuine TP partial sum; ``y = dp.scatter(Y_t, plan, reduce=True)``.
4. The LM-head path: the rows that reach the LM head (the last row of each request in
   DRAFT_EXTEND, the last ``logprob_tokens`` rows of an EXTEND chunk, every row otherwise) are
   gathered with ``dp.gather_logits``, multiplied by this rank's vocabulary shard and copied
   back with ``dp.scatter_logits``.

Inputs are drawn from ``numpy.random.default_rng([seed, step, rank])``, so every rank can
recompute every other rank's rows; with ``--verify`` each rank checks every row of ``G``, ``y``,
the gathered logits rows and its logits rows, plus the plan itself, against a NumPy reference.
All values are small integers (inputs in [-2, 2], weights in {-2, -1, 1, 2} with 4 non-zeros
per column), so every sum is exact in bfloat16 and the check is bit-exact whatever order the
collectives add in.

Rank 0 prints one table comparing the policies with the SGLang reference sizings, and with
``--out`` writes ``report.json`` and PNG plots (:mod:`dpgather.tools.report` explains the sizes).

Everything that can be wrong with the options is checked before any work starts, in two
phases: :meth:`ReplayConfig.check` and the trace file before MPI is initialised, then what
needs the number of ranks (``attn_tp`` divides it, the trace's replica count, the memory of the
largest step) on every rank alike. Exit codes: 0 ok, 1 a verification failed, 2 invalid
options, trace or environment, 3 a rank crashed (all ranks are aborted, none hangs).
"""

import os
import sys
import time
import traceback

import numpy as np

import dpgather as dg
from dpgather.core import (
    BackendUnavailable,
    ConfigError,
    CostModel,
    DpGatherError,
    ForwardMode,
    InputError,
    PaddingMode,
    Planner,
    Topology,
    plan as pure_plan,
)
from dpgather.core.dtypes import ALIASES as _DTYPE_ALIASES

from . import report as _report
from ._common import (EXIT_CRASH, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, PIP, gpu_count, require, require_mpi,
                      say_error)
from .report import REPORT_FORMAT, fmt_bytes, make_out_dir
from .traces import GENERATORS, load_trace, synthetic

__all__ = ["ReplayConfig", "replay", "DEFAULT_BUCKETS", "REPORT_FORMAT", "DTYPES", "POLICIES",
           "parse_buckets"]

#: The policies ``--policy all`` replays, in table order.
POLICIES = ("auto", "sglang", "max_len", "sum_len", "varlen")
#: Default per-replica graph capacities in tokens (rounded up to multiples of attn_tp).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
#: ``--dtype`` names: the API's names and their short forms.
#: ``--dtype``: the API's floating-point dtype names and their short forms (dpgather.core.dtypes),
#: name -> logical dtype (the stand-in MLP computes in floating point).
DTYPES = {**{n: n for n in ("bfloat16", "float16", "float32")},
          **{a: n for a, n in _DTYPE_ALIASES.items() if n in ("bfloat16", "float16", "float32")}}
_VOCAB_SHARD = 32      # logits columns per rank (a vocabulary-parallel LM head shard)
_NNZ = 4               # non-zeros per column of W
#: float32 [rows, H] arrays a step may hold at once per gathered row (G and its reference, the
#: MLP's float32 input and output, y, the logits rows): the memory check's multiplier.
_LIVE_F32 = 6
_PROG = "dpgather replay"


class ReplayConfig:
    """Options of one replay (the ``dpgather replay`` flags, see ``dpgather replay --help``).

    Attributes (all plain values): ``trace`` (path or None) / ``synthetic`` (generator name),
    ``hidden`` (H, None: 256 on host, 2048 on CUDA), ``dtype`` (a :data:`DTYPES` key),
    ``attn_tp``, ``policy`` (``"all"`` or comma-separated :data:`POLICIES`), ``steps`` (None:
    all), ``seed`` (>= 0), ``backend`` (auto/host/cuda), ``verify``, ``out`` (folder or None),
    ``graph_buckets`` (:func:`parse_buckets` text), ``progress`` (auto/on/off), ``timeout``
    (seconds per collective, > 0), ``mlp_row_us`` (>= 0).
    """

    def __init__(self, trace=None, synthetic="mixed", hidden=None, dtype="bf16", attn_tp=1,
                 policy="all", steps=None, seed=0, backend="auto", verify=False, out=None,
                 graph_buckets="default", progress="auto", timeout=60.0, mlp_row_us=0.3):
        self.trace = trace
        self.synthetic = synthetic
        self.hidden = hidden
        self.dtype = dtype
        self.attn_tp = attn_tp
        self.policy = policy
        self.steps = steps
        self.seed = seed
        self.backend = backend
        self.verify = verify
        self.out = out
        self.graph_buckets = graph_buckets
        self.progress = progress
        self.timeout = timeout
        self.mlp_row_us = mlp_row_us

    @classmethod
    def from_args(cls, ns):
        keys = vars(cls()).keys()
        return cls(**{k: getattr(ns, k) for k in keys if hasattr(ns, k)})

    def policies(self):
        """The policies to replay, in order; raises :class:`ConfigError` for an unknown one."""
        pols = POLICIES if self.policy == "all" else tuple(p.strip() for p in str(self.policy).split(","))
        for p in pols:
            if p not in POLICIES:
                raise ConfigError(f"--policy must be 'all' or a comma-separated list of {', '.join(POLICIES)}; got {p!r}")
        return pols

    def check(self):
        """Check the options that need neither MPI nor the trace; raises :class:`ConfigError`.

        Called on every rank before MPI starts, so a bad option costs nothing and reads the
        same everywhere. ``--out`` naming an existing file is an error now, not after the
        replay (the folder is created once every other check passed: :func:`_before_mpi`).
        """
        def whole(v, name, lo):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"--{name} must be an integer >= {lo}, got {v!r}")

        whole(self.attn_tp, "attn-tp", 1)
        whole(self.seed, "seed", 0)
        if self.steps is not None:
            whole(self.steps, "steps", 1)
        if self.hidden is not None:
            whole(self.hidden, "hidden", 1)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.backend not in ("auto", "host", "cuda"):
            raise ConfigError(f"--backend must be auto, host or cuda; got {self.backend!r}")
        if self.progress not in ("auto", "on", "off"):
            raise ConfigError(f"--progress must be auto, on or off; got {self.progress!r}")
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < float("inf")):
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout!r}")
        if not (isinstance(self.mlp_row_us, (int, float)) and 0 <= self.mlp_row_us < float("inf")):
            raise ConfigError(f"--mlp-row-us must be a number >= 0, got {self.mlp_row_us!r}")
        if not self.trace and self.synthetic not in GENERATORS:
            raise ConfigError(f"--synthetic must be one of {', '.join(sorted(GENERATORS))}; got {self.synthetic!r}")
        self.policies()
        parse_buckets(self.graph_buckets, self.attn_tp)
        if self.out and os.path.exists(self.out) and not os.path.isdir(self.out):
            make_out_dir(self.out)  # names the file; the folder itself is made by _before_mpi


def parse_buckets(text, attn_tp):
    """``"default"`` / ``"none"`` / ``"8,16,32"`` -> sorted tuple of multiples of ``attn_tp``."""
    if text is None or text == "default":
        raw = DEFAULT_BUCKETS
    elif text in ("none", ""):
        return ()
    else:
        try:
            raw = [int(t) for t in str(text).split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--graph-buckets must be 'default', 'none' or comma-separated "
                              f"integers, got {text!r}") from None
        bad = [b for b in raw if b <= 0 or b % attn_tp]
        if bad:
            raise ConfigError(f"--graph-buckets must be positive multiples of --attn-tp={attn_tp}, "
                              f"got {bad}")
        return tuple(sorted(set(raw)))
    return tuple(sorted({-(-b // attn_tp) * attn_tp for b in raw}))


# -- arrays on either backend ---------------------------------------------------------------------

class _Arrays:
    """Moves the replay's float32 data to and from the backend's storage dtype."""

    def __init__(self, backend, dtype):
        self.dtype = dtype
        if backend == "cuda":
            import cupy

            self.xp = cupy
            self.storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
        else:
            self.xp = np
            if dtype == "bfloat16":
                import ml_dtypes

                self.storage = np.dtype(ml_dtypes.bfloat16)
            else:
                self.storage = np.dtype(dtype)
        self.bf16_bits = backend == "cuda" and dtype == "bfloat16"

    def put(self, a):
        """Host float32/int array -> device array of the storage dtype."""
        xp = self.xp
        if self.bf16_bits:
            f = xp.asarray(np.ascontiguousarray(a, dtype=np.float32))
            return (f.view(xp.uint32) >> 16).astype(xp.uint16)  # exact: values have <= 8 bits
        return xp.asarray(np.ascontiguousarray(a).astype(self.storage))

    def f32(self, a):
        """Storage array -> float32 array on the same device."""
        xp = self.xp
        if self.bf16_bits:
            return (a.astype(xp.uint32) << 16).view(xp.float32)
        return a.astype(xp.float32)

    def from_f32(self, f):
        xp = self.xp
        if self.bf16_bits:
            return (xp.ascontiguousarray(f).view(xp.uint32) >> 16).astype(xp.uint16)
        return f.astype(self.storage, order="C")

    def host(self, a):
        """Any array -> host float32."""
        if self.xp is not np:
            a = self.f32(a) if a.dtype == self.storage else a
            return self.xp.asnumpy(a).astype(np.float32, copy=False)
        return np.asarray(a, dtype=np.float32)

    def empty(self, rows, width, dtype=None):
        return self.xp.empty((rows, width), dtype=dtype or self.storage)

    def sync(self):
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()


# -- per-step bookkeeping that does not depend on the policy -------------------------------------

class _Step:
    __slots__ = ("batches", "n", "l", "real", "idx", "before", "after", "modes")


def _lm_rows(rs, n, l, spec):
    """Row indices of a replica's rows that reach the LM head (``l`` of them)."""
    if rs.mode == ForwardMode.DRAFT_EXTEND:
        if rs.accept is not None:
            return np.cumsum(np.asarray(rs.accept, dtype=np.int64) + 1) - 1
        return (np.arange(l, dtype=np.int64) + 1) * (spec.num_steps + 1) - 1
    if rs.mode == ForwardMode.EXTEND:
        return np.arange(n - l, n, dtype=np.int64)
    return np.arange(l, dtype=np.int64)


def _wire_rows(mode, logits_mode, rows, logits_rows, T):
    f = (T - 1) / T
    hidden = (4 if mode == PaddingMode.SUM_LEN else 2) * f * rows
    logits = (2 if logits_mode == PaddingMode.SUM_LEN else 1) * f * logits_rows
    return hidden + logits


def _prepare(trace, topo, spec, buckets):
    """Counts, LM-head rows and the two SGLang reference sizings of every step."""
    out = []
    T = topo.world_size
    for step in trace.steps:
        st = _Step()
        st.batches = [r.batch() for r in step]
        counts = [r.counts(spec) for r in step]
        st.n = [c[0] for c in counts]
        st.l = [c[1] for c in counts]
        st.real = [c[2] for c in counts]
        st.modes = [r.mode.name for r in step]
        st.idx = [_lm_rows(r, c[0], c[1], spec) for r, c in zip(step, counts)]
        skip = all(r.mode == ForwardMode.IDLE for r in step)
        # SGLang before #8277: zeroed sum(n) buffer (all-reduce), logits rows = token counts in
        # the speculative modes.
        lp = [n if r.mode.is_speculative else l for r, n, l in zip(step, st.n, st.l)]
        rows_b, lrows_b = (0, 0) if skip else (sum(st.n), sum(lp))
        st.before = {
            "rows": rows_b, "logits_rows": lrows_b, "graph": False, "dyn_rows": rows_b + lrows_b,
            "padding": rows_b - sum(st.real) + lrows_b - sum(st.l) if not skip else 0,
            "wire_rows": _wire_rows(PaddingMode.SUM_LEN, PaddingMode.SUM_LEN, rows_b, lrows_b, T),
        }
        p = pure_plan(st.batches, topo, spec=spec, policy="sglang", graph_buckets=buckets)
        st.after = _sizing(p, st, T)
        out.append(st)
    return out


def _sizing(p, st, T):
    if p.skip:
        return {"rows": 0, "logits_rows": 0, "graph": False, "padding": 0, "wire_rows": 0.0,
                "dyn_rows": 0}
    rows, lrows = int(p.gathered_rows), int(p.logits_rows)
    return {
        "rows": rows, "logits_rows": lrows, "graph": bool(p.graph),
        "dyn_rows": 0 if p.graph else rows + lrows,
        "padding": rows - sum(st.real) + lrows - sum(st.l),
        "wire_rows": _wire_rows(p.mode, p.logits_mode, rows, lrows, T),
    }


# -- the replay loop of one policy ---------------------------------------------------------------

class _Inputs:
    """Deterministic rows of every rank and the fixed weights (identical on every rank)."""

    def __init__(self, seed, T, A, H, arrays):
        self.seed, self.T, self.A, self.H = seed, T, A, H
        self.span = max(1, min(2, 32 // A))  # keeps every partial sum an exact small integer
        rng = np.random.default_rng([seed, 0xD9, H])
        # W[rows[k, j], j] = w[k, j]: column j has nnz entries in distinct rows (shifts of one
        # permutation) and every row has nnz entries too, so every element of G reaches y (a
        # captured graph's G is checked through y alone). owner[k, j] is the rank holding it.
        nnz = min(_NNZ, H)
        perm = rng.permutation(H)
        shifts = rng.choice(H, size=nnz, replace=False)
        self.rows = perm[(np.arange(H)[None, :] + shifts[:, None]) % H]
        self.w = rng.choice(np.array([-2.0, -1.0, 1.0, 2.0], dtype=np.float32), size=(nnz, H))
        self.owner = rng.integers(T, size=(nnz, H))
        self.V = [rng.integers(-1, 2, size=(H, _VOCAB_SHARD)).astype(np.float32) for _ in range(T)]
        self.arrays = arrays

    def mul_w(self, G, rank=None, xp=np, rows=None, w=None):
        """``G @ W`` (or ``G @ W_rank``) through the sparse structure: exact (small integers),
        and only gathers and elementwise kernels, so it can be captured in a CUDA graph (CuPy
        cannot call cuBLAS during a stream capture)."""
        rows = self.rows if rows is None else rows
        w = self.w_of(rank) if w is None else w
        out = G[:, rows[0]] * w[0]
        for k in range(1, rows.shape[0]):
            out += G[:, rows[k]] * w[k]
        return out

    def w_of(self, rank):
        """``[nnz, H]`` values of ``W`` (``rank=None``) or of ``W_rank`` (zero where not owned)."""
        if rank is None:
            return self.w
        return np.where(self.owner == rank, self.w, np.float32(0))

    def rank_rows(self, step, rank, rows):
        rng = np.random.default_rng([self.seed, step, rank])
        return rng.integers(-self.span, self.span + 1, size=(rows, self.H), dtype=np.int8)

    def replica_rows(self, step, d, rows):
        """Replica ``d``'s true rows: the sum of its ``A`` ranks' summands."""
        acc = self.rank_rows(step, d * self.A, rows).astype(np.float32)
        for a in range(1, self.A):
            acc += self.rank_rows(step, d * self.A + a, rows)
        return acc

    def w_shard(self, rank):
        """Dense ``W_t``: the entries of ``W`` that rank ``t`` owns (``sum_t W_t = W``)."""
        Wt = np.zeros((self.H, self.H), dtype=np.float32)
        cols = np.arange(self.H)
        for k in range(self.rows.shape[0]):
            mine = self.owner[k] == rank
            Wt[self.rows[k][mine], cols[mine]] = self.w[k][mine]
        return Wt


def _verify_step(inp, st, plan, sid, rank, d_own, G, y, GL, out):
    """Bad-row counts ``[G, y, logits gather, logits out]`` of one step on this rank."""
    D = plan.dp_size
    offs, loffs = plan.slot_offsets, plan.logits_offsets
    Gref = np.zeros((int(plan.gathered_rows), inp.H), dtype=np.float32)
    GLref = np.zeros((int(plan.logits_rows), inp.H), dtype=np.float32)
    for d in range(D):
        k = min(int(plan.num_tokens[d]), st.real[d])
        if k:
            Gref[offs[d]:offs[d] + k] = inp.replica_rows(sid, d, k)
        idx = st.idx[d]
        if len(idx):
            GLref[loffs[d]:loffs[d] + len(idx)] = inp.mul_w(Gref[offs[d] + idx])
    o, s = int(offs[d_own]), int(plan.slot_rows[d_own])
    yref = inp.mul_w(Gref[o:o + s])
    if y is not None and y.shape[0] == int(plan.num_tokens[d_own]):
        yref = yref[:y.shape[0]]  # scatter() returns this replica's own rows; a graph runner the slot
    lo, ls = int(loffs[d_own]), int(plan.logits_slot_rows[d_own])
    oref = GLref[lo:lo + ls] @ inp.V[rank]
    if out is not None and out.shape[0] == int(plan.logits_tokens[d_own]):
        oref = oref[:out.shape[0]]

    def bad(a, ref):
        if a is None:  # not observable (a captured CUDA graph): checked through y
            return 0
        if a.shape != ref.shape:
            return max(ref.shape[0], a.shape[0], 1)
        return int(np.count_nonzero((a != ref).any(axis=1))) if a.size else 0

    return [bad(G, Gref), bad(y, yref), bad(GL, GLref), bad(out, oref)]


def _forward(dp, runner, plan, x, mlp, box, arrays, contribution, idx, Vt, verify):
    """One forward step after its ``sync``: gather -> ``mlp`` -> scatter (``runner``: the graph
    runner's replay of the three), then the LM-head rows through ``gather_logits`` /
    ``scatter_logits``. Returns ``(G, y, GL, out, (t3, t4, t5))``: ``G`` on the host when
    verifying (None when a CUDA graph hid it), the clock after the logits gather, before and
    after the logits scatter (``box["mlp_s"]``: the MLP's own time, left out of the step's)."""
    xp = arrays.xp
    if runner is not None:
        y = runner.run(x, plan)
        G = box.get("G")
    else:
        G = dp.gather(x, plan, contribution=contribution)
        arrays.sync()
        tm = time.perf_counter()
        Y = mlp(G)
        arrays.sync()
        box["mlp_s"] = time.perf_counter() - tm
        y = dp.scatter(Y, plan, reduce=True)
        if verify and xp is not np:
            G = arrays.host(G)
    h = y[xp.asarray(idx)] if len(idx) else arrays.empty(0, y.shape[1])
    GL = dp.gather_logits(xp.ascontiguousarray(h), plan)
    arrays.sync()
    t3 = time.perf_counter()
    L = arrays.f32(GL) @ Vt
    arrays.sync()
    t4 = time.perf_counter()
    out = dp.scatter_logits(L, plan)
    arrays.sync()
    return G, y, GL, out, (t3, t4, time.perf_counter())


def _run_policy(comm, cfg, policy, trace, prepared, topo, spec, buckets, H, dtype, backend_name,
                inp, bar):
    """Replay ``trace`` under ``policy``; returns (plans, times, bad rows, arena stats, graph stats).

    Eager steps call ``gather -> MLP -> scatter``; graph steps go through
    ``DpAttention.graph_runner`` (captured on CUDA, the same static buffers run eagerly on the
    host), so they allocate nothing. The LM-head rows take ``gather_logits`` /
    ``scatter_logits`` in both cases.
    """
    arrays = inp.arrays
    rank, A = comm.Get_rank(), topo.attn_tp_size
    d_own = rank // A
    contribution = "partial" if A > 1 else "replicate"
    dp = dg.DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=dtype, backend=backend_name,
                     spec=spec, policy=policy, graph_buckets=buckets, timeout_s=cfg.timeout,
                     cost=CostModel(mlp_row_us=cfg.mlp_row_us))
    xp = arrays.xp
    W_rows, W_vals = xp.asarray(inp.rows), xp.asarray(inp.w_of(rank))   # this rank's W_t, sparse
    Vt = xp.asarray(inp.V[rank])
    pure = Planner(topo, spec=spec, policy=policy, graph_buckets=buckets, cost=dp.planner.cost,
                   transport=dp.planner.transport, p2p_rows=dp.planner.p2p_rows,
                   p2p_node_size=dp.planner.p2p_node_size, push_rows=dp.planner.push_rows)
    nsteps = len(trace.steps)
    times = np.zeros(nsteps)
    bad = np.zeros((nsteps, 5), dtype=np.int64)   # G, y, logits gather, logits out, plan
    plans = []
    box = {}  # what the MLP saw this step (host backend: fn runs eagerly, also for graphs)

    def mlp(G):
        if xp is not np:  # may run inside a CUDA graph capture: no host work, no sync
            return arrays.from_f32(inp.mul_w(arrays.f32(G), rows=W_rows, w=W_vals))
        if cfg.verify:
            box["G"] = G.copy()
        t = time.perf_counter()
        Y = arrays.from_f32(inp.mul_w(arrays.f32(G), rows=W_rows, w=W_vals))
        box["mlp_s"] = time.perf_counter() - t
        return Y

    runner = None
    try:
        if buckets and hasattr(dp, "graph_runner"):
            runner = dp.graph_runner(mlp, contribution=contribution, reduce=True)
        for i, (sid, st) in enumerate(zip(trace.step_ids, prepared)):
            rs = trace.steps[i][d_own]
            x = arrays.put(inp.rank_rows(sid, rank, st.real[d_own]))
            box.clear()
            arrays.sync()
            t0 = time.perf_counter()
            plan = dp.sync(rs.batch())
            plans.append(plan)
            if plan.skip:
                times[i] = time.perf_counter() - t0
                if cfg.verify and plan != pure.plan_batches(st.batches):
                    bad[i, 4] = 1
                bar.update(1)
                continue
            G, y, GL, out, (t3, t4, t5) = _forward(dp, runner if plan.graph else None, plan, x, mlp, box,
                                                   arrays, contribution, st.idx[d_own], Vt, cfg.verify)
            times[i] = (t3 - t0) - box.get("mlp_s", 0.0) + (t5 - t4)
            if cfg.verify:
                Gh = None if G is None else arrays.host(G)
                bad[i, :4] = _verify_step(inp, st, plan, sid, rank, d_own, Gh,
                                          arrays.host(y), arrays.host(GL), arrays.host(out))
                bad[i, 4] = int(plan != pure.plan_batches(st.batches))
            bar.update(1)
        stats = dp.memory_stats()
        gstats = runner.memory_stats() if runner is not None else None
    finally:
        dp.close()
    return plans, times, bad, stats, gstats


# -- entry point ----------------------------------------------------------------------------------

def _say(comm, *args, file=None):
    if comm.Get_rank() == 0:
        print(*args, file=file or sys.stdout, flush=True)


class _NoBar:
    def update(self, n=1):
        pass

    def write(self, s):
        print(s, flush=True)

    def set_description(self, s):
        pass

    def close(self):
        pass


def _bar(comm, cfg, total):
    """A tqdm progress bar on rank 0 when asked for (or stderr is a terminal); without tqdm, a
    one-line note on stderr saying how to get it."""
    show = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if comm.Get_rank() != 0 or not show:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        print(f"note: no progress bar: tqdm is not installed ({PIP['tqdm']})", file=sys.stderr, flush=True)
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, ncols=88, unit="step", leave=False,
                mininterval=0.25, dynamic_ncols=False)


def _backend(cfg):
    """``--backend`` resolved on this process: ``"cuda"`` or ``"host"``."""
    if cfg.backend == "auto":
        return "cuda" if gpu_count() else "host"
    if cfg.backend == "cuda":
        require(f"{_PROG} --backend cuda", "cupy")
        if not gpu_count():
            raise BackendUnavailable("--backend cuda: CuPy sees no GPU here; use --backend host (or auto)")
    return cfg.backend


def _before_mpi(cfg):
    """Phase 1 (every process, MPI not started): options, dependencies, the trace file, then
    the ``--out`` folder is created (:func:`dpgather.tools.report.make_out_dir`).

    Returns ``(backend, dtype, trace or None)``; raises a :class:`DpGatherError`.
    """
    cfg.check()
    backend = _backend(cfg)
    dtype = DTYPES[cfg.dtype]
    require(_PROG, "mpi4py")
    if backend == "host":
        require(f"{_PROG} on the host backend", "numba", *(["ml_dtypes"] if dtype == "bfloat16" else []))
    trace = load_trace(cfg.trace) if cfg.trace else None
    if cfg.out:
        make_out_dir(cfg.out)  # last: a run refused for another reason leaves no folder behind
    return backend, dtype, trace


def preflight(cfg):
    """What ``dpgather run`` checks before it launches ranks: options, dependencies, the trace
    (:func:`replay`'s first phase, which needs no MPI). Raises a :class:`DpGatherError`."""
    _before_mpi(cfg)


def _largest_step(trace, topo):
    """``(step id, rows)`` of the step whose gathered buffers are largest under any policy:
    hidden rows ``max(sum(n), D * max(n))`` (SUM_LEN or MAX_LEN, counts aligned to A) plus
    logits rows likewise."""
    A, D = topo.attn_tp_size, topo.dp_size
    best = (None, 0)
    for sid, step in zip(trace.step_ids, trace.steps):
        counts = [r.counts(trace.spec) for r in step]
        n = [-(-c[0] // A) * A for c in counts]
        lg = [c[1] for c in counts]
        rows = max(sum(n), D * max(n)) + max(sum(lg), D * max(lg))
        if rows > best[1]:
            best = (sid, rows)
    return best


def _available_bytes(backend, local_ranks):
    """Bytes this rank may use: free device memory (CUDA), or the node's available memory
    shared by its ``local_ranks`` ranks (host); None when unknown."""
    if backend == "cuda":
        try:
            import cupy

            return int(cupy.cuda.runtime.memGetInfo()[0])
        except Exception:  # noqa: BLE001
            return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return avail // max(1, local_ranks)


def _setup(comm, cfg, backend, dtype, trace, local_ranks=1):
    """Phase 2 (every rank, collectively): what needs the number of ranks; raises a
    :class:`DpGatherError` on every rank alike (rank 0's memory budget is broadcast).

    Returns ``(topo, dtype, backend, H, policies, buckets, trace, spec)``.
    """
    T = comm.Get_size()
    A = cfg.attn_tp
    if T % A:
        raise ConfigError(f"--attn-tp={A} must divide the number of ranks ({T}); valid: "
                          f"{[a for a in range(1, T + 1) if T % a == 0]}")
    topo = Topology(T, A)
    D = topo.dp_size
    H = cfg.hidden or (2048 if backend == "cuda" else 256)
    policies = cfg.policies()
    buckets = parse_buckets(cfg.graph_buckets, A)
    if trace is not None:
        if trace.dp_size != D:
            raise InputError(
                f"{cfg.trace}: the trace has {trace.dp_size} replicas per step but this run has "
                f"dp_size = ranks / attn_tp = {T} / {A} = {D}; launch "
                f"`mpirun -n {trace.dp_size * A} dpgather replay --trace {cfg.trace}"
                + (f" --attn-tp {A}" if A > 1 else "") + "`")
    else:
        trace = synthetic(cfg.synthetic, dp_size=D, seed=cfg.seed, steps=cfg.steps)
    trace = trace.head(cfg.steps)
    spec = trace.spec
    Planner(topo, spec=spec, policy="auto", graph_buckets=buckets)  # validates buckets
    sid, rows = _largest_step(trace, topo)
    budget = comm.bcast(_available_bytes(backend, local_ranks) if comm.Get_rank() == 0 else None, root=0)
    need = rows * H * 4 * _LIVE_F32
    if budget is not None and need > budget:
        src = cfg.trace or f"synthetic trace {trace.name!r}"
        raise InputError(
            f"{src}: step {sid} would need about {fmt_bytes(need)} per rank ({rows} gathered rows "
            f"of H={H}), more than the {fmt_bytes(budget)} available to each rank here; shorten "
            "the step's batch, lower --hidden or run fewer ranks per node")
    return topo, dtype, backend, H, policies, buckets, trace, spec


def _mpi_min():
    from mpi4py import MPI

    return MPI.MIN


def _split_shared():
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _limit_blas_threads(n):
    """Cap OpenBLAS threads at ``n`` in this process (several ranks share a node's cores; a BLAS
    thread pool per rank oversubscribes them ~10x). Best effort, like threadpoolctl: looks for a
    loaded OpenBLAS and calls its ``*_set_num_threads``; does nothing when there is none."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("openblas_set_num_threads", "openblas_set_num_threads64_",
                    "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break


def replay(cfg, comm=None):
    """Run the replay on every rank of ``comm`` (default ``MPI.COMM_WORLD``); returns the exit code.

    0: every check passed (or ``verify`` was off); 1: a verification failed on some rank;
    2: invalid options or trace, a missing dependency, or the report could not be written (one
    line on stderr, from rank 0); 3: a rank crashed (its traceback on stderr; the job is aborted
    so no rank hangs). Every rank returns the same code.
    """
    try:
        backend, dtype, trace = _before_mpi(cfg)
    except DpGatherError as e:
        return say_error(_PROG, e, rank0=None if comm is None else comm.Get_rank() == 0)
    if comm is None:
        try:
            comm = require_mpi(_PROG).COMM_WORLD
        except DpGatherError as e:
            return say_error(_PROG, e)
    rank, T = comm.Get_rank(), comm.Get_size()
    local_ranks = 1
    if T > 1:
        local = comm.Split_type(_split_shared(), key=rank)
        local_ranks = local.Get_size()
        _limit_blas_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        local.Free()
    try:
        setup = _setup(comm, cfg, backend, dtype, trace, local_ranks)
    except DpGatherError as e:
        return say_error(_PROG, e, rank0=rank == 0)
    try:
        return _replay(comm, cfg, *setup)
    except BackendUnavailable as e:  # a backend that fails to start (CuPy without NCCL, ...)
        print(f"{_PROG}: error: [rank {rank}/{T}] {e}", file=sys.stderr, flush=True)
        if T > 1:
            comm.Abort(EXIT_USAGE)
        return EXIT_USAGE
    except Exception:
        sys.stderr.write(f"[rank {rank}/{T}] replay failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        if T > 1:
            comm.Abort(EXIT_CRASH)
        return EXIT_CRASH


def _policy_result(cfg, plans, prepared, T, row_bytes, forward, wall, all_times, all_bad, all_stats, gstats):
    """Rank 0: one policy's entry of the report (plans, step times and bad rows over ranks,
    sizes, the summary and rank 0's memory stats) from what every rank gathered to it."""
    times = np.max(np.stack(all_times), axis=0)
    bad_rows = np.sum(np.stack(all_bad), axis=0)
    sizes = [_sizing(p, st, T) for p, st in zip(plans, prepared)]
    summary = _report.summary(sizes, row_bytes, times, forward)
    summary["modes"] = _report.mode_mix(plans)
    summary["wall_s"] = wall
    summary["bad_rows"] = int(bad_rows.sum()) if cfg.verify else None
    summary["verified"] = bool(cfg.verify)
    summary["arena_allocations"] = int(all_stats[0]["total"]["allocations"])
    summary["graph_static_bytes"] = (None if gstats is None else int(
        sum(v.get("reserved_bytes", 0) for k, v in gstats.items() if k != "total" and isinstance(v, dict))))
    summary["arena_reserved_bytes_max"] = int(max(s["total"]["reserved_bytes"] for s in all_stats))
    return {"plans": plans, "times": times, "bad": bad_rows, "sizes": sizes, "summary": summary,
            "memory_stats": all_stats[0]}


def _replay(comm, cfg, topo, dtype, backend, H, policies, buckets, trace, spec):
    rank, T, A, D = comm.Get_rank(), topo.world_size, topo.attn_tp_size, topo.dp_size
    arrays = _Arrays(backend, dtype)
    row_bytes = H * arrays.storage.itemsize
    src = cfg.trace or f"synthetic '{trace.name}' (seed {cfg.seed})"
    title = f"{trace.name}, D={D} x A={A} (T={T}), H={H} {dtype}"
    if T == 1:
        _say(comm, "note: one process, so one DP replica and no communication. For the real thing "
                   "launch more ranks:\n      mpirun -n 4 dpgather replay --synthetic mixed --verify"
                   " --out runs/demo      (or: make run)\n")
    mix = trace.mode_mix()
    _say(comm, f"dpgather {dg.__version__} replay: {src}, {len(trace)} steps\n"
               f"  topology: T={T} ranks = D={D} replicas x attn_tp A={A}; backend {backend}; "
               f"H={H} {dtype} ({row_bytes} B/row)\n"
               f"  replica-steps: " + ", ".join(f"{k} {v}" for k, v in mix.items()) + "\n"
               f"  graph buckets: {','.join(map(str, buckets)) or 'none'}"
               + (f"; spec: S={spec.num_steps} topk={spec.topk} N={spec.num_draft_tokens}" if spec else "")
               + f"\n  policies: {', '.join(policies)}; verify: {'every row' if cfg.verify else 'off'}\n")
    prepared = _prepare(trace, topo, spec, buckets)
    forward = [not all(r.mode == ForwardMode.IDLE for r in s) for s in trace.steps]
    inp = _Inputs(cfg.seed, T, A, H, arrays)
    # Warm-up (kernel compilation or cache load, first arena growth) outside the timed replay.
    first = next((i for i, f in enumerate(forward) if f), None)
    if first is not None:
        _run_policy(comm, cfg, policies[0], trace.head(first + 1), prepared[:first + 1], topo, spec,
                    buckets, H, dtype, backend, inp, _NoBar())
    bar = _bar(comm, cfg, len(policies) * len(trace))
    results = {}
    any_bad = False
    for policy in policies:
        bar.set_description(policy)
        wall = time.perf_counter()
        plans, times, bad, stats, gstats = _run_policy(comm, cfg, policy, trace, prepared, topo, spec,
                                                       buckets, H, dtype, backend, inp, bar)
        wall = time.perf_counter() - wall
        all_times = comm.gather(times, root=0)
        all_bad = comm.gather(bad, root=0)
        all_stats = comm.gather(stats, root=0)
        nbad = comm.allreduce(int(bad.sum()))
        first_bad = comm.allreduce(int(np.flatnonzero(bad.any(axis=1))[0]) if bad.any() else 1 << 40,
                                   op=_mpi_min())
        any_bad = any_bad or nbad > 0
        if rank != 0:
            continue
        results[policy] = _policy_result(cfg, plans, prepared, T, row_bytes, forward, wall, all_times, all_bad,
                                         all_stats, gstats)
        if not cfg.verify:
            status = "not verified (run with --verify)"
        elif not nbad:
            status = "verification ok"
        else:
            status = f"verification FAILED ({nbad} bad rows, first at step {trace.step_ids[first_bad]})"
        bar.write(f"  {policy:8s} {len(trace)} steps in {wall:4.1f} s, {status}")
    bar.close()
    rc = EXIT_VERIFY if any_bad else EXIT_OK
    if rank == 0:
        results["_ref"] = {
            "before": _report.summary([s.before for s in prepared], row_bytes, None, forward),
            "after": _report.summary([s.after for s in prepared], row_bytes, None, forward),
        }
        _report.print_report(cfg, results, row_bytes, T, title, backend)
        if cfg.out:
            try:
                _report.write_report(cfg, results, trace, prepared, topo, dtype, backend, H, buckets,
                                     row_bytes, spec, title, forward)
            except OSError as e:
                where = e.filename or cfg.out
                say_error(_PROG, f"cannot write {where}: {e.strerror or e}", rank0=True)
                rc = EXIT_USAGE
        elif T > 1:
            print("\n(add --out DIR to write report.json and plots)")
        if cfg.verify:
            print("\nverification: " + ("every row of every step matched the NumPy reference on every rank"
                                        if not any_bad else "FAILED: see bad_rows above / in report.json"))
        sys.stdout.flush()
    return int(comm.bcast(rc, root=0))
