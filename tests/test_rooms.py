"""Single-process unit tests of the facade's rooms: the configuration and its agreement, the
step ledger's verdicts and expectations, the step table, the arena sizes, the data plane on the
host backend (T ranks as threads, tests/thread_comm.py) and the depth of the call path."""

import sys

import numpy as np
import pytest

import dpgather as dg
from dpgather.core import RECORD_WIDTH, ForwardMode as FM

from thread_comm import Group, ThreadComm, run_ranks

from dpgather._config import agree, canonical
from dpgather._layout import OP_GATHER, OP_SCATTER, Descriptor
from dpgather._ledger import SYNC_WIDTH, Status, StepLedger

ARGS = dict(attn_tp_size=1, hidden_size=8, dtype="float32", backend="host", spec=None, policy="auto",
            graph_buckets=(), max_tokens_per_rank=None, timeout_s=5.0, cost=None, strict=False,
            transport="auto", micro_batches=1, device=None, fp8=None)


# -- configuration ------------------------------------------------------------------------------

def test_config_canonical_values_and_agreement():
    config, values, errors = canonical(4, **{**ARGS, "graph_buckets": [8, 4, 8], "dtype": "bf16"})
    assert errors == {} and config.graph_buckets == (4, 8) and config.dtype == "bfloat16"
    assert config.largest_bucket == 8 and values["graph_buckets"] == (4, 8)
    agree([(values, errors)] * 4)  # the same everywhere: no error
    with pytest.raises(dg.ConfigError, match=r"policy: .*'auto' on ranks \[0, 1\].*'varlen' on ranks \[2\]"):
        _, other, _ = canonical(4, **{**ARGS, "policy": "varlen"})
        agree([(values, {}), (values, {}), (other, {})])


@pytest.mark.parametrize("field,value,match", [
    ("timeout_s", 0, "timeout_s=0: timeout_s must be a positive number"),
    ("timeout_s", float("nan"), "timeout_s=nan"),
    ("timeout_s", "abc", "timeout_s='abc'"),
    ("hidden_size", None, "hidden_size=None: hidden_size must be a positive int"),
    ("attn_tp_size", 3, "attn_tp_size=3 must divide the number of ranks 4"),
    ("graph_buckets", (3,), r"\[3\] are not multiples of attn_tp_size=2"),
    ("micro_batches", 17, "micro_batches must be at most 16"),
    ("device", -1, "device=-1"),
    ("strict", 1, "strict must be True or False"),
])
def test_config_error_on_one_rank_is_raised_alike_everywhere(field, value, match):
    kw = {**ARGS, field: value}
    if field == "graph_buckets":
        kw["attn_tp_size"] = 2
    config, values, errors = canonical(4, **kw)
    assert config is None and field in errors
    good = canonical(4, **ARGS)[1:]
    with pytest.raises(dg.ConfigError, match=match) as e:
        agree([good, (values, errors), good, good])
    assert "(rank 1)" in str(e.value)


def test_config_device_is_per_rank():
    _, v0, e0 = canonical(2, **{**ARGS, "device": 0})
    _, v1, e1 = canonical(2, **{**ARGS, "device": 1})
    assert "device" not in v0 and not e0 and not e1
    agree([(v0, e0), (v1, e1)])  # each rank names its own GPU


# -- the step ledger ----------------------------------------------------------------------------

class FakeSync:
    """Answers ``allgather_obj`` with the messages each rank would send (set by the test)."""

    def __init__(self, msgs=None):
        self.msgs = msgs

    def allgather_obj(self, obj, what=""):
        return self.msgs if self.msgs is not None else [obj]


def sealed(ledger, mb=0, device=0, planner_record=None):
    rec = np.zeros(SYNC_WIDTH, dtype=np.int32)
    rec[:RECORD_WIDTH] = 1 if planner_record is None else planner_record
    ledger.seal(rec, mb, device)
    return rec


def test_ledger_agreeing_ranks_give_no_verdict_and_disagreeing_calls_abort():
    a, b = StepLedger(FakeSync(), 0, 1), StepLedger(FakeSync(), 1, 1)
    for ledger in (a, b):
        ledger.call(OP_GATHER, 0, 0x1234)
    ra, rb = sealed(a), sealed(b)
    assert a.verdict(np.stack([ra, rb]), ra, None) is None
    a.call(OP_GATHER, 0, 0x1234)
    b.call(OP_SCATTER, 0, 0x9999)
    ra, rb = sealed(a), sealed(b)
    a._sync.msgs = [None, None]
    v = a.verdict(np.stack([ra, rb]), ra, None)
    assert isinstance(v.error, dg.InconsistentStepError) and v.abort == "ranks issued different data-plane calls"


def test_ledger_input_failure_is_an_input_error_everywhere_and_no_abort():
    a, b = StepLedger(FakeSync(), 0, 1), StepLedger(FakeSync(), 1, 1)
    for ledger in (a, b):
        ledger.call(OP_GATHER, 0, 7)
    b.failed(dg.InputError("x must be 2-D"))
    ra, rb = sealed(a), sealed(b)
    assert rb[RECORD_WIDTH + 3] == Status.INPUT
    a._sync.msgs = [None, "InputError: x must be 2-D"]
    v = a.verdict(np.stack([ra, rb]), ra, None)
    assert isinstance(v.error, dg.InputError) and v.abort is None
    assert "rank(s) [1]" in str(v.error) and "x must be 2-D" in str(v.error)


@pytest.mark.parametrize("code,cls,status", [(1, dg.CollectiveTimeout, Status.DEVICE),
                                             (2, dg.InconsistentStepError, Status.MISMATCH)])
def test_ledger_device_errors_abort(code, cls, status):
    a, b = StepLedger(FakeSync(), 0, 1), StepLedger(FakeSync(), 1, 1)
    ra, rb = sealed(a), sealed(b, device=code)
    assert rb[RECORD_WIDTH + 3] == status
    a._sync.msgs = [None, "P2P error"]
    v = a.verdict(np.stack([ra, rb]), ra, None)
    assert isinstance(v.error, cls) and v.abort


def test_ledger_sync_counts_and_micro_batches_must_agree():
    a, b = StepLedger(FakeSync([None, None]), 0, 2), StepLedger(FakeSync(), 1, 2)
    sealed(b)  # b is one sync() ahead
    ra, rb = sealed(a), sealed(b)
    v = a.verdict(np.stack([ra, rb]), ra, None)
    assert isinstance(v.error, dg.InconsistentStepError) and "different number of times" in str(v.error)
    a, b = StepLedger(FakeSync(), 0, 2), StepLedger(FakeSync(), 1, 2)
    ra, rb = sealed(a, mb=0), sealed(b, mb=1)
    v = a.verdict(np.stack([ra, rb]), ra, None)
    assert isinstance(v.error, dg.InconsistentStepError) and "[0, 1]" in str(v.error) and v.abort


def test_ledger_invalid_batch_is_raised_with_its_class():
    a, b = StepLedger(FakeSync(["x", "ConfigError: spec needed"]), 0, 1), StepLedger(FakeSync(), 1, 1)
    ra = sealed(a)
    rb = np.zeros(SYNC_WIDTH, dtype=np.int32)
    b.seal(rb, 0)
    StepLedger.bad_batch(rb, dg.ConfigError("spec needed"))
    v = a.verdict(np.stack([ra, rb]), ra, None)
    assert type(v.error) is dg.ConfigError and "rank(s) [1]" in str(v.error) and v.abort is None


def test_ledger_expects_the_micro_batch_the_peers_call():
    ledger = StepLedger(FakeSync(), 0, 2)
    assert ledger.expected(OP_GATHER) is None and ledger.recent(2) is None
    ledger.synced(0)
    ledger.synced(1)
    assert ledger.recent(2) == [0, 1]
    assert ledger.expected(OP_GATHER) == 0  # nobody gathered yet: the oldest sync first
    ledger.call(OP_GATHER, 0, 1)
    assert ledger.expected(OP_GATHER) == 1 and ledger.expected(OP_SCATTER) == 0
    ledger.call(OP_GATHER, 1, 1)
    assert ledger.expected(OP_GATHER) == 1  # everyone gathered: the latest sync
    ledger.synced(0)  # micro-batch 0 starts its next step
    assert ledger.recent(2) == [1, 0] and ledger.expected(OP_GATHER) == 0


class _ExchangeSync(FakeSync):
    def __init__(self, table, msgs):
        super().__init__(msgs)
        self.table = table

    def exchange(self, rec):
        return self.table


def test_ledger_strict_agreement():
    table = np.zeros((2, SYNC_WIDTH), dtype=np.int32)
    table[:, 1] = 5
    assert StepLedger(_ExchangeSync(table, None), 0, 1).agree_call("gather", 5, None) is None
    table[1, 0] = 1
    v = StepLedger(_ExchangeSync(table, [None, "InputError: bad x"]), 0, 1).agree_call("gather", 5, None)
    assert isinstance(v.error, dg.InputError) and "rank(s) [1]" in str(v.error) and "Nothing was moved" in str(v.error)
    table[1, 0], table[1, 1] = 0, 6
    v = StepLedger(_ExchangeSync(table, [None, None]), 0, 1).agree_call("gather", 5, None)
    assert isinstance(v.error, dg.InconsistentStepError)


# -- the step table and arena sizes ---------------------------------------------------------------

def _table(D, A, rank, micro_batches=1):
    from dpgather._arena import Arena
    from dpgather._backends import HostBackend
    from dpgather._steps import StepTable

    be = HostBackend()
    arenas = [Arena(be.alloc) for _ in range(micro_batches)]
    return StepTable(be, Descriptor(D, A), rank, rank // A, rank % A, 1, 8, arenas)


def test_step_table_open_find_resolve():
    topo = dg.Topology(4, 2)
    p1 = dg.plan([dg.LocalBatch(FM.DECODE, 3), dg.LocalBatch(FM.DECODE, 5)], topo, policy="varlen")
    p2 = dg.plan([dg.LocalBatch(FM.DECODE, 4), dg.LocalBatch(FM.DECODE, 5)], topo, policy="varlen")
    table = _table(2, 2, rank=3, micro_batches=2)
    with pytest.raises(dg.InputError, match="no step is open"):
        table.resolve(p1)
    st = table.open(p1, 0)
    assert st.hidden.n == 5 and st.hidden.off == 3 and st.desc is st.desc_host  # host: no upload
    again = dg.plan([dg.LocalBatch(FM.DECODE, 3), dg.LocalBatch(FM.DECODE, 5)], topo, policy="varlen")
    assert table.find(p1) is st and table.find(again) is st  # an equal plan denotes the step
    assert table.find(p2) is None and table.find("plan") is None
    table.open(p2, 1)
    with pytest.raises(dg.InputError, match="must be a dpgather.Plan"):
        table.resolve(None)
    table.open(p2, 0)  # micro-batch 0 moves on: p1 is stale now
    with pytest.raises(dg.InputError, match="equals the current plans of micro-batches"):
        table.resolve(again if False else dg.plan([dg.LocalBatch(FM.DECODE, 4), dg.LocalBatch(FM.DECODE, 5)],
                                                   topo, policy="varlen"))
    with pytest.raises(dg.InputError, match="an earlier plan of micro-batch 0"):
        table.resolve(p1)


def test_step_table_relaid_descriptor_uses_bucket_slots():
    topo = dg.Topology(2, 1)
    p = dg.plan([dg.LocalBatch(FM.DECODE, 3, can_run_graph=True)] * 2, topo, graph_buckets=(4, 8))
    table = _table(2, 1, rank=1)
    st = table.open(p, 0)
    desc = table.relaid(st, 8)
    mask = table.descriptor.mask_at
    assert desc[mask:mask + 6].tolist() == [0, 3, 8, 8, 3, 8]  # (offset, tokens, slot) per replica
    assert table.relaid(st, 8) is desc


def test_arena_sizes_cover_eager_and_graph_steps():
    from dpgather._steps import arena_sizes

    eager = arena_sizes(D=4, A=2, tokens=5, row_bytes=16)
    assert eager["gathered"] == 4 * 6 * 16 and eager["combine"] >= 4 * 6 * 16 and "logits" in eager
    graph = arena_sizes(D=4, A=2, tokens=8, row_bytes=16, graph=True)
    assert "logits" not in graph and graph["combine"] >= 2 * 8 * 16
    assert arena_sizes(D=4, A=1, tokens=8, row_bytes=16, graph=True, node_replicas=3)["combine"] >= 3 * 8 * 16


# -- the data plane on the host backend, T ranks as threads --------------------------------------

def _plane(group, attn_groups, rank, T, A, logical="float32"):
    from dpgather._backends import HostBackend
    from dpgather._dataplane import DataPlane
    from dpgather.core.dtypes import host_storage

    be = HostBackend()
    attn = ThreadComm(attn_groups[rank // A], rank % A) if A > 1 else None
    return DataPlane(be, ThreadComm(group, rank), attn, {}, Descriptor(T // A, A), rank % A, A, logical,
                     host_storage(logical))


@pytest.mark.parametrize("T,A", [(2, 1), (3, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("policy", ["max_len", "sum_len", "varlen"])
def test_data_plane_gather_and_combine_against_numpy(T, A, policy):
    D, H = T // A, 5
    rng = np.random.default_rng(T * 100 + A)
    counts = rng.integers(0, 7, size=D)
    batches = [dg.LocalBatch(FM.DECODE, int(n)) if n else dg.LocalBatch(FM.IDLE) for n in counts]
    plan = dg.plan(batches, dg.Topology(T, A), policy=policy)
    provided = [max(0, int(n) - 1) for n in counts]  # fewer rows than counted: the rest is zero
    xs = [rng.standard_normal((provided[t // A], H)).astype(np.float32) for t in range(T)]
    Ys = [rng.standard_normal((plan.gathered_rows, H)).astype(np.float32) for t in range(T)]
    group, attn_groups = Group(T), [Group(A) for _ in range(D)]

    def rank_fn(r):
        table = _table(D, A, r)
        st = table.open(plan, 0)
        plane = _plane(group, attn_groups, r, T, A)
        rep = plane.gather(st.arena, xs[(r // A) * A], st.hidden, st.desc, False, "nccl").copy()
        part = plane.gather(st.arena, xs[r], st.hidden, st.desc, True, "nccl").copy()
        y = plane.combine(st.arena, Ys[r], st.hidden, st.desc, True, None, "nccl").copy()
        return rep, part, y

    results = run_ranks(T, rank_fn)
    off, slot, n = plan.slot_offsets, plan.slot_rows, plan.num_tokens
    G_rep = np.zeros((plan.gathered_rows, H), np.float32)
    G_part = np.zeros((plan.gathered_rows, H), np.float64)
    for d in range(D):
        k = min(int(n[d]), provided[d])
        G_rep[off[d]:off[d] + k] = xs[d * A][:k]
        for a in range(A):
            G_part[off[d]:off[d] + k] += xs[d * A + a][:k]
    for r, (rep, part, y) in enumerate(results):
        d = r // A
        assert np.array_equal(rep.view(np.uint32), G_rep.view(np.uint32)), f"rank {r} replicate gather"
        np.testing.assert_allclose(part, G_part, rtol=1e-6, atol=1e-6, err_msg=f"rank {r} partial gather")
        ref = np.zeros((slot[d], H), np.float64)
        ref[:n[d]] = sum(Ys[t][off[d]:off[d] + n[d]].astype(np.float64) for t in range(T))
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=f"rank {r} combine")


# -- the call path --------------------------------------------------------------------------------

def test_gather_reaches_the_first_collective_within_three_facade_frames():
    """Issue 22: from DpAttention.gather to the data plane's first collective, at most 3 frames in
    the facade's modules (the data plane and the communicators excluded)."""
    from mpi4py import MPI

    dp = dg.DpAttention(MPI.COMM_SELF, hidden_size=8, dtype="float32", backend="host", policy="max_len")
    seen = []
    ops = dp._path.plane.tp

    class Recording:
        def __getattr__(self, name):
            def record(*a, **k):
                seen.append([f.f_code for f in _frames()])
                return getattr(ops, name)(*a, **k)
            return record

    try:
        dp._path.plane.tp = Recording()
        plan = dp.sync(dg.LocalBatch(FM.DECODE, 3))
        dp.gather(np.ones((3, 8), np.float32), plan)
    finally:
        dp.close()
    assert seen, "the gather issued no collective"
    codes = seen[0]
    start = next(i for i, c in enumerate(codes) if c.co_name == "gather" and c.co_filename.endswith("_facade.py"))
    plane = next(i for i, c in enumerate(codes) if c.co_filename.endswith("_dataplane.py"))
    inside = [c.co_name for c in codes[start:plane]]
    assert len(inside) <= 3, f"{len(inside)} facade frames before the data plane: {inside}"


def _frames():
    f = sys._getframe(2)
    out = []
    while f is not None:
        out.append(f)
        f = f.f_back
    return out[::-1]
