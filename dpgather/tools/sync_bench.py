"""Per-step sync latency: dpgather's record all-gather + Cython plan vs the pickled-dict baseline.

    mpiexec -n T python -m dpgather.tools.sync_bench [--iters 2000] [--warmup 200] [--attn-tp A]
                                                     [--policy sglang] [--json PATH]

(``dpgather bench-sync --np T`` launches it; ``bench/sync_bench.py`` is the same program.)

Each step every rank (a) calls ``DpAttention.sync(batch)`` on the host backend — the product's
whole per-step sync: the record (the planner's fields and the step's control fields), the one
host exchange (shared memory on one node), the checks of the control fields, ``plan_table`` and
the step's layout and descriptor; and (b) does what
engines do today: a pickled ``comm.allgather(dict)`` of per-replica metadata followed by a
pure-Python plan (SGLang's rule: counts aligned to A; SUM_LEN if any replica extends and D > 1,
else MAX_LEN if ``2*sum >= max*D``, else SUM_LEN; then offset lists). Both run on the same batches,
alternating step by step, each after a barrier; the time of a step is the maximum over ranks
(the step is synced when the slowest rank has its plan). Rank 0 prints p50/p99 in an nccl-tests
style table (:mod:`dpgather.tools.timing`). With ``--policy sglang`` (the default) every step's
plan is also compared with the baseline's (mode, slot offsets, gathered rows): ``#wrong`` counts
mismatching steps.

Needs mpi4py only (no GPU, no repository checkout). Exit codes: 0 ok, 1 a plan mismatched the
baseline, 2 invalid options or mpi4py missing.
"""

import platform
import sys
import time

import numpy as np

from dpgather.core import POLICIES, ForwardMode, LocalBatch
from dpgather.core.files import write_json_atomic

from ._common import (EXIT_OK, EXIT_VERIFY, Parser, nonneg_int, positive_int, require, require_mpi,
                      say_error)
from .timing import Column, format_table, percentile

__all__ = ["main", "make_batches", "baseline_info", "baseline_plan"]

IDLE, DECODE, EXTEND = 0, 1, 2  # baseline's own mode codes (its dicts carry them)
_CYCLE = 256                    # distinct batches, replayed in a loop
_PROG = "python -m dpgather.tools.sync_bench"


def make_batches(steps, dp_size, seed):
    """Deterministic per-(step, replica) batches: mostly decode, some prefill bursts, some idle.

    Returns a list over steps of lists over replicas of (mode_name, batch_size, extend_tokens).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        row = []
        for _ in range(dp_size):
            u = rng.random()
            if u < 0.10:
                row.append(("IDLE", 0, 0))
            elif u < 0.20:
                bs = int(rng.integers(1, 9))
                row.append(("EXTEND", bs, int(rng.integers(bs, 4097))))
            else:
                row.append(("DECODE", int(rng.integers(1, 257)), 0))
        out.append(row)
    return out


# -- (b) the baseline ---------------------------------------------------------------------------

def baseline_info(mode_name, bs, ext):
    """The per-replica dict an engine pickles today (token counts computed in Python)."""
    if mode_name == "IDLE":
        mode, n, logits = IDLE, 0, 0
    elif mode_name == "DECODE":
        mode, n, logits = DECODE, bs, bs
    else:
        mode, n, logits = EXTEND, ext, bs
    return {
        "forward_mode": mode,
        "batch_size": bs,
        "num_tokens": n,
        "logits_tokens": logits,
        "is_extend": mode == EXTEND,
        "can_run_graph": mode == DECODE,
    }


def baseline_plan(infos, attn_tp, dp_size):
    """SGLang's padding rule in pure Python, with the offset lists an engine builds."""
    reps = infos[::attn_tp]
    counts = [(i["num_tokens"] + attn_tp - 1) // attn_tp * attn_tp for i in reps]
    is_extend = any(i["is_extend"] for i in reps)
    mx, total = max(counts), sum(counts)
    if is_extend and dp_size > 1:
        mode = "SUM_LEN"
    elif 2 * total >= mx * dp_size:
        mode = "MAX_LEN"
    else:
        mode = "SUM_LEN"
    slot_rows = [mx] * dp_size if mode == "MAX_LEN" else counts
    offsets = [0]
    for r in slot_rows:
        offsets.append(offsets[-1] + r)
    logits = [i["logits_tokens"] for i in reps]
    logits_offsets = [0]
    for r in logits:
        logits_offsets.append(logits_offsets[-1] + r)
    return {
        "mode": mode, "num_tokens": counts, "slot_rows": slot_rows, "slot_offsets": offsets,
        "gathered_rows": offsets[-1], "logits_offsets": logits_offsets,
        "is_extend_in_batch": is_extend,
    }


def _batch(mode_name, bs, ext):
    mode = getattr(ForwardMode, mode_name)
    if mode_name == "EXTEND":
        return LocalBatch(mode, batch_size=bs, extend_tokens=ext)
    return LocalBatch(mode, batch_size=bs, can_run_graph=mode_name == "DECODE")


def build_parser(prog=_PROG):
    ap = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=positive_int, default=2000, help="timed steps (default 2000)")
    ap.add_argument("--warmup", type=nonneg_int, default=200, help="untimed steps first (default 200)")
    ap.add_argument("--attn-tp", type=positive_int, default=1, help="attn_tp_size A (default 1)")
    ap.add_argument("--policy", default="sglang", choices=sorted(POLICIES),
                    help="planner policy (default sglang: checkable against the baseline)")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    return ap


def _time_steps(world, dp, args, A, D):
    """Time ``args.warmup + args.iters`` syncs and as many baseline exchanges on every rank;
    returns ``(ours_us, baseline_us, wrong plans)``, this rank's samples of the timed iterations."""
    my_rep = world.rank // A
    steps = make_batches(_CYCLE, D, args.seed)
    infos = [baseline_info(*s[my_rep]) for s in steps]
    batches = [_batch(*s[my_rep]) for s in steps]
    check = args.policy == "sglang"
    ours = np.empty(args.iters)
    base = np.empty(args.iters)
    wrong = 0
    pc = time.perf_counter_ns
    barrier = world.Barrier
    for it in range(args.warmup + args.iters):
        k = it % _CYCLE
        barrier()
        t0 = pc()
        plan = dp.sync(batches[k])
        t1 = pc()
        barrier()
        t2 = pc()
        gathered = world.allgather(infos[k])
        bplan = baseline_plan(gathered, A, D)
        t3 = pc()
        if it >= args.warmup:
            ours[it - args.warmup] = (t1 - t0) / 1e3
            base[it - args.warmup] = (t3 - t2) / 1e3
        if check and (
            plan.mode.name != bplan["mode"]
            or plan.slot_offsets.tolist() != bplan["slot_offsets"]
            or plan.gathered_rows != bplan["gathered_rows"]
        ):
            wrong += 1
    return ours, base, wrong


def _report(MPI, args, prog, size, A, D, ours_max, base_max, wrong, transport):
    """Rank 0: the table and ``--json``; returns an exit code to use instead, or None."""
    check = args.policy == "sglang"
    p50, p99 = percentile(ours_max, 50), percentile(ours_max, 99)
    b50, b99 = percentile(base_max, 50), percentile(base_max, 99)
    lib = MPI.Get_library_version().splitlines()[0].strip()
    what = f"DpAttention.sync (host backend, per-step exchange over {transport})"
    print(f"# dpgather per-step sync bench: {what}")
    print("# baseline: pickled comm.allgather(dict) + pure-Python SGLang plan")
    print(f"# iters {args.iters} (warm-up {args.warmup}), attn_tp {A}, dp {D}, policy {args.policy}, "
          "time per step = max over ranks")
    print(f"# {lib}; {platform.node()}; python {platform.python_version()}")
    print("#")
    row = {"ranks": size, "dp": D, "p50": p50, "p99": p99, "b50": b50, "b99": b99,
           "s50": f"{b50 / p50:.2f}x", "s99": f"{b99 / p99:.2f}x", "wrong": wrong if check else None}
    cols = (Column("ranks", "ranks", "", "d", 6), Column("dp", "dp", "", "d", 4),
            Column("p50", "p50", "(us)", ".2f", 9), Column("p99", "p99", "(us)", ".2f", 9),
            Column("b50", "base_p50", "(us)", ".2f", 9), Column("b99", "base_p99", "(us)", ".2f", 9),
            Column("s50", "speedup_p50", ""), Column("s99", "speedup_p99", ""),
            Column("wrong", "#wrong", "", "d"))
    for line in format_table([row], cols):
        print(line)
    if check:
        print(f"# plans checked against the baseline: {'OK' if wrong == 0 else 'FAILED'}")
    sys.stdout.flush()
    if args.json:
        result = {
            "bench": "sync", "what": what, "ranks": size, "attn_tp": A, "dp": D, "policy": args.policy,
            "iters": args.iters, "warmup": args.warmup, "p50_us": p50, "p99_us": p99,
            "baseline_p50_us": b50, "baseline_p99_us": b99, "speedup_p50": b50 / p50,
            "speedup_p99": b99 / p99, "wrong": wrong if check else None, "mpi": lib,
            "host": platform.node(), "python": platform.python_version(),
        }
        try:
            write_json_atomic(args.json, result, indent=2)
        except OSError as e:
            return say_error(prog, f"cannot write {args.json}: {e.strerror or e}", rank0=True)
    return None


def main(argv=None, prog=_PROG):
    """Run the benchmark on every rank of ``MPI.COMM_WORLD``; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    try:
        require(prog, "mpi4py", "numba")  # DpAttention on the host backend
        MPI = require_mpi(prog)
    except Exception as e:  # BackendUnavailable
        return say_error(prog, e)
    from dpgather import DpAttention

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    if size % args.attn_tp:
        return say_error(prog, f"--attn-tp {args.attn_tp} must divide the number of ranks ({size})",
                         rank0=rank == 0)
    A, D = args.attn_tp, size // args.attn_tp
    dp = DpAttention(world, attn_tp_size=A, hidden_size=8, dtype="float32", backend="host",
                     policy=args.policy, timeout_s=60.0)
    ours, base, wrong = _time_steps(world, dp, args, A, D)
    # a step is synced when the slowest rank is done: max over ranks, per step
    ours_max = np.empty_like(ours)
    base_max = np.empty_like(base)
    world.Allreduce(ours, ours_max, op=MPI.MAX)
    world.Allreduce(base, base_max, op=MPI.MAX)
    wrong = world.allreduce(wrong, op=MPI.SUM)
    transport = dp.info()["sync"]
    dp.close()
    rc = EXIT_VERIFY if wrong else EXIT_OK
    if rank != 0:
        return rc
    failed = _report(MPI, args, prog, size, A, D, ours_max, base_max, wrong, transport)
    return rc if failed is None else failed


if __name__ == "__main__":
    sys.exit(main())
