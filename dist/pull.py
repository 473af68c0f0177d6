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

from dpgather.core.errors import CollectiveTimeout, InconsistentStepError
from dpgather.kernels import _p2p, _pull

from .base import poll_until
from .transport import CudaRuns, Transport, host_sum, job_sources
from .windows import HostWindows

__all__ = ["CudaPull", "HostPull", "ERR_OK", "ERR_TIMEOUT", "ERR_SIGNATURE"]

ERR_OK, ERR_TIMEOUT, ERR_SIGNATURE = _p2p.ERR_OK, _p2p.ERR_TIMEOUT, _p2p.ERR_SIGNATURE
_BLOCK = (_p2p.THREADS,)


class _Pull(Transport):
    """The pull protocol's constants (:class:`~dpgather.dist.transport.Transport` does the rest)."""

    name = "p2p"  # the public word for this transport (Plan.transport, DpAttention(transport=))
    verb = "pull"
    _kernel = _pull
    _EPOCH0 = 0

    @staticmethod
    def _header(nranks, layout, epoch0):
        return _pull.initial_header(nranks, layout, epoch0)


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
        boot, rec, header = self._bootstrap(mpi_comm, lambda t, lay: self._header(t, lay, self._epoch0))
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
        self._host_call(inp, out, desc, desc_off, row_bytes, dtype)

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
    for job in jobs:
        dst_row, span_c, cnt_c, src_row, sources = job_sources(job, out_rows, cap_rows, size)
        dst = outb[dst_row : dst_row + span_c]
        if cnt_c:
            dst[:cnt_c] = host_sum([src_rows(s)[src_row : src_row + cnt_c] for s in sources], dtype)
        dst[cnt_c:] = 0


# =============================================================================== CUDA

class CudaPull(CudaRuns, _Pull):
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
        self._cuda_init(mpi_comm, device, lambda t, lay: self._header(t, lay, self._epoch0), _pull.warm)

    _vector = staticmethod(_p2p.pick_vector)

    def _configure(self, dtype, vec, in_rows, out_rows, row_bytes):
        """The launch of one configuration: a CuPy ``RawKernel`` call."""
        fn = _pull.PULL.function(self.device, _pull.kernel_name(dtype, vec))
        grid = (_pull.grid_size(in_rows, out_rows, row_bytes, self._layout.cap_bytes, self._limit),)

        def launch(args, stream):
            fn(grid, _BLOCK, args, stream=stream)

        return launch

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
        row_bytes, desc_off, stream = self._checked(inp, out, desc, desc_off, row_bytes, dtype, stream)
        self.run(inp, out, desc, desc_off, row_bytes=row_bytes, dtype=dtype, stream=stream)
