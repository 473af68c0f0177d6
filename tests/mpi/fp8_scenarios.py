"""The quantized gather (issue 24, docs/fp8.md) end to end on the host backend:
``mpiexec -n T python fp8_scenarios.py PART [options]``.

Parts:

    matrix    every A of --A dividing T x --transports (nccl = the MPI collectives, p2p, push)
              x --policies (max_len, sum_len, varlen forced; auto) x --dtypes, the wire format
              cycling over the configurations (group 16, H, 4 and 1 -- a float32 row then
              narrower than its wire row --, pow2 scales on and off). --steps steps of mixed
              forward modes (decode, extend, the speculative ones), idle replicas, uneven counts,
              replicas that provide fewer rows than ``n`` (the missing rows are zero rows: zero
              bytes) and more; values of many magnitudes, some steps with NaN / +-Inf /
              subnormals / -0.0 among them. Each step runs ``gather_fp8`` replicate and partial
              (sync and ``gather_fp8_async``) into a poisoned arena (the sum_len configurations
              preallocated with max_tokens_per_rank: no step may allocate) and compares ``wire`` with
              ``tests/fp8_reference.quantize`` of each replica's rows (partial, A > 1: of the
              replica's summands summed in the input dtype, as ``tests/bit_patterns.summed``)
              placed at ``plan.slot_offsets``, every row as bytes; ``q`` and ``scales`` must be
              the views of ``wire``.
    overlap   ``DpAttention(micro_batches=2)``: both micro-batches' ``gather_fp8_async`` issued
              before either ``wait()``, interleaved with a plain ``gather_async``; the graph
              runner with ``fp8=True`` (one and two micro-batches): ``fn`` receives ``Fp8Rows``
              laid out by the bucket, checked against the reference, and returns the
              dequantized rows in the configured dtype; the combined output is checked exactly.
    badinput  a bad ``x`` (wrong width, wrong dtype) to ``gather_fp8`` on the last rank: it
              raises InputError naming ``x``, its peers' calls return (their other replicas'
              rows right), every rank raises at the next ``sync()``, the step after works;
              ``strict=True``: every rank raises at the call and nothing moves; the runner's
              ``fn`` (fp8=True) raising on the last rank: the same contract;
              ``gather_fp8`` / ``graph_runner(fp8=True)`` without ``fp8=``: InputError on every
              rank, nothing moves; the configuration errors (non-float dtype, group not dividing
              H, H not a multiple of 4, a non-Fp8Format value, formats that differ across
              ranks): the same ConfigError on every rank.
    interop   ``--framework numpy|torch|jax``: ``x`` in the caller's framework, ``Fp8Rows`` of
              the framework's arrays back (q uint8, scales float32, wire uint8), equal values;
              the first step has no rows at all (``[0, W]`` results: JAX's split of the wire
              rows once divided by zero there).

Every rank builds every rank's inputs from (seed, tag) and the full reference locally, checks
through ``scenario_kit.CHK`` and reports with ``scenario_kit.finish``.
"""

import argparse
import os
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dpgather as dg  # noqa: E402
import fp8_reference as R  # noqa: E402
from bit_patterns import DTYPES, SPECIAL_BITS, summed  # noqa: E402
from facade_scenarios import arena_bytes, expect_raise, make_batch  # noqa: E402
from overlap_scenarios import poison_arenas  # noqa: E402
from scenario_kit import CHK, bits, finish, poisoned_alloc, rng, set_seed  # noqa: E402

WORLD = MPI.COMM_WORLD
RANK, T = WORLD.Get_rank(), WORLD.Get_size()
BAD = T - 1
SPEC = dg.SpecConfig(num_steps=3, topk=2, num_draft_tokens=4)
M = dg.ForwardMode
MODES = (M.IDLE, M.DECODE, M.EXTEND, M.TARGET_VERIFY, M.DRAFT_DECODE, M.DRAFT_EXTEND)
POLICY_MODE = {"max_len": dg.PaddingMode.MAX_LEN, "sum_len": dg.PaddingMode.SUM_LEN,
               "varlen": dg.PaddingMode.VARLEN}
ARGS = None


def formats(H):
    return [dg.Fp8Format(16, False), dg.Fp8Format(H, True), dg.Fp8Format(4, True), dg.Fp8Format(1, False),
            dg.Fp8Format(16, True), dg.Fp8Format(H, False)]


# -- inputs and references ---------------------------------------------------------------------------

def values(tag, rows, H, name, special):
    """Rows of dtype ``name``: normal values at one magnitude per row (2**-8 .. 2**8), a zero row
    now and then; ``special``: some NaN / +-Inf / subnormal / -0.0 bit patterns among them."""
    g = rng("v", *tag)
    dt = DTYPES[name]
    v = (g.standard_normal((rows, H)) * 2.0 ** g.integers(-8, 9, size=(rows, 1))).astype(dt)
    if rows:
        v[g.random(rows) < 0.1] = 0
    if special:
        pool = np.array(SPECIAL_BITS[name], dtype=f"u{dt.itemsize}").view(dt)
        pick = g.random((rows, H)) < 0.04
        v[pick] = pool[g.integers(0, pool.size, size=int(pick.sum()))]
    return v


class Cfg:
    def __init__(self, A, transport, policy, name, fmt, H):
        self.A, self.D, self.transport, self.policy = A, T // A, transport, policy
        self.name, self.dt, self.fmt, self.H = name, DTYPES[name], fmt, H
        self.W = fmt.wire_bytes(H)
        self.key = (A, transport, policy, name, fmt.group_size, fmt.pow2_scales, H)

    def __str__(self):
        return f"A={self.A} transport={self.transport} policy={self.policy} dtype={self.name} fp8={self.fmt!r}"

    def make(self, **kw):
        kw = {"spec": SPEC, "policy": self.policy, "transport": self.transport, "fp8": self.fmt,
              "timeout_s": ARGS.timeout, **kw}
        dp = dg.DpAttention(comm=WORLD, attn_tp_size=self.A, hidden_size=self.H, dtype=self.name, backend="host",
                            **kw)
        for arena in dp._arenas:
            arena._alloc = poisoned_alloc  # fresh arena memory is poisoned too (test only)
        return dp


def step_batches(cfg, s, i=0, graph=False):
    """Batches of step ``s`` (micro-batch ``i``) and the rows each replica provides: rotating
    forward modes (graph: decode-like ones that can run a graph), an idle replica every third
    step, rows ``n - k`` (fewer: the missing rows are zero rows) or ``n + k`` (more)."""
    g = rng("batches", cfg.key, s, i, graph)
    batches = []
    for d in range(cfg.D):
        if cfg.D > 1 and s % 3 == 1 and d == (s + i) % cfg.D:
            b = dg.LocalBatch(M.IDLE)
        elif graph:
            b = make_batch(g, (M.DECODE, M.TARGET_VERIFY, M.DRAFT_DECODE, M.DRAFT_EXTEND)[(s + d + i) % 4], True)
        else:
            b = make_batch(g, MODES[(s + 2 * d + 3 * i) % 6], False)
        batches.append(b)
    rows = []
    for d, b in enumerate(batches):
        n = dg.count_tokens(b, SPEC)[0]
        v = (s + d + i) % 3
        rows.append(max(n - 1 - int(g.integers(0, max(n // 2, 1))), 0) if v == 0 else
                    n + int(g.integers(1, 5)) if v == 1 else n)
    return batches, rows


class Inputs:
    """Every rank's inputs of one step and the reference wire rows of both contributions."""

    def __init__(self, cfg, tag, rows, special):
        A, D, H, name = cfg.A, cfg.D, cfg.H, cfg.name
        self.rows = rows
        self.rep = [values(("rep", tag, d), rows[d], H, name, special) for d in range(D)]
        self.part = [values(("part", tag, t), rows[t // A], H, name, special) for t in range(T)]
        self.x_rep, self.x_part = self.rep[RANK // A], self.part[RANK]
        self.cfg = cfg

    def replica_rows(self, d, k, partial):
        A, name = self.cfg.A, self.cfg.name
        if not partial:
            return self.rep[d][:k]
        parts = [self.part[d * A + a][:k] for a in range(A)]
        return parts[0] if A == 1 else summed(parts, name)

    def reference(self, plan, partial, slot=None):
        """uint8 ``[gathered_rows, W]`` (``slot``: the graph layout, ``slot`` rows per replica)."""
        cfg = self.cfg
        n, off = plan.num_tokens.astype(int), plan.slot_offsets.astype(int)
        total = int(plan.gathered_rows) if slot is None else cfg.D * slot
        ref = np.zeros((total, cfg.W), np.uint8)
        for d in range(cfg.D):
            k = min(n[d], self.rows[d])
            o = off[d] if slot is None else d * slot
            if k:  # (the reference's reshape needs a row)
                    ref[o:o + k] = R.quantize(self.replica_rows(d, k, partial), cfg.name, cfg.fmt.group_size,
                                          cfg.fmt.pow2_scales)
        return ref


def check_rows(what, got, ref, cfg):
    """``got`` is Fp8Rows of NumPy arrays: ``wire`` equal to ``ref`` byte for byte, ``q`` and
    ``scales`` its views."""
    H, G = cfg.H, cfg.fmt.group_size
    if not CHK.ok(isinstance(got, dg.Fp8Rows), lambda: f"{what}: returned {type(got).__name__}, not Fp8Rows"):
        return
    q, s, w = got
    if not CHK.shape(f"{what}: wire", w, ref.shape, np.dtype(np.uint8)):
        return
    bad = np.flatnonzero((w != ref).any(axis=1)) if ref.size else np.zeros(0, int)
    CHK.ok(bad.size == 0, lambda: f"{what}: {bad.size}/{ref.shape[0]} wire rows differ, first row {bad[0]}: "
                                  f"got {w[bad[0]][:40].tolist()} expected {ref[bad[0]][:40].tolist()} (first 40 bytes)")
    CHK.shape(f"{what}: q", q, (ref.shape[0], H), np.dtype(np.uint8))
    CHK.shape(f"{what}: scales", s, (ref.shape[0], H // G), np.dtype(np.float32))
    if isinstance(q, np.ndarray) and isinstance(s, np.ndarray) and ref.size:
        rq, rs = R.split(ref, H, G)
        CHK.ok(np.array_equal(q, rq), f"{what}: q differs from the reference's fp8 bytes")
        CHK.ok(np.array_equal(s.view(np.uint32), rs.view(np.uint32)), f"{what}: scales differ from the reference's")
        CHK.ok(np.shares_memory(q, w) and np.shares_memory(s, w), f"{what}: q / scales are not views of wire")


# -- matrix -----------------------------------------------------------------------------------------------

ROLES = ("gathered", "staging", "combine", "output")


def run_matrix_config(cfg, nsteps):
    # sum_len configurations preallocate (max_tokens_per_rank): the arenas must be sized for the
    # wire rows (wider than a float32 row at group 1), so no step allocates
    prealloc = cfg.policy == "sum_len"
    dp = cfg.make(**({"max_tokens_per_rank": 64} if prealloc else {}))
    stats0 = dp.memory_stats()
    nodes = int(os.environ.get("DPGATHER_P2P_NODES") or 1)
    if cfg.transport != "nccl" and T > 1:
        CHK.ok(dp.info()["p2p_node_size"] == T // nodes, lambda: f"p2p_node_size {dp.info()['p2p_node_size']}, "
                                                                  f"expected {T // nodes} ({nodes} pretend nodes)")
    try:
        for s in range(nsteps):
            CHK.ctx = f"matrix {cfg} step={s}"
            batches, rows = step_batches(cfg, s)
            p = dp.sync(batches[RANK // cfg.A])
            if cfg.policy in POLICY_MODE and not p.skip:
                CHK.ok(p.mode == POLICY_MODE[cfg.policy], lambda: f"plan mode {p.mode.name}, forced {cfg.policy}")
            if T > 1 and not p.skip:
                CHK.ok(p.transport == cfg.transport, lambda: f"plan transport {p.transport}, forced {cfg.transport}")
            CHK.ctx = f"matrix {cfg} step={s} mode={p.mode.name} n={p.num_tokens.tolist()} rows={rows}"
            inp = Inputs(cfg, (cfg.key, s), rows, special=s % 2 == 1)
            saved = (inp.x_rep.copy(), inp.x_part.copy())
            for partial in (False, True):
                c = "partial" if partial else "replicate"
                x = inp.x_part if partial else inp.x_rep
                ref = inp.reference(p, partial)
                poison_arenas(dp._arenas)
                check_rows(f"gather_fp8({c})", dp.gather_fp8(x, p, contribution=c), ref, cfg)
                poison_arenas(dp._arenas)
                h = dp.gather_fp8_async(x, p, contribution=c)
                check_rows(f"gather_fp8_async({c}).wait()", h.wait(), ref, cfg)
            CHK.ok(np.array_equal(bits(saved[0]), bits(inp.x_rep)) and np.array_equal(bits(saved[1]), bits(inp.x_part)),
                   "an input was modified")
        if prealloc:
            CHK.ctx = f"matrix {cfg} preallocated"
            end = dp.memory_stats()
            for role in ROLES:
                CHK.ok(end[role]["allocations"] == stats0[role]["allocations"],
                       f"role {role} allocated although max_tokens_per_rank covers every step: "
                       f"{stats0[role]} -> {end[role]}")
    finally:
        dp.close()


def scenario_matrix():
    H = ARGS.hidden
    fmts = formats(H)
    configs = 0
    As = [a for a in map(int, ARGS.A.split(",")) if T % a == 0]
    for A in As:
        for transport in ARGS.transports.split(","):
            for policy in ARGS.policies.split(","):
                for name in ARGS.dtypes.split(","):
                    fmt = fmts[(configs + configs // 3) % len(fmts)]  # every dtype meets every format
                    run_matrix_config(Cfg(A, transport, policy, name, fmt, H), ARGS.steps)
                    configs += 1
    finish("matrix", {"configs": configs})


# -- overlap: micro-batches and the graph runner ------------------------------------------------------

def dequantized(wire, cfg):
    """fn's result: the rows' dequantized values in the configured dtype."""
    return R.dequantize(np.ascontiguousarray(wire), cfg.H, cfg.fmt.group_size).astype(cfg.dt)


class Fn:
    """The runner's ``fn``: keeps a copy of every Fp8Rows it saw (checked against the reference)
    and returns the dequantized rows (rank 0 only when ``zero_peers``: a sum over ranks is then
    exact)."""

    def __init__(self, cfg, zero_peers):
        self.cfg, self.zero_peers, self.seen = cfg, zero_peers, []

    def __call__(self, rows):
        self.seen.append(rows)
        Y = dequantized(rows.wire, self.cfg)
        if self.zero_peers and RANK != 0:
            Y[...] = 0
        return Y


def check_seen(what, fn, i, ref):
    if not CHK.ok(len(fn.seen) > i, f"{what}: fn did not run"):
        return None
    rows = fn.seen[i]
    check_rows(f"{what}: fn's rows", rows, ref, fn.cfg)


def expected_output(cfg, inp, p, partial, rows_out):
    """The runner's output: this replica's rows of fn's result (reduce: the sum, exact with one
    contributor), ``rows_out`` rows, past ``n`` zero."""
    d = RANK // cfg.A
    n = int(p.num_tokens[d])
    out = np.zeros((rows_out, cfg.H), cfg.dt)
    k = min(n, inp.rows[d])
    if k:
        w = R.quantize(inp.replica_rows(d, k, partial), cfg.name, cfg.fmt.group_size, cfg.fmt.pow2_scales)
        out[:k] = dequantized(w, cfg)
    return out


def scenario_overlap():
    H = ARGS.hidden
    fmts = formats(H)
    configs = runs = 0
    As = [a for a in map(int, ARGS.A.split(",")) if T % a == 0]
    for A in As:
        for transport in ARGS.transports.split(","):
            for name in ARGS.dtypes.split(","):
                fmt = fmts[(configs + 3) % len(fmts)]
                cfg = Cfg(A, transport, "auto", name, fmt, H)
                buckets = (A * 4, A * 16)
                dp = cfg.make(micro_batches=2, graph_buckets=buckets)
                ser = cfg.make(graph_buckets=buckets)
                fns = {"rep1": Fn(cfg, True), "part1": Fn(cfg, False), "rep2": Fn(cfg, True)}
                r_rep1 = ser.graph_runner(fns["rep1"], contribution="replicate", reduce=True, fp8=True)
                r_part1 = ser.graph_runner(fns["part1"], contribution="partial", reduce=False, fp8=True)
                r_rep2 = dp.graph_runner(fns["rep2"], contribution="replicate", reduce=True, micro_batches=2, fp8=True)
                try:
                    for s in range(ARGS.steps):
                        CHK.ctx = f"overlap {cfg} step={s}"
                        runs += overlap_step(cfg, dp, ser, s, fns, r_rep1, r_part1, r_rep2)
                finally:
                    dp.close()
                    ser.close()
                configs += 1
    CHK.ctx = "overlap coverage"
    CHK.ok(ARGS.steps < 2 or runs > 0, "no graph runner step ran")
    finish("overlap", {"configs": configs, "graph_steps": runs})


def overlap_step(cfg, dp, ser, s, fns, r_rep1, r_part1, r_rep2):
    graph = s % 2 == 1
    A, D = cfg.A, cfg.D
    ps, inps = [], []
    for i in (0, 1):
        batches, rows = step_batches(cfg, s, i, graph=graph)
        ps.append(dp.sync(batches[RANK // A], micro_batch=i))
        inps.append(Inputs(cfg, (cfg.key, s, i), rows, special=s % 4 == 2))
    # both micro-batches' quantized gathers in flight before either wait(), a plain gather between
    poison_arenas(dp._arenas)
    h0 = dp.gather_fp8_async(inps[0].x_rep, ps[0], contribution="replicate")
    h1 = dp.gather_fp8_async(inps[1].x_part, ps[1], contribution="partial")
    r1 = h1.wait()
    r0 = h0.wait()
    check_rows("micro-batch 0 gather_fp8_async(replicate)", r0, inps[0].reference(ps[0], False), cfg)
    check_rows("micro-batch 1 gather_fp8_async(partial)", r1, inps[1].reference(ps[1], True), cfg)
    h0 = dp.gather_fp8_async(inps[0].x_part, ps[0], contribution="partial")
    h1 = dp.gather_async(inps[1].x_rep, ps[1], contribution="replicate")
    G1 = h1.wait()
    check_rows("micro-batch 0 gather_fp8_async(partial) beside a gather", h0.wait(),
               inps[0].reference(ps[0], True), cfg)
    ref1 = np.zeros((int(ps[1].gathered_rows), cfg.H), cfg.dt)
    for d in range(D):
        k = min(int(ps[1].num_tokens[d]), inps[1].rows[d])
        o = int(ps[1].slot_offsets[d])
        ref1[o:o + k] = inps[1].rep[d][:k]
    CHK.ok(np.array_equal(np.ascontiguousarray(G1).view(np.uint8), ref1.view(np.uint8)),
           "micro-batch 1 gather_async beside a gather_fp8_async")
    if not all(p.graph for p in ps):
        return 0
    # the overlapped runner (fp8=True): fn sees each micro-batch's wire rows in the layout of the
    # largest bucket of the two plans; reduce=True with fn's rows on rank 0 only: the output is exact
    b = max(int(p.bucket) for p in ps)
    CHK.ctx = f"overlap {cfg} step={s} runner(micro_batches=2) buckets {[int(p.bucket) for p in ps]}"
    poison_arenas(r_rep2._arenas)
    fns["rep2"].seen = []
    outs = [np.array(o, copy=True) for o in r_rep2.run([inp.x_rep for inp in inps], ps)]
    CHK.ok(len(fns["rep2"].seen) == 2, f"fn ran {len(fns['rep2'].seen)} times, expected 2")
    for i in (0, 1):
        check_seen(f"micro-batch {i}", fns["rep2"], i, inps[i].reference(ps[i], False, slot=b))
        CHK.exact(f"micro-batch {i} output", outs[i], expected_output(cfg, inps[i], ps[i], False, outs[i].shape[0]))
        CHK.ok(outs[i].shape[0] >= int(ps[i].num_tokens[RANK // A]), f"micro-batch {i}: output too short")
    # one micro-batch per run, on the serial DpAttention: replicate + reduce, partial + copy
    for i in (0, 1):
        batches, rows = step_batches(cfg, s, i, graph=True)
        p = ser.sync(batches[RANK // A])
        CHK.ctx = f"overlap {cfg} step={s} runner micro-batch {i} bucket {int(p.bucket)}"
        for runner, fn, partial in ((r_rep1, fns["rep1"], False), (r_part1, fns["part1"], True)):
            poison_arenas(runner._arenas)
            fn.seen = []
            x = inps[i].x_part if partial else inps[i].x_rep
            out = np.array(runner.run(x, p), copy=True)
            what = "partial, reduce=False" if partial else "replicate, reduce=True"
            check_seen(what, fn, 0, inps[i].reference(p, partial, slot=int(p.bucket)))
            CHK.exact(f"runner({what}) output", out, expected_output(cfg, inps[i], p, partial, out.shape[0]))
    return 1


# -- badinput -----------------------------------------------------------------------------------------

def scenario_badinput():
    H = ARGS.hidden
    name = ARGS.dtypes.split(",")[0]
    fmt = dg.Fp8Format(16 if H % 16 == 0 else 4, False)
    for A in (a for a in map(int, ARGS.A.split(",")) if T % a == 0):
        for transport in ARGS.transports.split(","):
            cfg = Cfg(A, transport, "auto", name, fmt, H)
            for strict in (False, True):
                dp = cfg.make(strict=strict)
                try:
                    for k, (what, bad) in enumerate((("wrong width", lambda x: np.zeros((x.shape[0], H + 4), cfg.dt)),
                                                     ("wrong dtype", lambda x: x.astype(np.float64)))):
                        bad_x_case(dp, cfg, strict, 2 * k, what, bad)
                finally:
                    dp.close()
            fn_fails_case(cfg)
            no_format_case(cfg)
    config_cases(name, H)
    finish("badinput")


def good_step(dp, cfg, s, what):
    CHK.ctx = f"badinput {cfg} after {what!r}"
    batches, rows = step_batches(cfg, s)
    p = dp.sync(batches[RANK // cfg.A])
    inp = Inputs(cfg, ("good", cfg.key, s), rows, special=False)
    poison_arenas(dp._arenas)
    check_rows("gather_fp8(partial)", dp.gather_fp8(inp.x_part, p, contribution="partial"), inp.reference(p, True), cfg)


def bad_x_case(dp, cfg, strict, s, what, bad):
    CHK.ctx = f"badinput {cfg} strict={strict} {what!r}"
    A = cfg.A
    p = dp.sync(dg.LocalBatch(M.DECODE, 3 + RANK // A))
    rows = [3 + d for d in range(cfg.D)]
    inp = Inputs(cfg, ("bad", cfg.key, s), rows, special=False)
    x = bad(inp.x_rep) if RANK == BAD else inp.x_rep
    snap, stats = arena_bytes(dp), dp.memory_stats()
    must = ("x",) + ((f"({x.shape[0]}, {cfg.H + 4})",) if what == "wrong width" else ("float64",))
    t0 = time.monotonic()
    if strict or RANK == BAD:
        expect_raise(f"gather_fp8 {what}", dg.InputError, lambda: dp.gather_fp8(x, p), must=must,
                     peer_must=(f"{BAD}", "x"))
        if strict:  # nothing moved anywhere
            after = arena_bytes(dp)
            changed = [r for r in snap if (snap[r] is None) != (after[r] is None)
                       or (snap[r] is not None and not np.array_equal(snap[r], after[r]))]
            CHK.ok(not changed, f"strict: arena role(s) {changed} written by a call that raised")
            CHK.ok(dp.memory_stats() == stats, "strict: memory_stats changed")
    else:
        try:
            got = dp.gather_fp8(x, p)
        except Exception as e:  # noqa: BLE001 - reported
            CHK.fail(f"a valid gather_fp8 on rank {RANK} raised {type(e).__name__}: {e}")
        else:
            # the other replicas' rows are right (the failing rank sent zero rows for its own)
            ref = inp.reference(p, False)
            off, n = p.slot_offsets.astype(int), p.num_tokens.astype(int)
            keep = np.zeros(ref.shape[0], bool)
            for d in range(cfg.D):
                if d != BAD // A:
                    keep[off[d]:off[d] + n[d]] = True
            CHK.ok(np.array_equal(got.wire[keep], ref[keep]), "a peer's rows of the other replicas are wrong")
    CHK.ok(time.monotonic() - t0 < ARGS.timeout, "the call took too long")
    if not strict:
        expect_raise(f"{what}: the next sync()", dg.InputError, lambda: dp.sync(dg.LocalBatch(M.DECODE, 2)),
                     must=(f"[{BAD}]", "x"), peer_must=(f"[{BAD}]", "x"))
    good_step(dp, cfg, s + 1, what)


def fn_fails_case(cfg):
    """graph_runner(fp8=True) whose fn raises on the last rank: that rank raises fn's error at
    run(), its peers' run returns, every rank raises InputError naming the rank at the next sync();
    the step after works."""
    CHK.ctx = f"badinput {cfg} runner fn raises on rank {BAD}"
    dp = cfg.make(graph_buckets=(cfg.A * 4, cfg.A * 8))
    try:
        def fn(rows):
            if RANK == BAD:
                raise ValueError("fn-boom")
            return np.zeros((rows.wire.shape[0], cfg.H), cfg.dt)

        runner = dp.graph_runner(fn, contribution="partial", fp8=True)
        p = dp.sync(dg.LocalBatch(M.DECODE, 3, can_run_graph=True))
        CHK.ok(p.graph, f"plan.graph is False for {p!r}")
        x = values(("fnfail", RANK), 3, cfg.H, cfg.name, False)
        t0 = time.monotonic()
        if RANK == BAD:
            expect_raise("run() with fn raising", ValueError, lambda: runner.run(x, p), must=("fn-boom",))
        else:
            try:
                out = runner.run(x, p)
                CHK.ok(out.shape[1] == cfg.H, "run() output shape")
            except Exception as e:  # noqa: BLE001 - reported
                CHK.fail(f"a peer's run() raised {type(e).__name__}: {e}")
        CHK.ok(time.monotonic() - t0 < ARGS.timeout, "run() took too long")
        expect_raise("the next sync()", dg.InputError, lambda: dp.sync(dg.LocalBatch(M.DECODE, 2)),
                     must=(f"[{BAD}]", "fn-boom"), peer_must=(f"[{BAD}]", "fn-boom"))
        good_step(dp, cfg, 7, "fn raising")
    finally:
        dp.close()


def no_format_case(cfg):
    """gather_fp8 / graph_runner(fp8=True) without fp8=: InputError on every rank, nothing moves."""
    for strict in (False, True):
        CHK.ctx = f"badinput {cfg} no fp8= strict={strict}"
        dp = dg.DpAttention(comm=WORLD, attn_tp_size=cfg.A, hidden_size=cfg.H, dtype=cfg.name, backend="host",
                            transport=cfg.transport, timeout_s=ARGS.timeout, strict=strict, graph_buckets=(cfg.A,))
        try:
            expect_raise("graph_runner(fp8=True) without fp8=", dg.InputError,
                         lambda: dp.graph_runner(lambda r: r, fp8=True), must=("fp8",), peer_must=("fp8",))
            p = dp.sync(dg.LocalBatch(M.DECODE, 2))
            x = values(("nofmt", RANK // cfg.A), 2, cfg.H, cfg.name, False)
            dp.gather(x, p)  # the arena exists
            snap, stats = arena_bytes(dp), dp.memory_stats()
            expect_raise("gather_fp8 without fp8=", dg.InputError, lambda: dp.gather_fp8(x, p),
                         must=("fp8",), peer_must=("fp8",))
            after = arena_bytes(dp)
            changed = [r for r in snap if (snap[r] is None) != (after[r] is None)
                       or (snap[r] is not None and not np.array_equal(snap[r], after[r]))]
            CHK.ok(not changed, f"arena role(s) {changed} written by gather_fp8 without fp8=")
            CHK.ok(dp.memory_stats() == stats, "memory_stats changed")
            if not strict:  # every rank failed the call: every rank raises at the next sync()
                expect_raise("the next sync()", dg.InputError, lambda: dp.sync(dg.LocalBatch(M.DECODE, 2)),
                             must=("fp8",), peer_must=("fp8",))
            p = dp.sync(dg.LocalBatch(M.DECODE, 2))
            G = dp.gather(x, p)
            ref = np.concatenate([values(("nofmt", d), 2, cfg.H, cfg.name, False) for d in range(cfg.D)])
            CHK.exact("gather after", G, ref)
        finally:
            dp.close()


def config_cases(name, H):
    """Constructor errors of fp8=: the same ConfigError on every rank."""
    kw = dict(comm=WORLD, hidden_size=H, dtype=name, backend="host", timeout_s=ARGS.timeout)
    g16 = dg.Fp8Format(16 if H % 16 == 0 else 4)
    other = dg.Fp8Format(g16.group_size, True)
    cases = [
        ("int32 dtype", dict(dtype="int32", fp8=g16), dict(dtype="int32", fp8=g16), ("fp8", "int32")),
        ("group not dividing H", dict(fp8=dg.Fp8Format(H + 1)), dict(fp8=dg.Fp8Format(H + 1)),
         ("group_size", str(H + 1))),
        ("H not a multiple of 4", dict(hidden_size=6, fp8=dg.Fp8Format(2)), dict(hidden_size=6, fp8=dg.Fp8Format(2)),
         ("fp8", "6")),
        ("a non-Fp8Format value on one rank", dict(fp8=16), dict(fp8=g16), ("fp8", "Fp8Format")),
        ("a dict on every rank", dict(fp8={"group_size": 16}), dict(fp8={"group_size": 16}), ("fp8",)),
        ("another format on one rank", dict(fp8=other), dict(fp8=g16), ("fp8", f"[{BAD}]")),
        ("fp8 on one rank only", dict(fp8=g16), dict(), ("fp8", f"[{BAD}]")),
        ("int32 dtype on one rank", dict(dtype="int32", fp8=g16), dict(fp8=g16), ("dtype",)),
    ]
    for what, bad_kw, good_kw, must in cases:
        CHK.ctx = f"badinput-config {what!r}"
        err = expect_raise(what, dg.ConfigError, lambda: dg.DpAttention(**{**kw, **(bad_kw if RANK == BAD else good_kw)}),
                           must=must, peer_must=must)
        msgs = WORLD.allgather(None if err is None else str(err))
        CHK.ok(len(set(msgs)) == 1, lambda: f"{what}: the ranks' messages differ: {msgs}")
    CHK.ctx = "badinput-config Fp8Format arguments"
    for args, kwargs, must in (((0,), {}, "group_size"), ((-16,), {}, "group_size"), ((1.5,), {}, "group_size"),
                               ((16,), {"pow2_scales": 1}, "pow2_scales"), ((16,), {"pow2_scales": "yes"}, "pow2_scales")):
        try:
            dg.Fp8Format(*args, **kwargs)
            CHK.fail(f"Fp8Format{args}{kwargs} raised nothing")
        except dg.ConfigError as e:
            CHK.ok(must in str(e), f"Fp8Format{args}{kwargs}: {e}")
        except Exception as e:  # noqa: BLE001 - reported
            CHK.fail(f"Fp8Format{args}{kwargs} raised {type(e).__name__}: {e}")


# -- interop ------------------------------------------------------------------------------------------

def scenario_interop():
    fw, name, H = ARGS.framework, ARGS.dtypes.split(",")[0], ARGS.hidden
    fmt = dg.Fp8Format(16 if H % 16 == 0 else 4, ARGS.steps % 2 == 0)
    types = []
    for A in (a for a in map(int, ARGS.A.split(",")) if T % a == 0):
        cfg = Cfg(A, "auto", "auto", name, fmt, H)
        dp = cfg.make()
        try:
            for s in range(ARGS.steps):
                CHK.ctx = f"interop {fw} {cfg} step={s}"
                batches, rows = step_batches(cfg, s)
                if s == 0:  # a step of no rows at all (not a skip): [0, W] results
                    batches, rows = [dg.LocalBatch(M.DECODE, 0)] * cfg.D, [0] * cfg.D
                p = dp.sync(batches[RANK // A])
                inp = Inputs(cfg, ("io", cfg.key, s), rows, special=s % 2 == 1)
                for partial in (False, True):
                    c = "partial" if partial else "replicate"
                    x = to_framework(fw, inp.x_part if partial else inp.x_rep, name)
                    ref = inp.reference(p, partial)
                    for how in ("sync", "async"):
                        got = dp.gather_fp8(x, p, contribution=c) if how == "sync" else \
                            dp.gather_fp8_async(x, p, contribution=c).wait()
                        check_framework(f"{how} gather_fp8({c})", fw, got, ref, cfg, types)
        finally:
            dp.close()
    finish("interop", {"types": sorted(set(types))})


def to_framework(fw, a, name):
    if fw == "torch":
        import torch

        if name == "bfloat16":
            return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(a.copy())
    if fw == "jax":
        import jax

        return jax.device_put(a, jax.devices("cpu")[0])
    return a


def check_framework(what, fw, got, ref, cfg, types):
    H, G = cfg.H, cfg.fmt.group_size
    if not CHK.ok(isinstance(got, dg.Fp8Rows), f"{what}: returned {type(got).__name__}"):
        return
    rq, rs = R.split(ref, H, G)
    want = {"q": (rq, "uint8", (ref.shape[0], H)), "scales": (rs, "float32", (ref.shape[0], H // G)),
            "wire": (ref, "uint8", ref.shape)}
    for field, (r, dt, shape) in want.items():
        v = getattr(got, field)
        kind = type(v).__module__.split(".")[0]
        types.append(f"{field}:{kind}:{v.dtype}")
        if fw == "torch":
            import torch

            ok_type = isinstance(v, torch.Tensor) and v.dtype == getattr(torch, dt) and v.device.type == "cpu"
            host = v.numpy() if isinstance(v, torch.Tensor) else None
        elif fw == "jax":
            import jax

            ok_type = isinstance(v, jax.Array) and str(v.dtype) == dt
            host = np.asarray(v) if ok_type else None
        else:
            ok_type = isinstance(v, np.ndarray) and v.dtype == np.dtype(dt)
            host = v
        CHK.ok(ok_type, lambda: f"{what}: {field} is {type(v).__name__} {getattr(v, 'dtype', '')}, expected "
                                f"a {fw} {dt} array")
        if host is None:
            continue
        CHK.ok(tuple(host.shape) == tuple(shape), lambda: f"{what}: {field} shape {tuple(host.shape)} != {shape}")
        if tuple(host.shape) == tuple(shape):
            CHK.ok(np.array_equal(np.ascontiguousarray(host).view(np.uint8), np.ascontiguousarray(r).view(np.uint8)),
                   f"{what}: {field} values differ from the NumPy reference")
    if fw == "torch":
        import torch

        f8 = got.q.view(torch.float8_e4m3fn)
        CHK.ok(f8.dtype == torch.float8_e4m3fn and tuple(f8.shape) == (ref.shape[0], H), f"{what}: q.view(float8)")
        deq = (f8.to(torch.float32).reshape(ref.shape[0], -1, G) * got.scales[:, :, None]).reshape(ref.shape[0], H)
        r = R.dequantize(ref, H, G)
        CHK.ok(np.array_equal(deq.numpy(), r, equal_nan=True), f"{what}: torch dequantized values differ")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("matrix", "overlap", "badinput", "interop"))
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--A", default="1,2")
    ap.add_argument("--transports", default="nccl,p2p,push")
    ap.add_argument("--policies", default="max_len,sum_len,varlen,auto")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--framework", default="numpy", choices=("numpy", "torch", "jax"))
    ap.add_argument("--timeout", type=float, default=20.0)
    ARGS = ap.parse_args()
    set_seed(ARGS.seed)
    try:
        {"matrix": scenario_matrix, "overlap": scenario_overlap, "badinput": scenario_badinput,
         "interop": scenario_interop}[ARGS.part]()
    except BaseException:  # noqa: BLE001 - reported; the harness asserts on it
        CHK.fails.append(f"ERROR at {CHK.ctx}:\n{traceback.format_exc()}")
        finish(ARGS.part)
        raise


if __name__ == "__main__":
    main()
