"""Two-batch overlap on the host backend under MPI: ``mpiexec -n T python overlap_scenarios.py SCENARIO ...``.

Scenarios (options after the name; see ``--help``):

    matrix    every attn_tp size A of --A that divides T (default 1 and 2) x --transports (auto:
              the host push twin for decode steps, the pull twin above; nccl: MPI collectives;
              p2p, push: forced) x --policies x graph
              buckets off/on x --dtypes; --steps steps, each of TWO micro-batches with their own
              batches (every forward mode rotates over replicas and micro-batches; idle replicas,
              an all-idle micro-batch, DRAFT_EXTEND with fewer real rows than advertised, inputs
              with more rows than n, graph steps with different buckets per micro-batch).
              Overlapped: ``DpAttention(micro_batches=2)``, ``sync(b_i, micro_batch=i)``, then
              every asynchronous call of micro-batch 0 and 1 issued before any ``wait()``:
              gather (replicate, then partial), gather_logits, scatter (reduce, and copy into a
              smaller / larger ``out=``), scatter_logits. Serialized: the same calls, synchronous,
              micro-batch 0 then 1, on a ``DpAttention(micro_batches=1)``. Every output (arena
              views, ``out=``) is poisoned with 0x7B bytes first (fresh arena memory too); every
              row, padding included, is checked against a NumPy reference each rank computes
              from all ranks' inputs, and the overlapped results must equal the serialized ones
              BIT FOR BIT. Graph steps (both micro-batches graph-eligible) also run
              ``dp.graph_runner(fn, micro_batches=2)`` against ``graph_runner(fn)`` twice on the
              serialized DpAttention (bit-exact where both micro-batches have the same bucket,
              against the reference always) for both contributions. With --prealloc, the arenas
              of both micro-batches are reserved by ``max_tokens_per_rank`` and no step allocates.
    badinput  handles and micro-batches misused: wait() twice, result before wait(), a result
              whose view a later call reused, a scatter of micro-batch 0's plan given micro-batch
              1's gathered view on one rank, a stale plan of a micro-batch, a plan equal to two
              micro-batches' plans, an input aliasing the micro-batch's own arena, micro_batch out
              of range (every rank, one rank), ranks syncing different micro-batches, a closed
              DpAttention, bad micro_batches at construction, the overlapped runner's arguments.
              Each raises the named dpgather error naming the argument and the value; nothing of
              the caller's is written; the next valid step works (or the DpAttention is aborted
              where the ranks disagreed).

Inputs are a pure function of (seed, tag), so every rank builds every rank's inputs and the
references locally. Failures are collected per rank and reported with ``mpi_harness.report``.
"""

import argparse
import traceback

import numpy as np
from mpi4py import MPI

import dpgather as dg
from scenario_kit import BF16, CHK, POISON, bits, finish, poison, poisoned_alloc, rand_rows, rng, set_seed

WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
T = WORLD.Get_size()
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "int32": np.dtype(np.int32),
          "float16": np.dtype(np.float16)}
SPEC = dg.SpecConfig(num_steps=3, topk=2, num_draft_tokens=4)
M = dg.ForwardMode
MODES = (M.IDLE, M.DECODE, M.EXTEND, M.TARGET_VERIFY, M.DRAFT_DECODE, M.DRAFT_EXTEND)
LOGIT_W = 7
BAD = T - 1
ARGS = None


def poison_arenas(arenas):
    for arena in arenas:
        for st in arena._roles.values():  # test only: internal access
            if st.buf is not None:
                st.buf[...] = POISON


# -- batches and references ------------------------------------------------------------------------

def make_batch(g, mode, can_graph, big=None):
    if mode == M.IDLE:
        return dg.LocalBatch(M.IDLE)
    if mode == M.DECODE:
        return dg.LocalBatch(M.DECODE, big if big is not None else int(g.integers(0, 7)), can_run_graph=can_graph)
    if mode == M.EXTEND:
        bs = int(g.integers(1, 5))
        ext = bs + int(g.integers(0, 13))
        lp = None if g.random() < 0.5 else int(g.integers(bs, ext + 1))
        return dg.LocalBatch(M.EXTEND, bs, extend_tokens=ext, logprob_tokens=lp)
    return dg.LocalBatch(mode, int(g.integers(1, 5)), can_run_graph=can_graph)


def step_batches(A, D, key, s, i):
    """Batches of micro-batch i of step s, and the rows each replica provides (x and h)."""
    g = rng("batches", key, s, i)
    pat = s % 6
    batches = []
    for d in range(D):
        if pat == 3 and i == 1:  # an all-idle micro-batch beside a busy one
            b = dg.LocalBatch(M.IDLE)
        elif pat == 4:  # graph-eligible in both micro-batches, different buckets likely
            mode = (M.DECODE, M.TARGET_VERIFY, M.DRAFT_DECODE, M.DRAFT_EXTEND)[(d + i + s) % 4]
            big = (A * 4 + 3 + d) if (i == 1 and mode == M.DECODE) else None
            b = make_batch(g, mode, True, big=big)
        elif pat == 5:  # decode everywhere, graph-eligible, equal sizes: the same bucket
            b = dg.LocalBatch(M.DECODE, 2 + ((d + i) % 2), can_run_graph=True)
        else:
            b = make_batch(g, MODES[(s + 2 * d + 3 * i) % 6], bool(g.random() < 0.6))
        batches.append(b)
    rows = []
    for b in batches:
        n, l = dg.count_tokens(b, SPEC)
        v = int(g.integers(0, 3))
        if b.mode == M.DRAFT_EXTEND and v == 0:
            r = max(n - 1 - int(g.integers(0, max(n // 2, 1))), 0)  # fewer real rows than advertised
        elif v == 1:
            r = n + int(g.integers(1, 5))  # more rows than n (graph padding)
        else:
            r = n
        lr = l + 2 if v == 2 else l
        rows.append((r, lr))
    return batches, [r[0] for r in rows], [r[1] for r in rows]


class Micro:
    """One micro-batch of one step: inputs of every rank, this rank's inputs and the references."""

    def __init__(self, cfg, tag, batches, xrows, hrows, p):
        A, D, H, dt = cfg.A, cfg.D, cfg.H, cfg.dt
        d_own = RANK // A
        self.p = p
        n, off, slot = (p.num_tokens.astype(int), p.slot_offsets.astype(int), p.slot_rows.astype(int))
        ln, loff, lslot = (p.logits_tokens.astype(int), p.logits_offsets.astype(int), p.logits_slot_rows.astype(int))
        GR, LR = int(p.gathered_rows), int(p.logits_rows)
        self.n_own, o_own, self.s_own = n[d_own], off[d_own], slot[d_own]
        acc_t = np.int64 if dt.kind in "iu" else np.float64
        xr = [rand_rows(("xr", tag, d), xrows[d], H, dt) for d in range(D)]
        xp = [rand_rows(("xp", tag, t), xrows[t // A], H, dt) for t in range(T)]
        Yp = [rand_rows(("Yp", tag, t), GR + 1, H, dt) for t in range(T)]
        Yr = rand_rows(("Yr", tag), GR + 1, H, dt)
        hh = [rand_rows(("h", tag, d), hrows[d], H, dt) for d in range(D)]
        self.x_rep, self.x_part, self.Y_part, self.Y_rep = xr[d_own], xp[RANK], Yp[RANK], Yr
        self.h = hh[d_own]
        self.L = rand_rows(("L", tag, RANK), LR + 1, LOGIT_W, np.dtype(np.float32))
        self.saved = [a.copy() for a in (self.x_rep, self.x_part, self.Y_part, self.Y_rep, self.h, self.L)]
        self.G_rep = np.zeros((GR, H), dt)
        self.G_acc = np.zeros((GR, H), acc_t)
        self.G_abs = np.zeros((GR, H), np.float64)
        for d in range(D):
            k = min(n[d], xrows[d])
            self.G_rep[off[d]:off[d] + k] = xr[d][:k]
            for a in range(A):
                v = xp[d * A + a][:k]
                self.G_acc[off[d]:off[d] + k] += v.astype(acc_t)
                self.G_abs[off[d]:off[d] + k] += np.abs(v.astype(np.float64))
        s_own, n_own = self.s_own, self.n_own
        self.y_acc = np.zeros((s_own, H), acc_t)
        self.y_abs = np.zeros((s_own, H), np.float64)
        for t in range(T):
            v = Yp[t][o_own:o_own + n_own]
            self.y_acc[:n_own] += v.astype(acc_t)
            self.y_abs[:n_own] += np.abs(v.astype(np.float64))
        self.y_rep = np.zeros((s_own, H), dt)
        self.y_rep[:n_own] = Yr[o_own:o_own + n_own]
        self.Lg = np.zeros((LR, H), dt)
        for d in range(D):
            k = min(ln[d], hrows[d])
            self.Lg[loff[d]:loff[d] + k] = hh[d][:k]
        self.Ls = np.zeros((lslot[d_own], LOGIT_W), np.float32)
        self.Ls[:ln[d_own]] = self.L[loff[d_own]:loff[d_own] + ln[d_own]]
        self.ln_own = ln[d_own]
        self.out_rows = (max(s_own // 2, 0), s_own + 3)  # scatter(out=) smaller and larger than the slot

    def inputs_intact(self, what):
        now = (self.x_rep, self.x_part, self.Y_part, self.Y_rep, self.h, self.L)
        CHK.ok(all(np.array_equal(bits(a), bits(b)) for a, b in zip(now, self.saved)),
               f"{what}: an input was modified")


def padded(ref, R):
    out = np.zeros((R,) + ref.shape[1:], ref.dtype)
    k = min(R, ref.shape[0])
    out[:k] = ref[:k]
    return out


def check_ref(mi, res, H, dt, A):
    """Every row of every result of micro-batch ``mi`` against the reference."""
    n_own = mi.n_own
    CHK.exact("gather(replicate)", res["g_rep"], mi.G_rep)
    CHK.summed("gather(partial)", res["g_part"], mi.G_acc, mi.G_abs, A, dt)
    CHK.exact("gather_logits", res["logits"], mi.Lg)
    CHK.summed("scatter(reduce=True)", res["y"], mi.y_acc[:n_own], mi.y_abs[:n_own], T, dt)
    for R, got in zip(mi.out_rows, res["y_out"]):
        CHK.exact(f"scatter(reduce=False, out=[{R} rows])", got, padded(mi.y_rep, R))
    CHK.exact("scatter_logits", res["ls"], mi.Ls[:mi.ln_own])


# -- the two runs of one step ------------------------------------------------------------------

def run_overlapped(dp, mis):
    """Every asynchronous call of both micro-batches issued before any wait of the same kind."""
    res = [dict() for _ in mis]
    poison_arenas(dp._arenas)
    hs = [dp.gather_async(mi.x_rep, mi.p, contribution="replicate") for mi in mis]
    hl = [dp.gather_logits_async(mi.h, mi.p) for mi in mis]
    for r, h in zip(res, hs):
        r["g_rep"] = h.wait().copy()
    for r, h in zip(res, hl):
        r["logits"] = h.wait().copy()
    hs = [dp.gather_async(mi.x_part, mi.p, contribution="partial") for mi in mis]
    for r, h in zip(res, hs):
        r["g_part"] = h.wait().copy()
    hy = [dp.scatter_async(mi.Y_part, mi.p, reduce=True) for mi in mis]
    outs = [[poison((R, mi.Y_rep.shape[1]), mi.Y_rep.dtype) for R in mi.out_rows] for mi in mis]
    ho = [[dp.scatter_async(mi.Y_rep, mi.p, reduce=False, out=o) for o in os_] for mi, os_ in zip(mis, outs)]
    hls = [dp.scatter_logits_async(mi.L, mi.p) for mi in mis]
    for r, h in zip(res, hy):
        r["y"] = h.wait().copy()
    for r, hh, os_ in zip(res, ho, outs):
        got = [h.wait() for h in hh]
        CHK.ok(all(g is o for g, o in zip(got, os_)), "scatter_async(out=).wait() did not return out")
        r["y_out"] = [o.copy() for o in os_]
    for r, h in zip(res, hls):
        r["ls"] = h.wait().copy()
    return res


def run_serialized(dp, cfg, micro):
    """The same calls, synchronous, micro-batch 0 then 1, on a micro_batches=1 DpAttention."""
    res = []
    for batches, xrows, hrows, mi in micro:
        p = dp.sync(batches[RANK // cfg.A])
        r = {}
        poison_arenas(dp._arenas)
        r["g_rep"] = dp.gather(mi.x_rep, p, contribution="replicate").copy()
        r["logits"] = dp.gather_logits(mi.h, p).copy()
        r["g_part"] = dp.gather(mi.x_part, p, contribution="partial").copy()
        r["y"] = dp.scatter(mi.Y_part, p, reduce=True).copy()
        r["y_out"] = []
        for R in mi.out_rows:
            o = poison((R, cfg.H), cfg.dt)
            dp.scatter(mi.Y_rep, p, reduce=False, out=o)
            r["y_out"].append(o)
        r["ls"] = dp.scatter_logits(mi.L, p).copy()
        res.append((p, r))
    return res


def fn_double(G):
    return G + G


class Recorder:
    """fn = G + G that also keeps a copy of every G it saw (the host runner calls it eagerly)."""

    def __init__(self):
        self.seen = []

    def __call__(self, G):
        self.seen.append(G.copy())
        return G + G


def relaid(ref, p, b, D):
    """A gathered reference of plan ``p`` laid out with ``b`` rows per slot (the graph of the
    step's largest bucket): replica d's real rows at d*b, every other row zero."""
    out = np.zeros((D * b,) + ref.shape[1:], ref.dtype)
    for d in range(D):
        o, n = int(p.slot_offsets[d]), int(p.num_tokens[d])
        out[d * b:d * b + n] = ref[o:o + n]
    return out


def runner_reference(mi, dt, A):
    """What a runner with fn = G + G returns for micro-batch ``mi``: [bucket, H], rows < n the sum
    over the T ranks of 2 G[own rows] (G is the same on every rank), the rest zero."""
    b, n_own = int(mi.p.bucket), mi.n_own
    o = int(mi.p.slot_offsets[RANK // A])
    acc_t = np.int64 if dt.kind in "iu" else np.float64
    out = {}
    for c, G, absG in (("replicate", mi.G_rep.astype(acc_t), np.abs(mi.G_rep.astype(np.float64))),
                       ("partial", mi.G_acc, mi.G_abs)):
        acc = np.zeros((b, G.shape[1]), acc_t)
        ab = np.zeros((b, G.shape[1]), np.float64)
        if dt.kind in "iu":
            acc[:n_own] = (2 * T * G[o:o + n_own].astype(np.int64)).astype(dt).astype(np.int64)
        else:
            # each rank's Y = round(2 G), and G (partial) is itself a rounded sum: compare with the
            # tolerance of T + A terms
            acc[:n_own] = 2.0 * T * G[o:o + n_own]
            ab[:n_own] = 2.0 * T * absG[o:o + n_own]
        out[c] = (acc, ab)
    return out


# -- scenarios ------------------------------------------------------------------------------------

class Cfg:
    def __init__(self, A, transport, policy, graph, dtname, hidden):
        self.A, self.D = A, T // A
        self.transport, self.policy = transport, policy
        self.buckets = (A * 4, A * 8, A * 16) if graph else ()
        self.dtname, self.dt, self.H = dtname, DTYPES[dtname], hidden
        self.key = (A, transport, policy, graph, dtname, hidden)

    def __str__(self):
        return (f"A={self.A} transport={self.transport} policy={self.policy} graph={bool(self.buckets)} "
                f"dtype={self.dtname}")

    def make(self, **kw):
        dp = dg.DpAttention(comm=WORLD, attn_tp_size=self.A, hidden_size=self.H, dtype=self.dtname, backend="host",
                            spec=SPEC, policy=self.policy, graph_buckets=self.buckets, timeout_s=ARGS.timeout,
                            transport=self.transport, **kw)
        for arena in dp._arenas:
            arena._alloc = poisoned_alloc  # fresh arena memory is poisoned too (test only)
        return dp


def scenario_matrix():
    As = [a for a in (int(v) for v in ARGS.A.split(",")) if T % a == 0]
    nconf = nsteps = graph_steps = 0
    modes = set()
    for dtname in ARGS.dtypes.split(","):
        for A in As:
            for transport in ARGS.transports.split(","):
                for policy in ARGS.policies.split(","):
                    for graph in (False, True):
                        cfg = Cfg(A, transport, policy, graph, dtname, ARGS.hidden)
                        prealloc = ARGS.prealloc and graph
                        kw = {"max_tokens_per_rank": 64} if prealloc else {}
                        dp = cfg.make(micro_batches=2, **kw)
                        ser = cfg.make()
                        runners = {}
                        if graph:
                            for c in ("replicate", "partial"):
                                rec = Recorder()
                                runners[c] = (dp.graph_runner(rec, contribution=c, micro_batches=2),
                                              ser.graph_runner(fn_double, contribution=c), rec)
                        stats0 = None
                        try:
                            for s in range(ARGS.steps):
                                CHK.ctx = f"matrix {cfg} step={s}"
                                if s == 1:
                                    stats0 = dp.memory_stats()
                                graph_steps += one_step(dp, ser, cfg, s, runners, modes)
                                nsteps += 1
                            if prealloc:
                                end = dp.memory_stats()
                                for role in ("gathered", "staging", "combine", "output", "logits"):
                                    CHK.ok(end[role]["allocations"] == stats0[role]["allocations"],
                                           f"role {role}: allocated after step 1 although both micro-batches "
                                           f"were preallocated ({stats0[role]} -> {end[role]})")
                        finally:
                            dp.close()
                            ser.close()
                        nconf += 1
    CHK.ctx = "matrix coverage"
    CHK.ok(ARGS.steps < 6 or len(modes) == 6, f"not every forward mode ran: {modes}")
    CHK.ok(ARGS.steps < 6 or graph_steps > 0, "no graph step ran")
    finish("matrix", {"configs": nconf, "steps": nsteps, "graph_steps": graph_steps})


def one_step(dp, ser, cfg, s, runners, modes):
    A, D = cfg.A, cfg.D
    micro = []
    plans = []
    for i in (0, 1):
        batches, xrows, hrows = step_batches(A, D, cfg.key, s, i)
        modes.update(b.mode for b in batches)
        p = dp.sync(batches[RANK // A], micro_batch=i)
        ref = dg.plan(batches, dg.Topology(T, A), spec=SPEC, policy=cfg.policy, graph_buckets=cfg.buckets,
                      cost=dg.CostModel().with_row_bytes(cfg.H * cfg.dt.itemsize), transport=dp.planner.transport,
                      p2p_rows=dp.planner.p2p_rows, p2p_node_size=dp.planner.p2p_node_size,
                      push_rows=dp.planner.push_rows)
        CHK.ok(p == ref, lambda: f"micro-batch {i}: sync plan {p!r} != dg.plan {ref!r}")
        mi = Micro(cfg, (cfg.key, s, i), batches, xrows, hrows, p)
        micro.append((batches, xrows, hrows, mi))
        plans.append(p)
    mis = [m[3] for m in micro]
    got = run_overlapped(dp, mis)
    ser_res = run_serialized(ser, cfg, micro)
    for i, (mi, r, (ps, rs)) in enumerate(zip(mis, got, ser_res)):
        CHK.ctx = f"matrix {cfg} step={s} micro-batch {i} ({mi.p.mode.name}, {mi.p.transport})"
        CHK.ok(ps == mi.p, lambda: f"serialized plan {ps!r} differs from the micro-batch's {mi.p!r}")
        check_ref(mi, r, cfg.H, cfg.dt, A)
        for k in ("g_rep", "g_part", "logits", "y", "ls"):
            CHK.same(k, r[k], rs[k])
        for j, (a, b) in enumerate(zip(r["y_out"], rs["y_out"])):
            CHK.same(f"y_out[{j}]", a, b)
        mi.inputs_intact("overlapped and serialized calls")
    if not (runners and all(p.graph for p in plans)):
        return 0
    # the overlapped graph runner against the serialized one and the reference
    b = max(int(p.bucket) for p in plans)
    for c, (r2, r1, rec) in runners.items():
        CHK.ctx = f"matrix {cfg} step={s} runner({c}) buckets {[int(p.bucket) for p in plans]}"
        xs = [mi.x_part if c == "partial" else mi.x_rep for mi in mis]
        poison_arenas(r2._arenas)
        rec.seen = []
        outs = [o.copy() for o in r2.run(xs, plans)]
        CHK.ok(len(rec.seen) == 2, f"fn ran {len(rec.seen)} times, expected once per micro-batch")
        for i, (mi, G) in enumerate(zip(mis, rec.seen)):  # what fn saw: padding rows zero, slots of b rows
            if c == "replicate":
                CHK.exact(f"G of micro-batch {i} in the overlapped runner", G, relaid(mi.G_rep, mi.p, b, D))
            else:
                CHK.summed(f"G of micro-batch {i} in the overlapped runner", G, relaid(mi.G_acc, mi.p, b, D),
                           relaid(mi.G_abs, mi.p, b, D), A, cfg.dt)
        sers = []
        for (batches, _, _, mi), x in zip(micro, xs):
            ps = ser.sync(batches[RANK // A])
            poison_arenas(r1._arenas)
            sers.append(r1.run(x, ps).copy())
        same_bucket = plans[0].bucket == plans[1].bucket
        for i, (mi, o, so) in enumerate(zip(mis, outs, sers)):
            acc, ab = runner_reference(mi, cfg.dt, A)[c]
            CHK.summed(f"overlapped runner micro-batch {i}", o, acc, ab, T + A, cfg.dt)
            if same_bucket or cfg.dt.kind in "iu":
                CHK.same(f"overlapped runner micro-batch {i} vs serialized runner", o, so)
            else:
                CHK.summed(f"serialized runner micro-batch {i}", so, acc, ab, T + A, cfg.dt)
    return 1


# -- bad input -------------------------------------------------------------------------------------

def expect_raise(name, exc_type, fn, *, must=(), peer_must=None):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - checked below
        err = e
    else:
        err = None
    if err is None:
        CHK.fail(f"{name}: no exception (expected {exc_type.__name__})")
        return None
    if not CHK.ok(isinstance(err, exc_type),
                  f"{name}: raised {type(err).__name__}: {err} (expected {exc_type.__name__})"):
        return err
    for s in (must if (peer_must is None or RANK == BAD) else peer_must):
        CHK.ok(s in str(err), f"{name}: message does not name {s!r}: {err}")
    return err


def valid_step(dp, A, H, dt, tag, sizes=(3, 4)):
    """Sync both micro-batches with decode batches and check one overlapped gather each."""
    D = T // A
    ps = [dp.sync(dg.LocalBatch(M.DECODE, sizes[i] + RANK // A), micro_batch=i) for i in (0, 1)]
    xs = [rand_rows(("vs", tag, i, RANK // A), sizes[i] + RANK // A, H, dt) for i in (0, 1)]
    hs = [dp.gather_async(x, p) for x, p in zip(xs, ps)]
    refs = []
    for i, h in enumerate(hs):
        G = h.wait()
        refs.append(np.concatenate([rand_rows(("vs", tag, i, d), sizes[i] + d, H, dt) for d in range(D)]))
        if ps[i].mode == dg.PaddingMode.MAX_LEN:  # slots padded to the longest replica
            refs[-1] = np.concatenate([padded(rand_rows(("vs", tag, i, d), sizes[i] + d, H, dt),
                                              int(ps[i].slot_rows[d])) for d in range(D)])
        CHK.exact(f"valid step {tag} micro-batch {i}", G, refs[-1])
    valid_step.refs = refs
    return ps, xs


def scenario_badinput():
    dt, H = np.dtype(np.float32), ARGS.hidden
    for A in [a for a in (1, 2) if T % a == 0]:
        D = T // A
        kw = dict(comm=WORLD, attn_tp_size=A, hidden_size=H, dtype="float32", backend="host", timeout_s=ARGS.timeout)
        dp = dg.DpAttention(micro_batches=2, **kw)
        CHK.ctx = f"badinput A={A} handles"
        ps, xs = valid_step(dp, A, H, dt, "h0")
        # wait() twice; result before wait(); a result whose view a later call reused
        h = dp.gather_async(xs[0], ps[0])
        expect_raise("result before wait()", dg.InputError, lambda: h.result, must=("result", "wait()"))
        G0 = h.wait().copy()
        CHK.ok(h.done and np.array_equal(h.result, G0), "result after wait() differs from wait()'s")
        expect_raise("wait() twice", dg.InputError, h.wait, must=("wait()", "twice"))
        dp.gather(xs[0], ps[0])  # reuses micro-batch 0's 'gathered' view
        expect_raise("result after the view was reused", dg.InputError, lambda: h.result,
                     must=("micro-batch 0", "gathered"))
        refs = valid_step.refs
        h1 = dp.gather_async(xs[1], ps[1])  # micro-batch 1 untouched by micro-batch 0's calls
        dp.gather(xs[0], ps[0])
        CHK.exact("micro-batch 1's gathered view after a gather of micro-batch 0", h1.wait(), refs[1])
        # reading micro-batch 0's view into micro-batch 1 is fine; aliasing its own arena is not
        G0v = dp.gather(xs[0], ps[0])
        CHK.ctx = f"badinput A={A} alias"
        expect_raise("gather_async(x aliasing micro-batch 0's gathered view, plan of micro-batch 0)", dg.InputError,
                     lambda: dp.gather_async(G0v[:1], ps[0]), must=("x", "gathered", "micro-batch 0"))
        expect_raise("next sync after the alias error", dg.InputError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=0), must=("gathered",))
        # micro-batch 0's plan with micro-batch 1's gathered view, on one rank: it raises at the call
        # naming Y and the rows, writes nothing of the caller's; every rank raises at the next sync
        CHK.ctx = f"badinput A={A} plan of micro-batch 0 with micro-batch 1's result"
        ps, xs = valid_step(dp, A, H, dt, "h1", sizes=(2, 5))
        G1 = dp.gather_async(xs[1], ps[1]).wait()
        Y0 = rand_rows(("Y0",), int(ps[0].gathered_rows), H, dt)
        Yb = G1[:int(ps[0].gathered_rows) - 1] if RANK == BAD else Y0
        out = poison((4, H), dt)
        before = out.copy()
        if RANK == BAD:
            expect_raise("scatter_async(micro-batch 1's view too short, plan of micro-batch 0)", dg.InputError,
                         lambda: dp.scatter_async(Yb, ps[0], out=out), must=("Y", f"{int(ps[0].gathered_rows)}"))
            CHK.ok(np.array_equal(bits(out), bits(before)), "out= written by a call that raised")
        else:
            dp.scatter_async(Yb, ps[0], out=out).wait()
        expect_raise("the next sync()", dg.InputError, lambda: dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=1),
                     must=(f"[{BAD}]", "Y"), peer_must=(f"[{BAD}]", "Y"))
        # a stale plan of micro-batch 0 (every rank): InputError naming it; next sync raises; recovery
        CHK.ctx = f"badinput A={A} stale plan"
        ps, xs = valid_step(dp, A, H, dt, "h2")
        old = ps[0]
        dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=0)
        expect_raise("a stale plan of micro-batch 0", dg.InputError, lambda: dp.gather_async(xs[0], old),
                     must=("plan", "micro-batch 0"))
        expect_raise("the next sync() after the stale plan", dg.InputError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=1), must=("plan",))
        # a plan equal to both micro-batches' plans (a locally computed one): ambiguous
        CHK.ctx = f"badinput A={A} ambiguous plan"
        b = dg.LocalBatch(M.DECODE, 2)
        pa = dp.sync(b, micro_batch=0)
        pb = dp.sync(b, micro_batch=1)
        local = dg.plan([b] * D, dg.Topology(T, A), cost=dg.CostModel().with_row_bytes(H * 4),
                        transport=dp.planner.transport, p2p_rows=dp.planner.p2p_rows,
                        p2p_node_size=dp.planner.p2p_node_size, push_rows=dp.planner.push_rows)
        CHK.ok(local == pa == pb, "equal batches did not give equal plans")
        expect_raise("a plan equal to both micro-batches' plans", dg.InputError,
                     lambda: dp.gather(np.zeros((2, H), dt), local), must=("micro-batches [0, 1]",))
        expect_raise("the next sync() after the ambiguous plan", dg.InputError,
                     lambda: dp.sync(b, micro_batch=0), must=("micro-batches",))
        valid_step(dp, A, H, dt, "h3")
        # micro_batch out of range: on every rank, then on one rank
        CHK.ctx = f"badinput A={A} micro_batch"
        expect_raise("sync(micro_batch=2) on every rank", dg.InputError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=2), must=("micro_batch", "2", "0..1"))
        bad_mb = -1 if RANK == BAD else 0
        expect_raise("sync(micro_batch=-1) on one rank", dg.InputError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=bad_mb),
                     must=("micro_batch", "-1"), peer_must=(f"[{BAD}]", "micro_batch"))
        expect_raise("sync(micro_batch=True)", dg.InputError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=True), must=("micro_batch", "True"))
        expect_raise("memory_stats(micro_batch=5)", dg.InputError, lambda: dp.memory_stats(micro_batch=5),
                     must=("micro_batch", "5"))
        valid_step(dp, A, H, dt, "h4")
        # the overlapped runner's arguments
        dp.close()
        CHK.ctx = f"badinput A={A} runner"
        dp = dg.DpAttention(micro_batches=2, graph_buckets=(A * 4,), **kw)
        expect_raise("graph_runner(micro_batches=0)", dg.InputError,
                     lambda: dp.graph_runner(fn_double, micro_batches=0), must=("micro_batches", "0"))
        r2 = dp.graph_runner(fn_double, micro_batches=2)
        gp = [dp.sync(dg.LocalBatch(M.DECODE, 2, can_run_graph=True), micro_batch=i) for i in (0, 1)]
        x = np.ones((2, H), dt)
        expect_raise("runner.run(one plan)", dg.InputError, lambda: r2.run(x, gp[0]), must=("plan", "2 plans"))
        expect_raise("the next sync() after runner.run(one plan)", dg.InputError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 2, can_run_graph=True), micro_batch=0), must=("plan",))
        gp = [dp.sync(dg.LocalBatch(M.DECODE, 2, can_run_graph=True), micro_batch=i) for i in (0, 1)]
        expect_raise("runner.run(three inputs)", dg.InputError, lambda: r2.run([x, x, x], gp), must=("x", "2 inputs"))
        expect_raise("runner.input_view(index=2)", dg.InputError, lambda: r2.input_view(gp[0], 2), must=("index", "2"))
        expect_raise("the next sync() after runner.run(three inputs)", dg.InputError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 2, can_run_graph=True), micro_batch=0), must=("x",))
        gp = [dp.sync(dg.LocalBatch(M.DECODE, 2, can_run_graph=True), micro_batch=i) for i in (0, 1)]
        outs = r2.run([x, x], gp)
        want = np.where((np.arange(A * 4) < 2)[:, None], np.float32(2 * T), np.float32(0)) * np.ones((1, H), dt)
        for i in (0, 1):
            CHK.exact(f"runner micro-batch {i} after the errors", outs[i], want.astype(dt))
        dp.close()
        # a closed DpAttention: wait() and result raise InputError
        CHK.ctx = f"badinput A={A} closed"
        dp = dg.DpAttention(micro_batches=2, **kw)
        ps, xs = valid_step(dp, A, H, dt, "h5")
        h = dp.gather_async(xs[0], ps[0])
        dp.close()
        expect_raise("wait() after close()", dg.InputError, h.wait, must=("closed",))
        # ranks sync different micro-batches: InconsistentStepError everywhere, aborted
        CHK.ctx = f"badinput A={A} different micro-batches"
        dp = dg.DpAttention(micro_batches=2, **kw)
        valid_step(dp, A, H, dt, "h6")
        expect_raise("ranks syncing different micro-batches", dg.InconsistentStepError,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 1), micro_batch=1 if RANK == BAD else 0),
                     must=("micro-batches", "micro_batch per rank"))
        expect_raise("use after the abort", dg.CollectiveTimeout,
                     lambda: dp.sync(dg.LocalBatch(M.DECODE, 1)), must=("aborted",))
        dp.close()
    # micro_batches invalid on one rank at construction: the same ConfigError everywhere
    for bad in (0, 17, "x", True):
        CHK.ctx = f"badinput config micro_batches={bad!r}"
        mb = bad if RANK == BAD else 2
        expect_raise(f"micro_batches={bad!r} on one rank", dg.ConfigError,
                     lambda: dg.DpAttention(comm=WORLD, hidden_size=H, dtype="float32", backend="host",
                                            micro_batches=mb, timeout_s=ARGS.timeout),
                     must=("micro_batches", repr(bad)), peer_must=("micro_batches", repr(bad)))
    finish("badinput")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=("matrix", "badinput"))
    ap.add_argument("--seed", type=int, default=20250616)
    ap.add_argument("--steps", type=int, default=6, help="matrix: steps (two micro-batches each) per configuration")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16,int32")
    ap.add_argument("--A", default="1,2", help="attn_tp sizes (those dividing T run)")
    ap.add_argument("--transports", default="auto,nccl")
    ap.add_argument("--policies", default="auto,varlen")
    ap.add_argument("--prealloc", type=int, default=1, help="matrix: graph configurations preallocate both "
                                                            "micro-batches and must not allocate after step 1")
    ap.add_argument("--hidden", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=20.0)
    ARGS = ap.parse_args()
    set_seed(ARGS.seed)
    try:
        if ARGS.scenario == "matrix":
            scenario_matrix()
        else:
            scenario_badinput()
    except BaseException:  # noqa: BLE001 - reported; the harness asserts on it
        CHK.fails.append(f"OVERLAP_ERROR at {CHK.ctx}:\n{traceback.format_exc()}")
        finish(ARGS.scenario)
        raise


if __name__ == "__main__":
    main()
