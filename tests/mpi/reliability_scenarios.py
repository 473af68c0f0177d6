"""Reliability cases of issue 15 under MPI: ``mpiexec -n T python reliability_scenarios.py PART [--timeout S]``.

Valid at any T >= 2 (``step`` and ``data`` also at T = 1). The faulty or disagreeing rank is the
last one, F = T - 1. Every rank reports one JSON object through ``mpi_harness.report``;
tests/test_reliability.py asserts on those objects.

Parts:

  exit-badarg  F passes a wrong-dtype ``x`` to ``gather`` (strict=False) and does not catch the
               InputError: its interpreter exits through the traceback, the at-exit
               ``DpAttention.close()`` and MPI_Finalize -- no ``os._exit``. The others' gather
               returns (F issued the step's collectives with zero rows); their next step raises
               CollectiveTimeout. F reports from an ``atexit`` handler registered before dpgather's,
               so its report (``exited``) proves the at-exit close returned.
  exit-graph   the same with a wrong-dtype ``x`` to ``GraphRunner.run``. ``--attn-tp A`` for both.
  ctor-exit    F leaves before constructing its DpAttention (``sys.exit(0)`` at once, an ordinary
               exit through MPI_Finalize): the others get CollectiveTimeout from the constructor.
  ctor         two cases in one job. ``bad comm``: F passes ``comm="not-a-communicator"`` (ConfigError
               on F at once; CollectiveTimeout from the constructor on the others). ``late``: F
               constructs ``2 * timeout + 3`` s after the others: the others get CollectiveTimeout
               within timeout_s (they do not wait for F), and F too (its peers left), no hang.
  step         ranks disagree on the step, for every divisor A of T: a plan of another step from
               ``dg.plan()`` on F (InputError on F at the call, on every rank at the next sync), the
               step's own plan rebuilt by ``dg.plan()`` (accepted: the same layout, rows exact), a
               stale plan, and mixed operations -- gather vs scatter, scatter vs gather, gather vs
               gather_logits, another contribution, another reduce: every rank raises
               InconsistentStepError or CollectiveTimeout at the call or at the next sync(); none
               returns from that sync(); nothing but dpgather errors; the aborted DpAttention
               refuses further use. ``--transport`` as for DpAttention.
  data         bad arguments on F only (strict=False), each followed by the next sync() on every
               rank and a verified valid step: ``mask_topk_ids(fill='x' | None | 1.5 | True)``,
               ``scatter(reduce='no')``, ``GraphRunner.run`` with a wrong-dtype ``x``; a valid but
               huge step (2**31 - 1 gathered rows of 256 KiB: no allocator takes it) raises
               InputError naming the size on every rank and the next step works; ``timeout_s=-1``
               on F raises the same ConfigError on every rank.

Between the cases of one job every rank meets in ``COMM_WORLD.Barrier()`` (test code, not
dpgather): after a timeout the ranks leave their aborted DpAttention up to a timeout apart, and the
next construction is bounded by timeout_s too.
"""

import atexit
import time

FAULT = {}  # what F reports from its at-exit handler (filled just before it raises)


def _report_at_exit():
    if FAULT:
        from mpi_harness import report

        report(FAULT.pop("rank"), exited=True, exit_s=time.monotonic() - FAULT["t_raise"], **FAULT)


# Registered before dpgather's own at-exit close (atexit runs handlers last-in first-out), so this
# runs after it: a report here means the at-exit close returned.
atexit.register(_report_at_exit)

import argparse  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import dpgather as dg  # noqa: E402
from mpi_harness import report  # noqa: E402
from scenario_kit import Checker  # noqa: E402

WORLD = MPI.COMM_WORLD
R, T = WORLD.Get_rank(), WORLD.Get_size()
F = T - 1
FM = dg.ForwardMode
H = 8
ARGS = None


def divisors(n):
    return [a for a in range(1, n + 1) if n % a == 0]


def rows(tag, n, width=H):
    """Deterministic small integers (exact in float32 sums): a function of ``tag``, the same on
    every rank."""
    g = np.random.default_rng(zlib.crc32(repr(tag).encode()))
    return g.integers(-8, 9, size=(n, width)).astype(np.float32)


def x_of(step, d, n):
    return rows(("x", step, d), n)


def attempt(fn, out=None):
    """(exception or None, seconds) of ``fn()``; its return value is appended to ``out``."""
    t0 = time.monotonic()
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return e, time.monotonic() - t0
    if out is not None:
        out.append(value)
    return None, time.monotonic() - t0


def cls(e):
    return None if e is None else type(e).__name__


CHK = Checker()


def make(A=1, **kw):
    kw.setdefault("hidden_size", H)
    kw.setdefault("dtype", "float32")
    kw.setdefault("backend", "host")
    kw.setdefault("timeout_s", ARGS.timeout)
    kw.setdefault("strict", False)
    if ARGS.transport:
        kw.setdefault("transport", ARGS.transport)
    return dg.DpAttention(WORLD, attn_tp_size=A, **kw)


# -- exit after an uncaught exception ------------------------------------------------------------

def part_exit(kind):
    graph = kind == "exit-graph"
    dp = make(ARGS.attn_tp, policy="varlen", graph_buckets=(4 * T,) if graph else ())
    runner = dp.graph_runner(lambda G: G) if graph else None
    batch = dg.LocalBatch(FM.DECODE, 3, can_run_graph=graph)
    x = x_of(0, R // ARGS.attn_tp, 3)

    def step(xx):
        plan = dp.sync(batch)
        if graph:
            return runner.run(xx, plan)
        G = dp.gather(xx, plan)
        return dp.scatter(G, plan)

    step(x)  # one good step: every rank is alive and agrees
    if R == F:
        report(R, role="fault", exited=False)
        try:
            step(x.astype(np.float64))
        except dg.DpGatherError as e:
            FAULT.update(rank=R, role="fault", error=cls(e), message=str(e), t_raise=time.monotonic())
            raise  # uncaught: the interpreter exits through the traceback and the at-exit close
        report(R, role="fault", exited=False, failures=["the bad call raised nothing"])
        return
    t0 = time.monotonic()
    err = None
    try:
        step(x)  # returns: F issued the step's collectives with zero rows before raising
        step(x)  # F is gone
        CHK.fail("no error although the last rank left")
    except Exception as e:  # noqa: BLE001 - reported
        err = e
    report(R, role="survivor", error=cls(err), message=str(err), elapsed=time.monotonic() - t0,
           failures=CHK.fails)


# -- construction ------------------------------------------------------------------------------------

def construct(**kw):
    """(error, seconds) of constructing (and closing) a DpAttention on every rank."""
    dp = []
    err, s = attempt(lambda: dp.append(make(**kw)))
    for d in dp:
        d.close()
    return err, s


def part_ctor_exit():
    if R == F:
        report(R, role="fault")
        sys.exit(0)  # an ordinary exit, through MPI_Finalize, without constructing
    err, s = construct()
    report(R, role="survivor", error=cls(err), message=str(err), elapsed=s)


def part_ctor():
    out = {}
    # bad comm on F: ConfigError there at once, CollectiveTimeout from the constructor elsewhere
    if R == F:
        err, s = attempt(lambda: dg.DpAttention("not-a-communicator", hidden_size=H, dtype="float32",
                                                backend="host", timeout_s=ARGS.timeout))
    else:
        err, s = construct()
    out["bad_comm"] = {"error": cls(err), "message": str(err), "elapsed": s}
    WORLD.Barrier()
    # F constructs 2 * timeout + 3 s after the others
    late = ARGS.timeout + 3.5  # past the others' timeout_s plus the tests' margin (3 s)
    if R == F:
        time.sleep(late)
    err, s = construct()
    out["late"] = {"error": cls(err), "message": str(err), "elapsed": s, "late_s": late if R == F else 0}
    WORLD.Barrier()  # the others wait here (inside MPI) until F's construction ended
    report(R, role="fault" if R == F else "survivor", **out)


# -- ranks that disagree on the step -----------------------------------------------------------------

def check_gather(G, plan, step, what):
    """Every replica's rows at its slot, padding zero (replicate contribution)."""
    off, n, slot = plan.slot_offsets, plan.num_tokens, plan.slot_rows
    for d in range(plan.dp_size):
        ref = x_of(step, d, int(n[d]))
        got = G[off[d]:off[d] + n[d]]
        if not CHK.ok(np.array_equal(got, ref), f"{what}: replica {d}'s rows differ"):
            return
        CHK.ok(not G[off[d] + n[d]:off[d] + slot[d]].any(), f"{what}: replica {d}'s padding is not zero")


def step_cases():
    """(name, what F calls, what the others call, expected outcome). A call is ``fn(dp, p, old,
    x, Y)``; outcomes: "input" (F raises InputError at the call naming ``plan``, every rank at the
    next sync), "same" (nothing raises, rows exact) and "mismatch" (see the module docstring)."""
    D = lambda p: p.dp_size  # noqa: E731
    gather = lambda dp, p, old, x, Y: dp.gather(x, p)  # noqa: E731
    return [
        ("a plan of another step from dg.plan()", lambda dp, p, old, x, Y: dp.gather(
            x, dg.plan([dg.LocalBatch(FM.DECODE, 1 + 2 * d) for d in range(D(p))],
                       dg.Topology(T, p.attn_tp_size), policy="varlen")), gather, "input"),
        ("the step's own plan rebuilt by dg.plan()", lambda dp, p, old, x, Y: dp.gather(
            x, dg.plan([dg.LocalBatch(FM.DECODE, 2 + d) for d in range(D(p))],
                       dg.Topology(T, p.attn_tp_size), policy="varlen", transport="nccl")), gather, "same"),
        ("the previous step's plan", lambda dp, p, old, x, Y: dp.gather(x, old), gather, "input"),
        ("gather where the others scatter", gather, lambda dp, p, old, x, Y: dp.scatter(Y, p), "mismatch"),
        ("scatter where the others gather", lambda dp, p, old, x, Y: dp.scatter(Y, p), gather, "mismatch"),
        ("gather_logits where the others gather", lambda dp, p, old, x, Y: dp.gather_logits(x, p), gather,
         "mismatch"),
        ("contribution='partial' where the others replicate",
         lambda dp, p, old, x, Y: dp.gather(x, p, contribution="partial"), gather, "mismatch"),
        ("reduce=False where the others reduce", lambda dp, p, old, x, Y: dp.scatter(Y, p, reduce=False),
         lambda dp, p, old, x, Y: dp.scatter(Y, p, reduce=True), "mismatch"),
    ]


def part_step():
    counts = {"input": 0, "same": 0, "mismatch": 0}
    outcomes = []
    for A in divisors(T):
        d = R // A
        for name, bad, good, expect in step_cases():
            if expect == "mismatch" and T == 1:
                continue  # one rank cannot disagree with itself
            same = expect == "same"
            CHK.ctx = f"step A={A} {name!r}"
            WORLD.Barrier()
            # policy varlen: the dg.plan() rebuild above names it; "nccl" for the rebuilt plan's
            # transport (a P2P plan's fingerprint differs from dg.plan()'s default)
            dp = make(A, policy="varlen", transport="nccl" if same else (ARGS.transport or "auto"))
            old = dp.sync(dg.LocalBatch(FM.DECODE, 1))
            p = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d))
            x = x_of(1, d, 2 + d)
            Y = rows(("Y", A), int(p.gathered_rows))
            got = []
            at_call, s1 = attempt(lambda: (bad if R == F else good)(dp, p, old, x, Y), got)
            at_sync, s2 = None, 0.0
            if at_call is None or isinstance(at_call, dg.InputError):
                at_sync, s2 = attempt(lambda: dp.sync(dg.LocalBatch(FM.DECODE, 2)))
            final = at_sync if at_sync is not None else at_call
            outcomes.append([A, name, cls(at_call), cls(at_sync)])
            for e in (at_call, at_sync):
                CHK.ok(e is None or isinstance(e, dg.DpGatherError), f"raised a non-dpgather {cls(e)}: {e}")
                CHK.ok(": None" not in str(e or ""), f"{cls(e)} names no reason: {e}")
            if expect == "same":
                CHK.ok(final is None, f"{cls(final)}: {final}")
                if at_call is None:
                    check_gather(got[0], p, 1, "the gathered rows")
            elif expect == "input":
                if R == F:
                    CHK.ok(isinstance(at_call, dg.InputError) and "plan" in str(at_call),
                           f"F's call ended with {cls(at_call)}: {at_call} (expected InputError naming plan)")
                else:
                    CHK.ok(at_call is None, f"a valid call raised {cls(at_call)}: {at_call}")
                CHK.ok(isinstance(at_sync, dg.InputError) and f"[{F}]" in str(at_sync) and "plan" in str(at_sync),
                       f"the next sync() ended with {cls(at_sync)}: {at_sync} (expected InputError naming rank {F})")
                # the step after works
                p2 = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d))
                check_gather(dp.gather(x_of(1, d, 2 + d), p2), p2, 1, "the step after")
            else:
                CHK.ok(isinstance(final, (dg.InconsistentStepError, dg.CollectiveTimeout)),
                       f"ended with {cls(final)}: {final} (expected InconsistentStepError or CollectiveTimeout)")
                CHK.ok(s1 + s2 < 2 * ARGS.timeout + 5, f"took {s1 + s2:.1f} s")
                again, _ = attempt(lambda: dp.sync(dg.LocalBatch(FM.DECODE, 2)))
                CHK.ok(isinstance(again, dg.CollectiveTimeout) and "aborted" in str(again),
                       f"the aborted DpAttention answered {cls(again)}: {again}")
            counts[expect] += 1
            dp.close()
    report(R, failures=CHK.fails[:40], counts=counts, outcomes=outcomes)


# -- bad arguments on one rank -----------------------------------------------------------------------

def expect_everywhere(name, fn, exc, bad_must, peer_must):
    """``fn()`` raises ``exc`` on every rank; F's message names ``bad_must``, the others' ``peer_must``."""
    err, _ = attempt(fn)
    if not CHK.ok(isinstance(err, exc), f"{name}: ended with {cls(err)}: {err} (expected {exc.__name__})"):
        return
    for s in (bad_must if R == F else peer_must):
        CHK.ok(s in str(err), f"{name}: the message does not name {s!r}: {err}")


def bad_call(dp, name, call_bad, call_good, must):
    """F makes ``call_bad`` (InputError naming ``must`` at the call), the others ``call_good``
    (returns); the next sync() raises InputError on every rank naming F and ``must[0]``."""
    CHK.ctx = f"data {name!r}"
    err, _ = attempt(call_bad if R == F else call_good)
    if R == F:
        CHK.ok(isinstance(err, dg.InputError), f"F's call ended with {cls(err)}: {err} (expected InputError)")
        for s in must:
            CHK.ok(s in str(err), f"F's message does not name {s!r}: {err}")
    else:
        CHK.ok(err is None, f"a valid call raised {cls(err)}: {err}")
    expect_everywhere(f"{name}: the next sync()", lambda: dp.sync(dg.LocalBatch(FM.DECODE, 2)), dg.InputError,
                      (f"[{F}]", must[0]), (f"[{F}]", must[0]))


def good_step(dp, step, runner=None):
    d = dp.dp_rank
    p = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d, can_run_graph=runner is not None))
    x = x_of(step, d, 2 + d)
    if runner is not None:
        y = runner.run(x, p)
        CHK.ok(np.array_equal(y[:2 + d], T * x), "GraphRunner.run: rows differ from T * x")
        return
    check_gather(dp.gather(x, p), p, step, f"step {step}")
    ids = np.zeros((int(p.gathered_rows), 2), np.int32)
    dp.mask_topk_ids(ids, p, fill=-1)
    y = dp.scatter(np.ascontiguousarray(np.tile(x_of(step, 0, 1), (int(p.gathered_rows), 1))), p)
    CHK.ok(np.array_equal(y, np.tile(T * x_of(step, 0, 1), (2 + d, 1))), f"step {step}: scatter rows differ")


def part_data():
    ran = []
    for A in divisors(T):
        dp = make(A, policy="varlen", graph_buckets=(A * (T + 8),))
        runner = dp.graph_runner(lambda G: G)
        d = dp.dp_rank
        step = 0
        good_step(dp, step)
        for fill in ("x", None, 1.5, True):
            p = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d))
            ids = np.zeros((int(p.gathered_rows), 2), np.int32)
            bad_call(dp, f"A={A} mask_topk_ids(fill={fill!r})", lambda: dp.mask_topk_ids(ids, p, fill=fill),
                     lambda: dp.mask_topk_ids(ids, p), ("fill", repr(fill)))
            CHK.ok(not ids.any(), "topk_ids written by a call that raised")
            step += 1
            good_step(dp, step)
            ran.append(f"fill={fill!r}")
        p = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d))
        Y = np.zeros((int(p.gathered_rows), H), np.float32)
        bad_call(dp, f"A={A} scatter(reduce='no')", lambda: dp.scatter(Y, p, reduce="no"), lambda: dp.scatter(Y, p),
                 ("reduce", "'no'"))
        step += 1
        good_step(dp, step)
        ran.append("reduce='no'")
        good_step(dp, step, runner)
        p = dp.sync(dg.LocalBatch(FM.DECODE, 2 + d, can_run_graph=True))
        CHK.ok(p.graph, f"A={A}: not a graph step: {p}")
        x = x_of(step, d, 2 + d)
        bad_call(dp, f"A={A} GraphRunner.run(x float64)", lambda: runner.run(x.astype(np.float64), p),
                 lambda: runner.run(x, p), ("x", "float64"))
        step += 1
        good_step(dp, step, runner)
        good_step(dp, step)
        ran.append("GraphRunner.run dtype")
        dp.close()
    # a valid but huge step: 2**31 - 1 gathered rows of 256 KiB (512 TiB; no allocator takes it)
    for A in divisors(T):
        CHK.ctx = f"data A={A} huge step"
        dp = make(A, hidden_size=65536, policy="varlen", transport="nccl")
        D, d = dp.topology.dp_size, dp.dp_rank
        n = 1 if d < D - 1 else 2**31 - 1 - (D - 1)
        p = dp.sync(dg.LocalBatch(FM.DECODE, n))
        CHK.ok(p.gathered_rows >= 2**31 - 1 - A * D, f"gathered_rows {p.gathered_rows}")
        x = np.ones((1, 65536), np.float32)
        expect_everywhere("gather of the huge step", lambda: dp.gather(x, p), dg.InputError, ("MiB",), ("MiB",))
        expect_everywhere("the sync() after the huge step", lambda: dp.sync(dg.LocalBatch(FM.DECODE, 2)),
                          dg.InputError, ("MiB",), ("MiB",))
        p = dp.sync(dg.LocalBatch(FM.DECODE, 2))
        xs = np.full((2, 65536), d + 1, np.float32)
        G = dp.gather(xs, p)
        ref = np.repeat(np.arange(1, D + 1, dtype=np.float32), 2)[:, None] * np.ones((1, 65536), np.float32)
        CHK.ok(np.array_equal(G, ref), "the step after the huge one gathered wrong rows")
        dp.close()
        ran.append("huge step")
    # constructor values valid elsewhere and invalid on F only: the same ConfigError on every rank,
    # naming the argument and the value (none may pass, none may leave the others waiting)
    for key, value, shown in CTOR_VALUES:
        CHK.ctx = f"data {key}={shown} on one rank"
        expect_everywhere("construction", lambda: make(**({key: value} if R == F else {})).close(),
                          dg.ConfigError, (key, shown), (key, shown))
        ran.append(f"{key}={shown}")
    CHK.ctx = "data construction after the refused ones"
    dp = make()
    good_step(dp, 100)
    dp.close()
    report(R, failures=CHK.fails[:40], ran=ran)


#: (argument, value on F, how the message shows it): issue 15's list
CTOR_VALUES = [("timeout_s", 0, "0"), ("timeout_s", -1, "-1"), ("timeout_s", -5, "-5"),
               ("timeout_s", float("nan"), "nan"), ("timeout_s", "abc", "abc"), ("timeout_s", None, "None"),
               ("max_tokens_per_rank", "x", "'x'"), ("max_tokens_per_rank", 1.5, "1.5"),
               ("max_tokens_per_rank", 2**40, str(2**40))]


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("exit-badarg", "exit-graph", "ctor-exit", "ctor", "step", "data"))
    ap.add_argument("--timeout", type=float, default=2.0, help="DpAttention timeout_s")
    ap.add_argument("--transport", default="", help="DpAttention transport (default: its default)")
    ap.add_argument("--attn-tp", dest="attn_tp", type=int, default=1, help="exit-*: attn_tp_size")
    ARGS = ap.parse_args()
    if T < 2 and ARGS.part in ("exit-badarg", "exit-graph", "ctor-exit", "ctor"):
        ap.error(f"{ARGS.part} needs a faulty rank beside the others: run it with T >= 2")
    if ARGS.part.startswith("exit-"):
        part_exit(ARGS.part)  # F's uncaught exception must propagate: no handler around it
        return
    try:
        {"ctor-exit": part_ctor_exit, "ctor": part_ctor, "step": part_step, "data": part_data}[ARGS.part]()
    except Exception:  # noqa: BLE001 - reported; the test asserts on it
        CHK.fail(f"unexpected error:\n{traceback.format_exc()}")
        report(R, failures=CHK.fails[:40])
        raise


if __name__ == "__main__":
    main()
