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
"""

from typing import Any, Callable, NamedTuple

import numpy as np

from dpgather.core import ForwardMode, InputError, LocalBatch

from ._arena import Arena
from ._layout import OP_GRAPH, Layout

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
    """

    def __init__(self, ctx, fn, contribution="replicate", reduce=True):
        buckets = ctx.planner.graph_buckets
        if not buckets:
            raise InputError("graph_runner needs DpAttention(graph_buckets=...) with at least one bucket")
        if contribution not in ("replicate", "partial"):
            raise InputError(f"contribution must be 'replicate' or 'partial', got {contribution!r}")
        if not isinstance(reduce, (bool, np.bool_)):
            raise InputError(f"reduce must be True or False, got {reduce!r}")
        if not callable(fn):
            raise InputError(f"fn must be callable, got {fn!r}")
        self._ctx = ctx
        self._fn = fn
        self._partial = contribution == "partial"
        self._reduce = bool(reduce)
        self._flag = 2 * int(self._partial) + int(self._reduce)
        self.buckets = buckets
        self._closed = False
        be = self._be = ctx.backend
        D = ctx.planner.topology.dp_size
        H, bmax = ctx.hidden_size, buckets[-1]
        row = H * ctx.storage.itemsize
        self._arena = Arena(be.alloc)
        self._arena.reserve("gathered", D * bmax * row)
        self._arena.reserve("staging", 2 * bmax * row + 1024)
        self._arena.reserve("combine", 2 * bmax * row + 1024)
        self._arena.reserve("output", bmax * row)
        self._in_buf = be.alloc(bmax * row)
        self._input = self._in_buf.view(ctx.storage).reshape(bmax, H)
        size = ctx.descriptor.size
        self._desc_dev = be.xp.zeros(size, dtype=be.xp.int64)
        self._layouts = {}
        self._p2p = {}  # bucket -> the graph step's transport is P2P (the planner's rule for graphs)
        for b in buckets:
            plan = ctx.planner.plan_batches([LocalBatch(ForwardMode.DECODE, b, can_run_graph=True)] * D)
            self._layouts[b] = Layout.hidden(plan, ctx.dp_rank, ctx.attn_tp_rank)
            self._p2p[b] = plan.transport == "p2p"
        self._outputs = {}
        self._graphs = {}
        self._pool = None
        self._stream = None
        if be.name == "cuda":
            self._capture()

    # -- the step, as captured or run eagerly ----------------------------------------------
    def _body(self, b):
        ctx, L, p2p = self._ctx, self._layouts[b], self._p2p[b]
        G = ctx.plane.gather(self._arena, self._input[:b], L, self._desc_dev, self._partial, p2p)
        Y = self._fn(G)
        Yr = ctx.rows(Y, "fn(G)", ctx.hidden_size)
        if Yr.shape[0] < G.shape[0]:
            raise InputError(f"fn(G) must return at least {G.shape[0]} rows, got {Yr.shape[0]}")
        return ctx.plane.combine(self._arena, Yr, L, self._desc_dev, self._reduce, None, p2p)

    def _capture(self):
        from dpgather.kernels import _cuda, _p2p

        cupy = self._be.cupy
        _cuda.warm()
        if any(self._p2p.values()):
            _p2p.warm()
        self._pool = cupy.cuda.MemoryPool()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        with cupy.cuda.using_allocator(self._pool.malloc), self._stream:
            for b in self.buckets:
                self._body(b)  # warm-up: compiles kernels, fills the private pool
            self._stream.synchronize()
            for b in self.buckets:
                self._stream.begin_capture()
                try:
                    out = self._body(b)
                finally:
                    graph = self._stream.end_capture()
                graph.upload(self._stream)
                self._graphs[b] = graph
                self._outputs[b] = out
            self._stream.synchronize()

    # -- public API -----------------------------------------------------------------------
    def input_view(self, plan: Any) -> Any:
        """The static input rows ``[plan.bucket, H]``: write this rank's rows there and call
        ``run(None, plan)`` to skip the input copy (rows past ``num_tokens[own]`` are ignored)."""
        self._check(plan)
        return self._input[:plan.bucket]

    def run(self, x: Any, plan: Any) -> Any:
        """Replay the step for ``plan`` (which must have ``plan.graph``).

        Args:
            x: this rank's rows ``[rows, H]`` (copied into the static input), or None when the
                caller already wrote them into :meth:`input_view`.
            plan: the step's plan; ``plan.graph`` must be True and ``plan.bucket`` a bucket of
                this runner.

        Returns:
            ``[plan.bucket, H]`` view of the runner's static output (valid until the next
            ``run``): rows ``< num_tokens[own]`` hold the combined MLP output, the rest zero.
        """
        ctx = self._ctx

        def check():
            self._check(plan)
            st = ctx.current(plan)
            xr = None if x is None else ctx.rows(x, "x", ctx.hidden_size)
            return st, xr

        def replay(st, xr):
            if xr is not None:
                ctx.plane.copy_input(xr, self._input, st.desc)
            return self._replay(st)

        def dummy(st):
            if getattr(plan, "graph", False) and plan.bucket in self._layouts and plan is st.plan:
                ctx.plane.copy_input(ctx.empty, self._input, st.desc)
                self._replay(st)

        return ctx.call(OP_GRAPH, plan, self._flag, ctx.hidden_size, check, replay, dummy)

    def _replay(self, st):
        b = st.plan.bucket
        be = self._be
        if be.name == "host":
            self._desc_dev[...] = st.desc_host
            return self._body(b)
        stream = be.cupy.cuda.get_current_stream()
        self._desc_dev.data.copy_from_device_async(st.desc.data, st.desc_host.nbytes, stream)
        self._graphs[b].launch(stream)
        return self._outputs[b]

    def _check(self, plan):
        if self._closed:
            raise InputError("this graph runner is closed")
        if not getattr(plan, "graph", False):
            raise InputError(f"run() needs a plan with plan.graph=True (a graph step), got {plan!r}; "
                             f"use DpAttention.gather/scatter for eager steps")
        if plan.bucket not in self._layouts:
            raise InputError(f"plan.bucket={plan.bucket} is not a bucket of this runner {self.buckets}")

    def memory_stats(self) -> dict:
        """Static buffers of the runner (allocated once at creation)."""
        s = self._arena.stats()
        s["input"] = {"reserved_bytes": int(self._in_buf.nbytes), "allocations": 1}
        if self._pool is not None:
            s["graph_pool"] = {"used_bytes": int(self._pool.used_bytes()),
                               "total_bytes": int(self._pool.total_bytes())}
        return s

    def close(self) -> None:
        """Destroy the graphs (before the communicators they captured). Local and idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            try:
                self._stream.synchronize()
            except Exception:
                pass
        self._graphs.clear()
        self._outputs.clear()
        self._arena.release()
        self._pool = None
        self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

