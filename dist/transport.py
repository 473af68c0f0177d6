"""What the two P2P transports share: the pull (:mod:`.pull`) and the push (:mod:`.push`).

Both run one kernel per collective over the shared windows of :mod:`.windows` and have one
interface (docs/internals.md, "The P2P transports"). What is the same for both lives here once:

- :class:`Transport`: the construction's common steps (``timeout_s``, the capacity, the start
  epoch, the bootstrap and the first record), the error reporting (``error``, ``check``), the
  argument checks of the checked entry, ``repr``;
- :class:`CudaRuns`: the CUDA side's launch cache, the construction over
  :class:`~dpgather.dist.windows.CudaWindows` (the kernels compiled first) and ``close``;
- :func:`job_sources` and :func:`host_sum`: how the host twins read one receive job and sum its
  sources, exactly as the kernels do.

Importing this module imports neither CuPy nor mpi4py.
"""

from __future__ import annotations

import numpy as np

from dpgather.core.dtypes import DTYPES, holds, host_storage
from dpgather.core.errors import CollectiveTimeout, ConfigError, InconsistentStepError, InputError
from dpgather.core.rows import check_desc, check_rows
from dpgather.kernels import _p2p
from dpgather.kernels._cuda import load_cupy

from .base import Closing, parse_timeout
from .bootstrap import Bootstrap
from .windows import CudaWindows

__all__ = ["CudaRuns", "Transport", "host_sum", "job_sources"]


class Transport(Closing):
    """The common part of every P2P transport class (see the module docstring).

    Subclasses set :attr:`name` (the public transport word), :attr:`verb` (the checked entry's
    name, ``"pull"`` or ``"push"``), ``_kernel`` (the kernel's loader: ``window_layout``) and
    ``_EPOCH0`` (the lowest start epoch), and call :meth:`_init_common` then :meth:`_bootstrap`.
    """

    name = "p2p"
    verb = "pull"
    _kernel = None
    _EPOCH0 = 0
    rank: int = 0
    size: int = 1
    timeout_s: float = 0.0
    capacity_bytes: int = 0
    #: The first record's fields every rank must agree on (see dist.windows).
    _SAME = (("cap", "capacity_bytes (rounded up to 256)"), ("epoch0", "_epoch0"))

    def _init_common(self, capacity_bytes, timeout_s, epoch0):
        self.timeout_s = parse_timeout(timeout_s, error=InputError)
        self.capacity_bytes = _p2p.round_capacity(capacity_bytes)
        lo = self._EPOCH0
        if isinstance(epoch0, bool) or not isinstance(epoch0, (int, np.integer)) or not lo <= epoch0 < 2**63:
            raise InputError(f"_epoch0: expected an int in [{lo}, 2**63), got {epoch0!r}")
        self._epoch0 = int(epoch0)
        self._closed = False
        self._err = 0
        self._windows = None

    def _bootstrap(self, mpi_comm, header_of):
        """The construction's exchanges, the first record and this transport's window layout;
        ``header_of(nranks, layout)`` is the initial header. The rank limit is the same on every
        rank, so refusing it here needs no agreement."""
        boot = Bootstrap(type(self).__name__, mpi_comm, self.timeout_s)
        self.rank, self.size = boot.rank, boot.size
        if boot.size > _p2p.MAX_RANKS:
            boot.free()
            raise ConfigError(f"{type(self).__name__}: {boot.size} ranks, the kernel supports at most "
                              f"{_p2p.MAX_RANKS}")
        rec = boot.record()
        rec["cap"], rec["epoch0"] = self.capacity_bytes, self._epoch0
        self._layout = self._kernel.window_layout(boot.size, self.capacity_bytes)
        return boot, rec, header_of(boot.size, self._layout)

    # -- errors ---------------------------------------------------------------------------
    def error(self) -> int:
        """0 while healthy, else the first error code on this rank (sticky).

        1 (``ERR_TIMEOUT``): a wait outlived ``timeout_s``; 2 (``ERR_SIGNATURE``): the ranks
        entered the same collective with different signatures.
        """
        return self._err

    def _error_text(self, code):
        return f"error {code} ({_p2p.ERROR_NAMES.get(code, 'unknown')})"

    def check(self, op="p2p"):
        """Raise ``CollectiveTimeout`` naming ``op`` when :meth:`error` is set or closed
        (``InconsistentStepError`` for a signature mismatch)."""
        if self._closed:
            raise CollectiveTimeout(
                f"{op} on rank {self.rank}/{self.size}: the {type(self).__name__} transport is "
                "closed; create a new one (every rank) to continue")
        code = self.error()
        if code:
            raise (InconsistentStepError if code == _p2p.ERR_SIGNATURE else CollectiveTimeout)(
                f"{op} on rank {self.rank}/{self.size}: the {type(self).__name__} transport is "
                f"broken after {self._error_text(code)} (timeout_s={self.timeout_s:g}); it "
                "refuses every later collective; create a new one (every rank) to continue")

    # -- argument checks ------------------------------------------------------------------
    def _row_capacity(self, row_bytes):
        """Rows of ``row_bytes`` one collective moves per rank (the pull: ``cap // row_bytes``)."""
        return self.capacity_bytes // row_bytes

    def _check_call(self, inp, out, desc, desc_off, row_bytes, dtype, of):
        """Validate one call of the checked entry; returns ``(row_bytes, desc_off)`` as ints."""
        verb = self.verb
        if dtype not in DTYPES:
            raise InputError(f"{verb}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        for name, v in (("row_bytes", row_bytes), ("desc_off", desc_off)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"{verb}: {name} must be an int, got {v!r}")
        row_bytes, desc_off = int(row_bytes), int(desc_off)
        size = DTYPES[dtype].itemsize
        if row_bytes < 1 or row_bytes % size:
            raise InputError(f"{verb}: row_bytes must be a positive multiple of the {dtype} item size {size}, "
                             f"got {row_bytes}")
        if self._row_capacity(row_bytes) < 1:
            raise InputError(f"{verb}: row_bytes={row_bytes} exceeds capacity_bytes={self.capacity_bytes}: not "
                             "one row fits a window buffer; construct the transport with a larger capacity")
        if desc_off < 0:
            raise InputError(f"{verb}: desc_off must be >= 0, got {desc_off}")
        for name, arr in (("inp", inp), ("out", out)):
            check_rows(arr, name, op=verb, of=of, writable=name == "out", row_bytes=row_bytes)
            if not holds(arr.dtype, dtype):
                raise InputError(f"{verb}: {name} has dtype {arr.dtype}, which does not hold dtype={dtype!r} "
                                 f"(expected one of {list(DTYPES[dtype].storages)})")
        check_desc(desc, desc_off + _p2p.HEADER_WORDS, op=verb, of=of)
        return row_bytes, desc_off

    def _host_call(self, inp, out, desc, desc_off, row_bytes, dtype):
        """The host twins' checked entry: refuse when broken or closed, check, then ``run``."""
        self.check(self.verb)
        row_bytes, desc_off = self._check_call(inp, out, desc, desc_off, row_bytes, dtype, np.ndarray)
        self.run(inp, out, desc, desc_off, row_bytes=row_bytes, dtype=dtype)

    def __repr__(self):
        state = "closed" if self._closed else ("ok" if not self.error() else self._error_text(self.error()))
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"capacity_bytes={self.capacity_bytes}, timeout_s={self.timeout_s:g}, {state})")


class CudaRuns:
    """The CUDA side of a transport (mixed into a :class:`Transport` subclass): construction over
    :class:`~dpgather.dist.windows.CudaWindows`, the cached launch of ``run``, the pinned error
    word, ``close``. The subclass provides ``_configure(dtype, vec, grid_rows) -> launch`` and
    ``_vector(row_bytes, itemsize, *pointers)``."""

    def _cuda_init(self, mpi_comm, device, header_of, warm):
        """Build the windows (``warm(device)`` compiles the kernel before the window exists: no
        compilation inside a capture or between bounded exchanges)."""
        self.device = None
        self._launch = {}  # launches of run(), by (dtype, row bytes, rows, alignment)
        limit = []

        def prepare(dev):
            warm(dev)
            limit.append(_p2p.max_blocks(dev))

        boot, rec, header = self._bootstrap(mpi_comm, header_of)
        try:
            self._windows = CudaWindows(boot, rec, device, self._layout.window_bytes, header,
                                        same=self._SAME, prepare=prepare)
        finally:
            boot.free()
        w, lay = self._windows, self._layout
        self.device = w.device
        self._limit = limit[0]
        self._cupy = load_cupy()
        self._fixed = _p2p.window_args(w.table.data.ptr, self.rank, self.size, lay.data_off, lay.cap_bytes,
                                       w.err_ptr, _p2p.timeout_ns(self.timeout_s))

    def error(self) -> int:
        """The kernel's error code: a read of the pinned host word (no CUDA call, no sync).

        It reflects collectives that have *run*: after ``run`` returns the kernel may not have
        started yet. 0 while healthy; 1 timeout; 2 signature mismatch. Sticky.
        """
        if not self._err and self._windows is not None:
            self._err = self._windows.error()
        return self._err

    def _checked(self, inp, out, desc, desc_off, row_bytes, dtype, stream):
        """The CUDA checks of the checked entry; returns ``(row_bytes, desc_off, stream)``."""
        self.check(self.verb)
        cupy = self._cupy
        row_bytes, desc_off = self._check_call(inp, out, desc, desc_off, row_bytes, dtype, cupy.ndarray)
        for name, a in (("inp", inp), ("out", out), ("desc", desc)):
            if a.data.device_id != self.device:
                raise InputError(f"{self.verb}: {name} is on device {a.data.device_id}, the transport on "
                                 f"{self.device}")
        self._vector(row_bytes, DTYPES[dtype].itemsize, inp.data.ptr, out.data.ptr)
        if isinstance(stream, int):
            stream = cupy.cuda.ExternalStream(stream, self.device)
        return row_bytes, desc_off, stream

    def run(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Enqueue one collective without argument checks (the data plane's entry).

        ``stream``: a CuPy stream, or ``None`` for the current one. The launch configuration
        is cached per (dtype, row bytes, rows, alignment); no host synchronisation and no
        allocation: capturable in a CUDA graph (pointers and capacities are baked in, counts
        are read from ``desc``). Raises ``CollectiveTimeout`` only when closed; a device error
        makes the kernel itself refuse (and appears in :meth:`error`).
        """
        if self._closed:
            self.check(self.verb)
        ip, op = inp.data.ptr, out.data.ptr
        key = (dtype, row_bytes, inp.shape[0], out.shape[0], (ip | op) & 15)
        launch = self._launch.get(key)
        if launch is None:
            vec = self._vector(row_bytes, DTYPES[dtype].itemsize, ip, op)
            launch = self._launch[key] = self._configure(dtype, vec, inp.shape[0], out.shape[0], row_bytes)
        s = self._cupy.cuda.get_current_stream() if stream is None else stream
        launch(_p2p.call_args(ip, inp.shape[0], op, out.shape[0], desc.data.ptr, desc_off, desc.shape[0],
                              row_bytes) + self._fixed, s)
        self._windows.launched(s)

    def close(self):
        """Release this rank's windows (:meth:`CudaWindows.close`: local, idempotent, a bounded
        wait for the launches first). Destroy CUDA graphs that captured ``run`` before closing: a
        replay after close uses freed memory. Peers that keep calling time out on their own
        (error 1)."""
        if self._closed:
            return
        self._closed = True
        if self._windows is not None:
            self.error()
            self._windows.close()


def job_sources(job, out_rows, cap_rows, size):
    """One receive job ``(dst_row, cnt, span, src_row, first, count, stride)`` clamped as the
    kernels clamp it: ``(dst_row, span', cnt', src_row, sources)`` with ``span' = 0`` when the
    job writes nothing, ``sources`` the ranks ``first + k*stride`` in ``[0, size)`` in order."""
    dst_row, cnt, span, src_row, first, count, stride = job
    dst_row, cnt, span, src_row = (max(v, 0) for v in (dst_row, cnt, span, src_row))
    first, stride = _p2p.clamp_index(max(first, 0)), _p2p.clamp_index(stride)
    span_c = min(span, out_rows - dst_row) if dst_row < out_rows else 0
    if span_c == 0:
        return dst_row, 0, 0, src_row, []
    sources = [s for s in (first + k * stride for k in range(min(max(count, 0), size))) if 0 <= s < size]
    cnt_c = min(cnt, span_c, cap_rows - src_row) if sources and src_row < cap_rows else 0
    return dst_row, span_c, cnt_c, src_row, sources


def host_sum(views, logical):
    """Element-wise sum of ``[n, row_bytes]`` uint8 views as ``logical``, in source order,
    accumulated in the dtype table's ``acc`` type and rounded once (as the kernels do); one view
    is returned as it is (a byte copy keeps every bit)."""
    if len(views) == 1:
        return views[0]
    dt = host_storage(logical)
    acc = np.dtype(DTYPES[logical].acc)
    rows = [v.view(dt) for v in views]
    total = rows[0].astype(acc) if acc != dt else rows[0].copy()
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf sums are values, as in the kernels
        for r in rows[1:]:
            if acc != dt:
                total += r.astype(acc)
            else:
                np.add(total, r, out=total)  # integers wrap modulo 2**bits; float32 rounds per add
        return (total.astype(dt) if acc != dt else total).view(np.uint8)
