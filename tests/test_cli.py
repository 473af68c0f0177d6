"""The ``dpgather`` command line: help, plans, info, errors, and the replay under mpiexec."""

import json
import subprocess
import sys

import pytest

from mpi_harness import HERE, needs_mpiexec, run_mpi

from dpgather.tools.cli import main
from dpgather.tools.traces import save_trace, synthetic

REPO = HERE.parent
PNG = b"\x89PNG\r\n\x1a\n"
POLICIES = ["auto", "sglang", "max_len", "sum_len", "varlen"]


def _py(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))


def _broken_trace(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"format": "dpgather-trace/1", "dp_size": 2}\n'
                 '{"step": 0, "replicas": [{"mode": "DECODE", "batch_size": 3}, {"mode": "IDLE"}]}\n'
                 '{"step": 1, "replicas": [{"mode": "DECODE", "batch_size": 3}, {"mode": "EXTEND", '
                 '"batch_size": 4, "extend_tokens": 2}]}\n')
    return p


# -- single process ------------------------------------------------------------------------------

def test_help(capsys):
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
                 "--seed", "--backend", "--verify", "--out", "--graph-buckets", "examples:"):
        assert flag in out
    assert "--corrupt-step" not in out


def test_usage_errors(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["plans", "--bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["replay", "--synthetic", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


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


def test_plans_options(capsys, tmp_path):
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
    assert "broken.jsonl:3: replica 1: extend_tokens" in capsys.readouterr().err


def test_info_and_python_m():
    res = _py("-m", "dpgather", "info")
    assert res.returncode == 0, res.stderr
    for key in ("dpgather 0.1.0", "backend auto:", "devices:", "MPI:", "mpiexec:", "numba:", "ml_dtypes:"):
        assert key in res.stdout, res.stdout
    res = _py("-m", "dpgather.tools.cli", "--help")
    assert res.returncode == 0 and "replay" in res.stdout


def test_calibrate_and_bench_explain(capsys):
    import importlib.util

    if importlib.util.find_spec("dpgather.tools.calibrate") is None:
        assert main(["calibrate"]) == 2
        assert "calibration" in capsys.readouterr().out.lower()
    from dpgather.tools.cli import _gpu_count

    if not _gpu_count():
        assert main(["bench"]) == 0
        assert "need GPUs" in capsys.readouterr().out


def test_replay_one_process(tmp_path):
    # Without mpiexec: T=1, one replica; the run works and says how to launch more ranks.
    res = _py("-m", "dpgather", "replay", "--synthetic", "eagle", "--steps", "10", "--verify",
              "--policy", "auto,varlen", "--progress", "off", "--backend", "host")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mpirun -n 4 dpgather replay" in res.stdout
    assert "verification: every row of every step matched" in res.stdout


def test_replay_broken_trace_exit_code(tmp_path):
    res = _py("-m", "dpgather", "replay", "--trace", str(_broken_trace(tmp_path)))
    assert res.returncode == 2
    assert f"{tmp_path / 'broken.jsonl'}:3: replica 1: extend_tokens must be >= batch_size" in res.stderr
    assert "Traceback" not in res.stderr


def test_reference_sizings_match_sglang_walkthrough():
    # sglang-dp-attention.md section 10: EAGLE, T = D = 4, S = 3, N = 4, bs = [8, 5, 0, 7]; the
    # draft extend step. Before #8277: sum(n) = 80 token rows and 80 logits rows (the (S+1)
    # multiplier); after: MAX_LEN B = 32 * 4 = 128 and sum(l) = 20 logits rows eager, or the
    # graph's static buffer (no dynamic allocation).
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
    return run_mpi(["-m", "dpgather.tools.cli", "replay", "--progress", "off", "--backend", backend, *args],
                   nprocs, timeout=timeout)


@pytest.mark.mpi
@needs_mpiexec
def test_replay_all_policies_report(tmp_path):
    out = tmp_path / "run"
    res = _replay(4, "--synthetic", "mixed", "--steps", "60", "--verify", "--policy", "all", "--out", str(out))
    assert res.returncode == 0, res.tail()
    assert f"report written to {out / 'report.json'}" in res.stdout
    assert "plots written to" in res.stdout and "SGLang <#8277" in res.stdout
    assert res.stdout.count("verification ok") == 5
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
        assert s["bad_rows"] == 0 and s["arena_allocations"] < 60
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


@pytest.mark.mpi
@needs_mpiexec
def test_replay_attn_tp_partial_eagle():
    res = _replay(4, "--synthetic", "eagle", "--attn-tp", "2", "--steps", "25", "--verify",
                  "--policy", "auto,sglang,varlen", "--dtype", "fp16")
    assert res.returncode == 0, res.tail()
    assert "T=4 ranks = D=2 replicas x attn_tp A=2" in res.stdout
    assert res.stdout.count("verification ok") == 3


@pytest.mark.mpi
@needs_mpiexec
def test_replay_trace_file_three_ranks(tmp_path):
    p = tmp_path / "three.jsonl"
    save_trace(synthetic("prefill-burst", dp_size=3, seed=4, steps=20), p)
    res = _replay(3, "--trace", str(p), "--verify", "--policy", "varlen", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.tail()
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["config"]["trace"] == str(p) and rep["trace"]["dp_size"] == 3 and rep["ok"]
    # the same trace on the wrong number of ranks: a clear error on every rank, no hang
    res = _replay(2, "--trace", str(p), timeout=60)
    assert res.returncode == 2 and not res.timed_out, res.tail()
    assert "mpirun -n 3 dpgather replay" in res.stderr


@pytest.mark.mpi
@needs_mpiexec
def test_replay_verification_failure_exits_nonzero(tmp_path):
    res = _replay(2, "--steps", "50", "--verify", "--policy", "varlen", "--corrupt-step", "44",
                  "--out", str(tmp_path / "bad"))
    assert res.returncode == 1 and not res.timed_out, res.tail()
    assert "FAILED" in res.stdout and "first at step 44" in res.stdout
    rep = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert rep["ok"] is False
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
    assert f"report written to {out / 'report.json'}" in res.stdout and "done in" in res.stdout
    assert (out / "memory.png").is_file()


@pytest.mark.mpi
@needs_mpiexec
def test_example_tp_mlp_layer():
    example = str(REPO / "examples" / "tp_mlp_layer.py")
    res = run_mpi([example, "--backend", "host"], 2, timeout=90)
    assert res.returncode == 0, res.tail()
    assert "matches the single-process layer" in res.stdout
    res = run_mpi([example, "--attn-tp", "2", "--steps", "3", "--backend", "host"], 2, timeout=90)
    assert res.returncode == 0, res.tail()


def _gpus():
    from dpgather.tools.cli import _gpu_count

    return _gpu_count()


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
    res = run_mpi([str(REPO / "examples" / "tp_mlp_layer.py"), "--backend", "cuda"], n, timeout=200)
    assert res.returncode == 0 and "cuda backend" in res.stdout, res.tail()
