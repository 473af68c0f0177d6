"""Which GPU a rank uses: ``DpAttention(device=...)`` made canonical, the default rule, and the
placement check every rank agrees on (docs/interop.md, "Devices").

- :func:`canonical_device`: the caller's value (an int, ``"cuda:1"``, a ``cupy.cuda.Device``, a
  ``torch.device``, a JAX device) as a CUDA ordinal or None; pure and local, frameworks recognised
  without importing them.
- :func:`place_device`: collective over the ranks of a communicator: each rank's device (the one
  asked for, else the node-local rank modulo the GPUs the rank sees), checked against every rank's
  placement, so that a device that does not exist, or two ranks of one node on one GPU, raise the
  same :class:`ConfigError` on every rank before NCCL starts.
"""

import hashlib

import numpy as np

from dpgather.core.errors import BackendUnavailable, ConfigError

__all__ = ["canonical_device", "place_device", "placement_error"]

_EXPECTED = ("None (one GPU per node-local rank), a CUDA device ordinal >= 0, 'cuda:N', a cupy.cuda.Device, "
             "torch.device('cuda', N) or a JAX GPU device")


def canonical_device(value):
    """``DpAttention(device=...)`` as a plain value every rank can compare: None (the default rule)
    or a CUDA device ordinal (of the devices this process sees, as CUDA_VISIBLE_DEVICES leaves them).

    Accepts None, an int, ``"cuda:N"`` / ``"N"``, a ``cupy.cuda.Device`` (``.id``), a
    ``torch.device("cuda", N)`` (``.type``, ``.index``) and a JAX GPU device
    (``.platform``, ``.local_hardware_id``). Pure and local: raises ``ValueError`` naming the value.
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if value < 0:
            raise ValueError(f"device must be {_EXPECTED}, got {value!r}")
        return int(value)
    if isinstance(value, str):
        return _from_string(value)
    root = (type(value).__module__ or "").split(".")[0]
    if root == "cupy" and isinstance(getattr(value, "id", None), int):
        return canonical_device(value.id)
    if root == "torch" and hasattr(value, "type") and hasattr(value, "index"):
        if value.type != "cuda" or value.index is None:
            raise ValueError(f"device must be {_EXPECTED}, got {value!r}"
                             + ("" if value.type != "cuda" else ": name the GPU, e.g. torch.device('cuda', 0)"))
        return canonical_device(value.index)
    if root in ("jax", "jaxlib") and hasattr(value, "platform") and hasattr(value, "local_hardware_id"):
        if value.platform not in ("gpu", "cuda"):
            raise ValueError(f"device must be {_EXPECTED}, got the JAX {value.platform} device {value!r}")
        return canonical_device(value.local_hardware_id)
    raise ValueError(f"device must be {_EXPECTED}, got {value!r}")


def _from_string(text):
    s = text.strip().lower()
    ordinal = s[5:] if s.startswith("cuda:") else s
    if not ordinal.isdigit():
        raise ValueError(f"device must be {_EXPECTED}, got {text!r}")
    return int(ordinal)


# -- placement ---------------------------------------------------------------------------------

# Columns of the placement table, one row per rank (int64).
_HOST, _ASKED, _DEVICE, _GPU, _COUNT = range(5)


def place_device(mpi_comm, device, timeout_s):
    """This rank's CUDA device, agreed over ``mpi_comm`` (collective: one bounded all-gather).

    Args:
        mpi_comm: the ranks that share the job (mpi4py intra-communicator).
        device: :func:`canonical_device`'s value on this rank; None: the node-local rank modulo
            the number of GPUs this rank sees.
        timeout_s: bound of the exchange (0: none).

    Raises:
        ConfigError: on every rank, when some rank's device does not exist or two ranks of one
            node use the same GPU (named by ranks and ordinals).
        BackendUnavailable: on every rank, when some rank could not query its GPUs.
        CollectiveTimeout: a rank did not take part within ``timeout_s``.
    """
    from dpgather.dist.base import bounded_wait
    from dpgather.dist.nodes import host_id

    rank = mpi_comm.Get_rank()
    mine = np.array([_signed(host_id()), -1 if device is None else device, -1, 0, -1], dtype=np.int64)
    table = np.zeros((mpi_comm.Get_size(), 5), dtype=np.int64)
    problem = None
    try:
        import cupy

        mine[_COUNT] = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - every rank hears of it below
        problem = f"rank {rank} could not count its GPUs ({type(e).__name__}: {e})"
    # Node-local ranks are known only after the exchange: send the asked device, decide after.
    orphans = []
    bounded_wait(mpi_comm.Iallgather(mine, table), timeout_s, "DpAttention construction (GPU placement)",
                 orphans, mine, table)
    chosen = _choose(table, rank)
    if chosen is not None and problem is None:
        try:
            mine[_GPU] = _signed(_gpu_identity(cupy, chosen))
        except Exception as e:  # noqa: BLE001
            problem = f"rank {rank} could not query cuda:{chosen} ({type(e).__name__}: {e})"
    mine[_DEVICE] = -1 if chosen is None else chosen
    if problem is not None:
        mine[_COUNT] = -1
    bounded_wait(mpi_comm.Iallgather(mine, table), timeout_s, "DpAttention construction (GPU placement)",
                 orphans, mine, table)
    if problem is not None:
        raise BackendUnavailable(f"the cuda backend cannot use a GPU: {problem}")
    error = placement_error(table)
    if error is not None:
        raise error
    return chosen


def _choose(table, rank):
    """Rank ``rank``'s device from the table of asked devices, or None when it does not exist."""
    count = int(table[rank, _COUNT])
    if count <= 0:
        return None
    asked = int(table[rank, _ASKED])
    if asked >= 0:
        return asked if asked < count else None
    local = int(np.count_nonzero(table[:rank, _HOST] == table[rank, _HOST]))
    return local % count


def placement_error(table):
    """The one error every rank raises for the placement ``table`` (one row per rank: node, asked
    device or -1, chosen device or -1, GPU identity, GPUs seen or -1 when the rank could not query
    them), or None. Pure."""
    failed = [r for r in range(len(table)) if table[r, _COUNT] < 0]
    if failed:
        return BackendUnavailable(f"the cuda backend cannot use a GPU: rank(s) {failed} could not query their "
                                  "GPUs (their own error says why)")
    bad = [r for r in range(len(table)) if table[r, _DEVICE] < 0]
    if bad:
        what = "; ".join(f"rank {r} asked for cuda:{table[r, _ASKED]} but sees {table[r, _COUNT]} GPU(s)"
                         if table[r, _ASKED] >= 0 else f"rank {r} sees no GPU" for r in bad)
        return ConfigError(f"device: {what}; pass a device each rank has (DpAttention(device=...), "
                           "CUDA_VISIBLE_DEVICES)")
    users = {}
    for r in range(len(table)):
        users.setdefault((int(table[r, _HOST]), int(table[r, _GPU])), []).append(r)
    shared = [rs for rs in users.values() if len(rs) > 1]
    if shared:
        what = "; ".join(" and ".join(f"rank {r} (cuda:{table[r, _DEVICE]})" for r in rs) for rs in shared)
        return ConfigError(f"device: two ranks of one node on one GPU: {what} use the same GPU; dpgather runs "
                           "one rank per GPU: give each rank its own device (DpAttention(device=...) or "
                           "CUDA_VISIBLE_DEVICES) or launch at most as many ranks per node as it has GPUs")
    return None


def _gpu_identity(cupy, ordinal):
    """A 64-bit identity of the physical GPU behind ``ordinal`` (its PCI bus id), the same in every
    process of the node whatever CUDA_VISIBLE_DEVICES each sees."""
    bus = cupy.cuda.Device(ordinal).pci_bus_id
    return int.from_bytes(hashlib.blake2b(str(bus).lower().encode(), digest_size=8).digest(), "little")


def _signed(u64):
    return u64 - (1 << 64) if u64 >= 1 << 63 else u64
