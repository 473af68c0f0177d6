"""kernels/push.cu itself, executed on the CPU (tests/push_emu), against tests/push_reference.py.

The kernel source is compiled with g++ (its PTX replaced by tests/push_emu/push_emu.h); every
rank's blocks run concurrently, 256 fiber threads each, while the emulated lines tear into
8-byte halves stored and loaded in random order and stores are deferred past later ones, so the
protocol's arrival checks, the slot sets, the epochs and their wrap, the tile dealing over
blocks, the clamps, the sums and the error paths of the real source run here. Not covered: the
GPU memory model itself, the PTX (ptxas checks it in test_cuda_compile.py), speed.
"""

import time

import numpy as np
import pytest

import p2p_emu
import push_cases as pc
import push_emu
import push_reference as ref
from dpgather.kernels import _push

pytestmark = pytest.mark.skipif(not p2p_emu.available(), reason="needs g++ on x86-64")

#: Builds: the kernel's own active-block rule (small cases: one block); every block of the grid
#: active (the depart counter, tiles dealt over blocks); one line per thread and tile, every
#: block active and an early back-off (many tiles per job, the sleep path), with the per-phase
#: stamps on (test_phase_stamps_are_in_order).
VARIANTS = {
    "own-rule": (),
    "every-block-active": ("DPG_P2P_PUSH_ACTIVE_BYTES=1",),
    "small-tiles": ("DPG_P2P_PUSH_ACTIVE_BYTES=1", "DPG_P2P_PUSH_UNROLL=1", "DPG_P2P_PUSH_SLEEP_AFTER=8",
                    "DPG_P2P_PUSH_PHASE_TIMES=1"),
}
CHAOS = (100, 20)  # per mille of stores deferred, of halves split by a yield


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def so(request, tmp_path_factory):
    lib = push_emu.build(tmp_path_factory.mktemp("push_emu"), defines=VARIANTS[request.param])
    lib.variant = request.param
    lib.push_set_chaos(*CHAOS, 12345)
    return lib


def run(cluster, case, grid=None, launch=None, shift=0, delay_us=None):
    """One case on ``cluster``: poisoned outputs, the kernel, then every byte of every row
    against the reference (and the data plane's semantics where the case has them)."""
    t = cluster.t
    outs0 = [pc.poisoned(case.out_rows[r], case.inputs[r].shape[1], case.dtype) for r in range(t)]
    exp, _ = ref.push_ref(list(case.inputs), list(case.descs), list(case.desc_off), case.row_bytes, case.dtype,
                          list(case.out_rows), cluster.layout.cap_bytes, outs=outs0)
    inputs = [p2p_emu.aligned_like(a, shift=shift) for a in case.inputs]
    outputs = [p2p_emu.aligned_like(o, shift=shift) for o in outs0]
    errors = cluster.push(inputs, outputs, list(case.descs), list(case.desc_off), case.row_bytes, case.dtype,
                          launch=launch, grid=grid, delay_us=delay_us)
    bad = [f"rank {r}: {m}" for r in range(t) if (m := pc.check(outputs[r], exp[r]))]
    bad += [f"rank {r}: input modified" for r in range(t) if pc.check(inputs[r], case.inputs[r])]
    if case.expect is not None:
        bad += [f"rank {r}: reference != semantics: {m}" for r in range(t) if (m := pc.check(exp[r], case.expect[r]))]
    return errors, bad


def test_every_specialisation_is_built(so):
    names = {so.push_name(i).decode() for i in range(so.push_count())}
    assert names == set(_push.NAME_EXPRESSIONS)


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_kernel_matrix(so, nranks):
    if so.variant != "own-rule" and nranks == 4:
        pytest.skip("multi-block builds: the matrix runs at 1-3 ranks (own-rule runs 4)")
    cases = pc.build_cases(nranks, seed=4321)
    clusters = {}
    fails = []
    torn0 = push_emu.stats(so)
    for i, case in enumerate(cases):
        t = len(case.inputs)  # pretend nodes: a case of the ranks of one node
        cl = clusters.setdefault(t, push_emu.Cluster(so, t, pc.CAP_BYTES, timeout_s=60))
        delays = [(i * 7 + 3 * r) % 5 * 400 if i % 9 == 4 else 0 for r in range(t)]  # late ranks
        errors, bad = run(cl, case, grid=1 + i % 3, delay_us=delays)
        if any(errors):
            fails.append(f"{case.name}: error words {errors}")
        fails += [f"{case.name} {b}" for b in bad]
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:30])
    runs = {t: sum(len(c.inputs) == t for c in cases) for t in clusters}
    for t, cl in clusters.items():
        for r in range(t):
            assert cl.state(r) == (1 + runs[t], 0, 0)  # epoch, depart, err
    if nranks > 1:
        torn, deferred = (a - b for a, b in zip(push_emu.stats(so), torn0))
        assert deferred > 0, "the emulation deferred no store: the reordering path did not run"


def test_vector_widths_and_unaligned_buffers(so):
    # buffers 4 / 2 / 1 bytes off an 8-byte boundary: 4-, 2- and 1-byte accesses
    cases = [c for c in pc.build_cases(2, seed=99, clamp=False)
             if c.name.startswith(("gather_partial A=2", "combine A=1", "logits A=1"))]
    assert cases
    cluster = push_emu.Cluster(so, 2, pc.CAP_BYTES)
    for shift in (4, 2, 1):
        for case in cases:
            if shift % pc.ITEMSIZE[case.dtype] or len(case.inputs) != 2:
                continue  # element-misaligned buffers are refused by the launcher
            errors, bad = run(cluster, case, shift=shift)
            assert not any(errors) and not bad, (shift, case.name, bad)


def test_both_argument_packings_run_the_kernel(so):
    # the programmatic dependent launch's packing (kernels._p2p.PackedParams, the default here)
    # and CuPy's (every value in its own buffer) give the kernel the same arguments
    case = next(c for c in pc.build_cases(2, seed=7, clamp=False) if c.name.startswith("combine A=1") and len(c.inputs) == 2)
    for boxed in (False, True):
        errors, bad = run(push_emu.Cluster(so, 2, pc.CAP_BYTES, boxed=boxed), case)
        assert not any(errors) and not bad, (boxed, bad)


def test_phase_stamps_are_in_order(so):
    # DPG_P2P_PUSH_PHASE_TIMES: block 0 stamps its phases (kernels._push.PHASES) into the state
    # area of its window, in order; builds without the switch store nothing there
    case = next(c for c in pc.build_cases(2, seed=3, clamp=False) if c.name.startswith("gather_partial A=1") and len(c.inputs) == 2)
    cluster = push_emu.Cluster(so, 2, pc.CAP_BYTES)
    errors, bad = run(cluster, case, grid=1)
    assert not any(errors) and not bad
    for r in range(2):
        at = _push.TIMES_OFF
        stamps = cluster.windows[r][at:at + 8 * len(_push.PHASES)].view(np.uint64).tolist()
        if so.variant != "small-tiles":
            assert stamps == [0] * len(_push.PHASES)
            continue
        assert all(stamps) and stamps == sorted(stamps[:6]) + stamps[6:], stamps
        assert stamps[6] >= stamps[3], stamps  # published after block 0 received


def test_many_consecutive_collectives_alternate_sets_and_vary_counts(so):
    # 60 collectives on the same windows, no reset: both slot sets reused many times, counts,
    # operations, dtypes and widths changing every time, late ranks now and then
    rng = np.random.default_rng(5)
    t = 3
    cluster = push_emu.Cluster(so, t, pc.CAP_BYTES)
    for i in range(60):
        dtype = pc.DTYPES[i % len(pc.DTYPES)]
        op = pc.OPS[i % len(pc.OPS)]
        counts = rng.integers(0, 7, t).tolist()
        width = int(rng.integers(1, 9))
        case = pc.layout_case(f"#{i} {op}", t, 1, t, 0, counts, counts, op, dtype, width, "exact", i)
        delays = rng.integers(0, 3000, t).tolist() if i % 4 == 1 else None
        errors, bad = run(cluster, case, grid=1 + i % 3, delay_us=delays)
        assert not any(errors) and not bad, (i, case.name, errors, bad)
    assert [cluster.state(r)[0] for r in range(t)] == [61] * t


def test_large_rows_many_tiles_per_block(so):
    # 16 KiB rows: 2048 lines each, several tiles per job and per block
    t, width, rows = 2, 4096, 12
    cap = rows * width * 4
    cluster = push_emu.Cluster(so, t, cap)
    for op in pc.OPS:
        counts = [rows, rows - 5] if op != "combine" else [rows // 2, rows // 2 - 3]
        case = pc.layout_case(f"large {op}", t, 1, t, 0, counts, counts, op, "float32", width, "exact", 3)
        for grid in (1, 3, 4):
            errors, bad = run(cluster, case, grid=grid)
            assert not any(errors) and not bad, (op, grid, bad)


def _plant(cluster, epoch, set_, sig):
    """Fill every line of set ``set_`` of every window (headers too) with garbage carrying
    ``epoch``: what lines of the previous cycle would hold without the clear at the wrap."""
    word = np.uint64(epoch << 32 | 0x5A5A5A5A)
    for r in range(cluster.t):
        for j in range(cluster.t - 1):
            cluster.region(r, set_, j)[...] = word
        cluster.headers(r, set_)[...] = np.uint64(epoch << 32 | sig)


def test_epochs_wrap_at_2_pow_32_and_stale_lines_never_match(so):
    # from 2^32 - 3: epochs 2^32-2, 2^32-1 (each clears its set), then 2, 3, 4, 5. Lines and
    # headers of both sets are planted with epochs 2 and 3 of "the next cycle" first; the two
    # collectives before the wrap move few rows (most planted lines stay), the ones after it
    # more, with rank 1 starting late: a receiver would read planted lines if they survived.
    t = 3
    cluster = push_emu.Cluster(so, t, pc.CAP_BYTES, epoch0=2**32 - 3)
    _plant(cluster, 2, 0, 0xBAD)
    _plant(cluster, 3, 1, 0xBAD)
    expect = [2**32 - 2, 2**32 - 1, 2, 3, 4, 5]
    for i, e in enumerate(expect):
        counts = [0, 1, 0] if e > 2**31 else [3, 4, 2] if i % 2 else [4, 2, 5]
        case = pc.layout_case(f"wrap #{i}", t, 1, t, 0, counts, counts, pc.OPS[i % 3], "bfloat16", 3, "exact", i)
        delays = [0, 30000, 0] if e < 2**31 else None
        errors, bad = run(cluster, case, grid=2, delay_us=delays)
        assert not any(errors) and not bad, (i, e, errors, bad)
        assert [cluster.state(r)[0] for r in range(t)] == [e] * t
        if e >= 2**32 - 2:  # the set of this epoch was cleared after it was read
            for r in range(t):
                assert not cluster.headers(r, e & 1).any()
                assert not any(cluster.region(r, e & 1, j).any() for j in range(t - 1))


def _tiny(cluster, sig=(7, 7, 7), launch=None, rows=2, delay_us=None):
    t = cluster.t
    ins = [p2p_emu.aligned_like(np.full((rows, 4), r + 1, np.int32)) for r in range(t)]
    outs = [p2p_emu.aligned_like(np.full((rows, 4), -5, np.int32)) for _ in range(t)]
    descs = [ref.make_desc(sig[r % len(sig)], [(0, rows, 0, 0, t)], [(0, rows, rows, 0, 0, t, 1)])
             for r in range(t)]
    errors = cluster.push(ins, outs, descs, 0, 16, "int32", launch=launch, grid=3, delay_us=delay_us)
    return errors, outs


def test_timeout_sets_error_1_and_later_launches_refuse(so):
    cluster = push_emu.Cluster(so, 2, 4096, timeout_s=0.3)
    errors, outs = _tiny(cluster)
    assert errors == [0, 0] and all((o == 3).all() for o in outs)
    t0 = time.monotonic()
    errors, outs = _tiny(cluster, launch=[1, 0])  # rank 1 never arrives
    el = time.monotonic() - t0
    assert errors == [1, 0] and 0.29 <= el < 5, (errors, el)
    assert (outs[0] == -5).all()  # the peer's rows never came: nothing summed
    assert cluster.state(0)[2] == 1 | 1 << 32  # committed | pending << 32
    # rank 1 arrives late: rank 0 refuses at once; rank 1 completes the collective rank 0 stored
    errors, outs = _tiny(cluster)
    assert errors[0] == 1 and (outs[0] == -5).all()
    assert errors[1] == 0 and (outs[1] == 3).all()
    # ... and its next collective, which nobody else enters, times out
    errors, outs = _tiny(cluster)
    assert errors == [1, 1] and (outs[1] == -5).all()


def test_fewer_lines_than_expected_is_a_timeout(so):
    # the same signature, but rank 0 stores one row where rank 1 reads two: error 1 on rank 1
    cluster = push_emu.Cluster(so, 2, 4096, timeout_s=0.3)
    ins = [p2p_emu.aligned_like(np.full((2, 4), r + 1, np.int32)) for r in range(2)]
    outs = [p2p_emu.aligned_like(np.full((2, 4), -5, np.int32)) for _ in range(2)]
    descs = [ref.make_desc(7, [(0, 1 + r, 0, 0, 2)], [(0, 2, 2, 0, 1 - r, 1, 1)]) for r in range(2)]
    errors = cluster.push(ins, outs, descs, 0, 16, "int32", grid=2)
    assert errors == [0, 1], errors


@pytest.mark.parametrize("stagger_us", [0, 20000])
def test_signature_mismatch_sets_error_2_on_every_rank(so, stagger_us):
    # staggered blocks: a rank's first block may see the mismatch before its last block started;
    # that one must still send its headers, or the peers would only time out
    so.emu_set_stagger(stagger_us)
    try:
        cluster = push_emu.Cluster(so, 3, 4096, timeout_s=30)
        assert _tiny(cluster)[0] == [0, 0, 0]
        t0 = time.monotonic()
        # rank 2 issues another operation, which moves other rows: still a mismatch, promptly
        errors, outs = _tiny(cluster, sig=(7, 7, 8), delay_us=[0, 0, 20000])
        assert errors == [2, 2, 2], errors
        assert time.monotonic() - t0 < 10, "a mismatch must not wait out the timeout"
        errors, outs = _tiny(cluster)  # refused: no waiting, nothing written
        assert errors == [2, 2, 2] and all((o == -5).all() for o in outs)
        assert [cluster.state(r)[2] for r in range(3)] == [2 | 2 << 32] * 3
    finally:
        so.emu_set_stagger(0)


def test_mismatch_with_other_rows_is_still_error_2(so):
    # rank 1 runs a descriptor that sends rank 0 nothing; rank 0 waits for rows that never
    # come, but the header says "another operation": error 2 on both, long before the timeout
    cluster = push_emu.Cluster(so, 2, 4096, timeout_s=30)
    ins = [p2p_emu.aligned_like(np.full((3, 4), r + 1, np.int32)) for r in range(2)]
    outs = [p2p_emu.aligned_like(np.full((3, 4), -5, np.int32)) for _ in range(2)]
    descs = [ref.make_desc(7, [(0, 3, 0, 0, 2)], [(0, 3, 3, 0, 0, 2, 1)]),
             ref.make_desc(9, [], [])]
    t0 = time.monotonic()
    errors = cluster.push(ins, outs, descs, 0, 16, "int32", grid=1)
    assert errors == [2, 2] and time.monotonic() - t0 < 10, errors


def test_wrong_source_rank_in_a_header_is_error_2(so):
    # a header whose source word names another rank (windows wired in another order)
    cluster = push_emu.Cluster(so, 2, 4096, timeout_s=5)
    assert _tiny(cluster)[0] == [0, 0]
    # the next epoch (3) uses set 1: plant rank 1's header in rank 0's window as if from rank 7
    cluster.headers(0, 1)[0] = np.uint64(3 << 32 | 7), np.uint64(3 << 32 | 7)
    errors, _ = _tiny(cluster, launch=[1, 0])
    assert errors == [2, 0], errors
