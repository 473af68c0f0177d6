/*************************************************************************
 * dpgather kernels/copy.cu -- row copies and pad-row masks for the CUDA backend.
 *
 * Compiled at run time with NVRTC through cupy.RawModule (kernels/_cuda.py owns the
 * module and the list of specialisations, NAME_EXPRESSIONS). Semantics are those of
 * docs/internals.md and are shared with the Numba twins in kernels/_host.py.
 *
 * Kernels
 * -------
 *  copy_rows<V>   V in { uint4, uint2, unsigned int, unsigned short, unsigned char }
 *      Reads (src_start, n_valid, dst_start, n_rows) from desc[4*i .. 4*i+3] (device
 *      int64) and writes dst rows [dst_start, dst_start + rows): the first `valid` of
 *      them are copied from src rows [src_start, src_start + valid), the rest are zero.
 *          valid = min(n_valid, src_total_rows - src_start, rows)   (>= 0)
 *          rows  = min(n_rows,  dst_total_rows - dst_start)         (>= 0)
 *      Negative descriptor entries count as 0. Nothing outside src is read and nothing
 *      outside those dst rows is written, whatever the descriptor says.
 *      Needs: row_bytes % sizeof(V) == 0, src and dst base pointers aligned to
 *      sizeof(V), src and dst C-contiguous with the same row_bytes, the src rows read and
 *      the dst rows written not overlapping (src == dst is fine for disjoint rows, e.g.
 *      n_valid = 0 to zero a tail in place: src is then never read). The host picks the
 *      widest V that satisfies this (16 bytes for bf16 rows of hidden 7168 at arena
 *      offsets).
 *      Mapping: both buffers are C-contiguous with equal row pitch, so the rows to copy
 *      are ONE contiguous span of valid*row_bytes bytes in src and in dst, and the rows
 *      to zero ONE contiguous span after it. Each span is walked as a flat array of V in
 *      tiles of kThreads * Unroll<V> vectors with a grid-stride loop: Unroll<V> vectors in
 *      flight per thread (all loads before any store), coalesced, no per-element
 *      division, compile-time offsets (32 registers per thread on sm_90).
 *      Launch: 1-D grid of blocks of exactly dpg::kThreads (256) threads (other block
 *      sizes trap). The host sizes the grid from the dst CAPACITY (dst_total_rows), never
 *      from the counts, so a captured CUDA graph stays valid for any descriptor contents;
 *      surplus blocks see an empty range and exit. One launch == one descriptor record.
 *
 *  mask_rows<T>   T in { int, long long }
 *      For s in [0, num_slots): reads (offset, n_tokens, slot_rows) from
 *      desc[i + 3*s .. i + 3*s + 2] and sets ids rows
 *      [offset + n_tokens, offset + slot_rows), clamped to [0, total_rows), to `fill`
 *      (all k columns). Negative descriptor entries count as 0.
 *      Needs: ids C-contiguous [total_rows, k] of T, aligned to sizeof(T). Launch: 1-D
 *      grid of kThreads-thread blocks sized from total_rows * k (capacity), graph-safe
 *      like copy_rows.
 *
 * Graph safety: every count and offset is read from device memory at run time; the
 * kernel arguments (pointers, capacities, row width, descriptor index) are fixed per
 * buffer, so a graph captured once is replayed after rewriting `desc` only.
 *************************************************************************/

namespace dpg {

// Threads per block: the host (kernels/_cuda.py, _THREADS) always launches this many. A
// compile-time block size turns every unrolled access into an immediate offset.
constexpr int kThreads = 256;

// Vectors kept in flight per thread per loop trip. kernels/_cuda.py mirrors this table
// (_UNROLL) to size grids; a mismatch costs speed only, never correctness.
#ifndef DPG_UNROLL16
#define DPG_UNROLL16 8
#endif
template <typename V>
struct Unroll {
    static constexpr int value = sizeof(V) >= 16 ? DPG_UNROLL16 : (sizeof(V) >= 4 ? 8 : 16);
};

__device__ __forceinline__ long long nonneg(long long x) { return x < 0 ? 0 : x; }
__device__ __forceinline__ long long min2(long long a, long long b) { return a < b ? a : b; }

// dst[k] = src[k] for k in [0, n): grid-stride over tiles of kThreads * U vectors, thread t
// of a tile moving vectors t, t + kThreads, ... (coalesced), all U loads before any store.
template <typename V>
__device__ __forceinline__ void span_copy(const V* __restrict__ src, V* __restrict__ dst,
                                          long long n) {
    constexpr int U = Unroll<V>::value;
    constexpr long long kTile = (long long)kThreads * U;
    const long long stride = (long long)gridDim.x * kTile;
#pragma unroll 1
    for (long long base = blockIdx.x * kTile + threadIdx.x; base < n; base += stride) {
        const V* s = src + base;
        V* d = dst + base;
        V r[U];
        if (n - base > (long long)(U - 1) * kThreads) {  // whole tile in range
#pragma unroll
            for (int u = 0; u < U; ++u) r[u] = s[u * kThreads];
#pragma unroll
            for (int u = 0; u < U; ++u) d[u * kThreads] = r[u];
        } else {
            const int left = (int)(n - base);  // < U * kThreads
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (u * kThreads < left) r[u] = s[u * kThreads];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (u * kThreads < left) d[u * kThreads] = r[u];
        }
    }
}

// dst[k] = value for k in [0, n), same tiling.
template <typename V>
__device__ __forceinline__ void span_fill(V* __restrict__ dst, long long n, const V value) {
    constexpr int U = Unroll<V>::value;
    constexpr long long kTile = (long long)kThreads * U;
    const long long stride = (long long)gridDim.x * kTile;
#pragma unroll 1
    for (long long base = blockIdx.x * kTile + threadIdx.x; base < n; base += stride) {
        V* d = dst + base;
        if (n - base > (long long)(U - 1) * kThreads) {
#pragma unroll
            for (int u = 0; u < U; ++u) d[u * kThreads] = value;
        } else {
            const int left = (int)(n - base);
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (u * kThreads < left) d[u * kThreads] = value;
        }
    }
}

}  // namespace dpg

template <typename V>
__global__ void __launch_bounds__(dpg::kThreads)
copy_rows(const V* __restrict__ src, V* __restrict__ dst, const long long* __restrict__ desc,
          long long i, long long src_total_rows, long long dst_total_rows, long long row_bytes) {
    if (blockDim.x != dpg::kThreads) __trap();  // the tiling assumes kThreads per block
    const long long* d = desc + 4 * i;
    const long long src_start = dpg::nonneg(d[0]);
    const long long n_valid = dpg::nonneg(d[1]);
    const long long dst_start = dpg::nonneg(d[2]);
    const long long n_rows = dpg::nonneg(d[3]);

    const long long dst_avail = dst_start < dst_total_rows ? dst_total_rows - dst_start : 0;
    const long long rows = dpg::min2(n_rows, dst_avail);
    if (rows <= 0) return;
    const long long src_avail = src_start < src_total_rows ? src_total_rows - src_start : 0;
    const long long valid = dpg::min2(dpg::min2(n_valid, src_avail), rows);

    const long long vpr = row_bytes / (long long)sizeof(V);
    V* out = dst + dst_start * vpr;
    // Form src + src_start*vpr only when rows are read: src_start may be far past the end.
    if (valid > 0) dpg::span_copy<V>(src + src_start * vpr, out, valid * vpr);
    dpg::span_fill<V>(out + valid * vpr, (rows - valid) * vpr, V{});
}

template <typename T>
__global__ void __launch_bounds__(dpg::kThreads)
mask_rows(T* __restrict__ ids, const long long* __restrict__ desc, long long i, int num_slots,
          long long total_rows, long long k, T fill) {
    if (blockDim.x != dpg::kThreads) __trap();
    for (int s = 0; s < num_slots; ++s) {
        const long long* d = desc + i + 3LL * s;
        // Clamp each term to total_rows first so the sums below cannot overflow.
        const long long offset = dpg::min2(dpg::nonneg(d[0]), total_rows);
        const long long n_tokens = dpg::min2(dpg::nonneg(d[1]), total_rows);
        const long long slot_rows = dpg::min2(dpg::nonneg(d[2]), total_rows);
        const long long r0 = dpg::min2(offset + n_tokens, total_rows);
        const long long r1 = dpg::min2(offset + slot_rows, total_rows);
        if (r1 > r0) dpg::span_fill<T>(ids + r0 * k, (r1 - r0) * k, fill);
    }
}
