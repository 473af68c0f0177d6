"""The library as users install it: sdist contents, no build into dist/, links that resolve in a
clone, and a typed public API that mypy checks user code against."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

# builds and installs in subprocesses, with no timing bound: tests/parallel.py runs these beside the rest
pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
TYPING = Path(__file__).resolve().parent / "typing"


def _dist_listing():
    return sorted(p.name for p in (ROOT / "dist").iterdir())


def _have_build():
    return importlib.util.find_spec("build") is not None


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist, built as the docs say (``python -m build --sdist --outdir ...``; ``setup.py
    sdist -d`` where the ``build`` package is not installed); dist/ must stay as it was."""
    out = tmp_path_factory.mktemp("wheelhouse")
    before = _dist_listing()
    if _have_build():
        cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)]
    else:
        cmd = [sys.executable, "setup.py", "-q", "sdist", "-d", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _dist_listing() == before, "the build wrote into dist/"
    (tarball,) = out.glob("*.tar.gz")
    return tarball


def test_sdist_is_complete_and_dist_untouched(sdist):
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    must = ["LICENSE", "README.md", "BENCHMARKS.md", "pyproject.toml", "setup.py", "MANIFEST.in",
            "build_backend/dpgather_build.py", "core/_planner.pyx", "core/_planner.pyi", "kernels/copy.cu",
            "kernels/pull.cu", "kernels/push.cu", "kernels/dpg_device.cuh", "dist/sync.py",
            "dpgather/tools/trace.schema.json", "dpgather/py.typed", "core/py.typed"]
    must += [str(p.relative_to(ROOT)) for d in ("docs", "examples", "bench") for p in (ROOT / d).iterdir()
             if p.suffix in (".md", ".py")]
    missing = [m for m in must if m not in names]
    assert not missing, f"missing from the sdist: {missing}"
    assert not [n for n in names if n.endswith((".so", ".whl"))], "binaries in the sdist"


def test_dist_is_a_source_folder():
    assert (ROOT / "dist" / "__init__.py").is_file()
    assert not list((ROOT / "dist").glob("*.whl")) and not list((ROOT / "dist").glob("*.tar.gz"))
    text = (ROOT / "Makefile").read_text()
    assert "-w wheelhouse" in text or "--outdir wheelhouse" in text


def test_build_backend_refuses_dist():
    sys.path.insert(0, str(ROOT / "build_backend"))
    try:
        import dpgather_build as backend
    finally:
        sys.path.pop(0)
    for bad in (ROOT / "dist", ROOT / "dist" / "sub", ROOT / "core" / ".." / "dist"):
        with pytest.raises(backend.BuildIntoSourceFolder, match="--outdir wheelhouse"):
            backend.build_sdist(str(bad))
        with pytest.raises(backend.BuildIntoSourceFolder):
            backend.build_wheel(str(bad))
    backend.check_output_dir(str(ROOT / "wheelhouse"))
    backend.check_output_dir(str(ROOT / "distx"))
    assert set(backend.__all__) >= {"build_sdist", "build_wheel", "build_editable", "get_requires_for_build_wheel"}


@pytest.mark.skipif(not _have_build(), reason="the `build` package is not installed (it is in the test extra)")
def test_python_m_build_with_its_default_outdir_leaves_dist_untouched():
    before = _dist_listing()
    res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, res.stdout[-2000:]
    assert "refusing to write build output into" in res.stdout + res.stderr and "--outdir wheelhouse" in res.stdout + res.stderr
    assert _dist_listing() == before


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"`((?:core|kernels|dist|dpgather|tests|bench|docs|examples|build_backend|\.ci)/[A-Za-z0-9_./-]*)`")


def test_every_relative_link_and_repository_path_in_readme_and_docs_resolves():
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for f in files:
        text = f.read_text()
        if "../shared" in text or "/work/" in text:
            bad.append(f"{f.name}: points outside the repository")
        for target in _LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (f.parent / target.split("#")[0]).resolve()
            if not path.exists():
                bad.append(f"{f.relative_to(ROOT)}: {target}")
        for target in _REPO_PATH.findall(text):  # `tests/test_cli.py`, `docs/p2p.md`, `bench/`
            if not (ROOT / target.rstrip("/")).exists():
                bad.append(f"{f.relative_to(ROOT)}: `{target}`")
    assert not bad, bad


def _stage(tmp):
    """The installed layout (dpgather.core etc. inside dpgather/) for mypy, from the sources."""
    stage = tmp / "stage"
    shutil.copytree(ROOT / "dpgather", stage / "dpgather", ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("core", "kernels", "dist"):
        (stage / "dpgather" / sub).mkdir()
        for p in (ROOT / sub).iterdir():
            if p.suffix in (".py", ".pyi") or p.name == "py.typed":
                shutil.copy(p, stage / "dpgather" / sub / p.name)
    return stage


def _mypy(tmp, script):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
    stage = tmp / "stage" if (tmp / "stage").exists() else _stage(tmp)
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
                           "--cache-dir", str(tmp / "cache"), str(script)],
                          capture_output=True, text=True, timeout=300, env={"MYPYPATH": str(stage), "PATH": ""},
                          cwd=tmp)


def test_mypy_checks_user_code_against_the_public_api(tmp_path):
    ok = _mypy(tmp_path, TYPING / "user_app.py")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _mypy(tmp_path, TYPING / "user_app_wrong.py")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    for line, what in ((5, "hidden_size"), (6, '"sync"'), (7, '"contribution"')):
        assert any(f"user_app_wrong.py:{line}: error" in ln and what in ln for ln in bad.stdout.splitlines()), bad.stdout


def test_mypy_types_device_and_a_required_hidden_size(tmp_path):
    ok = _mypy(tmp_path, TYPING / "user_app_device.py")
    bad = _mypy(tmp_path, TYPING / "user_app_no_hidden.py")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert bad.returncode == 1 and "user_app_no_hidden.py:5: error" in bad.stdout, bad.stdout


_PUBLIC = {"DpAttention", "GraphRunner", "AsyncHandle", "Plan", "Planner", "LocalBatch", "ForwardMode", "PaddingMode",
           "Topology", "SpecConfig", "CostModel", "DpGatherError", "InputError", "ConfigError", "CollectiveTimeout",
           "InconsistentBatchError", "InconsistentStepError", "BackendUnavailable", "plan", "count_tokens", "POLICIES",
           "Fp8Format", "Fp8Rows", "__version__"}


def test_the_namespace_holds_the_public_api_only():
    import types

    import dpgather as dg

    assert set(dg.__all__) == _PUBLIC
    for name in _PUBLIC:
        assert getattr(dg, name) is not None, name
    # everything else at the top level is private (_name) or a subpackage (core, kernels, dist, tools)
    extra = {n for n in dir(dg) if not n.startswith("_") and n not in _PUBLIC
             and not isinstance(getattr(dg, n), types.ModuleType)}
    assert extra == set(), f"internals in the dpgather namespace: {sorted(extra)}"
    from dpgather.core import RECORD_FIELDS, RECORD_MAGIC, RECORD_WIDTH  # the record layout stays reachable

    assert RECORD_WIDTH == len(RECORD_FIELDS) and RECORD_MAGIC == 0x44504731


# -- a user's fresh virtual environment ------------------------------------------------------------

_SNIPPET_CHECKS = '''
n = int(plan.num_tokens[dp.dp_rank])
assert g.shape == (plan.gathered_rows, dp.hidden_size), g.shape
assert y.shape == (n, dp.hidden_size), ("scatter returns this replica's own rows", y.shape, n)
print(f"snippet ok on rank {dp.rank}: {n} own rows of {plan.gathered_rows}", flush=True)
'''


def readme_snippet():
    """The README's embedding snippet (its first Python block that makes a DpAttention and gathers;
    self-contained: tests/test_docs.py checks that it reads no undefined name), with checks on its
    outputs after it."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    block = next((b for b in blocks if "DpAttention(" in b and ".gather(" in b), None)
    assert block is not None, "README.md shows no embedding snippet (a Python block with DpAttention(...) and gather)"
    return block + _SNIPPET_CHECKS


def _pip_reaches_an_index(pip, tmp):
    res = subprocess.run([*pip, "download", "--no-deps", "-q", "-d", str(tmp / "probe"), "numpy>=1.26"],
                         capture_output=True, text=True, timeout=300)
    return res.returncode == 0


def _outer_mpi_flavor():
    from dpgather.tools.launch import detect

    found = detect()
    return found.flavor if found else None


@pytest.mark.mpi
@pytest.mark.skipif(_outer_mpi_flavor() != "mpich",
                    reason="the fresh-venv install brings its own MPICH; it runs once, under `make test` (MPI=mpich)")
def test_fresh_venv_pip_install_host_extra_runs_the_readme_snippet(sdist, tmp_path):
    """What issue 14 asks of a new user: ``pip install "dpgather[host]"`` (here: the sdist, built
    in pip's isolated build environment, with the [host] extra from the package index) into a
    fresh virtual environment, then ``mpiexec -n 2 python app.py`` with the README's snippet and
    the CLI from the installed package. Skipped when no package index is reachable."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    res = subprocess.run([*pip, "install", "-q", f"{sdist}[host]"], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        if not _pip_reaches_an_index([sys.executable, "-m", "pip"], tmp_path):
            pytest.skip("no package index reachable: the fresh-venv install needs the network")
        pytest.fail(f"pip install {sdist.name}[host] failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    work = tmp_path / "app"
    work.mkdir()
    (work / "app.py").write_text(readme_snippet())
    from dpgather.tools.launch import detect, launch_env

    mpiexec = venv / "bin" / "mpiexec"
    assert mpiexec.is_file(), "the [host] extra brought no mpiexec (MPICH from PyPI)"
    env, flags = launch_env(detect(str(mpiexec)), timeout=120)
    env.pop("PYTHONPATH", None)  # nothing of the checkout: only what pip installed
    env["DPGATHER_LOG_LEVEL"] = "INFO"
    res = subprocess.run([str(mpiexec), *flags, "-n", "2", str(py), "app.py"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for r in (0, 1):
        assert f"snippet ok on rank {r}:" in res.stdout, res.stdout
        # logging: the rank in every record, the level from DPGATHER_LOG_LEVEL
        assert f"[dpgather rank {r}/2] INFO dpgather." in res.stderr, res.stderr
    site = subprocess.run([str(py), "-c", "import dpgather, sys; print(dpgather.__file__)"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert str(venv) in site and str(ROOT) not in site, site
    site = subprocess.run([str(py), "-c", "import dpgather, dpgather.core; print(dpgather.__file__)"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # the clone's root: issue 25
    assert site.returncode == 0 and str(venv) in site.stdout, site.stdout + site.stderr

    # the command line from the installed package (no checkout, no matplotlib / tqdm in [host])
    cli = str(venv / "bin" / "dpgather")
    res = subprocess.run([cli, "info"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "MPICH" in res.stdout and "mpiexec:" in res.stdout, res.stdout + res.stderr
    res = subprocess.run(f"'{cli}' plans --synthetic eagle --steps 200 --policy all | head -n 3", shell=True,
                         cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("Plans of eagle") and res.stderr == "", res.stderr
    res = subprocess.run([cli, "run", "--np", "2", "--steps", "3", "--policy", "varlen", "--timeout", "120",
                          "--dtype", "bfloat16"], cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "plots skipped: matplotlib is not installed (pip install matplotlib)" in res.stdout
    res = subprocess.run([cli, "bench-sync", "--np", "2", "--", "--iters", "20", "--warmup", "5"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = subprocess.run([cli, "bench"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1 and "bench/collective_bench.py" in err[0], res.stderr

    # what mypy needs to check user code against the installed package (mypy itself runs on a
    # staged layout of the same files: test_mypy_checks_user_code_against_the_public_api)
    res = subprocess.run([str(py), "-c", "import importlib.resources as r; print(*(r.files(m).joinpath(f).is_file() "
                          "for m, f in (('dpgather', 'py.typed'), ('dpgather.core', 'py.typed'), "
                          "('dpgather.core', '_planner.pyi'))))"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.split() == ["True"] * 3, res.stdout + res.stderr


# -- a non-editable install, run from the clone's root ---------------------------------------------

@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory):
    """The package as ``pip install .`` lays it out (a wheel built from this checkout, installed
    into a folder of its own): ```(site folder, the folders of the dependencies)``."""
    import sysconfig

    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                          str(out / "w"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = (out / "w").glob("dpgather-*.whl")
    site = out / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the dependencies' folders: this environment's site-packages, and the folders its .pth files
    # add (a GPU node's make test layers its venv over the node's packages that way)
    deps = [sysconfig.get_paths()["purelib"]] + [p for p in sys.path if os.path.isdir(p) and
                                                 os.path.basename(p) in ("site-packages", "dist-packages")]
    return site, list(dict.fromkeys(deps))


def _run_without_the_checkout(code, pythonpath, cwd):
    """``python -S -c CODE``: no site hooks, so the editable install of this checkout (a .pth
    finder) is not there; ``pythonpath`` gives the installed copy and the dependencies."""
    env = {"PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "PATH": os.environ.get("PATH", "")}
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


_USE = ("import dpgather as dg, dpgather.core, dpgather.dist, dpgather.kernels; "
        "p = dg.plan([dg.LocalBatch(dg.ForwardMode.DECODE, 3)] * 2, dg.Topology(2)); "
        "print(dg.__file__, p.gathered_rows)")


def test_a_non_editable_install_runs_from_the_clone_root(installed_copy, tmp_path):
    site, deps = installed_copy
    res = _run_without_the_checkout(_USE, [site, *deps], ROOT)  # sys.path[0] is the clone's root
    assert res.returncode == 0, res.stderr
    path, rows = res.stdout.split()
    assert path.startswith(str(site)) and rows == "6", res.stdout
    res = _run_without_the_checkout(_USE, [site, *deps], tmp_path)  # and anywhere else, of course
    assert res.returncode == 0 and res.stdout.split()[0].startswith(str(site)), res.stderr


def test_the_source_folder_alone_says_in_one_line_what_to_do(installed_copy):
    _, deps = installed_copy
    res = _run_without_the_checkout("import dpgather", deps, ROOT)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dpgather: ") and "is the source folder of a clone" in last \
        and "pip install -e '.[host]'" in last and "run from outside the clone after `pip install '.[host]'`" in last


# -- what make test needs (tests/packages.py) ------------------------------------------------------

def test_every_package_of_the_test_extra_is_checked_by_make_test():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import packages
    finally:
        sys.path.pop(0)
    text = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^test = \[(.*?)\]", text, re.M | re.S).group(1)
    wanted = {re.split(r"[<>=;\[ ]", s.strip().strip('"'))[0].lower().replace("-", "_")
              for s in extra.split(",") if s.strip()}
    listed = {dist.lower().replace("-", "_") for _, dist, _ in packages.REQUIRED + packages.OPTIONAL if dist}
    assert wanted <= listed, f"in the test extra but not checked by tests/packages.py: {sorted(wanted - listed)}"
    assert {"pytest", "hypothesis", "mpi4py", "numba", "ml_dtypes", "cython", "numpy"} <= \
        {d.lower() for _, d, _ in packages.REQUIRED}


def test_packages_check_lists_everything_and_fails_in_one_line_when_something_is_missing(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "packages.py"), "check"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "pytest" in res.stdout and "hypothesis" in res.stdout, res.stdout + res.stderr
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(  # hypothesis and CuPy look absent
        "import importlib.util as u\n_f = u.find_spec\n"
        "def find_spec(name, *a, **k):\n    return None if name in ('hypothesis', 'cupy') else _f(name, *a, **k)\n"
        "u.find_spec = find_spec\n")
    env = dict(os.environ, PYTHONPATH=str(hide))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "packages.py"), "check", "--node"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "missing hypothesis, cupy" in err[0] and "no package index" in err[0], res.stderr


def test_the_node_venv_sees_the_python_it_is_layered_over(tmp_path):
    """What `make test` does on a GPU node: a venv without pip over this Python's packages
    (where this Python is itself a venv, as on the GPU image)."""
    venv = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "packages.py"), "layer", str(venv)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys, numpy, pytest; print(sys.prefix)"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == str(venv), res.stdout + res.stderr
