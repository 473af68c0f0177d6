"""P2P over several nodes, the pure parts: which ranks form a node (``dist.nodes.node_size``), the
planner's ``p2p_node_size`` and the descriptor of a node. The data path itself runs under
``mpiexec`` with pretend nodes in ``tests/test_facade_mpi.py::test_matrix_p2p_pretend_nodes``."""

import numpy as np
import pytest

import dpgather as dg
from dpgather._layout import Descriptor, Layout
from dpgather.dist.nodes import node_size

A_, B_, C_ = 11, 22, 33


@pytest.mark.parametrize("hosts,pretend,A,want", [
    ([A_] * 4, "", 1, 4),
    ([A_] * 4, "", 4, 4),
    ([A_] * 4, "2", 1, 2),
    ([A_] * 4, "2", 2, 2),
    ([A_] * 4, "4", 1, 1),
    ([A_] * 4, "1", 2, 4),
    ([A_, A_, B_, B_], "", 2, 2),
    ([A_, A_, B_, B_, C_, C_], "", 1, 2),
    ([A_, A_, B_, B_], "4", 1, 1),  # pretend nodes inside real ones
])
def test_node_size(hosts, pretend, A, want):
    assert node_size(hosts, pretend, A) == (want, "")


@pytest.mark.parametrize("hosts,pretend,A,words", [
    ([A_] * 4, "3", 1, "DPGATHER_P2P_NODES='3' must be a positive divisor of the 4 ranks"),
    ([A_] * 4, "two", 1, "DPGATHER_P2P_NODES='two'"),
    ([A_] * 4, "0", 1, "positive divisor"),
    ([A_, B_, A_, B_], "", 1, "not consecutive (rank 2"),
    ([A_, A_, A_, B_], "", 1, "different numbers of ranks ([1, 3])"),
    ([A_, B_], "", 2, "do not hold whole replicas of attn_tp_size=2"),
    ([A_] * 4, "4", 2, "do not hold whole replicas"),
])
def test_node_size_refused(hosts, pretend, A, words):
    L, reason = node_size(hosts, pretend, A)
    assert L == 0 and words in reason


@pytest.mark.parametrize("bad", [3, -1, 1.0, True, "2"])
def test_planner_p2p_node_size_checked(bad):
    with pytest.raises(dg.ConfigError, match="p2p_node_size must be 0"):
        dg.Planner(dg.Topology(4, 2), p2p_rows=1024, p2p_node_size=bad)


def test_planner_prices_the_inter_node_collectives():
    # the same step over one group of 4 and over 2 nodes of 2: the latter adds the inter-node
    # all-gather and reduce-scatter of the node blocks, so its predicted P2P time differs
    topo = dg.Topology(4, 1)
    batches = [dg.LocalBatch(dg.ForwardMode.DECODE, 64)] * 4
    one = dg.plan(batches, topo, transport="p2p", p2p_rows=4096)
    two = dg.plan(batches, topo, transport="p2p", p2p_rows=4096, p2p_node_size=2)
    assert one.transport == two.transport == "p2p"
    assert one.predicted_p2p_us > 0 and two.predicted_p2p_us > 0
    assert two.predicted_p2p_us != one.predicted_p2p_us
    assert dg.Planner(topo, p2p_rows=4096, p2p_node_size=2).p2p_node_size == 2


def _records(desc, out, name):
    at = desc.p2p[name]
    sig, npack, njobs, _ = out[at:at + 4]
    pack = out[at + 4:at + 4 + 3 * npack].reshape(npack, 3)
    jobs = out[at + 4 + 3 * npack:at + 4 + 3 * npack + 7 * njobs].reshape(njobs, 7)
    return int(sig), pack, jobs


def test_descriptor_of_a_node():
    # T = 8, A = 2, 2 nodes of 4 ranks (2 replicas each); rank 5 = node 1, replica 2, attn rank 1
    D, A, L, rank = 4, 2, 4, 5
    counts, slots = [3, 0, 5, 2], [4, 2, 6, 2]
    offsets = np.concatenate([[0], np.cumsum(slots)]).tolist()
    plan_mode = dg.PaddingMode.VARLEN
    hidden = Layout(plan_mode, counts, slots, offsets, offsets[-1], rank // A, rank % A, A)
    logits = hidden
    sigs = {"gather_replicate": 1, "gather_partial": 2, "combine": 3, "logits": 4, "wire": 5}
    whole, node = Descriptor(D, A), Descriptor(D, A, L)
    assert (node.node_size, node.node_replicas, whole.node_size) == (4, 2, 8)
    assert node.size < whole.size
    out = node.write(np.zeros(node.size, np.int64), None, hidden, logits, rank, sigs)
    sig, pack, jobs = _records(node, out, "gather_partial")
    assert sig == 2 and pack.tolist() == [[0, 5, 0]]
    # replicas 2 and 3 only, at their places in the gathered buffer, sources numbered in the node
    assert jobs.tolist() == [[6, 5, 6, 0, 0, 2, 1], [12, 2, 2, 0, 2, 2, 1]]
    sig, pack, jobs = _records(node, out, "combine")
    # the input is the node's block (rows 6..14 of the gathered buffer), staged from row 0
    assert pack.tolist() == [[0, 5, 0], [6, 2, 6]]
    assert jobs.tolist() == [[0, 5, 1 << 62, 0, 0, 4, 1]]
    # wire (the quantized gather's fp8 rows): gather replicate's records under its own signature
    rep, wire = _records(node, out, "gather_replicate"), _records(node, out, "wire")
    assert wire[0] == 5 and rep[0] == 1 and all(np.array_equal(a, b) for a, b in zip(wire[1:], rep[1:]))
    with pytest.raises(ValueError):
        Descriptor(D, A, 3)
