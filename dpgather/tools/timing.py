"""The timing core of the benchmarks and of ``dg.calibrate``: clocks, one measurement protocol,
statistics, nccl-tests bandwidths and an nccl-tests-style table printer.

Units everywhere: times in microseconds (``us``), sizes in bytes, bandwidths in GB/s (1e9 bytes
per second, as nccl-tests prints them).

Pure parts (no GPU, no MPI; unit-tested on CPU):

- :func:`median`, :func:`percentile`, :func:`summarize`: statistics of samples.
- :func:`busbw_factor`, :func:`algbw_GBps`, :func:`busbw_GBps`: nccl-tests' bandwidths
  (doc/PERFORMANCE.md of nccl-tests). ``algbw = S / t`` where ``S`` is the size of the
  operation: the whole gathered buffer of an all-gather (``count * nranks`` elements), the whole
  input of a reduce-scatter, the buffer of an all-reduce or broadcast. ``busbw = algbw * f``
  with ``f = (n-1)/n`` for all-gather, reduce-scatter (and their v-variants) and all-to-all,
  ``2(n-1)/n`` for all-reduce, ``1`` for broadcast, reduce and send/recv.
- :class:`Column`, :func:`nccl_columns`, :func:`format_table`, :func:`print_table`: a table
  like nccl-tests' (``#``-prefixed header and units lines, right-aligned values, ``N/A`` for a
  missing value): the standard columns size, time, algbw, busbw, #wrong, plus whatever columns
  a bench adds.

Clocks (what a :class:`Timer` reads); each imports its library only when constructed, so this
module imports without CuPy or torch:

- :class:`CupyEvents`: CUDA events on a CuPy stream; can capture a CUDA graph.
- :class:`TorchEvents`: CUDA events on torch's current stream (eager only).
- :class:`HostClock`: ``time.perf_counter`` (host backends; nothing to synchronise).

The protocol (:class:`Timer`), shared by every bench so their numbers compare:

1. ``k`` (iterations per repetition): run the body three times (two warm-up calls, then one
   timed), take the maximum over ranks, and pick ``k = ceil(target_us / estimate)`` clamped to
   ``[1, kmax]`` -- one repetition then lasts about ``target_us``.
2. ``warmup`` untimed repetitions.
3. ``reps`` repetitions of ``k`` back-to-back iterations between two clock readings, each after
   a host barrier (when there is a communicator); a sample is the repetition's time / ``k``.
4. The result is the median of the samples, then the maximum over ranks (a step is as slow as
   its slowest rank), so every rank returns the same number.

``graph`` timing (:meth:`Timer.measure` with ``graph=True``, CuPy only) captures the ``k``
iterations into one CUDA graph and times its launches: no Python launch cost, the kernels' and
collectives' own time. ``eager`` timing launches them from Python.
"""

import contextlib
import math
import statistics
import sys
import time

from ._common import gpu_count

__all__ = [
    "median", "percentile", "summarize", "BUSBW_FACTORS", "busbw_factor", "algbw_GBps",
    "busbw_GBps", "Column", "nccl_columns", "format_table", "print_table", "HostClock",
    "CupyEvents", "TorchEvents", "Timer", "gpu_count", "gpus_on_every_rank",
]


# -- the benchmarks' start ---------------------------------------------------------------------

def gpus_on_every_rank(comm, prog, hint=""):
    """True when CuPy sees a GPU on every rank of ``comm`` (one ``allreduce``; every rank gets
    the same answer). Otherwise rank 0 prints ``PROG: needs CuPy with a GPU on every rank (none
    here)HINT`` on stderr and every rank gets False (the benchmark then exits 2).
    :func:`gpu_count` (GPUs CuPy sees here, 0 without CuPy or a driver) never raises."""
    from mpi4py import MPI

    if comm.allreduce(gpu_count() > 0, op=MPI.LAND):
        return True
    if comm.Get_rank() == 0:
        print(f"{prog}: needs CuPy with a GPU on every rank (none here){hint}", file=sys.stderr)
    return False


# -- statistics --------------------------------------------------------------------------------

def median(samples):
    """Median of a non-empty sequence of numbers (the mean of the middle two for an even count)."""
    return float(statistics.median(samples))


def percentile(samples, q):
    """The ``q``-th percentile (``0 <= q <= 100``) with linear interpolation between the closest
    ranks -- the same value as ``numpy.percentile(samples, q)`` (its default method).

    Raises:
        ValueError: no samples, or ``q`` outside ``[0, 100]``.
    """
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples):
    """``{"n", "min", "p50", "p99", "mean", "max"}`` of a non-empty sequence (same units)."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("summarize: no samples")
    return {"n": len(xs), "min": min(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99),
            "mean": statistics.fmean(xs), "max": max(xs)}


# -- bandwidths (nccl-tests) -----------------------------------------------------------------------

def _ring(n):
    return (n - 1) / n


#: busbw / algbw per collective for ``n`` ranks, as nccl-tests defines it.
BUSBW_FACTORS = {
    "all_gather": _ring, "reduce_scatter": _ring, "gatherv": _ring, "reduce_scatterv": _ring,
    "all_gatherv": _ring, "alltoall": _ring,
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0, "sendrecv": lambda n: 1.0,
}


def busbw_factor(collective, nranks):
    """busbw / algbw of ``collective`` over ``nranks`` ranks (see the module docstring).

    Raises:
        ValueError: unknown collective, or ``nranks < 1``.
    """
    if collective not in BUSBW_FACTORS:
        raise ValueError(f"unknown collective {collective!r}; expected one of {sorted(BUSBW_FACTORS)}")
    if isinstance(nranks, bool) or int(nranks) != nranks or nranks < 1:
        raise ValueError(f"nranks must be a positive integer, got {nranks!r}")
    return float(BUSBW_FACTORS[collective](int(nranks)))


def algbw_GBps(nbytes, time_us):
    """``S / t`` in GB/s: ``nbytes`` moved in ``time_us`` microseconds (0 when ``time_us <= 0``)."""
    if not time_us or time_us <= 0:
        return 0.0
    return float(nbytes) / (float(time_us) * 1e3)


def busbw_GBps(nbytes, time_us, collective, nranks):
    """nccl-tests' bus bandwidth: :func:`algbw_GBps` times :func:`busbw_factor`."""
    return algbw_GBps(nbytes, time_us) * busbw_factor(collective, nranks)


# -- tables ---------------------------------------------------------------------------------------

class Column:
    """One column of a :func:`format_table` table.

    Args:
        key: the row's key (rows are dicts).
        title: first header line; ``unit``: second header line (``"(us)"``, ``"(GB/s)"``).
        fmt: format spec of a value (``".1f"``, ``"d"``; empty: ``str``). Values that are None
            or absent print ``N/A``; strings print as they are.
        width: minimum width (the column grows to fit its title and values).
        left: left-align (labels); numbers are right-aligned.
    """

    __slots__ = ("key", "title", "unit", "fmt", "width", "left")

    def __init__(self, key, title=None, unit="", fmt="", width=0, left=False):
        self.key, self.title, self.unit = key, title if title is not None else key, unit
        self.fmt, self.width, self.left = fmt, width, left

    def cell(self, row):
        v = row.get(self.key)
        if v is None:
            return "N/A"
        if isinstance(v, str) or not self.fmt:
            return str(v)
        return format(v, self.fmt)

    def __repr__(self):
        return f"Column({self.key!r}, {self.title!r})"


def nccl_columns(*, lead=(), mid=(), tail=(), size="size", size_key="bytes", time="time",
                 time_key="time_us", time_fmt=".2f", bw_fmt=".2f"):
    """The nccl-tests columns ``size(B) time(us) algbw(GB/s) busbw(GB/s) #wrong`` with a bench's
    own columns around them: ``lead`` first, ``mid`` between size and time (where nccl-tests puts
    count, type, redop, root), ``tail`` between busbw and #wrong.

    Row keys: ``size_key`` (bytes), ``time_key`` (us), ``algbw_GBps``, ``busbw_GBps``,
    ``wrong``. Returns a tuple of :class:`Column`.
    """
    return (*lead, Column(size_key, size, "(B)", "d"), *mid, Column(time_key, time, "(us)", time_fmt),
            Column("algbw_GBps", "algbw", "(GB/s)", bw_fmt), Column("busbw_GBps", "busbw", "(GB/s)", bw_fmt),
            *tail, Column("wrong", "#wrong", "", "d"))


def format_table(rows, columns, header=True):
    """Lines of an nccl-tests-style table: two ``#`` header lines (titles, units), then one line
    per row (a dict), columns separated by one space.

    ``header=False`` gives the row lines only: a bench that prints rows as it measures them
    prints ``format_table([], cols)`` first and gives its columns widths wide enough to align.
    """
    cells = [[c.cell(r) for c in columns] for r in rows]
    widths = [max([c.width, len(c.title), len(c.unit)] + [len(r[i]) for r in cells])
              for i, c in enumerate(columns)]

    def line(values, lead):
        parts = [v.ljust(w) if c.left else v.rjust(w) for v, w, c in zip(values, widths, columns)]
        return (lead + " ".join(parts)).rstrip()

    out = [line([c.title for c in columns], "#"), line([c.unit for c in columns], "#")] if header else []
    out += [line(r, " ") for r in cells]
    return out


def print_table(rows, columns, file=None):
    """Print :func:`format_table` (to ``file``, default stdout) and flush."""
    import sys

    f = file or sys.stdout
    for ln in format_table(rows, columns):
        print(ln, file=f)
    f.flush()


# -- clocks ---------------------------------------------------------------------------------------

class HostClock:
    """``time.perf_counter`` as a clock (host backends): nothing runs asynchronously."""

    can_capture = False

    def context(self):
        return contextlib.nullcontext()

    def synchronize(self):
        pass

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        """Microseconds since :meth:`start`."""
        return (time.perf_counter() - self._t0) * 1e6


class CupyEvents:
    """CUDA events recorded on a CuPy stream (default: a new non-blocking stream).

    :meth:`context` makes the stream current, so the timed calls run on it; :meth:`capture`
    records a CUDA graph of a body on it.
    """

    can_capture = True

    def __init__(self, stream=None):
        import cupy

        self.cupy = cupy
        self.stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)
        self.ev0, self.ev1 = cupy.cuda.Event(), cupy.cuda.Event()

    def context(self):
        return self.stream

    def synchronize(self):
        self.stream.synchronize()

    def start(self):
        self.ev0.record(self.stream)

    def stop(self):
        """Record the end event, wait for it, return the microseconds between the two events."""
        self.ev1.record(self.stream)
        self.ev1.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.ev0, self.ev1) * 1e3

    def capture(self, body, k):
        """A CUDA graph of ``body(0) .. body(k-1)`` on the stream (uploaded); raises on failure."""
        s = self.stream
        with s:
            s.synchronize()
            graph = None
            s.begin_capture()
            try:
                for j in range(k):
                    body(j)
            finally:
                graph = s.end_capture()
            if hasattr(graph, "upload"):
                graph.upload(s)
        return graph

    def launcher(self, graph):
        """A zero-argument callable that launches ``graph`` on the stream."""
        s = self.stream
        return lambda: graph.launch(s)


class TorchEvents:
    """CUDA events on torch's current stream (torch.distributed recipes); eager timing only."""

    can_capture = False

    def __init__(self, torch):
        self.torch = torch
        self.ev0 = torch.cuda.Event(enable_timing=True)
        self.ev1 = torch.cuda.Event(enable_timing=True)

    def context(self):
        return contextlib.nullcontext()

    def synchronize(self):
        self.torch.cuda.synchronize()

    def start(self):
        self.ev0.record()

    def stop(self):
        self.ev1.record()
        self.ev1.synchronize()
        return self.ev0.elapsed_time(self.ev1) * 1e3


# -- the protocol -----------------------------------------------------------------------------------

class Timer:
    """The measurement protocol of the module docstring on one clock.

    Args:
        clock: :class:`CupyEvents`, :class:`TorchEvents` or :class:`HostClock`.
        comm: an mpi4py communicator whose ranks time together (barrier before each repetition,
            ``k`` and the result agreed as the maximum over ranks), or None (one process).
        reps: timed repetitions (the median is taken over them).
        warmup: untimed repetitions after ``k`` is chosen.
        target_us: aim of one repetition; sets ``k``.
        kmax: the largest ``k``.
        graph: allow graph timing (it also needs a clock that can capture).

    ``graph_error`` holds the first capture failure (then graph timing is off for good).
    """

    def __init__(self, clock, *, comm=None, reps=20, warmup=3, target_us=2000.0, kmax=64, graph=True):
        if reps < 1 or warmup < 0 or kmax < 1 or not target_us > 0:
            raise ValueError(f"Timer: reps >= 1, warmup >= 0, kmax >= 1, target_us > 0; got "
                             f"reps={reps}, warmup={warmup}, kmax={kmax}, target_us={target_us}")
        self.clock, self.comm = clock, comm
        self.reps, self.warmup, self.target_us, self.kmax = int(reps), int(warmup), float(target_us), int(kmax)
        self.use_graph = bool(graph and clock.can_capture)
        self.graph_error = None

    def agree_max(self, value):
        """The maximum of ``value`` over the ranks of ``comm`` (``value`` itself without one)."""
        if self.comm is None:
            return float(value)
        from mpi4py import MPI

        return float(self.comm.allreduce(float(value), op=MPI.MAX))

    def _barrier(self):
        if self.comm is not None:
            self.comm.Barrier()

    def once(self, launch):
        """Microseconds of one ``launch()`` between two clock readings (no barrier)."""
        self.clock.start()
        launch()
        return self.clock.stop()

    def pick_k(self, body):
        """``(k, estimate_us)``: iterations per repetition for ``body(j)`` (step 1 of the protocol)."""
        with self.clock.context():
            body(0)
            body(1)
            self.clock.synchronize()
            self._barrier()
            est = self.agree_max(self.once(lambda: body(2)))
        return max(1, min(self.kmax, math.ceil(self.target_us / max(est, 1e-3)))), est

    def samples(self, launch, k):
        """Per-iteration microseconds of ``reps`` repetitions of ``launch()`` (which runs ``k``
        iterations), after ``warmup`` untimed ones; this rank's own samples."""
        out = []
        with self.clock.context():
            for _ in range(self.warmup):
                launch()
            self.clock.synchronize()
            for _ in range(self.reps):
                self._barrier()
                out.append(self.once(launch) / k)
        return out

    def median_us(self, launch, k):
        """Steps 2-4 of the protocol: median per-iteration time, maximum over ranks."""
        return self.agree_max(median(self.samples(launch, k)))

    def capture(self, body, k):
        """A CUDA graph of ``body(0..k-1)``, or None when capture fails on any rank (every rank
        then gets None, ``graph_error`` says why and graph timing stays off)."""
        err, graph = None, None
        try:
            graph = self.clock.capture(body, k)
        except Exception as e:  # noqa: BLE001 - reported and agreed on below
            err, graph = f"{type(e).__name__}: {e}", None
        errs = [err] if self.comm is None else self.comm.allgather(err)
        errs = [e for e in errs if e]
        if errs:
            self.use_graph = False
            self.graph_error = self.graph_error or errs[0]
            return None
        return graph

    def measure(self, body, graph=True):
        """Time ``body(j)`` (``j`` counts the iterations of a repetition, e.g. to rotate inputs).

        Returns ``{"k", "est_us", "eager", "graph"}``: microseconds per iteration launched from
        Python, and from one captured graph (None when not asked for, not capturable, or the
        capture failed).
        """
        k, est = self.pick_k(body)
        res = {"k": k, "est_us": est, "graph": None}
        res["eager"] = self.median_us(lambda: [body(j) for j in range(k)], k)
        if graph and self.use_graph:
            g = self.capture(body, k)
            if g is not None:
                res["graph"] = self.median_us(self.clock.launcher(g), k)
                self.clock.synchronize()
                del g
        return res
