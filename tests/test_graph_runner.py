"""The graph runner's eager fallback on the host backend (the CUDA path runs in tests/test_gpu.py).

Runs ``tests/gpu/facade_smoke.py --backend host --graphs``: every divisor A, both contributions,
replay == eager over decode-like modes, and no allocation over 100 replays of random
DRAFT_EXTEND counts with fewer real rows than advertised.
"""

from pathlib import Path

import pytest

from mpi_harness import check_mpi, needs_mpiexec

SCRIPT = Path(__file__).parent / "gpu" / "facade_smoke.py"


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nranks,dtype", [(2, "bfloat16"), (4, "float32")])
def test_graph_runner_eager_fallback(nranks, dtype):
    res = check_mpi([str(SCRIPT), "--backend", "host", "--dtype", dtype, "--graphs", "--steps", "1"],
                    nranks, timeout=240)
    assert all(r["passed"] > 0 for r in res.results.values()), res.results
