"""dpgather.core: the per-step planner and its value types (no GPU, no MPI).

Imports neither ``dpgather.kernels`` nor ``dpgather.dist``.
"""

from .cost import CostModel
from .errors import (
    BackendUnavailable,
    CollectiveTimeout,
    ConfigError,
    DpGatherError,
    InconsistentBatchError,
    InconsistentStepError,
    InputError,
)
from .types import (
    P2P_WINDOW_ROWS,
    POLICIES,
    PUSH_WINDOW_ROWS,
    E4M3_MAX,
    ForwardMode,
    Fp8Format,
    LocalBatch,
    PaddingMode,
    SpecConfig,
    Topology,
    p2p_window_rows,
    push_window_rows,
)

try:
    from ._planner import RECORD_FIELDS, RECORD_MAGIC, RECORD_WIDTH, TRANSPORTS, Plan, Planner, count_tokens, plan
except ImportError as _e:  # pragma: no cover - only without a built extension
    raise ImportError(
        "dpgather.core._planner (the Cython planner) is not built: run `make build` or "
        "`pip install -e .` from the repository root"
    ) from _e

__all__ = [
    "BackendUnavailable", "CollectiveTimeout", "ConfigError", "CostModel", "DpGatherError",
    "ForwardMode", "InconsistentBatchError", "InconsistentStepError", "InputError", "LocalBatch", "POLICIES", "PaddingMode",
    "Plan", "Planner", "RECORD_FIELDS", "RECORD_MAGIC", "RECORD_WIDTH", "SpecConfig", "Topology",
    "TRANSPORTS", "count_tokens", "plan", "P2P_WINDOW_ROWS", "p2p_window_rows", "PUSH_WINDOW_ROWS",
    "push_window_rows", "Fp8Format", "E4M3_MAX",
]
