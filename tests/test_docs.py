"""The documentation says what the code does: the registry of environment variables
(docs/environment.md), the launcher's never-overwrite rule, logging with the rank, the file tree
of docs/internals.md, and every Python snippet of README.md and docs/*.md runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpgather.tools import launch
from frameworks import require

ROOT = Path(__file__).resolve().parent.parent
ENV_DOC = ROOT / "docs" / "environment.md"
_SKIP_DIRS = {".git", "build", "wheelhouse", "runs", "__pycache__", ".hypothesis", ".pytest_cache"}
_SOURCE_SUFFIXES = {".py", ".pyx", ".pyi", ".cu", ".cuh", ".h", ".cpp", ".sh", ".toml", ".md", ".in", ".cfg", ".json"}
_VAR = re.compile(r"\bDPGATHER_[A-Z0-9_]*[A-Z0-9]\b")


def _source_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".venv")
                       and not d.endswith(".egg-info")]
        for name in filenames:
            p = Path(dirpath) / name
            if p.suffix in _SOURCE_SUFFIXES or name in ("Makefile", "run"):
                yield p


def _documented():
    """Every variable name docs/environment.md puts in backticks (a prefix such as `DPGATHER_` is none)."""
    return {n for n in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", ENV_DOC.read_text()) if not n.endswith("_")}


def test_every_dpgather_variable_is_in_the_registry_and_nothing_stale():
    used = {}
    for p in _source_files():
        if p == ENV_DOC:
            continue
        for name in _VAR.findall(p.read_text(errors="replace")):
            used.setdefault(name, set()).add(str(p.relative_to(ROOT)))
    listed = {n for n in _documented() if n.startswith("DPGATHER_")}
    assert used, "no DPGATHER_ variable found: the walk is broken"
    missing = {n: sorted(f) for n, f in used.items() if n not in listed}
    assert not missing, f"DPGATHER_ variables missing from docs/environment.md: {missing}"
    stale = listed - set(used)
    assert not stale, f"docs/environment.md lists variables nothing reads: {sorted(stale)}"


_FLAVOURS = [launch.Launcher("mpiexec", "mpich", (4, 2)), launch.Launcher("mpirun", "openmpi", (4, 1)),
             launch.Launcher("mpirun", "openmpi", (5, 0))]


def _launcher_settings(monkeypatch):
    monkeypatch.setattr(launch, "_is_root", lambda: True)  # the root-only settings too
    keys = set()
    for fl in _FLAVOURS:
        for recovery in (False, True):
            env, _ = launch.launch_env(fl, base={}, timeout=30, recovery=recovery)
            keys |= set(env)
    return keys


def test_every_variable_the_launcher_sets_is_documented(monkeypatch):
    keys = _launcher_settings(monkeypatch)
    assert {"NCCL_NVLS_ENABLE", "FI_PROVIDER", "HYDRA_LAUNCHER", "MPIEXEC_TIMEOUT"} <= keys
    missing = sorted(keys - _documented())
    assert not missing, f"set by dpgather.tools.launch.launch_env, missing from docs/environment.md: {missing}"


def test_the_launcher_never_overwrites_a_variable_the_user_set(monkeypatch):
    keys = _launcher_settings(monkeypatch)
    user = {k: f"user-{k.lower()}" for k in keys}
    user["OMPI_MCA_btl"] = "self,vader"  # an MPI setting, not a job identity: kept
    for fl in _FLAVOURS:
        for recovery in (False, True):
            env, _ = launch.launch_env(fl, base=user, timeout=30, recovery=recovery)
            changed = {k: env.get(k) for k in user if env.get(k) != user[k]}
            assert not changed, (fl, recovery, changed)
    # the job identity of a surrounding MPI process is removed, not inherited
    env, _ = launch.launch_env(_FLAVOURS[1], base={"PMIX_RANK": "3", "OMPI_COMM_WORLD_RANK": "3", "PMI_FD": "9"})
    assert not {"PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_FD"} & set(env)


# -- logging: the rank in every record, the level from DPGATHER_LOG_LEVEL --------------------------------

_LOG_CODE = """
import logging, sys
from dpgather import _log
if sys.argv[1] == "app":  # the application configures logging itself, after importing dpgather
    logging.basicConfig(level=logging.INFO, format="APP %(name)s %(message)s", stream=sys.stderr)
if sys.argv[1] == "apprank":
    logging.basicConfig(level=logging.INFO, format="APP %(dpg_rank)s %(message)s", stream=sys.stderr)
log = _log.get_logger("probe")
log.info("before MPI")
_log.set_rank(1, 2)
log.warning("after set_rank")
log.debug("debug record")
"""


def _log_run(mode, **env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("DPGATHER_LOG_LEVEL", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                         "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", _LOG_CODE, mode], capture_output=True, text=True, timeout=60,
                         env=full, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    return res.stderr.splitlines()


def test_log_records_carry_the_rank_and_the_level_variable_works():
    # default: WARNING and up, rank from the launcher's environment until MPI says
    assert _log_run("plain", OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4") == [
        "[dpgather rank 1/2] WARNING dpgather.probe: after set_rank"]
    assert _log_run("plain", DPGATHER_LOG_LEVEL="info", PMI_RANK="3", PMI_SIZE="4") == [
        "[dpgather rank 3/4] INFO dpgather.probe: before MPI",
        "[dpgather rank 1/2] WARNING dpgather.probe: after set_rank"]
    assert len(_log_run("plain", DPGATHER_LOG_LEVEL="DEBUG")) == 3
    assert _log_run("plain", DPGATHER_LOG_LEVEL="40") == []  # a number: ERROR
    out = _log_run("plain", DPGATHER_LOG_LEVEL="LOUD")
    assert "DPGATHER_LOG_LEVEL=LOUD is not a level" in out[0] and out[1:] == [
        "[dpgather rank 1/2] WARNING dpgather.probe: after set_rank"]


def test_an_application_that_configured_logging_keeps_it():
    # its handler, format and level; no second copy from dpgather's own handler
    assert _log_run("app") == ["APP dpgather.probe before MPI", "APP dpgather.probe after set_rank"]
    assert _log_run("apprank", PMI_RANK="2", PMI_SIZE="4") == [
        "APP 2/4 before MPI", "APP 1/2 after set_rank"]  # %(dpg_rank)s on dpgather's records


# -- docs/internals.md: the real file tree -------------------------------------------------------------

_PACKAGES = {"core/": "core", "kernels/": "kernels", "dist/": "dist", "dpgather/": "dpgather",
             "dpgather/tools/": "dpgather/tools"}
_CODE_SUFFIXES = (".py", ".pyx", ".pyi", ".cu", ".cuh", ".json")


def _package_map():
    """``{folder: set of file names}`` from the package map table of docs/internals.md."""
    text = (ROOT / "docs" / "internals.md").read_text()
    table = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`([a-z_/]+/)`\s*\|[^|]*\|(.*)\|\s*$", line)
        if m and m.group(1) in _PACKAGES:
            table[m.group(1)] = set(re.findall(r"`([A-Za-z0-9_.]+\.(?:py|pyx|pyi|cu|cuh|json))`", m.group(2)))
    return text, table


def test_internals_lists_the_real_file_tree():
    text, table = _package_map()
    assert sorted(table) == sorted(_PACKAGES), f"package map rows: {sorted(table)}"
    for folder, names in table.items():
        real = {p.name for p in (ROOT / _PACKAGES[folder]).iterdir() if p.is_file() and p.suffix in _CODE_SUFFIXES}
        assert names == real, (f"docs/internals.md, {folder}: lists {sorted(names - real)} that do not exist, "
                               f"misses {sorted(real - names)}")
    # every repository path the page names exists
    paths = set(re.findall(r"`((?:core|kernels|dist|dpgather|tests|bench|docs|examples|build_backend|\.ci)/[^`\s]*)`",
                           text))
    gone = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert not gone, f"docs/internals.md names paths that do not exist: {gone}"
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in _SKIP_DIRS
            and not p.name.endswith(".egg-info") and (ROOT / ".git").exists() and _tracked(p)}
    unnamed = sorted(t for t in tops if f"`{t}/`" not in text)
    assert not unnamed, f"top-level folders docs/internals.md does not describe: {unnamed}"


def _tracked(folder):
    res = subprocess.run(["git", "ls-files", "--", str(folder)], capture_output=True, text=True, cwd=ROOT)
    return res.returncode == 0 and bool(res.stdout.strip())


@pytest.mark.parametrize("doc", ["internals.md", "tools.md"])
def test_environment_registry_is_linked(doc):
    assert "(environment.md)" in (ROOT / "docs" / doc).read_text(), f"docs/{doc} does not link environment.md"


@pytest.mark.parametrize("value,disabled", [(None, False), ("", False), ("0", False), (" 0 ", False), ("1", True),
                                            ("yes", True)])
def test_no_shm_sync_values_mean_what_the_registry_says(value, disabled, monkeypatch):
    from dpgather.dist.sync import shm_sync_disabled

    if value is None:
        monkeypatch.delenv("DPGATHER_NO_SHM_SYNC", raising=False)
    else:
        monkeypatch.setenv("DPGATHER_NO_SHM_SYNC", value)
    assert shm_sync_disabled() is disabled


# -- every Python snippet of README.md and docs/*.md runs (on the host backend) ----------------------
#
# A snippet runs as one process unless the HTML comment right before its ```python fence says
# otherwise: <!-- snippet: mpirun N[, requires MODULE] --> runs it under mpiexec with N ranks (the
# MPI harness); "requires MODULE" skips it where MODULE is not installed;
# <!-- snippet: skip: REASON --> does not run it and says why.

_DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_SNIPPET = re.compile(r"(?:<!--\s*snippet:\s*(?P<mark>[^\n]*?)\s*-->\n)?```python\n(?P<code>.*?)```", re.S)


def _snippets():
    """``[(doc, line of the fence, mark, code)]`` of every ```python block."""
    found = []
    for f in _DOC_FILES:
        text = f.read_text()
        for m in _SNIPPET.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            found.append((f.relative_to(ROOT).as_posix(), line, (m.group("mark") or "run").strip(), m.group("code")))
    return found


def _parse_mark(mark):
    """``{"mode": "run"|"mpirun"|"skip", "ranks", "requires", "reason"}``; ValueError if unknown."""
    if mark.startswith("skip:"):
        reason = mark[len("skip:"):].strip()
        if not reason:
            raise ValueError("a skipped snippet says why: <!-- snippet: skip: REASON -->")
        return {"mode": "skip", "ranks": 0, "requires": [], "reason": reason}
    spec = {"mode": "run", "ranks": 1, "requires": [], "reason": ""}
    for token in (t.strip() for t in mark.split(",")):
        words = token.split()
        if words == ["run"]:
            continue
        if len(words) == 2 and words[0] == "mpirun" and words[1].isdigit():
            spec["mode"], spec["ranks"] = "mpirun", int(words[1])
        elif len(words) == 2 and words[0] == "requires":
            spec["requires"].append(words[1])
        else:
            raise ValueError(f"unknown snippet marker {token!r} in <!-- snippet: {mark} -->")
    return spec


def _snippet_params():
    params = []
    for doc, line, mark, code in _snippets():
        try:
            spec = _parse_mark(mark)
        except ValueError:
            spec = {"mode": "run", "ranks": 1, "requires": [], "reason": ""}
        marks = [pytest.mark.mpi] if spec["mode"] == "mpirun" else []
        params.append(pytest.param(doc, mark, code, id=f"{doc}:{line}", marks=marks))
    return params


def test_every_snippet_marker_is_known():
    bad = []
    for doc, line, mark, _ in _snippets():
        try:
            _parse_mark(mark)
        except ValueError as e:
            bad.append(f"{doc}:{line}: {e}")
    assert not bad, bad
    assert sum(doc == "README.md" for doc, *_ in _snippets()) >= 3, "the README's snippets were not found"


@pytest.mark.parametrize("doc,mark,code", _snippet_params())
def test_snippet_runs(doc, mark, code, tmp_path):
    spec = _parse_mark(mark)
    if spec["mode"] == "skip":
        pytest.skip(f"{doc}: {spec['reason']}")
    for module in spec["requires"]:
        require(module, f"the snippet needs {module}, which is not installed")
    if spec["mode"] == "run":
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert res.returncode == 0, f"{doc} snippet failed:\n{code}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        return
    from mpi_harness import find_mpiexec, run_mpi

    if find_mpiexec() is None:
        pytest.skip("no mpiexec (pip install mpich mpi4py)")
    (tmp_path / "app.py").write_text(code)
    res = run_mpi([str(tmp_path / "app.py")], spec["ranks"], timeout=240, cwd=tmp_path)
    assert res.returncode == 0 and not res.timed_out, f"{doc} snippet failed:\n{code}\n{res.tail()}"


def _undefined_names(code):
    """Names a snippet reads but never binds (imports, assignments, definitions, arguments), ignoring
    scopes: enough for snippets."""
    import ast
    import builtins

    bound, used = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return sorted(used - bound - set(dir(builtins)))


def test_readme_snippets_use_no_undefined_names():
    bad = {f"README.md:{line}": names for doc, line, _, code in _snippets()
           if doc == "README.md" and (names := _undefined_names(code))}
    assert not bad, f"README snippets read names they never define: {bad}"
    assert _undefined_names("import numpy as np\nx = np.ones(3)\nprint(y, x)") == ["y"]
