"""One rank's view of a step: counts, offsets and sizes, and the device descriptor that carries them.

Pure functions of (plan, topology, this rank): no arrays of the backend, no communication.

:class:`Layout` is one layout of a plan as this rank sees it — the hidden-state gather
(``plan.slot_rows`` / ``plan.slot_offsets``) or the logits gather (``plan.logits_*``) — with the
chunking of docs/design.md's attn-TP rule: slot ``d`` of ``s`` rows is split over its ``A`` ranks as evenly
as possible, the first ``s % A`` ranks taking one extra row. MAX_LEN is the case where every
slot has the same rows (a multiple of ``A``), so every chunk is equal and the non-v collectives
serve (``Layout.equal``).

:class:`Descriptor` is the one encoder of the int64 step descriptor the copy kernels and the P2P
kernel read (in device memory on the CUDA backend, so a captured graph serves any counts once
the descriptor is rewritten). Its layout, in int64 entries:

====================  ==========================================================================
``[0, 48)``           copy records of 4 (``kernels``' ``copy_rows``): 6 per layout, hidden then
                      logits, in the order :data:`COPY_RECORDS`
``[48, 48 + 3D)``     mask triples ``(slot_offset, n_tokens, slot_rows)`` per replica
then                  P2P pull descriptors (docs/p2p.md): gather replicate, gather partial,
                      combine, logits gather, fp8 wire gather, each at a fixed offset
                      (:attr:`Descriptor.p2p`)
then                  P2P push descriptors (docs/push.md): the same five operations, each at a
                      fixed offset (:attr:`Descriptor.push`)
====================  ==========================================================================

The push descriptors (docs/push.md: ``[sig, n_send, n_jobs, self_row]``, send records
``(in_row, rows, slot_row, dest_first, dest_count)``, jobs as the pull's), ranks numbered in the
node of ``L`` ranks, ``a`` this rank's attn-TP position, ``base`` the node's first slot offset:

- gather replicate: ``A = 1``: one send ``(0, n, 0, 0, L)``; ``A > 1``: per replica ``d``
  ``(0, n, 0, d*A + a, 1)``; jobs per ``d``: ``(o_d, n_d, slot_d, 0, d*A + a, 1, 1)``;
- gather partial: one send ``(0, n, 0, 0, L)``; jobs per ``d``: ``(o_d, n_d, slot_d, 0, d*A, A, 1)``;
- combine: sends per ``d``: ``(o_d - base, n_d, 0, d*A, A)``; one job ``(0, n_own, 2^62, 0, 0, L, 1)``,
  ``self_row = o_own - base``;
- logits gather: as gather replicate, over the logits layout;
- wire (the quantized gather's fp8 rows, docs/fp8.md): as gather replicate, with its own signature.
"""

from dpgather.core import PaddingMode

__all__ = ["Layout", "Descriptor", "COPY_RECORDS", "signature", "mix"]

_BIG = 1 << 62
_MAX, _SUM = PaddingMode.MAX_LEN, PaddingMode.SUM_LEN

#: The copy records of one layout, in descriptor order. Each is (src_start, n_valid, dst_start,
#: n_rows) for ``copy_rows``:
#:
#: - ``pack``: own rows ``x[:n]`` into a send buffer of ``slot`` rows (padding zeroed);
#: - ``chunk``: own attn-TP chunk ``x[chunk_off : chunk_off + chunk_len]`` into a send buffer;
#: - ``sumw``: own rows into the own slot of the gathered buffer (SUM_LEN);
#: - ``unpack``: the own slot of a gathered buffer into an output of any rows (tail zeroed);
#: - ``outcopy``: a ``slot``-row result into an output of any rows (tail zeroed);
#: - ``ztail``: zero the rows of an output past ``n``.
COPY_RECORDS = ("pack", "chunk", "sumw", "unpack", "outcopy", "ztail")
_PER_LAYOUT = len(COPY_RECORDS)

# Operation codes of call signatures (the step's call hash, the P2P signatures).
OP_GATHER, OP_GATHER_LOGITS, OP_SCATTER, OP_SCATTER_LOGITS, OP_MASK, OP_GRAPH, OP_GATHER_FP8 = 1, 2, 3, 4, 5, 6, 7


def mix(h, value):
    """One FNV-1a step: the 32-bit hash ``h`` with the low 32 bits of ``value`` mixed in (how
    fields enter a signature, and signatures the step's call hash)."""
    return ((h ^ (value & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF


def signature(op, fingerprint, flag, dtype_code, width):
    """32-bit signature of one data-plane call (FNV-1a over its fields): equal on every rank iff
    the ranks issue the same operation on the same plan with the same dtype and row width."""
    h = 0x811C9DC5
    for v in (op, fingerprint & 0xFFFFFFFF, fingerprint >> 32, flag, dtype_code, width):
        h = mix(h, v)
    return h


class Layout:
    """One layout of a plan on one rank (see the module docstring). Read-only attributes:

    ``mode`` (PaddingMode), ``total`` (gathered rows), ``n`` (own replica's real rows),
    ``slot`` (own slot rows), ``off`` (own slot offset), ``equal`` (every chunk equal: MAX_LEN),
    ``counts``/``offsets``/``slots`` (per replica: real rows, slot offsets (D+1), slot rows),
    ``tp_counts``/``tp_offsets`` (per tp rank: its chunk, and where chunks start in the gathered
    buffer), ``attn_counts``/``attn_offsets`` (the own replica's chunks, offsets inside its slot),
    ``chunk_off``/``chunk_len`` (this rank's chunk of its slot). Tuples of ints.
    """

    __slots__ = ("mode", "total", "n", "slot", "off", "equal", "counts", "offsets", "slots",
                 "tp_counts", "tp_offsets", "attn_counts", "attn_offsets", "chunk_off", "chunk_len")

    def __init__(self, mode, counts, slots, offsets, total, d, a, A):
        self.mode = mode
        self.total = int(total)
        self.counts = tuple(int(c) for c in counts)
        self.slots = tuple(int(s) for s in slots)
        self.offsets = tuple(int(o) for o in offsets)
        self.n, self.slot, self.off = self.counts[d], self.slots[d], self.offsets[d]
        self.equal = mode == _MAX
        tp_counts, tp_offsets, mine = [], [], None
        for r, s in enumerate(self.slots):
            q, rem = divmod(s, A)
            start = self.offsets[r]
            chunks = []
            for i in range(A):
                c = q + (i < rem)
                tp_counts.append(c)
                tp_offsets.append(start)
                chunks.append(c)
                start += c
            if r == d:
                mine = chunks
        tp_offsets.append(self.total)
        self.tp_counts, self.tp_offsets = tuple(tp_counts), tuple(tp_offsets)
        self.attn_counts = tuple(mine)
        ao = [0]
        for c in mine:
            ao.append(ao[-1] + c)
        self.attn_offsets = tuple(ao)
        self.chunk_off, self.chunk_len = ao[a], mine[a]

    @classmethod
    def hidden(cls, plan, d, a):
        return cls(plan.mode, plan.num_tokens, plan.slot_rows, plan.slot_offsets, plan.gathered_rows,
                   d, a, plan.attn_tp_size)

    @classmethod
    def logits(cls, plan, d, a):
        return cls(plan.logits_mode, plan.logits_tokens, plan.logits_slot_rows, plan.logits_offsets,
                   plan.logits_rows, d, a, plan.attn_tp_size)

    def copy_records(self):
        """The 6 copy records of :data:`COPY_RECORDS`, flattened (24 ints)."""
        n, slot, off, co, cl = self.n, self.slot, self.off, self.chunk_off, self.chunk_len
        return (0, n, 0, slot,               # pack
                co, n - co, 0, cl,           # chunk
                0, n, off, slot,             # sumw
                off, n, 0, _BIG,             # unpack
                0, n, 0, _BIG,               # outcopy
                0, 0, n, _BIG)               # ztail


class Descriptor:
    """The int64 step descriptor of one topology (see the module docstring).

    Args:
        D, A: replicas and ranks per replica.
        node_size: ranks of one P2P group (a node: ``docs/p2p.md``, "Several nodes"), a multiple
            of ``A`` dividing ``D * A``; default all ranks. The P2P descriptors then cover the
            replicas of this rank's node only, with sources numbered inside the node, and the
            combine's input is the node's block of rows (``offsets`` of the node's first replica
            subtracted), which the inter-node reduce-scatter leaves in a staging buffer.

    Attributes:
        size: entries. ``record(layout_index, name)``: the copy-record index of a record.
        mask_at: entry of the first mask triple. p2p: ``{name: entry}`` of the P2P pull descriptors
        (``"gather_replicate"``, ``"gather_partial"``, ``"combine"``, ``"logits"``, ``"wire"``); push: the same
        for the push descriptors (docs/push.md).
        node_size, node_replicas: ranks and replicas of one P2P group.
    """

    HIDDEN, LOGITS = 0, 1

    def __init__(self, D, A, node_size=None):
        self.D, self.A, self.T = D, A, D * A
        L = self.T if node_size is None else int(node_size)
        if L < A or L % A or self.T % L:
            raise ValueError(f"node_size={node_size} must be a multiple of A={A} dividing T={self.T}")
        self.node_size, self.node_replicas = L, L // A
        DN = self.node_replicas
        self.mask_at = 4 * 2 * _PER_LAYOUT
        at = self.mask_at + 3 * D
        self.p2p = {}
        for name, npack, njobs in (("gather_replicate", 1, DN), ("gather_partial", 1, DN),
                                   ("combine", DN, 1), ("logits", 1, DN), ("wire", 1, DN)):
            self.p2p[name] = at
            at += 4 + 3 * npack + 7 * njobs
        self.push = {}
        for name, nsend, njobs in (("gather_replicate", 1 if A == 1 else DN, DN), ("gather_partial", 1, DN),
                                   ("combine", DN, 1), ("logits", 1 if A == 1 else DN, DN),
                                   ("wire", 1 if A == 1 else DN, DN)):
            self.push[name] = at
            at += 4 + 5 * nsend + 7 * njobs
        self.size = at

    @staticmethod
    def record(layout_index, name):
        """Index (in records of 4 entries) of copy record ``name`` of layout 0 (hidden) or 1 (logits)."""
        return layout_index * _PER_LAYOUT + COPY_RECORDS.index(name)

    def write(self, out, plan, hidden, logits, rank, sigs):
        """Encode a step into ``out`` (a host int64 array of :attr:`size` entries).

        Args:
            plan: the step's Plan. hidden, logits: its :class:`Layout` objects on this rank.
            rank: this tp rank. sigs: ``{p2p name: 32-bit signature}`` of the step's operations.
        """
        D, A = self.D, self.A
        out[0:24] = hidden.copy_records()
        out[24:48] = logits.copy_records()
        m = self.mask_at
        for d in range(D):
            out[m + 3 * d: m + 3 * d + 3] = (hidden.offsets[d], hidden.counts[d], hidden.slots[d])
        d_own = rank // A
        L, DN = self.node_size, self.node_replicas
        r0 = (rank // L) * L  # the node's first rank: P2P sources are numbered from it
        d0 = r0 // A  # the node's first replica
        for name, lay, count in (("gather_replicate", hidden, 1), ("gather_partial", hidden, A),
                                 ("logits", logits, 1), ("wire", hidden, 1)):
            at = self.p2p[name]
            out[at:at + 7] = (sigs[name], 1, DN, 0, 0, lay.n, 0)
            at += 7
            for d in range(d0, d0 + DN):
                out[at:at + 7] = (lay.offsets[d], lay.counts[d], lay.slots[d], 0, d * A - r0, count, 1)
                at += 7
        base = hidden.offsets[d0]
        at = self.p2p["combine"]
        out[at:at + 4] = (sigs["combine"], DN, 1, 0)
        at += 4
        for d in range(d0, d0 + DN):
            out[at:at + 3] = (hidden.offsets[d] - base, hidden.counts[d], hidden.offsets[d] - base)
            at += 3
        out[at:at + 7] = (0, hidden.counts[d_own], _BIG, hidden.offsets[d_own] - base, 0, L, 1)
        self._write_push(out, hidden, logits, rank, sigs)
        return out

    def _write_push(self, out, hidden, logits, rank, sigs):
        """The push descriptors of :attr:`push` (module docstring), built as one list and stored
        with one assignment (they are contiguous, the last entries): every row crosses NVLink
        once per destination; a rank's own rows come from its input."""
        A, L, DN = self.A, self.node_size, self.node_replicas
        d0, a, d_own = (rank // L) * L // A, rank % A, rank // A
        nodes = range(d0, d0 + DN)
        words = []
        for name, lay in (("gather_replicate", hidden), ("gather_partial", hidden), ("combine", hidden),
                          ("logits", logits), ("wire", hidden)):
            if name == "combine":  # each replica's rows to its A ranks; the input is the node block
                base = lay.offsets[d0]
                words += (sigs[name], DN, 1, lay.offsets[d_own] - base)
                for d in nodes:
                    words += (lay.offsets[d] - base, lay.counts[d], 0, (d - d0) * A, A)
                words += (0, lay.counts[d_own], _BIG, 0, 0, L, 1)
                continue
            partial = name == "gather_partial"
            spread = A > 1 and not partial  # replicate: each destination from its own attn-TP position
            words += (sigs[name], DN if spread else 1, DN, 0)
            if spread:
                for k in range(DN):
                    words += (0, lay.n, 0, k * A + a, 1)
            else:
                words += (0, lay.n, 0, 0, L)
            for d in nodes:
                words += (lay.offsets[d], lay.counts[d], lay.slots[d], 0, (d - d0) * A + (0 if partial else a),
                          A if partial else 1, 1)
        out[self.push["gather_replicate"]:self.size] = words
