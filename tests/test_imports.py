"""Import hygiene: importing any module of the library has no side effects.

Every module of the installed package -- the public ones (``dpgather``, ``dpgather.dist``,
``dpgather.kernels`` ...) and the internal ones (``dpgather._layout``, ``dpgather.kernels._cuda``,
``dpgather.dist.nccl``, ``dpgather.tools.cli`` ...), found by ``pkgutil.walk_packages`` so that a
new module is covered without editing this file -- is imported alone in a fresh interpreter with a
minimal environment (tests/clean_python.py). The import must

* import none of mpi4py (not even the package: the communicators import ``mpi4py.MPI`` when
  constructed), CuPy, CUDA Python (``cuda``), Numba, ml_dtypes, PyTorch, JAX or any other package
  of ``clean_python.WATCHED``, and not even try to (those packages read as not installed there,
  so the import must also work where none of them is installed);
* load no MPI, CUDA, NCCL or NVRTC library (so no GPU is touched and MPI is not started);
* create no file or folder, start no thread and no process, open no socket, print nothing.
"""

import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

from clean_python import left_behind, run_clean

ROOT = Path(__file__).resolve().parent.parent


def _packages():
    """``dpgather`` and the packages pyproject.toml declares (an editable install maps
    dpgather.core, .dist and .kernels to folders outside dpgather/, where walking dpgather's own
    folder does not find them; a wheel has them inside)."""
    names = ["dpgather"]
    pyproject = ROOT / "pyproject.toml"
    if pyproject.exists():
        listed = re.search(r"^packages\s*=\s*\[(.*?)\]", pyproject.read_text(), re.M | re.S)  # no tomllib on 3.10
        names += re.findall(r'"([\w.]+)"', listed.group(1)) if listed else []
    return sorted(set(names))


def _modules():
    found = set()
    for pkg in _packages():
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.submodule_search_locations, f"{pkg} is not an installed package"
        found.add(pkg)
        found.update(m.name for m in pkgutil.walk_packages(spec.submodule_search_locations, pkg + "."))
    return sorted(found)


MODULES = _modules()


def test_every_kind_of_module_is_enumerated():
    for name in ("dpgather", "dpgather.core", "dpgather.core._planner", "dpgather.dist", "dpgather.dist.nccl",
                 "dpgather.dist.host", "dpgather.dist.pull", "dpgather.dist.push", "dpgather.dist.nodes",
                 "dpgather.dist.windows", "dpgather.kernels", "dpgather.kernels._cuda", "dpgather.kernels._pull",
                 "dpgather.kernels._push", "dpgather.kernels._launch", "dpgather.tools", "dpgather.tools.cli",
                 "dpgather.tools.timing", "dpgather.tools.cublas", "dpgather._layout", "dpgather.__main__"):
        assert name in MODULES, f"{name} not found by pkgutil.walk_packages: {MODULES}"


_IMPORT = "import importlib, sys\nimportlib.import_module(sys.argv[1])"


@pytest.mark.parametrize("module", MODULES)
def test_import_has_no_side_effects(module, tmp_path):
    res, seen = run_clean(_IMPORT, module, tmp=tmp_path)
    assert res.returncode == 0 and seen is not None, res.stdout + res.stderr
    assert seen["modules"] == [] and seen["attempts"] == [], \
        f"importing {module} imported {seen['modules']}, tried {seen['attempts']}"
    assert seen["libraries"] == [], f"importing {module} loaded {seen['libraries']}"
    assert seen["dlopen"] == [], f"importing {module} loaded {seen['dlopen']} through ctypes"
    assert seen["writes"] == [] and left_behind(tmp_path) == [], \
        f"importing {module} wrote {seen['writes']}, left {left_behind(tmp_path)}"
    assert seen["threads"] == [], f"importing {module} started threads {seen['threads']}"
    assert seen["spawned"] == [], f"importing {module} started processes {seen['spawned']}"
    assert seen["sockets"] == [], f"importing {module} used sockets {seen['sockets']}"
    assert res.stderr == "" and res.stdout.count("\n") == 1, \
        f"importing {module} printed:\n{res.stdout}{res.stderr}"


def test_the_probe_sees_what_it_must_flag(tmp_path):
    """clean_python itself: an import of a watched package, a write, a thread and a process are
    all seen (the test above passes because nothing happens, not because nothing is watched)."""
    code = ("import threading, subprocess, sys\n"
            "try:\n    import cupy\nexcept ImportError:\n    pass\n"
            "open('x', 'w').close()\n"
            "threading.Thread(target=lambda: None).start()\n"
            "subprocess.run([sys.executable, '-c', 'pass'])\n")
    res, seen = run_clean(code, tmp=tmp_path)
    assert res.returncode == 0 and seen is not None, res.stdout + res.stderr
    assert seen["attempts"] == ["cupy"] and seen["modules"] == [], seen
    assert [w[0] for w in seen["writes"]] == ["open"] and left_behind(tmp_path) == [str(tmp_path / "cwd" / "x")]
    assert len(seen["threads"]) == 1 and [s[0] for s in seen["spawned"]] == ["subprocess.Popen"], seen
    res, seen = run_clean("import numpy, ctypes.util\n", tmp=tmp_path, hide=())
    assert res.returncode == 0 and seen["attempts"] == [], res.stdout + res.stderr
