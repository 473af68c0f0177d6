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


def _load_installed_if_shadowed():
    """From a clone's root, ``import dpgather`` finds the clone's source folder ``dpgather/`` before
    the installed package; the folder lacks ``core/``, ``kernels/`` and ``dist/``, which the install
    maps in (pyproject.toml). After a non-editable install, load the installed package in its place
    (it replaces this module in ``sys.modules``: the import returns it); with neither an editable
    install nor an installed copy, say in one line what to do."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "core")) or importlib.util.find_spec(__name__ + ".core") is not None:
        return  # the installed layout, or an editable install (its finder maps core/ in)
    root = os.path.realpath(os.path.dirname(here))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None or not spec.origin or not os.path.isdir(os.path.join(os.path.dirname(spec.origin), "core")):
        raise ImportError(f"dpgather: {here} is the source folder of a clone, not an importable package (core/, "
                          "kernels/ and dist/ are mapped into it at install): install it with "
                          "`pip install -e '.[host]'` (or `make build`), or run from outside the clone after "
                          "`pip install '.[host]'`")
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    spec.loader.exec_module(module)


_load_installed_if_shadowed()

from .core import (
    POLICIES,
    BackendUnavailable,
    CollectiveTimeout,
    ConfigError,
    CostModel,
    DpGatherError,
    ForwardMode,
    Fp8Format,
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
from ._fp8 import Fp8Rows
from ._graph import GraphRunner
from ._handle import AsyncHandle

# The public API; the planner's record layout (RECORD_WIDTH, RECORD_FIELDS, RECORD_MAGIC) and the
# other internals stay in their modules (dpgather.core, ...).
__all__ = [
    "AsyncHandle", "BackendUnavailable", "CollectiveTimeout", "ConfigError", "CostModel", "DpAttention",
    "DpGatherError",
    "ForwardMode", "Fp8Format", "Fp8Rows", "GraphRunner", "InconsistentBatchError", "InconsistentStepError", "InputError",
    "LocalBatch", "POLICIES", "PaddingMode", "Plan", "Planner", "SpecConfig", "Topology", "count_tokens", "plan",
    "__version__",
]


def __getattr__(name):
    if name == "calibrate":  # the measuring tool; imports MPI and CuPy only when called
        from .tools.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'dpgather' has no attribute {name!r}")
