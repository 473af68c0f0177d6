"""Per-step sync latency: dpgather's record all-gather + Cython plan vs the pickled-dict baseline.

    mpiexec -n T python bench/sync_bench.py [--iters 2000] [--warmup 200] [--attn-tp A]
                                            [--policy sglang] [--json PATH]

Each step every rank (a) encodes its replica's batch as an int32 record
(``Planner.record(batch, out=)``), all-gathers the records with
``MpiHostCommunicator.allgather_record`` and plans with ``Planner.plan_table``; and (b) does what
engines do today: a pickled ``comm.allgather(dict)`` of per-replica metadata followed by a
pure-Python plan (SGLang's rule: counts aligned to A; SUM_LEN if any replica extends and D > 1,
else MAX_LEN if ``2*sum >= max*D``, else SUM_LEN; then offset lists). Both run on the same batches,
alternating step by step, each after a barrier; the time of a step is the maximum over ranks
(the step is synced when the slowest rank has its plan). Rank 0 prints p50/p99 in an nccl-tests
style table. When ``dpgather.core.Planner`` cannot be imported, (a) times the record all-gather
alone and the header says so. With ``--policy sglang`` every step's plan is also compared with the
baseline's (mode, slot offsets, gathered rows): ``#wrong`` counts mismatching steps.
"""

import argparse
import json
import platform
import sys
import time

import numpy as np
from mpi4py import MPI

RECORD_WIDTH = 8
IDLE, DECODE, EXTEND = 0, 1, 2  # baseline's own mode codes (its dicts carry them)


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


# -- (a) ours -------------------------------------------------------------------------------------

def load_ours(world_size, attn_tp, policy):
    """(Planner, LocalBatch factory, note) or (None, None, reason) when the planner is missing."""
    try:
        from dpgather.core import ForwardMode, LocalBatch, Planner, Topology
    except ImportError as e:
        return None, None, f"dpgather.core.Planner not importable ({e}): timing the record all-gather alone"
    planner = Planner(Topology(world_size, attn_tp), policy=policy)

    def factory(mode_name, bs, ext):
        mode = getattr(ForwardMode, mode_name)
        if mode_name == "EXTEND":
            return LocalBatch(mode, batch_size=bs, extend_tokens=ext)
        return LocalBatch(mode, batch_size=bs, can_run_graph=mode_name == "DECODE")

    return planner, factory, "Planner.record + allgather_record + Planner.plan_table"


def percentiles(us):
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="timed steps (default 2000)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed steps first (default 200)")
    ap.add_argument("--attn-tp", type=int, default=1, help="attn_tp_size A (default 1)")
    ap.add_argument("--policy", default="sglang", help="planner policy (default sglang: checkable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    args = ap.parse_args(argv)

    from dpgather.dist import MpiHostCommunicator

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    if args.attn_tp < 1 or size % args.attn_tp:
        if rank == 0:
            print(f"--attn-tp {args.attn_tp} must divide the world size {size}", file=sys.stderr)
        return 2
    A, D = args.attn_tp, size // args.attn_tp
    comm = MpiHostCommunicator(world, timeout_s=60.0)
    planner, factory, what = load_ours(size, A, args.policy)

    cycle = 256
    my_rep = rank // A
    steps = make_batches(cycle, D, args.seed)
    infos = [baseline_info(*s[my_rep]) for s in steps]
    table = np.zeros((size, RECORD_WIDTH), dtype=np.int32)
    rec = np.zeros(RECORD_WIDTH, dtype=np.int32)
    if planner is not None:
        batches = [factory(*s[my_rep]) for s in steps]
        records = None
    else:
        batches = None
        records = [np.full(RECORD_WIDTH, i, dtype=np.int32) for i in range(cycle)]
    check = planner is not None and args.policy == "sglang"

    total = args.warmup + args.iters
    ours = np.empty(args.iters)
    base = np.empty(args.iters)
    wrong = 0
    pc = time.perf_counter_ns
    barrier = world.Barrier
    for it in range(total):
        k = it % cycle
        barrier()
        t0 = pc()
        if planner is not None:
            planner.record(batches[k], out=rec)
            comm.allgather_record(rec, table)
            plan = planner.plan_table(table)
        else:
            comm.allgather_record(records[k], table)
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

    # a step is synced when the slowest rank is done: max over ranks, per step
    ours_max = np.empty_like(ours)
    base_max = np.empty_like(base)
    world.Allreduce(ours, ours_max, op=MPI.MAX)
    world.Allreduce(base, base_max, op=MPI.MAX)
    wrong = world.allreduce(wrong, op=MPI.SUM)
    comm.close()
    if rank != 0:
        return 0

    p50, p99 = percentiles(ours_max)
    b50, b99 = percentiles(base_max)
    lib = MPI.Get_library_version().splitlines()[0].strip()
    print(f"# dpgather per-step sync bench: {what}")
    print("# baseline: pickled comm.allgather(dict) + pure-Python SGLang plan")
    print(f"# iters {args.iters} (warm-up {args.warmup}), attn_tp {A}, dp {D}, policy {args.policy}, "
          "time per step = max over ranks")
    print(f"# {lib}; {platform.node()}; python {platform.python_version()}")
    print("#")
    hdr = ("ranks", "dp", "p50(us)", "p99(us)", "base_p50(us)", "base_p99(us)", "speedup_p50", "speedup_p99", "#wrong")
    print("# " + " ".join(f"{h:>12}" for h in hdr))
    wrong_s = str(wrong) if check else "n/a"
    row = (size, D, f"{p50:.2f}", f"{p99:.2f}", f"{b50:.2f}", f"{b99:.2f}", f"{b50 / p50:.2f}x",
           f"{b99 / p99:.2f}x", wrong_s)
    print("  " + " ".join(f"{v:>12}" for v in row))
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
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
