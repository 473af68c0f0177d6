# cython: language_level=3, binding=True, embedsignature=True, auto_pickle=False, autotestdict=False
# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The per-step planner: token counts, padding mode, slot layout and graph decision.

Every rank runs the planner on the same gathered record table, so every rank computes the
identical :class:`Plan` and issues the identical sequence of collectives. The planner is a pure
function of (table, topology, spec, policy, graph buckets, cost model). See docs/design.md sections
1-3 and ``docs/planner.md`` for the rules; ``docs/cost-model.md`` for the ``"auto"`` policy.
"""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memset
from cpython.mem cimport PyMem_Malloc, PyMem_Free

import numpy as np

from .cost import CURVE_POINTS, CostModel
from .errors import ConfigError, InconsistentBatchError, InputError
from .types import POLICIES, ForwardMode, LocalBatch, PaddingMode, SpecConfig, Topology

cnp.import_array()

__all__ = [
    "TRANSPORTS",
    "RECORD_WIDTH",
    "RECORD_MAGIC",
    "RECORD_FIELDS",
    "Plan",
    "Planner",
    "count_tokens",
    "plan",
]

#: Number of int32 fields in one per-step record.
RECORD_WIDTH = 8
#: Field 0 of every record: "DPG1" (record format version 1).
RECORD_MAGIC = 0x44504731
#: Names of the record fields, in order.
RECORD_FIELDS = (
    "magic", "mode", "batch_size", "extend_tokens", "logprob_tokens", "can_run_graph",
    "num_tokens", "logits_tokens",
)

cdef enum:
    F_MAGIC = 0
    F_MODE = 1
    F_BS = 2
    F_EXT = 3
    F_LP = 4
    F_GRAPH = 5
    F_N = 6
    F_L = 7
    WIDTH = 8

cdef enum:
    IDLE = 0
    DECODE = 1
    EXTEND = 2
    TARGET_VERIFY = 3
    DRAFT_DECODE = 4
    DRAFT_EXTEND = 5

cdef enum:
    POL_AUTO = 0
    POL_SGLANG = 1
    POL_MAX = 2
    POL_SUM = 3
    POL_VAR = 4

cdef enum:
    PAD_MAX = 0
    PAD_SUM = 1
    PAD_VAR = 2

cdef enum:
    C_AG = 0
    C_RS = 1
    C_AR = 2
    C_GV = 3
    C_RSV = 4
    C_P2P = 5
    C_PUSH = 6

cdef enum:
    N_CURVE = 16  # most points of one link-time curve: core.cost.CURVE_POINTS

cdef enum:
    TR_AUTO = 0
    TR_NCCL = 1
    TR_P2P = 2
    TR_PUSH = 3

cdef enum:  # Plan.transport, in order (the fingerprint hashes the code)
    USE_NCCL = 0
    USE_PULL = 1
    USE_PUSH = 2

cdef int64_t MAGIC = 0x44504731
cdef int64_t INT32_MAX = 2147483647
_PADDING = (PaddingMode.MAX_LEN, PaddingMode.SUM_LEN, PaddingMode.VARLEN)
_POLICY_CODE = {"auto": POL_AUTO, "sglang": POL_SGLANG, "max_len": POL_MAX, "sum_len": POL_SUM,
                "varlen": POL_VAR}
_COLL_ORDER = ("all_gather", "reduce_scatter", "all_reduce", "gatherv", "reduce_scatterv", "p2p", "push")
_TRANSPORT_CODE = {"auto": TR_AUTO, "nccl": TR_NCCL, "p2p": TR_P2P, "push": TR_PUSH}
_TRANSPORT_NAME = ("nccl", "p2p", "push")
assert CURVE_POINTS == N_CURVE, "core.cost.CURVE_POINTS and the planner's N_CURVE must agree"
#: Transport preferences accepted by the planner (docs/planner.md section 8).
TRANSPORTS = ("auto", "nccl", "p2p", "push")


cdef struct Config:
    int64_t T
    int64_t A
    int64_t D
    int has_spec
    int64_t S
    int64_t K
    int64_t N
    int policy
    double row_bytes
    double copy_bw
    double mlp_row_us
    double mode_us[3]
    int64_t p2p_rows
    int64_t push_rows
    int64_t p2p_node
    double wire_bytes
    int transport
    double a0[7]
    double a1[7]
    double beta[7]
    int cn[7][2]
    double cx[7][2][N_CURVE]
    double ct[7][2][N_CURVE]


cdef inline int64_t align_up(int64_t x, int64_t a) noexcept nogil:
    return ((x + a - 1) // a) * a


cdef inline int64_t imax(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef inline int64_t imin(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b


cdef double coll_us(const Config* c, int coll, int64_t group, double nbytes, int64_t active) noexcept nogil:
    """t_c(P, B) of cost.py (microseconds)."""
    cdef double factor
    if group <= 1:
        return 0.0
    if active < 1:
        active = 1
    factor = 2.0 if coll == C_AR else 1.0
    return (c.a0[coll] + c.a1[coll] * (active - 1)
            + nbytes * factor * (group - 1) / group / (c.beta[coll] * 1e3))


cdef double curve_us(const Config* c, int coll, int which, double x) noexcept nogil:
    """Link time (us) of ``x`` bytes per direction: curve ``which`` (0 one-way, 1 both ways)
    of ``coll``, linear between points, scaled by the end point's bandwidth outside them; ``x /
    beta`` without a curve (docs/cost-model.md, "Link time")."""
    cdef int n = c.cn[coll][which], j
    cdef const double* xs = c.cx[coll][which]
    cdef const double* ts = c.ct[coll][which]
    if x <= 0:
        return 0.0
    if n == 0:
        return x / (c.beta[coll] * 1e3)
    if x <= xs[0]:
        return ts[0] * (x / xs[0])
    for j in range(1, n):
        if x <= xs[j]:
            return ts[j - 1] + (ts[j] - ts[j - 1]) * ((x - xs[j - 1]) / (xs[j] - xs[j - 1]))
    return ts[n - 1] * (x / xs[n - 1])


cdef double link_us(const Config* c, int coll, double i, double o) noexcept nogil:
    """Time (us) a rank needs to receive ``i`` and send ``o`` bytes, never less than the larger
    amount ``M`` one way, ``one(M)`` (docs/cost-model.md, "Link time"). With traffic both ways
    (the smaller amount ``m > 0``): NCCL and the push transport, which write into the peer, as
    ``(i + o) / 2`` bytes each way, ``both((i + o) / 2)``; the P2P pulls as ``m`` both ways and
    the rest one way, ``both(m) + one(M) - one(m)``."""
    cdef double M = i if i > o else o, m = o if i > o else i
    cdef double t = curve_us(c, coll, 0, M), u
    if m > 0:
        if coll == C_P2P:
            u = curve_us(c, coll, 1, m) + (t - curve_us(c, coll, 0, m))
        else:
            u = curve_us(c, coll, 1, (i + o) / 2)
        if u > t:
            t = u
    return t


cdef double vcoll_us(const Config* c, int coll, int64_t T, int64_t A, const int64_t* n, int64_t D,
                     int64_t active, double R) noexcept nogil:
    """An NCCL v-collective over the T ranks of the replica counts ``n`` (each replica's rows in
    A chunks of ``n_d / A``, rows of ``R`` bytes): latency plus the slowest rank's link time. NCCL
    runs the grouped broadcasts (reduces) around a ring in rank order, so a rank receives every
    chunk but its own and passes on every chunk but its successor's; reduce_scatterv is the
    mirror, which ``link_us`` (symmetric in what a rank receives and sends) prices alike."""
    cdef double S = 0.0, share, i, o, t, worst = 0.0
    cdef int64_t d
    if T <= 1:
        return 0.0
    if active < 1:
        active = 1
    for d in range(D):
        S += n[d]
    for d in range(D):
        share = (<double>n[d]) / A
        i = (S - share) * R
        if A > 1:  # a rank whose successor holds the same chunk size
            t = link_us(c, coll, i, i)
            if t > worst:
                worst = t
        o = (S - (<double>n[(d + 1) % D]) / A) * R
        t = link_us(c, coll, i, o)
        if t > worst:
            worst = t
    return c.a0[coll] + c.a1[coll] * (active - 1) + worst


cdef inline double gather_bytes(const Config* c) noexcept nogil:
    """Bytes of one row in the hidden-state gather: the quantized wire row (``wire_bytes``) when
    set, else ``row_bytes`` (docs/cost-model.md, "Quantized gather")."""
    return c.wire_bytes if c.wire_bytes > 0 else c.row_bytes


#: The quantize kernel's time per byte read + written, relative to a copy's (``copy_GBps``):
#: 1427 against 2874 GB/s on 1x H100 at 8192 rows of 14336 B (BENCHMARKS.md, "fp8").
cdef double QUANTIZE_PER_COPY_BYTE = 2.0


cdef inline double quantize_us(const Config* c, double rows) noexcept nogil:
    """The quantize pass (us) of ``rows`` rows, each read at ``row_bytes`` and written at
    ``wire_bytes``, at ``copy_bw / QUANTIZE_PER_COPY_BYTE`` (bytes read + written); 0 when
    unquantized."""
    if c.wire_bytes <= 0:
        return 0.0
    return QUANTIZE_PER_COPY_BYTE * rows * (c.row_bytes + c.wire_bytes) / (c.copy_bw * 1e3)


cdef double p2p_us(const Config* c, int64_t T, int64_t A, const int64_t* n, int64_t D, int cls) noexcept nogil:
    """Predicted gather + combine time over a P2P transport (docs/cost-model.md, "P2P" and
    "Push"): ``cls`` is ``C_P2P`` (the pull: rows packed into the window, pulled, copied out) or
    ``C_PUSH`` (one one-way trip, no barrier, no pack, each data byte a line byte of two: ``x``
    of the push curves counts line bytes; the own rows copied from the input). In one node a
    rank of replica d receives ``A*S - n_d`` rows and has ``(T-1)*n_d`` taken (the combine: the
    mirror); over several nodes the transport covers about a node's share of the rows and the
    node blocks go over ``nodes`` ranks at each place. The gather half moves rows of
    ``gather_bytes`` (plus the quantize pass of the largest replica when quantized), the combine
    half rows of ``row_bytes``."""
    cdef double a, R = c.row_bytes, W = gather_bytes(c), S = 0.0, nmin = 0.0, nmax = 0.0, moved, copies, t
    cdef double wg = 0.0, wc = 0.0
    cdef double w = 2.0 if cls == C_PUSH else 1.0
    cdef int64_t d
    if T <= 1:
        return 0.0
    cdef int64_t L = c.p2p_node if 0 < c.p2p_node < T else T
    cdef int64_t nodes = T // L
    for d in range(D):
        S += n[d]
        if d == 0 or n[d] < nmin:
            nmin = n[d]
        if n[d] > nmax:
            nmax = n[d]
    a = c.a0[cls] + c.a1[cls] * (L - 1)
    if cls == C_PUSH:
        copies = (2.0 * nmax * W + nmax * R) / (c.copy_bw * 1e3)
    else:
        copies = (4.0 * nmax * W + 2.0 * (nmax + S) * R) / (c.copy_bw * 1e3)
    copies = copies + quantize_us(c, nmax)
    if nodes == 1:
        for d in range(D):
            t = link_us(c, cls, w * (A * S - n[d]) * R, w * (T - 1) * (<double>n[d]) * R)
            if t > wc:
                wc = t
            if W != R:
                t = link_us(c, cls, w * (A * S - n[d]) * W, w * (T - 1) * (<double>n[d]) * W)
                if t > wg:
                    wg = t
        if W == R:
            wg = wc
        return a + wg + a + wc + copies
    moved = A * S / nodes - nmin
    if moved < 0:
        moved = 0
    return (a + curve_us(c, cls, 0, w * moved * W) + coll_us(c, C_GV, nodes, S * W, nodes)
            + coll_us(c, C_RSV, nodes, S * R, nodes) + a + curve_us(c, cls, 0, w * (L - 1) * nmax * R)
            + copies)


cdef int count_one(const Config* c, int64_t mode, int64_t bs, int64_t ext, int64_t lp,
                   int64_t* n, int64_t* l) except -1:
    """Token count ``n`` and logits rows ``l`` of one batch (docs/design.md section 2)."""
    if mode == IDLE:
        n[0] = 0
        l[0] = 0
    elif mode == DECODE:
        n[0] = bs
        l[0] = bs
    elif mode == EXTEND:
        n[0] = ext
        l[0] = bs if lp < 0 else lp
    else:
        if not c.has_spec:
            raise ConfigError(
                f"forward mode {ForwardMode(mode).name} is speculative and needs "
                f"spec=dpgather.SpecConfig(num_steps=..., topk=..., num_draft_tokens=...); got spec=None")
        if mode == TARGET_VERIFY:
            n[0] = bs * c.N
            l[0] = bs * c.N
        elif mode == DRAFT_DECODE:
            n[0] = bs * c.K
            l[0] = bs * c.K
        else:
            n[0] = bs * (c.S + 1)
            l[0] = bs
    if n[0] > INT32_MAX or l[0] > INT32_MAX:
        raise InputError(
            f"a {ForwardMode(mode).name} batch of batch_size={bs} gives {n[0]} tokens and {l[0]} "
            f"logits rows; the per-step record holds at most {INT32_MAX} (2**31 - 1)")
    return 0


cdef uint64_t fnv1a(uint64_t h, int64_t v) noexcept nogil:
    cdef int i
    cdef uint64_t u = <uint64_t>v
    for i in range(8):
        h ^= (u >> (8 * i)) & 0xff
        h *= 0x100000001b3ULL
    return h


cdef class Plan:
    """The layout of one step's gathered buffer, identical on every rank.

    All arrays are read-only NumPy int64 views; counts are rows. Replica ``d`` owns rows
    ``[slot_offsets[d], slot_offsets[d] + slot_rows[d])`` of the gathered buffer, of which the
    first ``num_tokens[d]`` are its tokens and the rest padding (zero). The logits gather uses
    its own layout (``logits_*``) with ``logits_mode``.

    Attributes:
        mode: :class:`PaddingMode` of the hidden-state gather and combine.
        logits_mode: :class:`PaddingMode` of the logits gather (SUM_LEN or VARLEN outside graphs,
            MAX_LEN inside).
        graph: every replica replays a captured graph of ``bucket`` rows per slot.
        bucket: per-replica graph capacity in rows (0 when ``graph`` is False).
        skip: every replica is IDLE; nobody runs the forward and no collective is issued.
        is_extend_in_batch: some replica runs EXTEND (target prefill).
        num_tokens, logits_tokens: ``[D]`` rows per replica (under ``"sglang"`` the token counts
            are aligned up to ``attn_tp_size``).
        slot_rows, slot_offsets, gathered_rows: ``[D]``, ``[D+1]`` and the total of the gathered
            buffer.
        logits_slot_rows, logits_offsets, logits_rows: the same for the logits gather.
        predicted_us: ``(MAX_LEN, SUM_LEN, VARLEN)`` predicted gather + combine time of the cost
            model (microseconds), whatever the policy.
        transport: ``"nccl"`` (the backend's collectives: NCCL, or MPI on the host backend),
            ``"p2p"`` (the P2P pull transport) or ``"push"`` (the P2P push transport): exact rows,
            counts read on the device.
        predicted_p2p_us: predicted gather + combine time over the pull (0 without it).
        predicted_push_us: predicted gather + combine time over the push (0 without it).
        wire_bytes: bytes of one hidden-state gather row the predictions priced (the quantized
            gather's wire row, ``Fp8Format.wire_bytes(H)``); 0: unquantized, the cost model's
            ``row_bytes``.
        fingerprint: 64-bit FNV-1a hash of everything above except the predictions and
            ``wire_bytes``.
    """

    cdef readonly object mode
    cdef readonly object logits_mode
    cdef readonly bint graph
    cdef readonly bint skip
    cdef readonly bint is_extend_in_batch
    cdef readonly int64_t bucket
    cdef readonly int64_t gathered_rows
    cdef readonly int64_t logits_rows
    cdef readonly int64_t dp_size
    cdef readonly int64_t attn_tp_size
    cdef readonly int64_t world_size
    cdef readonly uint64_t fingerprint
    cdef readonly tuple predicted_us
    cdef readonly double predicted_p2p_us
    cdef readonly double predicted_push_us
    cdef readonly int64_t wire_bytes
    cdef readonly str policy
    cdef readonly str transport
    cdef object _buf
    cdef object _views

    def __init__(self):
        raise TypeError("Plan objects are made by dpgather.plan() or Planner.plan_table()")

    cdef object _view(self, int which, int64_t start, int64_t length):
        if self._views is None:
            self._views = [None] * 6
        v = self._views[which]
        if v is None:
            v = self._buf[start:start + length]
            self._views[which] = v
        return v

    @property
    def num_tokens(self):
        return self._view(0, 0, self.dp_size)

    @property
    def logits_tokens(self):
        return self._view(1, self.dp_size, self.dp_size)

    @property
    def slot_rows(self):
        return self._view(2, 2 * self.dp_size, self.dp_size)

    @property
    def slot_offsets(self):
        return self._view(3, 3 * self.dp_size, self.dp_size + 1)

    @property
    def logits_slot_rows(self):
        return self._view(4, 4 * self.dp_size + 1, self.dp_size)

    @property
    def logits_offsets(self):
        return self._view(5, 5 * self.dp_size + 1, self.dp_size + 1)

    def as_dict(self):
        """Every attribute as plain Python values (lists for arrays), e.g. for JSON reports."""
        return {
            "mode": self.mode.name, "logits_mode": self.logits_mode.name, "graph": self.graph,
            "bucket": self.bucket, "skip": self.skip, "is_extend_in_batch": self.is_extend_in_batch,
            "num_tokens": self.num_tokens.tolist(), "logits_tokens": self.logits_tokens.tolist(),
            "slot_rows": self.slot_rows.tolist(), "slot_offsets": self.slot_offsets.tolist(),
            "gathered_rows": self.gathered_rows, "logits_slot_rows": self.logits_slot_rows.tolist(),
            "logits_offsets": self.logits_offsets.tolist(), "logits_rows": self.logits_rows,
            "predicted_us": list(self.predicted_us), "policy": self.policy, "transport": self.transport,
            "fingerprint": f"{self.fingerprint:016x}",
        }

    def __eq__(self, other):
        if not isinstance(other, Plan):
            return NotImplemented
        cdef Plan o = <Plan>other
        return (self.fingerprint == o.fingerprint and self.mode == o.mode
                and self.logits_mode == o.logits_mode and self.graph == o.graph
                and self.bucket == o.bucket and self.skip == o.skip
                and self.is_extend_in_batch == o.is_extend_in_batch
                and self.attn_tp_size == o.attn_tp_size and self.transport == o.transport
                and np.array_equal(self._buf, o._buf))

    def __hash__(self):
        return hash(self.fingerprint)

    def __repr__(self):
        return (f"Plan(mode={self.mode.name}, transport={self.transport}, graph={self.graph}, bucket={self.bucket}, "
                f"skip={self.skip}, num_tokens={self.num_tokens.tolist()}, "
                f"slot_rows={self.slot_rows.tolist()}, gathered_rows={self.gathered_rows}, "
                f"logits_mode={self.logits_mode.name}, logits_rows={self.logits_rows}, "
                f"fingerprint={self.fingerprint:016x})")


cdef class Planner:
    """Plans steps for one fixed configuration; the entry point of the per-step sync.

    Args:
        topology: a :class:`Topology`.
        spec: a :class:`SpecConfig` (required for the speculative forward modes) or None.
        policy: ``"auto"`` (cost model), ``"sglang"`` (SGLang's rule), ``"max_len"``,
            ``"sum_len"`` or ``"varlen"`` (forced).
        graph_buckets: per-replica token capacities with captured graphs (positive multiples
            of ``attn_tp_size``).
        cost: a :class:`CostModel` (default: the built-in H100 constants).
        transport: ``"auto"`` (the cost model decides per step), ``"nccl"``, ``"p2p"`` (the
            pull whenever the step fits ``p2p_rows``) or ``"push"`` (the push whenever the step
            fits ``push_rows``, else as ``"p2p"``).
        p2p_rows: rows of the configured width the P2P pull transport holds per collective (its
            capacity: every replica's rows), 0 when there is no pull transport (docs/planner.md
            section 8).
        push_rows: rows of the configured width per replica the push transport's windows hold
            (a region holds one replica's rows), 0 when there is no push transport.
        p2p_node_size: ranks of one P2P group when the transport runs inside each of several
            nodes, NCCL carrying the node blocks between them (docs/p2p.md, "Several nodes");
            0 (default): one group of every rank. Only the cost of P2P steps depends on it.
        wire_bytes: bytes of one row of the quantized hidden-state gather (``DpAttention(fp8=...)``:
            ``Fp8Format.wire_bytes(hidden_size)``); the gather terms of every prediction move rows
            of this size and add the quantize pass (docs/cost-model.md, "Quantized gather"); the
            combine and the logits gather keep ``cost.row_bytes``. 0 (default): unquantized.

    ``record(batch)`` encodes this rank's batch as ``RECORD_WIDTH`` int32 fields (see
    ``docs/internals.md``); ``plan_table(table)`` plans from the ``[world_size, RECORD_WIDTH]``
    table every rank gathered; ``plan_batches(batches)`` plans from one batch per replica.
    """

    cdef Config cfg
    cdef int64_t[::1] _buckets
    cdef int64_t _nb
    cdef readonly object topology
    cdef readonly object spec
    cdef readonly str policy
    cdef readonly tuple graph_buckets
    cdef readonly object cost
    cdef readonly str transport
    cdef readonly int64_t p2p_rows
    cdef readonly int64_t push_rows
    cdef readonly int64_t p2p_node_size
    cdef readonly int64_t wire_bytes

    def __init__(self, topology, spec=None, policy="auto", graph_buckets=(), cost=None, transport="auto",
                 p2p_rows=0, p2p_node_size=0, push_rows=0, wire_bytes=0):
        cdef int i
        if not isinstance(topology, Topology):
            raise ConfigError(f"topology must be a dpgather.Topology, got {topology!r}")
        if spec is not None and not isinstance(spec, SpecConfig):
            raise ConfigError(f"spec must be a dpgather.SpecConfig or None, got {spec!r}")
        if not isinstance(policy, str) or policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        if cost is None:
            cost = CostModel()
        elif not isinstance(cost, CostModel):
            raise ConfigError(f"cost must be a dpgather.CostModel or None, got {cost!r}")
        self.topology = topology
        self.spec = spec
        self.policy = policy
        self.cost = cost
        A = topology.attn_tp_size
        if graph_buckets is None:
            graph_buckets = ()
        try:
            buckets = sorted(set(graph_buckets))
        except TypeError:
            raise ConfigError(
                f"graph_buckets must be an iterable of positive ints, got {graph_buckets!r}") from None
        for b in buckets:
            if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0 or b % A:
                raise ConfigError(
                    f"graph_buckets must be positive multiples of attn_tp_size={A}, got {b!r} "
                    f"in {tuple(graph_buckets)!r}")
            if b > INT32_MAX:
                raise ConfigError(
                    f"graph_buckets must be <= {INT32_MAX} (token counts are int32), got {b!r}")
        self.graph_buckets = tuple(int(b) for b in buckets)
        self._buckets = np.array(self.graph_buckets or (0,), dtype=np.int64)
        self._nb = len(self.graph_buckets)
        memset(&self.cfg, 0, sizeof(Config))
        self.cfg.T = topology.world_size
        self.cfg.A = A
        self.cfg.D = topology.dp_size
        if spec is not None:
            self.cfg.has_spec = 1
            self.cfg.S = spec.num_steps
            self.cfg.K = spec.topk
            self.cfg.N = spec.num_draft_tokens
        self.cfg.policy = _POLICY_CODE[policy]
        if not isinstance(transport, str) or transport not in _TRANSPORT_CODE:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if isinstance(p2p_rows, bool) or not isinstance(p2p_rows, (int, np.integer)) or not 0 <= p2p_rows < 2**62:
            raise ConfigError(f"p2p_rows must be an int >= 0 (0: no P2P transport), got {p2p_rows!r}")
        if isinstance(push_rows, bool) or not isinstance(push_rows, (int, np.integer)) or not 0 <= push_rows < 2**62:
            raise ConfigError(f"push_rows must be an int >= 0 (0: no push transport), got {push_rows!r}")
        if isinstance(wire_bytes, bool) or not isinstance(wire_bytes, (int, np.integer)) or not 0 <= wire_bytes < 2**62:
            raise ConfigError(f"wire_bytes must be an int >= 0 (bytes of one quantized gathered row, "
                              f"Fp8Format.wire_bytes(hidden_size); 0: unquantized), got {wire_bytes!r}")
        if (isinstance(p2p_node_size, bool) or not isinstance(p2p_node_size, (int, np.integer))
                or p2p_node_size < 0 or (p2p_node_size and (topology.world_size % p2p_node_size
                                                             or p2p_node_size % topology.attn_tp_size))):
            raise ConfigError(f"p2p_node_size must be 0 (one group) or a multiple of attn_tp_size="
                              f"{topology.attn_tp_size} dividing world_size={topology.world_size}, "
                              f"got {p2p_node_size!r}")
        self.transport = transport
        self.p2p_rows = int(p2p_rows)
        self.push_rows = int(push_rows)
        self.p2p_node_size = int(p2p_node_size)
        self.wire_bytes = int(wire_bytes)
        self.cfg.transport = _TRANSPORT_CODE[transport]
        self.cfg.p2p_rows = self.p2p_rows
        self.cfg.push_rows = self.push_rows
        self.cfg.p2p_node = self.p2p_node_size
        self.cfg.wire_bytes = self.wire_bytes
        self.cfg.row_bytes = cost.row_bytes
        self.cfg.copy_bw = cost.copy_GBps
        self.cfg.mlp_row_us = cost.mlp_row_us
        for i in range(3):
            self.cfg.mode_us[i] = cost.mode_us[i]
        for i, name in enumerate(_COLL_ORDER):
            a0, a1, beta = cost.params[name]
            self.cfg.a0[i] = a0
            self.cfg.a1[i] = a1
            self.cfg.beta[i] = beta
            for w, which in enumerate(("one", "both")):
                pts = cost.curve(name, which)[:N_CURVE]
                self.cfg.cn[i][w] = len(pts)
                for j, (x, t) in enumerate(pts):
                    self.cfg.cx[i][w][j] = x
                    self.cfg.ct[i][w][j] = t

    def record(self, batch, out=None):
        """Encode ``batch`` (this rank's :class:`LocalBatch`) as an int32 record.

        Args:
            batch: the replica's batch as this rank sees it.
            out: optional preallocated int32 array of ``RECORD_WIDTH`` to fill (no allocation).

        Returns:
            The int32 record array (``out`` when given).

        Raises:
            InputError: ``batch`` is not a LocalBatch, or ``out`` has the wrong shape or dtype.
            ConfigError: a speculative mode without ``spec``.
        """
        cdef int64_t n = 0, l = 0
        cdef int32_t[::1] r
        if not isinstance(batch, LocalBatch):
            raise InputError(f"batch must be a dpgather.LocalBatch, got {batch!r}")
        if out is None:
            out = np.empty(WIDTH, dtype=np.int32)
        elif (not isinstance(out, np.ndarray) or out.dtype != np.int32 or out.shape != (WIDTH,)
              or not out.flags.c_contiguous):
            raise InputError(
                f"out must be a C-contiguous int32 array of shape ({WIDTH},), got {type(out).__name__} "
                f"dtype={getattr(out, 'dtype', None)} shape={getattr(out, 'shape', None)}")
        lp = batch.logprob_tokens
        count_one(&self.cfg, batch.mode, batch.batch_size, batch.extend_tokens,
                  -1 if lp is None else lp, &n, &l)
        r = out
        r[F_MAGIC] = <int32_t>MAGIC
        r[F_MODE] = <int32_t>int(batch.mode)
        r[F_BS] = batch.batch_size
        r[F_EXT] = batch.extend_tokens
        r[F_LP] = -1 if lp is None else lp
        r[F_GRAPH] = 1 if batch.can_run_graph else 0
        r[F_N] = <int32_t>n
        r[F_L] = <int32_t>l
        return out

    def plan_batches(self, batches):
        """Plan from one :class:`LocalBatch` per DP replica (the pure entry point)."""
        cdef int64_t D = self.cfg.D
        cdef int64_t d
        cdef int64_t* s
        if not isinstance(batches, (list, tuple)):
            try:
                batches = list(batches)
            except TypeError:
                raise InputError(f"batches must be a sequence of dpgather.LocalBatch (one per DP replica), "
                                 f"got {batches!r}") from None
        if len(batches) != D:
            raise InputError(
                f"batches must hold one LocalBatch per DP replica: expected {D} "
                f"(world_size {self.cfg.T} / attn_tp_size {self.cfg.A}), got {len(batches)}")
        s = <int64_t*>PyMem_Malloc(5 * D * sizeof(int64_t))
        if s == NULL:
            raise MemoryError()
        try:
            for d in range(D):
                b = batches[d]
                if type(b) is not LocalBatch and not isinstance(b, LocalBatch):
                    raise InputError(f"batches[{d}] must be a dpgather.LocalBatch, got {b!r}")
                s[d] = b.mode
                s[D + d] = b.batch_size
                s[2 * D + d] = b.extend_tokens
                lp = b.logprob_tokens
                s[3 * D + d] = -1 if lp is None else lp
                s[4 * D + d] = b.can_run_graph
            return self._plan(s)
        finally:
            PyMem_Free(s)

    def plan_table(self, table):
        """Plan from the gathered ``[world_size, RECORD_WIDTH]`` int32 record table.

        Row ``r`` is tp rank ``r``'s record. Each row is validated and the ``attn_tp_size``
        rows of every replica must be identical. The array may be a strided view (e.g. the first
        ``RECORD_WIDTH`` columns of a wider table).

        Raises:
            InputError: the table's type, dtype or shape is wrong, or a row is malformed
                (bad magic, unknown mode, negative or inconsistent counts).
            InconsistentBatchError: the ranks of one replica reported different records.
            ConfigError: a speculative mode without ``spec``.
        """
        cdef int64_t T = self.cfg.T, A = self.cfg.A, D = self.cfg.D
        cdef int64_t r, d, f, n = 0, l = 0, mode, bs, ext, lp, g
        cdef const int32_t[:, :] t
        cdef int64_t* s
        if (not isinstance(table, np.ndarray) or table.dtype != np.int32
                or table.ndim != 2 or table.shape[0] != T or table.shape[1] != WIDTH):
            raise InputError(
                f"table must be an int32 array of shape ({T}, {WIDTH}) (world_size x RECORD_WIDTH), "
                f"got {type(table).__name__} "
                f"{getattr(table, 'dtype', '')} {getattr(table, 'shape', '')}")
        t = table  # any strides: DpAttention passes the planner's columns of its wider sync table
        for r in range(T):
            mode = t[r, F_MODE]
            bs = t[r, F_BS]
            ext = t[r, F_EXT]
            lp = t[r, F_LP]
            g = t[r, F_GRAPH]
            if (t[r, F_MAGIC] != <int32_t>MAGIC or mode < 0 or mode > 5 or bs < 0 or ext < 0
                    or lp < -1 or g < 0 or g > 1
                    or (mode == IDLE and bs != 0)
                    or (mode == EXTEND and (ext < bs or (lp >= 0 and (lp < bs or lp > ext))))
                    or (mode != EXTEND and (ext != 0 or lp != -1))):
                raise InputError(f"malformed record table: row {r} (tp rank {r}) = "
                                 f"{_row_text(table[r])} is not a valid record "
                                 f"(encode records with Planner.record())")
            count_one(&self.cfg, mode, bs, ext, lp, &n, &l)
            if n != t[r, F_N] or l != t[r, F_L]:
                raise InputError(
                    f"malformed record table: row {r} (tp rank {r}) says num_tokens="
                    f"{t[r, F_N]}, logits_tokens={t[r, F_L]} but its batch gives {n}, {l}; "
                    f"the ranks may run different dpgather versions or SpecConfigs")
        for d in range(D):
            for r in range(d * A + 1, d * A + A):
                for f in range(WIDTH):
                    if t[r, f] != t[d * A, f]:
                        _raise_inconsistent(table, d, A)
        s = <int64_t*>PyMem_Malloc(5 * D * sizeof(int64_t))
        if s == NULL:
            raise MemoryError()
        try:
            for d in range(D):
                s[d] = t[d * A, F_MODE]
                s[D + d] = t[d * A, F_BS]
                s[2 * D + d] = t[d * A, F_EXT]
                s[3 * D + d] = t[d * A, F_LP]
                s[4 * D + d] = t[d * A, F_GRAPH]
            return self._plan(s)
        finally:
            PyMem_Free(s)

    cdef Plan _plan(self, const int64_t* s):
        """Plan from ``s``: 5 rows of D int64 (mode, batch size, extend, logprob, graph flag)."""
        cdef Config* c = &self.cfg
        cdef int64_t D = c.D, A = c.A, T = c.T
        cdef int64_t d, a, i, n = 0, l = 0, maxn = 0, maxl = 0, S = 0, L = 0, M, k_nonzero = 0
        cdef int64_t k_chunks = 0, k_logits = 0, bucket = 0, lbucket = 0, chunk, rem
        cdef bint skip = True, is_ext = False, graph, all_graph = True
        cdef int pad, lpad, tr = USE_NCCL, p_pad, p_lpad
        cdef int64_t p_rows
        cdef double R = c.row_bytes, W = gather_bytes(c), q, c_max, c_sum, c_var, l_sum, l_var, c_best
        cdef double c_p2p, c_push
        cdef bint p2p_ok = c.p2p_rows > 0 and c.transport != TR_NCCL and T > 1
        cdef bint push_ok = c.push_rows > 0 and (c.transport == TR_AUTO or c.transport == TR_PUSH) and T > 1
        cdef cnp.npy_intp dims[1]
        dims[0] = 6 * D + 2
        cdef cnp.ndarray buf = cnp.PyArray_ZEROS(1, dims, cnp.NPY_INT64, 0)
        cdef int64_t* p = <int64_t*>cnp.PyArray_DATA(buf)
        cdef int64_t* nt = p
        cdef int64_t* lt = p + D
        cdef int64_t* sr = p + 2 * D
        cdef int64_t* so = p + 3 * D
        cdef int64_t* lsr = p + 4 * D + 1
        cdef int64_t* lso = p + 5 * D + 1
        cdef uint64_t h
        cdef Plan plan

        for d in range(D):
            count_one(c, s[d], s[D + d], s[2 * D + d], s[3 * D + d], &n, &l)
            if c.policy == POL_SGLANG:
                n = align_up(n, A)
            nt[d] = n
            lt[d] = l
            maxn = imax(maxn, n)
            maxl = imax(maxl, l)
            S += n
            L += l
            if n > 0:
                k_nonzero += 1
                k_chunks += imin(n, A)
            if l > 0:
                k_logits += imin(l, A)
            if s[d] != IDLE:
                skip = False
                if not s[4 * D + d]:
                    all_graph = False
            if s[d] == EXTEND:
                is_ext = True

        M = align_up(maxn, A)
        q = quantize_us(c, maxn)
        c_max = (coll_us(c, C_RS, A, M * W, A) + coll_us(c, C_AG, T, D * M * W, T)
                 + coll_us(c, C_RS, T, D * M * R, T) + coll_us(c, C_AG, A, M * R, A)
                 + c.mlp_row_us * (D * M - S) + q)
        c_sum = (coll_us(c, C_AR, T, S * W, T) + coll_us(c, C_AR, T, S * R, T) + S * W / (c.copy_bw * 1e3)
                 + q)
        c_var = (coll_us(c, C_RSV, A, maxn * W, imin(maxn, A))
                 + vcoll_us(c, C_GV, T, A, nt, D, k_chunks, W)
                 + vcoll_us(c, C_RSV, T, A, nt, D, k_chunks, R)
                 + coll_us(c, C_GV, A, maxn * R, imin(maxn, A)) + q)
        if T > 1:  # dpgather's own kernels per gather + combine (CostModel.mode_us)
            c_max += c.mode_us[0]
            c_sum += c.mode_us[1]
            c_var += c.mode_us[2]

        graph = (self._nb > 0 and not skip and not is_ext and all_graph
                 and maxn <= self._buckets[self._nb - 1])
        if graph:
            pad = PAD_MAX
            lpad = PAD_MAX
            for i in range(self._nb):
                if self._buckets[i] >= maxn:
                    bucket = self._buckets[i]
                    break
            for i in range(self._nb):
                if self._buckets[i] >= maxl:
                    lbucket = self._buckets[i]
                    break
            for d in range(D):
                sr[d] = bucket
                lsr[d] = lbucket
            # graph steps: exact rows on the wire whenever the windows hold the bucket; the push
            # unless (under auto) the model prices the pull faster at a full bucket, so the choice
            # is a function of the bucket alone (a captured graph has one transport)
            if push_ok and bucket <= c.push_rows and lbucket <= c.push_rows:
                tr = USE_PUSH
            if p2p_ok and D * bucket <= c.p2p_rows and D * lbucket <= c.p2p_rows and (
                    tr == USE_NCCL or (c.transport == TR_AUTO and p2p_us(c, T, A, sr, D, C_P2P) < p2p_us(c, T, A, sr, D, C_PUSH))):
                tr = USE_PULL
        else:
            if c.policy == POL_SGLANG:
                if is_ext and D > 1:
                    pad = PAD_SUM
                elif 2 * S >= M * D:
                    pad = PAD_MAX
                else:
                    pad = PAD_SUM
            elif c.policy == POL_MAX:
                pad = PAD_MAX
            elif c.policy == POL_SUM:
                pad = PAD_SUM
            elif c.policy == POL_VAR:
                pad = PAD_VAR
            else:
                pad = PAD_MAX
                if c_sum < c_max:
                    pad = PAD_SUM
                if c_var < (c_sum if pad == PAD_SUM else c_max):
                    pad = PAD_VAR
            if c.policy == POL_SGLANG or c.policy == POL_SUM:
                lpad = PAD_SUM
            elif c.policy == POL_VAR or c.policy == POL_MAX:
                lpad = PAD_VAR
            else:
                l_sum = coll_us(c, C_AR, T, L * R, T) + L * R / (c.copy_bw * 1e3)
                l_var = vcoll_us(c, C_GV, T, A, lt, D, k_logits, R)
                lpad = PAD_VAR if l_var < l_sum else PAD_SUM
            # the P2P transports move exact rows whatever the layout; under "auto" they use the
            # exact layout; forced ("p2p", "push") they take every step that fits, the push first
            p_pad = PAD_VAR if c.policy == POL_AUTO else pad
            p_lpad = PAD_VAR if c.policy == POL_AUTO else lpad
            c_best = c_max if pad == PAD_MAX else (c_sum if pad == PAD_SUM else c_var)
            p_rows = D * M if p_pad == PAD_MAX else S
            if p2p_ok and p_rows <= c.p2p_rows and L <= c.p2p_rows:
                c_p2p = p2p_us(c, T, A, nt, D, C_P2P)
                if c.transport != TR_AUTO or c_p2p < c_best:
                    tr = USE_PULL
                    c_best = c_p2p
            if push_ok and maxn <= c.push_rows and maxl <= c.push_rows:
                c_push = p2p_us(c, T, A, nt, D, C_PUSH)
                if c.transport == TR_PUSH or c_push < c_best:
                    tr = USE_PUSH
            if tr != USE_NCCL:
                pad, lpad = p_pad, p_lpad
            for d in range(D):
                sr[d] = M if pad == PAD_MAX else nt[d]
                lsr[d] = lt[d]

        so[0] = 0
        lso[0] = 0
        for d in range(D):
            so[d + 1] = so[d] + sr[d]
            lso[d + 1] = lso[d] + lsr[d]

        cnp.PyArray_CLEARFLAGS(buf, cnp.NPY_ARRAY_WRITEABLE)
        plan = Plan.__new__(Plan)
        plan._buf = buf
        plan.mode = _PADDING[pad]
        plan.logits_mode = _PADDING[lpad]
        plan.graph = graph
        plan.bucket = bucket
        plan.skip = skip
        plan.is_extend_in_batch = is_ext
        plan.gathered_rows = so[D]
        plan.logits_rows = lso[D]
        plan.dp_size = D
        plan.attn_tp_size = A
        plan.world_size = T
        plan.policy = self.policy
        plan.predicted_us = (c_max, c_sum, c_var)
        plan.transport = _TRANSPORT_NAME[tr]
        plan.predicted_p2p_us = p2p_us(c, T, A, nt, D, C_P2P) if p2p_ok else 0.0
        plan.predicted_push_us = p2p_us(c, T, A, nt, D, C_PUSH) if push_ok else 0.0
        plan.wire_bytes = self.wire_bytes
        h = 0xcbf29ce484222325ULL
        h = fnv1a(h, pad)
        h = fnv1a(h, lpad)
        h = fnv1a(h, graph)
        h = fnv1a(h, bucket)
        h = fnv1a(h, skip)
        h = fnv1a(h, is_ext)
        h = fnv1a(h, A)
        h = fnv1a(h, D)
        h = fnv1a(h, tr)
        for i in range(6 * D + 2):
            h = fnv1a(h, p[i])
        plan.fingerprint = h
        return plan


def _row_text(row):
    return "[" + ", ".join(f"{name}={int(v)}" for name, v in zip(RECORD_FIELDS, row)) + "]"


def _raise_inconsistent(table, d, A):
    rows = table[d * A:(d + 1) * A]
    fields = [name for f, name in enumerate(RECORD_FIELDS) if len(set(rows[:, f].tolist())) > 1]
    detail = "; ".join(f"tp rank {d * A + a}: {_row_text(rows[a])}" for a in range(A))
    raise InconsistentBatchError(
        f"the {A} attn_tp ranks of DP replica {d} (tp ranks {d * A}..{d * A + A - 1}) reported "
        f"different batches, differing in {', '.join(fields)}: {detail}. Every rank of a replica "
        f"must pass the same LocalBatch to sync()")


def count_tokens(batch, spec=None):
    """Token count ``n`` and logits rows ``l`` of one replica's batch (docs/design.md section 2).

    Returns:
        ``(n, l)``: rows this replica contributes to the gathered buffer (before any alignment)
        and rows that reach the LM head.

    Raises:
        InputError: ``batch`` is not a LocalBatch.
        ConfigError: a speculative mode without ``spec``.
    """
    cdef Config c
    cdef int64_t n = 0, l = 0
    if not isinstance(batch, LocalBatch):
        raise InputError(f"batch must be a dpgather.LocalBatch, got {batch!r}")
    if spec is not None and not isinstance(spec, SpecConfig):
        raise ConfigError(f"spec must be a dpgather.SpecConfig or None, got {spec!r}")
    memset(&c, 0, sizeof(Config))
    if spec is not None:
        c.has_spec = 1
        c.S = spec.num_steps
        c.K = spec.topk
        c.N = spec.num_draft_tokens
    lp = batch.logprob_tokens
    count_one(&c, batch.mode, batch.batch_size, batch.extend_tokens, -1 if lp is None else lp,
              &n, &l)
    return (n, l)


_planner_cache = {}


def plan(batches, topology, *, spec=None, policy="auto", graph_buckets=(), cost=None, transport="auto",
         p2p_rows=0, p2p_node_size=0, push_rows=0, wire_bytes=0):
    """Plan one step from one :class:`LocalBatch` per DP replica (pure function).

    Equivalent to ``Planner(topology, spec=..., policy=..., graph_buckets=..., cost=...,
    transport=..., p2p_rows=..., p2p_node_size=..., push_rows=..., wire_bytes=...).plan_batches(batches)``;
    planners of the default cost model are cached, so calling this every step is cheap.

    Args:
        batches: ``topology.dp_size`` LocalBatch objects, replica order.
        topology: a :class:`Topology`.
        spec, policy, graph_buckets, cost, transport, p2p_rows, p2p_node_size, push_rows, wire_bytes:
            as for :class:`Planner`.

    Returns:
        The :class:`Plan`, identical to what ``Planner.plan_table`` gives for the same step.
    """
    kw = dict(spec=spec, policy=policy, transport=transport, p2p_rows=p2p_rows, p2p_node_size=p2p_node_size,
              push_rows=push_rows, wire_bytes=wire_bytes)
    if cost is None:
        try:
            graph_buckets = tuple(graph_buckets) if graph_buckets is not None else ()
            key = (topology, spec, policy, graph_buckets, tuple(map(type, graph_buckets)), transport, p2p_rows,
                   p2p_node_size, push_rows, wire_bytes, type(wire_bytes))
            planner = _planner_cache.get(key)
        except TypeError:
            key = None
            planner = None
        if planner is None:
            planner = Planner(topology, graph_buckets=graph_buckets, **kw)
            if key is not None:
                if len(_planner_cache) > 256:
                    _planner_cache.clear()
                _planner_cache[key] = planner
        return planner.plan_batches(batches)
    return Planner(topology, graph_buckets=graph_buckets, cost=cost, **kw).plan_batches(batches)
