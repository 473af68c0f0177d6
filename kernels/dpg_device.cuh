/*************************************************************************
 * dpgather kernels/dpg_device.cuh -- device code shared by the kernels.
 *
 * Included by kernels/pull.cu, kernels/push.cu and kernels/copy.cu (the fp8 quantizing pack
 * uses div_f32 and mul_f32 only; kernels._cuda.CudaSource inlines quoted .cuh
 * includes, so NVRTC always compiles one self-contained text). Holds what both kernels share:
 *  - Elem<E>: the arithmetic of sums on raw element bits (float16/bfloat16 accumulate in
 *    fp32 and round once; integer sums wrap modulo 2^bits);
 *  - descriptor index helpers (negative entries count as 0, indices clamped to +-(2^31 - 1));
 *  - PTX wrappers: %globaltimer, volatile 64-bit state words; the acq_rel block counter;
 *  - the error word's halves (committed | pending << 32) and the commit by a launch's last block.
 * Under DPG_P2P_EMULATION (the CPU emulation in tests/, never defined by the loader) the PTX
 * wrappers come from the emulator instead.
 *************************************************************************/
#ifndef DPG_DEVICE_CUH
#define DPG_DEVICE_CUH

#ifndef DPG_P2P_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

namespace dpg_dev {

constexpr long long kIndexMax = 2147483647LL;

__device__ __forceinline__ long long nonneg(long long x) { return x < 0 ? 0 : x; }
__device__ __forceinline__ long long min2(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }
// Clamped to +-(2^31 - 1): first + k * stride (k < 2^8) cannot overflow.
__device__ __forceinline__ long long clamp_index(long long x) {
    return x > kIndexMax ? kIndexMax : (x < -kIndexMax ? -kIndexMax : x);
}

#ifndef DPG_P2P_EMULATION
__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ unsigned long long ld_volatile_u64(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_volatile_u64(unsigned long long* p, unsigned long long v) {
    asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Release this thread's (and what it observed of other blocks') accesses, acquire theirs.
__device__ __forceinline__ unsigned long long atom_add_acq_rel_gpu(unsigned long long* p,
                                                                   unsigned long long v) {
    unsigned long long old;
    asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
    return old;
}
#endif  // DPG_P2P_EMULATION

// fp32 addition that keeps subnormals. CuPy appends -ftz=true to every NVRTC compile, after
// the caller's options, so a plain `+` on floats becomes add.ftz.f32 and flushes subnormal
// operands and sums to zero; the reference, the host backend and NCCL keep them (an inline
// add.rn.f32 is emitted as written).
__device__ __forceinline__ float add_f32(float a, float b) {
#ifdef DPG_P2P_EMULATION
    return a + b;
#else
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#endif
}

// fp32 division rounded to nearest even that keeps subnormals (the -ftz=true above applies to
// `/` too): the quantized gather's scales and quotients, bit for bit the host's (docs/fp8.md).
__device__ __forceinline__ float div_f32(float a, float b) {
#ifdef DPG_P2P_EMULATION
    return a / b;
#else
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#endif
}

// fp32 product rounded to nearest even that keeps subnormals (mul.ftz.f32 would flush them).
__device__ __forceinline__ float mul_f32(float a, float b) {
#ifdef DPG_P2P_EMULATION
    return a * b;
#else
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#endif
}

// Element arithmetic on raw bits: Bits is the storage of E, Acc the accumulator, add() the
// sum's step (IEEE fp32 for the float types, wrapping for the integers).
template <typename E>
struct Elem;
template <>
struct Elem<float> {
    using Bits = unsigned int;
    using Acc = float;
    static __device__ __forceinline__ Acc load(Bits b) { return __uint_as_float(b); }
    static __device__ __forceinline__ Bits store(Acc a) { return __float_as_uint(a); }
    static __device__ __forceinline__ Acc add(Acc a, Acc b) { return add_f32(a, b); }
};
template <>
struct Elem<__half> {
    using Bits = unsigned short;
    using Acc = float;
    static __device__ __forceinline__ Acc load(Bits b) { return __half2float(__ushort_as_half(b)); }
    static __device__ __forceinline__ Bits store(Acc a) { return __half_as_ushort(__float2half_rn(a)); }
    static __device__ __forceinline__ Acc add(Acc a, Acc b) { return add_f32(a, b); }
};
template <>
struct Elem<__nv_bfloat16> {
    using Bits = unsigned short;
    using Acc = float;
    static __device__ __forceinline__ Acc load(Bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
    static __device__ __forceinline__ Bits store(Acc a) { return __bfloat16_as_ushort(__float2bfloat16_rn(a)); }
    static __device__ __forceinline__ Acc add(Acc a, Acc b) { return add_f32(a, b); }
};
template <>
struct Elem<int> {  // unsigned accumulation: wraps modulo 2^32 (signed overflow is UB)
    using Bits = unsigned int;
    using Acc = unsigned int;
    static __device__ __forceinline__ Acc load(Bits b) { return b; }
    static __device__ __forceinline__ Bits store(Acc a) { return a; }
    static __device__ __forceinline__ Acc add(Acc a, Acc b) { return a + b; }
};
template <>
struct Elem<long long> {
    using Bits = unsigned long long;
    using Acc = unsigned long long;
    static __device__ __forceinline__ Acc load(Bits b) { return b; }
    static __device__ __forceinline__ Bits store(Acc a) { return a; }
    static __device__ __forceinline__ Acc add(Acc a, Acc b) { return a + b; }
};
template <>
struct Elem<unsigned char> {
    using Bits = unsigned char;
    using Acc = unsigned int;
    static __device__ __forceinline__ Acc load(Bits b) { return b; }
    static __device__ __forceinline__ Bits store(Acc a) { return (unsigned char)(a & 0xFFu); }
    static __device__ __forceinline__ Acc add(Acc a, Acc b) { return a + b; }
};

// The high half of a state word holding "committed code | pending code << 32".
__device__ __forceinline__ unsigned int* pending_half(unsigned long long* word) {
    return reinterpret_cast<unsigned int*>(word) + 1;  // little-endian: high word
}

// Called once by thread 0 of each of the G active blocks of a launch: true in the last block to
// arrive, which resets the counter for the next launch. The acq_rel add orders every block's
// accesses before the last block's later ones. One block needs no counter.
__device__ __forceinline__ bool last_block(unsigned long long* counter, long long G) {
    if (G == 1) return true;
    if (atom_add_acq_rel_gpu(counter, 1ull) != (unsigned long long)(G - 1)) return false;
    st_volatile_u64(counter, 0ull);
    return true;
}

// By the last block of a launch: commit the launch's pending error, if any, to the low half of
// `err` (later launches refuse) and to the pinned host word; returns it (0: none).
__device__ __forceinline__ unsigned int commit_pending(unsigned long long* err, int* host_err) {
    const unsigned int code = atomicAdd(pending_half(err), 0u);
    if (code != 0) {
        st_volatile_u64(err, ((unsigned long long)code << 32) | code);
        *(volatile int*)host_err = (int)code;
        __threadfence_system();
    }
    return code;
}

}  // namespace dpg_dev

#endif  // DPG_DEVICE_CUH
