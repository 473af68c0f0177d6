"""Node identity and topology for the P2P transport, its probe, and the one peer-access check.

- :func:`host_id` and :func:`node_size`: which ranks share a node (pure; the facade gathers the
  ids);
- :func:`check_peer_access`: whether this rank's GPU can reach every peer's (the probe and the
  construction of the CUDA windows ask the same question through this one function);
- :func:`probe`: whether the pull transport can run over a communicator, the same answer on
  every rank (collective, bounded).

Importing this module imports neither CuPy nor mpi4py.
"""

import hashlib
import socket

from dpgather.core.errors import BackendUnavailable, ConfigError, InputError
from dpgather.kernels._cuda import load_cupy

from .base import parse_timeout
from .bootstrap import FAIL_CONFIG, FAIL_UNAVAILABLE, Bootstrap, fail, text
from .shm import unusable_reason

__all__ = ["host_id", "node_size", "check_peer_access", "choose_device", "probe"]


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


def choose_device(count, rank, device):
    """This rank's CUDA device: ``device``, or ``rank % count`` (every rank of a transport is on
    one node, so its rank is its index on the node). Raises ConfigError when out of range."""
    if device is None:
        return rank % count
    if isinstance(device, bool) or not 0 <= int(device) < count:
        raise ConfigError(f"device: expected 0 <= device < {count}, got {device!r}")
    return int(device)


def check_peer_access(rt, rank, dev, buses):
    """Raise ``BackendUnavailable`` unless device ``dev`` (rank ``rank``) can access every other
    rank's device: no two ranks share a device, every peer's GPU (by PCI bus id) is visible
    here, and ``cudaDeviceCanAccessPeer`` holds for each. ``rt``: ``cupy.cuda.runtime``;
    ``buses``: every rank's PCI bus id, in rank order."""
    for t in range(len(buses)):
        if t != rank and buses[t].lower() == buses[rank].lower():
            raise BackendUnavailable(
                f"ranks {rank} and {t} share device {buses[t]}: the P2P transport needs one GPU per "
                "rank (its kernels spin on each other)")
    for t in range(len(buses)):
        if t == rank:
            continue
        try:
            peer = rt.deviceGetByPCIBusId(buses[t])
        except Exception as exc:
            raise BackendUnavailable(
                f"rank {t}'s GPU {buses[t]} is not visible to rank {rank} ({exc}); make every GPU of "
                "the node visible to every rank (CUDA_VISIBLE_DEVICES) and pass device=") from None
        if not rt.deviceCanAccessPeer(dev, peer):
            raise BackendUnavailable(
                f"device {dev} ({buses[rank]}) cannot access rank {t}'s device {peer} ({buses[t]}) "
                "(cudaDeviceCanAccessPeer = 0)")


def _facts(rec, rank, backend, device):
    """This rank's probe facts into ``rec`` (its device and bus id), or a failure. Returns
    ``(cupy runtime, device)`` for the CUDA backend, ``(None, -1)`` otherwise."""
    if backend == "host":
        reason = unusable_reason()
        if reason:
            fail(rec, FAIL_UNAVAILABLE, f"the host twin cannot run: {reason}")
        return None, -1
    try:
        rt = load_cupy().cuda.runtime
        dev = choose_device(rt.getDeviceCount(), rank, device)
        rec["dev"] = dev
        rec["bus"] = rt.deviceGetPCIBusId(dev).encode()[:16]
        return rt, dev
    except ConfigError as exc:
        fail(rec, FAIL_CONFIG, exc)
    except BackendUnavailable as exc:
        fail(rec, FAIL_UNAVAILABLE, exc)
    except Exception as exc:
        fail(rec, FAIL_UNAVAILABLE, f"{type(exc).__name__}: {exc}")
    return None, -1


def probe(mpi_comm, timeout_s, *, backend="cuda", device=None):
    """Whether the pull transport can run on these ranks: ``(ok, reason)``, the same on every rank.

    Collective over ``mpi_comm`` (two bounded ``Iallgather`` exchanges, no blocking MPI call).

    Args:
        mpi_comm: mpi4py intra-communicator of the candidate ranks.
        timeout_s: bound of each exchange (:func:`~dpgather.dist.base.parse_timeout`).
        backend: ``"cuda"`` (:class:`~dpgather.dist.pull.CudaPull`) or ``"host"``
            (:class:`~dpgather.dist.pull.HostPull`).
        device: this rank's CUDA device (default: its rank modulo the device count); ignored
            for the host.

    Returns:
        ``(True, "")``, or ``(False, reason)`` naming the first failing rank: ranks span
        nodes; CuPy or a GPU is missing; two ranks share a device; a peer's device is not
        visible or not peer-accessible (every pair is checked, :func:`check_peer_access`); for
        the host twin, not x86-64 or no ``/dev/shm``.

    Raises:
        CollectiveTimeout: a peer did not enter the probe within ``timeout_s``.
        InputError: bad ``backend``, ``mpi_comm`` or ``timeout_s``.
    """
    if backend not in ("cuda", "host"):
        raise InputError(f"backend: expected 'cuda' or 'host', got {backend!r}")
    boot = Bootstrap("the P2P probe", mpi_comm, parse_timeout(timeout_s, error=InputError))
    try:
        rec = boot.record()
        rec["host"] = host_id()
        rt, dev = _facts(rec, boot.rank, backend, device)
        table = boot.allgather(rec, "probe facts")
        reason = boot.first_failure(table)
        hosts = table["host"]
        if reason is None and (hosts != hosts[0]).any():
            reason = f"the {boot.size} ranks span {len(set(hosts.tolist()))} nodes"
        rec = boot.record()
        if reason is None and backend == "cuda":
            try:
                check_peer_access(rt, boot.rank, dev, [text(b) for b in table["bus"]])
            except BackendUnavailable as exc:
                fail(rec, FAIL_UNAVAILABLE, exc)
            except Exception as exc:
                fail(rec, FAIL_UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        table = boot.allgather(rec, "probe verdicts")
        reason = reason or boot.first_failure(table)
        return reason is None, reason or ""
    finally:
        boot.free()
