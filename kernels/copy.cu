/*************************************************************************
 * dpgather kernels/copy.cu -- row copies, pad-row masks and the fp8 quantizing pack for the
 * CUDA backend.
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
 *  quantize_rows<E>   E in { float, __half, __nv_bfloat16 }
 *      copy_rows' descriptor record and clamps, but the `valid` source rows (of `width`
 *      elements of E) are quantized into wire rows of `width + 4 * width / group` bytes
 *      (docs/fp8.md): per group of `group` channels, amax = the largest |x| that is not NaN
 *      (compared as integer bits: no flush to zero), s = amax / 448 (pow2: a nonzero s rounded
 *      up to a power of two >= 2^-126; s = 0 when amax = 0 or amax / 448 underflows), q = e4m3fn(x / s) (x itself when
 *      s = 0) rounded to nearest even, saturated to +-448, NaN -> 0x7F; the row's `width`
 *      fp8 bytes, then its scales as little-endian float32 bytes. The rows past `valid`
 *      are zero bytes (zero rows, zero scales). Divisions are div.rn.f32 (subnormals kept).
 *      Mapping: one warp per (row, group), its lanes striding the group's channels; a
 *      grid-stride loop over rows x groups, then the zero span as copy_rows fills it.
 *      Launch: 1-D grid of kThreads-thread blocks sized from dst_total_rows (capacity).
 *
 *  quantize_rows_v16<E>   the same result, 16-byte loads: `lanes` lanes (a power of two <= 32)
 *      take one group, each `16 / sizeof(E)` consecutive channels per chunk, `group / (lanes *
 *      16 / sizeof(E))` chunks each; the amax is reduced over the lanes with shuffles, the
 *      fp8 bytes stored as one 8- or 4-byte word per chunk, the scale as one word. A warp
 *      takes 32 / lanes groups at once. Needs (the host checks, else quantize_rows):
 *      src and dst base pointers 16-byte aligned, width * sizeof(E), group * sizeof(E) and
 *      width * sizeof(E) and group * sizeof(E) multiples of 16, the wire row a multiple of the
 *      store word (16 / sizeof(E) bytes).
 *
 * Graph safety: every count and offset is read from device memory at run time; the
 * kernel arguments (pointers, capacities, row width, descriptor index) are fixed per
 * buffer, so a graph captured once is replayed after rewriting `desc` only.
 *************************************************************************/

#include "dpg_device.cuh"

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

// The window of copy record i (docs/internals.md): false when it has no rows; else the clamped
// starts, the rows to write and the valid ones among them (rows read from src).
__device__ __forceinline__ bool read_window(const long long* __restrict__ desc, long long i,
                                            long long src_total_rows, long long dst_total_rows,
                                            long long& src_start, long long& dst_start,
                                            long long& rows, long long& valid) {
    const long long* d = desc + 4 * i;
    src_start = dpg_dev::nonneg(d[0]);
    const long long n_valid = dpg_dev::nonneg(d[1]);
    dst_start = dpg_dev::nonneg(d[2]);
    const long long n_rows = dpg_dev::nonneg(d[3]);
    const long long dst_avail = dst_start < dst_total_rows ? dst_total_rows - dst_start : 0;
    rows = dpg_dev::min2(n_rows, dst_avail);
    if (rows <= 0) return false;
    const long long src_avail = src_start < src_total_rows ? src_total_rows - src_start : 0;
    valid = dpg_dev::min2(dpg_dev::min2(n_valid, src_avail), rows);
    return true;
}

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
    long long src_start, dst_start, rows, valid;
    if (!dpg::read_window(desc, i, src_total_rows, dst_total_rows, src_start, dst_start, rows, valid)) return;

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
        const long long offset = dpg_dev::min2(dpg_dev::nonneg(d[0]), total_rows);
        const long long n_tokens = dpg_dev::min2(dpg_dev::nonneg(d[1]), total_rows);
        const long long slot_rows = dpg_dev::min2(dpg_dev::nonneg(d[2]), total_rows);
        const long long r0 = dpg_dev::min2(offset + n_tokens, total_rows);
        const long long r1 = dpg_dev::min2(offset + slot_rows, total_rows);
        if (r1 > r0) dpg::span_fill<T>(ids + r0 * k, (r1 - r0) * k, fill);
    }
}

namespace dpg {

// The source element of quantize_rows as float32, exactly (bfloat16: its bits are the high half).
template <typename E>
struct QuantSrc;
template <>
struct QuantSrc<float> {
    using Bits = unsigned int;
    static __device__ __forceinline__ float f(Bits b) { return __uint_as_float(b); }
};
template <>
struct QuantSrc<__half> {
    using Bits = unsigned short;
    static __device__ __forceinline__ float f(Bits b) { return __half2float(__ushort_as_half(b)); }
};
template <>
struct QuantSrc<__nv_bfloat16> {
    using Bits = unsigned short;
    static __device__ __forceinline__ float f(Bits b) { return __uint_as_float((unsigned int)b << 16); }
};

// float8 e4m3fn bits of r: nearest even, saturated to +-448 (0x7E), NaN -> 0x7F. Integer work on
// the bits but for the e4m3 subnormal range, where r * 2^9 is exact and rintf rounds to even.
__device__ __forceinline__ unsigned int e4m3(float r) {
    const unsigned int u = __float_as_uint(r);
    const unsigned int sign = (u >> 24) & 0x80u;
    const unsigned int a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0x7Fu;
    if (a >= 0x43E00000u) return sign | 0x7Eu;                     // >= 448 (and infinity)
    if (a < 0x3C800000u) return sign | (unsigned int)rintf(__uint_as_float(a) * 512.0f);  // < 2^-6
    return sign | (((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - 960u);  // 960 = (127 - 7) << 3
}

// Two e4m3fn bytes (lo in the low byte), as e4m3 computes each. sm_89 and later convert both in
// one instruction (cvt.rn.satfinite: nearest even, saturated, NaN to NaN); its NaN byte gets
// the sign bit cleared, as e4m3 writes it.
__device__ __forceinline__ unsigned int e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short h;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(h) : "f"(hi), "f"(lo));
    unsigned int v = h;
    if ((v & 0x7Fu) == 0x7Fu) v &= 0xFF7Fu;
    if ((v & 0x7F00u) == 0x7F00u) v &= 0x7FFFu;
    return v;
#else
    return e4m3(lo) | (e4m3(hi) << 8);
#endif
}

// x / s of the quantized gather: a power-of-two scale divides exactly by a product with its
// reciprocal (also a power of two, or 0 for an infinite scale), any other scale by div.rn.
struct Divide {
    float s, inv;
    bool exact;
    __device__ __forceinline__ explicit Divide(unsigned int sb)
        : s(__uint_as_float(sb)),
          inv(sb == 0x7F800000u ? 0.0f : __uint_as_float(0x7F000000u - sb)),
          exact((sb & 0x007FFFFFu) == 0u && sb >= 0x00800000u) {}
    __device__ __forceinline__ float operator()(float x) const {
        return exact ? dpg_dev::mul_f32(x, inv) : dpg_dev::div_f32(x, s);
    }
};

// Zero the n bytes at z (whole wire rows of `wire` bytes): 4-byte stores where aligned.
__device__ __forceinline__ void zero_rows(unsigned char* z, long long n, long long wire) {
    if (((unsigned long long)z | (unsigned long long)wire) & 3ull)
        span_fill<unsigned char>(z, n, (unsigned char)0);
    else
        span_fill<unsigned int>(reinterpret_cast<unsigned int*>(z), n >> 2, 0u);
}

// The scale's bits from amax's bits (docs/fp8.md).
__device__ __forceinline__ unsigned int scale_bits(unsigned int amax, int pow2) {
    if (amax == 0u) return 0u;
    unsigned int s = __float_as_uint(dpg_dev::div_f32(__uint_as_float(amax), 448.0f));
    if (pow2 && s != 0u) {
        if (s < 0x00800000u) s = 0x00800000u;
        else if (s & 0x007FFFFFu) s = (s & 0x7F800000u) + 0x00800000u;
    }
    return s;
}

}  // namespace dpg

template <typename E>
__global__ void __launch_bounds__(dpg::kThreads)
quantize_rows(const typename dpg::QuantSrc<E>::Bits* __restrict__ src, unsigned char* __restrict__ dst,
              const long long* __restrict__ desc, long long i, long long src_total_rows,
              long long dst_total_rows, long long width, long long group, int pow2) {
    using Src = dpg::QuantSrc<E>;
    if (blockDim.x != dpg::kThreads) __trap();
    long long src_start, dst_start, rows, valid;
    if (!dpg::read_window(desc, i, src_total_rows, dst_total_rows, src_start, dst_start, rows, valid)) return;

    const long long groups = width / group;
    const long long wire = width + 4 * groups;
    const long long items = valid * groups;
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * dpg::kThreads) >> 5;
    // warp-uniform loop: every lane of a warp takes the same items (the shuffles need all 32)
#pragma unroll 1
    for (long long it = ((long long)blockIdx.x * dpg::kThreads + threadIdx.x) >> 5; it < items; it += warps) {
        const long long r = it / groups, g = it - r * groups;
        const typename Src::Bits* s = src + (src_start + r) * width + g * group;
        unsigned char* q = dst + (dst_start + r) * wire;
        unsigned int m = 0u;
        for (long long c = lane; c < group; c += 32) {
            const unsigned int a = __float_as_uint(Src::f(s[c])) & 0x7FFFFFFFu;
            m = max(m, a > 0x7F800000u ? 0u : a);
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
        const unsigned int sb = dpg::scale_bits(m, pow2);
        const float sc = __uint_as_float(sb);
        for (long long c = lane; c < group; c += 32) {
            const float v = Src::f(s[c]);
            q[g * group + c] = (unsigned char)dpg::e4m3(sb ? dpg_dev::div_f32(v, sc) : v);
        }
        if (lane < 4) q[width + 4 * g + lane] = (unsigned char)(sb >> (8 * lane));
    }
    dpg::zero_rows(dst + (dst_start + valid) * wire, (rows - valid) * wire, wire);
}

template <typename E>
__global__ void __launch_bounds__(dpg::kThreads)
quantize_rows_v16(const uint4* __restrict__ src, unsigned char* __restrict__ dst,
                  const long long* __restrict__ desc, long long i, long long src_total_rows,
                  long long dst_total_rows, long long width, long long group, int pow2, int lanes) {
    using Src = dpg::QuantSrc<E>;
    using Bits = typename Src::Bits;
    constexpr int kVec = 16 / sizeof(Bits);  // channels per 16-byte load: 8 (2-byte) or 4 (float)
    if (blockDim.x != dpg::kThreads) __trap();
    long long src_start, dst_start, rows, valid;
    if (!dpg::read_window(desc, i, src_total_rows, dst_total_rows, src_start, dst_start, rows, valid)) return;

    const long long groups = width / group;
    const long long wire = width + 4 * groups;
    const long long items = valid * groups;
    const int per_warp = 32 / lanes;
    const int sub = threadIdx.x & (lanes - 1);
    const int slot = (threadIdx.x & 31) / lanes;
    const long long chunks = group / ((long long)lanes * kVec);
    const long long warps = ((long long)gridDim.x * dpg::kThreads) >> 5;
#pragma unroll 1
    for (long long base = (((long long)blockIdx.x * dpg::kThreads + threadIdx.x) >> 5) * per_warp;
         base < items; base += warps * per_warp) {
        // warp-uniform trip count: lanes of an item past the end join the shuffles with amax 0
        const long long it = base + slot;
        const bool live = it < items;
        long long r = 0, g = 0;
        if (live) {
            if (items <= 0xFFFFFFFFLL) {  // 32-bit division: a 64-bit one costs as much as the group's math
                r = (unsigned int)it / (unsigned int)groups;
                g = (unsigned int)it - (unsigned int)r * (unsigned int)groups;
            } else {
                r = it / groups;
                g = it - r * groups;
            }
        }
        const uint4* s = src + ((src_start + r) * width + g * group) / kVec;
        unsigned int m = 0u;
        uint4 first = make_uint4(0u, 0u, 0u, 0u);
        if (live) {
            for (long long c = 0; c < chunks; ++c) {
                const uint4 v = s[c * lanes + sub];
                if (c == 0) first = v;
                const Bits* b = reinterpret_cast<const Bits*>(&v);
#pragma unroll
                for (int k = 0; k < kVec; ++k) {
                    const unsigned int a = __float_as_uint(Src::f(b[k])) & 0x7FFFFFFFu;
                    m = max(m, a > 0x7F800000u ? 0u : a);
                }
            }
        }
        for (int o = lanes >> 1; o; o >>= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
        if (!live) continue;
        const unsigned int sb = dpg::scale_bits(m, pow2);
        const dpg::Divide div(sb);
        unsigned char* q = dst + (dst_start + r) * wire;
        for (long long c = 0; c < chunks; ++c) {
            const uint4 v = c == 0 ? first : s[c * lanes + sub];
            const Bits* b = reinterpret_cast<const Bits*>(&v);
            unsigned int w[kVec / 4];
#pragma unroll
            for (int k = 0; k < kVec / 4; ++k) w[k] = 0u;
#pragma unroll
            for (int k = 0; k < kVec; k += 2) {
                const float x0 = Src::f(b[k]), x1 = Src::f(b[k + 1]);
                w[k / 4] |= dpg::e4m3x2(sb ? div(x0) : x0, sb ? div(x1) : x1) << (8 * (k % 4));
            }
            unsigned char* o = q + g * group + (c * lanes + sub) * kVec;
            if (kVec == 8)
                *reinterpret_cast<uint2*>(o) = make_uint2(w[0], w[kVec / 4 - 1]);
            else
                *reinterpret_cast<unsigned int*>(o) = w[0];
        }
        if (sub == 0) *reinterpret_cast<unsigned int*>(q + width + 4 * g) = sb;
    }
    dpg::zero_rows(dst + (dst_start + valid) * wire, (rows - valid) * wire, wire);
}
