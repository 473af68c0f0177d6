"""The P2P transport: one ``p2p_pull`` collective per call over the ranks of one node.

docs/p2p.md is the specification (window layout, the five phases, the descriptor, the
memory-ordering argument). Two classes with one interface:

- :class:`CudaP2P`: one GPU per rank. Every rank's window is one raw ``cudaMalloc``
  allocation shared by CUDA IPC; one kernel launch (``kernels/p2p.cu``) per collective,
  enqueued on the caller's stream, no host synchronisation, no allocation, capturable in
  CUDA graphs (every count is read from the device descriptor).
- :class:`HostP2P`: the same protocol on NumPy arrays through one POSIX shared-memory
  segment holding every rank's window; pack, barrier, pull and reduce run in the calling
  process. It runs in CI, so the descriptor logic is tested on every commit.

Interface (both)::

    t = CudaP2P(mpi_comm, capacity_bytes, timeout_s, device=None)   # collective
    t.pull(inp, out, desc, desc_off, row_bytes=..., dtype=..., stream=None)  # collective
    t.error() -> int      # 0, ERR_TIMEOUT (1) or ERR_SIGNATURE (2); sticky
    t.check()             # raise CollectiveTimeout when error() != 0
    t.close()             # local, idempotent

Failure model: a wait longer than ``timeout_s`` (error 1) or ranks that entered the same
collective with different signatures (error 2) make the transport refuse every later
collective on that rank (sticky). ``HostP2P.pull`` raises
:class:`~dpgather.core.errors.CollectiveTimeout` at once; ``CudaP2P`` reports through
:meth:`error` (a read of pinned host memory, no CUDA call) and its next ``pull``/``check``
raises. A rank that leaves makes its peers time out on their own: ``close()`` never waits
for anyone. Construction is collective: every MPI call is nonblocking and polled against
``timeout_s`` (``CollectiveTimeout`` when a peer does not show up), and a failure on any rank
(no GPU, no peer access, different capacities...) raises the same error on every rank.

Importing this module imports neither CuPy nor mpi4py.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import secrets
import socket
import warnings

import numpy as np

from dpgather.core.errors import (
    BackendUnavailable,
    CollectiveTimeout,
    ConfigError,
    DpGatherError,
    InconsistentStepError,
    InputError,
)
from dpgather.kernels import _p2p

from dpgather.core.dtypes import LOGICAL_DTYPES

from .base import poll_until

__all__ = ["CudaP2P", "HostP2P", "probe_p2p", "node_size", "host_id", "ERR_OK", "ERR_TIMEOUT", "ERR_SIGNATURE"]

ERR_OK, ERR_TIMEOUT, ERR_SIGNATURE = _p2p.ERR_OK, _p2p.ERR_TIMEOUT, _p2p.ERR_SIGNATURE

#: Storage dtypes accepted for each logical dtype (CuPy has no bfloat16: 2-byte storage).
_STORAGE = {
    "float32": ("float32",),
    "float16": ("float16", "uint16", "int16"),
    "bfloat16": ("bfloat16", "uint16", "int16"),
    "int32": ("int32",),
    "int64": ("int64",),
    "uint8": ("uint8",),
}
_SHM_DIR = "/dev/shm"
_PAGE = 4096
_TEARDOWN_DEFAULT_S = 60.0  # bound of close()'s stream wait when timeout_s means forever
_REASON_BYTES = 240

# One record per rank per construction phase (raw bytes over MPI.BYTE).
_REC = np.dtype([
    ("ok", "<i4"),  # 0 ok, else one of the _FAIL_* kinds
    ("dev", "<i4"),  # CUDA device ordinal (or device count in phase 1)
    ("host", "<u8"),  # node identity: hash of hostname and boot id
    ("cap", "<i8"),  # capacity_bytes after rounding
    ("epoch0", "<i8"),
    ("bus", "S16"),  # PCI bus id of the device
    ("handle", "u1", (64,)),  # cudaIpcMemHandle_t
    ("reason", f"S{_REASON_BYTES}"),
])
_FAIL_UNAVAILABLE, _FAIL_CONFIG = 1, 2


def _load_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise BackendUnavailable(
            f"the P2P transport bootstraps over MPI and needs mpi4py ({exc}); "
            '`pip install "mpi4py>=4" mpich`'
        ) from exc
    return MPI


def host_id() -> int:
    """64-bit identity of this node: hostname and kernel boot id (NCCL's host hash idea)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    digest = hashlib.blake2b(f"{socket.gethostname()}|{boot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def node_size(hosts, pretend, A):
    """Ranks per node for the P2P transport: ``(L, "")``, or ``(0, reason)`` when it cannot run.

    Args:
        hosts: every rank's :func:`host_id`, in rank order.
        pretend: ``DPGATHER_P2P_NODES`` as rank 0 read it (``""``: unset): split the ranks into
            that many pretend nodes of consecutive ranks (on one machine too), to test the
            several-node path (docs/p2p.md, "Several nodes").
        A: ranks per replica (a node must hold whole replicas).

    Nodes must be runs of consecutive ranks, all of one size ``L`` that is a multiple of ``A``
    (the layout ``mpirun`` gives by default): then every node holds whole replicas, and a node
    block of the gathered buffer is contiguous. Pure: no communication.
    """
    T = len(hosts)
    node = list(hosts)
    if pretend not in ("", None):
        try:
            n = int(pretend)
        except ValueError:
            n = 0
        if n < 1 or T % n:
            return 0, f"DPGATHER_P2P_NODES={pretend!r} must be a positive divisor of the {T} ranks"
        node = [(h, r // (T // n)) for r, h in enumerate(hosts)]
    runs = [0]
    for r in range(1, T):
        if node[r] != node[r - 1]:
            if node[r] in node[:r]:
                return 0, f"the ranks of a node are not consecutive (rank {r} returns to an earlier node)"
            runs.append(r)
    runs.append(T)
    sizes = {runs[i + 1] - runs[i] for i in range(len(runs) - 1)}
    if len(sizes) > 1:
        return 0, f"the nodes hold different numbers of ranks ({sorted(sizes)})"
    L = sizes.pop()
    if L % A:
        return 0, f"a node's {L} ranks do not hold whole replicas of attn_tp_size={A}"
    return L, ""


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _timeout_value(timeout_s) -> float:
    try:
        t = 0.0 if timeout_s is None else float(timeout_s)
    except (TypeError, ValueError):
        raise InputError(f"timeout_s: expected a number of seconds (or None), got {timeout_s!r}") from None
    if t != t:
        raise InputError("timeout_s: expected a number of seconds (or None), got nan")
    return t


def _text(v) -> str:
    return bytes(v).rstrip(b"\x00").decode(errors="replace")


class _Bootstrap:
    """Bounded exchanges of :data:`_REC` records over a private duplicate of the communicator.

    Every call is an ``Iallgather`` polled against ``timeout_s``; a timeout keeps the
    request and its buffers alive (MPI may still write them) and raises
    ``CollectiveTimeout``. :meth:`verdict` turns the gathered ``ok`` fields into the same
    exception on every rank.
    """

    def __init__(self, owner, mpi_comm):
        MPI = _load_mpi()
        self.MPI = MPI
        self.owner = owner
        if not isinstance(mpi_comm, MPI.Intracomm) or mpi_comm == MPI.COMM_NULL:
            raise InputError(
                f"mpi_comm: expected an mpi4py intra-communicator such as MPI.COMM_WORLD, got "
                f"{mpi_comm!r}"
            )
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        owner.rank, owner.size = self.rank, self.size
        self.orphans = []
        comm, req = mpi_comm.Idup()
        self.comm = comm
        self._wait(req, "duplicating the MPI communicator")

    def _wait(self, req, what, *keep):
        if not poll_until(req.Test, self.owner.timeout_s):
            self.orphans.append((req, keep))
            raise CollectiveTimeout(
                f"{type(self.owner).__name__} construction ({what}) did not complete within "
                f"timeout_s={self.owner.timeout_s:g} s on rank {self.rank}/{self.size}: a peer "
                "rank did not enter the same constructor (crashed, stuck, or constructing "
                "something else)"
            )

    def allgather(self, rec, what):
        """Every rank's record (``[size]`` of :data:`_REC`)."""
        table = np.zeros(self.size, _REC)
        send = np.ascontiguousarray(rec).reshape(1)
        B = self.MPI.BYTE
        self._wait(self.comm.Iallgather([send.view(np.uint8), B], [table.view(np.uint8), B]),
                   what, send, table)
        return table

    def bcast_bytes(self, buf, what):
        self._wait(self.comm.Ibcast([buf, self.MPI.BYTE], root=0), what, buf)
        return buf

    def verdict(self, table, what):
        """Raise the first failing rank's error on every rank (same type, same text)."""
        bad = np.flatnonzero(table["ok"] != 0)
        if bad.size == 0:
            return
        r = int(bad[0])
        kind = int(table["ok"][r])
        others = f" (and ranks {bad[1:].tolist()})" if bad.size > 1 else ""
        msg = (f"{type(self.owner).__name__} construction failed ({what}) on rank {r}/{self.size}"
               f"{others}: {_text(table['reason'][r])}")
        raise (ConfigError if kind == _FAIL_CONFIG else BackendUnavailable)(msg)

    def free(self):
        comm, self.comm = self.comm, None
        if comm is None or self.orphans:
            return  # a timed-out request may still reference it
        try:
            if not self.MPI.Is_finalized():
                comm.Free()
        except Exception:  # teardown must not raise
            pass


def _fail(rec, kind, reason):
    rec["ok"] = kind
    rec["reason"] = str(reason).encode()[:_REASON_BYTES]


def _check_same(boot, table, *, same_host=True):
    """Phase-1 agreement: one node, one capacity, one initial epoch (same error everywhere)."""
    hosts = table["host"]
    if same_host and (hosts != hosts[0]).any():
        groups = sorted({int(h) for h in hosts})
        where = [groups.index(int(h)) for h in hosts]
        raise BackendUnavailable(
            f"{type(boot.owner).__name__}: the {boot.size} ranks span {len(groups)} nodes (node "
            f"index per rank: {where}); the P2P transport needs every rank on one node (use it "
            "inside each node and NCCL between nodes)"
        )
    for field, name in (("cap", "capacity_bytes (rounded up to 256)"), ("epoch0", "_epoch0")):
        v = table[field]
        if (v != v[0]).any():
            raise ConfigError(
                f"{type(boot.owner).__name__}: {name} differs between ranks: {v.tolist()}; "
                "every rank must pass the same value"
            )


def _initial_header(nranks, layout, epoch0):
    """The flags and state words a window starts with (uint64 [data_off // 8]).

    ``state.epoch = epoch0`` and ``flag[p][t]`` holds the last epoch ``<= epoch0`` of
    parity ``p`` (mod 2^32), signature 0: neither of the next two epochs can match it.
    """
    words = np.zeros(layout.data_off // 8, np.uint64)
    for p in (0, 1):
        last = epoch0 - ((epoch0 - p) & 1)
        words[p * nranks : (p + 1) * nranks] = np.uint64((last & 0xFFFFFFFF) << 32)
    words[layout.state_off // 8] = np.uint64(epoch0)
    return words


class _P2PBase:
    """Shared argument handling, error reporting and teardown state of both transports."""

    name = "p2p"
    rank: int = 0
    size: int = 1
    timeout_s: float = 0.0
    capacity_bytes: int = 0

    def _init_common(self, capacity_bytes, timeout_s, epoch0):
        self.timeout_s = _timeout_value(timeout_s)
        self.capacity_bytes = _p2p.round_capacity(capacity_bytes)
        if isinstance(epoch0, bool) or not isinstance(epoch0, (int, np.integer)) or not 0 <= epoch0 < 2**63:
            raise InputError(f"_epoch0: expected an int in [0, 2**63), got {epoch0!r}")
        self._epoch0 = int(epoch0)
        self._closed = False
        self._err = 0

    # -- errors ---------------------------------------------------------------------------
    def error(self) -> int:
        """0 while healthy, else the first error code on this rank (sticky).

        1 (:data:`ERR_TIMEOUT`): a wait outlived ``timeout_s``; 2 (:data:`ERR_SIGNATURE`):
        the ranks entered the same collective with different signatures.
        """
        return self._err

    def _error_text(self, code):
        return f"error {code} ({_p2p.ERROR_NAMES.get(code, 'unknown')})"

    def check(self, op="p2p"):
        """Raise ``CollectiveTimeout`` naming ``op`` when :meth:`error` is set or closed."""
        if self._closed:
            raise CollectiveTimeout(
                f"{op} on rank {self.rank}/{self.size}: the {type(self).__name__} transport is "
                "closed; create a new one (every rank) to continue"
            )
        code = self.error()
        if code:
            raise (InconsistentStepError if code == ERR_SIGNATURE else CollectiveTimeout)(
                f"{op} on rank {self.rank}/{self.size}: the {type(self).__name__} transport is "
                f"broken after {self._error_text(code)} (timeout_s={self.timeout_s:g}); it "
                "refuses every later collective; create a new one (every rank) to continue"
            )

    # -- argument checks ------------------------------------------------------------------
    def _check_rows(self, arr, name, row_bytes, dtype, writable=False):
        if arr.ndim != 2:
            raise InputError(f"pull: {name} must be 2-D [rows, width], got shape {arr.shape}")
        if not arr.flags.c_contiguous:
            raise InputError(f"pull: {name} must be C-contiguous, got strides {arr.strides}")
        storage = arr.dtype.name
        if storage not in _STORAGE[dtype]:
            raise InputError(
                f"pull: {name} has dtype {storage}, which does not hold dtype={dtype!r} "
                f"(expected one of {list(_STORAGE[dtype])})"
            )
        if arr.shape[1] * arr.dtype.itemsize != row_bytes:
            raise InputError(
                f"pull: {name} rows are {arr.shape[1]} x {arr.dtype.itemsize} = "
                f"{arr.shape[1] * arr.dtype.itemsize} bytes, row_bytes={row_bytes}"
            )
        if writable and hasattr(arr.flags, "writeable") and not arr.flags.writeable:
            raise InputError(f"pull: {name} must be writable (got a read-only array of shape {arr.shape})")

    def _check_scalars(self, row_bytes, dtype, desc_off):
        if dtype not in LOGICAL_DTYPES:
            raise InputError(f"pull: dtype must be one of {list(LOGICAL_DTYPES)}, got {dtype!r}")
        for name, v in (("row_bytes", row_bytes), ("desc_off", desc_off)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"pull: {name} must be an int, got {v!r}")
        row_bytes, desc_off = int(row_bytes), int(desc_off)
        size = _p2p.ITEMSIZE[dtype]
        if row_bytes < 1 or row_bytes % size:
            raise InputError(
                f"pull: row_bytes must be a positive multiple of the {dtype} item size {size}, "
                f"got {row_bytes}"
            )
        if row_bytes > self.capacity_bytes:
            raise InputError(
                f"pull: row_bytes={row_bytes} exceeds capacity_bytes={self.capacity_bytes}: not "
                "one row fits a src buffer; construct the transport with a larger capacity"
            )
        if desc_off < 0:
            raise InputError(f"pull: desc_off must be >= 0, got {desc_off}")
        return row_bytes, desc_off

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        state = "closed" if self._closed else ("ok" if not self.error() else self._error_text(self.error()))
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"capacity_bytes={self.capacity_bytes}, timeout_s={self.timeout_s:g}, {state})")


# =============================================================================== host twin

class HostP2P(_P2PBase):
    """The shared-memory twin of :class:`CudaP2P` on NumPy row buffers (one node, x86-64).

    Args:
        mpi_comm: mpi4py intra-communicator of the ``T`` ranks (all on one node). Used
            only during construction (through a private duplicate).
        capacity_bytes: bytes of one ``src`` buffer, rounded up to a multiple of 256 (the
            ``capacity_bytes`` attribute holds the rounded value); identical on every rank.
        timeout_s: bound of every wait, in seconds (``None`` or ``<= 0``: wait forever).
        device: ignored (signature parity with :class:`CudaP2P`).

    Memory: rank 0 creates one file in ``/dev/shm`` of ``T`` page-aligned windows (the
    layout of :func:`dpgather.kernels._p2p.window_layout`), reserves it with
    ``posix_fallocate`` (a full ``/dev/shm`` fails here, not with SIGBUS later), and
    broadcasts its name (bounded ``Ibcast``); every rank maps it and initialises its own
    window; once every rank confirmed (bounded ``Iallgather``) rank 0 unlinks the file, so
    nothing is left behind by a crash after construction.

    What differs from the kernel: one thread does every phase in order (no arrive/depart
    counters), the barrier polls the flags with :func:`~dpgather.dist.base.poll_until`
    (spin, yield, then sleeps), a flag is stored as two 32-bit words (signature first,
    epoch second) and read epoch first -- x86-64 keeps stores in program order and never
    reorders loads with older loads (TSO), which is what makes both the flag protocol and
    the data it publishes safe without fences; hence x86-64 only. Errors raise at once
    (``CollectiveTimeout``) as well as setting :meth:`error`.

    Raises (construction, on every rank alike):
        BackendUnavailable: not x86-64, no ``/dev/shm``, ranks on several nodes, mpi4py missing.
        ConfigError: ranks passed different capacities. InputError: bad arguments.
        CollectiveTimeout: a peer did not construct within ``timeout_s``.
    """

    def __init__(self, mpi_comm, capacity_bytes, timeout_s, device=None, *, _epoch0=0):
        self._init_common(capacity_bytes, timeout_s, _epoch0)
        self.device = None
        self._mm = None
        self._fd = None
        boot = _Bootstrap(self, mpi_comm)
        try:
            self._construct(boot)
        finally:
            boot.free()

    def _construct(self, boot):
        rank, size = self.rank, self.size
        if size > _p2p.MAX_RANKS:
            raise ConfigError(f"HostP2P: {size} ranks, at most {_p2p.MAX_RANKS}")
        lay = _p2p.window_layout(size, self.capacity_bytes)
        self._layout = lay
        self._win = -(-lay.window_bytes // _PAGE) * _PAGE
        total = self._win * size

        rec = np.zeros((), _REC)
        rec["host"], rec["cap"], rec["epoch0"] = host_id(), self.capacity_bytes, self._epoch0
        if not _is_x86_64():
            _fail(rec, _FAIL_UNAVAILABLE,
                  f"the host twin needs x86-64 (TSO store order), this is {platform.machine()}")
        elif not os.path.isdir(_SHM_DIR):
            _fail(rec, _FAIL_UNAVAILABLE, f"{_SHM_DIR} does not exist")
        table = boot.allgather(rec, "node, capacity and platform check")
        boot.verdict(table, "platform check")
        _check_same(boot, table)

        # rank 0 creates and reserves the segment, everybody maps it
        name = np.zeros(256, np.uint8)
        path = None
        if rank == 0:
            path = os.path.join(_SHM_DIR, f"dpgather-p2p-{os.getpid()}-{secrets.token_hex(8)}")
            try:
                self._fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                os.posix_fallocate(self._fd, 0, total)
                name[: len(path)] = np.frombuffer(path.encode(), np.uint8)
            except OSError as exc:
                name[:] = 0
                msg = f"!cannot create {total} bytes in {_SHM_DIR}: {exc}".encode()[:255]
                name[: len(msg)] = np.frombuffer(msg, np.uint8)
        try:
            boot.bcast_bytes(name, "broadcast of the shared-memory name")
            text = bytes(name).rstrip(b"\x00").decode(errors="replace")
            rec = np.zeros((), _REC)
            if text.startswith("!") or not text:
                _fail(rec, _FAIL_UNAVAILABLE, f"rank 0: {text[1:]}")
            else:
                try:
                    if rank != 0:
                        self._fd = os.open(text, os.O_RDWR)
                    self._map(total)
                except (OSError, ValueError) as exc:
                    _fail(rec, _FAIL_UNAVAILABLE, f"cannot map {text}: {exc}")
            table = boot.allgather(rec, "confirmation that every rank mapped the segment")
        finally:
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self._fd is not None:
            os.close(self._fd)  # the mapping stays valid; the file is gone
            self._fd = None
        try:
            boot.verdict(table, "mapping the shared-memory segment")
        except DpGatherError:
            self._unmap()
            raise

    def _map(self, total):
        lay, size, win = self._layout, self.size, self._win
        mm = mmap.mmap(self._fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mm = mm
        self._u8 = np.frombuffer(mm, np.uint8)
        self._words = memoryview(mm).cast("I")  # 32-bit flag words without NumPy overhead
        me = self.rank * win
        header = _initial_header(size, lay, self._epoch0)
        self._u8[me : me + header.nbytes] = header.view(np.uint8)
        self._state = np.frombuffer(mm, np.uint64, count=4, offset=me + lay.state_off)
        self._epoch = self._epoch0
        cap = lay.cap_bytes
        self._src = [[self._u8[t * win + lay.data_off + p * cap : t * win + lay.data_off + (p + 1) * cap]
                      for p in (0, 1)] for t in range(size)]

    def _unmap(self):
        self._src = None
        self._state = None
        self._u8 = None
        words, self._words = getattr(self, "_words", None), None
        if words is not None:
            words.release()
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere: the GC unmaps it later
                pass

    # -- the collective -------------------------------------------------------------------
    def _set_error(self, code):
        if not self._err:
            self._err = int(code)
            if self._state is not None:
                self._state[3] = np.uint64(code)
        return self._err

    def pull(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Run one collective (docs/p2p.md) and return when ``out`` is written.

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
            CollectiveTimeout: a peer did not arrive within ``timeout_s`` (error 1), the
                signatures differ (error 2), or the transport is closed/broken.
            InputError: bad arguments (nothing was written, nothing signalled).
        """
        self.check("pull")
        row_bytes, desc_off = self._check_scalars(row_bytes, dtype, desc_off)
        for name, a in (("inp", inp), ("out", out)):
            if not isinstance(a, np.ndarray):
                raise InputError(f"pull: {name} must be a numpy.ndarray, got {type(a).__name__}")
        self._check_rows(inp, "inp", row_bytes, dtype)
        self._check_rows(out, "out", row_bytes, dtype, writable=True)
        if not isinstance(desc, np.ndarray):
            raise InputError(f"pull: desc must be a numpy int64 array, got {type(desc).__name__}")
        sig, packs, jobs = _p2p.decode_desc(desc, desc_off)
        dt = _p2p._np_dtype(dtype)

        size, me, lay = self.size, self.rank, self._layout
        e = self._epoch + 1
        p = e & 1
        rb = row_bytes
        cap_rows = lay.cap_bytes // rb
        in_rows, out_rows = inp.shape[0], out.shape[0]
        inb = inp.reshape(-1).view(np.uint8).reshape(in_rows, rb)
        outb = out.reshape(-1).view(np.uint8).reshape(out_rows, rb)

        def src_rows(t):
            return self._src[t][p][: cap_rows * rb].reshape(cap_rows, rb)

        # 1. pack
        own = src_rows(me)
        for in_row, rows, src_row in packs:
            in_row, rows, src_row = max(in_row, 0), max(rows, 0), max(src_row, 0)
            rows_c = min(rows, cap_rows - src_row) if src_row < cap_rows else 0
            if rows_c == 0:
                continue
            valid = min(rows_c, in_rows - in_row) if in_row < in_rows else 0
            own[src_row : src_row + valid] = inb[in_row : in_row + valid]
            own[src_row + valid : src_row + rows_c] = 0

        # 2. signal: flag[p][me] of every window, signature word before epoch word
        words, win4 = self._words, self._win // 4
        lo = (p * size + me) * 2
        e32 = e & 0xFFFFFFFF
        for t in range(size):
            words[t * win4 + lo] = sig
        for t in range(size):
            words[t * win4 + lo + 1] = e32

        # 3. wait for every flag[p][t] of epoch e; compare signatures
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
                "broken (error 1)"
            )
        if bad:
            self._set_error(ERR_SIGNATURE)
            theirs = [hex(words[base + 2 * t]) for t in bad]
            raise InconsistentStepError(
                f"pull (p2p epoch {e}) on rank {me}/{size}: ranks {bad} entered the same "
                f"collective with signatures {theirs}, this rank with {sig:#x}: the ranks "
                "issued different operations; the transport is now broken (error 2)"
            )

        # 4. pull + reduce
        for dst_row, cnt, span, src_row, first, count, stride in jobs:
            dst_row, cnt, span, src_row = (max(v, 0) for v in (dst_row, cnt, span, src_row))
            first, stride = _p2p._clamp_index(max(first, 0)), _p2p._clamp_index(stride)
            span_c = min(span, out_rows - dst_row) if dst_row < out_rows else 0
            if span_c == 0:
                continue
            sources = [s for s in (first + k * stride for k in range(min(max(count, 0), size)))
                       if 0 <= s < size]
            cnt_c = min(cnt, span_c, cap_rows - src_row) if sources and src_row < cap_rows else 0
            dst = outb[dst_row : dst_row + span_c]
            if cnt_c:
                views = [src_rows(s)[src_row : src_row + cnt_c] for s in sources]
                if len(views) == 1:
                    dst[:cnt_c] = views[0]
                else:
                    dst[:cnt_c] = _reduce(views, dt, dtype).view(np.uint8)
            dst[cnt_c:] = 0

        # 5. depart
        self._epoch = e
        self._state[0] = np.uint64(e)

    def close(self):
        """Unmap the segment. Local and idempotent: never waits for a peer.

        Peers that keep calling ``pull`` time out (error 1) waiting for this rank's flag;
        their stores into this rank's window land in memory they still map.
        """
        if self._closed:
            return
        self._closed = True
        self._unmap()


def _reduce(views, dt, logical):
    """Element-wise sum of ``[n, row_bytes]`` uint8 views as ``dt``, in source order."""
    rows = [v.view(dt) for v in views]
    if logical in ("float16", "bfloat16"):
        acc = rows[0].astype(np.float32)
        for r in rows[1:]:
            acc += r.astype(np.float32)
        return acc.astype(dt)
    acc = rows[0].copy()
    for r in rows[1:]:
        np.add(acc, r, out=acc)  # integers wrap modulo 2**bits; float32 rounds per add
    return acc


# =============================================================================== CUDA

HostP2P.pull_trusted = HostP2P.pull  # the host twin has no launch cost to save


class CudaP2P(_P2PBase):
    """The P2P transport over CUDA IPC: one ``p2p_pull`` kernel per collective.

    Args:
        mpi_comm: mpi4py intra-communicator of the ``T`` ranks (one node, one GPU each,
            ``T <= 256``). Used only during construction (a private duplicate).
        capacity_bytes: bytes of one ``src`` buffer (rounded up to 256; the
            ``capacity_bytes`` attribute holds the rounded value); identical on every rank.
            A collective can only move ``capacity_bytes // row_bytes`` rows per rank.
        timeout_s: bound of every construction exchange and of the kernel's wait, in
            seconds (``None`` or ``<= 0``: forever).
        device: CUDA device ordinal of this rank; default: this rank's index among the
            ranks of its node, modulo the visible device count. It becomes the current
            CuPy device.

    Construction (collective, three bounded ``Iallgather`` exchanges): (1) node identity,
    capacity and CuPy/GPU availability; (2) every rank allocates its window with
    ``cudaMalloc`` (never from CuPy's pool: an IPC handle names a whole allocation),
    zeroes it, writes the initial flags and epoch, synchronises, and exchanges its IPC
    handle, device ordinal and PCI bus id; (3) every rank checks that no two ranks share
    a device and that its device can access every peer's (``cudaDeviceCanAccessPeer``
    through the peer's bus id: every device of the node must be visible to every rank),
    opens every peer's handle (``cudaIpcMemLazyEnablePeerAccess``), uploads the ``T``
    window base pointers, compiles the kernels (:func:`dpgather.kernels._p2p.warm`) and
    exchanges its verdict. The error word is one int32 of pinned host memory allocated
    with ``cudaHostAllocMapped | cudaHostAllocPortable``; its device address comes from
    ``cudaPointerGetAttributes`` (CuPy binds no ``cudaHostGetDevicePointer``; with
    unified addressing both give the same pointer).

    Raises (construction, on every rank alike):
        BackendUnavailable: no CuPy/GPU, ranks on several nodes, a shared device, missing
            peer access, an allocation or IPC failure.
        ConfigError: ranks passed different capacities; ``device`` out of range.
        CollectiveTimeout: a peer did not construct within ``timeout_s``.
    """

    def __init__(self, mpi_comm, capacity_bytes, timeout_s, device=None, *, _epoch0=0):
        self._init_common(capacity_bytes, timeout_s, _epoch0)
        self._window = 0
        self._windows = None
        self._fast = {}
        self._peers = {}  # rank -> opened IPC pointer
        self._host_word = 0
        self._word = None
        self._streams = {}  # stream ptr -> stream object launched on since construction
        self.device = None
        boot = _Bootstrap(self, mpi_comm)
        try:
            self._construct(boot, device)
        except BaseException:
            self._release(wait=False)
            raise
        finally:
            boot.free()

    def _construct(self, boot, device):
        rank, size = self.rank, self.size
        rec = np.zeros((), _REC)
        rec["host"], rec["cap"], rec["epoch0"] = host_id(), self.capacity_bytes, self._epoch0
        cupy = None
        try:
            from dpgather.kernels._cuda import _cupy

            cupy = _cupy()
            count = cupy.cuda.runtime.getDeviceCount()
            rec["dev"] = count
            if size > _p2p.MAX_RANKS:
                _fail(rec, _FAIL_CONFIG, f"{size} ranks, the kernel supports at most {_p2p.MAX_RANKS}")
            elif device is not None and not 0 <= int(device) < count:
                _fail(rec, _FAIL_CONFIG, f"device: expected 0 <= device < {count}, got {device}")
        except BackendUnavailable as exc:
            _fail(rec, _FAIL_UNAVAILABLE, exc)
        table = boot.allgather(rec, "node, capacity and GPU check")
        boot.verdict(table, "GPU check")
        _check_same(boot, table)

        self._cupy = cupy
        rt = cupy.cuda.runtime
        if device is None:
            device = rank % int(rec["dev"])  # every rank is on this node: rank == local index
        dev = int(device)
        self.device = dev
        lay = _p2p.window_layout(size, self.capacity_bytes)
        self._layout = lay

        # phase 2: window, error word, IPC handle
        rec = np.zeros((), _REC)
        try:
            cupy.cuda.Device(dev).use()
            _p2p.warm(dev)  # before any kernel use and any capture (and outside the exchanges' skew)
            self._window = rt.malloc(lay.window_bytes)
            rt.memset(self._window, 0, lay.window_bytes)
            header = _initial_header(size, lay, self._epoch0)
            rt.memcpy(self._window, header.ctypes.data, header.nbytes, rt.memcpyHostToDevice)
            rt.deviceSynchronize()
            flags = getattr(rt, "hostAllocMapped", 2) | getattr(rt, "hostAllocPortable", 1)
            self._host_word = rt.hostAlloc(4, flags)
            self._word = ctypes.c_int32.from_address(self._host_word)
            self._word.value = 0
            self._host_err_dev = int(rt.pointerGetAttributes(self._host_word).devicePointer)
            rec["handle"] = np.frombuffer(rt.ipcGetMemHandle(self._window), np.uint8)
            rec["bus"] = rt.deviceGetPCIBusId(dev).encode()[:16]
            rec["dev"] = dev
        except Exception as exc:  # CUDA errors: report, so every rank raises together
            _fail(rec, _FAIL_UNAVAILABLE, f"device {dev}: {type(exc).__name__}: {exc}")
        table = boot.allgather(rec, "IPC handles")
        boot.verdict(table, "window allocation")

        # phase 3: peer access, open handles, pointer table
        rec = np.zeros((), _REC)
        try:
            buses = [_text(b) for b in table["bus"]]
            for t in range(size):
                if t != rank and buses[t].lower() == buses[rank].lower():
                    raise BackendUnavailable(
                        f"ranks {rank} and {t} share device {buses[t]}: the P2P transport needs "
                        "one GPU per rank (its kernels spin on each other)"
                    )
            for t in range(size):
                if t == rank:
                    continue
                try:
                    peer = rt.deviceGetByPCIBusId(buses[t])
                except Exception as exc:
                    raise BackendUnavailable(
                        f"rank {t}'s GPU {buses[t]} is not visible to rank {rank} ({exc}); make "
                        "every GPU of the node visible to every rank (CUDA_VISIBLE_DEVICES) and "
                        "pass device="
                    ) from None
                if not rt.deviceCanAccessPeer(dev, peer):
                    raise BackendUnavailable(
                        f"device {dev} ({buses[rank]}) cannot access rank {t}'s device {peer} "
                        f"({buses[t]}) (cudaDeviceCanAccessPeer = 0)"
                    )
            ptrs = np.zeros(size, np.uint64)
            for t in range(size):
                if t == rank:
                    ptrs[t] = self._window
                else:
                    handle = bytes(table["handle"][t])
                    self._peers[t] = rt.ipcOpenMemHandle(handle)  # lazy peer access (the default flag)
                    ptrs[t] = self._peers[t]
            self._windows = cupy.asarray(ptrs)
            self._limit = _p2p.max_blocks(dev)
            cupy.cuda.Device(dev).synchronize()
        except BackendUnavailable as exc:
            _fail(rec, _FAIL_UNAVAILABLE, exc)
        except Exception as exc:
            _fail(rec, _FAIL_UNAVAILABLE, f"device {dev}: {type(exc).__name__}: {exc}")
        table = boot.allgather(rec, "peer access verdicts")
        boot.verdict(table, "peer access")
        self._timeout_ns = int(self.timeout_s * 1e9) if self.timeout_s > 0 else 0
        self._fast = {}  # pull_trusted's launch configurations
        if self._windows is not None:
            lay = self._layout
            self._fixed_args = (np.uint64(self._windows.data.ptr), np.int32(self.rank), np.int32(self.size),
                                np.int64(lay.data_off), np.int64(lay.cap_bytes), np.uint64(self._host_err_dev),
                                np.int64(self._timeout_ns))

    # -- errors -----------------------------------------------------------------------------
    def error(self) -> int:
        """The kernel's error code: a read of the pinned host word (no CUDA call, no sync).

        It reflects collectives that have *run*: after ``pull`` returns the kernel may not
        have started yet. 0 while healthy; 1 timeout; 2 signature mismatch. Sticky.
        """
        word = self._word
        if word is not None:
            code = word.value
            if code and not self._err:
                self._err = code
        return self._err

    # -- the collective ---------------------------------------------------------------------
    def pull(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """Enqueue one collective (docs/p2p.md) on ``stream`` and return at once.

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

        No host synchronisation and no allocation: capturable in a CUDA graph (pointers and
        capacities are baked in, counts are read from ``desc``). Errors of the launched
        collective appear later in :meth:`error`.

        Raises:
            CollectiveTimeout: an earlier collective failed (:meth:`error`) or closed.
            InputError: bad arguments (nothing was enqueued).
        """
        self.check("pull")
        cupy = self._cupy
        row_bytes, desc_off = self._check_scalars(row_bytes, dtype, desc_off)
        for name, a in (("inp", inp), ("out", out)):
            if not isinstance(a, cupy.ndarray):
                raise InputError(f"pull: {name} must be a CuPy array, got {type(a).__name__}")
            if a.data.device_id != self.device:
                raise InputError(f"pull: {name} is on device {a.data.device_id}, the transport on {self.device}")
        self._check_rows(inp, "inp", row_bytes, dtype)
        self._check_rows(out, "out", row_bytes, dtype)
        if (not isinstance(desc, cupy.ndarray) or desc.dtype != np.int64 or desc.ndim != 1
                or not desc.flags.c_contiguous):
            raise InputError(
                f"pull: desc must be a 1-D contiguous CuPy int64 array, got "
                f"{type(desc).__name__} {getattr(desc, 'dtype', '')} {getattr(desc, 'shape', '')}"
            )
        if desc.data.device_id != self.device:
            raise InputError(f"pull: desc is on device {desc.data.device_id}, the transport on {self.device}")
        if desc.shape[0] < desc_off + _p2p.HEADER_WORDS:
            raise InputError(
                f"pull: desc has {desc.shape[0]} entries, the header at desc_off={desc_off} needs "
                f"{desc_off + _p2p.HEADER_WORDS}"
            )
        vec = _p2p.pick_vector(row_bytes, _p2p.ITEMSIZE[dtype], inp.data.ptr, out.data.ptr)
        lay = self._layout
        grid = _p2p.grid_size(inp.shape[0], out.shape[0], row_bytes, lay.cap_bytes, self._limit)
        if stream is None:
            s = cupy.cuda.get_current_stream()
        elif isinstance(stream, int):
            s = cupy.cuda.ExternalStream(stream, self.device)
        else:
            s = stream
        _p2p.launch(
            dtype=dtype, vec=vec, grid=grid, device_id=self.device, stream=s,
            inp=inp.data.ptr, in_rows=inp.shape[0], out=out.data.ptr, out_rows=out.shape[0],
            desc=desc.data.ptr, desc_off=desc_off, desc_len=desc.shape[0], row_bytes=row_bytes,
            windows=self._windows.data.ptr, me=self.rank, nranks=self.size,
            data_off=lay.data_off, cap_bytes=lay.cap_bytes, host_err=self._host_err_dev,
            timeout_ns=self._timeout_ns,
        )
        self._streams.setdefault(s.ptr, s)

    def pull_trusted(self, inp, out, desc, desc_off, *, row_bytes, dtype, stream=None):
        """:meth:`pull` without argument checks, for callers that validated already (the data
        plane): the launch configuration is cached per (dtype, row bytes, rows, alignment),
        the kernel arguments are packed once. Raises ``CollectiveTimeout`` only when closed;
        a device error makes the kernel itself refuse."""
        if self._closed:
            self.check("pull")
        ip, op = inp.data.ptr, out.data.ptr
        key = (dtype, row_bytes, inp.shape[0], out.shape[0], (ip | op) & 15)
        hit = self._fast.get(key)
        if hit is None:
            vec = _p2p.pick_vector(row_bytes, _p2p.ITEMSIZE[dtype], ip, op)
            grid = _p2p.grid_size(inp.shape[0], out.shape[0], row_bytes, self._layout.cap_bytes, self._limit)
            hit = self._fast[key] = (_p2p.PULL.function(self.device, _p2p.kernel_name(dtype, vec)), (int(grid),),
                                     np.int64(inp.shape[0]), np.int64(out.shape[0]), np.int64(row_bytes))
        fn, grid, in_rows, out_rows, rb = hit
        s = self._cupy.cuda.get_current_stream() if stream is None else stream
        fn(grid, (_p2p._THREADS,), (np.uint64(ip), in_rows, np.uint64(op), out_rows, np.uint64(desc.data.ptr),
                                   np.int64(desc_off), np.int64(desc.shape[0]), rb) + self._fixed_args,
           stream=s)
        if s.ptr not in self._streams:
            self._streams[s.ptr] = s

    # -- teardown ---------------------------------------------------------------------------
    def close(self):
        """Release this rank's resources. Local and idempotent: never a collective.

        Order: a bounded wait (``timeout_s``, or 60 s when that is forever) for the streams
        this transport launched on; then the peers' IPC mappings are closed, then this
        rank's window and the pinned error word are freed. If the wait fails (a kernel is
        still running, e.g. a replayed graph on another stream), nothing is freed: the
        memory is leaked on purpose rather than pulled from under a running kernel.
        Peers that keep calling ``pull`` time out on their own (error 1); until they do,
        their arrive phase stores one flag into this rank's (freed) window. Destroy CUDA
        graphs that captured ``pull`` before closing: a replay after close uses freed memory.
        """
        if self._closed:
            return
        self._closed = True
        self._release(wait=True)

    def _release(self, wait):
        cupy = getattr(self, "_cupy", None)
        if cupy is None:
            return
        rt = cupy.cuda.runtime
        if wait and self._streams:
            limit = self.timeout_s + 5.0 if self.timeout_s > 0 else _TEARDOWN_DEFAULT_S
            try:
                with cupy.cuda.Device(self.device):
                    event = cupy.cuda.Event(block=False, disable_timing=True)
                    for s in self._streams.values():
                        if s.is_capturing():
                            continue
                        event.record(s)
                        if not poll_until(lambda: event.done, limit):
                            warnings.warn(
                                f"CudaP2P.close on rank {self.rank}: a launch did not finish "
                                f"within {limit:g} s; its memory is leaked, not freed",
                                RuntimeWarning, stacklevel=3)
                            self._streams.clear()
                            return
            except Exception:  # a broken context: freeing would fail as well
                return
        self._streams.clear()
        for t, ptr in list(self._peers.items()):
            try:
                rt.ipcCloseMemHandle(ptr)
            except Exception:
                pass
        self._peers.clear()
        self._windows = None
        if self._window:
            try:
                rt.free(self._window)
            except Exception:
                pass
            self._window = 0
        if self._host_word:
            code = self._word.value if self._word is not None else 0
            if code and not self._err:
                self._err = code
            self._word = None
            try:
                rt.freeHost(self._host_word)
            except Exception:
                pass
            self._host_word = 0


# =============================================================================== probe

def probe_p2p(mpi_comm, device=None, timeout_s=60.0, *, backend="cuda"):
    """Whether the P2P transport can run on these ranks: ``(ok, reason)``, the same on every rank.

    Collective over ``mpi_comm`` (two bounded ``Iallgather`` exchanges, no blocking MPI call).

    Args:
        mpi_comm: mpi4py intra-communicator of the candidate ranks.
        device: this rank's CUDA device (default as :class:`CudaP2P`); ignored for the host.
        timeout_s: bound of each exchange.
        backend: ``"cuda"`` (:class:`CudaP2P`) or ``"host"`` (:class:`HostP2P`).

    Returns:
        ``(True, "")``, or ``(False, reason)`` naming the first failing rank: ranks span
        nodes; CuPy or a GPU is missing; two ranks share a device; a peer's device is not
        visible or not peer-accessible (every pair is checked); for the host twin, not
        x86-64 or no ``/dev/shm``.

    Raises:
        CollectiveTimeout: a peer did not enter the probe within ``timeout_s``.
        InputError: bad ``backend`` or ``mpi_comm``.
    """
    if backend not in ("cuda", "host"):
        raise InputError(f"backend: expected 'cuda' or 'host', got {backend!r}")

    owner = _Probe(_timeout_value(timeout_s))
    boot = _Bootstrap(owner, mpi_comm)
    try:
        rank, size = boot.rank, boot.size
        rec = np.zeros((), _REC)
        rec["host"] = host_id()
        rt = None
        dev = -1
        try:
            if backend == "host":
                if not _is_x86_64():
                    raise BackendUnavailable(
                        f"the host twin needs x86-64 (TSO store order), this is {platform.machine()}")
                if not os.path.isdir(_SHM_DIR):
                    raise BackendUnavailable(f"{_SHM_DIR} does not exist")
            else:
                from dpgather.kernels._cuda import _cupy

                cupy = _cupy()
                rt = cupy.cuda.runtime
                count = rt.getDeviceCount()
                dev = rank % count if device is None else int(device)
                if not 0 <= dev < count:
                    raise BackendUnavailable(f"device {dev} out of range (0..{count - 1})")
                rec["dev"] = dev
                rec["bus"] = rt.deviceGetPCIBusId(dev).encode()[:16]
        except BackendUnavailable as exc:
            _fail(rec, _FAIL_UNAVAILABLE, exc)
        except Exception as exc:
            _fail(rec, _FAIL_UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        table = boot.allgather(rec, "probe facts")
        reason = _first_failure(table)
        if reason is None:
            hosts = table["host"]
            if (hosts != hosts[0]).any():
                reason = f"the {size} ranks span {len(set(hosts.tolist()))} nodes"
        rec = np.zeros((), _REC)
        if reason is None and backend == "cuda":
            buses = [_text(b) for b in table["bus"]]
            try:
                for t in range(size):
                    if t == rank:
                        continue
                    if buses[t].lower() == buses[rank].lower():
                        raise BackendUnavailable(f"ranks {rank} and {t} share device {buses[t]}")
                    try:
                        peer = rt.deviceGetByPCIBusId(buses[t])
                    except Exception:
                        raise BackendUnavailable(
                            f"rank {t}'s GPU {buses[t]} is not visible to rank {rank}") from None
                    if not rt.deviceCanAccessPeer(dev, peer):
                        raise BackendUnavailable(
                            f"device {buses[rank]} cannot access {buses[t]} (no peer access)")
            except BackendUnavailable as exc:
                _fail(rec, _FAIL_UNAVAILABLE, exc)
            except Exception as exc:
                _fail(rec, _FAIL_UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        table = boot.allgather(rec, "probe verdicts")
        if reason is None:
            reason = _first_failure(table)
        return (reason is None, reason or "")
    finally:
        boot.free()


class _Probe:
    """The owner of probe_p2p's exchanges (what _Bootstrap reads and names in messages)."""

    def __init__(self, timeout_s):
        self.timeout_s = timeout_s
        self.rank = self.size = 0


def _first_failure(table):
    bad = np.flatnonzero(table["ok"] != 0)
    if bad.size == 0:
        return None
    r = int(bad[0])
    return f"rank {r}: {_text(table['reason'][r])}"
