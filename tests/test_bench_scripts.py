"""CPU tests of the benchmarks' shared parts and of ``dg.calibrate`` (host backend).

The GPU benchmarks need GPUs to measure anything; here they must at least compile, answer
``--help`` without touching MPI or a GPU, and refuse to run without GPUs in one line (exit 2).
The timing core's pure parts (statistics, nccl-tests bandwidths, tables, the protocol on a host
clock) are unit-tested; its GPU clocks import without CuPy. The sync benchmark and
``calibrate()`` run for real on the host backend under ``mpiexec -n 2``.
"""

import ast
import json
import math
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_harness import check_mpi, needs_mpiexec, run_mpi

from dpgather.core.cost import COLLECTIVES, CostModel
from dpgather.tools import timing

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")) + [
           "dpgather/tools/cublas.py", "dpgather/tools/calibrate.py",
           "dpgather/tools/sync_bench.py", "dpgather/tools/timing.py"]


@pytest.mark.parametrize("path", SCRIPTS)
def test_compiles(path, tmp_path):
    py_compile.compile(str(ROOT / path), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("args", [
    ["bench/collective_bench.py", "--help"],
    ["bench/graph_bench.py", "--help"],
    ["bench/overlap_bench.py", "--help"],
    ["bench/copy_bench.py", "--help"],
    ["bench/sync_bench.py", "--help"],
    ["bench/eager_bench.py", "--help"],
    ["bench/host_progress_bench.py", "--help"],
    ["-m", "dpgather.tools.sync_bench", "--help"],
    ["-m", "dpgather.tools.calibrate", "--help"],
])
def test_help(args):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()
    assert "--json" in res.stdout or "--out" in res.stdout


def test_copy_bench_without_gpu_says_so_in_one_line():
    res = subprocess.run([sys.executable, "bench/copy_bench.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    if "CuPy sees 0" not in res.stderr and res.returncode == 0:
        pytest.skip("a GPU is visible: the bench ran")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "needs CuPy and GPU 0" in res.stderr


@pytest.mark.parametrize("argv", [["--mode", "quantize", "--group", "100"], ["--mode", "quantize", "--itemsize", "4"]])
def test_copy_bench_quantize_mode_rejects_bad_formats(argv):
    res = subprocess.run([sys.executable, "bench/copy_bench.py", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "--mode quantize" in res.stderr, res.stderr


def test_overlap_bench_without_gpu_says_so_in_one_line():
    res = subprocess.run([sys.executable, "bench/overlap_bench.py", "--tokens", "256"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if res.returncode == 0:
        pytest.skip("a GPU is visible: the bench ran")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "needs CuPy with a GPU" in res.stderr


@pytest.mark.parametrize("argv,what", [(["--tokens", "3"], "--tokens"), (["--modes", "fast"], "--modes"),
                                       (["--reps", "5"], "--reps")])
def test_overlap_bench_rejects_bad_arguments(argv, what):
    res = subprocess.run([sys.executable, "bench/overlap_bench.py", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and what in res.stderr, res.stderr


@needs_mpiexec
def test_overlap_bench_host_smoke(tmp_path):
    """The bench's code path (async calls, micro-batches, both graph runners, the checks before
    timing) on the host backend with a NumPy MLP: no timing value, but the GPU run only swaps the
    arrays, the MLP and the clock."""
    out = tmp_path / "overlap.json"
    res = run_mpi(["bench/overlap_bench.py", "--backend", "host", "--hidden", "16", "--inter", "8",
                   "--tokens", "8", "--target-us", "50", "--warmup", "0", "--json", str(out)], 2, timeout=120)
    assert res.returncode == 0 and not res.timed_out, res.tail()
    got = json.loads(out.read_text())
    assert got["wrong"] == 0 and [p["mode"] for p in got["points"]] == ["eager", "graph"], got
    assert all(p["bitdiff"] == 0 and p["allocs"] == 0 for p in got["points"]), got


def test_gpu_parts_import_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['torch'] = None\n"
            "import dpgather.tools.timing as t, dpgather.tools.cublas as c\n"
            "try:\n    t.CupyEvents()\nexcept ImportError:\n    pass\nelse:\n    sys.exit(3)\n"
            "print(sorted(m for m in ('mpi4py.MPI', 'numba') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def _imports(path):
    """Module names a Python file imports (absolute, and relative ones resolved in dpgather.tools)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("dpgather.tools" if node.level == 1 else "dpgather") if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def test_tools_use_only_the_public_api():
    """dpgather.tools and the benches import no private module of the library (the tools' own
    private helpers are theirs); the benches' kernel warm-up is the one listed exception."""
    allowed = {"dpgather.kernels._cuda"}  # the copy kernels under test / warmed before capture
    files = sorted((ROOT / "dpgather" / "tools").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    for f in files:
        for mod in _imports(f):
            parts = mod.split(".")
            if parts[0] != "dpgather" or mod in allowed or mod.startswith("dpgather.tools"):
                continue
            assert not any(p.startswith("_") for p in parts[1:]), f"{f.relative_to(ROOT)} imports {mod}"
    for f in files:
        assert "dist._nccl" not in f.read_text(), f


def test_bench_rejects_too_few_reps():
    res = subprocess.run([sys.executable, "bench/collective_bench.py", "--reps", "5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--reps" in res.stderr


@pytest.mark.parametrize("args, err", [
    (["--counts", "8192/-1"], "--counts"),
    (["--counts", "a/b"], "counts"),
    (["--variants", "p2p"], "--variants"),
    (["--variants", "varlen,bogus"], "--variants"),
    (["--fp8-group", "100"], "--fp8-group"),
])
def test_bench_rejects_bad_layouts_and_variants(args, err):
    res = subprocess.run([sys.executable, "bench/collective_bench.py", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and err in res.stderr, res.stderr


def test_bench_custom_layouts_cycle_to_every_replica():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import collective_bench as cb
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert cb.parse_counts("8192/1") == [8192, 1]
    assert cb.pattern_counts("[512/0]", 4, 0) == [("DECODE", 512), ("IDLE", 0)] * 2
    assert cb.pattern_counts("[7]", 3, 0) == [("DECODE", 7)] * 3
    with pytest.raises(ValueError, match="8192/x"):
        cb.parse_counts("8192/x")


# -- the timing core ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 20, 101])
def test_percentile_and_median_match_numpy(n):
    xs = np.random.default_rng(n).exponential(10.0, size=n).tolist()
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert timing.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert timing.median(xs) == pytest.approx(float(np.median(xs)), rel=1e-12)
    s = timing.summarize(xs)
    assert s["n"] == n and s["min"] == min(xs) and s["max"] == max(xs)
    assert s["p50"] == pytest.approx(np.median(xs)) and s["mean"] == pytest.approx(np.mean(xs))
    with pytest.raises(ValueError):
        timing.percentile([], 50)
    with pytest.raises(ValueError):
        timing.percentile(xs, 101)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_busbw_factors_as_nccl_tests_define_them(n):
    ring = (n - 1) / n
    for coll in ("all_gather", "reduce_scatter", "gatherv", "reduce_scatterv", "alltoall"):
        assert timing.busbw_factor(coll, n) == pytest.approx(ring)
    assert timing.busbw_factor("all_reduce", n) == pytest.approx(2 * ring)
    for coll in ("broadcast", "reduce", "sendrecv"):
        assert timing.busbw_factor(coll, n) == 1.0
    with pytest.raises(ValueError):
        timing.busbw_factor("gossip", n)
    with pytest.raises(ValueError):
        timing.busbw_factor("all_gather", 0)


def test_algbw_and_busbw():
    # 1 GB in 1 s = 1 GB/s (GB = 1e9 bytes, time in us)
    assert timing.algbw_GBps(1e9, 1e6) == pytest.approx(1.0)
    assert timing.algbw_GBps(14336 * 8, 10.0) == pytest.approx(14336 * 8 / 1e4)
    assert timing.algbw_GBps(100, 0) == 0.0
    # nccl-tests all_reduce_perf on 8 ranks: 1 GiB in 5000 us -> algbw 214.75, busbw 375.8
    assert timing.busbw_GBps(2**30, 5000.0, "all_reduce", 8) == pytest.approx(2**30 / 5e6 * 1.75)
    assert timing.busbw_GBps(2**30, 5000.0, "all_gather", 8) == pytest.approx(2**30 / 5e6 * 0.875)


def test_nccl_style_table():
    cols = timing.nccl_columns(lead=(timing.Column("name", "pattern", left=True),),
                               mid=(timing.Column("count", "count", "(elements)", "d"),),
                               tail=(timing.Column("eager_us", "eager", "(us)", ".1f"),))
    titles = [c.title for c in cols]
    assert titles == ["pattern", "size", "count", "time", "algbw", "busbw", "eager", "#wrong"]
    rows = [{"name": "skew", "bytes": 1 << 20, "count": 1 << 19, "time_us": 12.345, "algbw_GBps": 84.9,
             "busbw_GBps": 63.7, "eager_us": 30.0, "wrong": 0},
            {"name": "decode64", "bytes": 8, "count": 4, "time_us": 5.0, "algbw_GBps": 0.0,
             "busbw_GBps": 0.0, "eager_us": None, "wrong": None}]
    lines = timing.format_table(rows, cols)
    assert lines[0].startswith("#") and lines[1].startswith("#") and lines[2].startswith(" ")
    assert lines[0].split() == ["#pattern", "size", "count", "time", "algbw", "busbw", "eager", "#wrong"]
    assert "(B)" in lines[1] and "(us)" in lines[1] and "(GB/s)" in lines[1]
    assert lines[2].split() == ["skew", "1048576", "524288", "12.35", "84.90", "63.70", "30.0", "0"]
    assert lines[3].split()[-2:] == ["N/A", "N/A"]
    widths = {len(ln) for ln in lines[2:]}
    assert len(widths) == 1  # right-aligned to the same width
    assert timing.format_table(rows, cols, header=False) == lines[2:]
    assert lines[2].index("skew") == 1 and lines[3].index("decode64") == 1  # left-aligned label


class _CountingClock(timing.HostClock):
    """A host clock whose 'capture' records the body into a replayable list (a fake graph)."""

    can_capture = True

    def __init__(self, fail=False):
        self.fail = fail

    def capture(self, body, k):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return [lambda j=j: body(j) for j in range(k)]

    def launcher(self, graph):
        return lambda: [f() for f in graph]


def test_timer_protocol_on_a_host_clock():
    calls = []
    t = timing.Timer(timing.HostClock(), reps=5, warmup=2, target_us=50.0, kmax=8)

    def body(j):
        calls.append(j)
        sum(range(200))

    res = t.measure(body)
    k = res["k"]
    assert 1 <= k <= 8 and res["est_us"] > 0 and res["eager"] > 0 and res["graph"] is None
    assert len(calls) == 3 + (2 + 5) * k  # pick_k, warm-up, timed repetitions
    assert calls[3:3 + k] == list(range(k))
    assert math.isfinite(t.median_us(lambda: None, 1))


def test_timer_graph_path_and_capture_failure():
    t = timing.Timer(_CountingClock(), reps=3, warmup=1, target_us=10.0, kmax=4)
    res = t.measure(lambda j: sum(range(100)))
    assert res["graph"] is not None and res["graph"] > 0
    bad = timing.Timer(_CountingClock(fail=True), reps=3, warmup=1, target_us=10.0, kmax=4)
    res = bad.measure(lambda j: None)
    assert res["graph"] is None and res["eager"] >= 0
    assert not bad.use_graph and "stream is capturing" in bad.graph_error
    off = timing.Timer(_CountingClock(), reps=3, warmup=0, graph=False)
    assert off.measure(lambda j: None)["graph"] is None
    with pytest.raises(ValueError):
        timing.Timer(timing.HostClock(), reps=0)


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


def test_fit_curves_recovers_link_times():
    """Samples made by the model's own formulas (docs/cost-model.md, "Link time") give back their
    link times: v-collectives at P = 2 (one root: one way; two: both ways), at P = 4 (only every
    root: both ways), the pull and the push balanced and one-sided after their latency and
    copies (the push's curves in bytes on the wire: twice the data)."""
    from dpgather.tools.calibrate import _p2p_alpha_samples, fit_curves

    R, copy = 1000, 4000.0
    params = {"gatherv": (5.0, 1.0, 100.0), "reduce_scatterv": (4.0, 2.0, 100.0), "p2p": (8.0, 0.5, 300.0),
              "push": (3.0, 0.25, 300.0)}
    one = {1e4: 2.0, 1e5: 5.0, 1e6: 20.0}
    both = {1e4: 3.0, 1e5: 8.0, 1e6: 40.0}
    samples = {"gatherv": [], "reduce_scatterv": [], "p2p": [], "push": []}
    for name in ("gatherv", "reduce_scatterv"):
        a0, a1, _ = params[name]
        for x in one:
            samples[name] += [(2, 1, x, a0 + one[x]), (2, 2, 2 * x, a0 + a1 + both[x])]
            samples[name] += [(4, 2, 2 * x, 1e9), (4, 4, 4 * x / 3, a0 + 3 * a1 + both[x])]
    a = 8.0 + 0.5
    for x in one:
        r = x / R
        samples["p2p"] += [(2, 2, 2 * r * R, 2 * a + 2 * both[x] + 2 * (3 * r + 2 * r) * R / (copy * 1e3)),
                           (2, 1, r * R, 2 * a + 2 * one[x] + 2 * (3 * r + r) * R / (copy * 1e3))]
        r = x / (2 * R)  # the push: x bytes on the wire carry x / 2 data bytes
        samples["push"] += [(2, 2, 2 * r * R, 2 * 3.25 + 2 * both[x] + 3 * r * R / (copy * 1e3)),
                            (2, 1, r * R, 2 * 3.25 + 2 * one[x] + 3 * r * R / (copy * 1e3))]
    curves, residuals = fit_curves(params, samples, R, copy)
    assert all(r == pytest.approx(0.0, abs=1e-9) for v in residuals.values() for r in v), residuals

    def flat(pts):
        return [v for p in pts for v in p]

    for name in ("gatherv", "reduce_scatterv", "p2p", "push"):
        assert flat(curves[name]["one"]) == pytest.approx(flat(one.items()))
        assert flat(curves[name]["both"]) == pytest.approx(flat(both.items()))
    CostModel(curves=curves)  # accepted by the model
    # the balanced P2P steps become one collective each for fit_collective: (t - copies) / 2
    got = _p2p_alpha_samples(samples["p2p"], R, copy)
    assert [(P, k) for P, k, _, _ in got] == [(2, 2)] * 3
    assert [t for *_, t in got] == pytest.approx([a + both[x] for x in one])
    got = _p2p_alpha_samples(samples["push"], R, copy, "push")  # B counts the bytes on the wire
    assert [B for _, _, B, _ in got] == pytest.approx([2 * x for x in one])
    assert [t for *_, t in got] == pytest.approx([3.25 + both[x] for x in one])
    # a dip (more bytes, less time) is raised to the point before: more bytes never cost less
    dip, res = fit_curves(params, {"gatherv": [(2, 1, 1e4, 5.0 + 4.0), (2, 1, 1e5, 5.0 + 3.0)]}, R, copy)
    assert flat(dip["gatherv"]["one"]) == pytest.approx([1e4, 4.0, 1e5, 4.0])
    assert res["gatherv"] == pytest.approx([0.0, 1.0 / 8.0])  # the raised point is 1 us above its sample


def test_curve_points_inside_the_latency_noise_are_not_printed_as_measurements():
    """A sample whose time is (nearly) all latency gives no link time: a point under
    MIN_LINK_SHARE of its time (the 14336 GB/s of a loaded CPU box: the latency fit covered the
    whole sample) is left out of the curve, and its residual -- the latency fit above the
    sample -- is what flag_fits judges."""
    from dpgather.tools.calibrate import MIN_LINK_SHARE, fit_curves, flag_fits

    params = {"gatherv": (50.0, 0.0, 100.0), "reduce_scatterv": (5.0, 0.0, 100.0), "p2p": (8.0, 0.5, 300.0)}
    t_small = 50.0 + 0.5 * MIN_LINK_SHARE * 50.0  # a link time under MIN_LINK_SHARE of the sample
    samples = {"gatherv": [(2, 1, 1.4e4, t_small), (2, 1, 1e6, 60.0), (2, 1, 4e6, 90.0), (2, 1, 2e4, 30.0)]}
    curves, residuals = fit_curves(params, samples, 1000, 4000.0)
    assert curves["gatherv"]["one"] == [[1e6, 10.0], [4e6, 40.0]]  # only the links really measured
    assert residuals["gatherv"][3] == pytest.approx(20.0 / 30.0)  # the latency fit is 20 us above it
    fits = {"gatherv": {"n": 4, "rel_err_min": -0.9, "rel_err_max": 0.9},
            "all_gather": {"n": 3, "rel_err_min": -0.2, "rel_err_max": 0.51},
            "all_reduce": {"n": 3, "rel_err_min": -0.5, "rel_err_max": 0.5},
            "p2p": {"n": 0, "rel_err_min": None, "rel_err_max": None}}
    flagged = flag_fits(fits, residuals, curves, 0.5)
    assert sorted(flagged) == ["all_gather", "gatherv"], flagged  # the curve's residual, not the alpha-beta one
    assert "latency + link-time curve off by" in flagged["gatherv"] and "+67%" in flagged["gatherv"]
    assert flag_fits(fits, {"gatherv": [0.1]}, curves, 0.5).keys() == {"all_gather"}


def _check_model_file(path, hidden, ranks):
    model = CostModel.load(str(path))
    assert model.row_bytes == hidden * 2
    assert model.copy_GBps > 0
    meta = json.loads(Path(path).read_text())["meta"]
    assert meta["backend"] == "host" and meta["ranks"] == ranks
    for c in COLLECTIVES:
        a0, a1, beta = model.params[c]
        assert a0 >= 0 and a1 >= 0 and beta > 0
        if c in ("p2p", "push") and not meta["fit"][c]["n"]:
            continue  # measured only where the P2P transports run
        assert meta["fit"][c]["n"] > 0
        assert len(meta["samples"][c]) == meta["fit"][c]["n"]
    return model, meta


@needs_mpiexec
def test_calibrate_host_backend_api(tmp_path):
    out = tmp_path / "cost.json"
    code = (
        "import dpgather as dg\n"
        "from mpi_harness import report\n"
        f"m = dg.calibrate(out={str(out)!r}, sizes=(1, 4), hidden=64, backend='host', reps=3, max_residual=1e9)\n"
        "from mpi4py import MPI\n"
        "ms = MPI.COMM_WORLD.allgather(m.to_dict())\n"
        "report(failures=[] if all(x == ms[0] for x in ms) else ['models differ across ranks'])\n"
    )
    check_mpi(["-c", code], 2, timeout=60)
    model, meta = _check_model_file(out, 64, 2)
    # 2 ranks: native collectives have one k, the v-collectives k = 1 and 2
    assert sorted({s[1] for s in meta["samples"]["gatherv"]}) == [1, 2]
    assert {s[1] for s in meta["samples"]["all_gather"]} == {2}


@needs_mpiexec
def test_calibrate_cli_host_backend(tmp_path):
    out = tmp_path / "cli.json"
    res = run_mpi(["-m", "dpgather.tools.calibrate", "--backend", "host", "--out", str(out),
                   "--sizes", "1,2", "--hidden", "32", "--reps", "2", "--max-residual", "1e9"], 2, timeout=60)
    assert res.returncode == 0 and not res.timed_out, res.tail()
    _check_model_file(out, 32, 2)


@needs_mpiexec
def test_calibrate_refuses_one_rank(tmp_path):
    """One rank has nothing to measure: one line, exit 2, no file (it used to print the defaults
    as a measured table, write them and exit 0)."""
    out = tmp_path / "one.json"
    res = run_mpi(["run_cli.py", "-m", "dpgather.tools.calibrate", "--backend", "host", "--out", str(out)], 1,
                  timeout=60)
    assert not res.timed_out and res.results[0]["rc"] == 2, res.tail()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "one rank: there is nothing to measure" in lines[0], res.stderr
    assert not out.exists() and "cost model" not in res.stdout


@needs_mpiexec
def test_calibrate_flags_fits_instead_of_writing_them(tmp_path):
    """Fits whose residuals exceed --max-residual are flagged: the table says so, one error line,
    exit 1 on every rank, the previous --out file untouched and no cache (a bound of 1e-9 flags any
    measured alpha-beta fit of 3+ sizes: real timings never fit exactly)."""
    out = tmp_path / "cost.json"
    out.write_text('{"row_bytes": 16}')
    cache = tmp_path / "cache"
    res = run_mpi(["run_cli.py", "-m", "dpgather.tools.calibrate", "--backend", "host", "--out", str(out),
                   "--sizes", "1,4,16", "--hidden", "32", "--reps", "2", "--max-residual", "1e-9"], 2, timeout=90,
                  env={"DPGATHER_CACHE_DIR": str(cache)})
    assert not res.timed_out and [res.results[r]["rc"] for r in (0, 1)] == [1, 1], res.tail()
    assert out.read_text() == '{"row_bytes": 16}' and not cache.exists()
    assert "FLAGGED: alpha-beta fit off by" in res.stdout, res.stdout
    assert "p2p" in res.stdout and "default, not measured" in res.stdout  # never shown as a fit
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "nothing written, nothing cached" in errors[0], res.stderr


@needs_mpiexec
def test_calibrate_cli_errors_once(tmp_path):
    res = run_mpi(["run_cli.py", "-m", "dpgather.tools.calibrate", "--sizes", "1,x"], 2, timeout=60)
    assert not res.timed_out and [res.results[r]["rc"] for r in (0, 1)] == [2, 2], res.tail()
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("python -m dpgather")]  # not the launcher's
    assert len(lines) == 1 and "--sizes" in lines[0], res.stderr


@needs_mpiexec
def test_sync_bench_runs_from_the_package(tmp_path):
    out = tmp_path / "sync.json"
    res = run_mpi(["-m", "dpgather.tools.sync_bench", "--iters", "60", "--warmup", "5",
                   "--json", str(out)], 2, timeout=60, cwd=tmp_path)  # no checkout needed
    assert res.returncode == 0 and not res.timed_out, res.tail()
    got = json.loads(out.read_text())
    assert got["ranks"] == 2 and got["iters"] == 60 and got["wrong"] == 0
    assert 0 < got["p50_us"] <= got["p99_us"] and got["speedup_p50"] > 0


def test_cost_cache_path(monkeypatch, tmp_path):
    """One cache file per machine shape (GPU model, ranks, NCCL version), under DPGATHER_CACHE_DIR,
    else XDG_CACHE_HOME/dpgather; a saved model loads back equal."""
    from dpgather.core import CostModel
    from dpgather.core.cost import cache_dir, cache_path

    monkeypatch.setenv("DPGATHER_CACHE_DIR", str(tmp_path / "c"))
    p = cache_path("NVIDIA H200", 2, 22809)
    assert p == str(tmp_path / "c" / "cost-nvidia-h200-2gpu-nccl22809.json")
    assert cache_path("NVIDIA H200", 4, 22809) != p and cache_path("NVIDIA H100 80GB HBM3", 2, 22809) != p
    monkeypatch.delenv("DPGATHER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == str(tmp_path / "x" / "dpgather")
    m = CostModel(p2p=(8.0, 0.25, 300.0))
    (tmp_path / "c").mkdir()
    m.save(p, meta={"card": "NVIDIA H200"})
    assert CostModel.load(p) == m


@pytest.mark.parametrize("bad", [(1.0, 2.0), (float("nan"), 0, 0), (-1.0, 0, 0), "abc", 3, (0, 0, float("inf"))])
def test_cost_model_rejects_bad_mode_us(bad):
    from dpgather.core import ConfigError, CostModel

    with pytest.raises(ConfigError, match="mode_us"):
        CostModel(mode_us=bad)


def test_cost_model_mode_us_round_trips(tmp_path):
    from dpgather.core import CostModel

    m = CostModel(mode_us=(11.0, 20.5, 23.0))
    m.save(tmp_path / "c.json")
    got = CostModel.load(tmp_path / "c.json")
    assert got == m and got.mode_us == (11.0, 20.5, 23.0) and got.with_row_bytes(8).mode_us == m.mode_us
    assert CostModel.from_dict({"row_bytes": 8}).mode_us == (0.0, 0.0, 0.0)  # files from before mode_us


# CostModel.load accepts exactly its schema (issue 26 item 11): every other file is a ConfigError
# naming the file and what is wrong, never a raw TypeError / OverflowError / RecursionError, never
# a silent coercion.
_BAD_COST_FILES = [
    ("top-level list", "[1, 2]", "got an array"),
    ("top-level null", "null", "got null"),
    ("top-level number", "3", "got a number"),
    ("top-level string", '"cost"', "got a string"),
    ("400-digit integer", '{"row_bytes": ' + "9" * 400 + "}", "an integer literal with 400 digits"),
    ("deeply nested arrays", "[" * 100_000, "nested too deeply"),
    ("deeply nested objects", '{"meta": ' * 50_000, "nested too deeply"),
    ("row_bytes 1.5", '{"row_bytes": 1.5}', "row_bytes must be an integer, got 1.5"),
    ('row_bytes "16"', '{"row_bytes": "16"}', "row_bytes must be an integer, got '16'"),
    ("row_bytes true", '{"row_bytes": true}', "row_bytes must be an integer, got True"),
    ("string constant", '{"copy_GBps": "2900"}', "copy_GBps must be a number, got '2900'"),
    ("boolean constant", '{"mlp_row_us": false}', "mlp_row_us must be a number, got False"),
    ("string in a collective", '{"all_gather": [12, 4, "300"]}', "all_gather must be a number, got '300'"),
    ("boolean in mode_us", '{"mode_us": [0, true, 0]}', "mode_us must be a number, got True"),
    ("short collective", '{"p2p": [8.5, 0.5]}', "p2p must be a list of 3 numbers"),
    ("string curve point", '{"curves": {"p2p": {"one": [["1e6", 5]]}}}', "point must be a number, got '1e6'"),
    ("curve not a list", '{"curves": {"p2p": {"one": 5}}}', "must be [[x_bytes, us], ...]"),
    ("duplicate key", '{"row_bytes": 16, "row_bytes": 32}', "duplicate key 'row_bytes'"),
    ("duplicate nested key", '{"curves": {"p2p": {"one": [[1, 2]], "one": [[3, 4]]}}}', "duplicate key 'one'"),
    ("NaN", '{"copy_GBps": NaN}', "NaN is not a JSON number"),
    ("Infinity", '{"mlp_row_us": -Infinity}', "-Infinity is not a JSON number"),
    ("float overflowing to inf", '{"copy_GBps": 1e400}', "copy_GBps must be finite"),
    ("unknown key", '{"row_bytes": 16, "rowbytes": 32}', "unknown key(s) ['rowbytes']"),
    ("meta not an object", '{"meta": "calibrated"}', "meta must be an object"),
    ("not JSON", "row_bytes = 16", "invalid JSON"),
    ("empty file", "", "invalid JSON"),
    ("not UTF-8", b"\xff\xfe{}", "can't decode"),
]


@pytest.mark.parametrize("name,text,fragment", _BAD_COST_FILES, ids=[c[0] for c in _BAD_COST_FILES])
def test_cost_model_load_accepts_exactly_its_schema(name, text, fragment, tmp_path):
    from dpgather.core import ConfigError, CostModel

    p = tmp_path / "cost.json"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    with pytest.raises(ConfigError) as e:
        CostModel.load(p)
    msg = str(e.value)
    assert msg.startswith(f"cannot read cost model from {str(p)!r}: ") and fragment in msg, msg
    assert "\n" not in msg and len(msg) < 400, msg


def test_cost_model_schema_round_trips_every_field(tmp_path):
    """What save writes (curves, mode_us, meta included), load reads back equal; a file with only
    some constants keeps the defaults for the others."""
    from dpgather.core import CostModel

    m = CostModel(row_bytes=4096, copy_GBps=1234.5, mlp_row_us=0.25, mode_us=(1, 2, 3), p2p=(8, 0.5, 400),
                  curves={"gatherv": {"one": [[1e3, 2.0], [1e6, 40.0]]}, "p2p": {"both": [[5e5, 3.0]]}})
    m.save(tmp_path / "c.json", meta={"card": "x", "fit": {"p2p": {"n": 3}}})
    assert CostModel.load(tmp_path / "c.json") == m
    (tmp_path / "some.json").write_text('{"row_bytes": 8192, "p2p": [9, 0, 450.5]}')
    got = CostModel.load(tmp_path / "some.json")
    assert got.row_bytes == 8192 and got.params["p2p"] == (9.0, 0.0, 450.5)
    assert got.params["all_gather"] == CostModel().params["all_gather"]
