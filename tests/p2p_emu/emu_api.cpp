// kernels/pull.cu run on the CPU: a fiber scheduler for CUDA blocks and a C API for ctypes.
//
// Build (tests/p2p_emu/__init__.py does it):
//   g++ -std=c++17 -O1 -shared -fPIC -pthread -DDPG_P2P_EMULATION -I kernels
//       tests/p2p_emu/emu_api.cpp -o libp2pemu.so
//
// emu_launch_packed() runs one collective: for every rank r with launch[r] != 0, `grid` OS
// threads (one per block) each run the 256 threads of their block as ucontext fibers. All ranks'
// blocks run at the same time and are joined before it returns. Arguments arrive packed in the
// kernel's parameter order, as packed by dpgather.kernels._p2p.call_args + window_args, so the
// Python side's order and types are checked against the kernel's real signature.
#include "emu.h"
// the kernel under test, as the GPU compiles it (minus the PTX helpers emu.h replaces)
#include "pull.cu"

#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

constexpr int kBlock = 256;
constexpr size_t kStack = 64 * 1024;

struct Block {
    enum State { kRunnable, kBarrier, kDone };
    ucontext_t sched{};
    ucontext_t ctx[kBlock];
    State state[kBlock];
    std::unique_ptr<char[]> stacks;  // uninitialised: no 16 MB memset per block
    std::function<void()> body;
    int cur = 0;
    int arrived = 0;
    int live = kBlock;
    int count_acc = 0;
    int count_result = 0;
};

thread_local Block* tl_block = nullptr;
std::atomic<long long> g_stagger_us{0};  // block b starts b * g_stagger_us later (late blocks)

void fiber_entry() {
    Block* b = tl_block;
    b->body();
    b->state[b->cur] = Block::kDone;
    --b->live;
    // returns into b->sched through uc_link
}

int barrier(int pred) {
    Block* b = tl_block;
    const int me = b->cur;
    b->count_acc += pred ? 1 : 0;
    b->state[me] = Block::kBarrier;
    ++b->arrived;
    swapcontext(&b->ctx[me], &b->sched);
    return b->count_result;
}

// Give the other threads of this block a turn without a barrier (threads are otherwise
// switched only at barriers): a thread that spins on memory must not keep its siblings from
// running, as on the GPU. The p2p kernel never calls it; tests/push_emu does, in every poll.
void fiber_yield() {
    Block* b = tl_block;
    swapcontext(&b->ctx[b->cur], &b->sched);
}

// Run `body` as the kThreads threads of block `bx` of a `grid`-block launch on this OS thread.
void run_block(unsigned int bx, unsigned int grid, const std::function<void()>& body) {
    if (const long long us = g_stagger_us.load()) std::this_thread::sleep_for(std::chrono::microseconds(us * bx));
    Block* b = new Block();
    b->stacks.reset(new char[kStack * kBlock]);
    b->body = body;
    tl_block = b;
    blockIdx = dim3{bx, 0, 0};
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{(unsigned int)kBlock, 1, 1};
    for (int i = 0; i < kBlock; ++i) {
        getcontext(&b->ctx[i]);
        b->ctx[i].uc_stack.ss_sp = b->stacks.get() + (size_t)i * kStack;
        b->ctx[i].uc_stack.ss_size = kStack;
        b->ctx[i].uc_link = &b->sched;
        makecontext(&b->ctx[i], fiber_entry, 0);
        b->state[i] = Block::kRunnable;
    }
    while (b->live > 0) {
        for (bool again = true; again;) {  // threads that yielded (fiber_yield) run on
            again = false;
            for (int i = 0; i < kBlock; ++i) {
                if (b->state[i] != Block::kRunnable) continue;
                b->cur = i;
                threadIdx = dim3{(unsigned int)i, 0, 0};
                swapcontext(&b->sched, &b->ctx[i]);
                again |= b->state[i] == Block::kRunnable;
            }
        }
        // every live thread is at the barrier (or done): release it
        if (b->live > 0) {
            if (b->arrived != b->live) {
                std::fprintf(stderr, "emu: barrier divergence (%d of %d threads)\n", b->arrived, b->live);
                std::abort();
            }
            b->count_result = b->count_acc;
            b->count_acc = 0;
            b->arrived = 0;
            for (int i = 0; i < kBlock; ++i)
                if (b->state[i] == Block::kBarrier) b->state[i] = Block::kRunnable;
        }
    }
    tl_block = nullptr;
    delete b;
}

// Packed arguments, as cuLaunchKernel (and CuPy) pass them: a[i] points at the value of the
// kernel's i-th parameter. The types and the order come from the kernel's own signature.
template <typename... Args>
constexpr int arity(void (*)(Args...)) {
    return (int)sizeof...(Args);
}
template <typename... Args, size_t... I>
void invoke_packed(void (*fn)(Args...), void* const* a, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_reference_t<Args>*>(a[I])...);
}
template <typename... Args>
void invoke_packed(void (*fn)(Args...), void* const* a) {
    invoke_packed(fn, a, std::index_sequence_for<Args...>{});
}
template <typename E, typename V>
void call_packed(void* const* a) {
    invoke_packed(&p2p_pull<E, V>, a);
}

using PackedFn = void (*)(void* const*);

// One collective: for every rank r with launch[r] != 0, `grid` OS threads (one per block,
// starting delay_us[r] microseconds late when delay_us is given) run kernel `fn` with the
// arguments params[r], then `after` (when given) in each thread; all are joined.
void run_ranks(PackedFn fn, int nranks, int grid, const int* launch, const long long* delay_us,
               void* const* const* params, void (*after)()) {
    std::vector<std::thread> threads;
    for (int r = 0; r < nranks; ++r) {
        if (!launch[r]) continue;
        void* const* a = params[r];
        const long long delay = delay_us ? delay_us[r] : 0;
        for (int b = 0; b < grid; ++b)
            threads.emplace_back([fn, a, b, grid, delay, after] {
                if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
                run_block((unsigned int)b, (unsigned int)grid, [fn, a, after] {
                    fn(a);
                    if (after) after();
                });
            });
    }
    for (auto& t : threads) t.join();
}

#define DPG_ENTRY(E, V) {"p2p_pull<" #E ", " #V ">", &call_packed<E, V>}
struct Entry {
    const char* name;
    PackedFn packed;
};
const Entry kTable[] = {
    DPG_ENTRY(float, uint4), DPG_ENTRY(float, uint2), DPG_ENTRY(float, unsigned int),
    {"p2p_pull<__half, uint4>", &call_packed<__half, uint4>},
    {"p2p_pull<__half, uint2>", &call_packed<__half, uint2>},
    {"p2p_pull<__half, unsigned int>", &call_packed<__half, unsigned int>},
    {"p2p_pull<__half, unsigned short>", &call_packed<__half, unsigned short>},
    {"p2p_pull<__nv_bfloat16, uint4>", &call_packed<__nv_bfloat16, uint4>},
    {"p2p_pull<__nv_bfloat16, uint2>", &call_packed<__nv_bfloat16, uint2>},
    {"p2p_pull<__nv_bfloat16, unsigned int>", &call_packed<__nv_bfloat16, unsigned int>},
    {"p2p_pull<__nv_bfloat16, unsigned short>", &call_packed<__nv_bfloat16, unsigned short>},
    DPG_ENTRY(int, uint4), DPG_ENTRY(int, uint2), DPG_ENTRY(int, unsigned int),
    {"p2p_pull<long long, uint4>", &call_packed<long long, uint4>},
    {"p2p_pull<long long, uint2>", &call_packed<long long, uint2>},
    {"p2p_pull<unsigned char, uint4>", &call_packed<unsigned char, uint4>},
    {"p2p_pull<unsigned char, uint2>", &call_packed<unsigned char, uint2>},
    {"p2p_pull<unsigned char, unsigned int>", &call_packed<unsigned char, unsigned int>},
    {"p2p_pull<unsigned char, unsigned short>", &call_packed<unsigned char, unsigned short>},
    {"p2p_pull<unsigned char, unsigned char>", &call_packed<unsigned char, unsigned char>},
};

}  // namespace

void __syncthreads() { barrier(1); }
int __syncthreads_count(int pred) { return barrier(pred); }
int __syncthreads_or(int pred) { return barrier(pred) != 0; }

extern "C" {

// Number of specialisations and their names (the test checks they equal NAME_EXPRESSIONS).
int emu_count() { return (int)(sizeof(kTable) / sizeof(kTable[0])); }
const char* emu_name(int i) { return kTable[i].name; }

// Delay the start of block b by b * us microseconds (0: no delay), to model late blocks.
void emu_set_stagger(long long us) { g_stagger_us.store(us); }

// Number of kernel parameters (what emu_launch_packed expects per rank).
int emu_arity() { return arity(&p2p_pull<float, uint4>); }

// One collective of `nranks` ranks: for every rank r with launch[r] != 0, `grid` blocks of
// kernel `name` with the arguments packed as cuLaunchKernel takes them: params[r][i] points at
// the value of parameter i. Returns 0, or -1 for an unknown specialisation name.
int emu_launch_packed(const char* name, int nranks, int grid, const int* launch,
                      void* const* const* params) {
    PackedFn fn = nullptr;
    for (const Entry& e : kTable)
        if (std::string(e.name) == name) fn = e.packed;
    if (!fn) return -1;
    run_ranks(fn, nranks, grid, launch, nullptr, params, nullptr);
    return 0;
}

}  // extern "C"
