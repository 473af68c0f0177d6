"""dpgather: exact, fast gathered buffers for data-parallel attention inference, without PyTorch.

Quick start (see README.md and DESIGN.md)::

    import dpgather as dg
    topo = dg.Topology(world_size=8, attn_tp_size=2)
    p = dg.plan([dg.LocalBatch(dg.ForwardMode.DECODE, 5)] * 4, topo)
    p.mode, p.slot_offsets, p.gathered_rows

Importing never touches a GPU, MPI or CuPy; backends load when first used.
"""

__version__ = "0.1.0"

from .core import (
    POLICIES,
    RECORD_FIELDS,
    RECORD_MAGIC,
    RECORD_WIDTH,
    BackendUnavailable,
    CollectiveTimeout,
    ConfigError,
    CostModel,
    DpGatherError,
    ForwardMode,
    InconsistentBatchError,
    InputError,
    LocalBatch,
    PaddingMode,
    Plan,
    Planner,
    SpecConfig,
    Topology,
    count_tokens,
    plan,
)

__all__ = [
    "BackendUnavailable", "CollectiveTimeout", "ConfigError", "CostModel", "DpGatherError",
    "ForwardMode", "InconsistentBatchError", "InputError", "LocalBatch", "POLICIES", "PaddingMode",
    "Plan", "Planner", "RECORD_FIELDS", "RECORD_MAGIC", "RECORD_WIDTH", "SpecConfig", "Topology",
    "count_tokens", "plan", "__version__",
]


def __getattr__(name):
    if name == "DpAttention":
        from ._facade import DpAttention

        return DpAttention
    if name == "calibrate":
        from .tools.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'dpgather' has no attribute {name!r}")
