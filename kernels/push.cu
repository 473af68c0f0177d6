/*************************************************************************
 * dpgather kernels/push.cu -- the one kernel of the push transport: p2p_push.
 *
 * Compiled at run time with NVRTC through cupy.RawModule (kernels/_push.py owns the module and
 * the list of specialisations, NAME_EXPRESSIONS). docs/push.md is the specification;
 * tests/push_reference.py is its NumPy reference, tests/push_emu runs this file on the CPU.
 *
 * Kernel
 * ------
 *  p2p_push<E, V>
 *      E in { float, __half, __nv_bfloat16, int, long long, unsigned char }: element type of
 *        the sums (float16/bfloat16 accumulate in fp32 and round once; integers wrap).
 *      V in { uint2, unsigned int, unsigned short, unsigned char }, sizeof(V) >= sizeof(E):
 *        the access to inp/out, the widest dividing row_bytes and both pointers (at most the
 *        8 data bytes of a line).
 *      One launch == one collective of the T ranks, without a barrier:
 *        0 start    griddepcontrol.wait; refuse if an error is committed; e = next(epoch)
 *        1 send     headers {sig, e, me, e} to every peer, then every send record's rows as
 *                   LL lines {data0, e, data1, e} into the destinations' windows (set e & 1)
 *        2 receive  poll the own window until both epoch words of a line are e; write the
 *                   rows into out as they arrive (copy, or sum in source order), zero spans
 *        3 depart   the last block commits the error or publishes state.epoch = e (and at
 *                   e >= 2^32 - 2 first clears set e & 1 of the own window)
 *      Build switches (-D, through DPGATHER_P2P_DEFINES; speed and diagnostics only):
 *        DPG_P2P_PUSH_UNROLL, DPG_P2P_PUSH_ACTIVE_BYTES, DPG_P2P_PUSH_SLEEP_AFTER (tuning) and
 *        DPG_P2P_PUSH_PHASE_TIMES (per-phase %globaltimer stamps in the window's state area).
 *
 * Window of every rank (byte offsets; identical on every rank; P = T - 1 peer slots, the slot
 * of source s at receiver r is j = s - (s > r)):
 *      0          state[4]          uint64: epoch, depart, err (committed | pending << 32), 0
 *      64         times[7]          uint64: phase stamps (DPG_P2P_PUSH_PHASE_TIMES builds only)
 *      256        hdr[2][P]         one 16-byte line per peer and slot set
 *      data_off   region[2][P]      2 * cap_bytes each: cap_bytes / 8 lines of 16 bytes
 *  data_off = roundup(256 + 32 * P, 256).
 *
 * Descriptor (int64, device memory, at desc[desc_off], desc_len entries in the array):
 *      [sig, n_send, n_jobs, self_row]
 *      n_send x (in_row, rows, slot_row, dest_first, dest_count)
 *      n_jobs x (dst_row, cnt, span, src_row, first, count, stride)
 *  Clamping (nothing outside inp[:in_rows], out[:out_rows], a region or desc[:desc_len] is
 *  touched): negative entries count as 0 (stride excepted); first, stride, dest_first clamped
 *  to +-(2^31 - 1); count, dest_count cut to T; n_send, n_jobs cut to what fits;
 *      send: rows' = min(rows, cap_rows - slot_row), valid = min(rows', in_rows - in_row):
 *            slot rows [slot_row, +valid) <- inp rows, the rest of rows' <- 0, stored to
 *            ranks [dest_first, dest_first + dest_count) n [0, T), me skipped;
 *      job:  span' = min(span, out_rows - dst_row), cnt' = min(cnt, span', cap_rows - src_row);
 *            sources s_k = first + k*stride in [0, T); rows [0, cnt') a byte copy of one
 *            source or the sum in source order, rows [cnt', span') zero; source me reads
 *            inp[self_row + src_row + i] (zero past in_rows), others their region.
 *      cap_rows = (cap_bytes / 8) / ceil(row_bytes / 8).
 *  inp and out must not overlap.
 *
 * Launch: 1-D grid of blocks of exactly kThreads (256) threads (others trap), gridDim.x <= SMs
 *  (every block resident: a block's sends never wait behind a spinning sibling). The host
 *  sizes the grid from capacities only, so a captured graph serves any descriptor contents.
 *  Launches of one transport are ordered (one stream, or events). No block waits for another
 *  block of its own grid.
 *
 * Memory ordering (docs/push.md has the whole argument)
 *  - A line is stored with one st.relaxed.sys.global.v2.u64 and polled with
 *    ld.relaxed.sys.global.v2.u64: two single-copy-atomic 64-bit halves, each carrying its own
 *    epoch word; a line is taken only when both halves carry e. No other ordering is needed.
 *  - Two slot sets: rank r stores set p for e + 2 only after its kernel of e + 1 completed,
 *    which read every peer's header of e + 1, which each peer sends only after its kernel of e
 *    completed (every read of set p done). Epochs run 2 .. 2^32 - 1 and wrap to 2 (a zeroed
 *    line never matches; parity alternates across the wrap); the clear at the last two epochs
 *    of a cycle leaves no line of the old cycle that could match the new one.
 *  - PDL: griddepcontrol.wait precedes every global memory access (the successor's sends and
 *    its read of state.epoch need this kernel completed); launch_dependents right after is
 *    safe because every successor waits the same way. Both are no-ops without the attribute.
 *
 * Errors (codes in kernels/_p2p.py, the same contract as p2p_pull): a committed error (low half
 *  of state.err) makes every later launch return at its start. A poll that outlives timeout_ns
 *  (%globaltimer from the block's start; <= 0: forever) is error 1; a header with another sig
 *  or another source rank error 2. The faulting thread records the code in the block and in the
 *  high half of state.err (first wins); every polling thread checks both every kCheckEvery
 *  polls and stops. Sends never look at errors (a peer must still see this rank's header).
 *  The last block to depart commits the code (state.err and the pinned host word).
 *************************************************************************/

#include "dpg_device.cuh"

namespace dpg_push {
using namespace dpg_dev;

// Threads per block: kernels/_p2p.py launches exactly this many (THREADS).
constexpr int kThreads = 256;
// Ranks of one transport: one header-polling thread per peer.
constexpr int kMaxRanks = kThreads;
// state[] word indices, error codes (kernels/_p2p.py mirrors the codes).
constexpr int kEpoch = 0, kDepart = 1, kErr = 2;
constexpr int kErrTimeout = 1, kErrSignature = 2;
// Header lines start here; regions at data_off (a kernel argument, from the loader).
constexpr long long kHdrOff = 256;
// Descriptor record sizes in int64 words.
constexpr int kHeaderWords = 4, kSendWords = 5, kJobWords = 7;
// Epochs run kFirstEpoch .. 2^32 - 1; a collective with e >= kClearFrom clears its set.
constexpr unsigned int kFirstEpoch = 2u, kClearFrom = 0xFFFFFFFEu;
constexpr unsigned int kCheckEvery = 64;  // polls between timer and error checks

// Tuning switches (DPGATHER_P2P_DEFINES reaches them, docs/push.md); all correct, speed only.
#ifndef DPG_P2P_PUSH_UNROLL
#define DPG_P2P_PUSH_UNROLL 8
#endif
#ifndef DPG_P2P_PUSH_ACTIVE_BYTES
#define DPG_P2P_PUSH_ACTIVE_BYTES (64LL * 1024)
#endif
#ifndef DPG_P2P_PUSH_SLEEP_AFTER
#define DPG_P2P_PUSH_SLEEP_AFTER 4096
#endif
// DPG_P2P_PUSH_PHASE_TIMES 1: block 0's thread 0 stores %globaltimer stamps of its phases into
// kPhases words at byte kTimesOff of this rank's window (in the state area, which nothing else
// uses past state[4]): kernels/_push.py PHASES names them; a benchmark reads them to explain
// where a collective's time goes. Default 0: no stamps.
#ifndef DPG_P2P_PUSH_PHASE_TIMES
#define DPG_P2P_PUSH_PHASE_TIMES 0
#endif
constexpr long long kTimesOff = 64;
constexpr int kPhases = 7;
static_assert(kTimesOff + 8 * kPhases <= kHdrOff, "the phase stamps live below the header lines");
constexpr int kUnroll = DPG_P2P_PUSH_UNROLL;  // lines in flight per thread and source
static_assert(kUnroll >= 1 && kUnroll <= 16, "pending-line masks are 32 bits wide");
constexpr long long kTile = (long long)kThreads * kUnroll;  // lines of one tile
constexpr long long kActiveBytes = DPG_P2P_PUSH_ACTIVE_BYTES;  // line bytes per active block
constexpr unsigned int kSleepAfter = DPG_P2P_PUSH_SLEEP_AFTER;

// The PTX below has portable twins in tests/push_emu/push_emu.h (DPG_P2P_EMULATION).
#ifndef DPG_P2P_EMULATION
__device__ __forceinline__ void st_line(unsigned long long* p, unsigned long long lo, unsigned long long hi) {
    asm volatile("st.relaxed.sys.global.v2.u64 [%0], {%1, %2};" ::"l"(p), "l"(lo), "l"(hi) : "memory");
}

__device__ __forceinline__ void ld_line(const unsigned long long* p, unsigned long long& lo,
                                        unsigned long long& hi) {
    asm volatile("ld.relaxed.sys.global.v2.u64 {%0, %1}, [%2];" : "=l"(lo), "=l"(hi) : "l"(p) : "memory");
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif  // DPG_P2P_EMULATION

__device__ __forceinline__ unsigned long long with_epoch(unsigned int data, unsigned int e) {
    return (unsigned long long)data | ((unsigned long long)e << 32);
}
__device__ __forceinline__ bool has_epoch(unsigned long long half, unsigned int e) {
    return (unsigned int)(half >> 32) == e;
}
// The epoch after `last`: last + 1, skipping 0 and 1 (2^32 - 1 -> 2).
__device__ __forceinline__ unsigned int next_epoch(unsigned long long last) {
    const unsigned int n = (unsigned int)last + 1u;
    return n < kFirstEpoch ? kFirstEpoch : n;
}

// Stamp `phase` (DPG_P2P_PUSH_PHASE_TIMES): block 0's thread 0 stores `t` (default: now).
__device__ __forceinline__ void stamp(unsigned char* window, int phase, unsigned long long t = 0) {
#if DPG_P2P_PUSH_PHASE_TIMES
    if (blockIdx.x == 0 && threadIdx.x == 0)
        st_volatile_u64(reinterpret_cast<unsigned long long*>(window + kTimesOff) + phase, t ? t : globaltimer());
#endif
}

// Everything one launch needs, read once per block.
struct Ctx {
    const unsigned char* inp;
    unsigned char* out;
    long long in_rows, out_rows, row_bytes, lpr, cap_rows, region_bytes, data_off, timeout_ns;
    bool dense;  // row_bytes % 8 == 0: line k of a span is bytes [8k, 8k + 8)
    unsigned char* const* windows;
    unsigned long long* state;  // this rank's window
    int* code;                  // the block's fault code (shared memory)
    int me, nranks, set;
    unsigned int e, sig;
};

// Source src's slot in rank dst's window (set c.set): its region's line 0, its header line.
__device__ __forceinline__ long long slot(const Ctx& c, int dst, int src) {
    return (long long)c.set * (c.nranks - 1) + src - (src > dst);
}
__device__ __forceinline__ unsigned long long* region(const Ctx& c, int dst, int src) {
    return reinterpret_cast<unsigned long long*>(c.windows[dst] + c.data_off + slot(c, dst, src) * c.region_bytes);
}
__device__ __forceinline__ unsigned long long* header(const Ctx& c, int dst, int src) {
    return reinterpret_cast<unsigned long long*>(c.windows[dst] + kHdrOff + slot(c, dst, src) * 16);
}

// Byte offset of line k of a span of rows (row 0 at 0) and its data bytes.
__device__ __forceinline__ long long line_offset(const Ctx& c, long long k, int& nbytes) {
    if (c.dense) {
        nbytes = 8;
        return 8 * k;
    }
    const long long row = k / c.lpr, part = k - row * c.lpr;
    nbytes = (int)min2(8, c.row_bytes - 8 * part);
    return row * c.row_bytes + 8 * part;
}

// The nbytes (a multiple of sizeof(V)) at p as the low bytes of a word; and back.
template <typename V>
__device__ __forceinline__ unsigned long long load_data(const unsigned char* p, int nbytes) {
    unsigned long long d = 0;
#pragma unroll
    for (int i = 0; i < (int)(8 / sizeof(V)); ++i)
        if (i * (int)sizeof(V) < nbytes) {
            const V v = reinterpret_cast<const V*>(p)[i];
            memcpy(reinterpret_cast<unsigned char*>(&d) + i * sizeof(V), &v, sizeof(V));
        }
    return d;
}
template <typename V>
__device__ __forceinline__ void store_data(unsigned char* p, int nbytes, unsigned long long d) {
#pragma unroll
    for (int i = 0; i < (int)(8 / sizeof(V)); ++i)
        if (i * (int)sizeof(V) < nbytes) {
            V v;
            memcpy(&v, reinterpret_cast<const unsigned char*>(&d) + i * sizeof(V), sizeof(V));
            reinterpret_cast<V*>(p)[i] = v;
        }
}

// Descriptor header, records cut to what the array holds.
struct Desc {
    unsigned int sig;
    long long n_send, n_jobs, self_row;
    const long long* sends;
    const long long* jobs;
};

__device__ __forceinline__ Desc read_desc(const long long* desc, long long desc_off, long long desc_len) {
    Desc h;
    const long long* d = desc + desc_off;
    h.sig = (unsigned int)((unsigned long long)d[0] & 0xFFFFFFFFull);
    long long left = desc_len - desc_off - kHeaderWords;  // >= 0: the host checked the header fits
    h.n_send = min2(nonneg(d[1]), left / kSendWords);
    left -= kSendWords * h.n_send;
    h.n_jobs = min2(nonneg(d[2]), left / kJobWords);
    h.self_row = nonneg(d[3]);
    h.sends = d + kHeaderWords;
    h.jobs = h.sends + kSendWords * h.n_send;
    return h;
}

// A send record, clamped: slot rows [slot_row, slot_row + rows) of which the first `valid`
// come from inp[in_row..], to ranks [d0, d1) except me (n_dest of them).
struct Send {
    long long in_row, rows, valid, slot_row, d0, d1, n_dest;
};

__device__ __forceinline__ Send send_record(const Ctx& c, const long long* r) {
    Send s;
    s.in_row = nonneg(r[0]);
    s.slot_row = nonneg(r[2]);
    s.rows = s.slot_row < c.cap_rows ? min2(nonneg(r[1]), c.cap_rows - s.slot_row) : 0;
    s.valid = s.in_row < c.in_rows ? min2(s.rows, c.in_rows - s.in_row) : 0;
    const long long first = clamp_index(nonneg(r[3]));
    s.d0 = min2(first, c.nranks);
    s.d1 = min2(first + min2(nonneg(r[4]), c.nranks), c.nranks);
    s.n_dest = s.d1 - s.d0 - (s.d0 <= c.me && c.me < s.d1);
    return s;
}

// A receive job, clamped (docs/push.md); s0: its first source, self_at: the input row of its
// slot row src_row when it reads itself, self_valid: its rows that exist in inp.
struct Job {
    long long dst_row, cnt, span, src_row, first, count, stride, n_src, s0, self_at, self_valid;
};

__device__ __forceinline__ Job job_record(const Ctx& c, const Desc& h, const long long* r) {
    Job j;
    j.dst_row = nonneg(r[0]);
    j.src_row = nonneg(r[3]);
    j.first = clamp_index(nonneg(r[4]));
    j.count = min2(nonneg(r[5]), c.nranks);
    j.stride = clamp_index(r[6]);
    j.span = j.dst_row < c.out_rows ? min2(nonneg(r[2]), c.out_rows - j.dst_row) : 0;
    j.n_src = 0;
    j.s0 = 0;
    for (long long k = 0; k < j.count; ++k) {
        const long long s = j.first + k * j.stride;
        if (s >= 0 && s < c.nranks && j.n_src++ == 0) j.s0 = s;
    }
    j.cnt = j.n_src && j.src_row < c.cap_rows ? min2(min2(nonneg(r[1]), j.span), c.cap_rows - j.src_row) : 0;
    const bool any = h.self_row < c.in_rows && j.src_row < c.in_rows - h.self_row;
    j.self_at = any ? h.self_row + j.src_row : 0;
    j.self_valid = any ? min2(j.cnt, c.in_rows - j.self_at) : 0;
    return j;
}

// Blocks that take part in this collective: one per kActiveBytes of line traffic (lines
// stored times destinations, lines received or zeroed), the same on every block of the grid.
__device__ __forceinline__ long long active_blocks(const Ctx& c, const Desc& h) {
    long long lines = 0;
    for (long long i = 0; i < h.n_send; ++i) {
        const Send s = send_record(c, h.sends + kSendWords * i);
        lines += s.rows * c.lpr * s.n_dest;
    }
    for (long long i = 0; i < h.n_jobs; ++i) {
        const long long dst_row = nonneg(h.jobs[kJobWords * i]);
        const long long span = nonneg(h.jobs[kJobWords * i + 2]);
        lines += (dst_row < c.out_rows ? min2(span, c.out_rows - dst_row) : 0) * c.lpr;
    }
    const long long g = min2((long long)gridDim.x, ceil_div(lines * 16, kActiveBytes));
    return g < 1 ? 1 : g;
}

// Record a fault: in the block (stops its threads) and as the launch's pending error.
__device__ __forceinline__ void fault(const Ctx& c, int code) {
    atomicCAS(c.code, 0, code);
    atomicCAS(pending_half(&c.state[kErr]), 0u, (unsigned int)code);
}

// One thread's poll loop bookkeeping: false once it must stop (timeout, or a fault anywhere
// on this rank), checked every kCheckEvery polls; backs off after kSleepAfter polls.
struct Poll {
    unsigned long long start;
    unsigned int n;
    __device__ __forceinline__ bool again(const Ctx& c) {
        ++n;
        if (n % kCheckEvery == 0) {
            if (*(volatile int*)c.code != 0 || (ld_volatile_u64(&c.state[kErr]) >> 32) != 0) return false;
            if (c.timeout_ns > 0 && globaltimer() - start > (unsigned long long)c.timeout_ns) {
                fault(c, kErrTimeout);
                return false;
            }
        }
        if (n > kSleepAfter) __nanosleep(n > 16 * kSleepAfter ? 1000 : 64);
        return true;
    }
};

// ---------------------------------------------------------------------------- send

// Peer slot j is served by block j % G, thread j / G: header {sig, e, me, e} of set c.set.
__device__ __forceinline__ void send_header(const Ctx& c, long long G) {
    const long long j = blockIdx.x + (long long)threadIdx.x * G;
    if (j >= c.nranks - 1) return;
    const int dst = (int)j + (j >= c.me);
    st_line(header(c, dst, c.me), with_epoch(c.sig, c.e), with_epoch((unsigned int)c.me, c.e));
}

// Lines [tile * kTile, +kTile) of send record s: read once, stored to every destination.
template <typename V>
__device__ __forceinline__ void send_tile(const Ctx& c, const Send& s, long long tile) {
    const long long n = s.rows * c.lpr, nv = s.valid * c.lpr;
    const long long base = tile * kTile + threadIdx.x;
    const unsigned char* src = nv ? c.inp + s.in_row * c.row_bytes : c.inp;
    unsigned long long lo[kUnroll], hi[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const long long k = base + u * kThreads;
        unsigned long long d = 0;
        if (k < nv) {
            int nb;
            const long long off = line_offset(c, k, nb);
            d = load_data<V>(src + off, nb);
        }
        lo[u] = with_epoch((unsigned int)d, c.e);
        hi[u] = with_epoch((unsigned int)(d >> 32), c.e);
    }
    for (long long dst = s.d0; dst < s.d1; ++dst) {
        if (dst == c.me) continue;
        unsigned long long* lines = region(c, (int)dst, c.me) + 2 * s.slot_row * c.lpr;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * kThreads < n) st_line(lines + 2 * (base + u * kThreads), lo[u], hi[u]);
    }
}

// Every send tile of this block (tiles numbered over all records, dealt round-robin);
// returns the number of send tiles, where the receive tiles' numbering goes on.
template <typename V>
__device__ __forceinline__ long long send_all(const Ctx& c, const Desc& h, long long G) {
    long long t0 = 0;
    for (long long i = 0; i < h.n_send; ++i) {
        const Send s = send_record(c, h.sends + kSendWords * i);
        const long long tiles = s.n_dest > 0 ? ceil_div(s.rows * c.lpr, kTile) : 0;
        for (long long t = (blockIdx.x + G - t0 % G) % G; t < tiles; t += G) send_tile<V>(c, s, t);
        t0 += tiles;
    }
    return t0;
}

// ---------------------------------------------------------------------------- receive

// The header of peer slot j (block j % G, thread j / G): wait for epoch e, check sig and rank.
__device__ __forceinline__ bool poll_header(const Ctx& c, long long G, Poll& poll) {
    const long long j = blockIdx.x + (long long)threadIdx.x * G;
    if (j >= c.nranks - 1) return true;
    const int src = (int)j + (j >= c.me);
    const unsigned long long* line = header(c, c.me, src);
    for (;;) {
        unsigned long long lo, hi;
        ld_line(line, lo, hi);
        if (has_epoch(lo, c.e) && has_epoch(hi, c.e)) {
            if ((unsigned int)lo == c.sig && (unsigned int)hi == (unsigned int)src) return true;
            fault(c, kErrSignature);
            return false;
        }
        if (!poll.again(c)) return false;
    }
}

// Group slot g of a receive request: lines base + u * kThreads (u < B, < n) of source src for
// job j. From inp at once when src is this rank (into got[g * B + u]); otherwise lines[g] is the
// region to poll and the returned bits mark the lines of got[] still to come.
template <typename V, int S, int B>
__device__ __forceinline__ unsigned int request(const Ctx& c, const Job& j, long long src, long long base,
                                                long long n, int g, const unsigned long long* (&lines)[S],
                                                unsigned long long (&got)[S * B]) {
    unsigned int pending = 0;
    lines[g] = nullptr;
    if (src == c.me) {
        const long long nv = j.self_valid * c.lpr;
        const unsigned char* p = nv ? c.inp + j.self_at * c.row_bytes : c.inp;
#pragma unroll
        for (int u = 0; u < B; ++u) {
            const long long k = base + u * kThreads;
            int nb = 0;
            const long long off = k < nv ? line_offset(c, k, nb) : 0;
            got[g * B + u] = k < nv ? load_data<V>(p + off, nb) : 0ull;
        }
        return 0;
    }
    lines[g] = region(c, c.me, (int)src) + 2 * j.src_row * c.lpr;
#pragma unroll
    for (int u = 0; u < B; ++u) {
        got[g * B + u] = 0ull;
        if (base + u * kThreads < n) pending |= 1u << (g * B + u);
    }
    return pending;
}

// got[g * B + u] <- data of line base + u * kThreads of lines[g], for every bit of `pending`,
// once both its epoch words are e: all of them polled together (S * B loads in flight).
template <int S, int B>
__device__ __forceinline__ bool poll_lines(const Ctx& c, const unsigned long long* const (&lines)[S], long long base,
                                           unsigned int pending, unsigned long long (&got)[S * B], Poll& poll) {
    while (pending) {
        unsigned long long lo[S * B], hi[S * B];
#pragma unroll
        for (int i = 0; i < S * B; ++i)
            if (pending >> i & 1u) ld_line(lines[i / B] + 2 * (base + (i % B) * kThreads), lo[i], hi[i]);
#pragma unroll
        for (int i = 0; i < S * B; ++i)
            if ((pending >> i & 1u) && has_epoch(lo[i], c.e) && has_epoch(hi[i], c.e)) {
                got[i] = (lo[i] & 0xFFFFFFFFull) | (hi[i] << 32);
                pending &= ~(1u << i);
            }
        if (pending && !poll.again(c)) return false;
    }
    return true;
}

// out lines base + u * kThreads (< n) of job j's span, from line `first` on, <- word[u].
template <typename V, int U>
__device__ __forceinline__ void write_lines(const Ctx& c, const Job& j, long long first, long long base,
                                            long long n, const unsigned long long (&word)[U]) {
    unsigned char* dst = c.out + j.dst_row * c.row_bytes;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const long long k = base + u * kThreads;
        if (k < n) {
            int nb;
            const long long off = line_offset(c, first + k, nb);
            store_data<V>(dst + off, nb, word[u]);
        }
    }
}

// The next source of job j in range from index *k on (advancing *k past it), or -1.
__device__ __forceinline__ long long next_source(const Ctx& c, const Job& j, long long* k) {
    while (*k < j.count) {
        const long long s = j.first + (*k)++ * j.stride;
        if (s >= 0 && s < c.nranks) return s;
    }
    return -1;
}

// Lines base + u * kThreads (u < B, < n) of a job's sum: element-wise over its sources in
// order (the first initialises the accumulator); the lines of S sources at a time are polled
// together (S * B loads in flight).
template <typename E, typename V, int S, int B>
__device__ __forceinline__ bool sum_lines(const Ctx& c, const Job& j, long long base, long long n, Poll& poll) {
    using T = Elem<E>;
    using Bits = typename T::Bits;
    constexpr int N = (int)(8 / sizeof(Bits));
    typename T::Acc acc[B][N];
    bool started = false;
    long long k = 0;
#pragma unroll 1
    while (k < j.count) {
        const unsigned long long* lines[S];
        unsigned long long got[S * B];
        long long src[S];
        unsigned int pending = 0;
#pragma unroll
        for (int g = 0; g < S; ++g) {
            src[g] = next_source(c, j, &k);
            if (src[g] >= 0) pending |= request<V, S, B>(c, j, src[g], base, n, g, lines, got);
        }
        if (!poll_lines<S, B>(c, lines, base, pending, got, poll)) return false;
#pragma unroll
        for (int i = 0; i < S * B; ++i) {
            if (src[i / B] < 0) continue;
            Bits b[N];
            memcpy(b, &got[i], 8);
#pragma unroll
            for (int e = 0; e < N; ++e)
                acc[i % B][e] = started ? T::add(acc[i % B][e], T::load(b[e])) : T::load(b[e]);
            if (i % B == B - 1) started = true;
        }
    }
    unsigned long long word[B];
#pragma unroll
    for (int u = 0; u < B; ++u) {
        Bits b[N];
#pragma unroll
        for (int e = 0; e < N; ++e) b[e] = T::store(acc[u][e]);
        memcpy(&word[u], b, 8);
    }
    write_lines<V, B>(c, j, 0, base, n, word);
    return true;
}

// One tile of a job's sum, in batches of H lines over S sources: 16 lines in flight per thread
// (8 for byte elements, whose integer sums keep 8 accumulators a line), as many as the
// registers hold; a tile's sum over T sources takes 2 ceil(T / 4) rounds of loads, not T.
template <typename E, typename V>
__device__ __forceinline__ bool sum_tile(const Ctx& c, const Job& j, long long tile, Poll& poll) {
    constexpr int W = sizeof(typename Elem<E>::Bits) == 1 && kUnroll % 2 == 0 ? kUnroll / 2 : kUnroll;
    constexpr int H = W % 2 == 0 ? W / 2 : W;
    constexpr int S = H < W ? 4 : 2;
    const long long n = j.cnt * c.lpr, base = tile * kTile + threadIdx.x;
#pragma unroll 1
    for (int u0 = 0; u0 < kUnroll; u0 += H)
        if (!sum_lines<E, V, S, H>(c, j, base + (long long)u0 * kThreads, n, poll)) return false;
    return true;
}

// Every receive tile of this block: copies, sums and zero fills, numbered on from t0.
template <typename E, typename V>
__device__ __forceinline__ void receive_all(const Ctx& c, const Desc& h, long long G, long long t0, Poll& poll) {
    for (long long i = 0; i < h.n_jobs; ++i) {
        const Job j = job_record(c, h, h.jobs + kJobWords * i);
        const long long n = j.cnt * c.lpr, nz = (j.span - j.cnt) * c.lpr;
        const long long tv = ceil_div(n, kTile), tz = ceil_div(nz, kTile);
        for (long long t = (blockIdx.x + G - t0 % G) % G; t < tv + tz; t += G) {
            if (*(volatile int*)c.code != 0) return;
            const long long base = (t >= tv ? t - tv : t) * kTile + threadIdx.x;
            unsigned long long word[kUnroll];
            if (t >= tv) {
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) word[u] = 0ull;
                write_lines<V, kUnroll>(c, j, n, base, nz, word);
            } else if (j.n_src > 1) {
                if (!sum_tile<E, V>(c, j, t, poll)) return;
            } else {
                const unsigned long long* lines[1];
                const unsigned int pending = request<V, 1, kUnroll>(c, j, j.s0, base, n, 0, lines, word);
                if (!poll_lines<1, kUnroll>(c, lines, base, pending, word, poll)) return;
                write_lines<V, kUnroll>(c, j, 0, base, n, word);
            }
        }
        t0 += tv + tz;
    }
}

// ---------------------------------------------------------------------------- depart

// Zero set c.set of this rank's window (headers and regions), the whole block.
__device__ __forceinline__ void clear_set(const Ctx& c) {
    const long long peers = c.nranks - 1;
    unsigned long long* hdr = reinterpret_cast<unsigned long long*>(c.windows[c.me] + kHdrOff) + 2 * c.set * peers;
    for (long long k = threadIdx.x; k < peers; k += kThreads) st_line(hdr + 2 * k, 0ull, 0ull);
    unsigned long long* data = reinterpret_cast<unsigned long long*>(c.windows[c.me] + c.data_off +
                                                                     c.set * peers * c.region_bytes);
    const long long lines = peers * (c.region_bytes / 16);
    for (long long k = threadIdx.x; k < lines; k += kThreads) st_line(data + 2 * k, 0ull, 0ull);
}

// The last active block to finish commits the launch's error, or (after the clear at the
// wrap) publishes state.epoch = e. The acq_rel counter orders every block's reads first.
__device__ __forceinline__ void depart(const Ctx& c, long long G, int* host_err, int* s_last) {
    __syncthreads();
    if (threadIdx.x == 0)
        *s_last = last_block(&c.state[kDepart], G) && commit_pending(&c.state[kErr], host_err) == 0;
    __syncthreads();
    if (!*s_last) return;
    if (c.e >= kClearFrom) {
        clear_set(c);
        __syncthreads();
    }
    if (threadIdx.x == 0) st_volatile_u64(&c.state[kEpoch], (unsigned long long)c.e);
#if DPG_P2P_PUSH_PHASE_TIMES
    if (threadIdx.x == 0)  // the last block to depart, whichever it is
        st_volatile_u64(reinterpret_cast<unsigned long long*>(c.windows[c.me] + kTimesOff) + 6, globaltimer());
#endif
}

}  // namespace dpg_push

template <typename E, typename V>
__global__ void __launch_bounds__(dpg_push::kThreads, 1)
p2p_push(const V* inp, long long in_rows, V* out, long long out_rows,
         const long long* __restrict__ desc, long long desc_off, long long desc_len,
         long long row_bytes, unsigned char* const* __restrict__ windows, int me, int nranks,
         long long data_off, long long cap_bytes, int* host_err, long long timeout_ns) {
    using namespace dpg_push;
    if (blockDim.x != kThreads || nranks < 1 || nranks > kMaxRanks || me < 0 || me >= nranks || row_bytes < 1)
        __trap();
#if DPG_P2P_PUSH_PHASE_TIMES
    const unsigned long long t_entry = globaltimer();  // stored after the wait (nothing is stored before it)
#endif
    pdl_wait();
    pdl_launch_dependents();
    __shared__ unsigned long long s_start;
    __shared__ unsigned int s_epoch;
    __shared__ int s_refuse, s_code, s_last;

    unsigned long long* const state = reinterpret_cast<unsigned long long*>(windows[me]);
    if (threadIdx.x == 0) {
        s_epoch = next_epoch(ld_volatile_u64(&state[kEpoch]));
        s_refuse = (int)(unsigned int)ld_volatile_u64(&state[kErr]);  // the committed half
        s_code = 0;
        s_start = globaltimer();
    }
    __syncthreads();
    if (s_refuse != 0) return;  // an earlier collective failed on this rank

    Ctx c;
    c.inp = reinterpret_cast<const unsigned char*>(inp);
    c.out = reinterpret_cast<unsigned char*>(out);
    c.in_rows = in_rows;
    c.out_rows = out_rows;
    c.row_bytes = row_bytes;
    c.lpr = (row_bytes + 7) / 8;
    c.cap_rows = cap_bytes / 8 / c.lpr;
    c.region_bytes = 2 * cap_bytes;
    c.data_off = data_off;
    c.timeout_ns = timeout_ns;
    c.dense = row_bytes % 8 == 0;
    c.windows = windows;
    c.state = state;
    c.code = &s_code;
    c.me = me;
    c.nranks = nranks;
    c.e = s_epoch;
    c.set = (int)(s_epoch & 1u);
    const Desc h = read_desc(desc, desc_off, desc_len);
    c.sig = h.sig;
    const long long G = active_blocks(c, h);
    if ((long long)blockIdx.x >= G) return;  // uniform per block: not needed for this step

#if DPG_P2P_PUSH_PHASE_TIMES
    stamp(windows[me], 0, t_entry);
    stamp(windows[me], 1, s_start);
#endif
    send_header(c, G);
    const long long t0 = send_all<V>(c, h, G);
    __syncthreads();  // every store of this block is issued before any of its threads polls
    stamp(windows[me], 2);
    Poll poll{s_start, 0u};
    if (poll_header(c, G, poll)) {
        stamp(windows[me], 3);
        receive_all<E, V>(c, h, G, t0, poll);
    }
    stamp(windows[me], 4);
    depart(c, G, host_err, &s_last);
    stamp(windows[me], 5);
}
