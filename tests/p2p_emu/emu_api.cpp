// kernels/p2p.cu run on the CPU: a fiber scheduler for CUDA blocks and a C API for ctypes.
//
// Build (tests/p2p_emu/__init__.py does it):
//   g++ -std=c++17 -O1 -shared -fPIC -pthread -DDPG_P2P_EMULATION -I kernels
//       tests/p2p_emu/emu_api.cpp -o libp2pemu.so
//
// emu_launch() runs one collective: for every rank r with launch[r] != 0, `grid` OS threads
// (one per block) each run the 256 threads of their block as ucontext fibers. All ranks' blocks
// run at the same time and are joined before it returns.
#include "emu.h"
// the kernel under test, as the GPU compiles it (minus the PTX helpers emu.h replaces)
#include "p2p.cu"

#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <thread>
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

// Run `body` as the kThreads threads of block `bx` of a `grid`-block launch on this OS thread.
void run_block(unsigned int bx, unsigned int grid, const std::function<void()>& body) {
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
        for (int i = 0; i < kBlock; ++i) {
            if (b->state[i] != Block::kRunnable) continue;
            b->cur = i;
            threadIdx = dim3{(unsigned int)i, 0, 0};
            swapcontext(&b->sched, &b->ctx[i]);
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

struct Launch {
    const void* inp;
    long long in_rows;
    void* out;
    long long out_rows;
    const long long* desc;
    long long desc_off, desc_len, row_bytes;
    unsigned char* const* windows;
    int me, nranks;
    long long data_off, cap_bytes;
    int* host_err;
    long long timeout_ns;
};

template <typename E, typename V>
void call(const Launch& a) {
    p2p_pull<E, V>(static_cast<const V*>(a.inp), a.in_rows, static_cast<V*>(a.out), a.out_rows,
                   a.desc, a.desc_off, a.desc_len, a.row_bytes, a.windows, a.me, a.nranks,
                   a.data_off, a.cap_bytes, a.host_err, a.timeout_ns);
}

using Fn = void (*)(const Launch&);

#define DPG_ENTRY(E, V) {"p2p_pull<" #E ", " #V ">", &call<E, V>}
struct Entry {
    const char* name;
    Fn fn;
};
const Entry kTable[] = {
    DPG_ENTRY(float, uint4), DPG_ENTRY(float, uint2), DPG_ENTRY(float, unsigned int),
    {"p2p_pull<__half, uint4>", &call<__half, uint4>},
    {"p2p_pull<__half, uint2>", &call<__half, uint2>},
    {"p2p_pull<__half, unsigned int>", &call<__half, unsigned int>},
    {"p2p_pull<__half, unsigned short>", &call<__half, unsigned short>},
    {"p2p_pull<__nv_bfloat16, uint4>", &call<__nv_bfloat16, uint4>},
    {"p2p_pull<__nv_bfloat16, uint2>", &call<__nv_bfloat16, uint2>},
    {"p2p_pull<__nv_bfloat16, unsigned int>", &call<__nv_bfloat16, unsigned int>},
    {"p2p_pull<__nv_bfloat16, unsigned short>", &call<__nv_bfloat16, unsigned short>},
    DPG_ENTRY(int, uint4), DPG_ENTRY(int, uint2), DPG_ENTRY(int, unsigned int),
    {"p2p_pull<long long, uint4>", &call<long long, uint4>},
    {"p2p_pull<long long, uint2>", &call<long long, uint2>},
    {"p2p_pull<unsigned char, uint4>", &call<unsigned char, uint4>},
    {"p2p_pull<unsigned char, uint2>", &call<unsigned char, uint2>},
    {"p2p_pull<unsigned char, unsigned int>", &call<unsigned char, unsigned int>},
    {"p2p_pull<unsigned char, unsigned short>", &call<unsigned char, unsigned short>},
    {"p2p_pull<unsigned char, unsigned char>", &call<unsigned char, unsigned char>},
};

}  // namespace

void __syncthreads() { barrier(1); }
int __syncthreads_count(int pred) { return barrier(pred); }
int __syncthreads_or(int pred) { return barrier(pred) != 0; }

extern "C" {

// Number of specialisations and their names (the test checks they equal NAME_EXPRESSIONS).
int emu_count() { return (int)(sizeof(kTable) / sizeof(kTable[0])); }
const char* emu_name(int i) { return kTable[i].name; }

// One collective of `nranks` ranks; every array argument has one entry per rank. Returns 0, or
// -1 for an unknown specialisation name.
int emu_launch(const char* name, int nranks, int grid, const int* launch, const void* const* inp,
               const long long* in_rows, void* const* out, const long long* out_rows,
               const long long* const* desc, const long long* desc_off, const long long* desc_len,
               long long row_bytes, unsigned char* const* windows, long long data_off,
               long long cap_bytes, int* const* host_err, long long timeout_ns) {
    Fn fn = nullptr;
    for (const Entry& e : kTable)
        if (std::string(e.name) == name) fn = e.fn;
    if (!fn) return -1;
    std::vector<std::thread> threads;
    std::vector<Launch> args(nranks);
    for (int r = 0; r < nranks; ++r) {
        if (!launch[r]) continue;
        args[r] = Launch{inp[r], in_rows[r], out[r], out_rows[r], desc[r], desc_off[r], desc_len[r],
                         row_bytes, windows, r, nranks, data_off, cap_bytes, host_err[r], timeout_ns};
        for (int b = 0; b < grid; ++b) {
            const Launch* a = &args[r];
            threads.emplace_back([fn, a, b, grid] {
                run_block((unsigned int)b, (unsigned int)grid, [fn, a] { fn(*a); });
            });
        }
    }
    for (auto& t : threads) t.join();
    return 0;
}

}  // extern "C"
