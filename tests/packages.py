#!/usr/bin/env python3
"""What ``make test`` needs, checked before it runs (and the GPU node's environment).

    python tests/packages.py check [--node]    # list every package the suite uses; exit 2 if one it
                                               # needs is missing (--node: a GPU node, CuPy needed)
    python3 tests/packages.py layer VENV       # make VENV (a venv without pip) see this Python's
                                               # site-packages: a GPU node's preinstalled packages

On a GPU node the packages come with the node's Python and there is no package index: ``make
test`` makes ``.venv-node``, a virtual environment layered over that Python's site-packages, and
installs only dpgather itself (editable) into it. Nothing is installed into the node's Python.
"""

import importlib.metadata
import importlib.util
import os
import shutil
import site
import sys
import sysconfig

#: (import name, distribution name, why the suite needs it). Without one of these it cannot run.
REQUIRED = [
    ("numpy", "numpy", "arrays"), ("Cython", "Cython", "builds the planner"),
    ("setuptools", "setuptools", "builds the planner"), ("mpi4py", "mpi4py", "the host backend, every multi-rank test"),
    ("numba", "numba", "the host backend's kernels"), ("ml_dtypes", "ml_dtypes", "bfloat16 on the host"),
    ("pytest", "pytest", "runs the suite"), ("hypothesis", "hypothesis", "the planner's property tests"),
]
NODE_REQUIRED = [("cupy", None, "the CUDA backend")]
#: Used where present: (import name, distribution name, what happens without it).
OPTIONAL = [
    ("jax", "jax", "examples/jax_layer.py and the JAX interop tests skip"),
    ("torch", "torch", "the PyTorch interop tests skip"),
    ("matplotlib", "matplotlib", "the CLI's plot tests skip"), ("tqdm", "tqdm", "the CLI's progress-bar test skips"),
    ("jsonschema", "jsonschema", "the trace JSON Schema test skips"),
    ("mypy", "mypy", "the typing test (tests/typing/) skips"),
    ("build", "build", "the sdist test builds with `setup.py sdist`"),
]


def _version(module, dist):
    if importlib.util.find_spec(module) is None:
        return None
    names = [dist] if dist else []
    if module == "cupy":
        names = [d.metadata["Name"] for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("cupy")]
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "present"


def check(node):
    """Print every package and the MPI launcher; return 2 if something required is missing."""
    missing = []
    lines = []
    for module, dist, why in REQUIRED + (NODE_REQUIRED if node else []):
        v = _version(module, dist)
        lines.append(f"  {module:12s} {v or 'MISSING':12s} needed: {why}")
        if v is None:
            missing.append(module)
    launcher = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec") \
        or shutil.which("mpirun")
    lines.append(f"  {'mpiexec':12s} {'found' if launcher else 'MISSING':12s} needed: runs the multi-rank tests"
                 + (f" ({launcher})" if launcher else ""))
    if launcher is None:
        missing.append("an MPI launcher (mpiexec)")
    for module, dist, why in OPTIONAL:
        v = _version(module, dist)
        lines.append(f"  {module:12s} {v or 'missing':12s} optional; without it {why}")
    print(f"make test: packages of {sys.executable}" + (" (a GPU node)" if node else ""))
    print("\n".join(lines), flush=True)
    if missing:
        where = ("the node's Python (this node has no package index: install them there, or run `make test "
                 "NODE=0` where pip reaches one)") if node else "the environment (`rm -rf .venv && make test`)"
        print(f"make test: error: missing {', '.join(missing)} in {where}", file=sys.stderr)
        return 2
    return 0


def layer(venv):
    """Make ``venv`` see this interpreter's site-packages through a ``.pth`` file (works where this
    Python is itself a virtual environment, which ``--system-site-packages`` would skip)."""
    import subprocess

    py = os.path.join(venv, "bin", "python")
    target = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    own = os.path.realpath(target)
    dirs = [d for d in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
            if os.path.isdir(d) and os.path.realpath(d) != own]
    if not dirs:  # python3 on PATH is the venv's own interpreter: a .pth over itself recurses forever
        print(f"tests/packages.py layer: {sys.executable} is {venv}'s own Python; run it with the node's "
              f"python3 (take {venv}/bin off PATH)", file=sys.stderr)
        return 2
    lines = [f"import site; site.addsitedir({d!r})" for d in dict.fromkeys(dirs)]
    with open(os.path.join(target, "_dpgather_node_site.pth"), "w") as f:
        f.write("# make test: the node's preinstalled packages (tests/packages.py layer)\n" + "\n".join(lines) + "\n")
    print(f"{venv}: a virtual environment over the packages of {sys.executable} ({', '.join(dict.fromkeys(dirs))})")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["check"]:
        sys.exit(check("--node" in argv[1:]))
    if argv[:1] == ["layer"] and len(argv) == 2:
        sys.exit(layer(argv[1]))
    sys.exit(__doc__)
