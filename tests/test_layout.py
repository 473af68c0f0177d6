"""Repository hygiene: dist/ is a tracked source folder (import hygiene: tests/test_imports.py)."""

import subprocess
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


def test_public_api_names():
    import dpgather as dg

    for name in ("Topology", "ForwardMode", "SpecConfig", "LocalBatch", "count_tokens", "PaddingMode",
                 "Plan", "plan", "Planner", "DpAttention", "CostModel", "calibrate", "DpGatherError",
                 "ConfigError", "InputError", "InconsistentBatchError", "CollectiveTimeout",
                 "BackendUnavailable"):
        assert getattr(dg, name) is not None
