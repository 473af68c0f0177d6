"""The ``dpgather`` command line: help, plans, info, errors and exit codes, and the replay under mpiexec."""

import errno
import json
import os
import subprocess
import sys

import pytest

from mpi_harness import HERE, needs_mpiexec, ranks_exited_zero, run_mpi

from dpgather.tools import cli, report
from dpgather.tools.cli import main
from dpgather.tools.traces import save_trace, synthetic

REPO = HERE.parent
PNG = b"\x89PNG\r\n\x1a\n"
POLICIES = ["auto", "sglang", "max_len", "sum_len", "varlen"]
CLI = ["-m", "dpgather.tools.cli"]


def _py(*args, timeout=120, **kw):
    kw.setdefault("cwd", str(REPO))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kw)


def _broken_trace(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"format": "dpgather-trace/1", "dp_size": 2}\n'
                 '{"step": 0, "replicas": [{"mode": "DECODE", "batch_size": 3}, {"mode": "IDLE"}]}\n'
                 '{"step": 1, "replicas": [{"mode": "DECODE", "batch_size": 3}, {"mode": "EXTEND", '
                 '"batch_size": 4, "extend_tokens": 2}]}\n')
    return p


def _one_line(err):
    """The single non-empty line of ``err`` (asserts there is exactly one, and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def rank0_env(monkeypatch):
    """A process that is not under an MPI launcher (rank 0 prints)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


# -- help and usage errors ---------------------------------------------------------------------------

def test_help(capsys, rank0_env):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("run", "replay", "plans", "info", "bench", "bench-sync", "calibrate", "examples:",
                 "make run", "mpirun -n 4 dpgather replay"):
        assert word in out
    with pytest.raises(SystemExit) as e:
        main(["replay", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--trace", "--synthetic", "--hidden", "--dtype", "--attn-tp", "--policy", "--steps",
                 "--seed", "--backend", "--verify", "--out", "--graph-buckets", "examples:", "bfloat16"):
        assert flag in out
    assert "--corrupt-step" not in out and "corrupt" not in out
    with pytest.raises(SystemExit) as e:  # calibrate's own options, not the wrapper's
        main(["calibrate", "--help"])
    assert e.value.code == 0 and "--sizes" in capsys.readouterr().out


def test_no_test_hooks_in_the_product():
    for name in ("cli.py", "replay.py"):
        assert "corrupt" not in (REPO / "dpgather" / "tools" / name).read_text()


@pytest.mark.parametrize("argv,fragment", [
    (["replay", "--timeout", "0"], "--timeout"),
    (["replay", "--timeout", "-5"], "--timeout"),
    (["replay", "--timeout", "nan"], "--timeout"),
    (["run", "--timeout", "0"], "--timeout"),
    (["bench-sync", "--timeout", "-1"], "--timeout"),
    (["replay", "--seed", "-1"], "--seed: expected a non-negative integer"),
    (["plans", "--seed", "-1"], "--seed"),
    (["replay", "--steps", "0"], "--steps"),
    (["replay", "--hidden", "0"], "--hidden"),
    (["replay", "--mlp-row-us", "-1"], "--mlp-row-us"),
    (["replay", "--dtype", "int8"], "--dtype"),
    (["replay", "--synthetic", "nope"], "invalid choice"),
    (["plans", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--np", "0"], "--np"),
])
def test_usage_errors_are_one_line_exit_2(argv, fragment, capsys, rank0_env):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert line.startswith(f"dpgather {argv[0]}: error:") and fragment in line, line
    assert captured.out == ""


def test_no_command_prints_help_exit_2(capsys, rank0_env):
    assert main([]) == 2
    assert "usage: dpgather" in capsys.readouterr().out


@pytest.mark.parametrize("var", ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"])
def test_usage_errors_and_help_only_on_rank_0(var, capsys, monkeypatch, rank0_env):
    monkeypatch.setenv(var, "1")
    for argv in (["replay", "--bogus"], ["replay", "--timeout", "0"], ["--help"], ["replay", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == "", argv
    monkeypatch.setenv(var, "0")
    with pytest.raises(SystemExit):
        main(["replay", "--bogus"])
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("name,expect", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                         ("float32", "float32"), ("bf16", "bfloat16"),
                                         ("fp16", "float16"), ("fp32", "float32"), ("half", "float16"),
                                         ("f32", "float32"), ("float", "float32")])
def test_dtype_accepts_api_names_and_short_forms(name, expect):
    from dpgather.tools.replay import DTYPES, ReplayConfig

    ns = cli.build_parser().parse_args(["replay", "--dtype", name])
    cfg = ReplayConfig.from_args(ns)
    cfg.check()
    assert DTYPES[cfg.dtype] == expect


# -- options checked before any work ------------------------------------------------------------------

def test_out_naming_a_file_is_refused_before_work(tmp_path, capsys, rank0_env, monkeypatch):
    f = tmp_path / "report.txt"
    f.write_text("keep me")
    started = []
    monkeypatch.setattr("dpgather.tools.replay._setup", lambda *a, **k: started.append(1))
    for out in (f, f / "sub"):
        assert main(["replay", "--out", str(out), "--steps", "2"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("dpgather replay: error: --out") and str(f) in line
    monkeypatch.setattr(cli, "_launch", lambda *a, **k: started.append(1) or 0)
    assert main(["run", "--out", str(f)]) == 2
    assert "dpgather run: error: --out" in _one_line(capsys.readouterr().err)
    assert not started and f.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["name-too-long", "parent-refuses"])
def test_out_that_cannot_be_created_is_refused_before_work(kind, tmp_path, capsys, rank0_env, monkeypatch):
    """`--out` is created before any work (issue 26 item 10): a name too long, or a parent where
    nothing can be created although access() says it is writable (/proc, as root), is one line
    and exit 2 before the replay starts, for `replay` and `run` alike."""
    from pathlib import Path

    out = tmp_path / ("x" * 300) if kind == "name-too-long" else Path("/proc/dpgather-no-such-folder/run")
    if kind == "parent-refuses" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    started = []
    monkeypatch.setattr("dpgather.tools.replay._setup", lambda *a, **k: started.append(1))
    monkeypatch.setattr(cli, "_launch", lambda *a, **k: started.append(1) or 0)
    for command in ("replay", "run"):
        assert main([command, "--out", str(out), "--steps", "2", "--backend", "host"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"dpgather {command}: error: --out {out}: cannot create the folder"), line
    assert not started


def test_out_folder_is_made_before_work_and_only_when_every_other_check_passed(tmp_path):
    from dpgather.core import ConfigError
    from dpgather.tools.replay import ReplayConfig, preflight

    out = tmp_path / "a" / "b"
    with pytest.raises(ConfigError):
        preflight(ReplayConfig(out=str(out), policy="nope", backend="host"))
    assert not (tmp_path / "a").exists()  # refused for another reason: no folder left behind
    preflight(ReplayConfig(out=str(out), backend="host"))
    assert out.is_dir() and list(out.iterdir()) == []


def test_replay_option_errors_need_no_mpi(tmp_path, capsys, rank0_env, monkeypatch):
    started = []
    monkeypatch.setattr("dpgather.tools.replay._setup", lambda *a, **k: started.append(1))
    for argv, fragment in ((["--policy", "auto,nope"], "--policy"),
                           (["--graph-buckets", "8,x"], "--graph-buckets"),
                           (["--attn-tp", "2", "--graph-buckets", "3"], "multiples of --attn-tp=2")):
        assert main(["replay", *argv]) == 2
        assert fragment in _one_line(capsys.readouterr().err)
    assert not started


@pytest.mark.parametrize("kind", ["digits", "nesting", "duplicate", "int32"])
@pytest.mark.parametrize("command", ["plans", "replay"])
def test_hostile_trace_files_one_line_exit_2(kind, command, tmp_path, capsys, rank0_env):
    p = tmp_path / f"{kind}.jsonl"
    good = '{"step": 0, "replicas": [{"mode": "DECODE", "batch_size": 1}]}\n'
    bad = {
        "digits": '{"step": 1, "replicas": [{"mode": "DECODE", "batch_size": ' + "7" * 5000 + "}]}\n",
        "nesting": "[" * 100_000 + "\n",
        "duplicate": '{"step": 1, "replicas": [{"mode": "DECODE", "batch_size": 1, "batch_size": 2}]}\n',
        "int32": '{"step": 1, "replicas": [{"mode": "DECODE", "batch_size": 2147483648}]}\n',
    }[kind]
    p.write_text(good + bad)
    assert main([command, "--trace", str(p)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"dpgather {command}: error: {p}:2: ") and len(line) < 300, line


def test_extend_tokens_int32_max_is_refused_before_allocating(tmp_path):
    p = tmp_path / "huge.jsonl"
    p.write_text('{"step": 0, "replicas": [{"mode": "EXTEND", "batch_size": 1, "extend_tokens": 2147483647}]}\n')
    res = _py(*CLI, "replay", "--trace", str(p), "--backend", "host", "--progress", "off", timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    line = _one_line(res.stderr)
    assert f"{p}: step 0 would need about" in line and "TiB per rank" in line


# -- the closed pipe, tqdm, wording, missing dependencies ---------------------------------------------

def test_plans_into_a_closed_pipe_ends_quietly():
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write (`dpgather plans | head` after head exits)
    try:
        res = subprocess.run([sys.executable, "-m", "dpgather", "plans", "--synthetic", "mixed",
                              "--policy", "all"], stdout=w, stderr=subprocess.PIPE, text=True,
                             timeout=60, cwd=str(REPO))
    finally:
        os.close(w)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""


def test_plans_through_head_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "dpgather", "plans", "--synthetic", "eagle",
                             "--steps", "1000", "--dp", "8", "--policy", "all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert first.startswith(b"Plans of eagle") and err == ""


def test_replay_without_tqdm_says_so_once_and_never_says_not_verified(tmp_path):
    code = ("import sys; sys.modules['tqdm'] = None\n"
            "from dpgather.tools.cli import main\n"
            "sys.exit(main(['replay', '--synthetic', 'eagle', '--steps', '3', '--policy', 'auto,varlen',"
            " '--backend', 'host', '--progress', 'on']))\n")
    res = _py("-c", code, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    notes = [ln for ln in res.stderr.splitlines() if "tqdm" in ln]
    assert notes == ["note: no progress bar: tqdm is not installed (pip install tqdm)"], res.stderr
    assert "verification not verified" not in res.stdout
    assert res.stdout.count("not verified (run with --verify)") == 2


# A package that is not installed, in this process and in every rank mpiexec starts from it: a
# sitecustomize on PYTHONPATH puts None in sys.modules for each name (import -> ModuleNotFoundError,
# importlib.util.find_spec -> ValueError, as dpgather's checks see an absent package).
_HIDE = """import os, sys
for _m in filter(None, os.environ.get("DPGATHER_TEST_HIDE_MODULES", "").split(",")):
    sys.modules[_m] = None
"""
_PIP_OF = {"mpi4py": "pip install mpich mpi4py", "numba": "pip install numba", "ml_dtypes": "pip install ml_dtypes",
           "matplotlib": "pip install matplotlib", "tqdm": "pip install tqdm"}


def _without(tmp_path, modules, *argv, timeout=120):
    """``python -m dpgather ARGV`` with ``modules`` not importable (here and in its ranks), run
    from ``tmp_path`` (runs/ and other outputs land there)."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(_HIDE)
    env = dict(os.environ, DPGATHER_TEST_HIDE_MODULES=",".join(modules),
               PYTHONPATH=os.pathsep.join([str(hide), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "dpgather", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=str(tmp_path), env=env)


_RUN = ("run", "--np", "2", "--steps", "3", "--policy", "varlen", "--timeout", "100")


@pytest.mark.parametrize("module,argv", [
    ("mpi4py", _RUN), ("mpi4py", ("replay", "--steps", "3")), ("mpi4py", ("calibrate",)),
    ("mpi4py", ("bench-sync", "--np", "2")),
    # the host backend needs Numba; on a GPU node `run` and `replay` pick CUDA, which does not
    ("numba", (*_RUN, "--backend", "host")), ("numba", ("replay", "--steps", "3", "--backend", "host")),
    ("numba", ("bench-sync", "--np", "2")),
    ("ml_dtypes", _RUN),
])
def test_missing_dependency_one_line_exit_2_before_any_rank_starts(module, argv, tmp_path):
    res = _without(tmp_path, [module], *argv)
    assert res.returncode == 2, res.stdout + res.stderr
    line = _one_line(res.stderr)
    assert line.startswith(f"dpgather {argv[0]}: error: ") and module in line and _PIP_OF[module] in line, line
    assert res.stdout == "", res.stdout  # nothing launched, no banner
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_on_a_gpu_node_of_any_size_says_only_why_it_cannot_start(tmp_path, monkeypatch, capsys):
    """On a node whose GPU count differs from --np (1 GPU, --np 2) a run that fails its checks prints
    the one error line and nothing else: the "one rank per GPU" note belongs to a run that starts."""
    from dpgather.core import BackendUnavailable
    from dpgather.tools import cli, replay

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "gpu_count", lambda: 1)

    def missing_mpi4py(cfg):
        raise BackendUnavailable("mpi4py is not installed (pip install mpich mpi4py)")

    monkeypatch.setattr(replay, "preflight", missing_mpi4py)
    assert cli.main(list(_RUN)) == 2
    out, err = capsys.readouterr()
    assert out == "" and _one_line(err).startswith("dpgather run: error: "), (out, err)


def test_commands_that_need_no_optional_package_run_without_any(tmp_path):
    gone = list(_PIP_OF)
    res = _without(tmp_path, gone, "plans", "--steps", "3")
    assert res.returncode == 0 and res.stderr == "" and "Plans of built-in scenario" in res.stdout, res.stderr
    res = _without(tmp_path, gone, "info")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "MPI:          mpi4py is not installed (pip install mpich mpi4py)" in res.stdout, res.stdout
    for mod in ("numba", "ml_dtypes", "matplotlib", "tqdm"):
        assert f"{mod + ':':13s} missing ({_PIP_OF[mod]})" in res.stdout, res.stdout
    res = _without(tmp_path, gone, "bench")  # the GPU benchmark: one line, exit 2 (no GPU here)
    assert res.returncode == 2 and "dpgather bench: error:" in _one_line(res.stderr)


def test_info_with_a_cupy_that_fails_to_import(tmp_path):
    """A CuPy that is installed but cannot import (on a GPU node without ml_dtypes, CuPy's own
    import raises AttributeError) is one line of `info`, not a traceback."""
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise AttributeError(\"'NoneType' object has no attribute 'bfloat16'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), str(REPO)]))
    res = subprocess.run([sys.executable, "-m", "dpgather", "info"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "backend auto: host (CuPy is installed but fails to import: AttributeError: 'NoneType' object " \
           "has no attribute 'bfloat16')" in res.stdout, res.stdout


@pytest.mark.mpi
@needs_mpiexec
def test_run_without_matplotlib_and_tqdm_succeeds_with_one_note_each(tmp_path):
    res = _without(tmp_path, ["matplotlib", "tqdm"], *_RUN, "--progress", "on", "--out", "runs/r",
                   timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert [ln for ln in res.stderr.splitlines() if "tqdm" in ln] == [
        "note: no progress bar: tqdm is not installed (pip install tqdm)"], res.stderr  # rank 0 only
    assert res.stdout.count("plots skipped: matplotlib is not installed (pip install matplotlib)") == 1
    assert json.loads((tmp_path / "runs" / "r" / "report.json").read_text())["ok"] is True
    assert not list((tmp_path / "runs" / "r").glob("*.png"))


def test_mpi_library_that_does_not_load_is_one_line_exit_2(tmp_path):
    # mpi4py installed but no MPI library it can load (the first report of issue 14)
    env = dict(os.environ, MPI4PY_LIBMPI=str(tmp_path / "libmpi-missing.so"))
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID"):
        env.pop(var, None)
    res = _py("-m", "dpgather", "replay", "--steps", "2", "--backend", "host", timeout=60, env=env)
    if res.returncode == 0:
        pytest.skip("this mpi4py ignores MPI4PY_LIBMPI")
    assert res.returncode == 2, res.stdout + res.stderr
    line = _one_line(res.stderr)
    assert "needs an MPI library that mpi4py can load" in line and "pip install mpich mpi4py" in line, line
    code = ("import dpgather as dg\n"
            "try:\n    dg.DpAttention(hidden_size=8, backend='host')\n"
            "except dg.BackendUnavailable as e:\n    print('BackendUnavailable:', e)\n")
    res = _py("-c", code, timeout=60, env=env)
    assert res.returncode == 0 and "BackendUnavailable:" in res.stdout and 'dpgather[host]' in res.stdout, \
        res.stdout + res.stderr


def test_host_backend_without_ml_dtypes_names_the_pip_command(rank0_env, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    assert main(["replay", "--backend", "host", "--dtype", "bf16"]) == 2
    assert "pip install ml_dtypes" in _one_line(capsys.readouterr().err)


# -- report.json -----------------------------------------------------------------------------------

def _full_disk(obj, f, **kw):
    f.write('{"ok": fal')  # half a file, then the disk is full
    f.flush()
    raise OSError(errno.ENOSPC, "No space left on device")


def test_report_json_is_written_atomically(tmp_path, monkeypatch):
    from dpgather.core import files

    path = tmp_path / "report.json"
    files.write_json_atomic(str(path), {"ok": True, "n": 1})
    assert json.loads(path.read_text()) == {"ok": True, "n": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    monkeypatch.setattr(files.json, "dump", _full_disk)
    with pytest.raises(OSError):
        files.write_json_atomic(str(path), {"ok": False})
    assert json.loads(path.read_text()) == {"ok": True, "n": 1}  # the old report, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left
    path.unlink()
    with pytest.raises(OSError):
        files.write_json_atomic(str(path), {"ok": False})
    assert list(tmp_path.iterdir()) == []  # nothing rather than a truncated report


def test_a_failed_calibration_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """`calibrate --out FILE` (CostModel.save) and the calibration cache replace the file whole or
    leave it as it was (issue 26 item 9: it used to write in place)."""
    import dpgather as dg
    from dpgather.core import files

    path = tmp_path / "cost.json"
    good = dg.CostModel(mlp_row_us=0.5)
    good.save(path, meta={"card": "old"})
    before = path.read_bytes()
    monkeypatch.setattr(files.json, "dump", _full_disk)
    with pytest.raises(OSError):
        dg.CostModel(mlp_row_us=0.25).save(path, meta={"card": "new"})
    assert path.read_bytes() == before and dg.CostModel.load(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost.json"]


def test_every_file_the_tools_write_goes_through_the_one_atomic_writer():
    """No module of the package's tools, the cost model or the benchmarks opens a file for writing,
    saves a figure or renames a file itself: dpgather.core.files.write_atomic does it, once."""
    import re

    writes = re.compile(r"open\([^)]*[\"'][wax]b?\+?[\"']|\.savefig\((?!f\b)|os\.replace\(|os\.rename\(|"
                        r"\.write_(text|bytes)\(|tempfile\.mkstemp")
    files = [*(REPO / "dpgather" / "tools").glob("*.py"), *(REPO / "core").glob("*.py"), *(REPO / "bench").glob("*.py")]
    offenders = [f"{f.relative_to(REPO)}:{n}: {line.strip()}" for f in files if f.name != "files.py"
                 for n, line in enumerate(f.read_text().splitlines(), 1) if writes.search(line)]
    assert not offenders, offenders
    assert "os.replace(" in (REPO / "core" / "files.py").read_text()


def _plot_inputs(steps=40):
    """Replay results where every policy's curve equals SGLang's (the case where lines hid each other)."""
    import types

    import numpy as np

    rows = [8 * (1 + (i % 5)) for i in range(steps)]
    prepared = [types.SimpleNamespace(before={"dyn_rows": r + 3}, after={"dyn_rows": r}) for r in rows]
    summ = {"rows_moved": 1000, "padding_rows": 100}
    results = {pol: {"sizes": [{"dyn_rows": r, "graph": i % 3 == 0} for i, r in enumerate(rows)],
                     "summary": dict(summ), "times": np.full(steps, 1e-3)} for pol in POLICIES}
    results["_ref"] = {"before": dict(summ), "after": dict(summ)}
    return prepared, results


def test_plots_are_legible():
    pytest.importorskip("matplotlib", reason="plots need matplotlib (it is in the test extra)")
    import matplotlib.pyplot as plt

    prepared, results = _plot_inputs()
    figs = report.figures(None, results, prepared, 1024, "test")
    assert sorted(figs) == ["memory.png", "rows.png", "time.png"]
    try:
        for name, fig in figs.items():
            (ax,) = fig.axes
            fig.canvas.draw()
            lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            styles = [(ln.get_linestyle(), ln.get_marker()) for ln in lines]
            assert len({m for _, m in styles}) == len(lines), (name, styles)  # each series its own marker
            assert len({ls for ls, _ in styles}) >= min(4, len(lines)), (name, styles)  # and line styles vary
            if name == "memory.png":
                assert len(lines) == 2 + len(POLICIES), [ln.get_label() for ln in lines]
            legend = ax.get_legend()
            assert legend is not None, name
            lb, axb = legend.get_window_extent(), ax.get_window_extent()
            assert lb.x0 >= axb.x1, f"{name}: the legend overlaps the axes ({lb} vs {axb})"
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_plots_written_whole(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (it is in the test extra)")
    prepared, results = _plot_inputs(10)
    files = report.plots(str(tmp_path), None, results, prepared, 512, "t")
    assert [os.path.basename(f) for f in files] == ["memory.png", "rows.png", "time.png"]
    for f in files:
        assert open(f, "rb").read(8) == PNG


# -- the other subcommands --------------------------------------------------------------------------

def test_plans(capsys):
    assert main(["plans"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("Plans of built-in scenario: D=4 replicas")
    for col in ("step", "replicas (mode bs)", "tokens n", "auto", "bucket", "rows", "sglang"):
        assert col in lines[2]
    body = "\n".join(lines[4:15])
    for token in ("MAX_LEN*", "SUM_LEN", "skip", "dext 8/26", "verify 80", "ext 1/512", "idle"):
        assert token in body, token
    assert len([ln for ln in lines if ln[:2].strip().isdigit()]) == 11


def test_plans_fp8(capsys, rank0_env):
    """`plans --fp8 GROUP` prices the hidden gather at the fp8 wire rows of the configured width,
    as DpAttention(fp8=Fp8Format(GROUP)) plans: the same plans as dg.plan(wire_bytes=...)."""
    import dpgather as dg

    args = ["plans", "--synthetic", "mixed", "--dp", "4", "--hidden", "7168", "--steps", "60"]
    assert main([*args, "--fp8", "128"]) == 0
    assert "rows of 14336 B (gather: fp8 wire rows of 7392 B, group 128)" in capsys.readouterr().out
    runs = []
    for extra in ([], ["--fp8", "128"]):
        assert main([*args, "--json", *extra]) == 0
        runs.append([json.loads(ln)["plans"]["auto"] for ln in capsys.readouterr().out.splitlines()])
    plain, fp8 = runs
    assert len(plain) == len(fp8) == 60
    assert any((a["mode"], a["transport"]) != (b["mode"], b["transport"]) for a, b in zip(plain, fp8))
    ns = cli.build_parser().parse_args([*args, "--fp8", "128"])
    trace = synthetic("mixed", dp_size=4, steps=60)
    topo, _, kw = cli._replay_planning(trace, 1, ns)
    assert kw["wire_bytes"] == dg.Fp8Format(128).wire_bytes(7168) == 7392
    for step, got in zip(trace.steps, fp8):
        want = dg.plan([r.batch() for r in step], topo, policy="auto", **kw)
        assert got == want.as_dict() and want.wire_bytes == 7392
    assert main([*args, "--fp8", "96"]) == 2
    assert "group_size=96 must divide hidden_size=7168" in _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:
        main([*args, "--fp8", "0"])
    assert e.value.code == 2 and "--fp8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plans", "--help"])
    assert "--fp8 GROUP" in capsys.readouterr().out


def test_plans_options(capsys, tmp_path, rank0_env):
    assert main(["plans", "--policy", "all", "--attn-tp", "2", "--dp", "3"]) == 0
    out = capsys.readouterr().out
    assert "D=3 replicas x attn_tp 2" in out and all(p in out for p in POLICIES)
    assert main(["plans", "--synthetic", "eagle", "--steps", "6", "--graph-buckets", "none"]) == 0
    out = capsys.readouterr().out
    assert "graph buckets none" in out and "MAX_LEN*" not in out and "draft" in out
    p = tmp_path / "t.jsonl"
    save_trace(synthetic("prefill-burst", dp_size=2, steps=5), p)
    assert main(["plans", "--trace", str(p)]) == 0
    assert "ext " in capsys.readouterr().out
    assert main(["plans", "--trace", str(_broken_trace(tmp_path))]) == 2
    assert "broken.jsonl:3: replica 1: extend_tokens" in _one_line(capsys.readouterr().err)


def test_info_and_python_m():
    res = _py("-m", "dpgather", "info")
    assert res.returncode == 0, res.stderr
    for key in ("dpgather 0.1.0", "backend auto:", "devices:", "MPI:", "mpiexec:", "numba:", "ml_dtypes:"):
        assert key in res.stdout, res.stdout
    res = _py(*CLI, "--help")
    assert res.returncode == 0 and "replay" in res.stdout


def test_bench_needs_the_repository(capsys, monkeypatch, tmp_path, rank0_env):
    monkeypatch.setattr(cli, "_REPO", tmp_path)  # what an installed wheel looks like
    assert main(["bench"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "bench/collective_bench.py" in line and "repository" in line


def test_bench_without_gpus(capsys, monkeypatch, rank0_env):
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    assert main(["bench"]) == 2
    assert "needs GPUs" in _one_line(capsys.readouterr().err)


def test_bench_sync_runs_the_package_module(monkeypatch, capsys, rank0_env):
    calls = []
    monkeypatch.setattr(cli, "_launch", lambda np_, pyargs, timeout: calls.append((np_, pyargs)) or 0)
    assert main(["bench-sync", "--np", "3", "--", "--iters", "5"]) == 0
    assert calls == [(3, ["-m", "dpgather.tools.sync_bench", "--iters", "5"])]


def test_launch_without_mpiexec(monkeypatch, capsys, rank0_env):
    monkeypatch.setattr(cli, "detect", lambda: None)
    assert main(["bench-sync"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no mpiexec" in line and "pip install mpich mpi4py" in line


@pytest.mark.parametrize("launcher_rc,report_ok,expect", [
    (0, True, 0), (0, False, 1), (0, None, 3), (1, False, 1), (2, None, 2), (3, None, 3),
    (137, None, 3), (255, True, 3), (124, None, 124),
])
def test_run_exit_codes(launcher_rc, report_ok, expect, tmp_path, monkeypatch, capsys, rank0_env):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"ok": True}))  # a stale report must not count

    def fake_launch(np_, pyargs, timeout):
        assert pyargs[:3] == ["-m", "dpgather.tools.cli", "replay"] and "--verify" in pyargs
        if report_ok is not None:  # this run's report (a distinct mtime, however fast the test)
            (out / "report.json").write_text(json.dumps({"ok": report_ok}))
            os.utime(out / "report.json", ns=(1, 1))
        return launcher_rc

    monkeypatch.setattr(cli, "_launch", fake_launch)
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    assert main(["run", "--np", "2", "--out", str(out)]) == expect


# -- single-process replays ----------------------------------------------------------------------------

def test_replay_one_process(tmp_path):
    # Without mpiexec: T=1, one replica; the run works and says how to launch more ranks.
    out = tmp_path / "one"
    res = _py("-m", "dpgather", "replay", "--synthetic", "eagle", "--steps", "10", "--verify",
              "--policy", "auto,varlen", "--progress", "off", "--backend", "host", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mpirun -n 4 dpgather replay" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["ok"] is True and rep["verified"] is True and rep["config"]["world_size"] == 1


def test_replay_broken_trace_exit_code(tmp_path):
    res = _py("-m", "dpgather", "replay", "--trace", str(_broken_trace(tmp_path)))
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert f"{tmp_path / 'broken.jsonl'}:3: replica 1: extend_tokens must be >= batch_size" in line


def test_reference_sizings_match_sglang_walkthrough():
    # The SGLang DP-attention walkthrough, section 10: EAGLE, T = D = 4, S = 3, N = 4,
    # bs = [8, 5, 0, 7]; the draft extend step. Before #8277: sum(n) = 80 token rows and 80 logits
    # rows (the (S+1) multiplier); after: MAX_LEN B = 32 * 4 = 128 and sum(l) = 20 logits rows
    # eager, or the graph's static buffer (no dynamic allocation).
    import dpgather as dg
    from dpgather.core import ForwardMode as M
    from dpgather.tools.replay import _prepare
    from dpgather.tools.traces import DEFAULT_SPEC, ReplicaStep, Trace

    acc = {8: (3, 3, 2, 3, 1, 3, 3, 0), 5: (3, 2, 3, 3, 3), 7: (3, 3, 3, 1, 2, 3, 3)}
    step = tuple(ReplicaStep(M.DRAFT_EXTEND, b, can_run_graph=True, accept=acc[b]) if b else ReplicaStep(M.IDLE)
                 for b in (8, 5, 0, 7))
    tr = Trace(4, DEFAULT_SPEC, [step], [0])
    topo = dg.Topology(4)
    eager = _prepare(tr, topo, DEFAULT_SPEC, ())[0]
    assert (eager.before["rows"], eager.before["logits_rows"], eager.before["dyn_rows"]) == (80, 80, 160)
    assert (eager.after["rows"], eager.after["logits_rows"], eager.after["dyn_rows"]) == (128, 20, 148)
    assert eager.real == [26, 19, 0, 25] and eager.l == [8, 5, 0, 7]
    assert eager.idx[0].tolist() == [3, 7, 10, 14, 16, 20, 24, 25]  # the last row of each request
    graph = _prepare(tr, topo, DEFAULT_SPEC, (8, 16, 32))[0]
    assert graph.after["graph"] and graph.after["rows"] == 128 and graph.after["dyn_rows"] == 0
    assert graph.before["dyn_rows"] == 160  # a zeroed sum(n) buffer even when the graph replays


# -- under mpiexec -------------------------------------------------------------------------------

def _replay(nprocs, *args, timeout=120, backend="host"):
    """``dpgather replay`` under mpiexec; ``.returncode`` is every rank's own exit code (the
    launcher's may be 0 under Open MPI 4 when ranks fail), checked to agree over ranks."""
    res = run_mpi(["run_cli.py", "-m", "dpgather.tools.cli", "replay", "--progress", "off", "--backend", backend,
                   *args], nprocs, timeout=timeout)
    rcs = {res.results[r]["rc"] for r in res.results}
    assert len(res.results) == nprocs and len(rcs) == 1, res.tail()
    return res._replace(returncode=rcs.pop())


@pytest.mark.mpi
@needs_mpiexec
def test_replay_all_policies_report(tmp_path):
    out = tmp_path / "run"
    res = _replay(4, "--synthetic", "mixed", "--steps", "60", "--verify", "--policy", "all", "--out", str(out))
    assert res.returncode == 0, res.tail()
    rep = json.loads((out / "report.json").read_text())
    assert rep["format"] == "dpgather-report/1" and rep["ok"] is True and rep["verified"] is True
    cfg = rep["config"]
    assert (cfg["world_size"], cfg["dp_size"], cfg["attn_tp"], cfg["steps"]) == (4, 4, 1, 60)
    assert cfg["policies"] == POLICIES and cfg["dtype"] == "bfloat16" and cfg["hidden"] == 256
    assert set(rep["reference"]) == {"sglang_before_8277", "sglang_after_8277"}
    assert sum(rep["trace"]["mode_mix"].values()) == 60 * 4
    for pol in POLICIES:
        p = rep["policies"][pol]
        s = p["summary"]
        for key in ("rows_moved", "padding_rows", "wire_bytes_per_rank", "peak_bytes", "mean_bytes",
                    "time_us_mean", "arena_allocations", "modes", "bad_rows"):
            assert key in s, key
        assert s["bad_rows"] == 0 and s["verified"] is True and s["arena_allocations"] < 60
        assert len(p["steps"]) == 60
        for st in p["steps"]:
            assert st["verify"]["ok"] is True
            assert st["plan"]["policy"] == pol and len(st["plan"]["num_tokens"]) == 4
            assert set(st["gathered_bytes"]) == {"ours", "sglang_before", "sglang_after"}
            assert st["rows_moved"]["ours"] == st["plan"]["gathered_rows"] + st["plan"]["logits_rows"]
            if st["plan"]["graph"] or st["plan"]["skip"]:
                assert st["gathered_bytes"]["ours"] == 0
    assert rep["policies"]["max_len"]["summary"]["modes"]["SUM_LEN"] == 0
    assert rep["policies"]["varlen"]["summary"]["modes"]["MAX_LEN"] == 0
    for png in ("memory.png", "rows.png", "time.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary files


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("nprocs,A,gen,seen", [(2, 1, "mixed", {"push", "p2p", "nccl"}), (4, 2, "eagle", {"push"})])
def test_plans_predicts_what_replay_does(nprocs, A, gen, seen, tmp_path):
    """`dpgather plans` makes the plans `dpgather replay` makes for the same trace, step by step and
    policy by policy -- the transport included (it used to ignore the host P2P transport, so auto
    chose another layout than the replay did)."""
    p = tmp_path / "t.jsonl"
    save_trace(synthetic(gen, dp_size=nprocs // A, seed=5, steps=30), p)
    common = ["--trace", str(p), "--attn-tp", str(A), "--policy", "all", "--hidden", "256"]
    res = _replay(nprocs, *common, "--verify", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.tail()
    got = _py("-m", "dpgather", "plans", *common, "--json", timeout=120)
    assert got.returncode == 0 and got.stderr == "", got.stderr
    predicted = [json.loads(line) for line in got.stdout.splitlines()]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["ok"] is True and rep["verified"] is True and rep["config"]["world_size"] == nprocs
    transports = set()
    for pol in POLICIES:
        assert rep["policies"][pol]["summary"]["bad_rows"] == 0, pol
        steps = rep["policies"][pol]["steps"]
        assert len(steps) == len(predicted) == 30
        for st, pr in zip(steps, predicted):
            assert st["step"] == pr["step"]
            assert pr["plans"][pol] == st["plan"], (pol, st["step"])
            transports.add(st["plan"]["transport"])
    assert transports == seen, transports  # the transports that occur, and plans knew which


@pytest.mark.mpi
@needs_mpiexec
def test_replay_attn_tp_partial_eagle(tmp_path):
    out = tmp_path / "tp2"
    res = _replay(4, "--synthetic", "eagle", "--attn-tp", "2", "--steps", "25", "--verify",
                  "--policy", "auto,sglang,varlen", "--dtype", "float16", "--out", str(out))
    assert res.returncode == 0, res.tail()
    rep = json.loads((out / "report.json").read_text())
    cfg = rep["config"]
    assert (cfg["world_size"], cfg["dp_size"], cfg["attn_tp"], cfg["dtype"]) == (4, 2, 2, "float16")
    assert rep["ok"] is True and rep["verified"] is True
    for p in ("auto", "sglang", "varlen"):
        s = rep["policies"][p]["summary"]
        assert s["bad_rows"] == 0 and s["verified"] is True and len(rep["policies"][p]["steps"]) == 25, (p, s)


@pytest.mark.mpi
@needs_mpiexec
def test_replay_trace_file_three_ranks(tmp_path):
    p = tmp_path / "three.jsonl"
    save_trace(synthetic("prefill-burst", dp_size=3, seed=4, steps=20), p)
    res = _replay(3, "--trace", str(p), "--verify", "--policy", "varlen", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.tail()
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["config"]["trace"] == str(p) and rep["trace"]["dp_size"] == 3 and rep["ok"] is True
    s = rep["policies"]["varlen"]["summary"]
    assert s["bad_rows"] == 0 and s["verified"] is True and len(rep["policies"]["varlen"]["steps"]) == 20, s
    # the same trace on the wrong number of ranks: one clear error (from rank 0), no hang
    res = _replay(2, "--trace", str(p), timeout=60)
    assert res.returncode == 2 and not res.timed_out, res.tail()
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("dpgather")]  # not the launcher's
    assert len(ours) == 1 and "mpirun -n 3 dpgather replay" in ours[0], res.stderr


@pytest.mark.mpi
@needs_mpiexec
def test_usage_error_printed_once_under_mpiexec():
    res = _replay(3, "--bogus", timeout=60)
    assert res.returncode == 2 and not res.timed_out, res.tail()
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("dpgather")]  # not the launcher's
    assert len(ours) == 1 and "unrecognized arguments: --bogus" in ours[0], res.stderr
    res = _replay(3, "--help", timeout=60)
    assert res.returncode == 0 and res.stdout.count("usage: dpgather replay") == 1, res.tail()


@pytest.mark.mpi
@needs_mpiexec
def test_replay_verification_failure_exits_1(tmp_path):
    out = tmp_path / "bad"
    res = run_mpi(["replay_corrupt.py", "44", str(out), "--steps", "50", "--policy", "varlen",
                   "--backend", "host"], 2, timeout=120)
    assert not res.timed_out and sorted(res.results) == [0, 1], res.tail()
    assert [res.results[r]["rc"] for r in (0, 1)] == [1, 1], res.tail()
    assert res.results[0]["corrupted"] == [44] and res.results[1]["corrupted"] == []
    rep = json.loads((out / "report.json").read_text())
    assert rep["ok"] is False and rep["policies"]["varlen"]["summary"]["bad_rows"] > 0
    bad = [s["step"] for s in rep["policies"]["varlen"]["steps"] if not s["verify"]["ok"]]
    assert bad == [44]


@pytest.mark.mpi
@needs_mpiexec
def test_run_wrapper(tmp_path):
    out = tmp_path / "runs" / "r1"
    res = subprocess.run(
        [sys.executable, "-m", "dpgather", "run", "--np", "2", "--out", str(out), "--timeout", "150",
         "--steps", "20", "--policy", "auto", "--backend", "host"],
        capture_output=True, text=True, timeout=200, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "-n 2" in res.stdout and "replay --synthetic mixed --verify --out" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["ok"] is True and rep["verified"] is True and rep["config"]["world_size"] == 2
    assert rep["config"]["policies"] == ["auto"], rep["config"]
    s = rep["policies"]["auto"]["summary"]
    assert s["bad_rows"] == 0 and s["verified"] is True and len(rep["policies"]["auto"]["steps"]) == 20, s
    assert (out / "memory.png").is_file()


@pytest.mark.mpi
@needs_mpiexec
def test_example_tp_mlp_layer():
    example = str(REPO / "examples" / "tp_mlp_layer.py")
    res = run_mpi(["run_cli.py", example, "--backend", "host"], 2, timeout=90)
    assert res.returncode == 0 and ranks_exited_zero(res, 2)[0], ranks_exited_zero(res, 2)[1]
    assert "matches the single-process layer" in res.stdout
    res = run_mpi(["run_cli.py", example, "--attn-tp", "2", "--steps", "3", "--backend", "host"], 2, timeout=90)
    assert res.returncode == 0 and ranks_exited_zero(res, 2)[0], ranks_exited_zero(res, 2)[1]
    assert "matches the single-process layer" in res.stdout


@pytest.mark.mpi
@needs_mpiexec
def test_example_fp8_moe_layer():
    """examples/fp8_moe_layer.py: decode, prefill and mixed steps (an idle replica), 2 replicas
    and 1 replica of attn_tp 2; every rank exits 0 after its wire rows and output checks."""
    example = str(REPO / "examples" / "fp8_moe_layer.py")
    for extra in ([], ["--attn-tp", "2"]):
        res = run_mpi(["run_cli.py", example, "--steps", "6", "--backend", "host", *extra], 2, timeout=120)
        assert res.returncode == 0 and ranks_exited_zero(res, 2)[0], ranks_exited_zero(res, 2)[1]
        assert "fp8 wire rows equal the local quantization; max relative error vs the bf16 layer" in res.stdout, \
            res.tail()
        assert "FAILED" not in res.stdout, res.tail()
        if not extra:  # one replica of two ranks: its mixed steps are all-idle (skipped)
            assert "decode tokens" in res.stdout and "prefill tokens" in res.stdout and "mixed tokens" in res.stdout


def _gpus():
    from dpgather.tools._common import gpu_count

    return gpu_count()


@pytest.mark.gpu
@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.skipif(_gpus() == 0, reason="needs CuPy and a GPU")
def test_replay_cuda(tmp_path):
    n = min(_gpus(), 4)
    res = _replay(n, "--steps", "60", "--verify", "--policy", "all", "--out", str(tmp_path / "g"),
                  backend="cuda", timeout=400)
    assert res.returncode == 0, res.tail()
    rep = json.loads((tmp_path / "g" / "report.json").read_text())
    assert rep["ok"] and rep["config"]["backend"] == "cuda"
    res = run_mpi(["run_cli.py", str(REPO / "examples" / "tp_mlp_layer.py"), "--backend", "cuda"], n, timeout=200)
    assert res.returncode == 0 and "cuda backend" in res.stdout, res.tail()
    assert ranks_exited_zero(res, n)[0], ranks_exited_zero(res, n)[1]


# -- time limits and the launcher's arguments (issue 26 items 7 and 12) -------------------------------

_SLEEPER = """import os, sys, time
open(os.path.join(sys.argv[1], f"pid-{os.getpid()}"), "w").close()
time.sleep(float(sys.argv[2]))
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that no one reaped yet is gone as far as the job is concerned
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("past_s", [7, 100])
def test_launcher_time_limit_is_124_within_the_stated_margin(past_s, tmp_path):
    """A job that outlives ``--timeout S`` is stopped and returns 124 within S + KILL_GRACE_S + 1
    seconds, under MPICH and Open MPI alike; a job that would end within 10 s after S (Open MPI used
    to return 0 then) is stopped too; no rank survives."""
    import time

    from dpgather.tools.launch import EXIT_TIMEOUT, KILL_GRACE_S

    script = tmp_path / "sleeper.py"
    script.write_text(_SLEEPER)
    limit = 8.0  # long enough for both ranks to start on a loaded box
    t0 = time.monotonic()
    res = _py("-m", "dpgather.tools.launch", "-n", "2", "--timeout", str(limit), str(script), str(tmp_path),
              str(limit + past_s), timeout=150)
    wall = time.monotonic() - t0
    assert res.returncode == EXIT_TIMEOUT, res.stdout + res.stderr
    assert "did not finish within its time limit of 8 s" in res.stderr, res.stderr
    # the limit counts from mpiexec's start; the interpreter and `mpiexec --version` come before it
    assert limit <= wall < limit + KILL_GRACE_S + 1 + 5, wall
    pids = [int(p.name[4:]) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 2, pids  # both ranks started ...
    time.sleep(0.5)
    assert not [p for p in pids if _alive(p)], "ranks survived the stopped job"  # ... and are gone


@pytest.mark.mpi
@needs_mpiexec
def test_run_timeout_exits_124(tmp_path):
    """`dpgather run --timeout S` returns the documented 124 (MPICH's Hydra used to end the job
    with its own code, read as 3 'a rank crashed')."""
    import time

    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "dpgather", "run", "--np", "2", "--timeout", "1", "--out",
                          str(tmp_path / "r"), "--backend", "host"], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert res.returncode == 124, res.stdout[-2000:] + res.stderr[-2000:]
    assert time.monotonic() - t0 < 1 + 3 + 10
    assert "time limit of 1 s" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "r" / "report.json").exists()


@pytest.mark.parametrize("argv,fragment", [
    (["-n", "0", "x.py"], "-n/--np: expected a positive integer, got 0"),
    (["-n", "-1", "x.py"], "-n/--np: expected a positive integer, got -1"),
    (["--np=two", "x.py"], "-n/--np: expected a positive integer, got 'two'"),
    (["-n", "2", "--timeout", "-5", "x.py"], "--timeout: expected a positive number, got -5"),
    (["-n", "2", "--timeout", "nan", "x.py"], "--timeout: expected a positive number, got 'nan'"),
    (["-n", "2", "--timeout", "0", "x.py"], "--timeout: expected a positive number, got 0"),
    (["-n", "2", "nosuch.py"], "cannot open the program 'nosuch.py': no such file"),
    (["-n", "2", "-m", "nosuch_module_dpg"], "no module named 'nosuch_module_dpg'"),
    (["-n", "2"], "no program given"),
])
def test_launcher_refuses_bad_arguments_in_one_line(argv, fragment, tmp_path):
    res = _py("-m", "dpgather.tools.launch", *argv, timeout=60, cwd=str(tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    line = _one_line(res.stderr)
    assert line.startswith("python -m dpgather.tools.launch: error:") and fragment in line, line
    assert res.stdout == ""


def test_a_rank_whose_script_is_missing_says_so_in_one_line(tmp_path):
    """What each rank prints if the program vanished after the launcher checked it: Python's own
    line and exit 2, no traceback."""
    res = _py("-m", "dpgather.tools._rankexit", str(tmp_path), "nosuch.py", timeout=60, cwd=str(tmp_path))
    assert res.returncode == 2 and "can't open file" in _one_line(res.stderr), res.stderr
    assert (tmp_path / "rank-0").read_text() == "2"


def test_readme_shows_make_run_as_it_prints_today(capsys):
    """The README's `make run` report is what `make run` prints (host backend: the 202-step
    `mixed` trace on 4 ranks, H=256 bf16): the table, the comparison lines and the scale-up
    line, every column but the measured ones (ms/step, allocs, verify), recomputed here from the
    replay's own plans (cli._replay_planning), sizings and report code -- so the excerpt cannot
    drift or drop the line where `auto` loses."""
    import types

    import numpy as np

    import dpgather as dg
    from dpgather.tools import replay

    ns = cli.build_parser().parse_args(["plans", "--synthetic", "mixed", "--hidden", "256"])
    trace = synthetic("mixed", dp_size=4, seed=0)
    topo, buckets, kw = cli._replay_planning(trace, 1, ns)
    prepared = replay._prepare(trace, topo, trace.spec, buckets)
    forward = [not all(r.mode == dg.ForwardMode.IDLE for r in s) for s in trace.steps]
    results = {}
    for pol in POLICIES:
        plans = [dg.plan([r.batch() for r in step], topo, policy=pol, **kw) for step in trace.steps]
        summary = report.summary([replay._sizing(p, st, 4) for p, st in zip(plans, prepared)], 512,
                                 np.zeros(len(plans)), forward)
        summary.update(modes=report.mode_mix(plans), bad_rows=0, arena_allocations=0)
        results[pol] = {"summary": summary}
    results["_ref"] = {k: report.summary([getattr(s, k) for s in prepared], 512, None, forward)
                       for k in ("before", "after")}
    report.print_report(types.SimpleNamespace(verify=True), results, 512, 4, "mixed, D=4 x A=1 (T=4), H=256 bfloat16")
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    readme = (REPO / "README.md").read_text()
    excerpt = readme[readme.index("== mixed, D=4 x A=1 (T=4), H=256 bfloat16 =="):].split("```")[0].splitlines()
    excerpt = [ln for ln in excerpt if ln.strip()]

    def table(lines):  # the rows' deterministic columns (ms/step, allocs and verify are measured)
        rows = [ln.split() for ln in lines if (ln.split()[0] in POLICIES and " vs " not in ln)
                or ln.startswith("SGLang")]
        return [c[:-3] if c[0] in POLICIES else c for c in rows]

    assert table(printed) == table(excerpt) and len(table(excerpt)) == 7
    for line in printed:
        if line.startswith(("auto vs", "At DeepSeek-V3")):
            assert line in excerpt, line
    assert any(ln.startswith("auto vs SGLang <#8277: rows moved +31%") for ln in excerpt)


def test_plans_knows_the_p2p_window_of_a_dpattention():
    """`plans` and DpAttention size the P2P windows by one public rule."""
    from mpi4py import MPI

    import dpgather as dg
    from dpgather.core import P2P_WINDOW_ROWS, p2p_window_rows

    assert p2p_window_rows(dg.Topology(4, 2), (8, 600), None) == 2 * 600
    assert p2p_window_rows(dg.Topology(4, 2), (), 7) == 2 * P2P_WINDOW_ROWS
    assert p2p_window_rows(dg.Topology(6, 2), (), 301) == 3 * 302
    with dg.DpAttention(MPI.COMM_SELF, hidden_size=4, dtype="float32", backend="host") as dp:
        assert dp.info()["p2p_rows"] == 0  # one rank: no P2P, nothing to size
