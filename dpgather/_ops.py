"""The one op path: every data-plane call, synchronous or asynchronous, eager or graph replay.

:meth:`OpPath.call` is the protocol of docs/reliability.md, written once:

1. the **target step**: the step the call's ``plan`` denotes, or, when the plan denotes none, the
   step the peers' call is for (:meth:`StepLedger.expected`, decided from synced data only);
2. the call's **signature** (operation, the target's plan and micro-batch, flag, dtype, width)
   enters the step ledger's hash, so ranks that issue different calls disagree at the next
   ``sync()``;
3. the **checks** (``InputError`` naming the argument); with ``strict=True`` every rank agrees
   on the call first;
4. the **work**: the op's copies and collectives, its result in the caller's array type
   (``backend.export``); asynchronous calls run it on their stream (:func:`~dpgather._chain.run_async`)
   and return an :class:`~dpgather.AsyncHandle`;
5. the **failure path**: a call that failed its checks still issues the target step's
   collectives with zero rows (the op's ``idle``), then raises its own error; an error inside the
   failure path aborts the ``DpAttention`` and raises ``CollectiveTimeout`` chained to the
   original error -- except a buffer that cannot grow there either (a step too large to allocate
   on every rank issues nothing on any rank; where only some ranks could allocate, their
   collectives time out). A call that failed after issuing all its collectives (:class:`Issued`, a
   graph runner's ``fn``) only records the failure.

What differs per operation is a row of :data:`OPS` (:class:`OpSpec`: check, work, idle, result
role); the graph runner brings its own rows. Nothing here calls back into ``DpAttention``: the
path holds the rooms it needs (state, ledger, step table, data plane, backend).
"""

from typing import Any, Callable, NamedTuple, Optional

from dpgather.core import CollectiveTimeout, InconsistentStepError, InputError

from . import _checks
from ._chain import run_async
from ._handle import AsyncHandle
from ._layout import (OP_GATHER, OP_GATHER_FP8, OP_GATHER_LOGITS, OP_MASK, OP_SCATTER, OP_SCATTER_LOGITS, mix,
                      signature)

__all__ = ["OpSpec", "OpPath", "Issued", "OPS"]


class Issued(Exception):
    """Raised by a work function that issued every collective of its call and then found
    ``error`` (an ``InputError``): the call fails without a failure path."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class OpSpec(NamedTuple):
    """One operation of the op path.

    ``check(path, st, flag, *args) -> prepared`` validates (raises ``InputError``);
    ``work(path, st, flag, *prepared) -> (result, role)`` runs it (``role``: the arena role the
    result views, None for a caller's buffer); ``idle(path, st, flag, *args)`` issues its
    collectives with zero rows, trusting nothing in the call's ``args`` but the objects the
    library passes itself (None: it has none); ``several``: the call covers the latest ``N`` synced
    micro-batches at once (the overlapped graph runner), ``st`` is then a tuple of steps.
    """

    code: int
    name: str
    check: Callable
    work: Callable
    idle: Optional[Callable] = None
    several: int = 0


class OpPath:
    """Runs calls (module docstring). Attributes are the rooms the ops use: ``state``
    (:class:`~dpgather._lifecycle.State`), ``ledger`` (:class:`~dpgather._ledger.StepLedger`),
    ``steps`` (:class:`~dpgather._steps.StepTable`), ``plane`` (:class:`~dpgather._dataplane.DataPlane`),
    ``backend``, ``events`` (an :class:`~dpgather._chain.EventPool` on CUDA, else None), and the
    configured row format ``hidden_size``, ``storage``, ``dtype`` (logical), ``dtype_code``;
    ``empty``: a ``[0, hidden_size]`` array (the input of a failure path's gather); ``strict``;
    ``micro_batches``."""

    def __init__(self, state, ledger, steps, plane, backend, events, config, storage, dtype_code):
        self.state, self.ledger, self.steps, self.plane = state, ledger, steps, plane
        self.backend, self.events = backend, events
        self.hidden_size, self.dtype, self.storage = config.hidden_size, config.dtype, storage
        self.dtype_code = dtype_code
        self.strict, self.micro_batches = config.strict, config.micro_batches
        self.empty = backend.xp.empty((0, config.hidden_size), dtype=storage)
        #: the quantized gather's format and its result views (None without ``fp8=``)
        self.fp8 = config.fp8
        self.fp8_views = None
        if config.fp8 is not None:
            from ._fp8 import Fp8Views

            self.fp8_views = Fp8Views(backend, config.hidden_size, config.fp8)

    # -- the call -------------------------------------------------------------------------------
    def call(self, spec: OpSpec, plan: Any, args: tuple, flag: int, width: int, stream: Any = None,
             asynchronous: bool = False, refs: tuple = ()) -> Any:
        """Run one call of ``spec`` (module docstring). ``flag``: what the call issues (0/1 for
        contribution or reduce; an invalid value issues its default); ``refs``: the caller's
        arrays an asynchronous handle keeps until ``wait()``."""
        state = self.state
        if state.closed or state.aborted is not None:
            state.check()
        target = self._target(spec, plan)
        sig = self._signature(spec, target, flag, width)
        self.ledger.call(spec.code, None if spec.several or target is None else target.mb, sig)
        error, s, prepared = None, None, None
        try:
            st = target if spec.several else self.steps.resolve(plan)
            prepared = spec.check(self, st, flag, *args)
            if asynchronous:
                s = self.backend.stream(stream, "stream")
        except InputError as e:
            error = e
        if self.strict:
            with state.guard(spec.name):
                verdict = self.ledger.agree_call(spec.name, sig, error)
            if verdict is not None:
                raise verdict.error
        issued = False
        if error is None:
            try:
                if not asynchronous:
                    (st[0] if spec.several else st).held.append(prepared)
                    return spec.work(self, st, flag, *prepared)[0]
                return self._launch(spec, st, flag, prepared, s, refs)
            except Issued as e:
                error, issued = e.error, True
            except (CollectiveTimeout, InconsistentStepError) as e:
                state.abort(f"{spec.name} failed ({e})")
                raise
            except InputError as e:  # a buffer could not grow: raised before any collective
                error = e
        self.ledger.failed(error)
        if spec.idle is not None and target is not None and not issued:
            self._fail(spec, target, flag, s, error, args)
        raise error

    def _target(self, spec, plan):
        """The step(s) the call issues collectives for (module docstring, 1), or None."""
        if spec.several:
            mbs = self.ledger.recent(spec.several)
            return None if mbs is None else tuple(self.steps.steps[mb] for mb in mbs)
        st = self.steps.find(plan)
        if st is None:
            mb = self.ledger.expected(spec.code)
            st = None if mb is None else self.steps.steps[mb]
        return st

    def _signature(self, spec, target, flag, width):
        if target is None:
            return signature(spec.code, 0, flag, self.dtype_code, width)
        if spec.several:
            sig = signature(spec.code, target[0].plan.fingerprint, flag, self.dtype_code, width)
            for st in target:
                sig = mix(sig, st.plan.fingerprint)
            return sig
        key = (spec.code, flag, width)
        sig = target.call_sigs.get((key, target.mb))
        if sig is None:  # the micro-batch is signed too: ranks must interleave micro-batches alike
            sig = target.call_sigs[(key, target.mb)] = signature(spec.code, target.plan.fingerprint,
                                                                 flag + (target.mb << 8), self.dtype_code, width)
        return sig

    def _launch(self, spec, st, flag, prepared, s, refs):
        """An asynchronous call: the work on stream ``s``, and its handle."""
        if s is None:  # the host backend: the call completes here
            (res, role), done = spec.work(self, st, flag, *prepared), None
        else:
            (res, role), done = run_async(self.plane.chain, self.events, self.backend.current_stream(), s,
                                          lambda: spec.work(self, st, flag, *prepared))
        return AsyncHandle(self.state, self.backend, self.events, spec.name, st, s, done, res, refs, role)

    def _fail(self, spec, target, flag, s, error, args):
        """The failure path (module docstring, 5), on the call's stream when it was checked."""
        try:
            if s is None:
                spec.idle(self, target, flag, *args)
            else:
                with s:
                    spec.idle(self, target, flag, *args)
        except Issued:
            pass  # every collective was issued (a graph runner's fn failed again): nothing to abort
        except InputError:
            pass  # its buffers could not grow either: a step too large for every rank moves nothing anywhere
        except Exception as e:
            reason = (f"{spec.name} failed its checks ({error}) and then could not issue the step's collectives "
                      f"({type(e).__name__}: {e})")
            self.state.abort(reason)
            raise CollectiveTimeout(f"{reason}; the DpAttention is aborted") from error

    # -- shared by the ops ------------------------------------------------------------------------
    def rows(self, x, name, writable=False):
        """A hidden-state array (``[rows, hidden_size]`` in the configured dtype); ``writable``:
        the call writes into it (``out=``)."""
        return _checks.rows(self.backend, x, name, self.storage, self.dtype, self.hidden_size, writable)

    def no_alias(self, a, name, roles, st):
        _checks.no_alias(self.backend, a, name, roles, st, self.micro_batches)


# -- the operations -------------------------------------------------------------------------------

def _check_gather(path, st, flag, x, contribution):
    _checks.contribution(contribution)
    xr, origin = path.rows(x, "x")
    path.no_alias(xr, "x", ("gathered", "staging"), st)
    return xr, origin


def _gather(path, st, flag, xr, origin):
    G = path.plane.gather(st.arena, xr, st.hidden, st.desc, bool(flag), st.transport)
    return path.backend.export(G, origin), "gathered"


def _idle_gather(path, st, flag, *args):
    path.plane.gather(st.arena, path.empty, st.hidden, st.desc, bool(flag), st.transport)


def _check_gather_fp8(path, st, flag, x, contribution):
    if path.fp8 is None:
        raise InputError("gather_fp8 needs the wire format at construction: DpAttention(..., "
                         "fp8=dpgather.Fp8Format(group_size=128)) (docs/fp8.md)")
    return _check_gather(path, st, flag, x, contribution)


def _gather_fp8(path, st, flag, xr, origin):
    G = path.plane.gather_fp8(st.arena, xr, st.hidden, st.desc, bool(flag), st.transport, path.fp8)
    return path.fp8_views.export(G, origin), "gathered"


def _idle_gather_fp8(path, st, flag, *args):
    if path.fp8 is not None:  # else no rank has the format: the call raises everywhere, nothing moves
        path.plane.gather_fp8(st.arena, path.empty, st.hidden, st.desc, bool(flag), st.transport, path.fp8)


def _check_gather_logits(path, st, flag, h):
    hr, origin = path.rows(h, "h")
    path.no_alias(hr, "h", ("logits", "staging"), st)
    return hr, origin


def _gather_logits(path, st, flag, hr, origin):
    G = path.plane.gather(st.arena, hr, st.logits, st.desc, False, st.transport, "logits")
    return path.backend.export(G, origin), "logits"


def _idle_gather_logits(path, st, flag, *args):
    path.plane.gather(st.arena, path.empty, st.logits, st.desc, False, st.transport, "logits")


def _check_scatter(path, st, flag, Y, reduce, out):
    _checks.flag(reduce, "reduce")
    Yr, origin = path.rows(Y, "Y")
    if Yr.shape[0] < st.hidden.total:
        raise InputError(f"Y must have at least plan.gathered_rows={st.hidden.total} rows, got {Yr.shape[0]}")
    path.no_alias(Yr, "Y", ("combine", "output"), st)
    o = None
    if out is not None:
        o, _ = path.rows(out, "out", True)
        path.no_alias(o, "out", ("combine", "staging"), st)
        if _checks.overlap(path.backend, Yr, o):
            raise InputError("out must not alias Y (the input is never written)")
    return Yr, origin, o, out


def _scatter(path, st, flag, Yr, origin, o, out):
    y = path.plane.combine(st.arena, Yr, st.hidden, st.desc, bool(flag), o, st.transport)
    if o is not None:
        return out, None
    L = st.hidden
    if L.slot != L.n:  # this replica's own rows (a cached view, no copy)
        y = st.arena.view("output", L.n, Yr.shape[1], Yr.dtype)
    return path.backend.export(y, origin), "output"


def _idle_scatter(path, st, flag, *args):
    if flag:  # a copy (reduce=False) has no collective
        Z = st.arena.view("staging", st.hidden.total, path.hidden_size, path.storage)
        path.backend.zero(Z)
        path.plane.combine(st.arena, Z, st.hidden, st.desc, True, None, st.transport)


def _check_scatter_logits(path, st, flag, L_rows, out):
    Lr, origin = _checks.any_rows(path.backend, L_rows, "L")
    if Lr.shape[0] < st.logits.total:
        raise InputError(f"L must have at least plan.logits_rows={st.logits.total} rows, got {Lr.shape[0]}")
    path.no_alias(Lr, "L", ("logits_output",), st)
    o = None
    if out is not None:
        o, _ = _checks.any_rows(path.backend, out, "out", True)
        if o.dtype != Lr.dtype or o.shape[1] != Lr.shape[1]:
            raise InputError(f"out must be [rows, {Lr.shape[1]}] of dtype {Lr.dtype}, got {tuple(o.shape)} {o.dtype}")
        if _checks.overlap(path.backend, Lr, o):
            raise InputError("out must not alias L (the input is never written)")
    return Lr, origin, o, out


def _scatter_logits(path, st, flag, Lr, origin, o, out):
    if o is not None:
        path.plane.unpack_logits(Lr, o, st.desc)
        return out, None
    L = st.logits
    y = st.arena.view("logits_output", L.slot, Lr.shape[1], Lr.dtype)
    path.plane.unpack_logits(Lr, y, st.desc)
    if L.slot != L.n:
        y = st.arena.view("logits_output", L.n, Lr.shape[1], Lr.dtype)
    return path.backend.export(y, origin), "logits_output"


def _check_mask(path, st, flag, topk_ids, fill):
    ids = _checks.ids(path.backend, topk_ids, st.hidden.total)
    return ids, _checks.fill(fill, ids.dtype), topk_ids


def _mask(path, st, flag, ids, fill, topk_ids):
    path.plane.mask(ids, st.desc, fill)
    return topk_ids, None


#: The operations of ``DpAttention`` (the graph runner adds its own).
OPS = {
    "gather": OpSpec(OP_GATHER, "gather", _check_gather, _gather, _idle_gather),
    "gather_fp8": OpSpec(OP_GATHER_FP8, "gather_fp8", _check_gather_fp8, _gather_fp8, _idle_gather_fp8),
    "gather_logits": OpSpec(OP_GATHER_LOGITS, "gather_logits", _check_gather_logits, _gather_logits,
                            _idle_gather_logits),
    "scatter": OpSpec(OP_SCATTER, "scatter", _check_scatter, _scatter, _idle_scatter),
    "scatter_logits": OpSpec(OP_SCATTER_LOGITS, "scatter_logits", _check_scatter_logits, _scatter_logits),
    "mask_topk_ids": OpSpec(OP_MASK, "mask_topk_ids", _check_mask, _mask),
}
