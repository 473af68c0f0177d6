"""An independent, pure-Python reference of the dpgather planner.

Written from docs/design.md sections 1-3, docs/planner.md and docs/cost-model.md only: it imports nothing
from dpgather (not the Cython planner, not ``core.cost``, not even the enums), takes plain ints and
tuples and returns a plain dict. ``tests/test_planner.py`` checks ``dpgather.plan()`` against it
field by field; ``bench/plan_bench.py`` times it beside the real planner.

Inputs
------
- ``batches``: one tuple per DP replica, ``(mode, batch_size, extend_tokens, logprob_tokens,
  can_run_graph)``; trailing fields may be omitted (defaults ``0, 0, None, False``). ``mode`` is
  the int value of ``ForwardMode`` (IDLE=0, DECODE=1, EXTEND=2, TARGET_VERIFY=3, DRAFT_DECODE=4,
  DRAFT_EXTEND=5).
- ``spec``: ``(num_steps S, topk K, num_draft_tokens N)`` or ``None``.
- ``cost``: ``None`` (the documented defaults) or a dict overriding any key of
  :data:`DEFAULT_COST`.
- ``wire_bytes``: bytes of one row of the quantized hidden-state gather (docs/cost-model.md,
  "Quantized gather"); 0: unquantized, the gather moves rows of ``row_bytes``.

Output
------
``plan()`` returns a dict with ``mode``/``logits_mode`` (ints of ``PaddingMode``: MAX_LEN=0,
SUM_LEN=1, VARLEN=2), ``graph``, ``bucket``, ``skip``, ``is_extend_in_batch``, the six arrays as
lists (``num_tokens``, ``logits_tokens``, ``slot_rows``, ``slot_offsets``, ``logits_slot_rows``,
``logits_offsets``), ``gathered_rows``, ``logits_rows``, ``predicted_us`` (MAX, SUM, VARLEN),
``wire_bytes`` (as given) and ``fingerprint`` (FNV-1a 64, docs/planner.md section 6).

Floating point: the cost formulas are evaluated in float64 in exactly the order of operations of
the planner's ``coll_us`` (left to right, ints converted to float only where they meet a float), so
the ``auto`` choice matches bit for bit, ties included (ties: MAX_LEN, then SUM_LEN, then VARLEN;
logits ties: SUM_LEN).
"""

# Forward modes (docs/design.md section 2).
IDLE, DECODE, EXTEND, TARGET_VERIFY, DRAFT_DECODE, DRAFT_EXTEND = range(6)
SPECULATIVE = (TARGET_VERIFY, DRAFT_DECODE, DRAFT_EXTEND)
MODE_NAMES = ("IDLE", "DECODE", "EXTEND", "TARGET_VERIFY", "DRAFT_DECODE", "DRAFT_EXTEND")

# Padding modes (docs/design.md section 3).
MAX_LEN, SUM_LEN, VARLEN = 0, 1, 2
PADDING_NAMES = ("MAX_LEN", "SUM_LEN", "VARLEN")

POLICIES = ("auto", "sglang", "max_len", "sum_len", "varlen")

#: The default constants of docs/cost-model.md, written out: (a0 us, a1 us, beta GB/s) per
#: collective, plus row bytes (7168 x 2), memcpy bandwidth and the per-padding-row MLP cost.
DEFAULT_COST = {
    "row_bytes": 14336,
    "copy_GBps": 2900.0,
    "mlp_row_us": 0.0,
    "mode_us": (0.0, 0.0, 0.0),
    "all_gather": (12.0, 4.0, 300.0),
    "reduce_scatter": (10.2, 3.4, 295.0),
    "all_reduce": (12.3, 4.1, 335.0),
    "gatherv": (28.0, 3.0, 330.0),
    "reduce_scatterv": (28.0, 3.0, 330.0),
    "p2p": (8.5, 0.47, 440.0),
    "push": (3.0, 0.3, 350.0),
}

NCCL, P2P, PUSH = 0, 1, 2
TRANSPORT_NAMES = ("nccl", "p2p", "push")

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


class ReferenceConfigError(ValueError):
    """Configuration the reference refuses (speculative mode without spec, bad sizes, ...)."""


class ReferenceInputError(ValueError):
    """A batch the reference refuses (the LocalBatch rules)."""


def align_up(x, a):
    return (x + a - 1) // a * a


def _norm_batch(b):
    b = tuple(b)
    if not 1 <= len(b) <= 5:
        raise ReferenceInputError(f"batch tuple must have 1..5 fields, got {b!r}")
    mode, bs, ext, lp, g = b + (0, 0, None, False)[len(b) - 1:]
    return int(mode), int(bs), int(ext), (None if lp is None else int(lp)), bool(g)


def check_batch(mode, bs, ext=0, lp=None):
    """The LocalBatch validation rules (docs/planner.md section 1)."""
    if mode not in range(6):
        raise ReferenceInputError(f"mode {mode!r} out of range")
    if bs < 0 or ext < 0 or (lp is not None and lp < 0):
        raise ReferenceInputError(f"negative count in {(mode, bs, ext, lp)}")
    if mode == IDLE and bs:
        raise ReferenceInputError(f"IDLE batch with batch_size={bs}")
    if mode == EXTEND:
        if ext < bs:
            raise ReferenceInputError(f"extend_tokens={ext} < batch_size={bs}")
        if lp is not None and not bs <= lp <= ext:
            raise ReferenceInputError(f"logprob_tokens={lp} outside [{bs}, {ext}]")
    elif ext or lp is not None:
        raise ReferenceInputError(f"extend fields on {MODE_NAMES[mode]}")


def count_tokens(mode, bs=0, ext=0, lp=None, spec=None):
    """``(n, l)`` of one batch: docs/design.md section 2's table."""
    if mode == IDLE:
        return 0, 0
    if mode == DECODE:
        return bs, bs
    if mode == EXTEND:
        return ext, (bs if lp is None else lp)
    if mode in SPECULATIVE:
        if spec is None:
            raise ReferenceConfigError(f"{MODE_NAMES[mode]} needs a SpecConfig")
        S, K, N = spec
        if mode == TARGET_VERIFY:
            return bs * N, bs * N
        if mode == DRAFT_DECODE:
            return bs * K, bs * K
        return bs * (S + 1), bs  # DRAFT_EXTEND: n is an upper bound, only the last state -> LM head
    raise ReferenceInputError(f"mode {mode!r} out of range")


def coll_us(params, name, group, nbytes, active):
    """t_c(P, B) of docs/cost-model.md, in the planner's order of operations."""
    if group <= 1:
        return 0.0
    if active < 1:
        active = 1
    a0, a1, beta = params[name]
    factor = 2.0 if name == "all_reduce" else 1.0
    return a0 + a1 * (active - 1) + nbytes * factor * (group - 1) / group / (beta * 1e3)


def curve_us(params, name, which, x):
    """Link time of ``x`` bytes per direction (docs/cost-model.md, "Link time"): the measured
    curve ``which`` ("one" / "both") of ``cost["curves"]``, or ``x / beta``."""
    if x <= 0:
        return 0.0
    pts = params.get("curves", {}).get(name, {}).get(which, ())
    if not pts:
        return x / (params[name][2] * 1e3)
    pts = [(float(a), float(b)) for a, b in pts]
    if x <= pts[0][0]:
        return pts[0][1] * (x / pts[0][0])
    for (x0, t0), (x1, t1) in zip(pts, pts[1:]):
        if x <= x1:
            return t0 + (t1 - t0) * ((x - x0) / (x1 - x0))
    return pts[-1][1] * (x / pts[-1][0])


def link_us(params, name, i, o):
    """A rank receiving ``i`` and sending ``o`` bytes: never less than the larger one way alone;
    with traffic both ways, NCCL and the push (writers) as (i + o) / 2 each way, the P2P pull as
    the smaller amount both ways and the rest one way."""
    M, m = (i, o) if i > o else (o, i)
    t = curve_us(params, name, "one", M)
    if m > 0:
        if name == "p2p":  # pulls: m both ways, the rest one way
            u = curve_us(params, name, "both", m) + (t - curve_us(params, name, "one", m))
        else:  # NCCL pushes: (i + o) / 2 each way
            u = curve_us(params, name, "both", (i + o) / 2)
        t = max(t, u)
    return t


def vcoll_us(params, name, T, A, n, active, R=None):
    """gatherv / reduce_scatterv over the T ranks of replica counts ``n`` (rows of ``R`` bytes,
    default ``row_bytes``): latency plus the slowest rank of the ring in rank order (a rank
    receives every chunk ``n_d / A`` but its own and passes on every chunk but its successor's;
    reduce_scatterv the mirror)."""
    if T <= 1:
        return 0.0
    active = max(active, 1)
    R = float(params["row_bytes"] if R is None else R)
    S = 0.0
    for x in n:
        S += x
    worst = 0.0
    D = len(n)
    for d, x in enumerate(n):
        i = (S - float(x) / A) * R
        if A > 1:
            worst = max(worst, link_us(params, name, i, i))
        o = (S - float(n[(d + 1) % D]) / A) * R
        worst = max(worst, link_us(params, name, i, o))  # symmetric: reduce_scatterv's mirror costs the same
    a0, a1, _ = params[name]
    return a0 + a1 * (active - 1) + worst


def quantize_us(p, rows, wire_bytes):
    """The quantize pass of ``rows`` rows: read at ``row_bytes``, written at ``wire_bytes``, at half
    of ``copy_GBps`` (bytes read + written; the kernel measured 1427 against a copy's 2874 GB/s
    on an H100); 0 unquantized (``wire_bytes`` 0)."""
    if wire_bytes <= 0:
        return 0.0
    return 2.0 * rows * (float(p["row_bytes"]) + float(wire_bytes)) / (float(p["copy_GBps"]) * 1e3)


def predicted_us(n, A, cost=None, wire_bytes=0):
    """``(MAX_LEN, SUM_LEN, VARLEN)`` predicted gather + combine us for (aligned) counts ``n``;
    with ``wire_bytes`` the gather terms move rows of that size plus the quantize pass of the
    largest replica, the combine terms rows of ``row_bytes``."""
    p = dict(DEFAULT_COST)
    if cost:
        p.update(cost)
    D = len(n)
    T = D * A
    R = float(p["row_bytes"])
    W = float(wire_bytes) if wire_bytes > 0 else R
    copy_bw = float(p["copy_GBps"])
    mlp = float(p["mlp_row_us"])
    maxn = max(n) if n else 0
    S = sum(n)
    M = align_up(maxn, A)
    k = sum(min(x, A) for x in n if x > 0)
    q = quantize_us(p, maxn, wire_bytes)
    c_max = (coll_us(p, "reduce_scatter", A, M * W, A) + coll_us(p, "all_gather", T, D * M * W, T)
             + coll_us(p, "reduce_scatter", T, D * M * R, T) + coll_us(p, "all_gather", A, M * R, A)
             + mlp * (D * M - S) + q)
    c_sum = (coll_us(p, "all_reduce", T, S * W, T) + coll_us(p, "all_reduce", T, S * R, T)
             + S * W / (copy_bw * 1e3) + q)
    c_var = (coll_us(p, "reduce_scatterv", A, maxn * W, min(maxn, A))
             + vcoll_us(p, "gatherv", T, A, n, k, W)
             + vcoll_us(p, "reduce_scatterv", T, A, n, k, R)
             + coll_us(p, "gatherv", A, maxn * R, min(maxn, A)) + q)
    if T > 1:
        mo = [float(v) for v in p["mode_us"]]
        c_max, c_sum, c_var = c_max + mo[0], c_sum + mo[1], c_var + mo[2]
    return c_max, c_sum, c_var


def p2p_us(n, A, cost=None, node_size=0, kind="p2p", wire_bytes=0):
    """Predicted gather + combine us over a P2P transport: ``kind`` ``"p2p"`` (the pull,
    docs/cost-model.md "P2P") or ``"push"`` ("Push": one one-way trip per collective, twice the
    data bytes on the wire in LL lines, only the own rows copied locally). In one node a rank of
    replica d receives A*S - n_d rows and has (T-1)*n_d taken; over several nodes of
    ``node_size`` ranks the node blocks go over NCCL ("Several nodes"). With ``wire_bytes`` the
    gather half (its link time, node blocks and local copies) moves rows of that size plus the
    quantize pass of the largest replica; the combine half rows of ``row_bytes``."""
    p = dict(DEFAULT_COST)
    if cost:
        p.update(cost)
    D = len(n)
    T = D * A
    if T <= 1:
        return 0.0
    R = float(p["row_bytes"])
    W = float(wire_bytes) if wire_bytes > 0 else R
    a0, a1, _ = p[kind]
    w = 2.0 if kind == "push" else 1.0  # wire bytes per data byte
    S = 0.0
    for x in n:
        S += x
    nmin, nmax = float(min(n)), float(max(n))
    L = node_size if 0 < node_size < T else T
    N = T // L
    a = a0 + a1 * (L - 1)
    if kind == "push":  # gather: own rows copied from the input; combine: read from it
        copies = (2.0 * nmax * W + nmax * R) / (float(p["copy_GBps"]) * 1e3)
    else:  # gather: pack + own rows copied out; combine: pack of all S + own rows read
        copies = (4.0 * nmax * W + 2.0 * (nmax + S) * R) / (float(p["copy_GBps"]) * 1e3)
    copies = copies + quantize_us(p, nmax, wire_bytes)
    if N == 1:
        gather = combine = 0.0
        for x in n:
            gather = max(gather, link_us(p, kind, w * (A * S - x) * W, w * (T - 1) * float(x) * W))
            combine = max(combine, link_us(p, kind, w * (A * S - x) * R, w * (T - 1) * float(x) * R))
        return a + gather + a + combine + copies
    return (a + curve_us(p, kind, "one", w * max(A * S / N - nmin, 0.0) * W)
            + coll_us(p, "gatherv", N, S * W, N) + coll_us(p, "reduce_scatterv", N, S * R, N)
            + a + curve_us(p, kind, "one", w * (L - 1) * nmax * R) + copies)


def push_us(n, A, cost=None, node_size=0, wire_bytes=0):
    """:func:`p2p_us` of the push transport."""
    return p2p_us(n, A, cost, node_size, "push", wire_bytes)


def logits_us(l, A, cost=None):
    """``(SUM_LEN, VARLEN)`` predicted us of a replicate gather of the logits rows ``l``."""
    p = dict(DEFAULT_COST)
    if cost:
        p.update(cost)
    T = len(l) * A
    R = float(p["row_bytes"])
    L = sum(l)
    k = sum(min(x, A) for x in l if x > 0)
    l_sum = coll_us(p, "all_reduce", T, L * R, T) + L * R / (float(p["copy_GBps"]) * 1e3)
    l_var = vcoll_us(p, "gatherv", T, A, l, k)
    return l_sum, l_var


def fnv1a64(values, h=FNV_OFFSET):
    """FNV-1a 64 over each value as 8 little-endian bytes (two's complement)."""
    for v in values:
        u = v & _MASK64
        for i in range(8):
            h ^= (u >> (8 * i)) & 0xFF
            h = (h * FNV_PRIME) & _MASK64
    return h


def _prefix(rows):
    out = [0]
    for r in rows:
        out.append(out[-1] + r)
    return out


def plan(batches, world_size, attn_tp_size=1, spec=None, policy="auto", graph_buckets=(), cost=None,
         validate=True, transport="auto", p2p_rows=0, p2p_node_size=0, push_rows=0, wire_bytes=0):
    """The plan of one step as a dict (see the module docstring)."""
    T, A = int(world_size), int(attn_tp_size)
    if T < 1 or A < 1 or T % A:
        raise ReferenceConfigError(f"attn_tp_size={A} must divide world_size={T}")
    D = T // A
    if policy not in POLICIES:
        raise ReferenceConfigError(f"unknown policy {policy!r}")
    buckets = sorted(set(int(b) for b in graph_buckets))
    if any(b <= 0 or b % A for b in buckets):
        raise ReferenceConfigError(f"graph_buckets {buckets} must be positive multiples of {A}")
    batches = [_norm_batch(b) for b in batches]
    if len(batches) != D:
        raise ReferenceInputError(f"expected {D} batches, got {len(batches)}")

    # 1-2. counts, alignment (sglang aligns every n first; logits never)
    n, l = [], []
    for mode, bs, ext, lp, _ in batches:
        if validate:
            check_batch(mode, bs, ext, lp)
        nd, ld = count_tokens(mode, bs, ext, lp, spec)
        if policy == "sglang":
            nd = align_up(nd, A)
        n.append(nd)
        l.append(ld)
    modes = [b[0] for b in batches]
    skip = all(m == IDLE for m in modes)
    is_ext = any(m == EXTEND for m in modes)
    maxn = max(n)
    maxl = max(l)
    S = sum(n)
    M = align_up(maxn, A)
    pred = predicted_us(n, A, cost, wire_bytes)
    L = sum(l)
    p2p_ok = p2p_rows > 0 and transport != "nccl" and T > 1
    push_ok = push_rows > 0 and transport in ("auto", "push") and T > 1
    tr = NCCL

    # 3. graph decision (checked first)
    graph = (bool(buckets) and not skip and not is_ext
             and all(b[4] for b in batches if b[0] != IDLE) and maxn <= buckets[-1])
    bucket = 0
    if graph:
        pad = lpad = MAX_LEN
        bucket = min(b for b in buckets if b >= maxn)
        lbucket = min(b for b in buckets if b >= maxl)
        slot_rows = [bucket] * D
        logits_slot_rows = [lbucket] * D
        # exact rows whenever the windows hold the bucket: the push, unless (auto) the pull is
        # predicted faster at a full bucket (a function of the bucket alone)
        if push_ok and bucket <= push_rows and lbucket <= push_rows:
            tr = PUSH
        full = [bucket] * D
        if p2p_ok and D * bucket <= p2p_rows and D * lbucket <= p2p_rows and (
                tr == NCCL or (transport == "auto"
                               and p2p_us(full, A, cost, p2p_node_size, wire_bytes=wire_bytes)
                               < push_us(full, A, cost, p2p_node_size, wire_bytes))):
            tr = P2P
    else:
        # 4. padding mode
        if policy == "sglang":
            if is_ext and D > 1:
                pad = SUM_LEN
            elif 2 * S >= M * D:
                pad = MAX_LEN
            else:
                pad = SUM_LEN
            lpad = SUM_LEN
        elif policy == "max_len":
            pad, lpad = MAX_LEN, VARLEN
        elif policy == "sum_len":
            pad, lpad = SUM_LEN, SUM_LEN
        elif policy == "varlen":
            pad, lpad = VARLEN, VARLEN
        else:  # auto: strict argmin, ties MAX_LEN < SUM_LEN < VARLEN
            c_max, c_sum, c_var = pred
            pad, best = MAX_LEN, c_max
            if c_sum < best:
                pad, best = SUM_LEN, c_sum
            if c_var < best:
                pad = VARLEN
            l_sum, l_var = logits_us(l, A, cost)
            lpad = VARLEN if l_var < l_sum else SUM_LEN
        # 4b. transport: the P2P transports move exact rows; under auto they also take the exact
        # layout; forced ("p2p", "push") they take every step that fits, the push first
        p_pad = VARLEN if policy == "auto" else pad
        p_lpad = VARLEN if policy == "auto" else lpad
        c_best = pred[pad]
        p_rows = D * M if p_pad == MAX_LEN else S
        if p2p_ok and p_rows <= p2p_rows and L <= p2p_rows:
            c_p2p = p2p_us(n, A, cost, p2p_node_size, wire_bytes=wire_bytes)
            if transport != "auto" or c_p2p < c_best:
                tr, c_best = P2P, c_p2p
        if push_ok and maxn <= push_rows and maxl <= push_rows:
            c_push = push_us(n, A, cost, p2p_node_size, wire_bytes)
            if transport == "push" or c_push < c_best:
                tr = PUSH
        if tr != NCCL:
            pad, lpad = p_pad, p_lpad
        # 5. layout
        slot_rows = [M] * D if pad == MAX_LEN else list(n)
        logits_slot_rows = list(l)

    slot_offsets = _prefix(slot_rows)
    logits_offsets = _prefix(logits_slot_rows)
    c_p2p = p2p_us(n, A, cost, p2p_node_size, wire_bytes=wire_bytes) if p2p_ok else 0.0
    c_push = push_us(n, A, cost, p2p_node_size, wire_bytes) if push_ok else 0.0
    fp = fnv1a64([pad, lpad, int(graph), bucket, int(skip), int(is_ext), A, D, tr]
                 + n + l + slot_rows + slot_offsets + logits_slot_rows + logits_offsets)
    return {
        "mode": pad,
        "logits_mode": lpad,
        "graph": graph,
        "bucket": bucket,
        "skip": skip,
        "is_extend_in_batch": is_ext,
        "num_tokens": n,
        "logits_tokens": l,
        "slot_rows": slot_rows,
        "slot_offsets": slot_offsets,
        "gathered_rows": slot_offsets[-1],
        "logits_slot_rows": logits_slot_rows,
        "logits_offsets": logits_offsets,
        "logits_rows": logits_offsets[-1],
        "predicted_us": pred,
        "transport": TRANSPORT_NAMES[tr],
        "predicted_p2p_us": c_p2p,
        "predicted_push_us": c_push,
        "wire_bytes": wire_bytes,
        "fingerprint": fp,
    }
