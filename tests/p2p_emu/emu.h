// CPU emulation of the CUDA features kernels/pull.cu (and kernels/push.cu, with
// tests/push_emu/push_emu.h) use, so their logic runs on any x86-64 box.
//
// tests/p2p_emu/emu_api.cpp includes this header, then kernels/pull.cu with DPG_P2P_EMULATION
// defined (which drops the CUDA headers and the inline PTX, replaced here). A block is one OS
// thread running its 256 CUDA threads as ucontext fibers that switch at every __syncthreads*;
// __shared__ variables are thread_local (one OS thread = one block); the blocks of every rank
// run concurrently, so the arrive/wait/depart protocol between blocks and ranks is exercised
// for real. What this cannot show: the GPU memory model (x86 is TSO), PTX correctness (checked
// by ptxas in tests/test_cuda_compile.py), performance.
#pragma once

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct dim3 {
    unsigned int x = 0, y = 0, z = 0;
};
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct __half {
    unsigned short x;
};
struct __nv_bfloat16 {
    unsigned short x;
};

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline float __half2float(__half h) {
    const unsigned int sign = (h.x & 0x8000u) << 16;
    unsigned int exp = (h.x >> 10) & 0x1f, mant = h.x & 0x3ff;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return __uint_as_float(sign);
        int e = -1;
        do {  // normalise the subnormal
            mant <<= 1;
            ++e;
        } while (!(mant & 0x400));
        return __uint_as_float(sign | ((112u - e) << 23) | ((mant & 0x3ff) << 13));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline __half __float2half_rn(float f) {  // round to nearest even, as cvt.rn.f16.f32
    const unsigned int x = __float_as_uint(f);
    const unsigned short sign = (x >> 16) & 0x8000;
    unsigned int mant = x & 0x7fffff;
    const int exp = (x >> 23) & 0xff;
    if (exp == 0xff) return __half{(unsigned short)(sign | 0x7c00 | (mant ? 0x200 : 0))};
    const int e = exp - 127 + 15;
    if (e >= 31) return __half{(unsigned short)(sign | 0x7c00)};
    if (e <= 0) {
        if (e < -10) return __half{sign};
        mant |= 0x800000;
        const int shift = 14 - e;
        unsigned int r = mant >> shift;
        const unsigned int rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) ++r;
        return __half{(unsigned short)(sign | r)};
    }
    unsigned int r = ((unsigned int)e << 10) | (mant >> 13);
    const unsigned int rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;  // a carry rounds up to inf correctly
    return __half{(unsigned short)(sign | r)};
}

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned int)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffff) > 0x7f800000) return __nv_bfloat16{(unsigned short)((x >> 16) | 0x40)};
    return __nv_bfloat16{(unsigned short)((x + 0x7fff + ((x >> 16) & 1)) >> 16)};
}

// Block-wide barriers of the fiber scheduler (emu_api.cpp).
void __syncthreads();
int __syncthreads_count(int pred);
int __syncthreads_or(int pred);

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned int) { sched_yield(); }
[[noreturn]] inline void __trap() { std::abort(); }

inline unsigned long long atom_add_acq_rel_gpu(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
inline void fence_acq_rel_sys() { std::atomic_thread_fence(std::memory_order_acq_rel); }

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp,
                                    unsigned long long v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
inline unsigned int atomicCAS(unsigned int* p, unsigned int cmp, unsigned int v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline int atomicCAS(int* p, int cmp, int v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}

// Twins of kernels/dpg_device.cuh's PTX wrappers (both kernels use them).
namespace dpg_dev {
inline unsigned long long globaltimer() {
    return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}
inline unsigned long long ld_volatile_u64(const unsigned long long* p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
inline void st_volatile_u64(unsigned long long* p, unsigned long long v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
}  // namespace dpg_dev

// Twins of kernels/pull.cu's own PTX wrappers.
namespace dpg_pull {
inline unsigned long long ld_acquire_sys(const unsigned long long* p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
inline unsigned long long ld_relaxed_sys(const unsigned long long* p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
inline void st_release_sys(unsigned long long* p, unsigned long long v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
template <typename V>
inline V ld_window(const V* p) {
    V v;
    std::memcpy(&v, (const void*)p, sizeof(V));
    return v;
}
}  // namespace dpg_pull
