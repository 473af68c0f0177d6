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

``fn`` receives the gathered buffer ``G`` (``[D*b, H]``, padding rows zero; with ``fp8=True`` the
quantized gather's :class:`~dpgather.Fp8Rows` of those rows instead, docs/fp8.md) and returns ``Y``
of ``[D*b, H]`` rows in the configured dtype (the MLP output, TP-partial when ``reduce=True``). On CUDA ``fn`` is run once
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

Failures: ``run`` is one call of the owner's op path (:mod:`dpgather._ops`), so a bad argument
on one rank follows the contract of every call (docs/reliability.md): that rank replays the graph
of the step its peers replay -- the current step of the micro-batch the ledger expects, or, for
an overlapped runner, the micro-batches synced last -- with zero rows, then raises. On the host
backend ``fn`` runs eagerly: if it raises or returns a bad array on one rank, that rank combines
zeros instead (so its peers' combine completes) and then raises.
"""

from typing import Any

import numpy as np

from dpgather.core import ForwardMode, InputError, LocalBatch

from dpgather.dist.base import Closing

from . import _checks
from ._arena import Arena
from ._layout import OP_GRAPH, Layout
from ._ops import Issued, OpSpec
from ._steps import arena_sizes

#: The largest ``micro_batches`` of an overlapped runner.
MAX_RUNNER_MICRO_BATCHES = 16

__all__ = ["GraphRunner"]


class GraphRunner(Closing):
    """Captured (CUDA) or eager (host) gather -> fn -> combine for every graph bucket.

    Made by :meth:`DpAttention.graph_runner`; see the module docstring.

    Args:
        path: the owning ``DpAttention``'s op path (:class:`~dpgather._ops.OpPath`: its data
            plane, backend, step table and call protocol).
        planner: the owner's planner (its ``graph_buckets`` must be non-empty).
        fn: ``fn(G) -> Y`` on backend arrays.
        contribution: ``"replicate"`` or ``"partial"`` (as for ``gather``).
        reduce: combine with a sum over ranks (True) or a copy (False).
        micro_batches: 1 (one micro-batch per step: ``run(x, plan)``) or ``N > 1`` (the
            overlapped step of ``N`` micro-batches: ``run(xs, plans)``).
        fp8: gather with the owner's quantized gather (``DpAttention(fp8=...)``): ``fn``
            receives :class:`~dpgather.Fp8Rows` (backend arrays) instead of ``G``.

    Static memory: per micro-batch one input of ``max(bucket)`` rows and one gathered / staging /
    combine / output set for the largest bucket (:meth:`memory_stats`), plus ``fn``'s private
    pool; nothing is allocated per step.
    """

    def __init__(self, path, planner, fn, contribution="replicate", reduce=True, micro_batches=1, fp8=False):
        buckets = planner.graph_buckets
        if not buckets:
            raise InputError("graph_runner needs DpAttention(graph_buckets=...) with at least one bucket")
        partial = _checks.contribution(contribution)
        reduce = _checks.flag(reduce, "reduce")
        if not callable(fn):
            raise InputError(f"fn must be callable, got {fn!r}")
        if isinstance(micro_batches, (bool, np.bool_)) or not isinstance(micro_batches, (int, np.integer)) \
                or not 1 <= micro_batches <= MAX_RUNNER_MICRO_BATCHES:
            raise InputError(f"micro_batches must be an int in [1, {MAX_RUNNER_MICRO_BATCHES}] (1: one step per "
                             f"run; N > 1: the overlapped step of N micro-batches), got {micro_batches!r}")
        fp8 = _checks.flag(fp8, "fp8")
        if fp8 and path.fp8 is None:
            raise InputError("graph_runner(fp8=True) needs the wire format at construction: DpAttention(..., "
                             "fp8=dpgather.Fp8Format(group_size=128)) (docs/fp8.md)")
        N = self.micro_batches = int(micro_batches)
        self._path, self._fn = path, fn
        self._partial, self._reduce = bool(partial), bool(reduce)
        self._fp8 = path.fp8 if fp8 else None
        self._flag = 2 * partial + reduce + 4 * (N - 1) + 64 * fp8
        self._spec = (OpSpec(OP_GRAPH, "GraphRunner.run", _check_one, _work_one, _idle_one) if N == 1 else
                      OpSpec(OP_GRAPH, "GraphRunner.run", _check_many, _work_many, _idle_many, several=N))
        self.buckets = buckets
        self._closed = False
        be = self._be = path.backend
        plane = path.plane
        D = planner.topology.dp_size
        H, bmax = path.hidden_size, buckets[-1]
        row = H * path.storage.itemsize
        sizes = arena_sizes(D, planner.topology.attn_tp_size, bmax,
                            max(row, self._fp8.wire_bytes(H)) if self._fp8 else row, graph=True,
                            node_replicas=plane.node_step if plane.inter is not None else 0)
        self._arenas, self._inputs, self._descs = [], [], []
        size = path.steps.descriptor.size
        for _ in range(N):
            arena = Arena(be.alloc)
            for role, nbytes in sizes.items():
                arena.reserve(role, nbytes)
            self._arenas.append(arena)
            self._inputs.append(be.alloc(bmax * row).view(path.storage).reshape(bmax, H))
            self._descs.append(be.xp.zeros(size, dtype=be.xp.int64))
        self._layouts = {}
        self._transport = {}  # bucket -> the graph step's transport (the planner's rule for graphs)
        for b in buckets:
            plan = planner.plan_batches([LocalBatch(ForwardMode.DECODE, b, can_run_graph=True)] * D)
            self._layouts[b] = Layout.hidden(plan, path.steps.dp_rank, path.steps.attn_tp_rank)
            self._transport[b] = plan.transport
        self._ring = ("runner", id(self))  # the backend's upload ring of the re-laid descriptors
        if N > 1:  # create it now: a replay never allocates
            be.upload(np.zeros(size, dtype=np.int64), out=self._descs[0], ring=self._ring)
        self._outputs = {}
        self._graphs = {}
        self._pool = self._stream = self._side = self._evs = None  # the capture's (CUDA)
        if be.graphs:
            self._capture()

    # -- the step, as captured or run eagerly ----------------------------------------------
    def _body(self, b, errors):
        """One step of bucket ``b`` on the static buffers; ``fn``'s failures go to ``errors``."""
        if self.micro_batches > 1:
            return self._body_overlap(b, errors)
        plane, L, tr = self._path.plane, self._layouts[b], self._transport[b]
        G = self._gather(self._arenas[0], self._inputs[0][:b], L, self._descs[0], tr)
        Yr = self._apply(G, self._arenas[0], errors)
        return plane.combine(self._arenas[0], Yr, L, self._descs[0], self._reduce, None, tr)

    def _gather(self, arena, x, L, desc, tr):
        """The step's gather (the quantized one with ``fp8``): ``G``, or the wire rows."""
        plane = self._path.plane
        if self._fp8 is None:
            return plane.gather(arena, x, L, desc, self._partial, tr)
        return plane.gather_fp8(arena, x, L, desc, self._partial, tr, self._fp8)

    def _apply(self, G, arena, errors):
        """``fn(G)`` (with ``fp8``: ``fn`` of the :class:`~dpgather.Fp8Rows` of the wire rows
        ``G``) checked. When it raises or returns a bad array the step goes on with zeros (the
        peers' combine needs this rank's collectives) and the error is kept in ``errors``."""
        path = self._path
        try:
            if self._fp8 is not None:
                from ._fp8 import Fp8Rows

                Yr, _ = path.rows(self._fn(Fp8Rows(*path.fp8_views.split(G), G)), "fn(G)")
            else:
                Yr, _ = path.rows(self._fn(G), "fn(G)")
            if Yr.shape[0] < G.shape[0]:
                raise InputError(f"fn(G) must return at least {G.shape[0]} rows, got {Yr.shape[0]}")
            return Yr
        except Exception as e:
            errors.append(e)
            Z = arena.view("staging", G.shape[0], path.hidden_size, path.storage)
            self._be.zero(Z)
            return Z

    def _body_overlap(self, b, errors):
        """The overlapped step of bucket ``b`` (module docstring); returns ``(outputs, Ys)``: the
        ``N`` combined outputs and the ``fn`` results, which the caller keeps alive until the
        capture ended (a freed ``Y_i`` could be reused by ``fn``'s next allocation while combine
        ``i`` still reads it on the second stream)."""
        L, tr, N = self._layouts[b], self._transport[b], self.micro_batches
        plane, main, side, ev = self._path.plane, self._stream, self._side, self._evs

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
            Gs.append(on(side, lambda i=i: self._gather(self._arenas[i], self._inputs[i][:b], L, self._descs[i],
                                                        tr)))
            if ev:
                ev["g"][i].record(side)
        outs, Ys = [], []
        for i in range(N):
            if ev:
                main.wait_event(ev["g"][i])
            Yr = on(main, lambda i=i: self._apply(Gs[i], self._arenas[i], errors))
            Ys.append(Yr)
            edge(main, side, ev and ev["y"][i])
            outs.append(on(side, lambda i=i, Yr=Yr: plane.combine(self._arenas[i], Yr, L, self._descs[i],
                                                                  self._reduce, None, tr)))
        edge(side, main, ev and ev["join"])
        return outs, Ys

    def _capture(self):
        cupy = self._be.cupy
        self._be.warm()
        cupy.cuda.Device().synchronize()  # nothing of the owner in flight: the warm-up is unordered
        self._pool = cupy.cuda.MemoryPool()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        if self.micro_batches > 1:
            self._side = cupy.cuda.Stream(non_blocking=True)

            def mk():
                return cupy.cuda.Event(block=False, disable_timing=True)

            N = self.micro_batches
            self._evs = {"fork": mk(), "join": mk(), "g": [mk() for _ in range(N)], "y": [mk() for _ in range(N)]}
        errors = []
        with self._path.plane.chain.suspended(), cupy.cuda.using_allocator(self._pool.malloc), self._stream:
            for b in self.buckets:
                self._body(b, errors)  # warm-up: compiles kernels, fills the private pool
            cupy.cuda.Device().synchronize()
            if errors:  # the warm-up's collectives all ran: the peers are not left waiting
                raise errors[0]
            for b in self.buckets:
                self._stream.begin_capture()
                try:
                    out = self._body(b, errors)
                finally:
                    graph = self._stream.end_capture()
                if errors:
                    raise errors[0]
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
        i = _checks.index(index, "index", self.micro_batches, " (the runner's micro-batch)")
        return self._inputs[i][:plan.bucket]

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
            ``N > 1`` a list of ``N`` such views, one per micro-batch. In the caller's array
            type (the type of ``x``).
        """
        return self._path.call(self._spec, plan, (self, x, plan), self._flag, self._path.hidden_size)

    def _replay(self, sts, xrs):
        """Inputs, descriptors and the graph of the largest bucket among ``sts``' plans, as one
        operation of the owner's launch chain. Returns the ``N`` output views (bucket rows)."""
        b = max(st.plan.bucket for st in sts)
        be, plane, N = self._be, self._path.plane, self.micro_batches
        chain = plane.chain
        s, cap = chain.enter()
        for i in range(N):
            if xrs[i] is not None:
                plane.copy_input(xrs[i], self._inputs[i], sts[i].desc)
        for i, st in enumerate(sts):
            if st.plan.bucket == b:
                be.copy_into(self._descs[i], st.desc)
            else:
                be.upload(self._path.steps.relaid(st, b), out=self._descs[i], ring=self._ring)
        if self._graphs:
            self._graphs[b].launch(s)
            outs = self._outputs[b] if N > 1 else [self._outputs[b]]
        else:
            errors = []
            out = self._body(b, errors)
            outs = out[0] if N > 1 else [out]
            if errors:
                chain.leave(s, cap)
                raise Issued(errors[0])
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

    def _replayable(self, st):
        return st is not None and st.plan.graph and st.plan.bucket in self._layouts and not self._closed

    def memory_stats(self) -> dict:
        """Static buffers of the runner (allocated once at creation), summed over its
        micro-batches."""
        s = Arena.total(self._arenas)
        s["input"] = {"reserved_bytes": int(sum(x.nbytes for x in self._inputs)), "allocations": len(self._inputs)}
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



# -- the runner's rows of the op path: ``args`` are ``(runner, x, plan)`` -------------------------

def _check_one(path, st, flag, runner, x, plan):
    runner._check(plan)
    xr, origin = (None, None) if x is None else path.rows(x, "x")
    return runner, xr, origin


def _work_one(path, st, flag, runner, xr, origin):
    out = runner._replay([st], [xr])[0]
    return path.backend.export(out, origin), None


def _idle_one(path, st, flag, runner, x, plan):
    if runner._replayable(st):
        runner._replay([st], [path.empty])


def _check_many(path, target, flag, runner, xs, plans):
    N = runner.micro_batches
    if not isinstance(plans, (list, tuple)) or len(plans) != N:
        raise InputError(f"plan must be a list of {N} plans (one per micro-batch, from sync(batch, micro_batch=i)) "
                         f"for this micro_batches={N} runner, got {plans!r}")
    if xs is not None and (not isinstance(xs, (list, tuple)) or len(xs) != N):
        raise InputError(f"x must be None or a list of {N} inputs (one per micro-batch, None where "
                         f"input_view(plan, i) was written), got {type(xs).__name__}")
    sts = []
    for i, p in enumerate(plans):
        runner._check(p, f"plan[{i}]")
        sts.append(path.steps.resolve(p))
    xrs, origin = [], None
    for i in range(N):
        xr = None
        if xs is not None and xs[i] is not None:
            xr, origin = path.rows(xs[i], f"x[{i}]")
        xrs.append(xr)
    return runner, sts, xrs, origin


def _work_many(path, target, flag, runner, sts, xrs, origin):
    outs = runner._replay(sts, xrs)
    return [path.backend.export(o[:st.plan.bucket], origin) for o, st in zip(outs, sts)], None


def _idle_many(path, target, flag, runner, xs, plans):
    if all(runner._replayable(st) for st in target):
        runner._replay(list(target), [path.empty] * runner.micro_batches)
