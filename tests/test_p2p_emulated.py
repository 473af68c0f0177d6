"""kernels/pull.cu itself, executed on the CPU (tests/p2p_emu), against pull_reference.pull_ref.

The kernel source is compiled with g++ (its inline PTX replaced by tests/p2p_emu/emu.h); every
rank's blocks run concurrently, 256 fiber threads each, so the pack, the arrive/signal/wait
barrier between blocks and ranks, the parities, the epoch, the tile dealing over blocks, the
clamps, the reductions and the error paths of the real source run here. Not covered: the GPU
memory model, the PTX (ptxas checks it in test_cuda_compile.py), speed.
"""

import numpy as np
import pytest

import p2p_cases as pc
import p2p_emu
import pull_reference as ref
from dpgather.kernels import _pull

pytestmark = pytest.mark.skipif(not p2p_emu.available(), reason="needs g++ on x86-64")


#: The tuning switches of pull.cu other than the defaults (docs/p2p.md), tested as a build.
TUNED = ("DPG_P2P_FLAG_FENCE=1", "DPG_P2P_RELAXED_POLL=1", "DPG_P2P_SLEEP_AFTER=100000")


@pytest.fixture(scope="module", params=["every-block-active", "active-from-work", "tuned-switches"])
def so(request, tmp_path_factory):
    # every-block-active: all blocks of the grid take part (the multi-block arrive/depart
    # barrier on every case); active-from-work: the kernel's own rule (small cases: one block);
    # tuned-switches: every block active with the non-default tuning switches
    so = p2p_emu.build(tmp_path_factory.mktemp("p2p_emu"),
                       active_bytes=None if request.param == "active-from-work" else 1,
                       defines=TUNED if request.param == "tuned-switches" else ())
    so.variant = request.param
    return so


def run(cluster, case, seed, index, grid=None, launch=None, shift=0):
    t = cluster.t
    ins, exp = pc.expected(case, seed, index, t)
    inputs = [p2p_emu.aligned_like(a, shift=shift) for a in ins]
    if case.inplace:
        outputs = inputs
    else:
        outputs = [p2p_emu.aligned_like(pc.poisoned(case.out_rows[r], case.width, case.dtype), shift=shift)
                   for r in range(t)]
    errors = cluster.pull(inputs, outputs, list(case.descs), case.desc_off, case.row_bytes, case.dtype,
                          launch=launch, grid=grid)
    bad = [f"rank {r}: {msg}" for r in range(t) if (msg := pc.check(outputs[r], exp[r]))]
    if not case.inplace:
        bad += [f"rank {r}: input modified" for r in range(t) if pc.check(inputs[r], ins[r])]
    return errors, bad


def test_every_specialisation_is_built(so):
    names = {so.emu_name(i).decode() for i in range(so.emu_count())}
    assert names == set(_pull.NAME_EXPRESSIONS)


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_kernel_matrix(so, nranks):
    if so.variant == "tuned-switches" and nranks in (2, 4):
        # the switches change memory-order primitives only (their portable twins here); 1 and 3
        # ranks run the whole matrix through them
        pytest.skip("tuned switches: the matrix runs at 1 and 3 ranks")
    if so.variant == "every-block-active" and nranks == 4:
        # the multi-block barrier of every case runs at 1-3 ranks; 4 ranks run the kernel's own
        # block rule (active-from-work), whose larger cases take several blocks too
        pytest.skip("every block active: the matrix runs at 1-3 ranks")
    seed = 4321
    cases = pc.build_cases(nranks, seed)
    cluster = p2p_emu.Cluster(so, nranks, pc.CAP_BYTES, timeout_s=60)
    fails = []
    for i, case in enumerate(cases):
        # grids of 1..3 blocks: small jobs are dealt to different blocks, pack tiles too;
        # every 16th case with late blocks (the barrier must wait for them)
        so.emu_set_stagger(2000 if i % 16 == 5 else 0)
        try:
            errors, bad = run(cluster, case, seed, i, grid=1 + i % 3)
        finally:
            so.emu_set_stagger(0)
        if any(errors):
            fails.append(f"{case.name}: error words {errors}")
        fails += [f"{case.name} [{case.dtype} w={case.width}] {b}" for b in bad]
    assert not fails, "\n".join(fails[:30])
    for r in range(nranks):
        assert cluster.state(r) == (len(cases), 0, 0, 0)  # epoch, arrive, depart, err


def test_vector_widths_and_unaligned_buffers(so):
    # the same cases with buffers 4 / 2 / 1 bytes off a 16-byte boundary: narrower vectors
    seed = 99
    cases = [c for c in pc.build_cases(2, seed) if c.name.startswith(("gather partial A=2", "combine A=1"))]
    assert cases
    cluster = p2p_emu.Cluster(so, 2, pc.CAP_BYTES)
    for shift in (4, 2, 1):
        for i, case in enumerate(cases):
            if shift % ref.ITEMSIZE[case.dtype]:
                continue  # element-misaligned buffers are refused by the launcher
            errors, bad = run(cluster, case, seed, i, shift=shift)
            assert not any(errors) and not bad, (shift, case.name, bad)


def test_epoch_wraps_at_2_pow_32(so):
    seed = 7
    cases = pc.build_cases(3, seed, dtypes=("bfloat16",))[:9]
    cluster = p2p_emu.Cluster(so, 3, pc.CAP_BYTES, epoch0=2**32 - 4)
    for i, case in enumerate(cases):
        errors, bad = run(cluster, case, seed, i, grid=2)
        assert not any(errors) and not bad, (i, case.name, bad)
    assert [cluster.state(r)[0] for r in range(3)] == [2**32 - 4 + 9] * 3


def test_large_rows_many_tiles_per_block(so):
    # 16 KiB rows: every job spans several 32 KiB copy tiles / 16 KiB reduce tiles
    t, width, rows = 2, 4096, 12
    cap = 2 * rows * width * 4
    cluster = p2p_emu.Cluster(so, t, cap)
    counts = [rows, rows - 5]
    offsets = [0, rows]
    for contribution in ("replicate", "partial"):
        descs = [ref.gather_desc(3, rank=r, attn_tp=1, counts=counts, slot_offsets=offsets,
                                 slot_rows=[rows, rows], contribution=contribution) for r in range(t)]
        ins = [np.random.default_rng(r).standard_normal((rows, width)).astype(np.float32) for r in range(t)]
        outs = [p2p_emu.aligned_like(np.full((2 * rows, width), np.nan, np.float32)) for _ in range(t)]
        exp = ref.pull_ref(ins, descs, 0, width * 4, "float32", 2 * rows, cap // (width * 4), outs=outs)
        for grid in (1, 3, 4):
            for o in outs:
                o[...] = np.nan
            errors = cluster.pull([p2p_emu.aligned_like(a) for a in ins], outs, descs, 0, width * 4, "float32",
                                  grid=grid)
            assert not any(errors)
            for r in range(t):
                assert pc.check(outs[r], exp[r]) is None, (contribution, grid, r)
    # combine: 3 sources summed over many reduce tiles
    t = 3
    cluster = p2p_emu.Cluster(so, t, 3 * rows * width * 4)
    counts, offsets = [rows, 3, rows - 1], [0, rows, rows + 3]
    descs = [ref.combine_desc(5, rank=r, attn_tp=1, counts=counts, slot_offsets=offsets, out_rows=rows)
             for r in range(t)]
    ins = [np.random.default_rng(10 + r).standard_normal((2 * rows + 2, width)).astype(np.float32)
           for r in range(t)]
    outs = [p2p_emu.aligned_like(np.full((rows, width), np.nan, np.float32)) for _ in range(t)]
    exp = ref.pull_ref(ins, descs, 0, width * 4, "float32", rows, 3 * rows, outs=outs)
    errors = cluster.pull([p2p_emu.aligned_like(a) for a in ins], outs, descs, 0, width * 4, "float32", grid=3)
    assert not any(errors) and all(pc.check(outs[r], exp[r]) is None for r in range(t))


def _tiny(cluster, sig=(7, 7), launch=None):
    t = cluster.t
    ins = [p2p_emu.aligned_like(np.full((2, 4), r + 1, np.int32)) for r in range(t)]
    outs = [p2p_emu.aligned_like(np.full((2, 4), -5, np.int32)) for _ in range(t)]
    descs = [ref.make_desc(sig[r % len(sig)], [(0, 2, 0)], [(0, 2, 2, 0, 0, t, 1)]) for r in range(t)]
    errors = cluster.pull(ins, outs, descs, 0, 16, "int32", launch=launch, grid=4)
    return errors, outs


def test_timeout_sets_error_1_and_later_launches_refuse(so):
    import time

    cluster = p2p_emu.Cluster(so, 2, 4096, timeout_s=0.3)
    errors, outs = _tiny(cluster)
    assert errors == [0, 0] and all((o == 3).all() for o in outs)
    t0 = time.monotonic()
    errors, outs = _tiny(cluster, launch=[1, 0])  # rank 1 skips
    el = time.monotonic() - t0
    assert errors == [1, 0] and 0.29 <= el < 5, (errors, el)
    assert (outs[0] == -5).all()  # nothing pulled
    assert cluster.state(0)[3] == 1 | 1 << 32  # committed | pending << 32
    # rank 1 arrives late: rank 0 refuses at once; rank 1 completes the epoch rank 0 signalled
    errors, outs = _tiny(cluster, launch=[1, 1])
    assert errors[0] == 1 and (outs[0] == -5).all()
    assert errors[1] == 0 and (outs[1] == 3).all()
    # ... and its next collective, which nobody else enters, times out
    errors, outs = _tiny(cluster, launch=[1, 1])
    assert errors == [1, 1] and (outs[1] == -5).all()


@pytest.mark.parametrize("stagger_us", [0, 20000])
def test_signature_mismatch_sets_error_2_on_every_rank(so, stagger_us):
    # with staggered blocks, a rank's first block sees the mismatch before its last block
    # started: that one must still arrive and signal, or the peers would only time out
    so.emu_set_stagger(stagger_us)
    try:
        _mismatch(so)
    finally:
        so.emu_set_stagger(0)


def _mismatch(so):
    cluster = p2p_emu.Cluster(so, 3, 4096, timeout_s=30)
    assert _tiny(cluster)[0] == [0, 0, 0]
    errors, outs = _tiny(cluster, sig=(7, 7, 8))
    assert errors == [2, 2, 2], errors
    assert all((o == -5).all() for o in outs)
    errors, outs = _tiny(cluster)  # refused: no waiting, nothing written
    assert errors == [2, 2, 2] and all((o == -5).all() for o in outs)
    assert [cluster.state(r)[3] for r in range(3)] == [2 | 2 << 32] * 3  # committed | pending
