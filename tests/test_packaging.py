"""The library as users install it: sdist contents, no build into dist/, links that resolve in a
clone, and a typed public API that mypy checks user code against."""

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TYPING = Path(__file__).resolve().parent / "typing"


def test_sdist_is_complete_and_dist_untouched(tmp_path):
    before = sorted(p.name for p in (ROOT / "dist").iterdir())
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (ROOT / "dist").iterdir()) == before, "the build wrote into dist/"
    (tarball,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for must in ("LICENSE", "README.md", "docs/design.md", "docs/reliability.md", "examples/tp_mlp_layer.py",
                 "core/_planner.pyx", "core/_planner.pyi", "kernels/copy.cu", "dist/sync.py",
                 "dpgather/tools/trace.schema.json", "dpgather/py.typed"):
        assert must in names, f"{must} missing from the sdist"
    assert not [n for n in names if n.endswith((".so", ".whl"))], "binaries in the sdist"


def test_dist_is_a_source_folder():
    assert (ROOT / "dist" / "__init__.py").is_file()
    assert not list((ROOT / "dist").glob("*.whl")) and not list((ROOT / "dist").glob("*.tar.gz"))
    text = (ROOT / "Makefile").read_text()
    assert "-w wheelhouse" in text or "--outdir wheelhouse" in text


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_in_readme_and_docs_resolves():
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


def test_public_api_is_visible():
    import dpgather as dg

    for name in ("DpAttention", "GraphRunner", "Plan", "Planner", "LocalBatch", "ForwardMode", "Topology",
                 "SpecConfig", "CostModel", "DpGatherError", "InputError", "ConfigError", "CollectiveTimeout",
                 "InconsistentBatchError", "InconsistentStepError", "BackendUnavailable", "plan", "count_tokens"):
        assert name in dg.__all__ and name in dir(dg) and getattr(dg, name) is not None, name
