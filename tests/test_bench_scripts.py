"""CPU smoke tests of the GPU benchmarks and of ``dg.calibrate`` (host backend).

The benchmarks need GPUs to measure anything; here they must at least compile, answer
``--help`` without touching MPI or a GPU, and skip cleanly. ``calibrate()`` runs for real on the
host backend under ``mpiexec -n 2`` and writes a file that ``CostModel.load`` reads back.
"""

import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_harness import check_mpi, needs_mpiexec

from dpgather.core.cost import COLLECTIVES, CostModel

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["bench/collective_bench.py", "bench/graph_bench.py", "bench/_cublas.py",
           "dpgather/tools/calibrate.py"]


@pytest.mark.parametrize("path", SCRIPTS)
def test_compiles(path, tmp_path):
    py_compile.compile(str(ROOT / path), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("args", [
    ["bench/collective_bench.py", "--help"],
    ["bench/graph_bench.py", "--help"],
    ["-m", "dpgather.tools.calibrate", "--help"],
])
def test_help(args):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()
    assert "--json" in res.stdout or "--out" in res.stdout


def test_bench_rejects_too_few_reps():
    res = subprocess.run([sys.executable, "bench/collective_bench.py", "--reps", "5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--reps" in res.stderr


def _synthetic(name, a0, a1, beta, groups):
    f = 2.0 if name == "all_reduce" else 1.0
    out = []
    for P, ks in groups:
        for rows in (1, 8, 64, 512, 4096):
            for k in ks:
                B = (k if name in ("gatherv", "reduce_scatterv") else P) * rows * 14336
                out.append((P, k, B, a0 + a1 * (k - 1) + B * f * (P - 1) / P / (beta * 1e3)))
    return out


@pytest.mark.parametrize("name", COLLECTIVES)
def test_fit_recovers_constants(name):
    from dpgather.tools.calibrate import fit_collective

    groups = [(4, [1, 2, 3, 4])] if name in ("gatherv", "reduce_scatterv") else [(4, [4]), (2, [2])]
    (a0, a1, beta), info = fit_collective(name, _synthetic(name, 9.0, 3.5, 280.0, groups))
    assert a0 == pytest.approx(9.0, rel=1e-6)
    assert a1 == pytest.approx(3.5, rel=1e-6)
    assert beta == pytest.approx(280.0, rel=1e-6)
    assert abs(info["rel_err_min"]) < 1e-9 and abs(info["rel_err_max"]) < 1e-9


def test_fit_single_group_size_splits_like_defaults():
    from dpgather.tools.calibrate import fit_collective

    (a0, a1, beta), info = fit_collective("all_gather", _synthetic("all_gather", 15.0, 5.0, 300.0, [(4, [4])]),
                                          default=(12.0, 4.0, 300.0))
    assert a0 + 3 * a1 == pytest.approx(30.0, rel=1e-6)
    assert a0 / a1 == pytest.approx(3.0, rel=1e-6)
    assert beta == pytest.approx(300.0, rel=1e-6)
    assert "split" in info["note"]


def test_fit_noisy_data_stays_valid():
    from dpgather.tools.calibrate import fit_collective

    (a0, a1, beta), _ = fit_collective("gatherv", [(2, 1, 100.0, 30.0), (2, 2, 200.0, 10.0),
                                                   (2, 1, 400.0, 9.0), (2, 2, 800.0, 20.0)])
    assert a0 >= 0 and a1 >= 0 and beta > 0
    CostModel(gatherv=(a0, a1, beta))  # accepted by the model


def _check_model_file(path, hidden, ranks):
    model = CostModel.load(str(path))
    assert model.row_bytes == hidden * 2
    assert model.copy_GBps > 0
    meta = json.loads(Path(path).read_text())["meta"]
    assert meta["backend"] == "host" and meta["ranks"] == ranks
    for c in COLLECTIVES:
        a0, a1, beta = model.params[c]
        assert a0 >= 0 and a1 >= 0 and beta > 0
        assert meta["fit"][c]["n"] > 0
        assert len(meta["samples"][c]) == meta["fit"][c]["n"]
    return model, meta


@needs_mpiexec
def test_calibrate_host_backend_api(tmp_path):
    out = tmp_path / "cost.json"
    code = (
        "import dpgather as dg\n"
        f"m = dg.calibrate(out={str(out)!r}, sizes=(1, 4), hidden=64, backend='host', reps=3)\n"
        "from mpi4py import MPI\n"
        "r = MPI.COMM_WORLD.Get_rank()\n"
        "ms = MPI.COMM_WORLD.allgather(m.to_dict())\n"
        "assert all(x == ms[0] for x in ms), ms\n"
        "print(f'CALIBRATED rank={r}/{MPI.COMM_WORLD.Get_size()}')\n"
    )
    check_mpi(["-c", code], 2, timeout=60, markers="CALIBRATED")
    model, meta = _check_model_file(out, 64, 2)
    # 2 ranks: native collectives have one k, the v-collectives k = 1 and 2
    assert sorted({s[1] for s in meta["samples"]["gatherv"]}) == [1, 2]
    assert {s[1] for s in meta["samples"]["all_gather"]} == {2}


@needs_mpiexec
def test_calibrate_cli_host_backend(tmp_path):
    out = tmp_path / "cli.json"
    res = check_mpi(["-m", "dpgather.tools.calibrate", "--backend", "host", "--out", str(out),
                     "--sizes", "1,2", "--hidden", "32", "--reps", "2"], 2, timeout=60)
    assert "wrote" in res.stdout and "all_gather" in res.stdout
    _check_model_file(out, 32, 2)
