"""Graph runner: capture and replay of pack -> gather -> fn -> combine -> unpack per bucket.

On the CUDA backend each graph bucket ``b`` is captured once (MAX_LEN, ``b`` rows per slot) with
static buffers: one input buffer of ``max(bucket)`` rows, one gathered/staging/combine/output set
sized for the largest bucket that every bucket's graph views a prefix of (the deferred
allocation of SGLang #8277, taken further: no buffer is allocated per step, and all buckets share
one allocation). The copy kernels (and, where the plan's transport is P2P, the P2P pull kernel) read the step's
counts from a static device descriptor that ``run`` refreshes with one device-to-device copy, so
a replay serves any counts up to its bucket — and over P2P moves only the real rows.
On the host backend ``run`` executes the same steps eagerly on the same static buffers, so code
written against the runner is portable and CI-tested.

``fn`` receives the gathered buffer ``G`` (``[D*b, H]``, padding rows zero) and returns ``Y`` of
the same shape (the MLP output, TP-partial when ``reduce=True``). On CUDA ``fn`` is run once
eagerly per bucket (warm-up) and then captured; it must be capturable (no host syncs, no
allocation sizes that depend on data). CuPy refuses cuBLAS calls during stream capture
(``NotImplementedError``), so ``G @ W`` with CuPy cannot be captured: call cuBLAS directly with a
handle whose stream and workspace are set before capture (``dpgather.tools.cublas`` does it), or
use elementwise / RawKernel code. Its intermediate arrays come from a private CuPy memory pool
owned by the runner, kept alive with the graphs.

Overlapped steps (``micro_batches=N > 1``, docs/overlap.md): each bucket's graph is one
two-batch-overlap step of ``N`` micro-batches, captured with a fork/join of the capture stream
into a second stream. On the second stream: gather 0, gather 1, ..., gather N-1, then combine 0,
..., combine N-1, each combine after its micro-batch's ``fn``; on the capture stream: ``fn(G_i)``
after gather ``i``. So ``fn(G_0)`` overlaps gather 1 and ``fn(G_1)`` overlaps combine 0, and every
transport launch stays on one stream (in order). Every micro-batch has its own static buffers.
A step whose micro-batches have different buckets replays the graph of the largest: the other
micro-batches' descriptors are re-laid out for it (MAX_LEN slots of that bucket, the same
counts), so ``N`` micro-batches need ``len(buckets)`` graphs, not ``len(buckets) ** N``.

Ordering with the owner's other calls: a replay is one operation of the owner's launch chain
(:mod:`dpgather._chain`), input copies included. Construction synchronises the device first
(nothing of the owner is in flight while the runner warms up and captures on its own streams).
"""

from typing import Any, Callable, NamedTuple

import numpy as np

from dpgather.core import ForwardMode, InputError, LocalBatch, PaddingMode

from ._arena import Arena
from ._layout import OP_GRAPH, Layout, signature

#: The largest ``micro_batches`` of an overlapped runner.
MAX_RUNNER_MICRO_BATCHES = 16

__all__ = ["GraphRunner", "RunnerContext"]


class RunnerContext(NamedTuple):
    """What a :class:`GraphRunner` needs from its ``DpAttention`` (built by
    ``DpAttention.graph_runner``): the data plane, the backend, the planner and descriptor layout,
    this rank's place, the configured row format, and the owner's checks: ``rows(x, name, width)``
    (an input in the configured storage), ``current(plan)`` (the step of ``plan`` or InputError),
    ``call(op, plan, flag, width, check, run, dummy)`` (the owner's call protocol: hashing,
    strict agreement, failure handling), ``guard(op)`` (aborts the owner on a timeout)."""

    plane: Any
    backend: Any
    planner: Any
    descriptor: Any
    rank: int
    dp_rank: int
    attn_tp_rank: int
    hidden_size: int
    storage: Any
    rows: Callable
    current: Callable
    call: Callable
    guard: Callable
    empty: Any


class GraphRunner:
    """Captured (CUDA) or eager (host) gather -> fn -> combine for every graph bucket.

    Made by :meth:`DpAttention.graph_runner`; see the module docstring.

    Args:
        ctx: the :class:`RunnerContext` of the owning ``DpAttention`` (its ``graph_buckets``
            must be non-empty).
        fn: ``fn(G) -> Y`` on backend arrays.
        contribution: ``"replicate"`` or ``"partial"`` (as for ``gather``).
        reduce: combine with a sum over ranks (True) or a copy (False).
        micro_batches: 1 (one micro-batch per step: ``run(x, plan)``) or ``N > 1`` (the
            overlapped step of ``N`` micro-batches: ``run(xs, plans)``).

    Static memory: per micro-batch one input of ``max(bucket)`` rows and one gathered / staging /
    combine / output set for the largest bucket (:meth:`memory_stats`), plus ``fn``'s private
    pool; nothing is allocated per step.
    """

    def __init__(self, ctx, fn, contribution="replicate", reduce=True, micro_batches=1):
        buckets = ctx.planner.graph_buckets
        if not buckets:
            raise InputError("graph_runner needs DpAttention(graph_buckets=...) with at least one bucket")
        if contribution not in ("replicate", "partial"):
            raise InputError(f"contribution must be 'replicate' or 'partial', got {contribution!r}")
        if not isinstance(reduce, (bool, np.bool_)):
            raise InputError(f"reduce must be True or False, got {reduce!r}")
        if not callable(fn):
            raise InputError(f"fn must be callable, got {fn!r}")
        if isinstance(micro_batches, (bool, np.bool_)) or not isinstance(micro_batches, (int, np.integer)) \
                or not 1 <= micro_batches <= MAX_RUNNER_MICRO_BATCHES:
            raise InputError(f"micro_batches must be an int in [1, {MAX_RUNNER_MICRO_BATCHES}] (1: one step per "
                             f"run; N > 1: the overlapped step of N micro-batches), got {micro_batches!r}")
        self._ctx = ctx
        self._fn = fn
        self._partial = contribution == "partial"
        self._reduce = bool(reduce)
        N = self.micro_batches = int(micro_batches)
        self._flag = 2 * int(self._partial) + int(self._reduce) + 4 * (N - 1)
        self.buckets = buckets
        self._closed = False
        be = self._be = ctx.backend
        D = self._D = ctx.planner.topology.dp_size
        H, bmax = ctx.hidden_size, buckets[-1]
        row = H * ctx.storage.itemsize
        self._arenas, self._in_bufs, self._inputs, self._descs = [], [], [], []
        size = ctx.descriptor.size
        for _ in range(N):
            arena = Arena(be.alloc)
            arena.reserve("gathered", D * bmax * row)
            arena.reserve("staging", 2 * bmax * row + 1024)
            arena.reserve("combine", 2 * bmax * row + 1024)
            arena.reserve("output", bmax * row)
            self._arenas.append(arena)
            buf = be.alloc(bmax * row)
            self._in_bufs.append(buf)
            self._inputs.append(buf.view(ctx.storage).reshape(bmax, H))
            self._descs.append(be.xp.zeros(size, dtype=be.xp.int64))
        self._arena, self._in_buf, self._input, self._desc_dev = (self._arenas[0], self._in_bufs[0],
                                                                 self._inputs[0], self._descs[0])
        self._layouts = {}
        self._p2p = {}  # bucket -> the graph step's transport is P2P (the planner's rule for graphs)
        for b in buckets:
            plan = ctx.planner.plan_batches([LocalBatch(ForwardMode.DECODE, b, can_run_graph=True)] * D)
            self._layouts[b] = Layout.hidden(plan, ctx.dp_rank, ctx.attn_tp_rank)
            self._p2p[b] = plan.transport == "p2p"
        self._relaid = {}  # (plan fingerprint, bucket) -> host descriptor re-laid out for the bucket
        self._ring = ("runner", id(self))  # the backend's upload ring of the re-laid descriptors
        if N > 1:  # create it now: a replay never allocates
            be.upload(np.zeros(size, dtype=np.int64), out=self._descs[0], ring=self._ring)
        self._outputs = {}
        self._graphs = {}
        self._pool = None
        self._stream = None
        self._side = None  # the second stream of an overlapped capture
        self._evs = None
        if be.name == "cuda":
            self._capture()

    # -- the step, as captured or run eagerly ----------------------------------------------
    def _body(self, b):
        if self.micro_batches > 1:
            return self._body_overlap(b)
        ctx, L, p2p = self._ctx, self._layouts[b], self._p2p[b]
        G = ctx.plane.gather(self._arena, self._input[:b], L, self._desc_dev, self._partial, p2p)
        Yr = self._apply(G)
        return ctx.plane.combine(self._arena, Yr, L, self._desc_dev, self._reduce, None, p2p)

    def _apply(self, G):
        ctx = self._ctx
        Yr = ctx.rows(self._fn(G), "fn(G)", ctx.hidden_size)
        if Yr.shape[0] < G.shape[0]:
            raise InputError(f"fn(G) must return at least {G.shape[0]} rows, got {Yr.shape[0]}")
        return Yr

    def _body_overlap(self, b):
        """The overlapped step of bucket ``b`` (module docstring); returns ``(outputs, Ys)``: the
        ``N`` combined outputs and the ``fn`` results, which the caller keeps alive until the
        capture ended (a freed ``Y_i`` could be reused by ``fn``'s next allocation while combine
        ``i`` still reads it on the second stream)."""
        ctx, L, p2p, N = self._ctx, self._layouts[b], self._p2p[b], self.micro_batches
        plane, main, side, ev = ctx.plane, self._stream, self._side, self._evs

        def on(s, fn):
            if s is None:
                return fn()
            with s:
                return fn()

        def edge(src, dst, e):  # dst runs the work issued after this once src's work so far is done
            if src is not None:
                e.record(src)
                dst.wait_event(e)

        edge(main, side, ev and ev["fork"])
        Gs = []
        for i in range(N):
            Gs.append(on(side, lambda i=i: plane.gather(self._arenas[i], self._inputs[i][:b], L, self._descs[i],
                                                        self._partial, p2p)))
            if ev:
                ev["g"][i].record(side)
        outs, Ys = [], []
        for i in range(N):
            if ev:
                main.wait_event(ev["g"][i])
            Yr = on(main, lambda i=i: self._apply(Gs[i]))
            Ys.append(Yr)
            edge(main, side, ev and ev["y"][i])
            outs.append(on(side, lambda i=i, Yr=Yr: plane.combine(self._arenas[i], Yr, L, self._descs[i],
                                                                  self._reduce, None, p2p)))
        edge(side, main, ev and ev["join"])
        return outs, Ys

    def _capture(self):
        from dpgather.kernels import _cuda, _p2p

        cupy = self._be.cupy
        _cuda.warm()
        if any(self._p2p.values()):
            _p2p.warm()
        cupy.cuda.Device().synchronize()  # nothing of the owner in flight: the warm-up is unordered
        self._pool = cupy.cuda.MemoryPool()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        if self.micro_batches > 1:
            self._side = cupy.cuda.Stream(non_blocking=True)

            def mk():
                return cupy.cuda.Event(block=False, disable_timing=True)

            N = self.micro_batches
            self._evs = {"fork": mk(), "join": mk(), "g": [mk() for _ in range(N)], "y": [mk() for _ in range(N)]}
        with self._ctx.plane.chain.suspended(), cupy.cuda.using_allocator(self._pool.malloc), self._stream:
            for b in self.buckets:
                self._body(b)  # warm-up: compiles kernels, fills the private pool
            cupy.cuda.Device().synchronize()
            for b in self.buckets:
                self._stream.begin_capture()
                try:
                    out = self._body(b)
                finally:
                    graph = self._stream.end_capture()
                graph.upload(self._stream)
                self._graphs[b] = graph
                self._outputs[b] = out[0] if self.micro_batches > 1 else out
                del out  # the fn results of an overlapped capture may go back to the pool now
            cupy.cuda.Device().synchronize()

    # -- public API -----------------------------------------------------------------------
    def input_view(self, plan: Any, index: int = 0) -> Any:
        """The static input rows ``[plan.bucket, H]`` of micro-batch ``index`` (0 unless
        ``micro_batches > 1``): write this rank's rows there and pass None instead of that input
        to :meth:`run` to skip its copy (rows past ``num_tokens[own]`` are ignored)."""
        self._check(plan)
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) \
                or not 0 <= index < self.micro_batches:
            raise InputError(f"index must be an int in [0, {self.micro_batches}) (the runner's micro-batch), "
                             f"got {index!r}")
        return self._inputs[int(index)][:plan.bucket]

    def run(self, x: Any, plan: Any) -> Any:
        """Replay the step for ``plan`` (which must have ``plan.graph``).

        Args:
            x: this rank's rows ``[rows, H]`` (copied into the static input), or None when the
                caller already wrote them into :meth:`input_view`. For ``micro_batches = N > 1``:
                a sequence of ``N`` such inputs (or None for all of them).
            plan: the step's plan; ``plan.graph`` must be True and ``plan.bucket`` a bucket of
                this runner. For ``N > 1``: a sequence of ``N`` plans, one per micro-batch (each
                returned by ``sync(batch, micro_batch=i)``, each a graph step).

        Returns:
            ``[plan.bucket, H]`` view of the runner's static output (valid until the next
            ``run``): rows ``< num_tokens[own]`` hold the combined MLP output, the rest zero. For
            ``N > 1`` a list of ``N`` such views, one per micro-batch.
        """
        if self.micro_batches > 1:
            return self._run_many(x, plan)
        ctx = self._ctx

        def check():
            self._check(plan)
            st = ctx.current(plan)
            xr = None if x is None else ctx.rows(x, "x", ctx.hidden_size)
            return st, xr

        def replay(st, xr):
            return self._replay([st], [xr])[0]

        def dummy(st):
            if getattr(plan, "graph", False) and plan.bucket in self._layouts and plan is st.plan:
                self._replay([st], [ctx.empty])

        return ctx.call(OP_GRAPH, plan, self._flag, ctx.hidden_size, check, replay, dummy)

    def _run_many(self, xs, plans):
        ctx, N = self._ctx, self.micro_batches
        seq = isinstance(plans, (list, tuple)) and len(plans) == N
        extra = N
        if seq:
            for p in plans:
                extra = (extra * 0x01000193 ^ (int(getattr(p, "fingerprint", 0)) & 0xFFFFFFFF)) & 0xFFFFFFFF
        first = plans[0] if seq else plans

        def check():
            if not seq:
                raise InputError(f"plan must be a list of {N} plans (one per micro-batch, from "
                                 f"sync(batch, micro_batch=i)) for this micro_batches={N} runner, got {plans!r}")
            if xs is not None and (not isinstance(xs, (list, tuple)) or len(xs) != N):
                raise InputError(f"x must be None or a list of {N} inputs (one per micro-batch, None where "
                                 f"input_view(plan, i) was written), got {type(xs).__name__}")
            sts = []
            for i, p in enumerate(plans):
                self._check(p, f"plan[{i}]")
                sts.append(ctx.current(p))
            xrs = [None if xs is None or xs[i] is None else ctx.rows(xs[i], f"x[{i}]", ctx.hidden_size)
                   for i in range(N)]
            return sts, xrs

        def replay(sts, xrs):
            outs = self._replay(sts, xrs)
            return [o[:st.plan.bucket] for o, st in zip(outs, sts)]

        def dummy(st):
            try:
                sts = [ctx.current(p) for p in plans]
                for p in plans:
                    self._check(p)
            except Exception:
                return  # the plans do not say which graph: nothing to issue (peers time out)
            self._replay(sts, [ctx.empty] * N)

        return ctx.call(OP_GRAPH, first, self._flag, ctx.hidden_size, check, replay, dummy, extra)

    def _relaid_desc(self, st, b):
        """The host descriptor of ``st``'s plan re-laid out for bucket ``b`` (> its own bucket):
        MAX_LEN slots of ``b`` rows, the same counts; signatures from (fingerprint, b)."""
        plan = st.plan
        key = (plan.fingerprint, b)
        hit = self._relaid.get(key)
        if hit is None:
            ctx, D = self._ctx, self._D
            d, a, A = ctx.dp_rank, ctx.attn_tp_rank, plan.attn_tp_size
            hidden = Layout(PaddingMode.MAX_LEN, plan.num_tokens, [b] * D, [i * b for i in range(D + 1)], D * b,
                            d, a, A)
            logits = Layout.logits(plan, d, a)
            fp = plan.fingerprint ^ (b * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
            sigs = {name: signature(OP_GRAPH, fp, k, 0, ctx.hidden_size)
                    for k, name in enumerate(("gather_replicate", "gather_partial", "combine", "logits"))}
            hit = np.zeros(ctx.descriptor.size, dtype=np.int64)
            ctx.descriptor.write(hit, plan, hidden, logits, ctx.rank, sigs)
            if len(self._relaid) > 256:
                self._relaid.clear()
            self._relaid[key] = hit
        return hit

    def _replay(self, sts, xrs):
        """Inputs, descriptors and the graph of the largest bucket among ``sts``' plans, as one
        operation of the owner's launch chain. Returns the ``N`` output views (bucket rows)."""
        b = max(st.plan.bucket for st in sts)
        be, plane, N = self._be, self._ctx.plane, self.micro_batches
        chain = plane.chain
        s, cap = chain.enter()
        for i in range(N):
            if xrs[i] is not None:
                plane.copy_input(xrs[i], self._inputs[i], sts[i].desc)
        if be.name == "host":
            for i, st in enumerate(sts):
                self._descs[i][...] = st.desc_host if st.plan.bucket == b else self._relaid_desc(st, b)
            out = self._body(b)
            outs = out[0] if N > 1 else [out]
        else:
            for i, st in enumerate(sts):
                if st.plan.bucket == b:
                    self._descs[i].data.copy_from_device_async(st.desc.data, st.desc_host.nbytes, s)
                else:
                    be.upload(self._relaid_desc(st, b), out=self._descs[i], ring=self._ring)
            self._graphs[b].launch(s)
            outs = self._outputs[b] if N > 1 else [self._outputs[b]]
        chain.leave(s, cap)
        return outs

    def _check(self, plan, name="plan"):
        if self._closed:
            raise InputError("this graph runner is closed")
        if not getattr(plan, "graph", False):
            raise InputError(f"run() needs {name} with plan.graph=True (a graph step), got {plan!r}; "
                             f"use DpAttention.gather/scatter for eager steps")
        if plan.bucket not in self._layouts:
            raise InputError(f"{name}.bucket={plan.bucket} is not a bucket of this runner {self.buckets}")

    def memory_stats(self) -> dict:
        """Static buffers of the runner (allocated once at creation), summed over its
        micro-batches."""
        s = None
        for arena in self._arenas:
            st = arena.stats()
            if s is None:
                s = st
            else:
                for role, v in st.items():
                    for k, n in v.items():
                        s[role][k] += n
        s["input"] = {"reserved_bytes": int(sum(b.nbytes for b in self._in_bufs)), "allocations": len(self._in_bufs)}
        if self._pool is not None:
            s["graph_pool"] = {"used_bytes": int(self._pool.used_bytes()),
                               "total_bytes": int(self._pool.total_bytes())}
        return s

    def close(self) -> None:
        """Destroy the graphs (before the communicators they captured). Local and idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in (self._stream, self._side):
            if s is not None:
                try:
                    s.synchronize()
                except Exception:
                    pass
        self._graphs.clear()
        self._outputs.clear()
        for arena in self._arenas:
            arena.release()
        self._pool = None
        self._stream = None
        self._side = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
