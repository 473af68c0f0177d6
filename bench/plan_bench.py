"""Planner latency: ``dg.plan()``, ``Planner.plan_batches()``, ``Planner.plan_table()`` beside the
pure-Python reference planner (``tests/reference_planner.py``), per DP size.

Each number is the median over blocks of the mean time per call inside a block; blocks repeat until
at least ``--min-time`` seconds (default 0.2) have been spent on that entry point. Batches: A=1,
policy ``auto``, a realistic mix per step (decode replicas of assorted sizes, some idle, one
extend). ``plan_table (P2P)`` is the same table on a planner with both P2P transports priced (pull
windows of 4096 rows per replica, push windows of 256), as ``DpAttention`` plans on a GPU node.
Targets: ``plan_table()`` <= 5 us at D=8, with and without the P2P transports; ``plan()`` >= 20x
faster than the reference.

    python bench/plan_bench.py [--dp 1,2,4,8,16,64] [--min-time 0.2] [--json PATH]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import dpgather as dg
from dpgather.core.files import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference_planner as ref  # noqa: E402

TARGET_TABLE_US_AT_8 = 5.0
TARGET_SPEEDUP = 20.0


def mixed_batches(D):
    """Replica 0 prefills, every fourth replica from 3 on is idle, the rest decode 1..128."""
    out = []
    for d in range(D):
        if d == 0 and D > 1:
            out.append(dg.LocalBatch(dg.ForwardMode.EXTEND, 4, 3000))
        elif d % 4 == 3:
            out.append(dg.LocalBatch(dg.ForwardMode.IDLE))
        else:
            out.append(dg.LocalBatch(dg.ForwardMode.DECODE, 1 + (37 * d) % 128, can_run_graph=True))
    if D == 1:
        out = [dg.LocalBatch(dg.ForwardMode.DECODE, 48, can_run_graph=True)]
    return out


def time_us(fn, min_time, block=None):
    """Median over blocks of the per-call mean (microseconds)."""
    fn()  # warm up (caches, lazy views)
    if block is None:
        block, t = 1, 0
        while t < 200_000:  # ~0.2 ms per block: short enough to dodge most preemptions
            t0 = time.perf_counter_ns()
            for _ in range(block):
                fn()
            t = time.perf_counter_ns() - t0
            if t < 200_000:
                block *= 2
    means, spent = [], 0
    while spent < min_time * 1e9 or len(means) < 21:
        t0 = time.perf_counter_ns()
        for _ in range(block):
            fn()
        dt = time.perf_counter_ns() - t0
        spent += dt
        means.append(dt / block / 1e3)
    return statistics.median(means)


def bench(dps, min_time):
    rows = []
    for D in dps:
        topo = dg.Topology(D, 1)
        batches = mixed_batches(D)
        planner = dg.Planner(topo, policy="auto")
        table = np.stack([planner.record(b) for b in batches]).astype(np.int32)
        tuples = [(int(b.mode), b.batch_size, b.extend_tokens, b.logprob_tokens, b.can_run_graph)
                  for b in batches]
        # the entry points agree with each other and with the reference before we time them
        p = dg.plan(batches, topo)
        assert p == planner.plan_batches(batches) == planner.plan_table(table)
        r = ref.plan(tuples, D, 1, policy="auto")
        assert p.fingerprint == r["fingerprint"] and p.mode == r["mode"]

        t_plan = time_us(lambda: dg.plan(batches, topo), min_time)
        t_batches = time_us(lambda: planner.plan_batches(batches), min_time)
        t_table = time_us(lambda: planner.plan_table(table), min_time)
        p2p = dg.Planner(topo, policy="auto", p2p_rows=4096 * D, push_rows=256)
        assert p2p.plan_table(table) == dg.plan(batches, topo, p2p_rows=4096 * D, push_rows=256)
        t_table_p2p = time_us(lambda: p2p.plan_table(table), min_time)
        t_ref = time_us(lambda: ref.plan(tuples, D, 1, policy="auto"), min_time)
        rows.append({
            "D": D, "mode": p.mode.name, "plan_us": t_plan, "plan_batches_us": t_batches,
            "plan_table_us": t_table, "plan_table_p2p_us": t_table_p2p, "reference_us": t_ref,
            "speedup": t_ref / t_plan,
        })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", default="1,2,4,8,16,64", help="comma-separated DP sizes (A=1)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    dps = [int(x) for x in args.dp.split(",") if x]
    rows = bench(dps, args.min_time)

    print(f"# dpgather planner latency, policy=auto, A=1; python {platform.python_version()}, "
          f"numpy {np.__version__}, {platform.machine()}")
    print("# median over >=%.2fs of per-block means, microseconds per call" % args.min_time)
    print(f"# {'D':>4} {'mode':>8} {'plan()':>10} {'plan_batches':>13} {'plan_table':>11} "
          f"{'plan_table (P2P)':>17} {'reference':>10} {'speedup':>8}")
    for r in rows:
        print(f"  {r['D']:>4} {r['mode']:>8} {r['plan_us']:>10.2f} {r['plan_batches_us']:>13.2f} "
              f"{r['plan_table_us']:>11.2f} {r['plan_table_p2p_us']:>17.2f} {r['reference_us']:>10.2f} "
              f"{r['speedup']:>7.1f}x")
    checks = []
    at8 = [r for r in rows if r["D"] == 8]
    if at8:
        for key, what in (("plan_table_us", ""), ("plan_table_p2p_us", " with the P2P transports")):
            checks.append({"target": f"plan_table(){what} <= {TARGET_TABLE_US_AT_8} us at D=8",
                           "value": at8[0][key], "ok": at8[0][key] <= TARGET_TABLE_US_AT_8})
    worst = min(rows, key=lambda r: r["speedup"])
    checks.append({"target": f"plan() >= {TARGET_SPEEDUP:g}x faster than the reference",
                   "value": worst["speedup"], "at_D": worst["D"],
                   "ok": worst["speedup"] >= TARGET_SPEEDUP})
    for c in checks:
        print(f"# target {c['target']}: {c['value']:.2f}{'' if 'us' in c['target'] else 'x'}"
              f"{' (worst, D=%d)' % c['at_D'] if 'at_D' in c else ''} -> "
              f"{'met' if c['ok'] else 'MISSED'}")
    if args.json:
        write_json_atomic(args.json, {"rows": rows, "targets": checks, "python": platform.python_version(),
                                      "numpy": np.__version__, "min_time_s": args.min_time}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
