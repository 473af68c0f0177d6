"""Graph runner: capture and replay of pack -> gather -> fn -> combine -> unpack per bucket.

On the CUDA backend each graph bucket ``b`` is captured once (MAX_LEN, ``b`` rows per slot) with
static buffers: one input buffer of ``max(bucket)`` rows, one gathered/staging/combine/output set
sized for the largest bucket that every bucket's graph views a prefix of (the deferred
allocation of SGLang #8277, taken further: no buffer is allocated per step, and all buckets share
one allocation). The copy kernels read the step's counts from a static device descriptor that
``run`` refreshes with one asynchronous upload from pinned memory, so a replay serves any counts
up to its bucket. On the host backend ``run`` executes the same steps eagerly on the same static
buffers, so code written against the runner is portable and CI-tested.

``fn`` receives the gathered buffer ``G`` (``[D*b, H]``, padding rows zero) and returns ``Y`` of
the same shape (the MLP output, TP-partial when ``reduce=True``). On CUDA ``fn`` is run once
eagerly per bucket (warm-up) and then captured; it must be capturable (no host syncs, no
allocation sizes that depend on data). CuPy refuses cuBLAS calls during stream capture
(``NotImplementedError``), so ``G @ W`` with CuPy cannot be captured: call cuBLAS directly with a
handle whose stream and workspace are set before capture (:mod:`dpgather.tools.cublas` does), or use
elementwise / RawKernel code. Its intermediate arrays come from a private CuPy memory
pool owned by the runner, kept alive with the graphs.
"""

import numpy as np

from dpgather.core import InputError, LocalBatch, ForwardMode

from ._arena import Arena

__all__ = ["GraphRunner"]


class GraphRunner:
    """Captured (CUDA) or eager (host) gather -> fn -> combine for every graph bucket.

    Made by :meth:`DpAttention.graph_runner`; see the module docstring.

    Args:
        dp: the owning :class:`DpAttention` (its ``graph_buckets`` must be non-empty).
        fn: ``fn(G) -> Y`` on backend arrays.
        contribution: ``"replicate"`` or ``"partial"`` (as for ``gather``).
        reduce: combine with a sum over ranks (True) or a copy (False).
    """

    def __init__(self, dp, fn, contribution="replicate", reduce=True):
        from ._facade import _Step, _Layout, _HIDDEN, _MASK_AT

        buckets = dp.planner.graph_buckets
        if not buckets:
            raise InputError("graph_runner needs DpAttention(graph_buckets=...) with at least one bucket")
        if contribution not in ("replicate", "partial"):
            raise InputError(f"contribution must be 'replicate' or 'partial', got {contribution!r}")
        if not callable(fn):
            raise InputError(f"fn must be callable, got {fn!r}")
        self._dp = dp
        self._fn = fn
        self._partial = contribution == "partial"
        self._reduce = bool(reduce)
        self.buckets = buckets
        self._closed = False
        be = dp._backend
        self._be = be
        D, H, A = dp.topology.dp_size, dp.hidden_size, dp.topology.attn_tp_size
        bmax = buckets[-1]
        row = H * dp._storage.itemsize
        self._arena = Arena(be.alloc)
        self._arena.reserve("gathered", D * bmax * row)
        self._arena.reserve("staging", 2 * bmax * row + 1024)
        self._arena.reserve("combine", 2 * bmax * row + 1024)
        self._arena.reserve("output", bmax * row)
        self._in_buf = be.alloc(bmax * row)
        self._input = self._in_buf.view(dp._storage).reshape(bmax, H)
        self._desc_host = np.zeros(_MASK_AT + 3 * D, dtype=np.int64)
        self._desc_dev = be.upload(self._desc_host) if be.name == "host" else be.xp.zeros(self._desc_host.size, dtype=be.xp.int64)
        self._layouts = {}
        self._outputs = {}
        self._graphs = {}
        self._pool = None
        self._stream = None
        for b in buckets:
            plan = dp.planner.plan_batches([LocalBatch(ForwardMode.DECODE, b)] * D)
            st = _Step()
            st.plan = plan
            st.desc_host = self._desc_host
            st.desc = self._desc_dev
            st.hidden = _Layout(plan.mode, plan.num_tokens, plan.slot_rows, plan.slot_offsets,
                                plan.gathered_rows, dp.dp_rank, dp.attn_tp_rank, A, _HIDDEN,
                                np.zeros_like(self._desc_host))
            st.logits = None
            self._layouts[b] = st
        if be.name == "cuda":
            self._capture()

    # -- the step, as captured or run eagerly ----------------------------------------------
    def _body(self, b):
        dp, st = self._dp, self._layouts[b]
        x = self._input[:b]
        G = dp._gather_into(self._arena, x, st, st.hidden, self._partial)
        Y = self._fn(G)
        Yr = dp._rows(Y, "fn(G)", dp.hidden_size)
        if Yr.shape[0] < G.shape[0]:
            raise InputError(f"fn(G) must return at least {G.shape[0]} rows, got {Yr.shape[0]}")
        return dp._scatter_into(self._arena, Yr, st, st.hidden, self._reduce, None)

    def _capture(self):
        cupy = self._be.cupy
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
    def input_view(self, plan):
        """The static input rows ``[plan.bucket, H]``: write this rank's rows there and call
        ``run(None, plan)`` to skip the input copy (rows past ``num_tokens[own]`` are ignored)."""
        self._check(plan)
        return self._input[:plan.bucket]

    def run(self, x, plan):
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
        dp = self._dp
        self._check(plan)
        b = plan.bucket
        st = dp._state(plan)
        if x is not None:
            xr = dp._rows(x, "x", dp.hidden_size)
            self._be.copy_rows(xr, self._input, st.desc, 0)
        be = self._be
        if be.name == "host":
            self._desc_host[:] = st.desc_host
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

    def memory_stats(self):
        """Static buffers of the runner (allocated once at creation)."""
        s = self._arena.stats()
        s["input"] = {"reserved_bytes": int(self._in_buf.nbytes), "allocations": 1}
        if self._pool is not None:
            s["graph_pool"] = {"used_bytes": int(self._pool.used_bytes()),
                               "total_bytes": int(self._pool.total_bytes())}
        return s

    def close(self):
        """Destroy the graphs (before the communicators they captured). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.synchronize()
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
