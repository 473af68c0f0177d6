"""The push transport's pure parts: the loader's window, grid and access rules (kernels/_push.py),
and the push entries of ``dpgather._layout.Descriptor`` run through tests/push_reference.py
against the data plane's semantics (docs/design.md section 4) at up to 8 ranks, several nodes
included. The kernel itself runs in test_push_emulated.py."""

import numpy as np
import pytest

import push_cases as pc
import push_reference as ref
from dpgather._layout import Descriptor, Layout
from dpgather.core import PaddingMode
from dpgather.core.errors import InputError
from dpgather.kernels import _push

ROW = 14336  # bf16, H = 7168
CAP = 256 * ROW


@pytest.mark.parametrize("T,window", [(2, 14_680_576), (4, 44_040_704), (8, 102_760_960)])
def test_window_cost_of_the_docs_table(T, window):
    lay = _push.window_layout(T, CAP)
    assert lay == (0, 256, 512, CAP, 2 * CAP, window)
    assert window == lay.data_off + 4 * (T - 1) * CAP
    assert _push.capacity_rows(ROW, lay.cap_bytes) == 256


def test_window_layout_rules():
    lay = _push.window_layout(1, 100)  # one rank: no peers, no regions
    assert lay.cap_bytes == 256 and lay.window_bytes == lay.data_off == 256
    big = _push.window_layout(256, 1000)  # regions start 256-byte aligned
    assert big.data_off == 8448 and big.region_bytes == 2048
    assert big.window_bytes == 8448 + 2 * 255 * 2048
    for bad in (0, 257):
        with pytest.raises(InputError, match="nranks"):
            _push.window_layout(bad, 1000)
    with pytest.raises(InputError, match="capacity_bytes"):
        _push.window_layout(2, 0)


def test_rows_take_whole_lines():
    assert [_push.lines_per_row(b) for b in (1, 8, 9, 16, 14336)] == [1, 1, 2, 2, 1792]
    # odd rows lose the tail of their last line: 12-byte rows take 2 lines (16 data bytes)
    assert _push.capacity_rows(12, 8192) == 512 and _push.capacity_rows(16, 8192) == 512
    assert _push.capacity_rows(8193, 8192) == 0
    assert ref.cap_rows_of(12, 8192) == _push.capacity_rows(12, 8192)


def test_initial_state_and_epochs():
    assert _push.initial_state().tolist() == [1, 0, 0, 0]
    assert _push.initial_state(2**32 - 3).tolist()[0] == 2**32 - 3
    for bad in (0, -1, 2**32, True, 1.5):
        with pytest.raises(InputError, match="epoch0"):
            _push.initial_state(bad)
    assert _push.FIRST_EPOCH == 2


def test_grid_from_capacities_only():
    # 1 row of 14336 bytes to 1 peer: 1792 lines = one tile; 16 rows: 14 tiles; capped by limit
    assert _push.grid_size(1, 2, ROW, CAP, 2, 132) == 2  # out: 2 rows = 3584 lines = 2 tiles
    assert _push.grid_size(1, 1, ROW, CAP, 2, 132) == 1
    assert _push.grid_size(16, 32, ROW, CAP, 8, 132) == 98  # 16 rows x 7 peers
    assert _push.grid_size(1024, 8192, ROW, CAP, 8, 132) == 132
    assert _push.grid_size(0, 0, ROW, CAP, 1, 132) == 1


def test_access_width_is_the_pulls_at_most_8():
    assert _push.pick_vector(ROW, 2, 0x1000, 0x2000) == 8
    assert _push.pick_vector(ROW, 2, 0x1004, 0x2000) == 4
    assert _push.pick_vector(6, 2, 0x1000, 0x2000) == 2
    with pytest.raises(InputError):
        _push.pick_vector(6, 4, 0x1000, 0x2000)
    assert _push.WIDTHS == (8, 4, 2, 1)


def test_read_desc_is_the_references_decoding():
    # the host twin's reading (kernels._push.read_desc) against the tests' own encoder and decoder,
    # clamps of the record counts included
    d = ref.make_desc(0x1_2345_6789, [(1, 2, 3, 4, 5)], [(1, 2, 3, 4, 5, 6, 7), (0, 0, 0, 0, 0, 0, 0)], 9)
    assert d.tolist()[:4] == [0x2345_6789, 1, 2, 9] and d.shape[0] == ref.desc_words(1, 2)
    sig, sends, jobs, self_row = _push.read_desc(d, 0)
    assert (sig, [tuple(x) for x in sends], [tuple(x) for x in jobs], self_row) == ref.decode(d, 0)
    buf = np.full(30, -1, np.int64)
    ref.make_desc(5, [], [(1, 1, 1, 0, 0, 1, 1)], out=buf, off=3)
    assert buf[:3].tolist() == [-1] * 3 and buf[3:7].tolist() == [5, 0, 1, 0]
    for n_send, n_jobs, extra in ((3, 2, 0), (5, 9, 4), (-1, -2, 0), (2**40, 1, 11)):
        d = ref.make_desc(7, [(1, 2, 3, 4, 5)] * 2, [(1, 2, 3, 4, 5, 6, 7)] * 2, -3)
        d[1], d[2] = n_send, n_jobs
        d = np.concatenate([d, np.arange(extra, dtype=np.int64)])
        sig, sends, jobs, self_row = _push.read_desc(d, 0)
        assert (sig, [tuple(x) for x in sends], [tuple(x) for x in jobs], self_row) == ref.decode(d, 0)
    with pytest.raises(ValueError, match="out"):
        ref.make_desc(5, [], [(1,) * 7], out=np.zeros(4, np.int64))


def _records(desc, out, name):
    at = desc.push[name]
    sig, n_send, n_jobs, self_row = (int(v) for v in out[at:at + 4])
    sends = out[at + 4:at + 4 + 5 * n_send].reshape(n_send, 5).tolist()
    jobs = out[at + 4 + 5 * n_send:at + 4 + 5 * n_send + 7 * n_jobs].reshape(n_jobs, 7).tolist()
    return sig, sends, jobs, self_row


def test_descriptor_push_records_of_a_node():
    # T = 8, A = 2, 2 nodes of 4 ranks (2 replicas each); rank 5 = node 1, replica 2, attn rank 1
    D, A, L, rank = 4, 2, 4, 5
    counts, slots = [3, 0, 5, 2], [4, 2, 6, 2]
    offsets = [0] + np.cumsum(slots).tolist()
    hidden = Layout(PaddingMode.VARLEN, counts, slots, offsets, offsets[-1], rank // A, rank % A, A)
    sigs = {"gather_replicate": 1, "gather_partial": 2, "combine": 3, "logits": 4, "wire": 5}
    desc = Descriptor(D, A, L)
    out = desc.write(np.zeros(desc.size, np.int64), None, hidden, hidden, rank, sigs)
    # replicate: one send per replica of the node, to the rank at attn-TP position 1 (node ranks 1, 3)
    assert _records(desc, out, "gather_replicate") == (
        1, [[0, 5, 0, 1, 1], [0, 5, 0, 3, 1]], [[6, 5, 6, 0, 1, 1, 1], [12, 2, 2, 0, 3, 1, 1]], 0)
    assert _records(desc, out, "gather_partial") == (
        2, [[0, 5, 0, 0, 4]], [[6, 5, 6, 0, 0, 2, 1], [12, 2, 2, 0, 2, 2, 1]], 0)
    # combine: the node block (rows 6..14) staged from row 0; replica d's rows to its ranks
    assert _records(desc, out, "combine") == (
        3, [[0, 5, 0, 0, 2], [6, 2, 0, 2, 2]], [[0, 5, 1 << 62, 0, 0, 4, 1]], 0)
    assert _records(desc, out, "logits")[1] == [[0, 5, 0, 1, 1], [0, 5, 0, 3, 1]]
    # the quantized gather's wire rows: the replicate gather's records under their own signature
    assert _records(desc, out, "wire") == (5,) + _records(desc, out, "gather_replicate")[1:]
    p2p = [out[desc.p2p[name] + 1:desc.p2p[name] + 7 * (1 + desc.node_replicas)] for name in ("wire", "gather_replicate")]
    assert out[desc.p2p["wire"]] == 5 and np.array_equal(*p2p)
    # the pull entries are where they were: push entries come after them
    assert min(desc.push.values()) > max(desc.p2p.values())
    whole = Descriptor(D, A)
    assert whole.size > desc.size


def _ops_of_topologies():
    for T in (1, 2, 3, 4, 6, 8):
        for A in (1, 2, 4):
            if T % A:
                continue
            for L in sorted({T, A, T // 2} if T % (2 * A) == 0 else {T, A}):
                yield T, A, L


@pytest.mark.parametrize("T,A,L", list(_ops_of_topologies()))
def test_descriptor_push_entries_give_the_data_plane_semantics(T, A, L):
    # every op of every node through the reference: the gathered buffer and the combine of
    # docs/design.md s4, bit for bit, every dtype; each row crosses NVLink once per destination
    rng = np.random.default_rng([T, A, L])
    fails = []
    for i, dtype in enumerate(pc.DTYPES):
        for layout in ("exact", "bucket", "zero"):
            counts = rng.integers(0, 5, T // A).tolist() if layout != "zero" else [0] * (T // A)
            slots = counts if layout == "exact" else [-(-(max(counts) + 1) // A) * A] * (T // A)
            for node in range(T // L):
                for op in pc.OPS + ("wire",):  # wire: the quantized gather's rows (gather replicate)
                    name = f"{op} T={T} A={A} L={L} node={node} {layout} counts={counts} [{dtype}]"
                    case = pc.layout_case(name, T, A, L, node, counts, slots, op, dtype, 3 + i, "exact", 7)
                    outs = [pc.poisoned(n, 3 + i, dtype) for n in case.out_rows]
                    got, traffic = ref.push_ref(list(case.inputs), list(case.descs), list(case.desc_off),
                                                case.row_bytes, dtype, list(case.out_rows), pc.CAP_BYTES, outs=outs)
                    fails += [f"{name} rank {r}: {m}" for r in range(L) if (m := pc.check(got[r], case.expect[r]))]
                    fails += _traffic_faults(name, op, traffic, counts, A, L, node)
    assert not fails, "\n".join(fails[:20])


def _traffic_faults(name, op, traffic, counts, A, L, node):
    """Rows each destination receives over NVLink: exactly what it needs from others, once."""
    d0 = node * L // A
    replicas = range(d0, d0 + L // A)
    faults = []
    for dst in range(L):
        own = d0 + dst // A
        got = sum(n for (s, t), n in traffic.items() if t == dst)
        if op == "combine":  # its replica's rows from every other rank of the node
            need = counts[own] * (L - 1)
        elif op == "gather_partial":  # every replica's rows from each of its ranks but itself
            need = sum(counts[d] * (A - (d == own)) for d in replicas)
        elif op in ("gather_replicate", "wire"):  # every other replica's rows, from one rank each
            need = sum(counts[d] for d in replicas if d != own)
        else:
            continue  # logits: its own counts (checked through the outputs)
        if got != need:
            faults.append(f"{name}: rank {dst} receives {got} rows over NVLink, needs {need}")
    return faults


def test_reference_refuses_what_the_kernel_cannot_do():
    ins = [np.zeros((2, 2), np.int32)] * 2
    same = ref.make_desc(1, [(0, 2, 0, 0, 2)], [(0, 2, 2, 0, 0, 2, 1)])
    other = ref.make_desc(2, [(0, 2, 0, 0, 2)], [(0, 2, 2, 0, 0, 2, 1)])
    with pytest.raises(ref.SignatureMismatch):
        ref.push_ref(ins, [same, other], 0, 8, "int32", 2, 4096)
    unsent = ref.make_desc(1, [(0, 1, 0, 0, 2)], [(0, 2, 2, 0, 0, 2, 1)])
    with pytest.raises(ref.NotSent, match="did not store"):
        ref.push_ref(ins, [unsent, unsent], 0, 8, "int32", 2, 4096)
    twice = ref.make_desc(1, [(0, 2, 0, 0, 2), (0, 1, 1, 1, 1)], [])
    with pytest.raises(ref.NotSent, match="twice"):
        ref.push_ref(ins, [twice, twice], 0, 8, "int32", 2, 4096)
