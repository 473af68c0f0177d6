"""The data plane: docs/design.md's gather and combine algorithms, written once for every backend.

:class:`DataPlane` moves the rows of one step given the step's :class:`~dpgather._layout.Layout`
and device descriptor, over the backend's kernels and the trusted communicator primitives
(``comm.ops``) or a P2P transport: the step's transport (``Plan.transport``) is ``"nccl"`` (the
backend's collectives), ``"p2p"`` (the pull) or ``"push"``. The two P2P transports take the same
calls (``run(inp, out, desc, desc_off, ...)``) with their own descriptor entries
(``Descriptor.p2p`` / ``Descriptor.push``): the gather passes the caller's ``x`` as ``inp`` and the
combine writes the caller's ``out`` (or the ``output`` view) directly, no staging copy. Nothing here validates arguments: ``DpAttention`` and the
graph runner check them once at the public API. Every choice of a collective depends only on
the layout and the call's flags (identical on every rank); this rank's own row counts only
change local copies. The caller provides the buffers' arena, so the facade, graph runners and
micro-batches each use their own.

Ordering: every ``gather`` and ``combine`` is one operation of the launch chain
(:mod:`dpgather._chain`): it runs on the current stream after the previous operation of this data
plane, whatever stream that one ran on, so NCCL collectives on one communicator and P2P launches on
one window never run concurrently (asynchronous calls on a communication stream included).

Gather (``partial`` = the replica's ``A`` ranks hold summands; else they hold the same rows):

===========  ===============================================================================
SUM_LEN      fill the gathered buffer with the additive identity, write the own slot (partial:
             every rank; replicate: attn rank 0), all-reduce over tp: of the rows' *bytes* as
             uint8 where each row has one contributor (replicate, or A = 1), so the bits arrive
             exactly; in the dtype's arithmetic where it has ``A`` (partial, A > 1), the others
             contributing ``-0.0`` (see :meth:`DataPlane._sum_gather`)
MAX/VARLEN   A = 1: all-gather(v) of the own rows over tp (sent straight from the caller's
             array when it holds every row and no padding is needed)
             A > 1, replicate: all-gather(v) over tp of the own chunk
             A > 1, partial: reduce-scatter(v) over attn of the packed own rows into the own
             chunk, then all-gather(v) over tp
P2P, push    one pull or push collective (docs/p2p.md, docs/push.md): exact rows, padding
             zeroed locally; over several nodes, it covers the own node's replicas, then an
             all-gather(v) over ``inter`` (the ranks of the same place in every node) of the
             node blocks
===========  ===============================================================================

MAX_LEN is VARLEN with equal counts: the same code, with the non-v collectives.

The quantized gather (:meth:`DataPlane.gather_fp8`, docs/fp8.md) moves *wire rows* (``H`` float8
e4m3fn bytes, then one float32 scale per group) as bytes over the same algorithms: the
backend's ``quantize_rows`` takes the place of the pack copy (SUM_LEN: the write of the own slot;
MAX/VARLEN: the send buffer or the own chunk; P2P, push: the transport's input), and the wire rows
have one contributor each, so the replicate algorithms move them. A ``partial`` contribution with
``A > 1`` is first summed in the input dtype: an all-reduce over attn of the packed own rows (one
extra collective; fp8 summands would lose too much), after which every rank of the replica holds
the same rows and quantizes them alike.

Host-side decisions use only a layout's capacities (``slot``, ``total``, chunk sizes, ``equal``),
never its real counts: a graph runner passes the layout of its bucket (every count = the bucket)
and the step's real counts arrive through the descriptor, which the kernels read. The one
exception, sending the caller's rows without a copy, needs ``x`` to hold every real row and is
only taken for VARLEN layouts, which graphs never use.

Combine (``reduce``: ``Y`` is TP-partial; else replicated and only copied):

===========  ===============================================================================
SUM_LEN      all-reduce over tp, copy the own slot out
MAX/VARLEN   reduce-scatter(v) over tp of the chunks (A > 1: then all-gather(v) of the
             replica's chunks over attn), rows past ``n`` zeroed
P2P, push    one pull or push collective summing the own rows of every rank's ``Y``; over
             several nodes, first a reduce-scatter(v) over ``inter`` of the node blocks of ``Y``
             into the ``combine`` staging buffer, then the collective within the node sums the
             staged rows. ``reduce=False`` is a local copy over every transport (no collective)
===========  ===============================================================================

A node block is the rows of a node's replicas, contiguous in the gathered buffer (a node holds
whole replicas: its ranks are consecutive and a multiple of ``A``). Its size comes from the layout's
slot offsets, so in a graph step the inter-node collectives carry the bucket's rows (counts are
fixed at capture) while the pulls inside each node move exactly the real rows.
"""

import numpy as np

from dpgather.core import PaddingMode
from dpgather.core.dtypes import DTYPES

from ._layout import Descriptor

__all__ = ["DataPlane"]

_SUM = PaddingMode.SUM_LEN
_rec = Descriptor.record
_PACK, _CHUNK, _SUMW, _UNPACK, _OUTCOPY, _ZTAIL = (_rec(0, n) for n in
                                                   ("pack", "chunk", "sumw", "unpack", "outcopy", "ztail"))
_PER = _rec(1, "pack")  # records per layout
_BYTE = np.dtype(np.uint8)
#: logical float dtype -> (unsigned view dtype, bits of -0.0): the SUM_LEN partial fill
_NEG_ZERO = {name: (np.dtype(f"u{d.itemsize}"), 1 << (8 * d.itemsize - 1))
             for name, d in DTYPES.items() if "float" in name}


class DataPlane:
    """Row movement of one rank (see the module docstring).

    Args:
        backend: the array backend (``_backends``): kernels ``copy_rows``/``mask_rows``, ``zero``.
        tp: the tp communicator (all T ranks). attn: the attn-TP communicator, or None when A = 1.
        transports: the P2P transports (over this rank's node) by their public names
            (``{"p2p": pull, "push": push}``, either or both may be missing). descriptor: the :class:`Descriptor` of the
            topology (its ``node_size`` is the P2P group's).
        inter: with P2P over several nodes, the communicator of the ranks at this rank's place in
            every node (ordered by node), else None.
        attn_tp_rank, attn_tp_size: this rank's place in its replica. logical: the configured
            logical dtype (reductions of the configured dtype use it; other dtypes move as bytes).
    """

    def __init__(self, backend, tp, attn, transports, descriptor, attn_tp_rank, attn_tp_size, logical, storage,
                 inter=None):
        self.be = backend
        self.inter = inter.ops if inter is not None else None
        #: node of this rank and replicas per node (the node blocks of a layout: offsets[::step])
        self.node = inter.rank if inter is not None else 0
        self.node_step = descriptor.node_replicas
        self.tp = tp.ops
        self.attn = attn.ops if attn is not None else None
        #: transport name -> (transport, its descriptor entries by operation)
        self.transports = {name: (t, getattr(descriptor, name)) for name, t in transports.items()}
        self.desc_layout = descriptor
        self.a = attn_tp_rank
        self.A = attn_tp_size
        self.logical = logical
        self.storage = storage
        #: the launch chain (:mod:`dpgather._chain`) of the backend
        self.chain = backend.launch_chain()

    # -- gather ----------------------------------------------------------------------------
    def _chained(self, op, *args):
        """``op(*args)`` as one operation of the launch chain (module docstring, "Ordering")."""
        s, cap = self.chain.enter()
        result = op(*args)
        self.chain.leave(s, cap)
        return result

    def gather(self, arena, x, L, desc, partial, transport, role="gathered"):
        """Gather ``x`` as one operation of the launch chain (see :meth:`_gather`)."""
        return self._chained(self._gather, arena, x, L, desc, partial, transport, role)

    def _gather(self, arena, x, L, desc, partial, transport, role="gathered"):
        """Gather ``x`` (this rank's rows, ``[rows, W]``) over layout ``L`` into ``role``'s buffer.

        Returns ``G``: ``[L.total, W]``, replica ``d``'s rows at ``L.offsets[d]``, padding zero.
        ``transport``: the plan's (``"nccl"``, ``"p2p"``, ``"push"``). ``desc``: the step
        descriptor (backend array).
        """
        be, A = self.be, self.A
        W, dt = x.shape[1], x.dtype
        base = 0 if role == "gathered" else _PER
        logical = self.logical if dt == self.storage else "uint8"
        G = arena.view(role, L.total, W, dt)
        if L.total == 0:
            return G
        if transport != "nccl":
            name = "logits" if role != "gathered" else ("gather_partial" if partial else "gather_replicate")
            t, at = self.transports[transport]
            t.run(x, G, desc, at[name], row_bytes=W * dt.itemsize, dtype=logical)
            self._gather_nodes(G, L, logical)
            return G
        tp = self.tp
        if L.mode == _SUM:
            self._sum_gather(x, G, desc, base + _SUMW, partial, logical)
            return G
        n, equal = L.n, L.equal
        if A == 1:
            if not equal and x.shape[0] >= n:
                send = x
            else:
                send = arena.view("staging", L.slot, W, dt)
                be.copy_rows(x, send, desc, base + _PACK)
        elif partial:
            send, chunk = arena.views("staging", ((L.slot, W, dt), (L.chunk_len, W, dt)))
            be.copy_rows(x, send, desc, base + _PACK)
            if equal:
                self.attn.reduce_scatter(send, chunk, logical)
            else:
                self.attn.reduce_scatterv(send, chunk, L.attn_counts, L.attn_offsets, logical)
            send = chunk
        else:
            lo, hi = L.chunk_off, L.chunk_off + L.chunk_len
            if not equal and x.shape[0] >= hi and lo < hi:  # MAX_LEN chunks may reach into padding
                send = x[lo:hi]
            else:
                send = arena.view("staging", L.chunk_len, W, dt)
                be.copy_rows(x, send, desc, base + _CHUNK)
        if equal:
            tp.all_gather(send, G, logical)
        else:
            tp.all_gatherv(send, G, L.tp_counts, L.tp_offsets, logical)
        return G

    def _sum_gather(self, x, G, desc, rec, partial, logical):
        """The SUM_LEN gather into ``G``: every rank writes its slot (descriptor record ``rec``)
        into a buffer holding the additive identity elsewhere, then one all-reduce over tp.

        - One contributor per row (replicate: attn rank 0 writes; or A = 1): the all-reduce sums
          the rows' bytes as uint8. Every other rank holds zero bytes there, so each sum is the
          one nonzero byte: ``-0.0``, signalling NaNs and NaN payloads arrive bit for bit, as
          VARLEN's and MAX_LEN's all-gathers and the P2P pull deliver them. Same bytes on the
          wire, so the cost model prices it as before.
        - Partial with A > 1: the slot is a sum by definition, in the dtype's arithmetic. The
          other replicas' ranks contribute ``-0.0`` (floating point; 0 for integers), the exact
          additive identity: ``v + (-0.0)`` has the bits of ``v`` for every ``v`` but a signalling
          NaN (which any sum quiets), so a slot row is the sum of its replica's ``A`` summands
          alone, as VARLEN's reduce-scatter over attn and the P2P pull compute it
          (a ``-0.0`` sum stays ``-0.0``; the zero rows past what a replica provided are written
          ``+0.0`` by its ranks and stay ``+0.0``). docs/design.md section 4 says what is
          bit-identical across modes.
        """
        be = self.be
        summed = partial and self.A > 1
        neg0 = _NEG_ZERO.get(logical) if summed else None
        if neg0 is None:
            be.zero(G)
        else:
            G.view(neg0[0]).fill(neg0[1])
        if partial or self.a == 0:
            be.copy_rows(x, G, desc, rec)
        if summed:
            self.tp.all_reduce(G, G, logical)
        else:
            Gb = G.view(_BYTE)
            self.tp.all_reduce(Gb, Gb, "uint8")

    # -- the quantized gather ------------------------------------------------------------------
    def gather_fp8(self, arena, x, L, desc, partial, transport, fmt):
        """The quantized gather of ``x`` as one operation of the launch chain (see
        :meth:`_gather_fp8`)."""
        return self._chained(self._gather_fp8, arena, x, L, desc, partial, transport, fmt)

    def _gather_fp8(self, arena, x, L, desc, partial, transport, fmt):
        """Quantize and gather ``x`` (``[rows, H]`` of the configured dtype) over layout ``L``.

        Returns the wire rows ``G``: uint8 ``[L.total, fmt.wire_bytes(H)]`` in the ``gathered``
        role, replica ``d``'s rows at ``L.offsets[d]``, each the quantization of its row
        (docs/fp8.md); padding rows are zero bytes (zero fp8 values, zero scales).
        """
        be, A = self.be, self.A
        H, dt = x.shape[1], x.dtype
        W = fmt.wire_bytes(H)
        if L.total == 0:
            return arena.view("gathered", 0, W, _BYTE)
        sums = partial and A > 1
        specs = ((L.slot, H, dt),) if sums else ()
        if transport != "nccl" or L.mode != _SUM:  # wire rows staged to send (SUM_LEN writes G itself)
            specs += ((L.chunk_len if transport == "nccl" and A > 1 else L.slot, W, _BYTE),)
        views = arena.views("staging", specs) if specs else ()
        src = x
        if sums:  # the replica's summands, summed in the input dtype, on every rank of it
            src = views[0]
            be.copy_rows(x, src, desc, _PACK)
            self.attn.all_reduce(src, src, self.logical)
        G = arena.view("gathered", L.total, W, _BYTE)

        def quantize(dst, rec):
            be.quantize_rows(src, dst, desc, rec, fmt.group_size, fmt.pow2_scales, self.logical)

        if transport != "nccl":
            wire = views[-1]
            quantize(wire, _PACK)
            t, at = self.transports[transport]
            t.run(wire, G, desc, at["wire"], row_bytes=W, dtype="uint8")
            self._gather_nodes(G, L, "uint8")
            return G
        if L.mode == _SUM:
            be.zero(G)
            if self.a == 0:
                quantize(G, _SUMW)
            self.tp.all_reduce(G, G, "uint8")
            return G
        send = views[-1]
        quantize(send, _CHUNK if A > 1 else _PACK)
        if L.equal:
            self.tp.all_gather(send, G, "uint8")
        else:
            self.tp.all_gatherv(send, G, L.tp_counts, L.tp_offsets, "uint8")
        return G

    # -- combine ---------------------------------------------------------------------------
    def combine(self, arena, Y, L, desc, reduce, out, transport):
        """Combine ``Y`` as one operation of the launch chain (see :meth:`_combine`)."""
        return self._chained(self._combine, arena, Y, L, desc, reduce, out, transport)

    def _combine(self, arena, Y, L, desc, reduce, out, transport):
        """Bring ``Y`` (``[>= L.total, W]``) back to this replica's rows.

        Returns ``y``: ``out``, or a ``[L.slot, W]`` view of the ``output`` role;
        ``y[i] = sum over tp ranks of Y[L.off + i]`` (``reduce``) or ``Y[L.off + i]`` for
        ``i < L.n``, zero after.
        """
        be, A = self.be, self.A
        W, dt = Y.shape[1], Y.dtype
        logical = self.logical if dt == self.storage else "uint8"
        y = out if out is not None else arena.view("output", L.slot, W, dt)
        if L.total == 0:
            if y.shape[0]:
                be.copy_rows(y, y, desc, _ZTAIL)
            return y
        Yv = Y[:L.total] if Y.shape[0] != L.total else Y
        if not reduce:
            be.copy_rows(Yv, y, desc, _UNPACK)
            return y
        if transport != "nccl":
            if self.inter is not None:
                counts, o = self._node_blocks(L)
                stage = arena.view("combine", counts[self.node], W, dt)
                if L.equal:
                    self.inter.reduce_scatter(Yv, stage, logical)
                else:
                    self.inter.reduce_scatterv(Yv, stage, counts, o, logical)
                Yv = stage
            t, at = self.transports[transport]
            t.run(Yv, y, desc, at["combine"], row_bytes=W * dt.itemsize, dtype=logical)
            return y
        tp = self.tp
        if L.mode == _SUM:
            full = arena.view("combine", L.total, W, dt)
            tp.all_reduce(Yv, full, logical)
            be.copy_rows(full, y, desc, _UNPACK)
            return y
        direct = y.shape[0] == L.slot
        if A == 1:
            dst = y if direct else arena.view("combine", L.slot, W, dt)
            if L.equal:
                tp.reduce_scatter(Yv, dst, logical)
            else:
                tp.reduce_scatterv(Yv, dst, L.tp_counts, L.tp_offsets, logical)
        else:
            if direct:
                chunk, dst = arena.view("combine", L.chunk_len, W, dt), y
            else:
                chunk, dst = arena.views("combine", ((L.chunk_len, W, dt), (L.slot, W, dt)))
            if L.equal:
                tp.reduce_scatter(Yv, chunk, logical)
                self.attn.all_gather(chunk, dst, logical)
            else:
                tp.reduce_scatterv(Yv, chunk, L.tp_counts, L.tp_offsets, logical)
                self.attn.all_gatherv(chunk, dst, L.attn_counts, L.attn_offsets, logical)
        if direct:
            if L.equal:  # padding rows of the slot got sums too; n comes from the descriptor (graphs)
                be.copy_rows(y, y, desc, _ZTAIL)
        else:
            be.copy_rows(dst, y, desc, _OUTCOPY)
        return y

    def _gather_nodes(self, G, L, logical):
        """Over several nodes, after a P2P gather of the own node's block into ``G``: the
        all-gather(v) of the node blocks over ``inter`` (in place; nothing on one node)."""
        if self.inter is None:
            return
        counts, o = self._node_blocks(L)
        send = G[o[self.node]:o[self.node + 1]]  # in place: the own node's block is already in G
        if L.equal:
            self.inter.all_gather(send, G, logical)
        else:
            self.inter.all_gatherv(send, G, counts, o, logical)

    def _node_blocks(self, L):
        """``(counts, offsets)`` of the node blocks of layout ``L`` (rows of each node's replicas,
        contiguous in the gathered buffer; ``offsets`` has one entry per node plus the end)."""
        o = L.offsets[::self.node_step]
        return tuple(o[i + 1] - o[i] for i in range(len(o) - 1)), o

    # -- local copies ----------------------------------------------------------------------
    def unpack_logits(self, Lrows, y, desc):
        """``y[i] = Lrows[logits_offsets[own] + i]`` for ``i < logits_tokens[own]``, zero after."""
        self.be.copy_rows(Lrows, y, desc, _PER + _UNPACK)
        return y

    def mask(self, ids, desc, fill):
        """Set the padding rows of every slot of ``ids`` to ``fill`` (in place)."""
        self.be.mask_rows(ids, desc, self.desc_layout.mask_at, self.desc_layout.D, fill)
        return ids

    def copy_input(self, x, dst, desc):
        """``dst[:n] = x[:n]`` of the own rows, ``dst[n:slot]`` zero (the graph runner's input)."""
        self.be.copy_rows(x, dst, desc, _PACK)
