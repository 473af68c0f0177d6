/*************************************************************************
 * dpgather kernels/pull.cu -- the one kernel of the P2P pull transport: p2p_pull.
 *
 * Compiled at run time with NVRTC through cupy.RawModule (kernels/_pull.py owns the module
 * and the list of specialisations, NAME_EXPRESSIONS). docs/p2p.md is the specification;
 * tests/pull_reference.py:pull_ref is its independent NumPy reference and
 * dist/pull.py:HostPull its shared-memory twin.
 *
 * Kernel
 * ------
 *  p2p_pull<E, V>
 *      E in { float, __half, __nv_bfloat16, int, long long, unsigned char }: element type
 *        of the reductions (float16/bfloat16 accumulate in fp32 and round once; integer
 *        sums wrap modulo 2^bits).
 *      V in { uint4, uint2, unsigned int, unsigned short, unsigned char },
 *        sizeof(V) >= sizeof(E): the vector that moves bytes. The host picks the widest V
 *        dividing row_bytes and the inp/out base pointers (window buffers are 256-byte
 *        aligned and cap_bytes is a multiple of 256).
 *      One launch == one collective of the T ranks of the transport, in five phases:
 *        1 pack    inp rows -> own src[e & 1] (clamped, zero-filled)
 *        2 arrive  last-arriving block signals flag[e & 1][me] in every window
 *        3 wait    every block polls its own flag[e & 1][*] (acquire, bounded)
 *        4 pull    out rows = sum of peers' src[e & 1] rows (volatile 16-byte loads)
 *        5 depart  last-departing block publishes state.epoch = e
 *
 * Window of every rank (byte offsets; identical layout on every rank)
 *      0                 flag[2][T]  uint64  (epoch << 32) | sig, written by peer t
 *      16*T              state[4]    uint64  epoch, arrive, depart, err (this rank only;
 *                                            err: committed code | pending code << 32)
 *      data_off          src[2]      cap_bytes each (data_off = roundup(16*T + 32, 256))
 *
 * Descriptor (int64, device memory, at desc[desc_off], desc_len entries in the array):
 *      [sig, n_pack, n_jobs, 0]
 *      n_pack x (in_row, rows, src_row)
 *      n_jobs x (dst_row, cnt, span, src_row, first, count, stride)
 *  Clamping (whatever the descriptor says, nothing outside inp[:in_rows], out[:out_rows],
 *  src[:cap_bytes] of any window or desc[:desc_len] is touched):
 *      negative entries count as 0, stride excepted; first and stride are clamped to
 *      +-(2^31 - 1) (so first + k*stride cannot overflow);
 *      n_pack, n_jobs are cut to the records that fit in desc_len;
 *      pack: rows' = min(rows, cap_rows - src_row), valid = min(rows', in_rows - in_row);
 *            src rows [src_row, src_row + valid) <- inp rows, the rest of rows' <- 0;
 *      job:  span' = min(span, out_rows - dst_row), cnt' = min(cnt, span', cap_rows - src_row);
 *            sources s_k = first + k*stride for k < min(count, T), those outside [0, T)
 *            skipped; with no source the cnt' rows are zero, with one they are a byte copy,
 *            with more the element-wise sum in source order; rows [cnt', span') are zero.
 *      cap_rows = cap_bytes / row_bytes.
 *  Pack segments must not overlap each other, nor jobs each other (undefined result, as
 *  for any racing writes); a job reading src rows no pack wrote this collective reads the
 *  stale rows of the collective two before. inp and out may alias: every block finishes
 *  packing before any block of this rank pulls (the barrier waits on this rank's own flag).
 *
 * Launch: 1-D grid of blocks of exactly kThreads (256) threads (any other block size
 *  traps), gridDim.x <= number of SMs so that every block is resident at once (a block is
 *  256 threads of at most 255 registers -- __launch_bounds__(256, 1); ptxas uses 150-220,
 *  no spills -- and 16 bytes of shared memory, so one per SM always fits, and one per SM
 *  is all the grid asks for): the arrive/wait barrier spins on the other blocks of the grid, and
 *  a block that could only start after a spinning one exits would deadlock until the
 *  timeout. Kernels running concurrently on other streams only delay our blocks. The host
 *  sizes the grid from capacities (out_rows, in_rows, cap_bytes), never from the counts,
 *  so a graph captured once stays valid for any descriptor contents.
 *  Launches of one transport must be stream-ordered (one stream, or event-ordered): two
 *  concurrent p2p_pull on the same window would share its counters and epoch.
 *
 * Memory ordering (why this is enough; PTX memory model terms)
 *  - pack -> signal: each block ends its pack with __syncthreads (its threads' stores
 *    happen-before thread 0's next operation), then thread 0 adds to state.arrive with an
 *    atom.acq_rel.gpu. The block that reads arrive == G - 1 acquired every other block's
 *    released increment, so every pack store of this rank happens-before the st.release.sys
 *    flag stores to the peers that follow (release is cumulative: it orders what the storing
 *    thread observed, at system scope). One active block skips the counter: __syncthreads is
 *    the whole chain.
 *  - signal -> pull: a peer's ld.acquire.sys that reads the flag synchronizes with that
 *    release; __syncthreads extends it to the whole block, so every later load of the
 *    block (ld.volatile, never served from a stale L1 line) sees the packed rows.
 *  - one barrier per collective: src and flags are double-buffered by epoch parity.
 *    A rank packs src[p] for epoch e + 2 only after its wait of e + 1 saw every peer's
 *    flag e + 1; a peer signals e + 1 only in its next launch, which stream order starts
 *    after its launch of e finished every read of src[p]. For the same reason, while a
 *    rank waits for e, flag[p][t] holds e or e - 2 (mod 2^32) and never e + 2: a peer
 *    cannot overwrite the signature of e before it is read, and the high word compared
 *    modulo 2^32 never aliases (e != e - 2 mod 2^32), so the epoch counter may wrap.
 *  - epoch: every block reads state.epoch at its start; only the last block to depart
 *    (all blocks have read it by then) stores e; the next launch reads it after the stream
 *    boundary. arrive/depart are reset by the last block of each phase, when every other
 *    block has already counted.
 *
 * Errors (codes also in kernels/_p2p.py and docs/p2p.md): every block checks the device
 *  copy, the low 32 bits of state.err, at its start and returns at once when it is set (the
 *  transport refuses all later collectives). A wait longer than timeout_ns (%globaltimer;
 *  <= 0: forever) is error 1, a flag of epoch e whose signature differs from ours error 2.
 *  A faulting block records its code in the high 32 bits of state.err (first code wins,
 *  atomicCAS), skips the pull and departs; the last block to depart commits the code to
 *  the low half and to the pinned, mapped host word (st.volatile + __threadfence_system)
 *  instead of publishing the epoch. Committing only then matters: a block that starts after
 *  a sibling faulted still packs, arrives and -- if it is the last to arrive -- signals the
 *  peers, so a mismatch seen early on one rank is seen as a mismatch by the others too,
 *  not as a timeout.
 *************************************************************************/

#include "dpg_device.cuh"

namespace dpg_pull {
using namespace dpg_dev;

// Threads per block: kernels/_p2p.py (THREADS) launches exactly this many.
constexpr int kThreads = 256;
// Ranks of one transport: one polling thread per rank (kernels/_p2p.py MAX_RANKS).
constexpr int kMaxRanks = kThreads;
// state[] word indices and error codes (kernels/_p2p.py mirrors the codes).
constexpr int kEpoch = 0, kArrive = 1, kDepart = 2, kErr = 3;
constexpr int kErrTimeout = 1, kErrSignature = 2;
// Bytes of a launch's real work (rows packed plus rows pulled or zeroed) per active block: the
// grid is sized from capacities (graph-safe), a step may need fewer blocks; the others exit at
// once, and one active block needs no grid-wide counter at all.
#ifndef DPG_P2P_ACTIVE_BYTES
#define DPG_P2P_ACTIVE_BYTES (64LL * 1024)
#endif
constexpr long long kActiveBytes = DPG_P2P_ACTIVE_BYTES;
// Tuning switches (kernels/_p2p.py passes DPGATHER_P2P_DEFINES through; docs/p2p.md): each
// setting is correct under the PTX memory model, they differ only in speed.
//  DPG_P2P_FLAG_FENCE   1: fence.acq_rel.sys before the st.release.sys flag stores (redundant
//                       with the release stores' own cumulativity). Default 0: 9.5 -> 8.7 us
//                       per 1-row collective on 2x H200 (BENCHMARKS.md).
//  DPG_P2P_RELAXED_POLL 1: poll the flags with ld.relaxed.sys and fence once per thread after
//                       its flag matched (the acquire pattern), instead of ld.acquire.sys polls.
//  DPG_P2P_SLEEP_AFTER  polls before __nanosleep backs off (a large value: spin).
#ifndef DPG_P2P_FLAG_FENCE
#define DPG_P2P_FLAG_FENCE 0
#endif
#ifndef DPG_P2P_RELAXED_POLL
#define DPG_P2P_RELAXED_POLL 0
#endif
#ifndef DPG_P2P_SLEEP_AFTER
#define DPG_P2P_SLEEP_AFTER 64
#endif

// Vectors in flight per thread: copies and zero fills keep 8 (16 for sub-word V) loads
// before the stores, as kernels/copy.cu; reductions hold fp32 accumulators, so fewer.
template <typename V>
struct CopyUnroll {
    static constexpr int value = sizeof(V) >= 4 ? 8 : 16;
};
template <typename V>
struct ReduceUnroll {
    static constexpr int value = sizeof(V) >= 16 ? 4 : 8;
};

// The PTX below has portable twins in tests/p2p_emu/emu.h, which runs this file as C++ on
// the CPU (DPG_P2P_EMULATION, never defined by the loader) to test its logic.
#ifndef DPG_P2P_EMULATION
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned long long ld_relaxed_sys(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Loads from a window (own or a peer's): ld.volatile, so a line cached in L1 by the
// collective two epochs ago is never returned (NCCL reads peer buffers the same way).
template <typename V>
__device__ __forceinline__ V ld_window(const V* p);
template <>
__device__ __forceinline__ uint4 ld_window<uint4>(const uint4* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
template <>
__device__ __forceinline__ uint2 ld_window<uint2>(const uint2* p) {
    uint2 v;
    asm volatile("ld.volatile.global.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
template <>
__device__ __forceinline__ unsigned int ld_window<unsigned int>(const unsigned int* p) {
    unsigned int v;
    asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
template <>
__device__ __forceinline__ unsigned short ld_window<unsigned short>(const unsigned short* p) {
    unsigned short v;
    asm volatile("ld.volatile.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}
template <>
__device__ __forceinline__ unsigned char ld_window<unsigned char>(const unsigned char* p) {
    unsigned int v;
    asm volatile("ld.volatile.global.u8 %0, [%1];" : "=r"(v) : "l"(p));
    return (unsigned char)v;
}
#endif  // DPG_P2P_EMULATION

// Everything one launch needs, read once per block.
struct Ctx {
    const unsigned char* inp;
    unsigned char* out;
    long long in_rows, out_rows, row_bytes, cap_rows, cap_bytes, data_off;
    unsigned char* const* windows;
    int me, nranks, parity;
};

__device__ __forceinline__ const unsigned char* src_base(const Ctx& c, int rank) {
    return c.windows[rank] + c.data_off + (long long)c.parity * c.cap_bytes;
}

// dst[k] = ld_window(src + k) (window == true) or src[k] for k in [lo, hi) of tile `tile`
// of a span of n vectors; tiles of kThreads * U vectors, thread t moving t, t + kThreads..
template <typename V, bool Window>
__device__ __forceinline__ void copy_tile(const V* __restrict__ src, V* __restrict__ dst,
                                          long long n, long long tile) {
    constexpr int U = CopyUnroll<V>::value;
    const long long base = tile * (long long)(kThreads * U) + threadIdx.x;
    V r[U];
    if (n - base > (long long)(U - 1) * kThreads) {
#pragma unroll
        for (int u = 0; u < U; ++u)
            r[u] = Window ? ld_window<V>(src + base + u * kThreads) : src[base + u * kThreads];
#pragma unroll
        for (int u = 0; u < U; ++u) dst[base + u * kThreads] = r[u];
    } else {
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (base + u * kThreads < n)
                r[u] = Window ? ld_window<V>(src + base + u * kThreads) : src[base + u * kThreads];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (base + u * kThreads < n) dst[base + u * kThreads] = r[u];
    }
}

template <typename V>
__device__ __forceinline__ void zero_tile(V* __restrict__ dst, long long n, long long tile) {
    constexpr int U = CopyUnroll<V>::value;
    const long long base = tile * (long long)(kThreads * U) + threadIdx.x;
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (base + u * kThreads < n) dst[base + u * kThreads] = V{};
}

// One tile of a reduction: dst[k] = sum over the valid sources of their vector k, summed
// element-wise in source order (the first valid source initialises the accumulator).
template <typename E, typename V>
__device__ __forceinline__ void reduce_tile(const Ctx& c, long long src_off, long long first,
                                            long long count, long long stride,
                                            V* __restrict__ dst, long long n, long long tile) {
    using T = Elem<E>;
    using Bits = typename T::Bits;
    using Acc = typename T::Acc;
    constexpr int U = ReduceUnroll<V>::value;
    constexpr int N = (int)(sizeof(V) / sizeof(Bits));
    const long long base = tile * (long long)(kThreads * U) + threadIdx.x;
    Acc acc[U][N];
    bool started = false;
#pragma unroll 1
    for (long long k = 0; k < count; ++k) {
        const long long s = first + k * stride;
        if (s < 0 || s >= c.nranks) continue;
        const V* src = reinterpret_cast<const V*>(src_base(c, (int)s) + src_off);
        V r[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (base + u * kThreads < n) r[u] = ld_window<V>(src + base + u * kThreads);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            Bits b[N];
            memcpy(b, &r[u], sizeof(V));
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const Acc x = T::load(b[j]);
                acc[u][j] = started ? T::add(acc[u][j], x) : x;
            }
        }
        started = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (base + u * kThreads < n) {
            Bits b[N];
#pragma unroll
            for (int j = 0; j < N; ++j) b[j] = T::store(acc[u][j]);
            V v;
            memcpy(&v, b, sizeof(V));
            dst[base + u * kThreads] = v;
        }
    }
}

// Descriptor header, clamped to what the array holds.
struct Header {
    unsigned int sig;
    long long n_pack, n_jobs;
    const long long* packs;
    const long long* jobs;
};

__device__ __forceinline__ Header read_header(const long long* desc, long long desc_off,
                                              long long desc_len) {
    Header h;
    const long long* d = desc + desc_off;
    h.sig = (unsigned int)((unsigned long long)d[0] & 0xFFFFFFFFull);
    long long left = desc_len - desc_off - 4;  // >= 0: the host checked the header fits
    h.n_pack = min2(nonneg(d[1]), left / 3);
    left -= 3 * h.n_pack;
    h.n_jobs = min2(nonneg(d[2]), left / 7);
    h.packs = d + 4;
    h.jobs = d + 4 + 3 * h.n_pack;
    return h;
}

}  // namespace dpg_pull

template <typename E, typename V>
__global__ void __launch_bounds__(dpg_pull::kThreads, 1)
p2p_pull(const V* inp, long long in_rows, V* out, long long out_rows,
         const long long* __restrict__ desc, long long desc_off, long long desc_len,
         long long row_bytes, unsigned char* const* __restrict__ windows, int me, int nranks,
         long long data_off, long long cap_bytes, int* host_err, long long timeout_ns) {
    using namespace dpg_pull;
    if (blockDim.x != kThreads || nranks < 1 || nranks > kMaxRanks || me < 0 || me >= nranks)
        __trap();
    __shared__ long long s_epoch;
    __shared__ int s_last;
    __shared__ int s_code;

    unsigned long long* const state =
        reinterpret_cast<unsigned long long*>(windows[me] + 16LL * nranks);
    if (threadIdx.x == 0) {
        s_epoch = (long long)ld_volatile_u64(&state[kEpoch]) + 1;
        s_code = (int)(unsigned int)ld_volatile_u64(&state[kErr]);  // the committed half
    }
    __syncthreads();
    if (s_code != 0) return;  // refused: an earlier collective failed on this rank
    const long long e = s_epoch;

    Ctx c;
    c.inp = reinterpret_cast<const unsigned char*>(inp);
    c.out = reinterpret_cast<unsigned char*>(out);
    c.in_rows = in_rows;
    c.out_rows = out_rows;
    c.row_bytes = row_bytes;
    c.cap_bytes = cap_bytes;
    c.cap_rows = cap_bytes / row_bytes;
    c.data_off = data_off;
    c.windows = windows;
    c.me = me;
    c.nranks = nranks;
    c.parity = (int)(e & 1);
    const Header h = read_header(desc, desc_off, desc_len);
    const long long vpr = row_bytes / (long long)sizeof(V);

    // ---- 0. active blocks: the same count on every block, from the descriptor
    long long G;
    {
        long long work = 0;
        for (long long i = 0; i < h.n_pack; ++i) {
            const long long rows = nonneg(h.packs[3 * i + 1]);
            const long long src_row = nonneg(h.packs[3 * i + 2]);
            work += src_row < c.cap_rows ? min2(rows, c.cap_rows - src_row) : 0;
        }
        for (long long j = 0; j < h.n_jobs; ++j) {
            const long long dst_row = nonneg(h.jobs[7 * j]);
            const long long span = nonneg(h.jobs[7 * j + 2]);
            work += dst_row < out_rows ? min2(span, out_rows - dst_row) : 0;
        }
        G = min2((long long)gridDim.x, ceil_div(work * row_bytes, kActiveBytes));
        if (G < 1) G = 1;
    }
    if ((long long)blockIdx.x >= G) return;  // uniform per block: not needed for this step

    // ---- 1. pack: tiles of every segment, numbered globally, dealt round-robin to blocks
    {
        constexpr long long kTile = (long long)kThreads * CopyUnroll<V>::value;
        unsigned char* own = const_cast<unsigned char*>(src_base(c, me));
        long long t0 = 0;  // global index of the segment's first tile
        for (long long i = 0; i < h.n_pack; ++i) {
            const long long in_row = nonneg(h.packs[3 * i]);
            const long long rows = nonneg(h.packs[3 * i + 1]);
            const long long src_row = nonneg(h.packs[3 * i + 2]);
            const long long rows_c = src_row < c.cap_rows ? min2(rows, c.cap_rows - src_row) : 0;
            if (rows_c == 0) continue;  // src_row may be far past the window: form no pointer
            const long long valid = in_row < in_rows ? min2(rows_c, in_rows - in_row) : 0;
            V* dst = reinterpret_cast<V*>(own + src_row * row_bytes);
            const long long nv = valid * vpr, nz = (rows_c - valid) * vpr;
            const long long tv = ceil_div(nv, kTile), tz = ceil_div(nz, kTile);
            for (long long t = (blockIdx.x + G - t0 % G) % G; t < tv + tz; t += G) {
                if (t < tv)
                    copy_tile<V, false>(inp + in_row * vpr, dst, nv, t);
                else
                    zero_tile<V>(dst + nv, nz, t - tv);
            }
            t0 += tv + tz;
        }
    }

    // ---- 2. arrive; the last block signals every rank (own window included). The arrive
    // counter is an acq_rel atomic: the last block acquires every block's pack; one
    // fence.acq_rel.sys then orders all of it before the release.sys flag stores.
    __syncthreads();
    if (threadIdx.x == 0) {
        s_last = last_block(&state[kArrive], G);
#if DPG_P2P_FLAG_FENCE
        if (s_last) fence_acq_rel_sys();
#endif
    }
    __syncthreads();
    if (s_last && (int)threadIdx.x < nranks) {
        unsigned long long* flag = reinterpret_cast<unsigned long long*>(windows[threadIdx.x]) +
                                   (long long)c.parity * nranks + me;
        st_release_sys(flag, ((unsigned long long)(unsigned int)e << 32) | h.sig);
    }

    // ---- 3. wait for flag[e & 1][t] == (e, sig) for every t; uniform exits only
    bool faulted = false;
    {
        const unsigned long long* flags =
            reinterpret_cast<const unsigned long long*>(windows[me]) + (long long)c.parity * nranks;
        bool seen = (int)threadIdx.x >= nranks;
        const unsigned long long start = globaltimer();
        if (threadIdx.x == 0) s_code = 0;
        __syncthreads();
        for (unsigned int polls = 0;; ++polls) {
            int fault = 0;
            if (!seen) {
#if DPG_P2P_RELAXED_POLL
                const unsigned long long f = ld_relaxed_sys(&flags[threadIdx.x]);
#else
                const unsigned long long f = ld_acquire_sys(&flags[threadIdx.x]);
#endif
                if ((unsigned int)(f >> 32) == (unsigned int)e) {
#if DPG_P2P_RELAXED_POLL
                    fence_acq_rel_sys();  // with the relaxed load: the acquire pattern
#endif
                    seen = true;
                    if ((unsigned int)f != h.sig) {
                        atomicCAS(&s_code, 0, kErrSignature);
                        fault = 1;
                    }
                }
            }
            if (threadIdx.x == 0 && !fault && timeout_ns > 0 &&
                globaltimer() - start > (unsigned long long)timeout_ns) {
                atomicCAS(&s_code, 0, kErrTimeout);
                fault = 1;
            }
            const int pending = __syncthreads_count(!seen);
            if (__syncthreads_or(fault)) {
                // Pending until the last block departs: a sibling that starts only now must
                // not see a committed error and refuse, or it would never arrive and signal.
                if (threadIdx.x == 0) atomicCAS(pending_half(&state[kErr]), 0u, (unsigned int)s_code);
                faulted = true;
                break;
            }
            if (pending == 0) break;
            if (polls > DPG_P2P_SLEEP_AFTER) __nanosleep(polls > 4096 + DPG_P2P_SLEEP_AFTER ? 1000 : 64);
        }
    }

    // ---- 4. pull + reduce: every job's tiles, numbered globally, dealt to blocks
    if (!faulted) {
        long long t0 = 0;
        for (long long j = 0; j < h.n_jobs; ++j) {
            const long long* jd = h.jobs + 7 * j;
            const long long dst_row = nonneg(jd[0]);
            const long long cnt = nonneg(jd[1]);
            const long long span = nonneg(jd[2]);
            const long long src_row = nonneg(jd[3]);
            const long long first = clamp_index(nonneg(jd[4]));
            const long long count = min2(nonneg(jd[5]), nranks);
            const long long stride = clamp_index(jd[6]);
            const long long span_c = dst_row < out_rows ? min2(span, out_rows - dst_row) : 0;
            if (span_c == 0) continue;  // dst_row may be far past out: form no pointer
            // Sources in range: how many, and the first of them.
            long long n_src = 0, s0 = 0;
            for (long long k = 0; k < count; ++k) {
                const long long s = first + k * stride;
                if (s >= 0 && s < nranks) {
                    if (n_src == 0) s0 = s;
                    ++n_src;
                }
            }
            const long long cnt_c =
                n_src && src_row < c.cap_rows ? min2(min2(cnt, span_c), c.cap_rows - src_row) : 0;
            V* dst = reinterpret_cast<V*>(c.out + dst_row * row_bytes);
            const long long src_off = cnt_c ? src_row * row_bytes : 0;
            const long long nv = cnt_c * vpr, nz = (span_c - cnt_c) * vpr;
            const long long vtile = (long long)kThreads *
                                    (n_src > 1 ? ReduceUnroll<V>::value : CopyUnroll<V>::value);
            constexpr long long kZTile = (long long)kThreads * CopyUnroll<V>::value;
            const long long tv = ceil_div(nv, vtile), tz = ceil_div(nz, kZTile);
            for (long long t = (blockIdx.x + G - t0 % G) % G; t < tv + tz; t += G) {
                if (t >= tv)
                    zero_tile<V>(dst + nv, nz, t - tv);
                else if (n_src == 1)
                    copy_tile<V, true>(reinterpret_cast<const V*>(src_base(c, (int)s0) + src_off),
                                       dst, nv, t);
                else
                    reduce_tile<E, V>(c, src_off, first, count, stride, dst, nv, t);
            }
            t0 += tv + tz;
        }
    }

    // ---- 5. depart; the last block publishes the epoch, or commits the launch's error (the
    // acq_rel counter makes every block's pending error visible to the last one)
    __syncthreads();
    if (threadIdx.x == 0 && last_block(&state[kDepart], G) && commit_pending(&state[kErr], host_err) == 0)
        st_volatile_u64(&state[kEpoch], (unsigned long long)e);
}
