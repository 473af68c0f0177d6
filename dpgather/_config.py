"""The configuration of a ``DpAttention``: its arguments checked on one rank, then agreed by all.

Pure: nothing here communicates. :func:`canonical` checks every constructor argument *without
raising* and returns the :class:`Config` (when every argument is valid here), the values every
rank compares (plain, picklable) and the errors found on this rank; the facade exchanges
``(values, errors)`` once over the host, and :func:`agree` raises the same ``ConfigError`` on
every rank when any rank found an error or the ranks disagree (docs/reliability.md,
"Construction").
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dpgather.core import POLICIES, TRANSPORTS, ConfigError, CostModel, Fp8Format, SpecConfig
from dpgather.core.dtypes import normalize_dtype

from ._backends import canonical_device

__all__ = ["Config", "canonical", "agree", "intracomm", "MAX_MICRO_BATCHES", "FALLBACK_TIMEOUT_S"]

#: The largest ``micro_batches`` (each micro-batch has its own arenas).
MAX_MICRO_BATCHES = 16
#: The bound of the construction's exchanges on a rank whose own ``timeout_s`` is invalid (it
#: still takes part in the agreement, which then raises the ConfigError on every rank).
FALLBACK_TIMEOUT_S = 60.0
#: Counts travel in the int32 step record: buckets and token capacities must stay below this.
_INT32_LIMIT = 2**31


@dataclass(frozen=True)
class Config:
    """A ``DpAttention``'s agreed configuration (docs/design.md section 5 names every field)."""

    world_size: int
    attn_tp_size: int
    hidden_size: int
    dtype: str
    backend: str
    spec: Optional[SpecConfig]
    policy: str
    graph_buckets: Tuple[int, ...]
    max_tokens_per_rank: Optional[int]
    timeout_s: float  #: seconds; ``math.inf``: no bound
    cost: Optional[CostModel]
    strict: bool
    transport: str
    micro_batches: int
    device: Optional[int]
    fp8: Optional[Fp8Format] = None

    @property
    def largest_bucket(self) -> int:
        """The largest graph bucket (0 without graphs)."""
        return self.graph_buckets[-1] if self.graph_buckets else 0


def _pos_int(v, what):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{what} must be a positive int")
    return int(v)


def _one_of(v, what, allowed):
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{what} must be one of {allowed}")
    return v


def _micro_batches(v):
    v = _pos_int(v, "micro_batches")
    if v > MAX_MICRO_BATCHES:
        raise ValueError(f"micro_batches must be at most {MAX_MICRO_BATCHES} (each has its own arenas)")
    return v


def _spec(v):
    if v is not None and not isinstance(v, SpecConfig):
        raise ValueError("spec must be a dpgather.SpecConfig or None")
    return v


def _buckets(v):
    if v is None:
        return ()
    if isinstance(v, (str, bytes)):
        raise ValueError("graph_buckets must be an iterable of positive ints (or None)")
    out = tuple(sorted(set(_pos_int(b, "every graph bucket") for b in v)))
    for b in out:
        if b >= _INT32_LIMIT:
            raise ValueError(f"graph buckets must be < 2**31 (the per-step record is int32), got {b}")
    return out


def _max_tokens(v):
    if v is None:
        return None
    v = _pos_int(v, "max_tokens_per_rank")
    if v >= _INT32_LIMIT:
        raise ValueError("max_tokens_per_rank must be < 2**31 (the per-step record is int32)")
    return v


def _timeout(v):
    from dpgather.dist.base import parse_timeout

    return parse_timeout(v, "timeout_s", ValueError)


def _fp8(v):
    if v is not None and not isinstance(v, Fp8Format):
        raise ValueError("fp8 must be a dpgather.Fp8Format or None")
    return v


def _cost(v):
    if v is not None and not isinstance(v, CostModel):
        raise ValueError("cost must be a dpgather.CostModel or None")
    return v


def _strict(v):
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError("strict must be True or False")
    return bool(v)


#: field -> the check that turns the raw argument into its canonical value (or raises ValueError).
_CHECKS = (
    ("attn_tp_size", lambda v: _pos_int(v, "attn_tp_size")),
    ("micro_batches", _micro_batches),
    ("hidden_size", lambda v: _pos_int(v, "hidden_size")),
    ("dtype", lambda v: normalize_dtype(v, error=ValueError)),
    ("backend", lambda v: _one_of(v, "backend", ("auto", "host", "cuda"))),
    ("policy", lambda v: _one_of(v, "policy", POLICIES)),
    ("transport", lambda v: _one_of(v, "transport", TRANSPORTS)),
    ("spec", _spec),
    ("graph_buckets", _buckets),
    ("max_tokens_per_rank", _max_tokens),
    ("timeout_s", _timeout),
    ("cost", _cost),
    ("strict", _strict),
    ("device", canonical_device),
    ("fp8", _fp8),
)
#: Fields checked on every rank but not compared: each rank names its own GPU.
_PER_RANK = ("device",)


def _comparable(key, value):
    """What the ranks compare for ``key`` (plain and picklable: a SpecConfig by its repr, a
    CostModel by its constants)."""
    if key in ("spec", "fp8"):
        return repr(value)
    if key == "cost":
        return (value or CostModel()).to_dict()
    return value


def canonical(world_size: int, **arguments: Any) -> Tuple[Optional[Config], Dict[str, Any], Dict[str, str]]:
    """Check the constructor's ``arguments`` on this rank, without raising.

    Returns:
        ``(config, values, errors)``: the :class:`Config` (None when some argument is invalid
        here), the values every rank compares (``{"version", "world_size", field: value}``, an
        invalid field as ``"invalid <repr>"``; ``device`` is per rank and not compared) and
        ``{field: message}`` of this rank's errors.
    """
    import dpgather

    values: Dict[str, Any] = {"version": dpgather.__version__, "world_size": int(world_size)}
    fields: Dict[str, Any] = {"world_size": int(world_size)}
    errors: Dict[str, str] = {}
    for key, check in _CHECKS:
        raw = arguments[key]
        try:
            fields[key] = check(raw)
            if key not in _PER_RANK:
                values[key] = _comparable(key, fields[key])
        except Exception as e:
            errors[key] = f"{key}={raw!r}: {e}"
            if key not in _PER_RANK:
                values[key] = f"invalid {raw!r}"
    A = fields.get("attn_tp_size")
    if A is not None and world_size % A:
        errors["attn_tp_size"] = f"attn_tp_size={A!r} must divide the number of ranks {world_size}"
    fp8, H, dtype = fields.get("fp8"), fields.get("hidden_size"), fields.get("dtype")
    if fp8 is not None and H is not None and dtype is not None:
        try:
            fp8.check(H, dtype)
        except ConfigError as e:
            errors["fp8"] = str(e)
    if A is not None and "graph_buckets" in fields:
        bad = [b for b in fields["graph_buckets"] if b % A]
        if bad:
            errors["graph_buckets"] = (f"graph_buckets={arguments['graph_buckets']!r}: {bad} are not multiples of "
                                       f"attn_tp_size={A}")
    return (None if errors else Config(**fields)), values, errors


def agree(everyone: List[Tuple[Dict[str, Any], Dict[str, str]]]) -> None:
    """Raise one ConfigError, the same on every rank, for invalid or differing configurations.

    Args:
        everyone: every rank's ``(values, errors)`` from :func:`canonical`, in rank order.
    """
    errors = [(r, msg) for r, (_, errs) in enumerate(everyone) for _, msg in sorted(errs.items())]
    if errors:
        by_msg: Dict[str, List[int]] = {}
        for r, msg in errors:
            by_msg.setdefault(msg, []).append(r)
        raise ConfigError("invalid DpAttention arguments: " + "; ".join(
            f"{msg} (rank{'s' if len(rs) > 1 else ''} {rs if len(rs) > 1 else rs[0]})" for msg, rs in by_msg.items()))
    diffs = []
    for key in everyone[0][0]:
        seen: Dict[str, List[int]] = {}
        for r, (values, _) in enumerate(everyone):
            seen.setdefault(repr(values.get(key)), []).append(r)
        if len(seen) > 1:
            diffs.append(f"{key}: " + "; ".join(f"{v} on ranks {rs}" for v, rs in seen.items()))
    if diffs:
        raise ConfigError("ranks were configured differently: " + " | ".join(diffs)
                          + ". Every rank must construct DpAttention with the same arguments")



def intracomm(comm):
    """``comm`` (default ``MPI.COMM_WORLD``) if it is an mpi4py intra-communicator, else a
    ConfigError on this rank (there is no communicator to agree over)."""
    from dpgather.dist.base import intracomm as check, load_mpi

    return load_mpi().COMM_WORLD if comm is None else check(comm, "comm", ConfigError)
