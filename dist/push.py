"""The push transport (``transport="push"``): one ``p2p_push`` collective per call over the ranks of one node.

docs/push.md is the specification (LL lines ``{data, epoch, data, epoch}``, two slot sets, the
epochs and their wrap, the descriptor, the ordering argument). Two classes with one interface,
the pull transport's (:mod:`.pull`), over the shared windows of :mod:`.windows`:

- :class:`CudaPush`: one GPU per rank, :class:`~dpgather.dist.windows.CudaWindows`; one kernel
  launch (``kernels/push.cu``) per collective, enqueued on the caller's stream, no host
  synchronisation, no allocation, capturable in CUDA graphs (every count is read from the
  device descriptor). Where ``cuda-bindings`` imports and the GPU is sm_90 or newer the launch
  is a programmatic dependent launch (:mod:`dpgather.kernels._launch`; ``pdl=False`` or
  ``DPGATHER_PUSH_PDL=0`` turn it off), else a plain CuPy launch.
- :class:`HostPush`: the same protocol on NumPy arrays over
  :class:`~dpgather.dist.windows.HostWindows` (one process per rank): the same window layout,
  lines, epochs, slot sets, headers, descriptor and clamps, so CI tests the descriptor logic and
  the data plane over push on every commit.

Interface (both)::

    t = CudaPush(mpi_comm, capacity_bytes, timeout_s, device=None)         # collective
    t.run(inp, out, desc, desc_off, *, row_bytes, dtype, stream=None)     # collective, trusted
    t.push(inp, out, desc, desc_off, *, row_bytes, dtype, stream=None)    # collective, checked
    t.error() -> int      # 0, ERR_TIMEOUT (1) or ERR_SIGNATURE (2); sticky
    t.check(op)           # raise CollectiveTimeout / InconsistentStepError when error() != 0
    t.close()             # local, idempotent

``capacity_bytes`` is the data one source may send one receiver per collective: a window costs
``4 (T-1) capacity_bytes`` plus its header (docs/push.md, "Window"); ``inp`` and ``out`` must
not overlap. Failure model, construction and teardown are the pull's: a wait longer than
``timeout_s`` (error 1) or a peer's header with another signature or source rank (error 2)
make the transport refuse every later collective on that rank; ``HostPush`` raises at once,
``CudaPush`` reports through :meth:`CudaPush.error` (a read of pinned host memory) and its next
``push``/``check`` raises; construction is collective, bounded by ``timeout_s``, and raises the
same error on every rank; ``close()`` is local.

Importing this module imports neither CuPy nor mpi4py nor ``cuda-bindings``.
"""

from __future__ import annotations

import time

import numpy as np

from dpgather.core.errors import CollectiveTimeout, InconsistentStepError, InputError
from dpgather.kernels import _launch, _p2p, _push

from .base import poll_until
from .transport import CudaRuns, Transport, host_sum, job_sources
from .windows import HostWindows

__all__ = ["CudaPush", "HostPush"]

_BLOCK = (_p2p.THREADS,)
_CLEAR_FROM = 2**32 - 2  # a collective with e >= this clears its set (docs/push.md, "The wrap")


def next_epoch(last: int) -> int:
    """The epoch after ``last``: ``last + 1`` (mod 2^32), skipping 0 and 1 (docs/push.md)."""
    n = (int(last) + 1) & 0xFFFFFFFF
    return n if n >= _push.FIRST_EPOCH else _push.FIRST_EPOCH


def _address(a):
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


class _Push(Transport):
    """The push protocol's constants and checks (:class:`~dpgather.dist.transport.Transport`
    does the rest)."""

    name = "push"  # the public word for this transport (Plan.transport, DpAttention(transport=))
    verb = "push"
    _kernel = _push
    _EPOCH0 = 1

    @staticmethod
    def _header(nranks, layout, epoch0):
        return _push.initial_state(epoch0)

    def _row_capacity(self, row_bytes):
        return _push.capacity_rows(row_bytes, self.capacity_bytes)

    def _check_call(self, inp, out, desc, desc_off, row_bytes, dtype, of):
        row_bytes, desc_off = super()._check_call(inp, out, desc, desc_off, row_bytes, dtype, of)
        a, b = _address(inp), _address(out)
        if inp.nbytes and out.nbytes and a < b + out.nbytes and b < a + inp.nbytes:
            raise InputError("push: inp and out overlap; the push transport reads inp while other blocks "
                             "write out (docs/push.md, \"Self\"): pass separate buffers")
        return row_bytes, desc_off


# =============================================================================== host twin

class HostPush(_Push):
    """The shared-memory twin of :class:`CudaPush` on NumPy row buffers (one node, x86-64).

    Args:
        mpi_comm: mpi4py intra-communicator of the ``T`` ranks (all on one node); used only
            during construction (a private duplicate).
        capacity_bytes: data bytes one source may send one receiver per collective, rounded up to
            a multiple of 256; identical on every rank.
        timeout_s: bound of every wait (:func:`~dpgather.dist.base.parse_timeout`).
        device: ignored (signature parity with :class:`CudaPush`).

    What differs from the kernel: one thread does every phase in order (no depart counter); a
    line is stored as its two data words first, then its two epoch words (each a separate 4-byte
    store of a strided NumPy copy), and polled epoch words first, then data. x86-64 makes stores
    visible in program order and never reorders a load with an older load (TSO), so a line whose
    epoch words read ``e`` holds its data of epoch ``e``: the kernel's single-copy atomic halves
    are not needed (hence x86-64 only, as for the pull's twin). Polls are bounded by
    ``timeout_s`` through :func:`~dpgather.dist.base.poll_until`. Errors raise at once as well as
    setting :meth:`error`.

    Raises (construction, on every rank alike): as :class:`~dpgather.dist.pull.HostPull`.
    """

    def __init__(self, mpi_comm, capacity_bytes, timeout_s, device=None, *, _epoch0=1):
        self._init_common(capacity_bytes, timeout_s, _epoch0)
        self.device = None
        self._state = None
        boot, rec, header = self._bootstrap(mpi_comm, lambda t, lay: self._header(t, lay, self._epoch0))
        try:
            self._windows = HostWindows(boot, rec, self._layout.window_bytes, header, same=self._SAME,
                                        tag="dpgather-push")
        finally:
            boot.free()
        self._state = self._windows.window(self.rank)[:32].view(np.uint64)  # epoch, depart, err, 0
        self._epoch = self._epoch0

    def _lines(self, dst, src, p, first=0, count=None):
        """Lines ``[first, first + count)`` of ``region[p][slot of src]`` in rank ``dst``'s window,
        as a uint32 ``[lines, 4]`` view (``data0, epoch, data1, epoch``)."""
        lay, P = self._layout, self.size - 1
        at = lay.data_off + (p * P + src - (src > dst)) * lay.region_bytes + 16 * first
        n = lay.region_bytes // 16 - first if count is None else count
        return self._windows.window(dst)[at:at + 16 * n].view(np.uint32).reshape(n, 4)

    def _headers(self, dst, p):
        """Rank ``dst``'s ``hdr[p]``: uint32 ``[T-1, 4]`` (``sig, epoch, source, epoch``)."""
        at, P = _push.HDR_OFF + p * (self.size - 1) * 16, self.size - 1
        return self._windows.window(dst)[at:at + 16 * P].view(np.uint32).reshape(P, 4)

    def _fail(self, code, exc):
        if not self._err:
            self._err = int(code)
            if self._state is not None:
                self._state[2] = np.uint64(code | code << 32)
        raise exc

    def push(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Validate, then :meth:`run`: one collective (docs/push.md); returns when ``out`` is written.

        Args:
            inp: NumPy ``[in_rows, width]`` C-contiguous, rows of ``row_bytes`` bytes; only read.
            out: NumPy ``[out_rows, width]`` C-contiguous, writable, not overlapping ``inp``; only
                the rows the descriptor's jobs cover are written.
            desc: NumPy 1-D int64 descriptor; ``desc_off``: its first entry.
            row_bytes: bytes per row (at most ``capacity_bytes`` rounded up to 8).
            dtype: logical dtype of the sums; float16/bfloat16 may be stored as uint16/int16.
            stream: ignored.

        Raises:
            CollectiveTimeout: a peer did not arrive within ``timeout_s`` (error 1), or the
                transport is closed/broken. InconsistentStepError: another signature (error 2).
            InputError: bad arguments (nothing was written, nothing sent).
        """
        self._host_call(inp, out, desc, desc_off, row_bytes, dtype)

    def run(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """:meth:`push` without argument checks (the data plane's entry; ``stream`` ignored)."""
        if self._err or self._closed:
            self.check("push")
        sig, sends, jobs, self_row = _push.read_desc(desc, desc_off)
        e = next_epoch(self._epoch)
        p, rb = e & 1, row_bytes
        lpr = _push.lines_per_row(rb)
        cap_rows = _push.capacity_rows(rb, self._layout.cap_bytes)
        inb = inp.reshape(-1).view(np.uint8).reshape(inp.shape[0], rb)
        outb = out.reshape(-1).view(np.uint8).reshape(out.shape[0], rb)
        deadline = time.monotonic() + self.timeout_s
        self._send(sig, e, p, sends, inb, lpr, cap_rows)
        self._wait_headers(sig, e, p, deadline)
        for job in jobs:
            self._receive(job, e, p, inb, outb, self_row, lpr, cap_rows, dtype, deadline)
        if e >= _CLEAR_FROM:  # the last collective of its set before the wrap clears it
            for src in range(self.size):
                if src != self.rank:
                    self._lines(self.rank, src, p)[:] = 0
            self._headers(self.rank, p)[:] = 0
        self._epoch = e
        self._state[0] = np.uint64(e)

    def _store(self, lines, data, e):
        """Store ``data`` (uint32 ``[n, 2]``) into ``lines`` (``[n, 4]``): data words first, then
        the epoch words (see the class docstring)."""
        lines[:, 0::2] = data
        lines[:, 1::2] = e

    def _send(self, sig, e, p, sends, inb, lpr, cap_rows):
        """Phase 1: a header to every peer, then every send record's lines (never waits)."""
        me, T = self.rank, self.size
        head = np.array([[sig, me]], np.uint32)
        for t in range(T):
            if t != me:
                self._store(self._headers(t, p)[me - (me > t): me - (me > t) + 1], head, e)
        in_rows = inb.shape[0]
        for in_row, rows, slot_row, dest_first, dest_count in sends:
            in_row, slot_row = max(in_row, 0), max(slot_row, 0)
            rows = min(max(rows, 0), cap_rows - slot_row) if slot_row < cap_rows else 0
            valid = min(rows, in_rows - in_row) if in_row < in_rows else 0
            first = _p2p.clamp_index(max(dest_first, 0))
            d0, d1 = min(first, T), min(first + min(max(dest_count, 0), T), T)
            dests = [d for d in range(d0, d1) if d != me]
            if rows == 0 or not dests:
                continue
            data = np.zeros((rows, 8 * lpr), np.uint8)
            data[:valid, :inb.shape[1]] = inb[in_row:in_row + valid]
            data = data.view(np.uint32).reshape(rows * lpr, 2)
            for d in dests:
                self._store(self._lines(d, me, p, slot_row * lpr, rows * lpr), data, e)

    def _wait_headers(self, sig, e, p, deadline):
        """Phase 2a: every peer's header of epoch ``e``; another signature or source is error 2."""
        me, T = self.rank, self.size
        hdr = self._headers(me, p)
        srcs = np.array([s for s in range(T) if s != me], np.uint32)
        state = {}

        def arrived():
            here = (hdr[:, 1] == e) & (hdr[:, 3] == e)
            bad = here & ((hdr[:, 0] != sig) | (hdr[:, 2] != srcs))
            state["bad"], state["missing"] = np.flatnonzero(bad), np.flatnonzero(~here)
            return state["bad"].size or not state["missing"].size

        if not poll_until(arrived, max(deadline - time.monotonic(), 0.0)):
            self._fail(_p2p.ERR_TIMEOUT, CollectiveTimeout(
                f"push (epoch {e}) did not complete within timeout_s={self.timeout_s:g} s on rank {me}/{T}: ranks "
                f"{srcs[state['missing']].tolist()} did not enter the same collective (crashed, stuck, closed, or "
                "issued a different sequence); the transport is now broken (error 1)"))
        if state["bad"].size:
            j = state["bad"]
            self._fail(_p2p.ERR_SIGNATURE, InconsistentStepError(
                f"push (epoch {e}) on rank {me}/{T}: ranks {srcs[j].tolist()} entered the same collective with "
                f"signatures {[hex(int(v)) for v in hdr[j, 0]]} (source words {hdr[j, 2].tolist()}), this rank "
                f"with {sig:#x}: the ranks issued different operations; the transport is now broken (error 2)"))

    def _receive(self, job, e, p, inb, outb, self_row, lpr, cap_rows, dtype, deadline):
        """Phase 2b: one job's rows, from the own region of each source (polled until every line
        carries ``e``) or from ``inp`` for this rank, copied or summed in source order."""
        dst_row, span, cnt, src_row, sources = job_sources(job, outb.shape[0], cap_rows, self.size)
        dst = outb[dst_row:dst_row + span]
        if cnt:
            dst[:cnt] = host_sum([self._rows_of(s, e, p, src_row, cnt, inb, self_row, lpr, deadline)
                                  for s in sources], dtype)
        dst[cnt:] = 0

    def _rows_of(self, src, e, p, src_row, cnt, inb, self_row, lpr, deadline):
        """Slot rows ``[src_row, src_row + cnt)`` from ``src`` as uint8 ``[cnt, row_bytes]``."""
        rb = inb.shape[1]
        if src == self.rank:  # "the region from me" is the input itself (docs/push.md, "Self")
            rows = np.zeros((cnt, rb), np.uint8)
            at = self_row + src_row
            valid = max(min(cnt, inb.shape[0] - at), 0)
            rows[:valid] = inb[at:at + valid]
            return rows
        lines = self._lines(self.rank, src, p, src_row * lpr, cnt * lpr)
        if not poll_until(lambda: (lines[:, 1] == e).all() and (lines[:, 3] == e).all(),
                          max(deadline - time.monotonic(), 0.0)):
            self._fail(_p2p.ERR_TIMEOUT, CollectiveTimeout(
                f"push (epoch {e}) did not complete within timeout_s={self.timeout_s:g} s on rank "
                f"{self.rank}/{self.size}: rank {src} sent fewer rows than this rank's descriptor reads (it issued "
                "a different operation, or stopped); the transport is now broken (error 1)"))
        data = np.ascontiguousarray(lines[:, 0::2])
        return data.view(np.uint8).reshape(cnt, 8 * lpr)[:, :rb]

    def close(self):
        """Unmap the windows. Local and idempotent: never waits for a peer. Peers that keep
        calling time out (error 1) waiting for this rank's header."""
        if self._closed:
            return
        self._closed = True
        self._state = None
        if self._windows is not None:
            self._windows.close()


# =============================================================================== CUDA

class CudaPush(CudaRuns, _Push):
    """The push transport over CUDA IPC: one ``p2p_push`` kernel per collective.

    Args:
        mpi_comm: mpi4py intra-communicator of the ``T`` ranks (one node, one GPU each,
            ``T <= 256``); used only during construction (a private duplicate).
        capacity_bytes: data bytes one source may send one receiver per collective (rounded up
            to 256); identical on every rank. A collective moves at most
            ``capacity_bytes / 8 / ceil(row_bytes / 8)`` rows per source and receiver.
        timeout_s: bound of every construction exchange and of the kernel's polls.
        device: CUDA device ordinal of this rank (default: its index among the ranks of its
            node, modulo the visible device count); it becomes the current CuPy device.
        pdl: launch with programmatic dependent launch (True / False; None: unless
            ``DPGATHER_PUSH_PDL=0``). It is used where ``cuda-bindings`` imports and the GPU is
            sm_90 or newer; :attr:`pdl` says whether it is, :attr:`pdl_reason` why not.

    Construction: :class:`~dpgather.dist.windows.CudaWindows` (three bounded exchanges), its
    ``prepare`` step compiling the kernels (:func:`dpgather.kernels._push.warm`); the window is
    zeroed and starts with :func:`dpgather.kernels._push.initial_state`.

    Raises (construction, on every rank alike): as :class:`~dpgather.dist.pull.CudaPull`.
    """

    def __init__(self, mpi_comm, capacity_bytes, timeout_s, device=None, *, pdl=None, _epoch0=1):
        self._init_common(capacity_bytes, timeout_s, _epoch0)
        self._cuda_init(mpi_comm, device, lambda t, lay: self._header(t, lay, self._epoch0), _push.warm)
        cc = str(self._cupy.cuda.Device(self.device).compute_capability)
        enabled = _launch.pdl_switch() if pdl is None else bool(pdl)
        self.pdl_reason = _launch.pdl_reason((int(cc[:-1]), int(cc[-1])), enabled)
        self.pdl = self.pdl_reason is None

    _vector = staticmethod(_push.pick_vector)

    def _configure(self, dtype, vec, in_rows, out_rows, row_bytes):
        """The launch of one configuration: ``cuLaunchKernelEx`` with PDL, or a CuPy call."""
        fn = _push.PUSH.function(self.device, _push.kernel_name(dtype, vec))
        grid = _push.grid_size(in_rows, out_rows, row_bytes, self._layout.cap_bytes, self.size, self._limit)
        if self.pdl:
            ex = _launch.ExLaunch(fn, grid, _p2p.THREADS)

            def launch(args, stream):
                ex.launch(args, stream.ptr)
        else:
            def launch(args, stream):
                fn((grid,), _BLOCK, args, stream=stream)

        return launch

    def push(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Validate, then :meth:`run`: enqueue one collective (docs/push.md) and return at once.

        Args:
            inp: CuPy ``[in_rows, width]`` C-contiguous on this device, rows of ``row_bytes``
                bytes; only read; must not overlap ``out``.
            out: CuPy ``[out_rows, width]`` C-contiguous; only rows the jobs cover are written.
            desc: CuPy 1-D int64 descriptor on this device, read by the kernel at run time;
                ``desc_off``: its first entry.
            row_bytes, dtype, stream: as :meth:`dpgather.dist.pull.CudaPull.pull`.

        Raises:
            CollectiveTimeout: an earlier collective failed (:meth:`error`) or closed.
            InputError: bad arguments (nothing was enqueued).
        """
        row_bytes, desc_off, stream = self._checked(inp, out, desc, desc_off, row_bytes, dtype, stream)
        self.run(inp, out, desc, desc_off, row_bytes=row_bytes, dtype=dtype, stream=stream)

    def phase_stamps(self):
        """The ``%globaltimer`` stamps (ns) of the last collective's phases on this rank
        (:data:`dpgather.kernels._push.PHASES`), or zeros when the kernel was built without
        ``DPG_P2P_PUSH_PHASE_TIMES=1``. A device-to-host copy after a device synchronisation:
        for benchmarks, never in a step."""
        rt = self._cupy.cuda.runtime
        out = np.zeros(len(_push.PHASES), np.uint64)
        with self._cupy.cuda.Device(self.device):
            rt.deviceSynchronize()
            rt.memcpy(out.ctypes.data, self._windows.base + _push.TIMES_OFF, out.nbytes, rt.memcpyDeviceToHost)
        return [int(v) for v in out]
