"""The P2P transports on CPU: the host twins of the pull and of the push under mpiexec -n 1..4
(tests/mpi/p2p_scenarios.py: the matrices against tests/pull_reference.py and
tests/push_reference.py, mismatch, skipped collective, local close, capacity mismatch), the pull's
reference and its descriptor encoder, how the library reads a descriptor, the pull's window
layout and launch rules (the push's: tests/test_push_layout.py), one-rank use of both twins.

The CUDA transports themselves run in tests/gpu/p2p_selftest.py and tests/gpu/loopback.py;
their kernels are compile-checked in tests/test_cuda_compile.py and emulated in
tests/test_p2p_emulated.py and tests/test_push_emulated.py.
"""

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import pull_reference as ref
from dpgather.core.errors import BackendUnavailable, CollectiveTimeout, InputError
from dpgather.kernels import _p2p, _pull
from mpi_harness import MPI_SCRIPTS, check_mpi, needs_mpiexec

SCRIPT = MPI_SCRIPTS / "p2p_scenarios.py"
BF16 = np.dtype(ml_dtypes.bfloat16)


# -- multi-rank: the host twin against the reference ---------------------------------------------

#: The host twins under test: the pull's (HostPull) and the push's (HostPush, "--push").
TWINS = {"pull": [], "push": ["--push"]}
twins = pytest.mark.parametrize("twin", sorted(TWINS))


@pytest.mark.mpi
@needs_mpiexec
@twins
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_host_twin_matrix(nprocs, twin):
    res = check_mpi([SCRIPT, "matrix", *TWINS[twin]], nprocs, timeout=180)
    counts = {r: v["collectives"] for r, v in res.results.items()}
    assert len(set(counts.values())) == 1 and min(counts.values()) > 250, counts


@pytest.mark.mpi
@needs_mpiexec
@twins
@pytest.mark.parametrize("nprocs", [2, 3])
def test_signature_mismatch_raises_everywhere(nprocs, twin):
    check_mpi([SCRIPT, "mismatch", *TWINS[twin]], nprocs, timeout=60)


@pytest.mark.mpi
@needs_mpiexec
@twins
@pytest.mark.parametrize("nprocs", [2, 4])
def test_skipped_collective_times_out(nprocs, twin):
    check_mpi([SCRIPT, "timeout", "1.0", *TWINS[twin]], nprocs, timeout=60)


@pytest.mark.mpi
@needs_mpiexec
@twins
@pytest.mark.parametrize("nprocs", [2, 3])
def test_close_is_local(nprocs, twin):
    check_mpi([SCRIPT, "close", "1.0", *TWINS[twin]], nprocs, timeout=60)


@pytest.mark.mpi
@needs_mpiexec
@twins
@pytest.mark.parametrize("nprocs", [1, 3])
def test_capacity_mismatch_is_a_config_error_everywhere(nprocs, twin):
    check_mpi([SCRIPT, "config", *TWINS[twin]], nprocs, timeout=60)


@pytest.mark.mpi
@needs_mpiexec
def test_gpu_selftest_flow_on_the_host_twin(tmp_path):
    # tests/gpu/p2p_selftest.py's own logic (matrix, timeout case, summary, exit code) on CPU
    import json

    from mpi_harness import HERE, run_mpi

    out = tmp_path / "p2p.json"
    res = run_mpi([HERE / "gpu" / "p2p_selftest.py", "--transport", "host", "--out", out,
                   "--deadline", "120"], 2, timeout=150)
    assert res.returncode == 0 and not res.timed_out, res.tail()
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["size"] == 2, res.tail()
    ranks = summary["ranks"]
    assert all(r["failed"] == 0 and r["passed"] > 400 for r in ranks), res.tail()
    assert ranks[0]["phases"]["timeout"]["error"] == 1 and "OK" in res.stdout


# -- the reference, by hand ----------------------------------------------------------------------

def f32(rows):
    return np.asarray(rows, np.float32)


def test_ref_gather_replicate_and_partial():
    sig = 5
    a, b = f32([[1, 2], [3, 4]]), f32([[10, 20], [30, 40]])
    # two replicas of one rank: rank 0 has 2 rows, rank 1 has 1; slots of 3 rows (a bucket)
    descs = [ref.gather_desc(sig, rank=r, attn_tp=1, counts=[2, 1], slot_offsets=[0, 3],
                              slot_rows=[3, 3]) for r in range(2)]
    got = ref.pull_ref([a, b[:1]], descs, 0, 8, "float32", 6, 16)
    exp = f32([[1, 2], [3, 4], [0, 0], [10, 20], [0, 0], [0, 0]])
    assert all((g == exp).all() for g in got)
    # one replica of two ranks, partial: the element-wise sum
    descs = [ref.gather_desc(sig, rank=r, attn_tp=2, counts=[2], slot_offsets=[0],
                              contribution="partial") for r in range(2)]
    got = ref.pull_ref([a, b], descs, 0, 8, "float32", 2, 16)
    assert all((g == a + b).all() for g in got)
    # replicate takes attn_tp rank 0's rows only
    descs = [ref.gather_desc(sig, rank=r, attn_tp=2, counts=[2], slot_offsets=[0]) for r in range(2)]
    got = ref.pull_ref([a, b], descs, 0, 8, "float32", 2, 16)
    assert all((g == a).all() for g in got)


def test_ref_combine_sums_own_slot_over_all_ranks():
    # D = 2 replicas (A = 1): slots [0, 2) and [2, 3) of the gathered layout, padded to 4 rows out
    ys = [f32(np.arange(6).reshape(3, 2) + 100 * r) for r in range(2)]
    descs = [ref.combine_desc(7, rank=r, attn_tp=1, counts=[2, 1], slot_offsets=[0, 2],
                               out_rows=4) for r in range(2)]
    got = ref.pull_ref(ys, descs, 0, 8, "float32", 4, 8)
    s = ys[0] + ys[1]
    assert (got[0] == np.concatenate([s[0:2], np.zeros((2, 2), np.float32)])).all()
    assert (got[1] == np.concatenate([s[2:3], np.zeros((3, 2), np.float32)])).all()


def test_ref_arithmetic_per_dtype():
    desc = ref.make_desc(1, [(0, 1, 0)], [(0, 1, 1, 0, 0, 3, 1)])
    # uint8 and int32 wrap
    u = [np.array([[200, 1]], np.uint8), np.array([[100, 2]], np.uint8), np.array([[0, 255]], np.uint8)]
    assert ref.pull_ref(u, desc, 0, 2, "uint8", 1, 4)[0].tolist() == [[44, 2]]
    i = [np.array([[2**31 - 1]], np.int32), np.array([[1]], np.int32), np.array([[5]], np.int32)]
    assert ref.pull_ref(i, desc, 0, 4, "int32", 1, 4)[0].tolist() == [[-(2**31) + 5]]
    # bfloat16: fp32 accumulation, one rounding at the end (pairwise rounding would lose the 1s)
    b = [np.array([[256.0]], BF16), np.array([[1.0]], BF16), np.array([[1.0]], BF16)]
    got = ref.pull_ref(b, desc, 0, 2, "bfloat16", 1, 4)[0]
    assert got.dtype == BF16 and float(got[0, 0]) == 258.0
    pairwise = (b[0] + b[1]) + b[2]
    assert float(pairwise[0, 0]) == 256.0
    h = [np.array([[2048.0]], np.float16), np.array([[1.0]], np.float16), np.array([[1.0]], np.float16)]
    assert float(ref.pull_ref(h, desc, 0, 2, "float16", 1, 4)[0][0, 0]) == 2050.0
    # one source: a byte copy (a NaN payload survives)
    one = ref.make_desc(1, [(0, 1, 0)], [(0, 1, 1, 0, 0, 1, 1)])
    nan = np.array([[0x7FC1]], np.uint16).view(np.float16)
    got = ref.pull_ref([nan], one, 0, 2, "float16", 1, 4)[0]
    assert got.view(np.uint16)[0, 0] == 0x7FC1


def test_ref_clamps():
    x = [f32([[1, 1], [2, 2], [3, 3]])]
    poison = [np.full((4, 2), -7, np.float32)]
    # pack past the input -> zero rows; job span past out -> cut; dst past out -> nothing
    desc = ref.make_desc(1, [(1, 4, 0)], [(1, 4, 9, 0, 0, 1, 1), (2**62, 1, 1, 0, 0, 1, 1)])
    got = ref.pull_ref(x, desc, 0, 8, "float32", 4, 8, outs=poison)[0]
    assert got.tolist() == [[-7, -7], [2, 2], [3, 3], [0, 0]]
    # capacity of 2 rows: a pack at row 1 keeps one row, a job there reads one and zero-fills
    desc = ref.make_desc(1, [(0, 3, 1)], [(0, 3, 4, 1, 0, 1, 1)])
    got = ref.pull_ref(x, desc, 0, 8, "float32", 4, 2, outs=poison)[0]
    assert got.tolist() == [[1, 1], [0, 0], [0, 0], [0, 0]]
    # no source in range: zeros over the whole span
    desc = ref.make_desc(1, [(0, 3, 0)], [(0, 2, 3, 0, 5, 2, 1)])
    got = ref.pull_ref(x, desc, 0, 8, "float32", 4, 8, outs=poison)[0]
    assert got.tolist() == [[0, 0], [0, 0], [0, 0], [-7, -7]]
    # n_jobs larger than the array: cut to the records present
    desc = ref.make_desc(1, [(0, 3, 0)], [(0, 1, 1, 0, 0, 1, 1)])
    desc[2] = 50
    got = ref.pull_ref(x, desc, 0, 8, "float32", 4, 8, outs=poison)[0]
    assert got.tolist() == [[1, 1], [-7, -7], [-7, -7], [-7, -7]]


def test_ref_refuses_what_the_kernel_cannot_promise():
    x = [f32([[1]]), f32([[2]])]
    with pytest.raises(ValueError, match="signatures differ"):
        ref.pull_ref(x, [ref.make_desc(1, [(0, 1, 0)], []), ref.make_desc(2, [(0, 1, 0)], [])],
                          0, 4, "float32", 1, 4)
    with pytest.raises(ValueError, match="no pack segment"):
        ref.pull_ref(x, ref.make_desc(1, [(0, 1, 0)], [(0, 1, 1, 1, 0, 2, 1)]), 0, 4, "float32", 1, 4)
    with pytest.raises(ValueError, match="dtype"):
        ref.pull_ref(x, ref.make_desc(1), 0, 4, "complex64", 1, 4)
    with pytest.raises(ValueError, match="desc"):
        ref.pull_ref(x, np.zeros(3, np.int64), 0, 4, "float32", 1, 4)


# -- descriptors and layout ----------------------------------------------------------------------

def test_descriptor_encoding_follows_the_spec_table():
    d = ref.gather_desc(0x1234, rank=3, attn_tp=2, counts=[4, 5, 0], slot_offsets=[0, 8, 16],
                         slot_rows=[8, 8, 8], contribution="partial")
    sig, packs, jobs = ref.decode_desc(d)
    assert sig == 0x1234 and packs == [(0, 5, 0)]
    assert jobs == [(0, 4, 8, 0, 0, 2, 1), (8, 5, 8, 0, 2, 2, 1), (16, 0, 8, 0, 4, 2, 1)]
    assert d.shape == (ref.desc_words(1, 3),) and d[3] == 0
    d = ref.gather_desc(9, rank=0, attn_tp=1, counts=[2, 3], slot_offsets=[0, 2, 5])
    assert ref.decode_desc(d)[2] == [(0, 2, 2, 0, 0, 1, 1), (2, 3, 3, 0, 1, 1, 1)]
    d = ref.combine_desc(9, rank=3, attn_tp=2, counts=[4, 5], slot_offsets=[0, 8], out_rows=8)
    sig, packs, jobs = ref.decode_desc(d)
    assert packs == [(0, 4, 0), (8, 5, 8)] and jobs == [(0, 5, 8, 8, 0, 4, 1)]
    # at an offset inside a larger (e.g. per-step) array
    buf = np.full(40, -1, np.int64)
    ref.make_desc(0xFFFFFFFF + 5, [(1, 2, 3)], [(1, 2, 3, 4, 5, 6, 7)], out=buf, off=10)
    assert ref.decode_desc(buf, 10) == (4, [(1, 2, 3)], [(1, 2, 3, 4, 5, 6, 7)])
    assert buf[9] == -1 and buf[10 + ref.desc_words(1, 1)] == -1
    with pytest.raises(ValueError, match="contribution"):
        ref.gather_desc(1, rank=0, attn_tp=1, counts=[1], slot_offsets=[0], contribution="sum")
    with pytest.raises(ValueError, match="rank"):
        ref.combine_desc(1, rank=4, attn_tp=2, counts=[1, 1], slot_offsets=[0, 1], out_rows=1)


def test_library_reads_descriptors_as_the_reference_does():
    # the host twin's reading (kernels._pull.read_desc) against the tests' own decoder, on
    # random descriptors: counts past the array, negative counts, offsets inside a larger array
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(4, 60))
        desc = rng.integers(-5, 12, n).astype(np.int64)
        desc[0] = int(rng.integers(-2**62, 2**62))
        off = int(rng.integers(0, n - 3))
        sig, packs, jobs = _pull.read_desc(desc, off)
        assert (sig, [tuple(p) for p in packs], [tuple(j) for j in jobs]) == ref.decode_desc(desc, off)


def test_signature_is_stable_and_discriminating():
    s = ref.signature("gather", 0xABC, "bfloat16", 14336)
    assert s == ref.signature("gather", 0xABC, "bfloat16", 14336) and 0 <= s < 2**32
    others = {ref.signature("combine", 0xABC, "bfloat16", 14336), ref.signature("gather", 0xABD, "bfloat16", 14336),
              ref.signature("gather", 0xABC, "float16", 14336), ref.signature("gather", 0xABC, "bfloat16", 7168)}
    assert s not in others and len(others) == 4
    # the known value pins the encoding across processes (no PYTHONHASHSEED dependence)
    out = subprocess.run([sys.executable, "-c", "import pull_reference as ref; "
                          "print(ref.signature('gather', 0xABC, 'bfloat16', 14336))"],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent)
    assert int(out.stdout) == s


@pytest.mark.parametrize("t,data_off", [(1, 256), (2, 256), (8, 256), (14, 256), (15, 512), (256, 4352)])
def test_window_layout(t, data_off):
    lay = _pull.window_layout(t, 1000)
    assert lay.flag_off == 0 and lay.state_off == 16 * t and lay.data_off == data_off
    assert lay.cap_bytes == 1024 and lay.window_bytes == data_off + 2048
    assert lay.data_off >= lay.state_off + 32 and lay.data_off % 256 == 0


def test_layout_and_capacity_errors():
    assert _p2p.round_capacity(1) == 256 and _p2p.round_capacity(512) == 512
    for bad in (0, -5, 2.5, True, "8"):
        with pytest.raises(InputError, match="capacity_bytes"):
            _p2p.round_capacity(bad)
    with pytest.raises(InputError, match="nranks"):
        _pull.window_layout(257, 256)


def test_initial_flags_cannot_match_the_next_two_epochs():
    for t in (1, 3):
        for e0 in (0, 1, 2**32 - 1, 2**32, 2**32 + 1, 12345):
            lay = _pull.window_layout(t, 256)
            words = _pull.initial_header(t, lay, e0)
            assert int(words[lay.state_off // 8]) == e0
            for e in (e0 + 1, e0 + 2):
                hi = words[(e & 1) * t : (e & 1) * t + t] >> np.uint64(32)
                assert (hi != (e & 0xFFFFFFFF)).all(), (t, e0, e)
                assert (hi == ((e - 2) & 0xFFFFFFFF)).all()  # "as if e - 2 had completed"


def test_grid_size_is_capacity_based_and_capped():
    assert _pull.grid_size(0, 0, 16, 256, 132) == 1
    assert _pull.grid_size(1, 1, 14336, 2**20, 132) == 1
    assert _pull.grid_size(16, 16, 14336, 2**30, 132) == 14  # 229376 B / 16 KiB
    assert _pull.grid_size(1024, 1024, 14336, 2**30, 132) == 132
    assert _pull.grid_size(10**6, 1, 14336, 65536, 132) == 4  # input beyond the capacity: 64 KiB
    assert _pull.grid_size(1024, 1024, 14336, 2**30, 7) == 7


def test_vector_width():
    assert _p2p.pick_vector(14336, 2, 0x1000, 0x2000) == 16
    assert _p2p.pick_vector(12, 4, 0x1000, 0x2004) == 4
    assert _p2p.pick_vector(3, 1, 0x1001, 0x2000) == 1
    with pytest.raises(InputError, match="aligned"):
        _p2p.pick_vector(16, 8, 0x1004, 0x2000)


def test_name_expressions_are_unique_and_exact():
    names = _pull.NAME_EXPRESSIONS
    assert len(names) == len(set(names)) == 21
    assert "p2p_pull<__nv_bfloat16, uint4>" in names and "p2p_pull<long long, unsigned int>" not in names


# -- the host twin in one process ----------------------------------------------------------------

def test_host_twin_single_rank():
    from mpi4py import MPI

    from dpgather.dist.nodes import probe
    from dpgather.dist.pull import HostPull

    assert probe(MPI.COMM_SELF, 5.0, backend="host") == (True, "")
    with pytest.raises(InputError, match="backend"):
        probe(MPI.COMM_SELF, 5.0, backend="nccl")
    with pytest.raises(InputError, match="timeout_s"):
        probe(MPI.COMM_SELF, 0, backend="host")
    with HostPull(MPI.COMM_SELF, 300, 5.0) as t:
        assert (t.rank, t.size, t.capacity_bytes, t.name, t.error()) == (0, 1, 512, "p2p", 0)
        x = np.arange(8, dtype=np.float32).reshape(4, 2)
        for k in range(5):  # both parities
            out = np.full((6, 2), -1, np.float32)
            d = ref.gather_desc(k, rank=0, attn_tp=1, counts=[k % 4], slot_offsets=[1], slot_rows=[4])
            t.pull(x, out, d, 0, row_bytes=8, dtype="float32")
            exp = ref.pull_ref([x], d, 0, 8, "float32", 6, 64, outs=[np.full((6, 2), -1, np.float32)])
            assert (out == exp[0]).all(), k
        # bfloat16 as uint16 storage is accepted, as are float16 arrays for float16
        b = np.ones((2, 4), BF16)
        ob = np.zeros((2, 4), np.uint16)
        t.pull(b.view(np.uint16), ob, ref.make_desc(1, [(0, 2, 0)], [(0, 2, 2, 0, 0, 1, 1)]), 0,
               row_bytes=8, dtype="bfloat16")
        assert (ob.view(BF16) == b).all()
        with pytest.raises(InputError, match="numpy"):
            t.pull([[1.0]], out, d, 0, row_bytes=8, dtype="float32")
        with pytest.raises(InputError, match="row_bytes"):
            t.pull(x, out, d, 0, row_bytes=7, dtype="float32")
        with pytest.raises(InputError, match="desc_off"):
            t.pull(x, out, d, -1, row_bytes=8, dtype="float32")
        # run: the trusted entry the data plane takes, same result
        out2 = np.full((6, 2), -1, np.float32)
        t.run(x, out2, d, 0, row_bytes=8, dtype="float32")
        exp = ref.pull_ref([x], d, 0, 8, "float32", 6, 64, outs=[np.full((6, 2), -1, np.float32)])
        assert (out2 == exp[0]).all()
        assert "HostPull(rank=0, size=1" in repr(t)
    with pytest.raises(CollectiveTimeout, match="closed"):
        t.pull(x, out, d, 0, row_bytes=8, dtype="float32")
    with pytest.raises(CollectiveTimeout, match="closed"):
        t.run(x, out, d, 0, row_bytes=8, dtype="float32")
    t.close()
    with pytest.raises(InputError, match="timeout_s"):
        HostPull(MPI.COMM_SELF, 300, 0)


def test_push_host_twin_single_rank():
    # one rank: no peers, every row comes from the own input ("Self"); both slot sets, the wrap
    import push_reference as pref
    from mpi4py import MPI

    from dpgather.dist.push import HostPush

    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    with HostPush(MPI.COMM_SELF, 300, 5.0, _epoch0=2**32 - 3) as t:
        assert (t.rank, t.size, t.capacity_bytes, t.name, t.error()) == (0, 1, 512, "push", 0)
        for k in range(5):
            n = k % 5
            d = pref.make_desc(k, [(0, n, 0, 0, 1)], [(1, n, 4, 0, 0, 1, 1)])
            out = np.full((6, 2), -1, np.float32)
            t.push(x, out, d, 0, row_bytes=8, dtype="float32")
            exp, _ = pref.push_ref([x], [d], [0], 8, "float32", [6], 512, outs=[np.full((6, 2), -1, np.float32)])
            assert (out == exp[0]).all(), k
        assert t._epoch == 4  # 2^32-2, 2^32-1, 2, 3, 4
        with pytest.raises(InputError, match="overlap"):
            t.push(x, x, d, 0, row_bytes=8, dtype="float32")
        with pytest.raises(InputError, match="row_bytes"):
            t.push(np.zeros((1, 130), np.float32), np.zeros((1, 130), np.float32), d, 0, row_bytes=520,
                   dtype="float32")
        assert "HostPush(rank=0, size=1" in repr(t)
    with pytest.raises(CollectiveTimeout, match="closed"):
        t.push(x, out, d, 0, row_bytes=8, dtype="float32")
    with pytest.raises(InputError, match="_epoch0"):
        HostPush(MPI.COMM_SELF, 300, 5.0, _epoch0=0)


def test_cuda_transport_without_gpu_is_unavailable():
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: the CPU-only path is not taken")
    from mpi4py import MPI

    from dpgather.dist.nodes import probe
    from dpgather.dist.pull import CudaPull
    from dpgather.dist.push import CudaPush

    with pytest.raises(BackendUnavailable, match="CuPy"):
        CudaPull(MPI.COMM_SELF, 4096, 5.0)
    with pytest.raises(BackendUnavailable, match="CuPy"):
        CudaPush(MPI.COMM_SELF, 4096, 5.0)
    ok, reason = probe(MPI.COMM_SELF, 5.0)
    assert not ok and "rank 0" in reason and "CuPy" in reason
