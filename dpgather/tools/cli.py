"""The ``dpgather`` command line (``dpgather`` console script, ``python -m dpgather``).

Subcommands: ``run`` (what ``make run`` does), ``replay``, ``plans``, ``info``, ``bench``,
``bench-sync`` and ``calibrate``; ``dpgather COMMAND --help`` explains each. Importing this
module imports neither MPI nor CuPy: each subcommand loads what it needs.

Behaviour common to every subcommand:

- Usage errors and help are printed once, by rank 0, on one line (under ``mpirun -n N`` every
  rank parses the same arguments; see :class:`dpgather.tools._common.Parser`).
- Exit codes: 0 ok, 1 a verification failed, 2 invalid options or input, or something missing
  from the environment (an optional dependency -- the message names the pip command --, GPUs,
  mpiexec, a repository file), 3 a rank crashed; ``run`` also returns 124 when its time limit
  expired and 130 on Ctrl-C.
- A reader that closes our output early (``dpgather plans | head``) ends the command quietly
  with exit code 0.
- Everything works from an installed wheel except ``dpgather bench``, whose GPU benchmark is a
  repository script (it says so and exits 2).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ._common import (
    EXIT_CRASH,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY,
    PIP,
    Parser,
    gpu_count,
    missing,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    require,
    say_error,
)
from .launch import BACKSTOP_S, EXIT_INTERRUPTED, EXIT_TIMEOUT, detect, launch_env, run_job

__all__ = ["main", "build_parser"]

#: Where a repository checkout would have bench/ (an installed wheel has none there).
_REPO = Path(__file__).resolve().parents[2]

_EPILOG = """\
examples:
  make run                                   # = dpgather run --np 4: replay the built-in trace, verified
  dpgather run --np 2 --policy varlen        # extra flags go to `replay`
  mpirun -n 4 dpgather replay --synthetic eagle --verify --out runs/eagle
  mpirun -n 8 dpgather replay --trace my.jsonl --attn-tp 2 --policy all --out runs/mine
  dpgather plans                             # layouts of a short multi-replica scenario
  dpgather plans --synthetic eagle --steps 12 --policy sglang
  dpgather info                              # backend, devices, MPI and NCCL versions
  dpgather bench-sync --np 4                 # per-step sync latency

Traces are JSON Lines, one step per line (docs/traces.md). Exit codes: 0 ok, 1 a verification
failed, 2 invalid options or input, or something missing (a dependency, GPUs, mpiexec), 3 a rank
crashed, 124 the time limit of `run` expired.
"""

_REPLAY_MODULE = ["-m", "dpgather.tools.cli", "replay"]


def _launch(np_, pyargs, timeout):
    """Run ``mpiexec -n NP python PYARGS`` in its own process group under a hard time limit.

    stdout/stderr are inherited, so output streams live. Returns the exit code (124 when the
    limit expired -- :func:`dpgather.tools.launch.run_job` stops the job itself, under every MPI,
    within ``timeout + KILL_GRACE_S + 1`` seconds --, 130 on Ctrl-C). Without mpiexec a replay
    runs in this process (one rank); anything else returns 2 with one line naming the pip command.
    """
    launcher = detect()
    if launcher is None:
        if pyargs[:3] == _REPLAY_MODULE:
            print("dpgather: no mpiexec next to the Python interpreter or on PATH (" + PIP["mpi4py"]
                  + "); running the replay in this process instead (1 rank, no communication)",
                  file=sys.stderr, flush=True)
            return main(pyargs[2:])
        return say_error("dpgather", "no mpiexec next to the Python interpreter or on PATH; install "
                                     f"MPICH ({PIP['mpi4py']}) or Open MPI")
    env, flags = launch_env(launcher, timeout=timeout and timeout + BACKSTOP_S)
    print("$ " + " ".join([launcher.path, *flags, "-n", str(np_), sys.executable, *pyargs]), flush=True)
    return run_job(launcher, np_, pyargs, env, flags, timeout=timeout)


# -- subcommands --------------------------------------------------------------------------------

def _add_trace_args(p, default_synthetic):
    from .traces import GENERATORS

    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", metavar="FILE", help="JSON Lines trace file (docs/traces.md)")
    src.add_argument("--synthetic", metavar="NAME", default=default_synthetic,
                     choices=sorted(GENERATORS),
                     help=f"built-in seeded trace: {', '.join(sorted(GENERATORS))} (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, help="replay only the first N steps")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed (>= 0) of the synthetic trace and the row data (default: 0)")
    p.add_argument("--graph-buckets", default="default", metavar="LIST",
                   help="per-replica graph capacities in tokens: 'default' (1,2,4,...,256 rounded up "
                        "to multiples of --attn-tp), 'none', or e.g. '8,16,32'")
    p.add_argument("--attn-tp", type=positive_int, default=1, metavar="A",
                   help="ranks per DP replica (must divide the number of ranks; default: 1)")


def _cmd_replay(ns):
    from .replay import ReplayConfig, replay

    return replay(ReplayConfig.from_args(ns))


def _cmd_run(ns, extra):
    """``dpgather run``: launch a verified replay under mpiexec and read its report."""
    from dpgather.core import DpGatherError

    out = ns.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    gpus = gpu_count()
    np_ = ns.np or 4
    backend = []
    note = None  # said once the run starts: a run that fails its checks says only why
    if gpus and "--backend" not in extra:
        if ns.np and ns.np != gpus:
            note = f"note: {gpus} GPU(s) found: running one rank per GPU (--np {ns.np} ignored)"
        np_ = gpus
        backend = ["--backend", "cuda"]
    progress = ["--progress", "on"] if sys.stderr.isatty() and "--progress" not in extra else []
    source = [] if {"--trace", "--synthetic"} & {a.split("=")[0] for a in extra} else ["--synthetic", "mixed"]
    replay_args = [*source, "--verify", "--out", out, *backend, *progress, *extra]
    # The replay's own checks (options, mpi4py / Numba / ml_dtypes / CuPy, the trace, then --out
    # made) here, once, before any rank starts: a missing package is one line and exit 2, not one
    # per rank.
    from .replay import ReplayConfig, preflight

    try:
        preflight(ReplayConfig.from_args(build_parser().parse_args(["replay", *replay_args])))
    except DpGatherError as e:
        return say_error("dpgather run", e)
    if note:
        print(note)
    pyargs = [*_REPLAY_MODULE, *replay_args]
    print(f"dpgather run: replaying a multi-replica serving trace on {np_} ranks "
          f"({'CUDA, one GPU per rank' if backend else 'host backend: NumPy + Numba + MPI'}), "
          f"time limit {ns.timeout:g} s", flush=True)
    report = os.path.join(out, "report.json")
    before = _mtime(report)
    t0 = time.perf_counter()
    rc = _launch(np_, pyargs, ns.timeout)
    dt = time.perf_counter() - t0
    verdict = _report_ok(report) if _mtime(report) != before else None
    if rc == EXIT_OK:
        # Open MPI 4 returns 0 when ranks exit non-zero without aborting the job: the report decides.
        rc = EXIT_OK if verdict is True else EXIT_VERIFY if verdict is False else EXIT_CRASH
    elif rc not in (EXIT_VERIFY, EXIT_USAGE, EXIT_CRASH, EXIT_TIMEOUT, EXIT_INTERRUPTED):
        rc = EXIT_CRASH  # a rank killed by a signal, the launcher's own failure codes
    if rc == EXIT_OK:
        _link_latest(out)
        plots = [os.path.join(out, f) for f in ("memory.png", "rows.png") if os.path.isfile(os.path.join(out, f))]
        print(f"\ndone in {dt:.1f} s. " + (f"Open {' and '.join(plots)}; " if plots else "")
              + f"every number is in {report}.")
    elif rc == EXIT_VERIFY:
        print(f"\nverification FAILED (exit 1) after {dt:.1f} s; details in {report}", file=sys.stderr)
    elif rc in (EXIT_USAGE, EXIT_TIMEOUT, EXIT_INTERRUPTED):
        pass  # said on one line already (rank 0 of the job, or the launcher's time limit)
    elif rc == EXIT_CRASH and verdict is None:
        print(f"\ndpgather run failed after {dt:.1f} s: no report was written (exit 3)", file=sys.stderr)
    else:
        print(f"\ndpgather run failed with exit code {rc} after {dt:.1f} s", file=sys.stderr)
    return rc


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _link_latest(out):
    """Point ``runs/latest`` at ``out`` when ``out`` is a folder of ``runs/`` (best effort)."""
    latest = Path("runs") / "latest"
    try:
        if Path(out).parent == Path("runs"):
            if latest.is_symlink() or latest.exists():
                latest.unlink()
            latest.symlink_to(Path(out).name)
    except OSError:
        pass


def _report_ok(path):
    """``ok`` of a report.json (True/False), or None when there is no readable report."""
    try:
        with open(path) as f:
            ok = json.load(f).get("ok")
    except (OSError, ValueError, AttributeError):
        return None
    return ok if isinstance(ok, bool) else None


_ABBR = {"IDLE": "idle", "DECODE": "dec", "EXTEND": "ext", "TARGET_VERIFY": "verify",
         "DRAFT_DECODE": "draft", "DRAFT_EXTEND": "dext"}


def _scenario(D):
    """The built-in multi-replica scenario of ``dpgather plans`` (one ReplicaStep per replica)."""
    from dpgather.core import ForwardMode as M
    from .traces import DEFAULT_SPEC, ReplicaStep as R, Trace

    def row(*reps):
        reps = list(reps)[:D]
        while len(reps) < D:
            reps.append(reps[len(reps) % max(1, len(reps))] if reps else R(M.IDLE))
        return tuple(reps)

    dec = lambda b, g=True: R(M.DECODE, b, can_run_graph=g)
    steps = [
        row(dec(24), dec(31), dec(28), dec(30)),                                      # balanced decode
        row(dec(8), dec(5), R(M.IDLE), dec(7)),                                       # an idle replica
        row(dec(200), dec(3), dec(2), dec(4)),                                        # skewed, graph
        row(dec(200, False), dec(3), dec(2), dec(4)),                                 # skewed, eager
        row(R(M.EXTEND, 1, 512), dec(12), dec(9), dec(14)),                           # prefill chunk
        row(R(M.EXTEND, 3, 301, 40), dec(12), R(M.IDLE), dec(14)),                    # last chunk
        row(R(M.DRAFT_DECODE, 8, can_run_graph=True), R(M.DRAFT_DECODE, 5, can_run_graph=True),
            R(M.IDLE), R(M.DRAFT_DECODE, 7, can_run_graph=True)),                      # EAGLE draft
        row(R(M.TARGET_VERIFY, 8, can_run_graph=True), R(M.TARGET_VERIFY, 5, can_run_graph=True),
            R(M.IDLE), R(M.TARGET_VERIFY, 7, can_run_graph=True)),                     # verify
        row(R(M.DRAFT_EXTEND, 8, can_run_graph=True, accept=(3, 3, 2, 3, 1, 3, 3, 0)),
            R(M.DRAFT_EXTEND, 5, can_run_graph=True, accept=(3, 2, 3, 3, 3)), R(M.IDLE),
            R(M.DRAFT_EXTEND, 7, can_run_graph=True, accept=(3, 3, 3, 1, 2, 3, 3))),   # draft extend
        row(R(M.TARGET_VERIFY, 80, can_run_graph=True), R(M.TARGET_VERIFY, 5, can_run_graph=True),
            R(M.IDLE), R(M.TARGET_VERIFY, 7, can_run_graph=True)),                     # too big for graphs
        row(R(M.IDLE), R(M.IDLE), R(M.IDLE), R(M.IDLE)),                               # nobody runs
    ]
    return Trace(D, DEFAULT_SPEC, steps, list(range(len(steps))), "built-in scenario")


def _replay_planning(trace, A, ns):
    """``(topology, buckets, planner keywords)`` that plan each step as ``dpgather replay`` does:
    its graph buckets, its cost model at the replay's row width (``--hidden`` x ``--dtype``;
    ``DpAttention`` rescales the model to its rows) and the transport its ``DpAttention`` gets on
    one machine: ``--transport auto`` assumes the P2P transport runs (the host backend's
    shared-memory twin, or CUDA P2P where every GPU pair has peer access) with the windows
    ``DpAttention`` makes (the pull's ``dpgather.core.p2p_window_rows``, and the push's
    ``push_window_rows`` unless ``--transport p2p``) -- and ``nccl`` that it does not
    (``dpgather info`` / ``dp.info()`` say which). ``plans --fp8 GROUP`` adds the planner's
    ``wire_bytes``: the hidden gather priced at ``Fp8Format(GROUP).wire_bytes(hidden)``, as
    ``DpAttention(fp8=...)`` plans."""
    import dpgather as dg
    from dpgather.core import p2p_window_rows, push_window_rows
    from dpgather.core.dtypes import DTYPES as ITEMS

    from .replay import DTYPES, parse_buckets

    topo = dg.Topology(trace.dp_size * A, A)
    buckets = parse_buckets(ns.graph_buckets, A)
    hidden = ns.hidden or (2048 if gpu_count() else 256)
    cost = dg.CostModel(mlp_row_us=ns.mlp_row_us).with_row_bytes(hidden * ITEMS[DTYPES[ns.dtype]].itemsize)
    p2p = ns.transport != "nccl" and topo.world_size > 1
    kw = {"spec": trace.spec, "graph_buckets": buckets, "cost": cost, "transport": ns.transport,
          "p2p_rows": p2p_window_rows(topo, buckets) if p2p else 0,
          "push_rows": push_window_rows(topo) if p2p and ns.transport != "p2p" else 0}
    group = getattr(ns, "fp8", None)
    if group:
        fmt = dg.Fp8Format(group_size=group)
        fmt.check(hidden, DTYPES[ns.dtype])
        kw["wire_bytes"] = fmt.wire_bytes(hidden)
    return topo, buckets, kw


def _cmd_plans(ns):
    """``dpgather plans``: plan each step of a scenario or trace as ``dpgather replay`` would
    (:func:`_replay_planning`) and print the layouts (``--json``: one object per step)."""
    import dpgather as dg

    from .replay import POLICIES
    from .report import text_table
    from .traces import load_trace, synthetic

    A = ns.attn_tp
    try:
        if ns.trace:
            trace = load_trace(ns.trace)
        elif ns.synthetic:
            trace = synthetic(ns.synthetic, dp_size=ns.dp, seed=ns.seed, steps=ns.steps)
        else:
            trace = _scenario(ns.dp)
        trace = trace.head(ns.steps)
        topo, buckets, kw = _replay_planning(trace, A, ns)
        policies = POLICIES if ns.policy == "all" else (ns.policy,)
        compare = list(policies) + ([] if "sglang" in policies else ["sglang"])
        rows = []
        for sid, step in zip(trace.step_ids, trace.steps):
            batches = [r.batch() for r in step]
            plans = {pol: dg.plan(batches, topo, policy=pol, **kw) for pol in compare}
            if ns.json:
                print(json.dumps({"step": sid, "plans": {pol: p.as_dict() for pol, p in plans.items()}}))
                continue
            counts = [r.counts(trace.spec) for r in step]
            cells = [sid, " ".join(_abbr(r) for r in step), ",".join(str(c[0]) for c in counts),
                     ",".join(str(c[1]) for c in counts)]
            for p in plans.values():
                cells += (["skip", "-", 0, 0] if p.skip else
                          [p.mode.name + ("*" if p.graph else "") + ("" if p.transport == "nccl" else " " + p.transport),
                           p.bucket or "-", p.gathered_rows, p.logits_rows])
            rows.append(cells)
    except dg.DpGatherError as e:
        return say_error("dpgather plans", e)
    if ns.json:
        return EXIT_OK
    head = ["step", "replicas (mode bs)", "tokens n", "logits l"]
    for pol in compare:
        head += [f"{pol}", "bucket", "rows", "logit rows"]
    print(f"Plans of {trace.name}: D={trace.dp_size} replicas x attn_tp {A}, graph buckets "
          f"{','.join(map(str, buckets)) or 'none'}, rows of {kw['cost'].row_bytes} B"
          + (f" (gather: fp8 wire rows of {kw['wire_bytes']} B, group {ns.fp8})" if kw.get("wire_bytes") else "")
          + ", transport "
          + (f"{ns.transport} (P2P pull windows of {kw['p2p_rows']} rows"
             + (f", push windows of {kw['push_rows']} rows per replica)" if kw["push_rows"] else ")")
             if kw["p2p_rows"] else "nccl (no P2P)")
          + (f", EAGLE S={trace.spec.num_steps} topk={trace.spec.topk} N={trace.spec.num_draft_tokens}"
             if trace.spec else "") + "\n")
    print(text_table(rows, head, left=(0, 1)))
    print("\nmode* = graph replay (MAX_LEN slots of `bucket` rows); p2p / push = the step moves over the "
          "P2P pull / push (exact rows), else over the collectives (NCCL, MPI on the host backend); rows = "
          "gathered rows, logit rows = logits gather rows; dext bs/real = draft extend with bs requests "
          "and real accepted rows. These are the plans `dpgather replay` makes for the same trace, "
          "--attn-tp, --graph-buckets, --hidden, --dtype and --mlp-row-us on one machine (--transport "
          "nccl where P2P is off). `dpgather plans --help` for other traces and policies.")
    return EXIT_OK


def _abbr(r):
    name = _ABBR[r.mode.name]
    if r.mode.name == "IDLE":
        return name
    if r.mode.name == "EXTEND":
        return f"{name} {r.batch_size}/{r.extend_tokens}"
    if r.mode.name == "DRAFT_EXTEND" and r.accept is not None:
        return f"{name} {r.batch_size}/{sum(a + 1 for a in r.accept)}"
    return f"{name} {r.batch_size}"


def _cmd_info(ns):
    """Backend, devices, MPI / NCCL versions and optional packages, one line each."""
    import platform

    import dpgather

    lines = [f"dpgather {dpgather.__version__} (Python {platform.python_version()}, {sys.executable})"]
    lines.append("planner:      built (dpgather.core imports)")
    gpus = gpu_count()
    cupy = None
    if missing("cupy"):
        lines.append("backend auto: host (CuPy is not installed)")
        lines.append("devices:      CPU only")
    else:
        import warnings

        warnings.filterwarnings("ignore", module="cupy")
        try:
            import cupy
        except Exception as e:  # CuPy installed but broken (e.g. it needs ml_dtypes, which is missing)
            lines.append(f"backend auto: host (CuPy is installed but fails to import: "
                         f"{type(e).__name__}: {' '.join(str(e).split())})")
            lines.append("devices:      CPU only (without CuPy)")
    if cupy is not None:
        lines.append(f"backend auto: {'cuda' if gpus else 'host'} (CuPy {cupy.__version__} sees {gpus} GPU(s))")
        names = []
        for i in range(gpus):
            try:
                props = cupy.cuda.runtime.getDeviceProperties(i)
                nm = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
                names.append(f"{i}: {nm}, {props['totalGlobalMem'] / 2**30:.0f} GiB")
            except Exception as e:  # pragma: no cover - driver trouble
                names.append(f"{i}: ? ({e})")
        lines.append("devices:      " + ("; ".join(names) if names else "CPU only"))
        try:
            from cupy.cuda import nccl

            if not getattr(nccl, "available", True) or not hasattr(nccl, "get_version"):
                raise ImportError("CuPy cannot load libnccl.so.2")
            v = nccl.get_version()
            lines.append(f"NCCL:         {v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else f"NCCL:         {v}")
        except Exception as e:
            lines.append(f"NCCL:         not available ({e}; pip install nvidia-nccl-cu12)")
    if missing("mpi4py"):
        lines.append(f"MPI:          mpi4py is not installed ({PIP['mpi4py']})")
    else:
        try:
            import mpi4py

            mpi4py.rc.initialize = False
            mpi4py.rc.finalize = False
            from mpi4py import MPI

            lib = MPI.Get_library_version().strip().splitlines()[0]
            lines.append(f"MPI:          {lib} (mpi4py {mpi4py.__version__}, MPI {'.'.join(map(str, MPI.Get_version()))})")
        except Exception as e:
            lines.append(f"MPI:          mpi4py cannot load an MPI library ({' '.join(str(e).split())}; "
                         f"{PIP['mpi4py']})")
    mx = detect()
    lines.append(f"mpiexec:      {mx.path + ' (' + mx.label + ')' if mx else 'not found'}")
    for mod in ("numpy", "numba", "ml_dtypes", "matplotlib", "tqdm"):
        if missing(mod):
            lines.append(f"{mod + ':':13s} missing ({PIP.get(mod, 'pip install ' + mod)})")
        else:
            try:
                from importlib.metadata import version

                lines.append(f"{mod + ':':13s} {version(mod)}")
            except Exception:
                lines.append(f"{mod + ':':13s} available")
    print("\n".join(lines))
    return 0


def _cmd_bench(ns, extra):
    """``dpgather bench``: the GPU collective benchmark, a repository script."""
    script = _REPO / "bench" / "collective_bench.py"
    if not script.is_file():
        return say_error("dpgather bench", "the collective benchmark is bench/collective_bench.py "
                         "of the dpgather repository, not part of the installed package; run it "
                         "from a checkout (make bench)")
    from dpgather.core import DpGatherError

    try:
        require("dpgather bench", "mpi4py")  # before any rank starts
    except DpGatherError as e:
        return say_error("dpgather bench", e)
    gpus = gpu_count()
    if not gpus:
        return say_error("dpgather bench", "the collective benchmark needs GPUs (CuPy + NCCL) and "
                         "CuPy sees none here; `dpgather bench-sync --np 4` runs on CPUs")
    return _launch(ns.np or gpus, [str(script), *extra], ns.timeout)


def _cmd_bench_sync(ns, extra):
    """``dpgather bench-sync``: :mod:`dpgather.tools.sync_bench` under mpiexec."""
    from dpgather.core import DpGatherError

    try:
        require("dpgather bench-sync", "mpi4py", "numba")  # before any rank starts
    except DpGatherError as e:
        return say_error("dpgather bench-sync", e)
    return _launch(ns.np, ["-m", "dpgather.tools.sync_bench", *extra], ns.timeout)


def _cmd_calibrate(ns, extra):
    """``dpgather calibrate``: :func:`dpgather.tools.calibrate.main` in this process (run it
    under mpirun, one rank per GPU)."""
    from .calibrate import main as calibrate_main

    return calibrate_main(list(extra), prog="dpgather calibrate")


# -- parser -------------------------------------------------------------------------------------

_FMT = argparse.RawDescriptionHelpFormatter


def _add_run(sub):
    r = sub.add_parser(
        "run", help="what `make run` does: launch a verified replay of the built-in trace under mpiexec",
        formatter_class=_FMT, allow_abbrev=False,
        description="Launch `mpiexec -n NP python -m dpgather.tools.cli replay --synthetic mixed --verify "
                    "--out runs/<timestamp>`\nwith one-box MPI settings and a time limit. On a GPU node "
                    "NP is the number of GPUs and the\nbackend is CUDA. Any other flag is passed to "
                    "`replay` (e.g. --policy varlen --steps 50).",
        epilog="example:\n  dpgather run --np 4\n  dpgather run --np 2 --attn-tp 2 --synthetic eagle")
    r.add_argument("--np", type=positive_int, help="number of ranks (default: 4; GPUs on a GPU node)")
    r.add_argument("--out", metavar="DIR", help="output folder (default: runs/<timestamp>)")
    r.add_argument("--timeout", type=positive_float, default=600.0, metavar="S",
                   help="stop the run after S seconds and exit 124, under every MPI (default: %(default)g)")
    return r


def _add_replay(sub):
    from .replay import DTYPES, POLICIES

    rp = sub.add_parser(
        "replay", help="replay a trace step by step through the data plane (run under mpirun)",
        formatter_class=_FMT,
        description="Every rank syncs, plans, gathers its replica's rows, runs a stand-in TP MLP, "
                    "combines with\nscatter(reduce=True) and the LM-head rows with gather_logits / "
                    "scatter_logits.\nWith --verify every row is checked against a NumPy reference. "
                    "Rank 0 prints a table\nper policy next to SGLang's sizes before and after #8277, "
                    "and --out writes report.json and plots.",
        epilog="examples:\n  mpirun -n 4 dpgather replay --synthetic mixed --verify --out runs/demo\n"
               "  mpirun -n 8 dpgather replay --trace t.jsonl --attn-tp 2 --policy auto,varlen\n"
               "  dpgather replay --synthetic eagle --steps 20     # one process: T=1, no communication")
    _add_trace_args(rp, "mixed")
    rp.add_argument("--hidden", type=positive_int,
                    help="hidden size H (default: 256 on host, 2048 on cuda; 7168 = DeepSeek-V3)")
    rp.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), metavar="DTYPE",
                    help=f"row dtype: {', '.join(DTYPES)} (default: %(default)s)")
    rp.add_argument("--policy", default="all",
                    help=f"{', '.join(POLICIES)}, a comma-separated list, or 'all' (default)")
    rp.add_argument("--backend", default="auto", choices=["auto", "host", "cuda"], help="(default: auto)")
    rp.add_argument("--verify", action="store_true", help="check every row against a NumPy reference")
    rp.add_argument("--out", metavar="DIR",
                    help="write report.json and memory.png, rows.png, time.png in this folder")
    rp.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                    help="progress bar on rank 0 (auto: when stderr is a terminal; needs tqdm)")
    rp.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                    help="timeout_s of every collective, > 0 (default: %(default)g)")
    rp.add_argument("--mlp-row-us", type=nonneg_float, default=0.3, metavar="US",
                    help="predicted MLP time of one padding row, for the auto policy's cost model "
                         "(default: %(default)s, a dense TP MLP at DeepSeek-V3 / Llama-70B scale on "
                         "H100; 0 for an MoE that masks padding rows)")
    return rp


def _add_plans(sub):
    from .replay import DTYPES, POLICIES
    from .traces import GENERATORS

    pl = sub.add_parser(
        "plans", help="print the plans of a short multi-replica scenario (no MPI needed)",
        formatter_class=_FMT,
        description="Plan each step of a built-in scenario (or a trace) with dg.plan, as `dpgather "
                    "replay` plans it\n(the same buckets, cost model, row width and transport), and print "
                    "the layouts: per-replica modes,\ncounts, padding mode, transport, gathered rows, graph "
                    "bucket; SGLang's choice alongside.",
        epilog="examples:\n  dpgather plans\n  dpgather plans --policy all --attn-tp 2\n"
               "  dpgather plans --synthetic prefill-burst --steps 10\n"
               "  dpgather plans --synthetic prefill-burst --hidden 7168 --fp8 128")
    src = pl.add_mutually_exclusive_group()
    src.add_argument("--trace", metavar="FILE", help="plan a JSON Lines trace instead")
    src.add_argument("--synthetic", metavar="NAME", choices=sorted(GENERATORS),
                     help=f"plan a synthetic trace: {', '.join(sorted(GENERATORS))}")
    pl.add_argument("--steps", type=positive_int, help="only the first N steps")
    pl.add_argument("--seed", type=nonneg_int, default=0)
    pl.add_argument("--dp", type=positive_int, default=4, help="replicas of the scenario (default: 4)")
    pl.add_argument("--attn-tp", type=positive_int, default=1, metavar="A")
    pl.add_argument("--policy", default="auto", choices=[*POLICIES, "all"])
    pl.add_argument("--graph-buckets", default="default", metavar="LIST")
    pl.add_argument("--mlp-row-us", type=nonneg_float, default=0.3, metavar="US",
                    help="MLP time of one padding row in the auto policy's cost model (default: %(default)s)")
    pl.add_argument("--hidden", type=positive_int, metavar="H",
                    help="row width the cost model prices, as `replay --hidden` (default: 256, or 2048 "
                         "where CuPy sees a GPU: replay's default)")
    pl.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), metavar="DTYPE",
                    help="row dtype, as `replay --dtype` (default: %(default)s)")
    pl.add_argument("--transport", default="auto", choices=("auto", "nccl", "p2p"),
                    help="auto (default): both P2P transports run, as replay's DpAttention gets them on "
                         "one machine (the host twins on CPUs; CUDA P2P with peer access); p2p: the "
                         "pull only; nccl: neither")
    pl.add_argument("--fp8", type=positive_int, metavar="GROUP",
                    help="price the hidden-state gather as DpAttention(fp8=Fp8Format(group_size=GROUP)) "
                         "does: rows of H + 4*H/GROUP bytes on the wire plus the quantize pass (the "
                         "combine and the logits gather keep H x dtype bytes); GROUP must divide --hidden "
                         "(default: unquantized)")
    pl.add_argument("--json", action="store_true", help="one JSON object per step: every policy's plan.as_dict()")
    return pl


def _add_others(sub):
    """``info``, ``bench``, ``bench-sync`` and ``calibrate`` (whose options are its own)."""
    sub.add_parser("info", help="backend, devices, MPI / NCCL versions, optional packages",
                   description="What `backend='auto'` would pick here, the devices, the MPI library, "
                               "NCCL (when CuPy has it) and the optional packages.")

    b = sub.add_parser("bench", help="collective benchmarks on GPUs (bench/collective_bench.py, "
                                     "from a repository checkout)",
                       description="Launch bench/collective_bench.py of the repository with one rank "
                                   "per GPU; extra flags go to the script.")
    b.add_argument("--np", type=positive_int, help="ranks (default: number of GPUs)")
    b.add_argument("--timeout", type=positive_float, default=600.0, metavar="S")

    bs = sub.add_parser("bench-sync", help="per-step sync latency under mpiexec (dpgather.tools.sync_bench)",
                        description="Launch `python -m dpgather.tools.sync_bench` under mpiexec -n NP; "
                                    "extra flags go to it (--iters, --warmup, --attn-tp, --policy, --json).",
                        epilog="example:\n  dpgather bench-sync --np 4 --iters 500", formatter_class=_FMT)
    bs.add_argument("--np", type=positive_int, default=2, help="ranks (default: 2)")
    bs.add_argument("--timeout", type=positive_float, default=300.0, metavar="S")

    cal = sub.add_parser("calibrate", add_help=False,
                   help="measure the cost model's constants on this machine's GPUs",
                   description="Measure the cost model constants of policy='auto' and write them as "
                               "JSON. Run under mpirun with one rank per GPU: `mpirun -n 4 dpgather "
                               "calibrate --out cost.json`; load with dpgather.CostModel.load(path). "
                               "`dpgather calibrate --help` lists its options.")
    return {"info": sub.choices["info"], "bench": b, "bench-sync": bs, "calibrate": cal}


def build_parser():
    """The ``dpgather`` argument parser (help and errors on rank 0 only, errors on one line)."""
    import dpgather

    p = Parser(
        prog="dpgather",
        description="dpgather: exact, fast gathered buffers for data-parallel attention inference.\n"
                    "Replay serving traces through the data plane, inspect plans, benchmark.",
        epilog=_EPILOG, formatter_class=_FMT)
    p.add_argument("--version", action="version", version=f"dpgather {dpgather.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    p.commands = {"run": _add_run(sub), "replay": _add_replay(sub), "plans": _add_plans(sub), **_add_others(sub)}
    return p


_PASSTHROUGH = {"run", "bench", "bench-sync", "calibrate"}


def _quiet_stdout():
    """Point fd 1 at /dev/null, so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv=None):
    """Entry point of the ``dpgather`` console script and ``python -m dpgather``; returns the
    exit code (see the module docstring)."""
    try:
        rc = _main(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:  # the reader went away (`dpgather plans | head`): nothing to report
        _quiet_stdout()
        return EXIT_OK


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    if extra and ns.command not in _PASSTHROUGH:
        parser.commands[ns.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if extra and extra[0] == "--":
        extra = extra[1:]
    if ns.command == "run":
        return _cmd_run(ns, extra)
    if ns.command == "replay":
        return _cmd_replay(ns)
    if ns.command == "plans":
        return _cmd_plans(ns)
    if ns.command == "info":
        return _cmd_info(ns)
    if ns.command == "bench":
        return _cmd_bench(ns, extra)
    if ns.command == "bench-sync":
        return _cmd_bench_sync(ns, extra)
    if ns.command == "calibrate":
        return _cmd_calibrate(ns, extra)
    parser.error(f"unknown command {ns.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
