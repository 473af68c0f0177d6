"""The planner against its rules: worked examples, an independent reference, invariants, errors.

``tests/reference_planner.py`` is a pure-Python planner written from the docs alone; the
hypothesis tests check ``dg.plan()``, ``Planner.plan_batches()`` and ``Planner.plan_table()``
against it field by field. ``DPGATHER_FUZZ_EXAMPLES`` (``make fuzz``) scales the example counts.
"""

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpgather as dg
from dpgather import ForwardMode as FM
from dpgather.core import RECORD_MAGIC, RECORD_WIDTH
from dpgather import PaddingMode as PM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_planner as ref  # noqa: E402

FUZZ = int(os.environ.get("DPGATHER_FUZZ_EXAMPLES", "0") or 0)


def examples(default):
    return max(default, FUZZ)


PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=not FUZZ)

SPEC = dg.SpecConfig(num_steps=3, topk=1, num_draft_tokens=4)
ARRAYS = ("num_tokens", "logits_tokens", "slot_rows", "slot_offsets", "logits_slot_rows",
          "logits_offsets")
SPECULATIVE = (FM.TARGET_VERIFY, FM.DRAFT_DECODE, FM.DRAFT_EXTEND)


def B(mode, bs=0, ext=0, lp=None, graph=False):
    return dg.LocalBatch(mode, bs, ext, lp, graph)


def as_tuple(b):
    return (int(b.mode), b.batch_size, b.extend_tokens, b.logprob_tokens, b.can_run_graph)


def spec_tuple(spec):
    return None if spec is None else (spec.num_steps, spec.topk, spec.num_draft_tokens)


def table_of(planner, batches, A):
    """The gathered [T, RECORD_WIDTH] table: A identical records per replica."""
    return np.stack([planner.record(b) for b in batches for _ in range(A)])


def assert_plan_equals_reference(p, r):
    assert p.mode == PM(r["mode"])
    assert p.logits_mode == PM(r["logits_mode"])
    assert isinstance(p.mode, PM) and isinstance(p.logits_mode, PM)
    for f in ("graph", "bucket", "skip", "is_extend_in_batch", "gathered_rows", "logits_rows"):
        assert getattr(p, f) == r[f], f
    for f in ARRAYS:
        assert getattr(p, f).tolist() == r[f], f
    assert p.predicted_us == pytest.approx(r["predicted_us"], rel=1e-12)
    assert p.transport == r["transport"]
    assert p.predicted_p2p_us == pytest.approx(r["predicted_p2p_us"], rel=1e-12)
    assert p.predicted_push_us == pytest.approx(r["predicted_push_us"], rel=1e-12)
    assert p.fingerprint == r["fingerprint"]


def check_invariants(p, batches, topo, spec, policy, buckets):
    D, A = topo.dp_size, topo.attn_tp_size
    nt = p.num_tokens
    # arrays: int64, read-only, sized
    for f in ARRAYS:
        a = getattr(p, f)
        assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.ndim == 1, f
        assert a.shape == ((D + 1,) if f.endswith("offsets") else (D,)), f
        assert not a.flags.writeable, f
        with pytest.raises(ValueError):
            a[0] = 1
    # counts: count_tokens, aligned under sglang only; logits never aligned
    for d, b in enumerate(batches):
        n, l = dg.count_tokens(b, spec)
        assert nt[d] == (-(-n // A) * A if policy == "sglang" else n)
        assert p.logits_tokens[d] == l
        assert p.logits_tokens[d] <= nt[d]
    if policy == "sglang":
        assert all(x % A == 0 for x in nt)
    # offsets are the exclusive prefix sums
    for rows, offs, total in ((p.slot_rows, p.slot_offsets, p.gathered_rows),
                              (p.logits_slot_rows, p.logits_offsets, p.logits_rows)):
        assert offs[0] == 0 and offs.tolist() == np.concatenate([[0], np.cumsum(rows)]).tolist()
        assert total == offs[-1]
    # slots hold their tokens
    assert (p.slot_rows >= nt).all() and (p.logits_slot_rows >= p.logits_tokens).all()
    # the graph rule
    modes = [b.mode for b in batches]
    skip = all(m == FM.IDLE for m in modes)
    graph = (bool(buckets) and not skip and FM.EXTEND not in modes
             and all(b.can_run_graph for b in batches if b.mode != FM.IDLE)
             and max(nt) <= max(buckets))
    assert p.graph == graph and p.skip == skip
    assert p.is_extend_in_batch == (FM.EXTEND in modes)
    maxn, M = int(max(nt)), -(-int(max(nt)) // A) * A
    if graph:
        assert p.mode == PM.MAX_LEN and p.logits_mode == PM.MAX_LEN
        assert p.bucket == min(x for x in buckets if x >= maxn)
        assert p.slot_rows.tolist() == [p.bucket] * D and p.gathered_rows == D * p.bucket
        lb = min(x for x in buckets if x >= max(p.logits_tokens))
        assert p.logits_slot_rows.tolist() == [lb] * D
    else:
        assert p.bucket == 0
        assert p.logits_mode in (PM.SUM_LEN, PM.VARLEN)
        assert p.logits_slot_rows.tolist() == p.logits_tokens.tolist()
        if p.mode == PM.MAX_LEN:
            assert p.slot_rows.tolist() == [M] * D and p.gathered_rows == D * M
        else:
            assert p.slot_rows.tolist() == nt.tolist() and p.gathered_rows == int(nt.sum())
    if p.mode == PM.MAX_LEN:
        assert all(x % A == 0 for x in p.slot_rows)
    forced = {"max_len": PM.MAX_LEN, "sum_len": PM.SUM_LEN, "varlen": PM.VARLEN}
    if policy in forced and not graph:
        assert p.mode == forced[policy]
    if policy == "auto" and not graph:
        c = p.predicted_us
        if p.transport in ("p2p", "push"):  # P2P (forced, or beating the best collective mode): exact layout
            assert p.mode == PM.VARLEN
        else:
            assert c[int(p.mode)] == min(c)
    if skip:
        assert p.gathered_rows == 0 and p.logits_rows == 0 and not graph


# --------------------------------------------------------------------------------------------
# worked examples (exact)


def test_sglang_decode_max_len():
    topo = dg.Topology(8, attn_tp_size=2)
    p = dg.plan([B(FM.DECODE, 5), B(FM.DECODE, 3), B(FM.IDLE), B(FM.DECODE, 8)], topo, policy="sglang")
    assert p.mode == PM.MAX_LEN and not p.graph and not p.skip and p.bucket == 0
    assert p.num_tokens.tolist() == [6, 4, 0, 8]
    assert p.logits_tokens.tolist() == [5, 3, 0, 8]
    assert p.slot_rows.tolist() == [8, 8, 8, 8]
    assert p.slot_offsets.tolist() == [0, 8, 16, 24, 32]
    assert p.gathered_rows == 32
    assert p.logits_mode == PM.SUM_LEN
    assert p.logits_slot_rows.tolist() == [5, 3, 0, 8]
    assert p.logits_offsets.tolist() == [0, 5, 8, 8, 16] and p.logits_rows == 16
    assert not p.is_extend_in_batch


def test_sglang_skewed_sum_len():
    topo = dg.Topology(8, attn_tp_size=2)
    p = dg.plan([B(FM.DECODE, 16), B(FM.IDLE), B(FM.IDLE), B(FM.IDLE)], topo, policy="sglang")
    assert p.mode == PM.SUM_LEN  # 2*16 < 16*4
    assert p.num_tokens.tolist() == [16, 0, 0, 0]
    assert p.slot_rows.tolist() == [16, 0, 0, 0]
    assert p.slot_offsets.tolist() == [0, 16, 16, 16, 16]
    assert p.gathered_rows == 16


def test_sglang_extend_forces_sum_len():
    topo = dg.Topology(4, attn_tp_size=2)
    p = dg.plan([B(FM.EXTEND, 2, 7), B(FM.DECODE, 7)], topo, policy="sglang")
    assert p.is_extend_in_batch and p.mode == PM.SUM_LEN
    assert p.num_tokens.tolist() == [8, 8] and p.slot_offsets.tolist() == [0, 8, 16]
    assert p.logits_tokens.tolist() == [2, 7]
    # one replica (D == 1): the extend rule does not apply
    p1 = dg.plan([B(FM.EXTEND, 2, 7)], dg.Topology(2, 2), policy="sglang")
    assert p1.mode == PM.MAX_LEN and p1.slot_rows.tolist() == [8]


EAGLE_BS = [8, 5, 0, 7]


@pytest.mark.parametrize("zero", ["idle", "empty"])
@pytest.mark.parametrize(
    "mode, tokens, logits",
    [
        (FM.TARGET_VERIFY, [32, 20, 0, 28], [32, 20, 0, 28]),
        (FM.DRAFT_EXTEND, [32, 20, 0, 28], [8, 5, 0, 7]),
        (FM.DRAFT_DECODE, [8, 5, 0, 7], [8, 5, 0, 7]),
    ],
)
@pytest.mark.parametrize("policy", dg.POLICIES)
def test_eagle_counts(mode, tokens, logits, zero, policy):
    topo = dg.Topology(4, attn_tp_size=1)
    batches = [B(FM.IDLE) if (bs == 0 and zero == "idle") else B(mode, bs) for bs in EAGLE_BS]
    p = dg.plan(batches, topo, spec=SPEC, policy=policy)
    assert p.num_tokens.tolist() == tokens
    assert p.logits_tokens.tolist() == logits
    assert p.logits_slot_rows.tolist() == logits and p.logits_rows == sum(logits)
    assert not p.is_extend_in_batch and not p.skip
    if p.mode == PM.MAX_LEN:
        assert p.gathered_rows == 4 * max(tokens)
    else:
        assert p.gathered_rows == sum(tokens)


def test_graph_example():
    spec = dg.SpecConfig(num_steps=3, topk=1, num_draft_tokens=4)
    topo = dg.Topology(4)
    batches = [B(FM.DRAFT_EXTEND, 3, graph=True), B(FM.DRAFT_EXTEND, 2, graph=True),
               B(FM.IDLE), B(FM.DRAFT_EXTEND, 1, graph=True)]
    p = dg.plan(batches, topo, spec=spec, policy="varlen", graph_buckets=(16, 4, 8))
    assert p.graph and p.mode == PM.MAX_LEN and p.logits_mode == PM.MAX_LEN
    assert p.bucket == 16  # max n = 12
    assert p.num_tokens.tolist() == [12, 8, 0, 4]  # real counts, the kernels zero-fill the rest
    assert p.slot_rows.tolist() == [16] * 4 and p.slot_offsets.tolist() == [0, 16, 32, 48, 64]
    assert p.gathered_rows == 64
    assert p.logits_tokens.tolist() == [3, 2, 0, 1]
    assert p.logits_slot_rows.tolist() == [4] * 4 and p.logits_rows == 16  # max l = 3 -> bucket 4
    # an IDLE replica never blocks a graph; any non-graph-able busy replica does
    off = list(batches)
    off[1] = B(FM.DRAFT_EXTEND, 2, graph=False)
    assert not dg.plan(off, topo, spec=spec, policy="varlen", graph_buckets=(16,)).graph
    # max n beyond the largest bucket: no graph
    assert not dg.plan(batches, topo, spec=spec, policy="varlen", graph_buckets=(4, 8)).graph
    # EXTEND never runs in a graph
    ext = [B(FM.EXTEND, 2, 2, graph=True)] + [B(FM.DECODE, 1, graph=True)] * 3
    pe = dg.plan(ext, topo, policy="sum_len", graph_buckets=(16,))
    assert not pe.graph and pe.bucket == 0 and pe.mode == PM.SUM_LEN


def test_graph_with_attn_tp_aligned_buckets():
    topo = dg.Topology(8, attn_tp_size=2)
    batches = [B(FM.DECODE, 5, graph=True), B(FM.DECODE, 3, graph=True), B(FM.IDLE),
               B(FM.DECODE, 9, graph=True)]
    p = dg.plan(batches, topo, policy="auto", graph_buckets=[4, 8, 12, 16])
    assert p.graph and p.bucket == 12 and p.gathered_rows == 48
    assert p.num_tokens.tolist() == [5, 3, 0, 9]
    assert p.logits_slot_rows.tolist() == [12] * 4


@pytest.mark.parametrize("policy", dg.POLICIES)
def test_all_idle_skip(policy):
    topo = dg.Topology(8, attn_tp_size=2)
    p = dg.plan([B(FM.IDLE, graph=True)] * 4, topo, policy=policy, graph_buckets=(8,))
    assert p.skip and not p.graph and p.bucket == 0 and not p.is_extend_in_batch
    assert p.gathered_rows == 0 and p.logits_rows == 0
    for f in ARRAYS:
        assert not getattr(p, f).any()
    # a DECODE batch of size 0 is not IDLE: no skip
    q = dg.plan([B(FM.DECODE, 0)] + [B(FM.IDLE)] * 3, topo, policy=policy)
    assert not q.skip and q.gathered_rows == 0


# docs/cost-model.md, "Check against the H200 pattern probe" (A=1, T=4, default constants)
COST_PATTERNS = {
    "skew": ([B(FM.EXTEND, 1, 8192), B(FM.DECODE, 1), B(FM.DECODE, 1), B(FM.DECODE, 1)],
             PM.VARLEN, (2413, 1142, 786)),
    "onehot": ([B(FM.IDLE), B(FM.EXTEND, 1, 512), B(FM.IDLE), B(FM.IDLE)],
               PM.VARLEN, (192, 117, 100)),
    "decode64": ([B(FM.DECODE, 64)] * 4, PM.MAX_LEN, (63, 83, 91)),
    "decode256": ([B(FM.DECODE, 256)] * 4, PM.MAX_LEN, (118, 186, 141)),
    "prefill-mix": ([B(FM.EXTEND, 1, 4096), B(FM.EXTEND, 1, 2048), B(FM.DECODE, 64), B(FM.IDLE)],
                    PM.VARLEN, (1229, 877, 607)),
}


@pytest.mark.parametrize("name", list(COST_PATTERNS))
def test_auto_picks_documented_mode(name):
    batches, mode, table_us = COST_PATTERNS[name]
    p = dg.plan(batches, dg.Topology(4))
    assert p.mode == mode
    assert [round(x) for x in p.predicted_us] == list(table_us)


def test_predicted_us_filled_under_every_policy():
    batches = COST_PATTERNS["decode64"][0]
    base = dg.plan(batches, dg.Topology(4)).predicted_us
    for policy in ("max_len", "sum_len", "varlen"):
        assert dg.plan(batches, dg.Topology(4), policy=policy).predicted_us == base


def test_custom_cost_model_changes_the_pick():
    batches = COST_PATTERNS["decode64"][0]
    topo = dg.Topology(4)
    assert dg.plan(batches, topo).mode == PM.MAX_LEN
    cost = dg.CostModel(mlp_row_us=10.0)  # padding rows are expensive: nothing to pad here
    assert dg.plan(batches, topo, cost=cost).mode == PM.MAX_LEN
    skew = [B(FM.DECODE, 64), B(FM.DECODE, 1), B(FM.DECODE, 1), B(FM.DECODE, 1)]
    assert dg.plan(skew, topo, cost=cost).mode != PM.MAX_LEN


# --------------------------------------------------------------------------------------------
# count_tokens


@pytest.mark.parametrize(
    "batch, expected",
    [
        (B(FM.IDLE), (0, 0)),
        (B(FM.DECODE, 7), (7, 7)),
        (B(FM.DECODE, 0), (0, 0)),
        (B(FM.EXTEND, 3, 100), (100, 3)),
        (B(FM.EXTEND, 3, 100, 40), (100, 40)),
        (B(FM.EXTEND, 0, 0), (0, 0)),
        (B(FM.TARGET_VERIFY, 5), (20, 20)),
        (B(FM.DRAFT_DECODE, 5), (5, 5)),
        (B(FM.DRAFT_EXTEND, 5), (20, 5)),
    ],
)
def test_count_tokens(batch, expected):
    assert dg.count_tokens(batch, SPEC) == expected
    n, l = dg.count_tokens(batch, SPEC)
    assert type(n) is int and type(l) is int
    t = as_tuple(batch)
    assert ref.count_tokens(*t[:4], spec=spec_tuple(SPEC)) == expected
    if batch.mode not in SPECULATIVE:
        assert dg.count_tokens(batch) == expected


def test_count_tokens_spec_shapes():
    spec = dg.SpecConfig(num_steps=5, topk=4, num_draft_tokens=8)
    assert dg.count_tokens(B(FM.TARGET_VERIFY, 3), spec) == (24, 24)
    assert dg.count_tokens(B(FM.DRAFT_DECODE, 3), spec) == (12, 12)
    assert dg.count_tokens(B(FM.DRAFT_EXTEND, 3), spec) == (18, 3)


# --------------------------------------------------------------------------------------------
# hypothesis: plan() == reference, invariants, table path, fingerprints


def divisors(n):
    return [a for a in range(1, n + 1) if n % a == 0]


SIZES = st.one_of(st.integers(0, 8), st.integers(0, 300), st.integers(0, 20000))


@st.composite
def batch_st(draw, modes):
    mode = draw(st.sampled_from(modes))
    bs = 0 if mode == FM.IDLE else draw(SIZES)
    ext, lp = 0, None
    if mode == FM.EXTEND:
        ext = bs + draw(SIZES)
        lp = draw(st.none() | st.integers(bs, ext))
    return B(mode, bs, ext, lp, draw(st.booleans()))


@st.composite
def scenario(draw, spec_modes_without_spec=False):
    T = draw(st.integers(1, 16))
    A = draw(st.sampled_from(divisors(T)))
    D = T // A
    spec = draw(st.none() | st.builds(dg.SpecConfig, st.integers(1, 4), st.integers(1, 4),
                                      st.integers(1, 8)))
    modes = list(FM) if (spec is not None or spec_modes_without_spec) else [
        FM.IDLE, FM.DECODE, FM.EXTEND]
    if draw(st.booleans()):  # a narrower mix makes graphs and ties likelier
        modes = draw(st.lists(st.sampled_from(modes), min_size=1, max_size=2, unique=True))
    batches = draw(st.lists(batch_st(modes), min_size=D, max_size=D))
    if draw(st.booleans()):  # every busy replica can replay a graph (idle ones keep theirs)
        batches = [B(b.mode, b.batch_size, b.extend_tokens, b.logprob_tokens,
                     b.can_run_graph or b.mode != FM.IDLE) for b in batches]
    policy = draw(st.sampled_from(dg.POLICIES))
    buckets = draw(st.one_of(
        st.just(()),
        st.lists(st.integers(1, 64).map(lambda k: k * A), min_size=1, max_size=5),
        st.lists(st.integers(1, 4096).map(lambda k: k * A), min_size=1, max_size=5),
    ))
    return dg.Topology(T, A), spec, policy, tuple(buckets), batches


def reference_for(topo, spec, policy, buckets, batches, cost=None, transport="auto", p2p_rows=0, p2p_node_size=0,
                  push_rows=0, wire_bytes=0):
    return ref.plan([as_tuple(b) for b in batches], topo.world_size, topo.attn_tp_size,
                    spec=spec_tuple(spec), policy=policy, graph_buckets=buckets, cost=cost,
                    transport=transport, p2p_rows=p2p_rows, p2p_node_size=p2p_node_size, push_rows=push_rows,
                    wire_bytes=wire_bytes)


#: (transport, pull capacity in rows, nodes, push capacity in rows per replica): none, a small
#: window (decode only) and a large one for each; the ranks in 1 or 2 P2P nodes (2 where a half
#: of the ranks holds whole replicas)
TRANSPORT_ST = st.tuples(st.sampled_from(dg.core.TRANSPORTS), st.sampled_from((0, 64, 1 << 20)),
                         st.sampled_from((1, 2)), st.sampled_from((0, 8, 256, 1 << 20)))


def node_size(topo, nodes):
    L = topo.world_size // nodes
    return L if nodes > 1 and topo.world_size % nodes == 0 and L % topo.attn_tp_size == 0 else 0


@settings(max_examples=examples(1200), **PROPERTY)
@given(scenario(), TRANSPORT_ST)
def test_plan_matches_reference(sc, tr):
    topo, spec, policy, buckets, batches = sc
    ns = node_size(topo, tr[2])
    p = dg.plan(batches, topo, spec=spec, policy=policy, graph_buckets=buckets, transport=tr[0], p2p_rows=tr[1],
                p2p_node_size=ns, push_rows=tr[3])
    assert_plan_equals_reference(p, reference_for(*sc, transport=tr[0], p2p_rows=tr[1], p2p_node_size=ns,
                                                  push_rows=tr[3]))
    assert p.transport == "nccl" or (tr[1] > 0 and tr[0] != "nccl" and topo.world_size > 1) or (
        p.transport == "push" and tr[3] > 0 and tr[0] in ("auto", "push") and topo.world_size > 1)
    if p.transport == "p2p":
        assert p.gathered_rows <= tr[1] and p.logits_rows <= tr[1]
        if tr[0] == "auto" and not p.graph and policy == "auto":
            assert p.predicted_p2p_us < min(p.predicted_us)
    if p.transport == "push":  # a region holds one replica's rows
        assert max(p.num_tokens) <= tr[3] and max(p.logits_tokens) <= tr[3] and p.bucket <= tr[3]
        if tr[0] == "auto" and not p.graph and policy == "auto":
            assert p.predicted_push_us < min(p.predicted_us)
    if tr[0] == "push" and not p.graph and topo.world_size > 1 and 0 < max(p.num_tokens) <= tr[3] \
            and max(p.logits_tokens) <= tr[3]:
        assert p.transport == "push"  # forced: every step that fits its windows
    if tr[0] == "p2p" or tr[3] == 0:
        assert p.transport != "push" and p.predicted_push_us == 0
    assert p.policy == policy
    assert (p.dp_size, p.attn_tp_size, p.world_size) == (topo.dp_size, topo.attn_tp_size,
                                                          topo.world_size)
    check_invariants(p, batches, topo, spec, policy, buckets)


@settings(max_examples=examples(400), **PROPERTY)
@given(scenario(), TRANSPORT_ST)
def test_all_entry_points_agree(sc, tr):
    topo, spec, policy, buckets, batches = sc
    ns = node_size(topo, tr[2])
    p = dg.plan(batches, topo, spec=spec, policy=policy, graph_buckets=buckets, transport=tr[0], p2p_rows=tr[1],
                p2p_node_size=ns, push_rows=tr[3])
    planner = dg.Planner(topo, spec=spec, policy=policy, graph_buckets=buckets, transport=tr[0], p2p_rows=tr[1],
                         p2p_node_size=ns, push_rows=tr[3])
    q = planner.plan_batches(batches)
    q2 = planner.plan_batches(iter(batches))  # any iterable
    t = table_of(planner, batches, topo.attn_tp_size)
    assert t.dtype == np.int32 and t.shape == (topo.world_size, RECORD_WIDTH)
    r = planner.plan_table(t)
    t.flags.writeable = False  # the gathered table may be read-only
    r2 = planner.plan_table(t)
    wide = np.zeros((topo.world_size, 2 * RECORD_WIDTH), np.int32)
    wide[:, ::2] = t
    r3 = planner.plan_table(wide[:, ::2])  # and non-contiguous
    for other in (q, q2, r, r2, r3):
        assert other == p
        assert other.fingerprint == p.fingerprint
        assert other.as_dict() == p.as_dict()
        assert other.predicted_us == p.predicted_us
    # the record layout (docs/internals.md)
    for d, b in enumerate(batches):
        row = t[d * topo.attn_tp_size]
        n, l = dg.count_tokens(b, spec)
        lp = -1 if b.logprob_tokens is None else b.logprob_tokens
        assert row.tolist() == [RECORD_MAGIC, int(b.mode), b.batch_size, b.extend_tokens, lp,
                                int(b.can_run_graph), n, l]
    out = np.full(RECORD_WIDTH, -7, np.int32)
    assert planner.record(batches[0], out=out) is out and out.tolist() == t[0].tolist()


@settings(max_examples=examples(300), **PROPERTY)
@given(scenario(), st.floats(0, 2), st.integers(1, 65536),
       st.tuples(st.floats(0, 50), st.floats(0, 10), st.floats(1, 1000)),
       st.tuples(st.floats(0, 40), st.floats(0, 40), st.floats(0, 40)))
def test_custom_cost_matches_reference(sc, mlp_row_us, row_bytes, gv, mode_us):
    topo, spec, policy, buckets, batches = sc
    cost = dg.CostModel(row_bytes=row_bytes, copy_GBps=1000.0, mlp_row_us=mlp_row_us, gatherv=gv,
                        all_reduce=(1.0, 0.5, 100.0), mode_us=mode_us)
    p = dg.plan(batches, topo, spec=spec, policy=policy, graph_buckets=buckets, cost=cost)
    r = reference_for(*sc, cost={"row_bytes": row_bytes, "copy_GBps": 1000.0,
                                 "mlp_row_us": mlp_row_us, "gatherv": gv,
                                 "all_reduce": (1.0, 0.5, 100.0), "mode_us": mode_us})
    assert_plan_equals_reference(p, r)


def _curve_st():
    """A measured link-time curve: 0-5 points, increasing bytes, positive times."""
    return st.lists(st.tuples(st.floats(1.0, 1e9), st.floats(0.01, 5e3)), max_size=5).map(
        lambda pts: [list(p) for p in sorted({x: t for x, t in pts}.items())])


CURVES_ST = st.fixed_dictionaries({c: st.fixed_dictionaries({"one": _curve_st(), "both": _curve_st()})
                                   for c in ("gatherv", "reduce_scatterv", "p2p", "push")})


@settings(max_examples=examples(400), **PROPERTY)
@given(scenario(), TRANSPORT_ST, CURVES_ST)
def test_link_curves_match_reference(sc, tr, curves):
    topo, spec, policy, buckets, batches = sc
    ns = node_size(topo, tr[2])
    cost = dg.CostModel(curves=curves)
    p = dg.plan(batches, topo, spec=spec, policy=policy, graph_buckets=buckets, cost=cost, transport=tr[0],
                p2p_rows=tr[1], p2p_node_size=ns, push_rows=tr[3])
    r = reference_for(*sc, cost={"curves": curves}, transport=tr[0], p2p_rows=tr[1], p2p_node_size=ns,
                      push_rows=tr[3])
    assert_plan_equals_reference(p, r)


#: bytes of one quantized gathered row: 0 (unquantized), fp8 rows of the default 7168 x bf16
#: (``Fp8Format(128).wire_bytes(7168)``), any width up to twice the row
WIRE_ST = st.one_of(st.just(0), st.just(7168 + 224), st.integers(1, 2 * 14336))


@settings(max_examples=examples(600), **PROPERTY)
@given(scenario(), TRANSPORT_ST, WIRE_ST, st.none() | CURVES_ST)
def test_wire_bytes_match_reference(sc, tr, wire, curves):
    """The quantized gather (docs/cost-model.md, "Quantized gather"): every mode, the pull and the
    push, graph steps included, priced with the gather half at ``wire_bytes``, against the
    reference; the transport and mode picks follow those predictions."""
    topo, spec, policy, buckets, batches = sc
    ns = node_size(topo, tr[2])
    cost = dg.CostModel(curves=curves) if curves else None
    kw = dict(transport=tr[0], p2p_rows=tr[1], p2p_node_size=ns, push_rows=tr[3])
    p = dg.plan(batches, topo, spec=spec, policy=policy, graph_buckets=buckets, cost=cost, wire_bytes=wire, **kw)
    r = reference_for(*sc, cost={"curves": curves} if curves else None, wire_bytes=wire, **kw)
    assert_plan_equals_reference(p, r)
    assert p.wire_bytes == wire and type(p.wire_bytes) is int
    planner = dg.Planner(topo, spec=spec, policy=policy, graph_buckets=buckets, cost=cost, wire_bytes=wire, **kw)
    assert planner.wire_bytes == wire
    q = planner.plan_table(table_of(planner, batches, topo.attn_tp_size))
    assert q == p and q.predicted_us == p.predicted_us and q.predicted_p2p_us == p.predicted_p2p_us
    check_invariants(p, batches, topo, spec, policy, buckets)


@settings(max_examples=examples(400), **PROPERTY)
@given(scenario(), TRANSPORT_ST)
def test_wire_bytes_zero_is_the_unquantized_plan(sc, tr):
    """``wire_bytes=0`` gives exactly the plan and predictions of a planner without the argument."""
    topo, spec, policy, buckets, batches = sc
    kw = dict(spec=spec, policy=policy, graph_buckets=buckets, transport=tr[0], p2p_rows=tr[1],
              p2p_node_size=node_size(topo, tr[2]), push_rows=tr[3])
    p = dg.plan(batches, topo, **kw)
    z = dg.Planner(topo, wire_bytes=0, **kw).plan_batches(batches)
    assert z == p and z.fingerprint == p.fingerprint and z.as_dict() == p.as_dict()
    assert (z.predicted_us, z.predicted_p2p_us, z.predicted_push_us) == (
        p.predicted_us, p.predicted_p2p_us, p.predicted_push_us)
    assert z.wire_bytes == p.wire_bytes == 0


def test_fp8_wire_halves_the_gather_of_a_link_bound_prefill():
    """D=2, [8192, 1] tokens of 7168 bf16 channels (14336 B), fp8 wire rows of 7168 + 224 B: the
    gather's collectives move 0.52x the bytes, the combine keeps them; with the local copies
    free (copy_GBps huge) each mode's gather time, latency included, comes out 0.51-0.56x, and
    the quantize pass adds its rows read at 14336 B and written at 7392 B at half copy_GBps (the
    kernel measured half a copy's bandwidth)."""
    R, W = 14336, 7168 + 224
    topo = dg.Topology(2)
    prefill = [dg.LocalBatch(FM.EXTEND, 1, 8192), dg.LocalBatch(FM.DECODE, 1)]
    kw = dict(transport="auto", p2p_rows=1 << 20, push_rows=1 << 20)
    fast = dg.CostModel(row_bytes=R, copy_GBps=1e12)
    base = dg.plan(prefill, topo, cost=fast, **kw)
    fp8 = dg.plan(prefill, topo, cost=fast, wire_bytes=W, **kw)
    # unquantized, gather and combine cost the same (SUM_LEN: one all-reduce each): half is the gather
    for b, f in zip((*base.predicted_us, base.predicted_p2p_us, base.predicted_push_us),
                    (*fp8.predicted_us, fp8.predicted_p2p_us, fp8.predicted_push_us)):
        gather, gather_fp8 = b / 2, f - b / 2
        assert 0.51 < gather_fp8 / gather < 0.56, (b, f)
    default = dg.CostModel(row_bytes=R)
    q = 2 * 8192 * (R + W) / (default.copy_GBps * 1e3) - 2 * 8192 * (R + W) / (fast.copy_GBps * 1e3)
    slow = dg.plan(prefill, topo, cost=default, wire_bytes=W)
    assert slow.predicted_us[2] - fp8.predicted_us[2] == pytest.approx(q, rel=1e-9)  # VARLEN: no other copy
    # the pick follows the quantized predictions (here SUM_LEN's all-reduce, VARLEN without fp8)
    assert slow.mode == PM(int(np.argmin(slow.predicted_us)))
    plain = dg.plan(prefill, topo, cost=default)
    assert plain.mode == PM(int(np.argmin(plain.predicted_us)))
    assert all(w < p for w, p in zip(slow.predicted_us, plain.predicted_us))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "7392", None, 2**62])
def test_bad_wire_bytes(bad):
    for call in (lambda: dg.Planner(dg.Topology(2), wire_bytes=bad),
                 lambda: dg.plan([B(FM.DECODE, 1)] * 2, dg.Topology(2), wire_bytes=bad)):
        with raises(dg.ConfigError, "wire_bytes", repr(bad)):
            call()


def test_push_prices_one_trip_of_line_bytes():
    """The push (docs/cost-model.md, "Push"): per collective its latency plus the slowest rank's
    link time of twice the data bytes (LL lines), written both ways (the writers' law), and the
    own rows copied locally; gather and combine cost the same."""
    R = 1000
    cost = dg.CostModel(row_bytes=R, copy_GBps=1e12, push=(2.0, 1.0, 1.0))  # 1 GB/s: 1 byte per ns
    planner = dg.Planner(dg.Topology(2), cost=cost, transport="push", push_rows=1 << 20)

    def push(n0, n1):
        return planner.plan_batches([dg.LocalBatch(dg.ForwardMode.DECODE, n) if n else
                                     dg.LocalBatch(dg.ForwardMode.IDLE) for n in (n0, n1)])

    p = push(100, 0)  # rank 0 sends 100 rows (2e5 line bytes), rank 1 receives them: 200 us each way
    assert p.transport == "push" and p.predicted_push_us == pytest.approx(2 * (2.0 + 1.0 + 200.0))
    # balanced: (i + o) / 2 = 2e5 each way on the writers' law, the same as one way without curves
    assert push(100, 100).predicted_push_us == pytest.approx(2 * (3.0 + 200.0))
    both = {"push": {"one": [[1e5, 10.0]], "both": [[1e5, 30.0]]}}
    curved = dg.Planner(dg.Topology(2), cost=dg.CostModel(row_bytes=R, copy_GBps=1e12, push=(0.0, 0.0, 1.0),
                                                          curves=both), transport="push", push_rows=1 << 20)
    q = curved.plan_batches([dg.LocalBatch(dg.ForwardMode.DECODE, 50)] * 2)  # 1e5 line bytes each way
    assert q.predicted_push_us == pytest.approx(2 * 30.0)


def test_push_takes_what_fits_and_auto_takes_what_is_fastest():
    topo = dg.Topology(2)
    dec = [dg.LocalBatch(dg.ForwardMode.DECODE, 4)] * 2
    big = [dg.LocalBatch(dg.ForwardMode.DECODE, 300)] * 2
    # forced: the push whenever the step fits its windows, else as "p2p" (the pull, else NCCL)
    assert dg.plan(dec, topo, transport="push", push_rows=256, p2p_rows=4096).transport == "push"
    assert dg.plan(big, topo, transport="push", push_rows=256, p2p_rows=4096).transport == "p2p"
    assert dg.plan(big, topo, transport="push", push_rows=256).transport == "nccl"
    assert dg.plan(dec, topo, transport="p2p", push_rows=256, p2p_rows=4096).transport == "p2p"
    # auto: the cheapest; the defaults price the push below the pull at decode sizes
    p = dg.plan(dec, topo, push_rows=256, p2p_rows=4096)
    assert p.transport == "push" and p.predicted_push_us < min(p.predicted_p2p_us, *p.predicted_us)
    slow = dg.CostModel(push=(100.0, 0.0, 350.0))
    assert dg.plan(dec, topo, push_rows=256, p2p_rows=4096, cost=slow).transport == "p2p"
    # graph steps: by the bucket alone -- the push when its windows hold the bucket, unless the
    # model prices the pull faster at a full bucket
    g = [dg.LocalBatch(dg.ForwardMode.DECODE, 3, can_run_graph=True)] * 2
    assert dg.plan(g, topo, graph_buckets=(8,), push_rows=256, p2p_rows=4096).transport == "push"
    assert dg.plan(g, topo, graph_buckets=(8,), push_rows=4, p2p_rows=4096).transport == "p2p"
    assert dg.plan(g, topo, graph_buckets=(8,), push_rows=256, p2p_rows=4096, cost=slow).transport == "p2p"
    assert dg.plan(g, topo, graph_buckets=(8,), push_rows=256, p2p_rows=4096, cost=slow,
                   transport="push").transport == "push"
    with pytest.raises(dg.ConfigError, match="push_rows"):
        dg.Planner(topo, push_rows=-1)


def test_link_curves_price_direction_and_size():
    """One-way and two-way link times come from their own curves; between points the time is
    linear in bytes, past the ends it scales at the end point's bandwidth."""
    R = 1000
    one = [[1e5, 10.0], [1e6, 20.0]]
    both = [[1e5, 30.0], [1e6, 60.0]]
    cost = dg.CostModel(row_bytes=R, copy_GBps=1e12, curves={"p2p": {"one": one, "both": both}},
                        p2p=(0.0, 0.0, 1.0))
    topo = dg.Topology(2)
    planner = dg.Planner(topo, cost=cost, transport="p2p", p2p_rows=1 << 20)

    def p2p(n0, n1):
        return planner.plan_batches([dg.LocalBatch(dg.ForwardMode.DECODE, n) if n else
                                     dg.LocalBatch(dg.ForwardMode.IDLE) for n in (n0, n1)]).predicted_p2p_us

    # one-sided: 100 rows = 1e5 bytes one way, gather and combine each 10 us (copies cost ~0)
    assert p2p(100, 0) == pytest.approx(20.0)
    # one-sided 550 rows: halfway between the points, 15 us each
    assert p2p(550, 0) == pytest.approx(30.0)
    # balanced 100 each way: the two-way curve, 30 us each
    assert p2p(100, 100) == pytest.approx(60.0)
    # past the last point: 2e6 bytes one way at the last point's 1e6 B / 20 us
    assert p2p(2000, 0) == pytest.approx(80.0)
    # below the first: 1e4 bytes at the first point's bandwidth
    assert p2p(10, 0) == pytest.approx(2.0)


@pytest.mark.parametrize("curves, match", [
    ({"all_gather": {"one": [[1, 1]]}}, "unknown collective"),
    ({"p2p": {"up": [[1, 1]]}}, "'one' and/or 'both'"),
    ({"p2p": {"one": [[2, 1], [1, 1]]}}, "increasing"),
    ({"p2p": {"one": [[1, 0]]}}, "us > 0"),
    ({"p2p": {"one": [[1, 1]] * 0 + [[float(i + 1), 1.0] for i in range(17)]}}, "at most 16"),
    ({"p2p": {"one": "x"}}, "x_bytes, us"),
])
def test_bad_curves_are_refused(curves, match):
    with pytest.raises(dg.ConfigError, match=match):
        dg.CostModel(curves=curves)


def test_curves_round_trip(tmp_path):
    cost = dg.CostModel(curves={"gatherv": {"one": [[1e5, 3.0]], "both": []}, "p2p": {"both": [[10, 1], [20, 3]]}})
    assert cost.curve("gatherv", "both") == [] and cost.curve("p2p", "both") == [(10.0, 1.0), (20.0, 3.0)]
    path = tmp_path / "cost.json"
    cost.save(path)
    again = dg.CostModel.load(path)
    assert again == cost and again.curves == cost.curves
    assert dg.CostModel.from_dict(dg.CostModel().to_dict()) == dg.CostModel()
    assert "curves" not in dg.CostModel().to_dict()
    assert cost.with_row_bytes(2).curves == cost.curves


@settings(max_examples=examples(300), **PROPERTY)
@given(scenario(spec_modes_without_spec=True))
def test_speculative_modes_need_spec(sc):
    topo, spec, policy, buckets, batches = sc
    needs = spec is None and any(b.mode in SPECULATIVE for b in batches)
    planner = dg.Planner(topo, spec=spec, policy=policy, graph_buckets=buckets)
    if not needs:
        assert_plan_equals_reference(planner.plan_batches(batches), reference_for(*sc))
        return
    for call in (lambda: dg.plan(batches, topo, spec=spec, policy=policy, graph_buckets=buckets),
                 lambda: planner.plan_batches(batches)):
        with pytest.raises(dg.ConfigError, match="spec"):
            call()
    with pytest.raises(ref.ReferenceConfigError):
        reference_for(*sc)
    b = next(b for b in batches if b.mode in SPECULATIVE)
    with pytest.raises(dg.ConfigError, match=b.mode.name):
        planner.record(b)
    with pytest.raises(dg.ConfigError, match="spec"):
        dg.count_tokens(b)
    # a table with that record (made by a planner that has a spec) is refused the same way
    other = dg.Planner(topo, spec=dg.SpecConfig(1, 1, 1))
    t = np.stack([other.record(x) if x.mode in SPECULATIVE else planner.record(x)
                  for x in batches for _ in range(topo.attn_tp_size)])
    with pytest.raises(dg.ConfigError, match="spec"):
        planner.plan_table(t)


@settings(max_examples=examples(300), **PROPERTY)
@given(scenario(), scenario())
def test_fingerprint_equal_iff_plans_equal(a, b):
    pa = dg.plan(a[4], a[0], spec=a[1], policy=a[2], graph_buckets=a[3])
    pb = dg.plan(b[4], b[0], spec=b[1], policy=b[2], graph_buckets=b[3])
    ra, rb = reference_for(*a), reference_for(*b)
    preds = ("predicted_us", "predicted_p2p_us", "predicted_push_us")
    same = {k: v for k, v in ra.items() if k not in preds} == {
        k: v for k, v in rb.items() if k not in preds} and a[0] == b[0]
    assert (pa == pb) == same
    assert (pa.fingerprint == pb.fingerprint) == same  # 64-bit: a collision here is a bug
    if same:
        assert hash(pa) == hash(pb)
    # the same step under another policy: equal exactly when the layouts agree
    for policy in dg.POLICIES:
        pc = dg.plan(a[4], a[0], spec=a[1], policy=policy, graph_buckets=a[3])
        assert (pc == pa) == (pc.fingerprint == pa.fingerprint)


def test_no_fingerprint_collisions_over_many_plans():
    rng = random.Random(1234)
    seen = {}
    for _ in range(3000):
        T = rng.choice([1, 2, 4, 8, 16])
        A = rng.choice(divisors(T))
        batches = []
        for _ in range(T // A):
            m = rng.choice([FM.IDLE, FM.DECODE, FM.EXTEND])
            bs = 0 if m == FM.IDLE else rng.randint(0, 40)
            batches.append(B(m, bs, bs + rng.randint(0, 40) if m == FM.EXTEND else 0))
        p = dg.plan(batches, dg.Topology(T, A), policy=rng.choice(dg.POLICIES))
        prev = seen.setdefault(p.fingerprint, p)
        assert prev == p, (prev, p)
    assert len(seen) > 1000


# --------------------------------------------------------------------------------------------
# bad input: the class and a message naming the argument and the bad value


def raises(cls, *needles):
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(cls)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert type(self.info.value) is cls, type(self.info.value)
            for s in needles:
                assert s in msg, f"{s!r} not in {msg!r}"
            return out

    return _Ctx()


@pytest.mark.parametrize("T, A", [(8, 3), (6, 4), (4, 8)])
def test_attn_tp_must_divide(T, A):
    with raises(dg.ConfigError, "attn_tp_size", f"={A}", str(T)):
        dg.Topology(T, A)


@pytest.mark.parametrize("T, A, arg, val", [(0, 1, "world_size", "0"), (4, 0, "attn_tp_size", "0"),
                                            (4.0, 1, "world_size", "4.0")])
def test_bad_topology_values(T, A, arg, val):
    with raises(dg.ConfigError, arg, val):
        dg.Topology(T, A)


@pytest.mark.parametrize(
    "kwargs, arg, val",
    [
        (dict(mode=FM.DECODE, batch_size=-1), "batch_size", "-1"),
        (dict(mode=FM.EXTEND, batch_size=1, extend_tokens=-3), "extend_tokens", "-3"),
        (dict(mode=FM.EXTEND, batch_size=1, extend_tokens=4, logprob_tokens=-2), "logprob_tokens", "-2"),
        (dict(mode=FM.EXTEND, batch_size=5, extend_tokens=3), "extend_tokens", "3"),
        (dict(mode=FM.EXTEND, batch_size=2, extend_tokens=9, logprob_tokens=1), "logprob_tokens", "1"),
        (dict(mode=FM.EXTEND, batch_size=2, extend_tokens=9, logprob_tokens=10), "logprob_tokens", "10"),
        (dict(mode=FM.IDLE, batch_size=3), "batch_size", "3"),
        (dict(mode=FM.DECODE, batch_size=2, extend_tokens=5), "extend_tokens", "5"),
        (dict(mode=FM.DECODE, batch_size=2, logprob_tokens=2), "logprob_tokens", "2"),
        (dict(mode=9, batch_size=2), "mode", "9"),
        (dict(mode=1.0, batch_size=2), "mode", "1.0"),  # 1.0 == DECODE: not an int
        (dict(mode=FM.DECODE, batch_size=2.5), "batch_size", "2.5"),
    ],
)
def test_bad_local_batch(kwargs, arg, val):
    with raises(dg.InputError, arg, f"got {val}"):
        dg.LocalBatch(**kwargs)


@pytest.mark.parametrize("mode", SPECULATIVE)
def test_speculative_without_spec(mode):
    topo = dg.Topology(2)
    batches = [B(mode, 3), B(FM.DECODE, 1)]
    with raises(dg.ConfigError, "spec", "None", mode.name):
        dg.plan(batches, topo)
    with raises(dg.ConfigError, "spec", "None", mode.name):
        dg.Planner(topo).plan_batches(batches)
    with raises(dg.ConfigError, "spec", "None", mode.name):
        dg.count_tokens(B(mode, 3))
    with raises(dg.ConfigError, "spec", "None", mode.name):
        dg.Planner(topo).record(B(mode, 3))
    with raises(dg.ConfigError, "spec", "'eagle'"):
        dg.count_tokens(B(mode, 3), "eagle")
    with raises(dg.ConfigError, "spec", "'eagle'"):
        dg.Planner(topo, spec="eagle")


@pytest.mark.parametrize("n", [0, 3, 5])
def test_wrong_number_of_batches(n):
    topo = dg.Topology(8, 2)
    with raises(dg.InputError, "batches", "expected 4", f"got {n}"):
        dg.plan([B(FM.DECODE, 1)] * n, topo)


@pytest.mark.parametrize("bad", ["decode", None, 3, (1, 2)])
def test_non_local_batch(bad):
    topo = dg.Topology(3)
    with raises(dg.InputError, "batches[1]", repr(bad)):
        dg.plan([B(FM.DECODE, 1), bad, B(FM.IDLE)], topo)
    with raises(dg.InputError, "batch", repr(bad)):
        dg.Planner(topo).record(bad)
    with raises(dg.InputError, "batch", repr(bad)):
        dg.count_tokens(bad)


@pytest.mark.parametrize("policy", ["fastest", "AUTO", "", None, 1])
def test_unknown_policy(policy):
    with raises(dg.ConfigError, "policy", repr(policy)):
        dg.plan([B(FM.DECODE, 1)], dg.Topology(1), policy=policy)
    with raises(dg.ConfigError, "policy", repr(policy)):
        dg.Planner(dg.Topology(1), policy=policy)


@pytest.mark.parametrize(
    "A, buckets, bad",
    [(2, (4, 3), "3"), (1, (0,), "0"), (1, (8, -8), "-8"), (4, (8, 6), "6"), (1, (8.0,), "8.0"),
     (1, ("8",), "'8'"), (1, (True,), "True"), (1, (None,), "None"), (1, 5, "5"), (2, (-2,), "-2")],
)
def test_bad_graph_buckets(A, buckets, bad):
    topo = dg.Topology(4 * A, A)
    with raises(dg.ConfigError, "graph_buckets", bad):
        dg.Planner(topo, graph_buckets=buckets)
    with raises(dg.ConfigError, "graph_buckets", bad):
        dg.plan([B(FM.DECODE, 1)] * 4, topo, graph_buckets=buckets)


def test_plan_cache_does_not_bypass_bucket_validation():
    # dg.plan() caches planners; a cached planner for (8,) must not answer for (8.0,) or (True,)
    topo = dg.Topology(4)
    batches = [B(FM.DECODE, 1, graph=True)] * 4
    assert dg.plan(batches, topo, graph_buckets=(8,)).graph
    with raises(dg.ConfigError, "graph_buckets", "8.0"):
        dg.plan(batches, topo, graph_buckets=(8.0,))
    dg.plan(batches[:1], dg.Topology(1), graph_buckets=(1,))
    with raises(dg.ConfigError, "graph_buckets", "True"):
        dg.plan(batches[:1], dg.Topology(1), graph_buckets=(True,))


def test_plan_accepts_iterator_buckets():
    topo = dg.Topology(2)
    batches = [B(FM.DECODE, 4, graph=True)] * 2
    p = dg.plan(batches, topo, graph_buckets=iter([8]))
    assert p.graph and p.bucket == 8
    # and did not poison the cache for the same buckets given as a list
    assert dg.plan(batches, topo, graph_buckets=[8]).graph


class TestRecordTable:
    T, A = 4, 2
    spec = SPEC

    def setup_method(self):
        self.topo = dg.Topology(self.T, self.A)
        self.planner = dg.Planner(self.topo, spec=self.spec)
        self.batches = [B(FM.EXTEND, 2, 9, 3), B(FM.TARGET_VERIFY, 3)]
        self.table = table_of(self.planner, self.batches, self.A)

    def test_good_table(self):
        assert self.planner.plan_table(self.table) == dg.plan(self.batches, self.topo, spec=self.spec)

    @pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.float32])
    def test_wrong_dtype(self, dtype):
        with raises(dg.InputError, "table", "int32", np.dtype(dtype).name):
            self.planner.plan_table(self.table.astype(dtype))

    @pytest.mark.parametrize("shape", [(3, 8), (4, 7), (4, 9), (32,), (1, 4, 8)])
    def test_wrong_shape(self, shape):
        t = np.zeros(shape, np.int32)
        with raises(dg.InputError, "table", "(4, 8)", str(shape)):
            self.planner.plan_table(t)

    def test_not_an_array(self):
        with raises(dg.InputError, "table", "list"):
            self.planner.plan_table(self.table.tolist())

    @pytest.mark.parametrize(
        "row, field, value, needle",
        [
            (1, 0, 0x44504732, f"magic={0x44504732}"),
            (2, 0, 0, "magic=0"),
            (0, 1, 6, "mode=6"),
            (3, 1, -1, "mode=-1"),
            (2, 2, -3, "batch_size=-3"),
            (0, 3, -1, "extend_tokens=-1"),
            (0, 4, -2, "logprob_tokens=-2"),
            (0, 4, 10, "logprob_tokens=10"),  # > extend tokens
            (0, 4, 1, "logprob_tokens=1"),  # < batch size
            (0, 3, 1, "extend_tokens=1"),  # < batch size
            (2, 3, 4, "extend_tokens=4"),  # extend fields on a non-EXTEND row
            (2, 4, 3, "logprob_tokens=3"),
            (1, 5, 2, "can_run_graph=2"),
            (1, 5, -1, "can_run_graph=-1"),
            (0, 6, 8, "num_tokens=8"),  # derived count mismatch
            (3, 7, 11, "logits_tokens=11"),
            (2, 6, -12, "num_tokens=-12"),
        ],
    )
    def test_malformed_row(self, row, field, value, needle):
        t = self.table.copy()
        t[row, field] = value
        # keep the replica consistent so the row check, not the replica check, must catch it
        d = row // self.A
        t[d * self.A:(d + 1) * self.A, field] = value
        with raises(dg.InputError, "table", f"row {d * self.A}", needle):
            self.planner.plan_table(t)

    def test_idle_row_with_requests(self):
        t = self.table.copy()
        t[0:2] = self.planner.record(B(FM.IDLE))
        t[0:2, 2] = 1
        with raises(dg.InputError, "table", "row 0", "mode=0", "batch_size=1"):
            self.planner.plan_table(t)

    def test_other_spec_is_caught(self):
        other = dg.Planner(self.topo, spec=dg.SpecConfig(3, 1, 5))
        t = table_of(other, self.batches, self.A)
        with raises(dg.InputError, "table", "row 2", "num_tokens=15"):
            self.planner.plan_table(t)

    @pytest.mark.parametrize(
        "field, value, name",
        [(2, 4, "batch_size"), (5, 1, "can_run_graph"), (4, 2, "logprob_tokens")],
    )
    def test_inconsistent_replica(self, field, value, name):
        d, a = (1, 1) if field != 4 else (0, 1)
        t = self.table.copy()
        r = d * self.A + a
        t[r] = self.planner.record(B(FM.TARGET_VERIFY, value) if field == 2 else
                                   B(FM.TARGET_VERIFY, 3, graph=True) if field == 5 else
                                   B(FM.EXTEND, 2, 9, value))
        with raises(dg.InconsistentBatchError, f"replica {d}", name, f"tp rank {r}",
                    f"{name}={value}"):
            self.planner.plan_table(t)

    def test_inconsistent_mode(self):
        planner = dg.Planner(self.topo, spec=self.spec)
        t = self.table.copy()
        t[3] = planner.record(B(FM.DECODE, 3))
        with pytest.raises(dg.InconsistentBatchError):
            planner.plan_table(t)

    @pytest.mark.parametrize(
        "out, needle",
        [(np.zeros(7, np.int32), "(8,)"), (np.zeros((1, 8), np.int32), "(8,)"),
         (np.zeros(8, np.int64), "int32"), (np.zeros(16, np.int32)[::2], "contiguous"),
         ([0] * 8, "list")],
    )
    def test_record_out(self, out, needle):
        with raises(dg.InputError, "out", needle):
            self.planner.record(self.batches[0], out=out)


def test_counts_past_int32_raise_input_error_on_both_paths():
    spec = dg.SpecConfig(1, 1, 4)
    big = dg.LocalBatch(dg.ForwardMode.TARGET_VERIFY, 2**30)
    planner = dg.Planner(dg.Topology(1), spec=spec)
    with pytest.raises(dg.InputError, match="2147483647"):
        planner.record(big)
    with pytest.raises(dg.InputError, match="2147483647"):
        dg.plan([big], dg.Topology(1), spec=spec)
    with pytest.raises(dg.InputError, match="batch_size"):
        dg.LocalBatch(dg.ForwardMode.DECODE, 2**31)
