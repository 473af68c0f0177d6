"""The pull transport (``transport="p2p"``): one ``p2p_pull`` collective per call over the ranks of one node.

docs/p2p.md is the specification (window layout, the five phases, the descriptor, the
memory-ordering argument). Two classes with one interface, over the shared windows of
:mod:`.windows`:

- :class:`CudaPull`: one GPU per rank, :class:`~dpgather.dist.windows.CudaWindows`; one kernel
  launch (``kernels/pull.cu``) per collective, enqueued on the caller's stream, no host
  synchronisation, no allocation, capturable in CUDA graphs (every count is read from the
  device descriptor).
- :class:`HostPull`: the same protocol on NumPy arrays over
  :class:`~dpgather.dist.windows.HostWindows`; pack, barrier, pull and reduce run in the calling
  process. It runs in CI, so the descriptor logic is tested on every commit.

Interface (both)::

    t = CudaPull(mpi_comm, capacity_bytes, timeout_s, device=None)          # collective
    t.run(inp, out, desc, desc_off, *, row_bytes, dtype, stream=None)     # collective, trusted
    t.pull(inp, out, desc, desc_off, *, row_bytes, dtype, stream=None)    # collective, checked
    t.error() -> int      # 0, ERR_TIMEOUT (1) or ERR_SIGNATURE (2); sticky
    t.check(op)           # raise CollectiveTimeout / InconsistentStepError when error() != 0
    t.close()             # local, idempotent

``run`` is the data plane's entry: arguments already valid (the arrays of the backend,
C-contiguous 2-D rows of ``row_bytes`` bytes, a descriptor of the backend holding the header
at ``desc_off``), launch configurations cached. ``pull`` validates every argument first (an
``InputError`` before anything is signalled) and then runs.

Failure model: a wait longer than ``timeout_s`` (error 1) or ranks that entered the same
collective with different signatures (error 2) make the transport refuse every later
collective on that rank (sticky). ``HostPull`` raises at once; ``CudaPull`` reports through
:meth:`CudaPull.error` (a read of pinned host memory, no CUDA call) and its next
``pull``/``check`` raises. A rank that leaves makes its peers time out on their own:
``close()`` never waits for anyone. Construction is collective and bounded by ``timeout_s``;
a failure on any rank raises the same error on every rank.

Importing this module imports neither CuPy nor mpi4py.
"""

from __future__ import annotations

import numpy as np

from dpgather.core.dtypes import DTYPES, holds, host_storage
from dpgather.core.errors import CollectiveTimeout, ConfigError, InconsistentStepError, InputError
from dpgather.core.rows import check_desc, check_rows
from dpgather.kernels import _pull
from dpgather.kernels._cuda import load_cupy

from .base import Closing, parse_timeout, poll_until
from .bootstrap import Bootstrap
from .windows import CudaWindows, HostWindows

__all__ = ["CudaPull", "HostPull", "ERR_OK", "ERR_TIMEOUT", "ERR_SIGNATURE"]

ERR_OK, ERR_TIMEOUT, ERR_SIGNATURE = _pull.ERR_OK, _pull.ERR_TIMEOUT, _pull.ERR_SIGNATURE
_BLOCK = (_pull.THREADS,)


class _Pull(Closing):
    """Arguments, error reporting and construction steps shared by both transports."""

    name = "p2p"  # the public word for this transport (Plan.transport, DpAttention(transport=))
    rank: int = 0
    size: int = 1
    timeout_s: float = 0.0
    capacity_bytes: int = 0
    #: The first record's fields every rank must agree on (see dist.windows).
    _SAME = (("cap", "capacity_bytes (rounded up to 256)"), ("epoch0", "_epoch0"))

    def _init_common(self, capacity_bytes, timeout_s, epoch0):
        self.timeout_s = parse_timeout(timeout_s, error=InputError)
        self.capacity_bytes = _pull.round_capacity(capacity_bytes)
        if isinstance(epoch0, bool) or not isinstance(epoch0, (int, np.integer)) or not 0 <= epoch0 < 2**63:
            raise InputError(f"_epoch0: expected an int in [0, 2**63), got {epoch0!r}")
        self._epoch0 = int(epoch0)
        self._closed = False
        self._err = 0
        self._windows = None

    def _bootstrap(self, mpi_comm):
        """The construction's exchanges, the first record and this transport's window layout.
        The rank limit is the same on every rank, so refusing it here needs no agreement."""
        boot = Bootstrap(type(self).__name__, mpi_comm, self.timeout_s)
        self.rank, self.size = boot.rank, boot.size
        if boot.size > _pull.MAX_RANKS:
            boot.free()
            raise ConfigError(f"{type(self).__name__}: {boot.size} ranks, the kernel supports at most "
                              f"{_pull.MAX_RANKS}")
        rec = boot.record()
        rec["cap"], rec["epoch0"] = self.capacity_bytes, self._epoch0
        self._layout = _pull.window_layout(boot.size, self.capacity_bytes)
        return boot, rec, _pull.initial_header(boot.size, self._layout, self._epoch0)

    # -- errors ---------------------------------------------------------------------------
    def error(self) -> int:
        """0 while healthy, else the first error code on this rank (sticky).

        1 (:data:`ERR_TIMEOUT`): a wait outlived ``timeout_s``; 2 (:data:`ERR_SIGNATURE`):
        the ranks entered the same collective with different signatures.
        """
        return self._err

    def _error_text(self, code):
        return f"error {code} ({_pull.ERROR_NAMES.get(code, 'unknown')})"

    def check(self, op="p2p"):
        """Raise ``CollectiveTimeout`` naming ``op`` when :meth:`error` is set or closed
        (``InconsistentStepError`` for a signature mismatch)."""
        if self._closed:
            raise CollectiveTimeout(
                f"{op} on rank {self.rank}/{self.size}: the {type(self).__name__} transport is "
                "closed; create a new one (every rank) to continue")
        code = self.error()
        if code:
            raise (InconsistentStepError if code == ERR_SIGNATURE else CollectiveTimeout)(
                f"{op} on rank {self.rank}/{self.size}: the {type(self).__name__} transport is "
                f"broken after {self._error_text(code)} (timeout_s={self.timeout_s:g}); it "
                "refuses every later collective; create a new one (every rank) to continue")

    # -- argument checks ------------------------------------------------------------------
    def _check_call(self, inp, out, desc, desc_off, row_bytes, dtype, of):
        """Validate one call of :meth:`pull`; returns ``(row_bytes, desc_off)`` as ints."""
        if dtype not in DTYPES:
            raise InputError(f"pull: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        for name, v in (("row_bytes", row_bytes), ("desc_off", desc_off)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"pull: {name} must be an int, got {v!r}")
        row_bytes, desc_off = int(row_bytes), int(desc_off)
        size = DTYPES[dtype].itemsize
        if row_bytes < 1 or row_bytes % size:
            raise InputError(f"pull: row_bytes must be a positive multiple of the {dtype} item size {size}, "
                             f"got {row_bytes}")
        if row_bytes > self.capacity_bytes:
            raise InputError(f"pull: row_bytes={row_bytes} exceeds capacity_bytes={self.capacity_bytes}: not "
                             "one row fits a src buffer; construct the transport with a larger capacity")
        if desc_off < 0:
            raise InputError(f"pull: desc_off must be >= 0, got {desc_off}")
        for name, arr in (("inp", inp), ("out", out)):
            check_rows(arr, name, op="pull", of=of, writable=name == "out", row_bytes=row_bytes)
            if not holds(arr.dtype, dtype):
                raise InputError(f"pull: {name} has dtype {arr.dtype}, which does not hold dtype={dtype!r} "
                                 f"(expected one of {list(DTYPES[dtype].storages)})")
        check_desc(desc, desc_off + _pull.HEADER_WORDS, op="pull", of=of)
        return row_bytes, desc_off

    def __repr__(self):
        state = "closed" if self._closed else ("ok" if not self.error() else self._error_text(self.error()))
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"capacity_bytes={self.capacity_bytes}, timeout_s={self.timeout_s:g}, {state})")


# =============================================================================== host twin

class HostPull(_Pull):
    """The shared-memory twin of :class:`CudaPull` on NumPy row buffers (one node, x86-64).

    Args:
        mpi_comm: mpi4py intra-communicator of the ``T`` ranks (all on one node). Used
            only during construction (through a private duplicate).
        capacity_bytes: bytes of one ``src`` buffer, rounded up to a multiple of 256 (the
            ``capacity_bytes`` attribute holds the rounded value); identical on every rank.
        timeout_s: bound of every wait, in seconds (:func:`~dpgather.dist.base.parse_timeout`:
            a positive number, ``float("inf")`` waits forever).
        device: ignored (signature parity with :class:`CudaPull`).

    Memory: :class:`~dpgather.dist.windows.HostWindows`, ``T`` page-aligned windows of the
    layout of :func:`dpgather.kernels._pull.window_layout` in one node-local segment.

    What differs from the kernel: one thread does every phase in order (no arrive/depart
    counters), the barrier polls the flags with :func:`~dpgather.dist.base.poll_until`
    (spin, yield, then sleeps), a flag is stored as two 32-bit words (signature first,
    epoch second) and read epoch first -- x86-64 keeps stores in program order and never
    reorders loads with older loads (TSO), which is what makes both the flag protocol and
    the data it publishes safe without fences; hence x86-64 only. Errors raise at once
    (``CollectiveTimeout``, ``InconsistentStepError``) as well as setting :meth:`error`.

    Raises (construction, on every rank alike):
        BackendUnavailable: not x86-64, no ``/dev/shm``, ranks on several nodes, mpi4py missing.
        ConfigError: ranks passed different capacities. InputError: bad arguments.
        CollectiveTimeout: a peer did not construct within ``timeout_s``.
    """

    def __init__(self, mpi_comm, capacity_bytes, timeout_s, device=None, *, _epoch0=0):
        self._init_common(capacity_bytes, timeout_s, _epoch0)
        self.device = None
        self._src = self._state = None
        boot, rec, header = self._bootstrap(mpi_comm)
        try:
            self._windows = HostWindows(boot, rec, self._layout.window_bytes, header, same=self._SAME)
        finally:
            boot.free()
        w, lay = self._windows, self._layout
        me = self.rank * w.stride + lay.state_off
        self._state = w.u8[me : me + 32].view(np.uint64)  # epoch, arrive, depart, err
        self._epoch = self._epoch0
        cap = lay.cap_bytes
        self._src = [[w.window(t)[lay.data_off + p * cap : lay.data_off + (p + 1) * cap] for p in (0, 1)]
                     for t in range(self.size)]

    def _set_error(self, code):
        if not self._err:
            self._err = int(code)
            if self._state is not None:
                self._state[3] = np.uint64(code)
        return self._err

    def pull(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Validate, then :meth:`run`: one collective (docs/p2p.md); returns when ``out`` is written.

        Args:
            inp: NumPy ``[in_rows, width]`` C-contiguous, rows of ``row_bytes`` bytes; only
                read (may be ``out`` itself: packing finishes before any row is written).
            out: NumPy ``[out_rows, width]`` C-contiguous, writable; only the rows the
                descriptor's jobs cover are written.
            desc: NumPy 1-D int64 descriptor; ``desc_off``: its first entry.
            row_bytes: bytes per row (<= ``capacity_bytes``).
            dtype: logical dtype of the sums (``"float32" | "float16" | "bfloat16" | "int32" |
                "int64" | "uint8"``); float16/bfloat16 may be stored as uint16/int16.
            stream: ignored.

        Raises:
            CollectiveTimeout: a peer did not arrive within ``timeout_s`` (error 1), or the
                transport is closed/broken. InconsistentStepError: the signatures differ (error 2).
            InputError: bad arguments (nothing was written, nothing signalled).
        """
        self.check("pull")
        row_bytes, desc_off = self._check_call(inp, out, desc, desc_off, row_bytes, dtype, np.ndarray)
        self.run(inp, out, desc, desc_off, row_bytes=row_bytes, dtype=dtype)

    def run(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """:meth:`pull` without argument checks (the data plane's entry; ``stream`` ignored)."""
        if self._err or self._closed:
            self.check("pull")
        sig, packs, jobs = _pull.read_desc(desc, desc_off)
        e = self._epoch + 1
        p = e & 1
        rb = row_bytes
        cap_rows = self._layout.cap_bytes // rb
        inb = inp.reshape(-1).view(np.uint8).reshape(inp.shape[0], rb)
        outb = out.reshape(-1).view(np.uint8).reshape(out.shape[0], rb)

        def src_rows(t):
            return self._src[t][p][: cap_rows * rb].reshape(cap_rows, rb)

        _pack(src_rows(self.rank), inb, packs, cap_rows)
        self._barrier(e, sig)
        _jobs(outb, src_rows, jobs, cap_rows, self.size, dtype)
        self._epoch = e
        self._state[0] = np.uint64(e)

    def _barrier(self, e, sig):
        """Signal epoch ``e`` with ``sig`` in every window, wait for every peer's flag of ``e``,
        compare the signatures (phases 2 and 3)."""
        size, me, w = self.size, self.rank, self._windows
        words, win4 = w.words, w.stride // 4
        p = e & 1
        lo = (p * size + me) * 2
        e32 = e & 0xFFFFFFFF
        for t in range(size):
            words[t * win4 + lo] = sig  # signature word before epoch word
        for t in range(size):
            words[t * win4 + lo + 1] = e32
        base = me * win4 + p * size * 2
        pending = list(range(size))
        bad = []

        def arrived():
            for t in list(pending):
                if words[base + 2 * t + 1] == e32:
                    pending.remove(t)
                    if words[base + 2 * t] != sig:
                        bad.append(t)
            return not pending or bad

        if not arrived() and not poll_until(arrived, self.timeout_s):
            self._set_error(ERR_TIMEOUT)
            raise CollectiveTimeout(
                f"pull (p2p epoch {e}) did not complete within timeout_s={self.timeout_s:g} s on "
                f"rank {me}/{size}: ranks {sorted(pending)} did not enter the same collective "
                "(crashed, stuck, closed, or issued a different sequence); the transport is now "
                "broken (error 1)")
        if bad:
            self._set_error(ERR_SIGNATURE)
            theirs = [hex(words[base + 2 * t]) for t in bad]
            raise InconsistentStepError(
                f"pull (p2p epoch {e}) on rank {me}/{size}: ranks {bad} entered the same "
                f"collective with signatures {theirs}, this rank with {sig:#x}: the ranks "
                "issued different operations; the transport is now broken (error 2)")

    def close(self):
        """Unmap the windows. Local and idempotent: never waits for a peer.

        Peers that keep calling ``pull`` time out (error 1) waiting for this rank's flag;
        their stores into this rank's window land in memory they still map.
        """
        if self._closed:
            return
        self._closed = True
        self._src = self._state = None
        if self._windows is not None:
            self._windows.close()


def _pack(own, inb, packs, cap_rows):
    """Phase 1: ``inb`` rows into this rank's ``src`` rows ``own`` (clamped, zero-filled)."""
    in_rows = inb.shape[0]
    for in_row, rows, src_row in packs:
        in_row, rows, src_row = max(in_row, 0), max(rows, 0), max(src_row, 0)
        rows_c = min(rows, cap_rows - src_row) if src_row < cap_rows else 0
        if rows_c == 0:
            continue
        valid = min(rows_c, in_rows - in_row) if in_row < in_rows else 0
        own[src_row : src_row + valid] = inb[in_row : in_row + valid]
        own[src_row + valid : src_row + rows_c] = 0


def _jobs(outb, src_rows, jobs, cap_rows, size, dtype):
    """Phase 4: every job's rows pulled from (and summed over) its sources' ``src`` rows."""
    out_rows = outb.shape[0]
    for dst_row, cnt, span, src_row, first, count, stride in jobs:
        dst_row, cnt, span, src_row = (max(v, 0) for v in (dst_row, cnt, span, src_row))
        first, stride = _pull.clamp_index(max(first, 0)), _pull.clamp_index(stride)
        span_c = min(span, out_rows - dst_row) if dst_row < out_rows else 0
        if span_c == 0:
            continue
        sources = [s for s in (first + k * stride for k in range(min(max(count, 0), size))) if 0 <= s < size]
        cnt_c = min(cnt, span_c, cap_rows - src_row) if sources and src_row < cap_rows else 0
        dst = outb[dst_row : dst_row + span_c]
        if cnt_c:
            views = [src_rows(s)[src_row : src_row + cnt_c] for s in sources]
            dst[:cnt_c] = views[0] if len(views) == 1 else _reduce(views, dtype).view(np.uint8)
        dst[cnt_c:] = 0


def _reduce(views, logical):
    """Element-wise sum of ``[n, row_bytes]`` uint8 views as ``logical``, in source order,
    accumulated in the dtype table's ``acc`` type and rounded once (as the kernel does)."""
    dt = host_storage(logical)
    acc = np.dtype(DTYPES[logical].acc)
    rows = [v.view(dt) for v in views]
    total = rows[0].astype(acc) if acc != dt else rows[0].copy()
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf sums are values, as in the kernel
        for r in rows[1:]:
            if acc != dt:
                total += r.astype(acc)
            else:
                np.add(total, r, out=total)  # integers wrap modulo 2**bits; float32 rounds per add
        return total.astype(dt) if acc != dt else total


# =============================================================================== CUDA

class CudaPull(_Pull):
    """The pull transport over CUDA IPC: one ``p2p_pull`` kernel per collective.

    Args:
        mpi_comm: mpi4py intra-communicator of the ``T`` ranks (one node, one GPU each,
            ``T <= 256``). Used only during construction (a private duplicate).
        capacity_bytes: bytes of one ``src`` buffer (rounded up to 256; the
            ``capacity_bytes`` attribute holds the rounded value); identical on every rank.
            A collective can only move ``capacity_bytes // row_bytes`` rows per rank.
        timeout_s: bound of every construction exchange and of the kernel's wait
            (:func:`~dpgather.dist.base.parse_timeout`: ``float("inf")`` waits forever).
        device: CUDA device ordinal of this rank; default: this rank's index among the
            ranks of its node, modulo the visible device count. It becomes the current
            CuPy device.

    Construction: :class:`~dpgather.dist.windows.CudaWindows` (three bounded exchanges), whose
    ``prepare`` step compiles the kernels (:func:`dpgather.kernels._pull.warm`) before the
    window is allocated.

    Raises (construction, on every rank alike):
        BackendUnavailable: no CuPy/GPU, ranks on several nodes, a shared device, missing
            peer access, an allocation or IPC failure.
        ConfigError: ranks passed different capacities; ``device`` out of range; more than
            256 ranks.
        CollectiveTimeout: a peer did not construct within ``timeout_s``.
    """

    def __init__(self, mpi_comm, capacity_bytes, timeout_s, device=None, *, _epoch0=0):
        self._init_common(capacity_bytes, timeout_s, _epoch0)
        self.device = None
        self._launch = {}  # launch configurations of run(), by (dtype, rows, row bytes, alignment)
        limit = []

        def prepare(dev):  # before any kernel use, any capture, and outside the exchanges' skew
            _pull.warm(dev)
            limit.append(_pull.max_blocks(dev))

        boot, rec, header = self._bootstrap(mpi_comm)
        try:
            self._windows = CudaWindows(boot, rec, device, self._layout.window_bytes, header,
                                        same=self._SAME, prepare=prepare)
        finally:
            boot.free()
        w, lay = self._windows, self._layout
        self.device = w.device
        self._limit = limit[0]
        self._cupy = load_cupy()
        self._fixed = _pull.window_args(w.table.data.ptr, self.rank, self.size, lay.data_off, lay.cap_bytes,
                                        w.err_ptr, _pull.timeout_ns(self.timeout_s))

    def error(self) -> int:
        """The kernel's error code: a read of the pinned host word (no CUDA call, no sync).

        It reflects collectives that have *run*: after ``run``/``pull`` returns the kernel may
        not have started yet. 0 while healthy; 1 timeout; 2 signature mismatch. Sticky.
        """
        if not self._err and self._windows is not None:
            self._err = self._windows.error()
        return self._err

    def pull(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Validate, then :meth:`run`: enqueue one collective (docs/p2p.md) and return at once.

        Args:
            inp: CuPy ``[in_rows, width]`` C-contiguous on this device, rows of
                ``row_bytes`` bytes; only read (may be ``out``).
            out: CuPy ``[out_rows, width]`` C-contiguous; only rows the jobs cover are written.
            desc: CuPy 1-D int64 descriptor on this device, read by the kernel at run time
                (rewrite it between graph replays); ``desc_off``: its first entry.
            row_bytes: bytes per row (<= ``capacity_bytes``).
            dtype: logical dtype of the sums; float16/bfloat16 as 2-byte storage.
            stream: ``cupy.cuda.Stream``/``ExternalStream``, a raw ``cudaStream_t`` int, or
                ``None`` for the current CuPy stream. Every collective of one transport must
                be ordered after the previous one (same stream, or an event).

        Raises:
            CollectiveTimeout: an earlier collective failed (:meth:`error`) or closed.
            InputError: bad arguments (nothing was enqueued).
        """
        self.check("pull")
        cupy = self._cupy
        row_bytes, desc_off = self._check_call(inp, out, desc, desc_off, row_bytes, dtype, cupy.ndarray)
        for name, a in (("inp", inp), ("out", out), ("desc", desc)):
            if a.data.device_id != self.device:
                raise InputError(f"pull: {name} is on device {a.data.device_id}, the transport on {self.device}")
        _pull.pick_vector(row_bytes, DTYPES[dtype].itemsize, inp.data.ptr, out.data.ptr)
        if isinstance(stream, int):
            stream = cupy.cuda.ExternalStream(stream, self.device)
        self.run(inp, out, desc, desc_off, row_bytes=row_bytes, dtype=dtype, stream=stream)

    def run(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Enqueue one collective without argument checks (the data plane's entry).

        ``stream``: a CuPy stream, or ``None`` for the current one. The launch configuration
        is cached per (dtype, row bytes, rows, alignment); no host synchronisation and no
        allocation: capturable in a CUDA graph (pointers and capacities are baked in, counts
        are read from ``desc``). Raises ``CollectiveTimeout`` only when closed; a device error
        makes the kernel itself refuse (and appears in :meth:`error`).
        """
        if self._closed:
            self.check("pull")
        ip, op = inp.data.ptr, out.data.ptr
        key = (dtype, row_bytes, inp.shape[0], out.shape[0], (ip | op) & 15)
        hit = self._launch.get(key)
        if hit is None:
            vec = _pull.pick_vector(row_bytes, DTYPES[dtype].itemsize, ip, op)
            grid = _pull.grid_size(inp.shape[0], out.shape[0], row_bytes, self._layout.cap_bytes, self._limit)
            hit = self._launch[key] = (_pull.PULL.function(self.device, _pull.kernel_name(dtype, vec)), (grid,))
        fn, grid = hit
        s = self._cupy.cuda.get_current_stream() if stream is None else stream
        fn(grid, _BLOCK, _pull.call_args(ip, inp.shape[0], op, out.shape[0], desc.data.ptr, desc_off,
                                         desc.shape[0], row_bytes) + self._fixed, stream=s)
        self._windows.launched(s)

    def close(self):
        """Release this rank's windows (:meth:`CudaWindows.close`: local, idempotent, a bounded
        wait for the launches first). Destroy CUDA graphs that captured ``pull``/``run`` before
        closing: a replay after close uses freed memory. Peers that keep calling time out on
        their own (error 1)."""
        if self._closed:
            return
        self._closed = True
        if self._windows is not None:
            self.error()
            self._windows.close()
