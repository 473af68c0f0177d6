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
``--out`` writes ``report.json`` and PNG plots. Sizes are per rank (the gathered buffer is
replicated on every rank) and count the hidden-state gather plus the logits gather:

- **ours**: ``plan.gathered_rows + plan.logits_rows`` rows of the policy's plan (in a graph step
  the static bucket-sized buffer the graph replays on).
- **SGLang before #8277**: a zeroed ``sum(n)`` buffer every forward, graph or not, plus logits
  rows sized by the token counts (the speculative modes counted ``n`` logits rows, also in
  DRAFT_EXTEND).
- **SGLang after #8277/#8278**: the ``"sglang"`` policy's plan: counts aligned to ``attn_tp``,
  MAX_LEN ``M*D`` or SUM_LEN ``sum(n)`` by the #8278 rule, graph buckets from ``max(n)``, and
  ``sum(l)`` logits rows with ``l = bs`` in DRAFT_EXTEND.

"wire/rank" estimates the bytes each rank receives with ring collectives (factor
``f = (T-1)/T``): all-gather, reduce-scatter and their v-variants ``f*B``, all-reduce ``2f*B``;
a MAX_LEN or VARLEN step moves ``2fB`` (gather + combine), a SUM_LEN step ``4fB``.
"""

import json
import os
import sys
import time
import traceback

import numpy as np

import dpgather
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
from dpgather.tools.traces import GENERATORS, load_trace, synthetic

__all__ = ["ReplayConfig", "replay", "DEFAULT_BUCKETS", "REPORT_FORMAT", "parse_buckets"]

REPORT_FORMAT = "dpgather-report/1"
ALL_POLICIES = ("auto", "sglang", "max_len", "sum_len", "varlen")
#: Default per-replica graph capacities in tokens (rounded up to multiples of attn_tp).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}
_VOCAB_SHARD = 32      # logits columns per rank (a vocabulary-parallel LM head shard)
_NNZ = 4               # non-zeros per column of W
_DSV3_ROW = 7168 * 2   # DeepSeek-V3 hidden row in bf16, for the scale-up line


class ReplayConfig:
    """Options of one replay (the ``dpgather replay`` flags, see ``dpgather replay --help``)."""

    def __init__(self, trace=None, synthetic="mixed", hidden=None, dtype="bf16", attn_tp=1,
                 policy="all", steps=None, seed=0, backend="auto", verify=False, out=None,
                 graph_buckets="default", progress="auto", timeout=60.0, corrupt_step=None,
                 mlp_row_us=0.3):
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
        self.corrupt_step = corrupt_step
        self.mlp_row_us = mlp_row_us

    @classmethod
    def from_args(cls, ns):
        keys = vars(cls()).keys()
        return cls(**{k: getattr(ns, k) for k in keys if hasattr(ns, k)})


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
    lo, ls = int(loffs[d_own]), int(plan.logits_slot_rows[d_own])
    oref = GLref[lo:lo + ls] @ inp.V[rank]

    def bad(a, ref):
        if a is None:  # not observable (a captured CUDA graph): checked through y
            return 0
        if a.shape != ref.shape:
            return max(ref.shape[0], a.shape[0], 1)
        return int(np.count_nonzero((a != ref).any(axis=1))) if a.size else 0

    return [bad(G, Gref), bad(y, yref), bad(GL, GLref), bad(out, oref)]


def _run_policy(comm, cfg, policy, trace, prepared, topo, spec, buckets, H, dtype, backend_name,
                inp, bar, warmup=False):
    """Replay ``trace`` under ``policy``; returns (plans, times, bad rows, arena stats, graph stats).

    Eager steps call ``gather -> MLP -> scatter``; graph steps go through
    ``DpAttention.graph_runner`` (captured on CUDA, the same static buffers run eagerly on the
    host), so they allocate nothing. The LM-head rows take ``gather_logits`` /
    ``scatter_logits`` in both cases.
    """
    from dpgather import DpAttention

    arrays = inp.arrays
    rank, A = comm.Get_rank(), topo.attn_tp_size
    d_own = rank // A
    contribution = "partial" if A > 1 else "replicate"
    dp = DpAttention(comm, attn_tp_size=A, hidden_size=H, dtype=dtype, backend=backend_name,
                     spec=spec, policy=policy, graph_buckets=buckets, timeout_s=cfg.timeout,
                     cost=CostModel(mlp_row_us=cfg.mlp_row_us))
    xp = arrays.xp
    W_rows, W_vals = xp.asarray(inp.rows), xp.asarray(inp.w_of(rank))   # this rank's W_t, sparse
    Vt = xp.asarray(inp.V[rank])
    pure = Planner(topo, spec=spec, policy=policy, graph_buckets=buckets, cost=dp.planner.cost)
    nsteps = len(trace.steps)
    times = np.zeros(nsteps)
    bad = np.zeros((nsteps, 5), dtype=np.int64)   # G, y, logits gather, logits out, plan
    plans = []
    box = {}  # what the MLP saw this step (host backend: fn runs eagerly, also for graphs)

    def mlp(G):
        if xp is not np:  # may run inside a CUDA graph capture: no host work, no sync
            return arrays.from_f32(inp.mul_w(arrays.f32(G), rows=W_rows, w=W_vals))
        if box.get("corrupt") and G.shape[0]:
            G[0, 0] = G[0, 0] + 1  # test hook: a wrong row must fail verification
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
            box["corrupt"] = cfg.corrupt_step == i and not warmup and rank == 0
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
            if plan.graph and runner is not None:
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
                if cfg.verify and xp is not np:
                    G = arrays.host(G)
            idx = st.idx[d_own]
            h = y[xp.asarray(idx)] if len(idx) else arrays.empty(0, H)
            GL = dp.gather_logits(xp.ascontiguousarray(h), plan)
            arrays.sync()
            t3 = time.perf_counter()
            L = arrays.f32(GL) @ Vt
            arrays.sync()
            t4 = time.perf_counter()
            out = dp.scatter_logits(L, plan)
            arrays.sync()
            t5 = time.perf_counter()
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


# -- reporting ------------------------------------------------------------------------------------

def _fmt_bytes(b):
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{int(b)} B"


def _fmt_rows(r):
    if r >= 1e6:
        return f"{r / 1e6:.2f}M"
    if r >= 1e4:
        return f"{r / 1e3:.1f}k"
    return f"{int(round(r))}"


def _summary(sizes, row_bytes, times=None, forward=None):
    """Peak/mean bytes, rows moved, padding and wire bytes over the forward steps."""
    fwd = [s for s, f in zip(sizes, forward) if f]
    tot = [s["dyn_rows"] * row_bytes for s in fwd]
    out = {
        "forward_steps": len(fwd),
        "rows_moved": int(sum(s["rows"] + s["logits_rows"] for s in fwd)),
        "hidden_rows": int(sum(s["rows"] for s in fwd)),
        "logits_rows": int(sum(s["logits_rows"] for s in fwd)),
        "padding_rows": int(sum(s["padding"] for s in fwd)),
        "wire_bytes_per_rank": float(sum(s["wire_rows"] for s in fwd) * row_bytes),
        "peak_bytes": int(max(tot, default=0)),
        "mean_bytes": float(np.mean(tot)) if tot else 0.0,
        "graph_steps": int(sum(1 for s in fwd if s["graph"])),
    }
    if times is not None:
        ft = times[np.asarray(forward, dtype=bool)] if len(times) else times
        out["time_us_mean"] = float(ft.mean() * 1e6) if ft.size else 0.0
        out["time_us_p50"] = float(np.percentile(ft, 50) * 1e6) if ft.size else 0.0
        out["time_us_p99"] = float(np.percentile(ft, 99) * 1e6) if ft.size else 0.0
    return out


def _table(rows, header, left=(0,)):
    """A fixed-width text table; columns in ``left`` are left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _plots(outdir, trace, results, prepared, row_bytes, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    x = np.arange(len(prepared))
    kib = row_bytes / 1024.0
    before = np.array([s.before["dyn_rows"] * kib for s in prepared])
    after = np.array([s.after["dyn_rows"] * kib for s in prepared])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    pols = [p_ for p_ in results if p_ != "_ref"]
    graph = [s["graph"] for s in results[pols[0]]["sizes"]]
    for i, g in enumerate(graph):
        if g:
            ax.axvspan(i, i + 1, color="0.92", lw=0, label="graph replay" if i == graph.index(True) else None)
    ax.step(x, before, where="post", color="tab:red", lw=1.3, label="SGLang before #8277")
    ax.step(x, after, where="post", color="tab:orange", lw=1.3, label="SGLang after #8277/#8278")
    main = "auto" if "auto" in pols else pols[0]
    for pol in pols:
        res = results[pol]
        ours = np.array([s["dyn_rows"] * kib for s in res["sizes"]])
        if pol == main:
            ax.step(x, ours, where="post", color="tab:blue", lw=1.8, label=f"dpgather ({pol})")
        else:
            ax.step(x, ours, where="post", lw=0.7, alpha=0.6, label=f"dpgather ({pol})")
    ax.set_xlabel("step")
    ax.set_ylabel("dynamic gathered buffers per rank [KiB]\n(hidden + logits)")
    ax.set_title(f"Gathered memory over the trace: {title}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = os.path.join(outdir, "memory.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    names = pols + ["SGLang <#8277", "SGLang #8277+"]
    sums = [results[p_]["summary"] for p_ in pols]
    sums += [results["_ref"]["before"], results["_ref"]["after"]]
    real = np.array([s["rows_moved"] - s["padding_rows"] for s in sums])
    pad = np.array([s["padding_rows"] for s in sums])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(names, real, color="tab:blue", label="real rows")
    ax.bar(names, pad, bottom=real, color="tab:gray", label="padding rows")
    for i, (r, q) in enumerate(zip(real, pad)):
        ax.text(i, r + q, _fmt_rows(r + q), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("rows moved over the trace\n(hidden + logits gathers)")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title(f"Rows moved per policy: {title}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = os.path.join(outdir, "rows.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for pol in pols:
        t = results[pol]["times"] * 1e3
        ax.plot(x, t, lw=0.9, label=pol)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("data-plane time per step [ms]\n(max over ranks)")
    ax.set_title(f"Time per step: {title}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = os.path.join(outdir, "time.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


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
    show = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if comm.Get_rank() != 0 or not show:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, ncols=88, unit="step", leave=False,
                mininterval=0.25, dynamic_ncols=False)


def _setup(comm, cfg):
    """Everything that can be wrong with the options or the trace, checked on every rank."""
    from dpgather._backends import cuda_usable

    T = comm.Get_size()
    A = cfg.attn_tp
    if A < 1 or T % A:
        raise ConfigError(f"--attn-tp={A} must divide the number of ranks ({T}); valid: "
                          f"{[a for a in range(1, T + 1) if T % a == 0]}")
    topo = Topology(T, A)
    D = topo.dp_size
    if cfg.dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    dtype = _DTYPES[cfg.dtype]
    backend = cfg.backend
    if backend == "auto":
        backend = "cuda" if cuda_usable() else "host"
    elif backend == "cuda" and not cuda_usable():
        raise BackendUnavailable("--backend cuda: CuPy sees no GPU here; use --backend host (or auto)")
    if not cfg.mlp_row_us >= 0:
        raise ConfigError(f"--mlp-row-us must be >= 0, got {cfg.mlp_row_us}")
    H = cfg.hidden or (2048 if backend == "cuda" else 256)
    if H < 1:
        raise ConfigError(f"--hidden must be positive, got {H}")
    policies = ALL_POLICIES if cfg.policy == "all" else tuple(cfg.policy.split(","))
    for p in policies:
        if p not in ALL_POLICIES:
            raise ConfigError(f"--policy must be 'all' or one of {ALL_POLICIES}, got {p!r}")
    buckets = parse_buckets(cfg.graph_buckets, A)
    if cfg.trace:
        trace = load_trace(cfg.trace)
        if trace.dp_size != D:
            raise InputError(
                f"{cfg.trace}: the trace has {trace.dp_size} replicas per step but this run has "
                f"dp_size = ranks / attn_tp = {T} / {A} = {D}; launch "
                f"`mpirun -n {trace.dp_size * A} dpgather replay --trace {cfg.trace}"
                + (f" --attn-tp {A}" if A > 1 else "") + "`")
    else:
        if cfg.synthetic not in GENERATORS:
            raise InputError(f"--synthetic must be one of {sorted(GENERATORS)}, got {cfg.synthetic!r}")
        trace = synthetic(cfg.synthetic, dp_size=D, seed=cfg.seed, steps=cfg.steps)
    trace = trace.head(cfg.steps)
    spec = trace.spec
    Planner(topo, spec=spec, policy="auto", graph_buckets=buckets)  # validates buckets
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
    """Run the replay on every rank of ``comm``; returns the process exit code.

    0: every check passed (or ``verify`` was off); 1: a verification failed on some rank;
    2: invalid options or trace (the message is printed by rank 0).
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank, T = comm.Get_rank(), comm.Get_size()
    if T > 1:
        local = comm.Split_type(_split_shared(), key=rank)
        _limit_blas_threads(max(1, (os.cpu_count() or 1) // local.Get_size()))
        local.Free()
    try:
        topo, dtype, backend, H, policies, buckets, trace, spec = _setup(comm, cfg)
    except DpGatherError as e:
        _say(comm, f"dpgather replay: error: {e}", file=sys.stderr)
        return 2
    try:
        return _replay(comm, cfg, topo, dtype, backend, H, policies, buckets, trace, spec)
    except Exception:
        sys.stderr.write(f"[rank {rank}/{T}] replay failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        if T > 1:
            comm.Abort(3)
        return 3


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
    _say(comm, f"dpgather {dpgather.__version__} replay: {src}, {len(trace)} steps\n"
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
                    buckets, H, dtype, backend, inp, _NoBar(), warmup=True)
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
        times = np.max(np.stack(all_times), axis=0)
        bad_rows = np.sum(np.stack(all_bad), axis=0)
        sizes = [_sizing(p, st, T) for p, st in zip(plans, prepared)]
        summary = _summary(sizes, row_bytes, times, forward)
        summary["modes"] = _mode_mix(plans)
        summary["wall_s"] = wall
        summary["bad_rows"] = int(bad_rows.sum()) if cfg.verify else None
        summary["verified"] = bool(cfg.verify)
        summary["arena_allocations"] = int(all_stats[0]["total"]["allocations"])
        summary["graph_static_bytes"] = (None if gstats is None else int(
            sum(v.get("reserved_bytes", 0) for k, v in gstats.items() if k != "total" and isinstance(v, dict))))
        summary["arena_reserved_bytes_max"] = int(max(s["total"]["reserved_bytes"] for s in all_stats))
        results[policy] = {"plans": plans, "times": times, "bad": bad_rows, "sizes": sizes,
                           "summary": summary, "memory_stats": all_stats[0]}
        status = "not verified" if not cfg.verify else (
            "ok" if not nbad else f"FAILED ({nbad} bad rows, first at step {trace.step_ids[first_bad]})")
        bar.write(f"  {policy:8s} {len(trace)} steps in {wall:4.1f} s, verification {status}")
    bar.close()
    if rank == 0:
        results["_ref"] = {
            "before": _summary([s.before for s in prepared], row_bytes, None, forward),
            "after": _summary([s.after for s in prepared], row_bytes, None, forward),
        }
        _print_report(cfg, results, row_bytes, T, title, backend)
        if cfg.out:
            _write(cfg, results, trace, prepared, topo, dtype, backend, H, buckets, row_bytes,
                   spec, title, forward)
        elif T > 1:
            print("\n(add --out DIR to write report.json and plots)")
        if cfg.verify:
            print("\nverification: " + ("every row of every step matched the NumPy reference on every rank"
                                        if not any_bad else "FAILED: see bad_rows above / in report.json"))
    comm.Barrier()
    return 1 if any_bad else 0


def _mode_mix(plans):
    mix = {"skip": 0, "graph": 0, "MAX_LEN": 0, "SUM_LEN": 0, "VARLEN": 0}
    for p in plans:
        if p.skip:
            mix["skip"] += 1
        elif p.graph:
            mix["graph"] += 1
        else:
            mix[p.mode.name] += 1
    return mix


def _print_report(cfg, results, row_bytes, T, title, backend="host"):
    head = ["policy", "graph", "MAX", "SUM", "VAR", "rows moved", "padding", "wire/rank",
            "peak/rank", "mean/rank", "ms/step", "allocs", "verify"]
    rows = []
    for pol, res in results.items():
        if pol == "_ref":
            continue
        s, m = res["summary"], res["summary"]["modes"]
        ver = "-" if not cfg.verify else ("ok" if not s["bad_rows"] else f"FAIL {s['bad_rows']}")
        rows.append([pol, m["graph"], m["MAX_LEN"], m["SUM_LEN"], m["VARLEN"], _fmt_rows(s["rows_moved"]),
                     _fmt_rows(s["padding_rows"]), _fmt_bytes(s["wire_bytes_per_rank"]),
                     _fmt_bytes(s["peak_bytes"]), _fmt_bytes(s["mean_bytes"]),
                     f"{s['time_us_mean'] / 1e3:.2f}", s["arena_allocations"], ver])
    for label, key in (("SGLang <#8277", "before"), ("SGLang #8277+", "after")):
        s = results["_ref"][key]
        rows.append([label, s["graph_steps"] if key == "after" else "-", "", "", "",
                     _fmt_rows(s["rows_moved"]), _fmt_rows(s["padding_rows"]),
                     _fmt_bytes(s["wire_bytes_per_rank"]), _fmt_bytes(s["peak_bytes"]),
                     _fmt_bytes(s["mean_bytes"]), "-", "-", "-"])
    print(f"\n== {title} ==")
    print("graph/MAX/SUM/VAR: forward steps per layout; rows moved and padding: hidden + logits gathers "
          "over the trace;\nwire/rank: estimated bytes received per rank; peak/mean: gathered buffers "
          "per rank; ms/step: data plane\n(sync + gather + scatter + logits), max over ranks; allocs: "
          "arena allocations over the whole replay.\n")
    print(_table(rows, head))
    pols = [p for p in results if p != "_ref"]
    main = "auto" if "auto" in pols else pols[0]
    s = results[main]["summary"]
    b, a = results["_ref"]["before"], results["_ref"]["after"]
    keys = (("rows moved", "rows_moved"), ("padding rows", "padding_rows"),
            ("wire bytes", "wire_bytes_per_rank"), ("peak memory", "peak_bytes"),
            ("mean memory", "mean_bytes"))
    print(f"\n{main} vs SGLang #8277+: " + ", ".join(f"{k} {_pct(s[f], a[f])}" for k, f in keys))
    print(f"{main} vs SGLang <#8277: " + ", ".join(f"{k} {_pct(s[f], b[f])}" for k, f in keys))
    scale = _DSV3_ROW / row_bytes
    print(f"At DeepSeek-V3 width (H=7168 bf16) the peak / mean gathered memory per rank and layer "
          f"would be {_fmt_bytes(s['peak_bytes'] * scale)} / {_fmt_bytes(s['mean_bytes'] * scale)} "
          f"({main}), {_fmt_bytes(a['peak_bytes'] * scale)} / {_fmt_bytes(a['mean_bytes'] * scale)} "
          f"(SGLang #8277+), {_fmt_bytes(b['peak_bytes'] * scale)} / {_fmt_bytes(b['mean_bytes'] * scale)} "
          f"(SGLang <#8277).")
    print("Memory counts the buffers allocated per step: graph steps replay on static buffers "
          "(D x largest bucket, the same for all) and\n"
          "allocate none, except SGLang <#8277 which "
          "zeroed a sum(n) buffer every step. "
          + ("Time is host MPI time, not GPU time." if backend == "host" else
             "Times synchronize the device after each call; a CUDA graph step's time includes its MLP."))


def _pct(ours, ref):
    if not ref:
        return "n/a" if ours else "same"
    r = ours / ref - 1
    if abs(r) < 0.005:
        return "same"
    return f"{r:+.0%}"


def _write(cfg, results, trace, prepared, topo, dtype, backend, H, buckets, row_bytes, spec,
           title, forward):
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    report = {
        "format": REPORT_FORMAT,
        "version": dpgather.__version__,
        "config": {
            "trace": cfg.trace, "synthetic": None if cfg.trace else cfg.synthetic,
            "steps": len(trace), "seed": cfg.seed, "hidden": H, "dtype": dtype, "row_bytes": row_bytes,
            "world_size": topo.world_size, "attn_tp": topo.attn_tp_size, "dp_size": topo.dp_size,
            "backend": backend, "policies": [p for p in results if p != "_ref"],
            "graph_buckets": list(buckets), "verify": bool(cfg.verify), "timeout_s": cfg.timeout,
            "mlp_row_us": cfg.mlp_row_us,
            "spec": None if spec is None else {"num_steps": spec.num_steps, "topk": spec.topk,
                                               "num_draft_tokens": spec.num_draft_tokens},
        },
        "trace": {"name": trace.name, "steps": len(trace), "dp_size": trace.dp_size,
                  "mode_mix": trace.mode_mix()},
        "reference": {"sglang_before_8277": results["_ref"]["before"],
                      "sglang_after_8277": results["_ref"]["after"]},
        "policies": {},
    }
    ok = True
    for pol, res in results.items():
        if pol == "_ref":
            continue
        steps = []
        for i, (sid, st, plan) in enumerate(zip(trace.step_ids, prepared, res["plans"])):
            ours = res["sizes"][i]
            nbad = [int(v) for v in res["bad"][i]]
            steps.append({
                "step": sid, "modes": st.modes, "forward": bool(forward[i]),
                "real_rows": list(map(int, st.real)), "plan": plan.as_dict(),
                "rows_moved": {"ours": ours["rows"] + ours["logits_rows"],
                               "sglang_before": st.before["rows"] + st.before["logits_rows"],
                               "sglang_after": st.after["rows"] + st.after["logits_rows"]},
                "gathered_bytes": {"ours": ours["dyn_rows"] * row_bytes,
                                   "sglang_before": st.before["dyn_rows"] * row_bytes,
                                   "sglang_after": st.after["dyn_rows"] * row_bytes},
                "padding_rows": ours["padding"],
                "time_us": float(res["times"][i] * 1e6),
                "verify": None if not cfg.verify else {
                    "ok": not any(nbad),
                    "bad_rows": dict(zip(("gathered", "output", "logits_gathered", "logits_output", "plan"), nbad)),
                },
            })
        ok = ok and not res["summary"]["bad_rows"]
        report["policies"][pol] = {"summary": res["summary"], "memory_stats": res["memory_stats"],
                                   "steps": steps}
    report["verified"] = bool(cfg.verify)
    report["ok"] = bool(ok)
    path = os.path.join(out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nreport written to {path}")
    try:
        files = _plots(out, trace, results, prepared, row_bytes, title)
        print("plots written to " + ", ".join(files))
    except ImportError as e:
        print(f"(no plots: matplotlib is not installed: {e})")
