"""Per-rank shared windows: memory every rank of a node owns and every peer can read and write.

A protocol over shared windows (the pull transport of :mod:`.pull`, or any other that moves
rows through peers' memory) needs the same things, which this module builds once:

- :class:`CudaWindows`: one raw ``cudaMalloc`` window per rank (never from CuPy's pool: an IPC
  handle names a whole allocation), written with the protocol's initial header, shared by CUDA
  IPC; the device table of every rank's window base pointer; this rank's error word (pinned,
  mapped host memory the kernels write and the host reads without a CUDA call); a bounded
  teardown that never frees memory a running kernel may still use.
- :class:`HostWindows`: the host twin, every rank's window in one
  :func:`~dpgather.dist.shm.node_segment`, page-aligned.

Construction is collective over a :class:`~dpgather.dist.bootstrap.Bootstrap` and raises the
same error on every rank. The caller passes its first record, filled with the values every rank
must agree on (``same``: ``(field, name)`` pairs of :data:`~dpgather.dist.bootstrap.RECORD`),
the window size and the initial header (bytes written at offset 0 of this rank's window, before
any peer can see the window). Closing is local and never waits for a peer.
"""

import ctypes
import warnings

import numpy as np

from dpgather.core.errors import BackendUnavailable, DpGatherError
from dpgather.kernels._cuda import load_cupy

from .base import poll_until, teardown_limit
from .bootstrap import FAIL_CONFIG, FAIL_UNAVAILABLE, fail, text
from .nodes import check_peer_access, choose_device, host_id
from .shm import node_segment, unusable_reason

__all__ = ["CudaWindows", "HostWindows"]

_PAGE = 4096
_TEARDOWN_SLACK_S = 5.0  # close()'s stream wait: timeout_s plus this (a kernel's own bound)


class CudaWindows:
    """Every rank's device window, shared over CUDA IPC (see the module docstring).

    Args:
        boot: the construction's :class:`~dpgather.dist.bootstrap.Bootstrap` (``T`` ranks on
            one node, one GPU each).
        rec: this rank's first record, with the fields of ``same`` filled in.
        device: this rank's CUDA device ordinal, or None: its rank modulo the device count.
            It becomes the current CuPy device.
        nbytes: bytes of every window. header: uint8-viewable array written at offset 0.
        same: ``(field, name)`` pairs every rank must agree on.
        prepare: ``prepare(device)`` run before the window is allocated (compile kernels: no
            compilation may happen inside a graph capture or between bounded exchanges); a
            failure there is reported like an allocation failure.

    Construction (three bounded ``Iallgather`` exchanges): (1) node identity, the ``same``
    fields, CuPy and the device count; (2) ``prepare``, ``cudaMalloc``, zero + header, the error
    word (``cudaHostAllocMapped | cudaHostAllocPortable``; its device address from
    ``cudaPointerGetAttributes``: CuPy binds no ``cudaHostGetDevicePointer``, and with unified
    addressing both give the same pointer), the IPC handle and PCI bus id; (3) the peer-access
    check (:func:`~dpgather.dist.nodes.check_peer_access`), every peer's handle opened
    (``cudaIpcMemLazyEnablePeerAccess``), the ``T`` base pointers uploaded.

    Attributes:
        device: the device ordinal. nbytes. base: this rank's window (device address).
        table: CuPy uint64 ``[T]``, every rank's window base pointer. err_ptr: device address of
        this rank's error word.

    Raises (on every rank alike):
        BackendUnavailable: no CuPy/GPU, ranks on several nodes, a shared device, missing peer
            access, an allocation or IPC failure.
        ConfigError: a ``same`` field differs; ``device`` out of range.
        CollectiveTimeout: a peer did not construct within ``timeout_s``.
    """

    def __init__(self, boot, rec, device, nbytes, header, *, same, prepare=None):
        self.timeout_s = boot.timeout_s
        self.rank = boot.rank
        self.nbytes = int(nbytes)
        self.device = None
        self.base = 0
        self.table = None
        self.err_ptr = 0
        self._cupy = None
        self._peers = {}  # rank -> opened IPC pointer
        self._host_word = 0
        self._word = None
        self._code = 0
        self._streams = {}  # stream ptr -> stream launched on since construction
        try:
            self._agree(boot, rec, device, same)
            table = self._allocate(boot, header, prepare)
            self._open(boot, table)
        except BaseException:
            self._release(wait=False)
            raise

    def _agree(self, boot, rec, device, same):
        rec["host"] = host_id()
        cupy = None
        try:
            cupy = load_cupy()
            count = cupy.cuda.runtime.getDeviceCount()
            rec["dev"] = choose_device(count, boot.rank, device)
        except BackendUnavailable as exc:
            fail(rec, FAIL_UNAVAILABLE, exc)
        except DpGatherError as exc:  # ConfigError: device out of range
            fail(rec, FAIL_CONFIG, exc)
        boot.agree(rec, "node, sizes and GPU check", same)
        self._cupy = cupy
        self.device = int(rec["dev"])

    def _allocate(self, boot, header, prepare):
        """Phase 2: window, header, error word, IPC handle; returns every rank's record."""
        cupy, dev = self._cupy, self.device
        rt = cupy.cuda.runtime
        rec = boot.record()
        try:
            cupy.cuda.Device(dev).use()
            if prepare is not None:
                prepare(dev)
            self.base = rt.malloc(self.nbytes)
            rt.memset(self.base, 0, self.nbytes)
            head = np.ascontiguousarray(header)
            rt.memcpy(self.base, head.ctypes.data, head.nbytes, rt.memcpyHostToDevice)
            rt.deviceSynchronize()
            flags = getattr(rt, "hostAllocMapped", 2) | getattr(rt, "hostAllocPortable", 1)
            self._host_word = rt.hostAlloc(4, flags)
            self._word = ctypes.c_int32.from_address(self._host_word)
            self._word.value = 0
            self.err_ptr = int(rt.pointerGetAttributes(self._host_word).devicePointer)
            rec["handle"] = np.frombuffer(rt.ipcGetMemHandle(self.base), np.uint8)
            rec["bus"] = rt.deviceGetPCIBusId(dev).encode()[:16]
            rec["dev"] = dev
        except Exception as exc:  # CUDA errors: report, so every rank raises together
            fail(rec, FAIL_UNAVAILABLE, f"device {dev}: {type(exc).__name__}: {exc}")
        table = boot.allgather(rec, "IPC handles")
        boot.verdict(table, "window allocation")
        return table

    def _open(self, boot, table):
        """Phase 3: peer access, every peer's handle opened, the pointer table uploaded."""
        cupy, dev, rank = self._cupy, self.device, boot.rank
        rt = cupy.cuda.runtime
        rec = boot.record()
        try:
            check_peer_access(rt, rank, dev, [text(b) for b in table["bus"]])
            ptrs = np.zeros(boot.size, np.uint64)
            for t in range(boot.size):
                if t == rank:
                    ptrs[t] = self.base
                else:
                    self._peers[t] = rt.ipcOpenMemHandle(bytes(table["handle"][t]))  # lazy peer access
                    ptrs[t] = self._peers[t]
            self.table = cupy.asarray(ptrs)
            cupy.cuda.Device(dev).synchronize()
        except BackendUnavailable as exc:
            fail(rec, FAIL_UNAVAILABLE, exc)
        except Exception as exc:
            fail(rec, FAIL_UNAVAILABLE, f"device {dev}: {type(exc).__name__}: {exc}")
        boot.verdict(boot.allgather(rec, "peer access verdicts"), "peer access")

    def error(self) -> int:
        """The error word: a read of pinned host memory (no CUDA call, no sync); 0 while healthy.
        After :meth:`close`, the last value read."""
        word = self._word
        if word is not None:
            self._code = word.value
        return self._code

    def launched(self, stream):
        """Record that a kernel using the windows was enqueued on ``stream`` (for :meth:`close`)."""
        if stream.ptr not in self._streams:
            self._streams[stream.ptr] = stream

    def close(self):
        """Release this rank's side. Local and idempotent: never a collective.

        A bounded wait (``timeout_s + 5``, or 60 s when ``timeout_s`` is inf) for the streams
        kernels were launched on; then the peers' IPC mappings are closed, then this rank's
        window and the error word are freed. If the wait fails (a kernel is still running, e.g.
        a replayed graph on another stream), nothing is freed: the memory is leaked on purpose
        rather than pulled from under a running kernel. Graphs that captured launches must be
        destroyed before: a replay after close uses freed memory.
        """
        self._release(wait=True)

    def _drained(self, cupy):
        """Wait (bounded) for every stream launched on; False when one did not finish."""
        limit = teardown_limit(self.timeout_s, _TEARDOWN_SLACK_S)
        with cupy.cuda.Device(self.device):
            event = cupy.cuda.Event(block=False, disable_timing=True)
            for s in self._streams.values():
                if s.is_capturing():
                    continue
                event.record(s)
                if not poll_until(lambda: event.done, limit):
                    warnings.warn(
                        f"shared windows of rank {self.rank}: a launch did not finish within {limit:g} s; "
                        "its memory is leaked, not freed", RuntimeWarning, stacklevel=4)
                    return False
        return True

    def _release(self, wait):
        cupy = self._cupy
        if cupy is None:
            return
        rt = cupy.cuda.runtime
        if wait and self._streams:
            try:
                drained = self._drained(cupy)
            except Exception:  # a broken context: freeing would fail as well
                drained = False
            if not drained:
                self._streams.clear()
                self._cupy = None
                return
        self._streams.clear()
        for ptr in self._peers.values():
            _quietly(rt.ipcCloseMemHandle, ptr)
        self._peers.clear()
        self.table = None
        if self.base:
            _quietly(rt.free, self.base)
            self.base = 0
        if self._host_word:
            self.error()
            self._word = None
            _quietly(rt.freeHost, self._host_word)
            self._host_word = 0
        self._cupy = None


def _quietly(fn, *args):
    try:
        fn(*args)
    except Exception:  # teardown must not raise
        pass


class HostWindows:
    """Every rank's window in one node-local shared-memory segment (see the module docstring).

    Args: as :class:`CudaWindows` (no device); ``tag`` names the segment file.

    Construction: (1) node identity, the ``same`` fields and the platform
    (:func:`~dpgather.dist.shm.unusable_reason`: x86-64, ``/dev/shm``); (2) one
    :func:`~dpgather.dist.shm.node_segment` of ``T`` page-aligned windows (created, reserved and
    unlinked by rank 0 once every rank mapped it); (3) every rank writes its header, then one
    bounded exchange, so no peer touches a window before its header is there.

    Attributes:
        stride: bytes from one rank's window to the next (``nbytes`` rounded up to a page).
        u8: the whole segment as NumPy uint8 (rank ``t``'s window at ``t * stride``).
        words: the whole segment as a ``memoryview`` of 32-bit words (flag access without NumPy).

    Raises (on every rank alike):
        BackendUnavailable: not x86-64, no ``/dev/shm``, ranks on several nodes, the segment
            cannot be created or mapped. ConfigError: a ``same`` field differs.
        CollectiveTimeout: a peer did not construct within ``timeout_s``.
    """

    def __init__(self, boot, rec, nbytes, header, *, same, tag="dpgather-pull"):
        rec["host"] = host_id()
        reason = unusable_reason()
        if reason:
            fail(rec, FAIL_UNAVAILABLE, f"the host twin cannot run: {reason}")
        boot.agree(rec, "node, sizes and platform check", same)
        self.stride = -(-int(nbytes) // _PAGE) * _PAGE
        try:
            self._seg = node_segment(boot.comm, self.stride * boot.size, boot.timeout_s, boot.orphans, tag)
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"{boot.who} construction failed (shared-memory windows): {exc}") from None
        self.u8 = np.frombuffer(self._seg.buf, np.uint8)
        self.words = self._seg.buf.cast("I")
        head = np.ascontiguousarray(header).view(np.uint8).reshape(-1)
        me = boot.rank * self.stride
        self.u8[me : me + head.size] = head
        try:
            boot.allgather(boot.record(), "window headers written")
        except BaseException:
            self.close()
            raise

    def window(self, t):
        """Rank ``t``'s window as NumPy uint8."""
        return self.u8[t * self.stride : (t + 1) * self.stride]

    def close(self):
        """Unmap (local, idempotent). Views of :attr:`u8` must be dropped before; while one is
        alive the mapping stays until the process exits."""
        seg, self._seg = getattr(self, "_seg", None), None
        self.u8 = None
        words, self.words = getattr(self, "words", None), None
        if words is not None:
            words.release()
        if seg is not None:
            seg.close()
