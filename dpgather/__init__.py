"""dpgather: exact, fast gathered buffers for data-parallel attention inference, without PyTorch.

Quick start (README.md; the contract is docs/design.md)::

    import dpgather as dg
    topo = dg.Topology(world_size=8, attn_tp_size=2)
    p = dg.plan([dg.LocalBatch(dg.ForwardMode.DECODE, 5)] * 4, topo)
    p.mode, p.slot_offsets, p.gathered_rows

    dp = dg.DpAttention(hidden_size=7168, dtype="bfloat16")      # under mpirun
    plan = dp.sync(dg.LocalBatch(dg.ForwardMode.DECODE, 37))
    g = dp.gather(x, plan)
    y = dp.scatter(mlp(g), plan)[:plan.num_tokens[dp.dp_rank]]

    h = dp.gather_async(x, plan, stream=comm_stream)           # docs/overlap.md
    g = h.wait()                                               # current stream ordered after it

Importing never touches a GPU, MPI or CuPy; backends load when a ``DpAttention`` is made.
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
    InconsistentStepError,
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
from ._facade import DpAttention
from ._graph import GraphRunner
from ._handle import AsyncHandle

__all__ = [
    "AsyncHandle", "BackendUnavailable", "CollectiveTimeout", "ConfigError", "CostModel", "DpAttention",
    "DpGatherError",
    "ForwardMode", "GraphRunner", "InconsistentBatchError", "InconsistentStepError", "InputError",
    "LocalBatch", "POLICIES", "PaddingMode", "Plan", "Planner", "RECORD_FIELDS", "RECORD_MAGIC",
    "RECORD_WIDTH", "SpecConfig", "Topology", "count_tokens", "plan", "__version__",
]


def __getattr__(name):
    if name == "calibrate":  # the measuring tool; imports MPI and CuPy only when called
        from .tools.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'dpgather' has no attribute {name!r}")
