// CPU twins of the PTX kernels/push.cu and kernels/dpg_device.cuh use, with adversarial timing.
//
// tests/push_emu/push_api.cpp includes tests/p2p_emu/emu_api.cpp (CUDA on the CPU: fibers as
// threads, __syncthreads, fiber_yield, fp16/bf16, atomics, the global atom_add_acq_rel_gpu and
// the dpg_dev twins of kernels/dpg_device.cuh), then this header, then kernels/push.cu with
// DPG_P2P_EMULATION defined.
//
// What the twins do to the protocol, so that the kernel's logic is tested against the weakest
// behaviour the PTX memory model allows for a line:
//  - st_line: the two 8-byte halves of a 16-byte line are two separate atomic stores, in random
//    order, optionally with a yield between them; a store may also be deferred (kept in the
//    block's buffer and performed later, in random order): lines, and headers against data,
//    arrive out of order. The buffer is flushed at the block's next load and when a thread ends.
//  - ld_line: the two halves are two separate atomic loads in random order, optionally with a
//    yield between them, so a load may see one half of a line new and the other old; then the
//    fiber yields to the other threads of its block (tests/p2p_emu's fiber_yield), so threads
//    of one block poll concurrently, as on the GPU, instead of one spinning while the rest wait.
// Counters (torn loads seen, stores deferred) show that the adversarial paths were taken.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace push_emu {

struct Chaos {
    std::atomic<int> defer_permille{0};  // stores deferred
    std::atomic<int> yield_permille{0};  // yields between the halves of a store or load
    std::atomic<unsigned long long> seed{1};
    std::atomic<long long> torn{0};      // loads whose halves carried different epochs
    std::atomic<long long> deferred{0};  // stores deferred
};
inline Chaos g_chaos;

struct Pending {
    unsigned long long* p;
    unsigned long long lo, hi;
};
inline thread_local std::vector<Pending> tl_pending;  // one OS thread == one block
inline thread_local unsigned long long tl_rng = 0;

inline unsigned long long rnd() {
    if (tl_rng == 0) {
        static std::atomic<unsigned long long> stream{0};
        tl_rng = (g_chaos.seed.load() * 0x9E3779B97F4A7C15ull) ^ (++stream * 0xD1B54A32D192ED03ull) ^ 1ull;
    }
    tl_rng ^= tl_rng << 13;
    tl_rng ^= tl_rng >> 7;
    tl_rng ^= tl_rng << 17;
    return tl_rng;
}
inline bool chance(const std::atomic<int>& permille) {
    const int p = permille.load(std::memory_order_relaxed);
    return p > 0 && (int)(rnd() % 1000) < p;
}

inline void store_halves(const Pending& s) {
    const bool hi_first = rnd() & 1;
    __atomic_store_n(s.p + (hi_first ? 1 : 0), hi_first ? s.hi : s.lo, __ATOMIC_RELAXED);
    if (chance(g_chaos.yield_permille)) sched_yield();
    __atomic_store_n(s.p + (hi_first ? 0 : 1), hi_first ? s.lo : s.hi, __ATOMIC_RELAXED);
}

// Perform every deferred store of this block, in random order.
inline void flush() {
    auto& q = tl_pending;
    for (size_t i = q.size(); i > 1; --i) std::swap(q[i - 1], q[rnd() % i]);
    for (const Pending& s : q) store_halves(s);
    q.clear();
}

}  // namespace push_emu

namespace dpg_push {
inline void st_line(unsigned long long* p, unsigned long long lo, unsigned long long hi) {
    if (push_emu::chance(push_emu::g_chaos.defer_permille)) {
        push_emu::tl_pending.push_back({p, lo, hi});
        ++push_emu::g_chaos.deferred;
        if (push_emu::tl_pending.size() >= 64) push_emu::flush();
        return;
    }
    push_emu::store_halves({p, lo, hi});
}
inline void ld_line(const unsigned long long* p, unsigned long long& lo, unsigned long long& hi) {
    push_emu::flush();
    const bool hi_first = push_emu::rnd() & 1;
    unsigned long long a = __atomic_load_n(p + (hi_first ? 1 : 0), __ATOMIC_RELAXED);
    if (push_emu::chance(push_emu::g_chaos.yield_permille)) sched_yield();
    unsigned long long b = __atomic_load_n(p + (hi_first ? 0 : 1), __ATOMIC_RELAXED);
    lo = hi_first ? b : a;
    hi = hi_first ? a : b;
    if ((lo >> 32) != (hi >> 32)) ++push_emu::g_chaos.torn;
    fiber_yield();  // every poll: the block's other threads run meanwhile, as on the GPU
}
inline void pdl_wait() {}
inline void pdl_launch_dependents() {}
}  // namespace dpg_push
