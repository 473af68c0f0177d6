"""Issue 26's failure paths under MPI: ``mpiexec -n T python failpath_scenarios.py PART [--transport X]``.

The faulty rank is the last one, F = T - 1. Every rank reports one JSON object through
``mpi_harness.report``; tests/test_reliability.py asserts on those objects. Parts:

  runner      ``GraphRunner.run`` given a bad ``plan`` on F -- ``None``, a list, another step's
              (stale) plan, a ``dg.plan()`` plan with another fingerprint (item 1) -- and ``fn(G)``
              returning a bad array on F (item 3: on the host backend ``fn`` runs at every
              replay): F raises InputError at the call, the others' call returns, every rank
              raises InputError at the next ``sync()`` naming F, nobody is aborted, the next step
              is right. For every attn_tp size A dividing T.
  overlapped  the overlapped runner (``micro_batches=2``) given a one-element plan list on F
              (item 2), and ``DpAttention(micro_batches=2)`` with a ``None`` plan on F while the
              others gather micro-batch 0 after syncing 0 then 1 (item 5): the same outcome.
  cycles      ``--cycles N`` times: construct a DpAttention, run one checked step, close it
              (item 4: close() frees every communicator construction made; MPICH runs out of
              context ids after ~2046 leaked ones).
"""

import argparse
import time
import traceback
import zlib

import numpy as np
from mpi4py import MPI

import dpgather as dg
from mpi_harness import report

WORLD = MPI.COMM_WORLD
R, T = WORLD.Get_rank(), WORLD.Get_size()
F = T - 1
FM = dg.ForwardMode
H = 8
ARGS = None
FAILS = []
RAN = []


def ok(cond, msg):
    if not cond:
        FAILS.append(msg)
    return bool(cond)


def rows(tag, n):
    g = np.random.default_rng(zlib.crc32(repr(tag).encode()))
    return g.integers(-8, 9, size=(n, H)).astype(np.float32)


def make(A=1, **kw):
    kw.setdefault("transport", ARGS.transport or "auto")
    return dg.DpAttention(WORLD, attn_tp_size=A, hidden_size=H, dtype="float32", backend="host",
                          timeout_s=ARGS.timeout, **kw)


def attempt(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return None, e


def failed_call(name, dp, bad, good, must):
    """F runs ``bad`` (an InputError naming ``must``), the others ``good`` (returns); then every
    rank's next sync() raises InputError naming F, and nobody was aborted."""
    value, err = attempt(bad if R == F else good)
    if R == F:
        ok(isinstance(err, dg.InputError) and all(s in str(err) for s in must),
           f"{name}: F's call ended with {type(err).__name__}: {err} (expected InputError naming {must})")
    else:
        ok(err is None, f"{name}: a valid call raised {type(err).__name__}: {err}")
    _, err = attempt(lambda: dp.sync(dg.LocalBatch(FM.DECODE, 2)))
    ok(isinstance(err, dg.InputError) and f"[{F}]" in str(err),
       f"{name}: the next sync() ended with {type(err).__name__}: {err} (expected InputError naming rank {F})")
    RAN.append(name)


def graph_step(dp, runner, tag):
    """A valid graph step through ``runner`` (fn = identity): every rank's own rows come back
    summed over the T ranks."""
    d = dp.dp_rank
    p = dp.sync(dg.LocalBatch(FM.DECODE, 1 + d, can_run_graph=True))
    x = rows((tag, d), 1 + d)
    y = runner.run(x, p)
    ok(np.array_equal(y[:1 + d], T * x), f"{tag}: graph step rows differ from T * x")


def part_runner():
    for A in [a for a in range(1, T + 1) if T % a == 0]:
        dp = make(A, policy="varlen", graph_buckets=(A * (T + 4),))
        d = dp.dp_rank
        runner = dp.graph_runner(lambda G: G)
        bad_fn = dp.graph_runner(lambda G: G.astype(np.float64) if R == F else G)
        short_fn = dp.graph_runner(lambda G: G[:1] if R == F else G)
        graph_step(dp, runner, ("start", A))
        stale = dp.sync(dg.LocalBatch(FM.DECODE, 1 + d, can_run_graph=True))
        runner.run(rows(("stale", A, d), 1 + d), stale)
        other = dg.plan([dg.LocalBatch(FM.DECODE, 3, can_run_graph=True)] * dp.topology.dp_size, dp.topology,
                        graph_buckets=(A * (T + 4),))
        for label, bad_plan in (("None", None), ("a list", "list"), ("a stale plan", stale),
                                ("a dg.plan() plan of another layout", other)):
            p = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d, can_run_graph=True))
            x = rows((label, A, d), 2 + d)
            plan_f = [p] if bad_plan == "list" else bad_plan
            failed_call(f"A={A} GraphRunner.run(plan={label})", dp, lambda: runner.run(x, plan_f),
                        lambda: runner.run(x, p), ("plan",))
            graph_step(dp, runner, (label, A))
        for label, r in (("fn(G) returning float64", bad_fn), ("fn(G) returning 1 row", short_fn)):
            p = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d, can_run_graph=True))
            x = rows((label, A, d), 2 + d)
            failed_call(f"A={A} {label}", dp, lambda: r.run(x, p), lambda: r.run(x, p), ("fn(G)",))
            graph_step(dp, runner, (label, A))
        ok(dp.info()["world_size"] == T, "info() after the failures")
        dp.close()


def part_overlapped():
    for A in [a for a in range(1, T + 1) if T % a == 0]:
        dp = make(A, policy="varlen", graph_buckets=(A * (T + 4),), micro_batches=2)
        d = dp.dp_rank
        r2 = dp.graph_runner(lambda G: G, micro_batches=2)
        for step in range(2):
            ps = [dp.sync(dg.LocalBatch(FM.DECODE, 1 + d + i, can_run_graph=True), micro_batch=i) for i in (0, 1)]
            xs = [rows(("ov", A, step, i, d), 1 + d + i) for i in (0, 1)]
            if step == 0:
                failed_call(f"A={A} overlapped run with one plan", dp, lambda: r2.run(xs, ps[:1]),
                            lambda: r2.run(xs, ps), ("plan", "list of 2"))
                continue
            ys = r2.run(xs, ps)
            ok(all(np.array_equal(ys[i][:1 + d + i], T * xs[i]) for i in (0, 1)), f"A={A}: overlapped rows")
        for label, bad in (("None", None), ("a list", "list")):
            ps = [dp.sync(dg.LocalBatch(FM.DECODE, 1 + d + i), micro_batch=i) for i in (0, 1)]
            x0 = rows(("mb", A, d), 1 + d)
            plan_f = [ps[0]] if bad == "list" else bad
            failed_call(f"A={A} gather(plan={label}) while the peers gather micro-batch 0", dp,
                        lambda: dp.gather(x0, plan_f), lambda: dp.gather(x0, ps[0]), ("plan",))
            ps = [dp.sync(dg.LocalBatch(FM.DECODE, 1 + d + i), micro_batch=i) for i in (0, 1)]
            for i in (0, 1):
                x = rows(("after", A, i, d), 1 + d + i)
                G = dp.gather(x, ps[i])
                off = ps[i].slot_offsets
                ok(np.array_equal(G[off[d]:off[d] + 1 + d + i], x), f"A={A}: micro-batch {i} after the failure")
        dp.close()


def part_cycles():
    t0 = time.monotonic()
    for c in range(ARGS.cycles):
        dp = make(policy="varlen")
        d = dp.dp_rank
        p = dp.sync(dg.LocalBatch(FM.DECODE, 1 + d % 2))
        x = rows(("cycle", d), 1 + d % 2)
        G = dp.gather(x, p)
        off = p.slot_offsets
        if not ok(np.array_equal(G[off[d]:off[d] + 1 + d % 2], x), f"cycle {c}: gathered rows differ"):
            break
        dp.close()
    RAN.append(f"{ARGS.cycles} cycles in {time.monotonic() - t0:.1f} s")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("runner", "overlapped", "cycles"))
    ap.add_argument("--timeout", type=float, default=5.0, help="DpAttention timeout_s")
    ap.add_argument("--transport", default="", help="DpAttention transport (default: its default)")
    ap.add_argument("--cycles", type=int, default=10000, help="cycles: construct/use/close cycles")
    ARGS = ap.parse_args()
    try:
        {"runner": part_runner, "overlapped": part_overlapped, "cycles": part_cycles}[ARGS.part]()
    except Exception:  # noqa: BLE001 - reported; the test asserts on it
        FAILS.append(f"unexpected error:\n{traceback.format_exc()}")
    report(R, failures=FAILS[:40], nfailures=len(FAILS), ran=RAN)


if __name__ == "__main__":
    main()
