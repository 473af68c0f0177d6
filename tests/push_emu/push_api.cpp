// kernels/push.cu run on the CPU: the fiber scheduler of tests/p2p_emu and a C API for ctypes.
//
// Build (tests/push_emu/__init__.py does it):
//   g++ -std=c++17 -O1 -shared -fPIC -pthread -DDPG_P2P_EMULATION -I kernels
//       tests/push_emu/push_api.cpp -o libpushemu.so
//
// push_launch_packed() runs one collective: for every rank r with launch[r] != 0, `grid` OS
// threads (one per block, each starting delay_us[r] late) run the 256 threads of their block as
// fibers; all ranks' blocks run at once and are joined before it returns. Arguments arrive
// packed in the kernel's parameter order, as dpgather.kernels._p2p.PackedParams (or CuPy) packs them.
#include "../p2p_emu/emu_api.cpp"  // emu.h, the pull kernel's table, run_ranks and invoke_packed
#include "push_emu.h"
// the kernel under test, as the GPU compiles it (minus the PTX helpers push_emu.h replaces)
#include "push.cu"

namespace {

template <typename E, typename V>
void push_packed(void* const* a) {
    invoke_packed(&p2p_push<E, V>, a);
}

struct PushEntry {
    const char* name;
    PackedFn packed;
};
#define DPG_PUSH_ENTRY(E, V) {"p2p_push<" #E ", " #V ">", &push_packed<E, V>}
const PushEntry kPushTable[] = {
    DPG_PUSH_ENTRY(float, uint2), DPG_PUSH_ENTRY(float, unsigned int),
    {"p2p_push<__half, uint2>", &push_packed<__half, uint2>},
    {"p2p_push<__half, unsigned int>", &push_packed<__half, unsigned int>},
    {"p2p_push<__half, unsigned short>", &push_packed<__half, unsigned short>},
    {"p2p_push<__nv_bfloat16, uint2>", &push_packed<__nv_bfloat16, uint2>},
    {"p2p_push<__nv_bfloat16, unsigned int>", &push_packed<__nv_bfloat16, unsigned int>},
    {"p2p_push<__nv_bfloat16, unsigned short>", &push_packed<__nv_bfloat16, unsigned short>},
    DPG_PUSH_ENTRY(int, uint2), DPG_PUSH_ENTRY(int, unsigned int),
    {"p2p_push<long long, uint2>", &push_packed<long long, uint2>},
    {"p2p_push<unsigned char, uint2>", &push_packed<unsigned char, uint2>},
    {"p2p_push<unsigned char, unsigned int>", &push_packed<unsigned char, unsigned int>},
    {"p2p_push<unsigned char, unsigned short>", &push_packed<unsigned char, unsigned short>},
    {"p2p_push<unsigned char, unsigned char>", &push_packed<unsigned char, unsigned char>},
};

}  // namespace

extern "C" {

int push_count() { return (int)(sizeof(kPushTable) / sizeof(kPushTable[0])); }
const char* push_name(int i) { return kPushTable[i].name; }
int push_arity() { return arity(&p2p_push<float, uint2>); }

// Adversarial timing (push_emu.h): per mille of stores deferred, of halves split by a yield.
void push_set_chaos(int defer_permille, int yield_permille, unsigned long long seed) {
    push_emu::g_chaos.defer_permille = defer_permille;
    push_emu::g_chaos.yield_permille = yield_permille;
    push_emu::g_chaos.seed = seed ? seed : 1;
}

// Torn loads seen and stores deferred since the library was loaded.
void push_stats(long long* out) {
    out[0] = push_emu::g_chaos.torn.load();
    out[1] = push_emu::g_chaos.deferred.load();
}

// One collective of `nranks` ranks (see the file comment). Returns 0, or -1 for an unknown name.
int push_launch_packed(const char* name, int nranks, int grid, const int* launch, const long long* delay_us,
                       void* const* const* params) {
    PackedFn fn = nullptr;
    for (const PushEntry& e : kPushTable)
        if (std::string(e.name) == name) fn = e.packed;
    if (!fn) return -1;
    // a thread's deferred stores land before its block ends
    run_ranks(fn, nranks, grid, launch, delay_us, params, &push_emu::flush);
    return 0;
}

}  // extern "C"
