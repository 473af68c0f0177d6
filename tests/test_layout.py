"""Repository and import hygiene: dist/ is a tracked source folder, importing never touches GPUs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def test_dist_is_a_tracked_source_folder_without_archives():
    res = _git("ls-files", "dist")
    if res is None or res.returncode != 0:
        pytest.skip("not a git checkout")
    assert "dist/__init__.py" in res.stdout.split(), "dist/__init__.py must be tracked (never ignore dist/)"
    assert not list((ROOT / "dist").glob("*.whl")) and not list((ROOT / "dist").glob("*.tar.gz")), \
        "build archives in dist/: build into wheelhouse/ instead"


def test_import_does_not_load_gpu_or_mpi_or_torch():
    code = ("import sys, dpgather, dpgather.dist, dpgather.kernels; "
            "bad = [m for m in ('torch', 'cupy', 'mpi4py.MPI', 'numba') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_public_api_names():
    import dpgather as dg

    for name in ("Topology", "ForwardMode", "SpecConfig", "LocalBatch", "count_tokens", "PaddingMode",
                 "Plan", "plan", "Planner", "DpAttention", "CostModel", "calibrate", "DpGatherError",
                 "ConfigError", "InputError", "InconsistentBatchError", "CollectiveTimeout",
                 "BackendUnavailable"):
        assert getattr(dg, name) is not None
