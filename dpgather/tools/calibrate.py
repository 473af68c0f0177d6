"""``dg.calibrate()``: measure the cost model's constants on this machine (docs/cost-model.md).

Every rank of ``comm`` (the tp group, one GPU per rank) takes part. For each collective of
:data:`~dpgather.core.cost.COLLECTIVES` it times several buffer sizes, fits ``(a0, a1, beta)`` of

    t(P, B; k) = a0 + a1 * (k - 1) + B * f * (P - 1) / P / (beta * 1e3)      [us]

by least squares on the *relative* error (each sample weighted by ``1 / t``), and returns a
:class:`~dpgather.core.cost.CostModel` (also saved as JSON on rank 0 when ``out`` is given, with
the card, rank count, date, NCCL/MPI version and the fit errors in ``meta``). ``a0`` and ``a1``
are separated by varying ``k``: the native collectives run over the whole group (``k = P``) and
over pairs of ranks (``k = 2``, when ``P >= 4`` is even), the v-collectives over the whole group
with ``k = 1..P`` non-empty roots. ``copy_GBps`` comes from a device-to-device copy (bytes read +
written). Each time is the median of ``reps`` repetitions of back-to-back calls, the maximum over
ranks, so every rank fits the same samples and returns the same model.

CUDA backend (CuPy sees a GPU on every rank): NCCL through :class:`dpgather.dist.NcclCommunicator`,
CUDA events. Host backend (anything else): the MPI host collectives of
:class:`dpgather.dist.MpiHostCommunicator` and ``time.perf_counter`` -- the constants then
describe the host backend, which is what ``policy="auto"`` plans for there. Both are timed by
the protocol of :mod:`dpgather.tools.timing` (the benchmarks' own).

Command line (``dpgather calibrate`` is the same program)::

    mpirun -n 4 python -m dpgather.tools.calibrate --out cost.json [--sizes 1,8,64,...] [--hidden 7168]
        [--dtype bfloat16] [--backend auto|cuda|host] [--reps N]

then ``DpAttention(..., cost=CostModel.load("cost.json"))``.
"""

import datetime
import os
import platform
import sys
import time

import numpy as np

from dpgather.core import PUSH_WINDOW_ROWS, ConfigError, CostModel, DpGatherError
from dpgather.core.cost import COLLECTIVES, CURVE_POINTS, cache_path

from ._common import EXIT_OK, EXIT_VERIFY, Parser, gpu_count, positive_float, positive_int, require_mpi, say_error
from .timing import Column, CupyEvents, HostClock, Timer, format_table

__all__ = ["calibrate", "fit_collective", "fit_curves", "flag_fits", "main", "DEFAULT_SIZES_CUDA",
           "DEFAULT_SIZES_HOST", "MAX_RESIDUAL", "MIN_LINK_SHARE"]

#: Rows (tokens) per rank timed by default: ``hidden`` elements each.
DEFAULT_SIZES_CUDA = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_SIZES_HOST = (1, 4, 16, 64)
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4, "int64": 8, "uint8": 1}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32, "int32": np.int32,
            "int64": np.int64, "uint8": np.uint8}
_TARGET_US = 1000.0  # aim of one repetition of back-to-back calls
#: Largest relative residual ``|model - t| / t`` a fit may leave on any of its samples before it is
#: flagged and neither written nor cached (docs/cost-model.md, "Flagged fits").
MAX_RESIDUAL = 0.5
#: Least share of its sample's time a link time must be to count as a measurement of the link.
MIN_LINK_SHARE = 0.05
_KMAX = 32


# -- fitting -------------------------------------------------------------------------------------

def _factor(name):
    return 2.0 if name == "all_reduce" else 1.0


def _nnls_subsets(cols, names, t, target):
    """Best non-negative weighted least-squares fit of ``target ~ sum coef_n * cols[n]`` (relative
    error: rows weighted by ``1/t``) over the subsets of ``names`` held free (the others at 0).
    Returns ``(coef dict, sum of squared relative errors)`` or ``(None, inf)``."""
    w = 1.0 / t
    best, best_err = None, float("inf")
    for mask in range(1, 1 << len(names)):
        free = [n for i, n in enumerate(names) if mask >> i & 1]
        Amat = np.stack([cols[n] * w for n in free], axis=1)
        sol, *_ = np.linalg.lstsq(Amat, target * w, rcond=None)
        if not np.all(np.isfinite(sol)) or np.any(sol < 0):
            continue
        coef = dict(zip(free, sol.tolist()))
        pred = sum(cols[n] * coef[n] for n in free)
        err = float(np.sum(((pred - target) / t) ** 2))
        if err < best_err:
            best, best_err = coef, err
    return best, best_err


def fit_collective(name, samples, default=None):
    """Fit ``(a0, a1, beta)`` of one collective to ``samples`` = ``[(P, k, B, t_us), ...]``.

    Least squares on the relative error, with ``a0, a1 >= 0`` and ``beta > 0`` (the best of the
    fits with each subset of the terms held at zero). When every sample has the same ``k``,
    ``a0`` and ``a1`` cannot be told apart: their sum at that ``k`` is fitted and split in the
    ratio of ``default``. When the bandwidth term is not identified -- no positive slope, or it
    explains under 5 % of the largest sample's time (all sizes latency-bound) -- ``beta`` keeps
    its default and the latency terms are refitted with it.

    Returns ``((a0, a1, beta), {"n", "rel_err_min", "rel_err_max", "note"})``.
    """
    d0, d1, dbeta = default if default is not None else CostModel().params[name]
    f = _factor(name)
    S = [(int(P), int(k), float(B), float(t)) for P, k, B, t in samples if P > 1 and t > 0]
    if not S:
        return (d0, d1, dbeta), {"n": 0, "rel_err_min": None, "rel_err_max": None,
                                 "note": "no samples: defaults kept"}
    t = np.array([s[3] for s in S])
    km1 = np.array([s[1] - 1 for s in S], dtype=float)
    g = np.array([s[2] * f * (s[0] - 1) / s[0] / 1e3 for s in S])
    notes = []
    single_k = len(set(km1.tolist())) == 1
    K = float(km1[0])
    cols = {"alpha": np.ones_like(t)} if single_k else {"a0": np.ones_like(t), "a1": km1}
    cols["ib"] = g
    lat = [n for n in cols if n != "ib"]
    coef, _ = _nnls_subsets(cols, lat + ["ib"], t, t)
    ib = coef.get("ib", 0.0) if coef else 0.0
    if ib <= 0 or float(np.max(g * ib / t)) < 0.05:
        ib = 1.0 / dbeta
        notes.append("bandwidth not identified: default beta kept")
        coef, _ = _nnls_subsets(cols, lat, t, np.maximum(t - g * ib, 0.0) + 1e-12 * t)
        if coef is None:
            coef = {}
            notes.append("latency not identified: 0")
    if single_k:
        alpha = coef.get("alpha", 0.0)
        split = (d0 + d1 * K) or 1.0
        a0, a1 = alpha * d0 / split, alpha * d1 / split
        notes.append(f"one k ({int(K) + 1}): alpha split {d0:g}:{d1:g} as the defaults")
    else:
        a0, a1 = coef.get("a0", 0.0), coef.get("a1", 0.0)
    beta = 1.0 / ib
    pred = a0 + a1 * km1 + g / beta
    rel = (pred - t) / t
    return (float(a0), float(a1), float(beta)), {
        "n": len(S), "rel_err_min": float(rel.min()), "rel_err_max": float(rel.max()),
        "note": "; ".join(notes) or None}


def _monotone_points(triples):
    """A curve from ``[(x, link, scale)]`` (bytes per direction, the link time a sample gave, the
    time that link time is a part of): the points whose link time is at least
    :data:`MIN_LINK_SHARE` of ``scale`` (smaller ones are the latency fit's noise, not a
    measurement of the link), sorted by ``x`` (the last of a repeated ``x`` kept), each raised to
    at least the one before (more bytes never cost less), at most
    :data:`~dpgather.core.cost.CURVE_POINTS` points (evenly thinned, the ends kept).

    Returns ``(points, residuals)``: ``residuals`` holds, per sample, ``(curve time - link) /
    scale`` with the curve's time at the sample's ``x`` (before thinning; 0 for a dropped
    point), the sample's relative error under the model that prices it."""
    by_x = {}
    for x, link, scale in triples:
        if x > 0 and link >= MIN_LINK_SHARE * scale:
            by_x[float(x)] = float(link)
    pts, top, at = [], 0.0, {}
    for x in sorted(by_x):
        top = max(top, by_x[x])
        pts.append([x, top])
        at[x] = top
    residuals = [(at.get(float(x), 0.0) - link) / scale for x, link, scale in triples if x > 0 and scale > 0]
    if len(pts) > CURVE_POINTS:
        keep = np.unique(np.linspace(0, len(pts) - 1, CURVE_POINTS).round().astype(int))
        pts = [pts[i] for i in keep]
    return pts, residuals


def _p2p_copies_us(nmax, S, row_bytes, copy_GBps):
    """The local copies of one P2P pull gather + combine (us), as the planner prices them: the
    pack and own-row copy of the largest replica, the pack of every row of the partial and its
    own rows read back (docs/cost-model.md, "P2P"; ``copy_GBps`` counts bytes read + written)."""
    return 2.0 * (3.0 * nmax + S) * row_bytes / (copy_GBps * 1e3)


def _push_copies_us(nmax, S, row_bytes, copy_GBps):
    """The local copies of one push gather + combine (us), as the planner prices them: the own
    rows copied from the input (gather) and read from it (combine) (docs/cost-model.md, "Push")."""
    return 3.0 * nmax * row_bytes / (copy_GBps * 1e3)


#: The P2P transports the calibration times through ``DpAttention``: their local copies and the
#: bytes on the wire per data byte (the push's LL lines carry 8 data bytes in 16).
TRANSPORTS = {"p2p": (_p2p_copies_us, 1.0), "push": (_push_copies_us, 2.0)}


def fit_curves(params, samples, row_bytes, copy_GBps):
    """Link-time curves of :data:`~dpgather.core.cost.CURVED` (docs/cost-model.md, "Link time")
    from the calibration's samples, after their latency ``a0 + a1*(k-1)`` (from ``params``).

    - gatherv / reduce_scatterv, ``(P, k, B, t)`` with ``k`` roots of ``B/k`` bytes each: at
      ``P = 2`` one root moves ``B`` one way (curve ``"one"``), two roots ``B/2`` each way
      (``"both"``); at ``P > 2`` the ring forwards in both directions, so only ``k = P`` (every
      rank receives and passes on ``(P-1)/P * B``) gives points, on ``"both"``.
    - p2p and push, ``(P, k, B, t)`` gather + combine of ``B / (k R)`` rows on ``k`` ranks
      (``k = P`` balanced, ``k = 1`` one rank): ``t = 2a + 2 link + copies`` with the planner's
      copy term; ``k = P``: ``(P-1)`` rows each way (``"both"``), ``k = 1``: the loaded rank's
      rows go ``(P-1)`` times one way (``"one"``); ``x`` counts the bytes on the wire (the
      push's: twice the data, :data:`TRANSPORTS`).

    Returns ``(curves, residuals)``: ``curves`` = ``{name: {"one": [[x, us], ...], "both": [...]}}``
    (empty curves left out), ``residuals`` = ``{name: [relative error of each sample that gave a
    point]}`` (see :func:`_monotone_points`; what :func:`flag_fits` judges).
    """
    points = {name: {"one": [], "both": []} for name in ("gatherv", "reduce_scatterv", *TRANSPORTS)}
    for name in ("gatherv", "reduce_scatterv"):
        a0, a1, _ = params[name]
        for P, k, B, t in samples.get(name, ()):
            P, k = int(P), int(k)
            if P < 2 or k < 1 or B <= 0:
                continue
            link = t - (a0 + a1 * (k - 1))
            if k == P:
                points[name]["both"].append(((P - 1) * B / P, link, t))
            elif P == 2 and k == 1:
                points[name]["one"].append((B, link, t))
    for name, (copies, wire) in TRANSPORTS.items():
        if not samples.get(name):
            continue
        a0, a1, _ = params[name]
        for P, k, B, t in samples[name]:
            P, k = int(P), int(k)
            if P < 2 or B <= 0:
                continue
            rows = B / (k * row_bytes)
            link = (t - 2 * (a0 + a1 * (P - 1)) - copies(rows, k * rows, row_bytes, copy_GBps)) / 2
            points[name]["both" if k == P else "one"].append((wire * (P - 1) * rows * row_bytes, link, t / 2))
    curves, residuals = {}, {}
    for name, sides in points.items():
        for which, triples in sides.items():
            if not triples:
                continue
            pts, res = _monotone_points(triples)
            residuals.setdefault(name, []).extend(res)
            if pts:
                curves.setdefault(name, {})[which] = pts
    return curves, residuals


def flag_fits(fits, residuals, curves, bound):
    """``{collective: reason}`` of the fits whose samples' relative residuals exceed ``bound``
    (docs/cost-model.md, "Flagged fits"): a collective with a curve is judged by the model that
    prices it (its latency plus the curve, ``residuals`` of :func:`fit_curves`), any other by its
    alpha-beta fit (``fits[c]["rel_err_min" / "rel_err_max"]``). Unmeasured ones are not judged."""
    flagged = {}
    for c, f in fits.items():
        if c in curves:
            errs = residuals.get(c, [])
            lo, hi = (min(errs), max(errs)) if errs else (0.0, 0.0)
            what = "latency + link-time curve"
        elif f["n"]:
            lo, hi, what = f["rel_err_min"], f["rel_err_max"], "alpha-beta fit"
        else:
            continue
        if max(-lo, hi) > bound:
            flagged[c] = f"{what} off by {100 * lo:+.0f}%..{100 * hi:+.0f}% (bound +-{100 * bound:.0f}%)"
    return flagged


# -- timing ----------------------------------------------------------------------------------

class _Cuda:
    """NCCL through :class:`dpgather.dist.NcclCommunicator`, timed with CUDA events."""

    name = "cuda"

    def __init__(self, comm, timeout_s):
        import cupy

        from dpgather.dist import NcclCommunicator

        self.cupy = cupy
        self.tp = NcclCommunicator(comm, timeout_s=timeout_s)
        self.clock = CupyEvents()
        self.comm = comm

    def empty(self, rows, width, dtype):
        a = self.cupy.zeros((rows, width), dtype=dtype)
        self.cupy.cuda.Device().synchronize()  # made on the null stream, used on a non-blocking one
        return a

    def copy_GBps(self, nbytes=256 << 20, reps=10):
        """Device-to-device ``cudaMemcpyAsync`` bandwidth, bytes read + written."""
        cupy = self.cupy
        src = cupy.ones(nbytes, dtype=cupy.uint8)
        dst = cupy.empty(nbytes, dtype=cupy.uint8)
        cupy.cuda.Device().synchronize()
        rt = cupy.cuda.runtime
        s = self.clock.stream

        def op():
            rt.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, rt.memcpyDeviceToDevice, s.ptr)

        timer = Timer(self.clock, reps=reps, warmup=1, target_us=_TARGET_US, kmax=4)
        us = timer.median_us(lambda: [op() for _ in range(4)], 4)
        return 2 * nbytes / (us * 1e3)

    def meta(self):
        cupy = self.cupy
        dev = cupy.cuda.Device().id
        props = cupy.cuda.runtime.getDeviceProperties(dev)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            from cupy.cuda import nccl

            version = int(nccl.get_version())
        except Exception:  # noqa: BLE001 - the version is a label
            version = None
        return {"card": name, "nccl_version": version,
                "visible_gpus": cupy.cuda.runtime.getDeviceCount(), "cupy": cupy.__version__}

    def sync(self):
        self.clock.synchronize()

    def close(self):
        self.clock.synchronize()
        self.tp.close()


class _Host:
    """The MPI host collectives of :class:`dpgather.dist.MpiHostCommunicator`, timed with
    ``time.perf_counter``."""

    name = "host"

    def __init__(self, comm, timeout_s):
        from dpgather.dist import MpiHostCommunicator

        self.tp = MpiHostCommunicator(comm, timeout_s=timeout_s)
        self.clock = HostClock()
        self.comm = comm

    def empty(self, rows, width, dtype):
        return np.zeros((rows, width), dtype=dtype)

    def copy_GBps(self, nbytes=64 << 20, reps=10):
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty(nbytes, dtype=np.uint8)
        timer = Timer(self.clock, reps=reps, warmup=1, target_us=_TARGET_US, kmax=1)
        us = timer.median_us(lambda: np.copyto(dst, src), 1)
        return 2 * nbytes / (us * 1e3)

    def meta(self):
        from mpi4py import MPI

        return {"card": f"host {platform.machine()} ({platform.processor() or 'cpu'})",
                "mpi_version": MPI.Get_library_version().splitlines()[0].strip()}

    def sync(self):
        pass

    def close(self):
        self.tp.close()


def _time(be, comm, fn, reps):
    """Median microseconds per call of ``fn`` (max over ranks), by the protocol of
    :class:`dpgather.tools.timing.Timer`: back-to-back calls, about 1 ms per repetition. On
    CUDA the calls are captured into one CUDA graph and replayed (the collectives' own time,
    what graph steps pay and what eager steps pay once launched); eager timing is the fallback
    when capture fails on some rank."""
    timer = Timer(be.clock, comm=comm, reps=reps, warmup=1, target_us=_TARGET_US, kmax=_KMAX,
                  graph=be.name == "cuda")
    res = timer.measure(lambda j: fn(), graph=be.name == "cuda")
    return res["graph"] if res["graph"] is not None else res["eager"]


#: Most rows per rank of the P2P samples: the pull's windows are sized for the largest size
#: timed; the push's hold ``PUSH_WINDOW_ROWS`` per replica (docs/push.md), so it is timed up to that.
P2P_MAX_ROWS = {"p2p": 8192, "push": PUSH_WINDOW_ROWS}


def _facade_steps(comm, rows_list, width, dtype, storage, reps, timeout_s, policy, transport, cost=None,
                  one_sided=False):
    """Graph-timed gather + combine (reduce) of ``DpAttention(policy=..., transport=...)`` with
    ``rows`` tokens on every rank (``one_sided``: on rank 0 only, the others idle); returns
    ``([(rows, t_us, plan)], None)`` or ``([], reason)`` when such a DpAttention cannot be built
    (e.g. no P2P here; the same verdict on every rank)."""
    import cupy

    from dpgather import DpAttention, ForwardMode, LocalBatch

    try:
        dp = DpAttention(comm, hidden_size=width, dtype=dtype, backend="cuda", policy=policy, cost=cost,
                         transport=transport, max_tokens_per_rank=max(rows_list), timeout_s=timeout_s)
    except ConfigError as e:
        return [], str(e)
    out = []
    clock = CupyEvents()
    try:
        for rows in rows_list:
            mine = 0 if one_sided and comm.Get_rank() else rows
            x = cupy.zeros((mine, width), dtype=storage)
            cupy.cuda.Device().synchronize()  # made on the null stream, used on the timing stream
            with clock.stream:
                plan = dp.sync(LocalBatch(ForwardMode.DECODE, mine) if mine else LocalBatch(ForwardMode.IDLE))
                G = dp.gather(x, plan)
                Y = cupy.zeros(G.shape, dtype=storage)
                dp.scatter(Y, plan, reduce=True)
            clock.synchronize()

            def step(plan=plan, x=x, Y=Y):
                dp.gather(x, plan)
                dp.scatter(Y, plan, reduce=True)

            timer = Timer(clock, comm=comm, reps=reps, warmup=1, target_us=_TARGET_US, kmax=_KMAX)
            res = timer.measure(lambda j: step(), graph=True)
            out.append((rows, res["graph"] if res["graph"] is not None else res["eager"], plan))
            clock.synchronize()
    finally:
        clock.synchronize()
        dp.close()
    return out, None


def _measure_p2p(comm, rows_list, width, dtype, storage, reps, timeout_s, transport="p2p"):
    """Samples ``[(P, k, B, t)]`` of a P2P transport (``"p2p"``: the pull, ``"push"``):
    ``DpAttention(transport=..., policy="varlen")`` gather + combine (reduce), graph-timed, of
    ``rows`` rows on every rank (``k = P``) and on rank 0 only (``k = 1``); ``B`` = the rows of
    the step x row bytes, ``t`` the whole step. :func:`fit_curves` reads both;
    :func:`_p2p_alpha_samples` turns the balanced ones into :func:`fit_collective`'s form. Only
    steps the plan put on that transport count. Returns ``([], reason)`` where it cannot run."""
    P = comm.Get_size()
    R = width * np.dtype(storage).itemsize
    out, why = [], None
    for k in (P, 1):
        steps, why = _facade_steps(comm, rows_list, width, dtype, storage, reps, timeout_s, "varlen", transport,
                                   one_sided=k == 1)
        out += [(P, k, k * rows * R, t) for rows, t, plan in steps if plan.transport == transport]
        if why:
            break
    return out, why


def _p2p_alpha_samples(samples, row_bytes, copy_GBps, transport="p2p"):
    """The balanced steps of a P2P transport as one collective each, for :func:`fit_collective`:
    a step is ``2a + 2 link + copies`` (docs/cost-model.md, "P2P", "Push"), so ``t' = (t -
    copies) / 2`` is one collective of ``B = P rows R`` data bytes (``(P-1) rows R`` each way),
    times the transport's bytes on the wire per data byte."""
    copies, wire = TRANSPORTS[transport]
    out = []
    for P, k, B, t in samples:
        if k == P:
            rows = B / (P * row_bytes)
            out.append((P, P, wire * B, max((t - copies(rows, P * rows, row_bytes, copy_GBps)) / 2, 1e-3)))
    return out


#: Rows per rank at which each NCCL mode's own-kernel cost (CostModel.mode_us) is measured.
MODE_SIZES = (1, 64)


def _measure_modes(comm, width, dtype, storage, reps, timeout_s, model):
    """``CostModel.mode_us``: per NCCL padding mode, the median over :data:`MODE_SIZES` of the
    graph-timed DpAttention gather + combine minus ``model``'s prediction of its collectives
    (clipped at 0): what dpgather's own pack / unpack / zero-fill kernels add to each mode."""
    out = []
    for policy, i in (("max_len", 0), ("sum_len", 1), ("varlen", 2)):
        steps, _ = _facade_steps(comm, MODE_SIZES, width, dtype, storage, reps, timeout_s, policy, "nccl",
                                 cost=model)
        extra = [t - float(plan.predicted_us[i]) for _, t, plan in steps]
        out.append(max(0.0, float(np.median(extra))) if extra else 0.0)
    return tuple(out)


def _measure_group(be, comm, tp, rows, width, dtype, logical, reps, kinds, k_range):
    """Samples ``{collective: [(P, k, B, t)]}`` of one communicator ``tp`` (ranks of ``comm``
    that all call this together; sub-groups run concurrently)."""
    P = tp.size
    R = width * np.dtype(dtype).itemsize
    out = {c: [] for c in kinds}
    full = be.empty(P * rows, width, dtype)
    part = be.empty(rows, width, dtype)
    red = be.empty(P * rows, width, dtype)
    B = P * rows * R
    if "all_gather" in kinds:
        t = _time(be, comm, lambda: tp.all_gather(part, full, dtype=logical), reps)
        out["all_gather"].append((P, P, B, t))
    if "reduce_scatter" in kinds:
        t = _time(be, comm, lambda: tp.reduce_scatter(full, part, dtype=logical), reps)
        out["reduce_scatter"].append((P, P, B, t))
    if "all_reduce" in kinds:
        t = _time(be, comm, lambda: tp.all_reduce(full, red, dtype=logical), reps)
        out["all_reduce"].append((P, P, B, t))
    for k in k_range:
        counts = np.array([rows if r < k else 0 for r in range(P)], dtype=np.int64)
        total = int(counts.sum())
        recv = full[:total]
        Bk = total * R
        if "gatherv" in kinds:
            t = _time(be, comm, lambda: tp.all_gatherv(part, recv, counts, dtype=logical), reps)
            out["gatherv"].append((P, k, Bk, t))
        if "reduce_scatterv" in kinds:
            t = _time(be, comm, lambda: tp.reduce_scatterv(recv, part, counts, dtype=logical), reps)
            out["reduce_scatterv"].append((P, k, Bk, t))
    be.sync()
    return out


def _options(comm, hidden, dtype, backend, sizes, reps):
    """The checked options ``(kind, dtype, width, sizes, reps)``; raises :class:`ConfigError` on
    every rank alike (one collective: whether every rank sees a GPU)."""
    from mpi4py import MPI

    dtype = _ALIASES.get(str(dtype), str(dtype))
    if dtype not in _ITEMSIZE:
        raise ConfigError(f"dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden <= 0:
        raise ConfigError(f"hidden must be a positive int, got {hidden!r}")
    if backend not in ("auto", "cuda", "host"):
        raise ConfigError(f"backend must be 'auto', 'cuda' or 'host', got {backend!r}")
    if comm.Get_size() == 1:
        raise ConfigError("one rank: there is nothing to measure (a collective over one rank costs nothing, "
                          "t(1, B) = 0); run it with one rank per GPU, e.g. `mpirun -n 2 dpgather calibrate`")
    gpu_all = comm.allreduce(gpu_count() > 0, op=MPI.LAND)
    if backend == "cuda" and not gpu_all:
        raise ConfigError("calibrate(backend='cuda'): CuPy sees no GPU on some rank; use backend='host'")
    kind = "cuda" if (backend == "cuda" or (backend == "auto" and gpu_all)) else "host"
    if sizes is None:
        sizes = DEFAULT_SIZES_CUDA if kind == "cuda" else DEFAULT_SIZES_HOST
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] <= 0:
        raise ConfigError(f"sizes must be positive row counts, got {sizes!r}")
    reps = max(1, int(reps if reps is not None else 15 if kind == "cuda" else 5))
    return kind, dtype, int(hidden), sizes, reps


def _say_samples(say, name, got, what=""):
    for s in got:
        say(f"# calibrate {name:16s} P={s[0]} k={s[1]} B={s[2]:>11.0f} {s[3]:9.1f} us{what}")


def _measure_collectives(be, comm, sizes, width, storage, logical, reps, say):
    """``(samples, copy_GBps, machine info)``: the backend's collectives over the whole group at
    every size (and over pairs when ``P >= 4`` is even), the device copy bandwidth."""
    from mpi4py import MPI

    rank, P = comm.Get_rank(), comm.Get_size()
    samples = {c: [] for c in COLLECTIVES}
    copy = float(comm.allreduce(be.copy_GBps(), op=MPI.MIN))
    for rows in sizes:
        got = _measure_group(be, comm, be.tp, rows, width, storage, logical, reps, COLLECTIVES, range(1, P + 1))
        for c, v in got.items():
            samples[c].extend(v)
            _say_samples(say, c, v)
    if P >= 4 and P % 2 == 0:  # pairs: alpha at k = 2 separates a0 from a1
        sub = be.tp.split(rank // 2, rank % 2)
        try:
            for rows in sizes:
                got = _measure_group(be, comm, sub, rows, width, storage, logical, reps,
                                     ("all_gather", "reduce_scatter", "all_reduce"), ())
                for c, v in got.items():
                    samples[c].extend(v)
                    _say_samples(say, c, v)
        finally:
            sub.close()
    return samples, copy, be.meta()


def _write(comm, model, meta, out, cache, say):
    """Rank 0 writes ``out`` and, on CUDA, this machine's cache -- only when no fit is flagged;
    a failed ``out`` raises :class:`ConfigError` on every rank (a failed cache is a note)."""
    rank = comm.Get_rank()
    if meta["flagged"]:
        return
    if out is not None:
        err = None
        if rank == 0:
            try:
                model.save(out, meta=meta)
            except OSError as e:
                err = f"cannot write {out!r}: {e}"
        err = comm.bcast(err, root=0)
        if err:
            raise ConfigError(err)
    if cache and meta["backend"] == "cuda" and rank == 0:
        path = cache_path(meta.get("card"), meta["ranks"], meta.get("nccl_version"))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            model.save(path, meta={**meta, "cache": path})
            say(f"# cached for this machine: {path}")
        except OSError as e:  # a cache is a convenience: say so, never fail the calibration
            print(f"dpgather calibrate: could not write the cache {path!r}: {e}", file=sys.stderr)


def calibrate(comm=None, out=None, sizes=None, hidden=7168, dtype="bfloat16", backend="auto",
              reps=None, timeout_s=120.0, verbose=False, cache=True, max_residual=MAX_RESIDUAL,
              return_meta=False):
    """Measure the cost model's constants on this machine (collective over ``comm``).

    Args:
        comm: mpi4py communicator of the tp group (default ``MPI.COMM_WORLD``), one GPU per rank;
            at least two ranks (one has nothing to measure).
        out: path of a JSON file to write on rank 0 (``CostModel.save`` with ``meta``); read it
            back with :meth:`CostModel.load`. Written only when no fit is flagged.
        sizes: rows (tokens) per rank to time, each ``hidden`` wide (default
            :data:`DEFAULT_SIZES_CUDA`, or :data:`DEFAULT_SIZES_HOST` on the host backend).
        hidden, dtype: row shape; ``row_bytes`` of the result is ``hidden * itemsize``.
        backend: ``"auto"`` (CUDA when CuPy sees a GPU on every rank), ``"cuda"`` or ``"host"``.
        reps: timed repetitions per point (default 15 on CUDA, 5 on the host).
        verbose: rank 0 prints each measured point.
        cache: on CUDA, rank 0 also writes the model to this machine's cache
            (:func:`dpgather.core.cost.cache_path`: GPU model, rank count, NCCL version), which
            ``DpAttention(cost=None)`` then loads by itself -- only when no fit is flagged.
        max_residual: a fit whose samples' relative residual exceeds this is *flagged*
            (:func:`flag_fits`; default :data:`MAX_RESIDUAL`): the model is returned, but neither
            ``out`` nor the cache is written and ``meta["flagged"]`` says why.
        return_meta: return ``(model, meta)``: the file's ``meta`` (samples, fits, ``flagged``).

    Returns:
        The fitted :class:`CostModel` (the same on every rank), or ``(model, meta)``.

    Raises:
        ConfigError: bad arguments or one rank (raised on every rank alike), ``backend="cuda"``
            without a GPU on some rank, ``out`` cannot be written.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    kind, dtype, width, sizes, reps = _options(comm, hidden, dtype, backend, sizes, reps)
    P, storage = comm.Get_size(), _STORAGE[dtype]
    row_bytes = width * _ITEMSIZE[dtype]
    say = (lambda m: print(m, flush=True)) if (verbose and comm.Get_rank() == 0) else (lambda m: None)
    t_start = time.perf_counter()
    be = _Cuda(comm, timeout_s) if kind == "cuda" else _Host(comm, timeout_s)
    try:
        samples, copy, info = _measure_collectives(be, comm, sizes, width, storage, dtype, reps, say)
    finally:
        be.close()
    notes = {t: f"not measured (the host backend's {t} twin is not timed)" for t in TRANSPORTS}
    if kind == "cuda":
        for t in TRANSPORTS:
            got, notes[t] = _measure_p2p(comm, [r for r in sizes if r <= P2P_MAX_ROWS[t]] or [min(sizes)], width,
                                         dtype, storage, reps, timeout_s, t)
            samples[t].extend(got)
            _say_samples(say, t, got, " (gather + combine)")
    params, fits = {}, {}
    for c in COLLECTIVES:
        got = _p2p_alpha_samples(samples[c], row_bytes, copy, c) if c in TRANSPORTS else samples[c]
        params[c], fits[c] = fit_collective(c, got)
    curves, residuals = fit_curves(params, samples, row_bytes, copy)
    model = CostModel(row_bytes=row_bytes, copy_GBps=copy, mlp_row_us=0.0, curves=curves, **params)
    # every rank fitted the same (max-over-ranks) samples; broadcast anyway so all agree bit for bit
    model = CostModel.from_dict(comm.bcast(model.to_dict(), root=0))
    if kind == "cuda":  # graph-timed collectives leave out dpgather's own kernels
        mode_us = _measure_modes(comm, width, dtype, storage, reps, timeout_s, model)
        say("# calibrate mode_us (MAX_LEN, SUM_LEN, VARLEN) " + " ".join(f"{v:.1f}" for v in mode_us))
        model = CostModel.from_dict(comm.bcast({**model.to_dict(), "mode_us": list(mode_us)}, root=0))
    meta = {
        **info, "backend": kind, "ranks": P, "gpu_count": P if kind == "cuda" else 0,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "hidden": width,
        "dtype": dtype, "sizes_rows_per_rank": sizes, "reps": reps, "fit": fits,
        "samples": {c: [list(s) for s in v] for c, v in samples.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
        **{t: notes[t] or ("measured" if samples[t] else "not measured") for t in TRANSPORTS},
        "max_residual": max_residual,
        "flagged": comm.bcast(flag_fits(fits, residuals, model.curves, max_residual), root=0),
    }
    _write(comm, model, meta, out, cache, say)
    return (model, meta) if return_meta else model


def _format(model, meta):
    """The fitted constants as a table (``#`` header lines, one row per collective): a row whose
    collective was not measured says so instead of showing the defaults as a fit, a flagged fit
    says why, and the curves list their measured points only."""
    rows = []
    for c in COLLECTIVES:
        a0, a1, beta = model.params[c]
        f = meta["fit"][c]
        if not f["n"]:
            note = "default, " + (meta.get(c) if c in TRANSPORTS else "not measured")
            rows.append({"collective": c, "a0": None, "a1": None, "beta": None, "err": None, "note": note})
            continue
        err = f"{100 * f['rel_err_min']:+.0f}%..{100 * f['rel_err_max']:+.0f}%"
        note = ("FLAGGED: " + meta["flagged"][c]) if c in meta["flagged"] else (
            "priced by its link-time curve" if c in model.curves else "")
        rows.append({"collective": c, "a0": a0, "a1": a1, "beta": beta, "err": err, "note": note})
    cols = (Column("collective", left=True), Column("a0", "a0", "(us)", ".2f"),
            Column("a1", "a1", "(us)", ".2f"), Column("beta", "beta", "(GB/s)", ".1f"),
            Column("err", "fit err", "(rel)"), Column("note", "", "", left=True))
    head = (f"# cost model ({meta.get('backend')} backend, {meta.get('ranks')} ranks, "
            f"{meta.get('card')}, {meta.get('seconds')} s)")
    tail = (f"# copy_GBps {model.copy_GBps:.0f}, row_bytes {model.row_bytes}, mode_us (MAX/SUM/VAR) "
            + ("/".join(f"{v:.1f}" for v in model.mode_us) if meta.get("backend") == "cuda" else "not measured"))
    curves = [f"# link {c} {w}: " + ", ".join(f"{x / 1e6:.3g} MB {x / (t * 1e3):.1f} GB/s" for x, t in pts)
              for c, v in model.curves.items() for w, pts in v.items()]
    return "\n".join([head, *format_table(rows, cols), tail, *curves])


def build_parser(prog="python -m dpgather.tools.calibrate"):
    ap = Parser(prog=prog, description="Measure the cost model's constants of policy='auto' on "
                                       "this machine (run under mpirun, one rank per GPU, at least two).")
    ap.add_argument("--out", default="cost-model.json", help="JSON file to write (rank 0; default: %(default)s)")
    ap.add_argument("--sizes", default=None, metavar="LIST",
                    help="rows per rank to time, comma-separated positive integers")
    ap.add_argument("--hidden", type=positive_int, default=7168, help="row width in elements (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_ITEMSIZE) + sorted(_ALIASES))
    ap.add_argument("--backend", default="auto", choices=("auto", "cuda", "host"))
    ap.add_argument("--reps", type=positive_int, default=None, help="timed repetitions per point")
    ap.add_argument("--max-residual", type=positive_float, default=MAX_RESIDUAL, metavar="R",
                    help="flag (and write nothing) when a fit is off any sample by more than R, relative "
                         "(default: %(default)g = +-50%%)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv=None, prog="python -m dpgather.tools.calibrate"):
    """``python -m dpgather.tools.calibrate`` / ``dpgather calibrate``: calibrate and write JSON.

    Returns the exit code: 0 (written), 1 (a fit is flagged: the table is printed, nothing is
    written or cached), 2 for invalid options, one rank (nothing to measure), a missing mpi4py or
    a failed write.
    """
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()] if args.sizes else None
    except ValueError:
        ap.error(f"argument --sizes: expected comma-separated positive integers, got {args.sizes!r}")
    if sizes is not None and (not sizes or min(sizes) < 1):
        ap.error(f"argument --sizes: expected comma-separated positive integers, got {args.sizes!r}")
    try:
        MPI = require_mpi(prog)
    except DpGatherError as e:
        return say_error(prog, e)
    rank0 = MPI.COMM_WORLD.Get_rank() == 0
    try:
        model, meta = calibrate(out=args.out, sizes=sizes, hidden=args.hidden, dtype=args.dtype,
                                backend=args.backend, reps=args.reps, verbose=args.verbose,
                                max_residual=args.max_residual, return_meta=True)
    except DpGatherError as e:
        return say_error(prog, e, rank0=rank0)
    if rank0:
        print(_format(model, meta))
        if meta["flagged"]:
            print(f"{prog}: error: the fit of {', '.join(meta['flagged'])} is off its samples by more than "
                  f"+-{100 * args.max_residual:.0f}% (a loaded or noisy machine?); nothing written, nothing "
                  "cached; rerun on an idle machine (or raise --max-residual)", file=sys.stderr, flush=True)
        else:
            print(f"# wrote {args.out}; use DpAttention(..., cost=dpgather.CostModel.load({args.out!r}))")
    return EXIT_VERIFY if meta["flagged"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
