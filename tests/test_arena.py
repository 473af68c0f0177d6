"""Arena behaviour, single process (no mpiexec): the ``Arena`` itself, and ``DpAttention``'s use of
it on an MPI communicator of size 1 (``COMM_SELF``, and ``COMM_WORLD`` of a singleton process).

Covers docs/design.md section 6: every returned buffer is an exact-size view into a per-role arena that
grows to its high-water mark and is then reused (no allocation per step in steady state),
``max_tokens_per_rank`` preallocates, and ``memory_stats()`` reports reserved bytes, peak view
bytes, allocations and requests per role.
"""

import ml_dtypes
import numpy as np
import pytest

import dpgather as dg
from dpgather._arena import ROLES, Arena

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
I32 = np.dtype(np.int32)
SPEC = dg.SpecConfig(num_steps=3, topk=2, num_draft_tokens=4)
M = dg.ForwardMode


def _ptr(a):
    return a.__array_interface__["data"][0]


class _CountingAlloc:
    def __init__(self):
        self.calls = []

    def __call__(self, nbytes):
        self.calls.append(nbytes)
        return np.full(nbytes, 0x7B, dtype=np.uint8)


def _round256(n):
    return (n + 255) // 256 * 256


# -- Arena ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [F32, F16, BF16, I32, np.dtype(np.int64), np.dtype(np.uint8)])
@pytest.mark.parametrize("rows,width", [(1, 1), (3, 5), (17, 64), (0, 8)])
def test_views_are_exact_size(dt, rows, width):
    ar = Arena(_CountingAlloc())
    v = ar.view("gathered", rows, width, dt)
    assert v.shape == (rows, width) and v.dtype == dt
    assert v.flags.c_contiguous and v.flags.writeable
    assert v.nbytes == rows * width * dt.itemsize
    if v.size:
        assert np.shares_memory(v, ar._roles["gathered"].buf)


def test_views_of_a_role_reuse_its_buffer_and_roles_are_separate():
    alloc = _CountingAlloc()
    ar = Arena(alloc)
    a = ar.view("gathered", 8, 4, F32)
    b = ar.view("gathered", 6, 4, F32)  # smaller: same memory, no allocation
    assert _ptr(a) == _ptr(b) and len(alloc.calls) == 1
    c = ar.view("output", 8, 4, F32)
    assert not np.shares_memory(a, c)
    # a view stays valid (same memory) until the next request of its role, which reuses it
    b[...] = 1.0
    d = ar.view("gathered", 6, 4, F32)
    assert (d == 1.0).all()


def test_sub_views_are_aligned_and_disjoint():
    ar = Arena(_CountingAlloc())
    specs = ((3, 5, F32), (7, 3, F16), (1, 1, BF16), (4, 9, I32))
    views = ar.views("staging", specs)
    base = _ptr(ar._roles["staging"].buf)
    for v, (rows, width, dt) in zip(views, specs):
        assert v.shape == (rows, width) and v.dtype == dt
        assert (_ptr(v) - base) % 256 == 0
    for i, v in enumerate(views):
        for w in views[i + 1:]:
            assert not np.shares_memory(v, w)
    for i, v in enumerate(views):
        v.view(np.uint8)[...] = i + 1
    for i, v in enumerate(views):
        assert (v.view(np.uint8) == i + 1).all()


def test_growth_to_the_high_water_mark_then_no_allocation():
    alloc = _CountingAlloc()
    ar = Arena(alloc, growth=1.25)
    ar.view("combine", 10, 100, F32)  # 4000 B
    st = ar.stats()["combine"]
    assert st["reserved_bytes"] == _round256(4000) and st["allocations"] == 1
    ar.view("combine", 11, 100, F32)  # 4400 B > 4096: grows to max(4400, 1.25 * 4096) = 5120
    st = ar.stats()["combine"]
    assert st["reserved_bytes"] == _round256(max(4400, int(4096 * 1.25))) and st["allocations"] == 2
    for rows in (1, 12, 5, 12, 0, 12):  # <= 5120 B each: steady state
        ar.view("combine", rows, 100, F32)
    st = ar.stats()["combine"]
    assert st["allocations"] == 2 and st["requests"] == 8
    assert st["peak_view_bytes"] == 12 * 100 * 4 <= st["reserved_bytes"]
    assert alloc.calls == [4096, 5120]


def test_zero_byte_request_on_a_fresh_role_allocates_nothing():
    # regression: a zero-row view (all-IDLE step, empty logits slot) before the role ever held
    # memory used to fail with "'NoneType' object is not subscriptable"
    alloc = _CountingAlloc()
    ar = Arena(alloc)
    v = ar.view("logits_output", 0, 7, F32)
    assert v.shape == (0, 7) and v.dtype == F32
    st = ar.stats()["logits_output"]
    assert st["allocations"] == 0 and st["reserved_bytes"] == 0 and st["requests"] == 1
    assert [c for c in alloc.calls if c] == []


@pytest.mark.parametrize("specs", [
    ((1, 5, F32), (0, 5, F32)),
    ((0, 5, F32), (3, 5, F32)),
    ((0, 5, F32), (0, 5, F32)),
    ((2, 5, F16), (0, 5, F16), (1, 5, F16)),
])
def test_empty_sub_views_have_their_own_address(specs):
    # regression: numpy puts an empty slice buf[k:k] at the buffer start, so an empty chunk
    # aliased the send view and MPI rejected reduce_scatterv(send, chunk) ("Buffers must not
    # be aliased") for a replica with fewer tokens than attn_tp ranks
    ar = Arena(_CountingAlloc())
    views = ar.views("staging", specs)
    ptrs = [_ptr(v) for v in views]
    assert len(set(ptrs)) == len(ptrs), ptrs
    for v, (rows, width, dt) in zip(views, specs):
        assert v.shape == (rows, width) and v.dtype == dt


def test_reserve_contains_stats_release():
    ar = Arena(_CountingAlloc())
    ar.reserve("gathered", 1000)
    ar.reserve("gathered", 500)  # smaller: nothing
    st = ar.stats()
    assert st["gathered"]["reserved_bytes"] == 1024 and st["gathered"]["allocations"] == 1
    assert st["gathered"]["requests"] == 0
    v = ar.view("gathered", 10, 10, F32)
    assert ar.contains(_ptr(v), v.nbytes) == "gathered"
    assert ar.contains(_ptr(v) + 1000, 24) == "gathered"
    outside = np.zeros(16, np.uint8)
    assert ar.contains(_ptr(outside), 16) is None
    assert ar.contains(_ptr(v), 0) is None
    ar.view("output", 3, 3, F16)
    st = ar.stats()
    assert set(st) == set(ROLES) | {"total"}
    for key in ("reserved_bytes", "peak_view_bytes", "allocations", "requests"):
        assert st["total"][key] == sum(st[r][key] for r in ROLES)
    ar.release()
    assert all(ar.stats()[r]["reserved_bytes"] == 0 for r in ROLES)
    assert ar.contains(_ptr(v), v.nbytes) is None


# -- DpAttention on a communicator of size 1 ---------------------------------------------------

@pytest.fixture(params=["COMM_SELF", "COMM_WORLD"])
def comm(request):
    """COMM_SELF, and COMM_WORLD of this (singleton) process. MPI is initialised here, when a test
    runs, not at collection (an MPI singleton's runtime variables would otherwise leak into every
    launcher a later test starts)."""
    from mpi4py import MPI

    c = getattr(MPI, request.param)
    if c.Get_size() != 1:
        pytest.skip(f"{request.param} has {c.Get_size()} ranks")
    return c


def _dp(comm, **kw):
    kw.setdefault("hidden_size", 6)
    kw.setdefault("dtype", "float32")
    return dg.DpAttention(comm=comm, backend="host", spec=SPEC, timeout_s=10, **kw)


def _role_buf(dp, role):
    return dp._arenas[0]._roles[role].buf


def _rows(n, w, dt, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, w)) * 3).astype(dt)


def test_facade_outputs_are_exact_views_of_their_roles(comm):
    with _dp(comm, policy="max_len") as dp:
        p = dp.sync(dg.LocalBatch(M.EXTEND, 2, extend_tokens=9, logprob_tokens=3))
        x = _rows(9, 6, F32)
        G = dp.gather(x, p)
        assert G.shape == (p.gathered_rows, 6) == (9, 6) and np.shares_memory(G, _role_buf(dp, "gathered"))
        np.testing.assert_array_equal(G, x)
        Y = _rows(9, 6, F32, 1)
        y = dp.scatter(Y, p)
        assert y.shape == (9, 6) and np.shares_memory(y, _role_buf(dp, "output"))
        np.testing.assert_array_equal(y, Y)
        h = _rows(3, 6, F32, 2)
        g = dp.gather_logits(h, p)
        assert g.shape == (3, 6) and np.shares_memory(g, _role_buf(dp, "logits"))
        np.testing.assert_array_equal(g, h)
        L = _rows(3, 11, F32, 3)
        ls = dp.scatter_logits(L, p)
        assert ls.shape == (3, 11) and np.shares_memory(ls, _role_buf(dp, "logits_output"))
        np.testing.assert_array_equal(ls, L)


def test_view_is_reused_by_the_next_call_of_its_role(comm):
    with _dp(comm) as dp:
        p = dp.sync(dg.LocalBatch(M.DECODE, 4))
        G1 = dp.gather(_rows(4, 6, F32, 1), p)
        keep = G1.copy()
        G2 = dp.gather(_rows(4, 6, F32, 2), p)
        assert _ptr(G1) == _ptr(G2)  # documented: valid until the next call of the same role
        assert not np.array_equal(G1, keep)
        y = dp.scatter(_rows(4, 6, F32, 3), p)  # another role: G2 untouched
        assert not np.shares_memory(y, G2)
        np.testing.assert_array_equal(G2, _rows(4, 6, F32, 2))


def test_growth_then_steady_state(comm):
    with _dp(comm, hidden_size=16, dtype="bfloat16") as dp:
        def step(n):
            p = dp.sync(dg.LocalBatch(M.DECODE, n))
            dp.gather(_rows(n, 16, BF16), p, contribution="partial")
            dp.scatter(_rows(p.gathered_rows, 16, BF16), p, reduce=True)
            dp.gather_logits(_rows(n, 16, BF16), p)
            dp.scatter_logits(_rows(p.logits_rows, 5, F32), p)

        allocs = []
        for n in (1, 4, 16, 64):
            step(n)
            allocs.append(dp.memory_stats()["total"]["allocations"])
        assert allocs == sorted(allocs) and allocs[-1] > allocs[0]
        before = dp.memory_stats()
        for n in (64, 3, 0, 17, 64, 1):
            step(n)
        after = dp.memory_stats()
        for role in ROLES:
            assert after[role]["allocations"] == before[role]["allocations"], role
            assert after[role]["reserved_bytes"] == before[role]["reserved_bytes"], role
        for role in ("gathered", "output", "logits", "logits_output"):
            assert after[role]["requests"] == before[role]["requests"] + 6, role
        # the high-water mark: 64 rows of 16 bfloat16
        assert after["gathered"]["peak_view_bytes"] == 64 * 16 * 2 <= after["gathered"]["reserved_bytes"]


def test_all_idle_first_step_allocates_nothing(comm):
    # regression: a zero-row first request crashed (arena role without a buffer)
    with _dp(comm) as dp:
        p = dp.sync(dg.LocalBatch(M.IDLE))
        assert p.skip and p.gathered_rows == 0
        G = dp.gather(np.zeros((0, 6), F32), p)
        y = dp.scatter(np.zeros((0, 6), F32), p)
        g = dp.gather_logits(np.zeros((0, 6), F32), p)
        ls = dp.scatter_logits(np.zeros((0, 7), F32), p)
        ids = dp.mask_topk_ids(np.zeros((0, 2), np.int32), p)
        assert G.shape == (0, 6) and y.shape == (0, 6) and g.shape == (0, 6) and ls.shape == (0, 7)
        assert ids.shape == (0, 2)
        out = np.full((3, 6), 5.0, F32)
        dp.scatter(np.zeros((0, 6), F32), p, out=out)
        assert (out == 0).all()
        st = dp.memory_stats()
        assert st["total"]["allocations"] == 0 and st["total"]["reserved_bytes"] == 0


@pytest.mark.parametrize("policy", ["auto", "sglang", "max_len", "sum_len", "varlen"])
@pytest.mark.parametrize("buckets", [(), (4, 16, 32)])
def test_preallocation_covers_every_step_up_to_the_limit(comm, policy, buckets):
    H, maxn = 8, 32
    with _dp(comm, hidden_size=H, dtype="float16", policy=policy, graph_buckets=buckets,
             max_tokens_per_rank=maxn) as dp:
        st0 = dp.memory_stats()
        row = H * 2
        for role in ("gathered", "output", "logits"):
            assert st0[role]["reserved_bytes"] >= maxn * row and st0[role]["allocations"] == 1, role
        assert st0["logits_output"]["allocations"] == 0  # its width (vocab shard) is unknown
        rng = np.random.default_rng(5)
        batches = [dg.LocalBatch(M.DECODE, maxn, can_run_graph=True), dg.LocalBatch(M.IDLE),
                   dg.LocalBatch(M.EXTEND, 1, extend_tokens=maxn, logprob_tokens=maxn),
                   dg.LocalBatch(M.TARGET_VERIFY, maxn // 4, can_run_graph=True),
                   dg.LocalBatch(M.DRAFT_EXTEND, maxn // 4, can_run_graph=True),
                   dg.LocalBatch(M.DRAFT_DECODE, maxn // 2)]
        batches += [dg.LocalBatch(M.DECODE, int(n), can_run_graph=bool(n % 2)) for n in rng.integers(0, maxn + 1, 10)]
        for b in batches:
            p = dp.sync(b)
            n, l = dg.count_tokens(b, SPEC)
            for rows in (n, max(n - 1, 0)):  # exact and short inputs (staging path)
                dp.gather(_rows(rows, H, F16), p, contribution="partial")
                dp.gather(_rows(rows, H, F16), p)
                dp.gather_logits(_rows(min(rows, l), H, F16), p)
            Y = _rows(p.gathered_rows, H, F16)
            dp.scatter(Y, p)
            dp.scatter(Y, p, reduce=False)
            dp.scatter(Y, p, out=np.empty((max(int(p.slot_rows[0]) - 1, 0), H), F16))
            dp.scatter(Y, p, out=np.empty((int(p.slot_rows[0]) + 2, H), F16))
        st = dp.memory_stats()
        for role in ROLES:
            if role != "logits_output":
                assert st[role]["allocations"] == st0[role]["allocations"], (role, st0[role], st[role])
        assert st["gathered"]["requests"] > st0["gathered"]["requests"]


@pytest.mark.parametrize("mode", ["max_len", "sum_len", "varlen", "sglang"])
def test_single_rank_rows_and_padding(comm, mode):
    # T=1 reference: G = x clamped to n and zero-padded; scatter = Y's own slot, zero past n
    with _dp(comm, policy=mode, graph_buckets=(8, 32)) as dp:
        for b, rows in ((dg.LocalBatch(M.DRAFT_EXTEND, 3, can_run_graph=True), 7),  # fewer than 12
                        (dg.LocalBatch(M.DECODE, 5, can_run_graph=True), 9),  # more rows than n
                        (dg.LocalBatch(M.EXTEND, 2, extend_tokens=6), 6)):
            p = dp.sync(b)
            n = int(p.num_tokens[0])
            x = _rows(rows, 6, F32, rows)
            ref = np.zeros((p.gathered_rows, 6), F32)
            k = min(n, rows)
            ref[:k] = x[:k]
            for contribution in ("replicate", "partial"):
                np.testing.assert_array_equal(dp.gather(x, p, contribution=contribution), ref)
            Y = _rows(p.gathered_rows + 2, 6, F32, 99)
            yref = Y[:n]  # scatter returns this replica's own rows
            np.testing.assert_array_equal(dp.scatter(Y, p), yref)
            np.testing.assert_array_equal(dp.scatter(Y, p, reduce=False), yref)
