// dwops CUDA emulator: runs the CUDA C++ kernels of dwops/kernels/cuda/*.cuh on the CPU.
//
// Not a general CUDA implementation: exactly what dwops' kernels use, executed with CUDA's
// semantics so that index errors, missing writes, shared-memory races and barrier misuse show up
// as wrong answers or errors on a machine without a GPU.
//
// * Every CUDA thread of a block is a fiber (ucontext) with its own guarded stack; the blocks of
//   the grid run one after another. __syncthreads() suspends the fiber until every thread of the
//   block that has not exited reaches a barrier; the barrier counts must then agree (a divergent
//   __syncthreads is an error). __shfl_xor_sync suspends until the whole warp (32 lanes, none
//   exited) arrives.
// * Between barriers the fibers run one at a time, in thread order or in reverse thread order
//   (`order`; the reverse run also takes the blocks in reverse order): a kernel whose result
//   depends on that order has a race, within a block or between blocks.
// * Dynamic shared memory (`smem_raw`) is a fresh mapping per launch, filled with 0xFF bytes (NaN)
//   before each block, and ends at a PROT_NONE page: reading or writing past the size the host
//   asked for faults.
// * __shared__ arrays become static storage: valid because blocks never overlap in time.
// * A memory fault (guard pages: past an allocation, past the dynamic shared memory, a fiber stack
//   overflow) inside a launch ends the launch with an error naming the address, instead of
//   killing the process.
// * The source is compiled with -fsanitize=alignment and the handler below: an access through a
//   pointer not aligned for its type (a 16-byte Pack from an address that is not a multiple of 16,
//   which faults on a GPU but not on x86) is an error.
// * cp.async (common.cuh's cp_async / cp_async_commit / cp_async_wait helpers, provided here under
//   DWOPS_HOST_CP_ASYNC): a copy reads its source when issued; it writes shared memory at the
//   latest moment the hardware allows in the forward run (when the issuing thread waits for its
//   group: cp_async_wait<N> lands every committed group but the N newest, oldest first) and at
//   the earliest (at issue) in the reverse run. The zero-fill form writes zeros. A kernel that
//   reads staged data without the wait reads the poisoned bytes in the forward run, and one that
//   overwrites a buffer other threads may still read (a missing barrier before restaging) reads
//   the new data in the reverse run: either way the two runs differ, which is reported as a race.
//   Copies still pending when a thread exits are dropped. Destinations must lie in the dynamic
//   shared memory, sizes be 4, 8 or 16 bytes, both addresses aligned to the size.
// * Compiled with DWEMU_TRACE (a separate build, see trace.h), a launch also records its memory
//   accesses for dwops.cudaemu.tracing().
#pragma once
#include <signal.h>
#include <setjmp.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#ifndef DWEMU_TRACE
#define DWEMU_UNTRACED
#define DWEMU_TRACED_HELPER
#endif
#define DWEMU_EXPORT extern "C" __attribute__((visibility("default")))

using std::erf;
using std::exp;

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

// CUDA's min/max overloads (mixed int / long long arguments promote as in device code)
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type R;
    return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b);
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type R;
    return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b);
}

namespace dwemu {

enum State { RUNNABLE, AT_BARRIER, AT_WARP, EXITED };

struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
    int size;
};

struct Fiber {
    ucontext_t ctx;
    State state;
    uint3 tid;
    int linear;
    long barriers;  // __syncthreads calls so far in this block
    std::vector<AsyncCopy> open;                  // cp.async issued, not yet committed
    std::vector<std::vector<AsyncCopy>> groups;   // committed groups, oldest first
};

static Fiber* cur = nullptr;
static ucontext_t scheduler;
static uint3 g_block;
static dim3 g_bdim, g_gdim;
static unsigned char* g_smem = nullptr;
static size_t g_smem_bytes = 0;
static int g_order = 0;        // 0: forward run, 1: reverse run
static std::vector<Fiber> g_fibers;
static std::vector<unsigned long long> g_lane_value;  // one 8-byte slot per thread (shuffles)
static void (*g_body)(void*) = nullptr;
static void* g_body_arg = nullptr;
static std::string g_error;
static sigjmp_buf g_abort;     // run_grid's exit for a fault or a misaligned access
static bool g_in_launch = false;
}  // namespace dwemu
#ifdef DWEMU_TRACE
#include "trace.h"
#endif
namespace dwemu {

const size_t STACK_BYTES = 256 * 1024;
static std::vector<char*> g_stacks;  // STACK_BYTES each, a PROT_NONE page below; per launch

static void release_stacks() {
    const size_t pg = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (char* s : g_stacks) munmap(s - pg, STACK_BYTES + pg);
    g_stacks.clear();
}

static size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

static char* stack_for(size_t i) {
    while (g_stacks.size() <= i) {
        const size_t pg = page_size();
        char* base = static_cast<char*>(mmap(nullptr, STACK_BYTES + pg, PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (base == MAP_FAILED) return nullptr;
        mprotect(base, pg, PROT_NONE);  // stack overflow faults instead of corrupting
        g_stacks.push_back(base + pg);
    }
    return g_stacks[i];
}

static void fiber_entry() {
    g_body(g_body_arg);
    cur->state = EXITED;  // returning resumes the scheduler through uc_link
}

inline void suspend(State s) {
    cur->state = s;
    swapcontext(&cur->ctx, &scheduler);
}

inline std::string where(const Fiber& f) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", g_block.x, g_block.y,
                  g_block.z, f.tid.x, f.tid.y, f.tid.z);
    return buf;
}

// Release whatever barrier is complete; false when nothing can run (deadlock or done).
inline bool release(int n) {
    bool any = false;
    for (int w0 = 0; w0 < n; w0 += 32) {  // warp-level rendezvous (shuffles)
        const int w1 = std::min(n, w0 + 32);
        bool all = true, some = false;
        for (int i = w0; i < w1; ++i) {
            if (g_fibers[i].state == AT_WARP) some = true;
            else all = false;
        }
        if (some && all) {
            if (w1 - w0 != 32) {
                g_error = "warp shuffle in a partial warp: " + where(g_fibers[w0]);
                return false;
            }
            for (int i = w0; i < w1; ++i) g_fibers[i].state = RUNNABLE;
            any = true;
        } else if (some) {
            for (int i = w0; i < w1; ++i) {
                if (g_fibers[i].state == EXITED) {
                    g_error = "warp shuffle with exited lanes in the warp: " + where(g_fibers[i]);
                    return false;
                }
            }
        }
    }
    if (any) return true;
    long count = -1;
    bool waiting = false;
    for (int i = 0; i < n; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.state == EXITED) continue;
        if (f.state != AT_BARRIER) return false;  // some lane waits at a shuffle: deadlock
        waiting = true;
        if (count >= 0 && f.barriers != count) {
            g_error = "divergent __syncthreads (different barrier counts): " + where(f);
            return false;
        }
        count = f.barriers;
    }
    if (!waiting) return false;
    for (int i = 0; i < n; ++i)
        if (g_fibers[i].state == AT_BARRIER) g_fibers[i].state = RUNNABLE;
    return true;
}

// Run one block to completion; false (with g_error) on a barrier error.
inline bool run_block(int n, int order) {
    for (int i = 0; i < n; ++i) {
        Fiber& f = g_fibers[i];
        f.linear = i;
        f.tid.x = i % g_bdim.x;
        f.tid.y = (i / g_bdim.x) % g_bdim.y;
        f.tid.z = i / (g_bdim.x * g_bdim.y);
        f.state = RUNNABLE;
        f.barriers = 0;
        f.open.clear();
        f.groups.clear();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stack_for(i);
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    for (;;) {
        for (int k = 0; k < n; ++k) {
            Fiber& f = g_fibers[order ? n - 1 - k : k];
            if (f.state != RUNNABLE) continue;
            cur = &f;
            swapcontext(&scheduler, &f.ctx);
        }
#ifdef DWEMU_TRACE
        tr::flush(n);  // every thread is at a barrier, at a shuffle or has exited
#endif
        bool done = true;
        for (int i = 0; i < n; ++i) done = done && g_fibers[i].state == EXITED;
        if (done) return true;
        if (!release(n)) {
            if (g_error.empty()) {
                for (int i = 0; i < n; ++i) {
                    if (g_fibers[i].state == AT_WARP) {
                        g_error = "deadlock: a warp shuffle while other lanes wait at "
                                  "__syncthreads: " + where(g_fibers[i]);
                        break;
                    }
                }
                if (g_error.empty()) g_error = "deadlock in the block scheduler";
            }
            return false;
        }
    }
}

inline void on_fault(int sig, siginfo_t* si, void*) {
    if (!g_in_launch) {  // not ours: default action
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    char buf[200];
    std::snprintf(buf, sizeof buf, "invalid memory access (%s) at address 0x%llx, %s",
                  sig == SIGSEGV ? "SIGSEGV" : "SIGBUS",
                  (unsigned long long)reinterpret_cast<uintptr_t>(si->si_addr),
                  cur ? where(*cur).c_str() : "");
    if (g_error.empty()) g_error = buf;
    siglongjmp(g_abort, 1);
}

// Run a grid; 0 on success, else 1 with the message in err.
inline int run_grid(dim3 grid, dim3 block, size_t shared, int order, void (*body)(void*),
                    void* arg, char* err, int errlen) {
    g_error.clear();
    const int n = static_cast<int>(block.x * block.y * block.z);
    g_fibers.assign(n, Fiber());
    g_lane_value.assign(n, 0);
    for (int i = 0; i < n; ++i) {
        if (!stack_for(i)) {
            release_stacks();
            std::snprintf(err, errlen, "cannot map fiber stacks");
            return 1;
        }
    }
    const size_t pg = page_size();
    const size_t body_bytes = (shared + pg - 1) / pg * pg;
    char* map = static_cast<char*>(mmap(nullptr, body_bytes + pg, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map == MAP_FAILED) {
        release_stacks();
        std::snprintf(err, errlen, "cannot map shared memory");
        return 1;
    }
    mprotect(map + body_bytes, pg, PROT_NONE);
    const size_t shared16 = (shared + 15) / 16 * 16;
    g_smem = reinterpret_cast<unsigned char*>(map + body_bytes - shared16);
    g_smem_bytes = shared16;
    g_order = order;
    g_bdim = block;
    g_gdim = grid;
    g_body = body;
    g_body_arg = arg;
    static char alt_stack[1 << 16];
    stack_t ss{}, old_ss{};
    ss.ss_sp = alt_stack;
    ss.ss_size = sizeof alt_stack;
    sigaltstack(&ss, &old_ss);
    struct sigaction sa{}, old_segv{}, old_bus{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    volatile int rc = 0;
    g_in_launch = true;
    if (sigsetjmp(g_abort, 1) == 0) {
        for (unsigned bz = 0; bz < grid.z && !rc; ++bz)
            for (unsigned by = 0; by < grid.y && !rc; ++by)
                for (unsigned bx = 0; bx < grid.x && !rc; ++bx) {
#ifdef DWEMU_TRACE
                    if (!tr::keep_block((static_cast<long long>(bz) * grid.y + by) * grid.x + bx,
                                        static_cast<long long>(grid.x) * grid.y * grid.z))
                        continue;
#endif
                    g_block.x = order ? grid.x - 1 - bx : bx;  // reverse order: blocks too
                    g_block.y = order ? grid.y - 1 - by : by;
                    g_block.z = order ? grid.z - 1 - bz : bz;
                    std::memset(g_smem, 0xFF, shared16);
#ifdef DWEMU_TRACE
                    tr::block_start(n);
#endif
                    if (!run_block(n, order) || !g_error.empty()) rc = 1;
#ifdef DWEMU_TRACE
                    if (!rc) tr::block_end(n);
#endif
                }
    } else {
        rc = 1;
    }
    g_in_launch = false;
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_ss, nullptr);
    munmap(map, body_bytes + pg);
    release_stacks();  // every loaded kernel library would otherwise hold its own stacks
    g_smem = nullptr;
    g_smem_bytes = 0;
    if (rc) std::snprintf(err, errlen, "%s", g_error.c_str());
    return rc;
}

// ----------------------------------------------------------------------- kernel arguments

template <typename... A>
struct Call {
    void (*f)(A...);
    std::tuple<typename std::decay<A>::type...> args;
    static void body(void* p) {
        Call* c = static_cast<Call*>(p);
        std::apply(c->f, c->args);
    }
};

template <typename... A, size_t... I>
int launch_impl(void (*f)(A...), void** args, std::index_sequence<I...>, dim3 grid, dim3 block,
                size_t shared, int order, char* err, int errlen) {
    Call<A...> c{f, std::tuple<typename std::decay<A>::type...>(
                        *static_cast<typename std::decay<A>::type*>(args[I])...)};
    return run_grid(grid, block, shared, order, &Call<A...>::body, &c, err, errlen);
}

template <typename... A>
int launch(void (*f)(A...), void** args, dim3 grid, dim3 block, size_t shared, int order,
           char* err, int errlen) {
    return launch_impl(f, args, std::index_sequence_for<A...>{}, grid, block, shared, order, err,
                       errlen);
}

// Parameter kinds: 0 pointer, 1 signed integer, 2 unsigned integer, 3 floating point.
template <typename P>
constexpr int kind() {
    return std::is_pointer<P>::value ? 0 : std::is_floating_point<P>::value ? 3
                                         : std::is_signed<P>::value         ? 1
                                                                            : 2;
}

template <typename... A>
int params(void (*)(A...), int* sizes, int* kinds, int cap) {
    const int s[] = {static_cast<int>(sizeof(A))..., 0};
    const int k[] = {kind<A>()..., 0};
    const int n = static_cast<int>(sizeof...(A));
    for (int i = 0; i < n && i < cap; ++i) {
        sizes[i] = s[i];
        kinds[i] = k[i];
    }
    return n;
}

}  // namespace dwemu

// UBSan's alignment check calls these (no libubsan: the emulator reports through g_error).
namespace dwemu {
struct SourceLocation {
    const char* file;
    unsigned line, column;
};
struct TypeMismatch {
    SourceLocation loc;
    const void* type;
    unsigned char log_alignment;
    unsigned char kind;  // 0 load, 1 store, others: reference binding, member access, ...
};
inline void misaligned(TypeMismatch* d, uintptr_t ptr) {
    if (!g_error.empty()) return;
    static const char* kinds[] = {"load", "store", "reference binding", "member access",
                                  "member call", "constructor call"};
    char buf[256];
    std::snprintf(buf, sizeof buf, "misaligned %s of address 0x%llx (needs %u-byte alignment) at "
                  "line %u of the emulated source, %s", d->kind < 6 ? kinds[d->kind] : "access",
                  (unsigned long long)ptr, 1u << d->log_alignment, d->loc.line,
                  cur ? where(*cur).c_str() : "");
    g_error = buf;
    if (g_in_launch) siglongjmp(g_abort, 1);  // stop before the access faults or reads garbage
}
}  // namespace dwemu
extern "C" void __ubsan_handle_type_mismatch_v1(dwemu::TypeMismatch* d, uintptr_t ptr) {
    dwemu::misaligned(d, ptr);
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(dwemu::TypeMismatch* d, uintptr_t ptr) {
    dwemu::misaligned(d, ptr);
}

#define threadIdx (dwemu::cur->tid)
#define blockIdx (dwemu::g_block)
#define blockDim (dwemu::g_bdim)
#define gridDim (dwemu::g_gdim)
#define warpSize 32

DWEMU_UNTRACED inline void __syncthreads() {
#ifdef DWEMU_TRACE
    dwemu::tr::consume();
#endif
    ++dwemu::cur->barriers;
    dwemu::suspend(dwemu::AT_BARRIER);
}

template <typename V>
DWEMU_UNTRACED inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
    static_assert(sizeof(V) <= 8, "shuffle of more than 8 bytes");
#ifdef DWEMU_TRACE
    if (dwemu::tr::g_on) {
        dwemu::tr::consume();
        ++dwemu::tr::g_lanes[dwemu::cur->linear].shuffles;
    }
#endif
    if (mask != 0xffffffffu) {
        dwemu::g_error = "__shfl_xor_sync with a partial mask is not emulated";
    }
    const int me = dwemu::cur->linear;
    std::memcpy(&dwemu::g_lane_value[me], &v, sizeof(V));
    dwemu::suspend(dwemu::AT_WARP);  // every lane has stored its value
    const int partner = (me & ~31) | ((me & 31) ^ (lane_mask & 31));
    V r;
    std::memcpy(&r, &dwemu::g_lane_value[partner], sizeof(V));
    dwemu::suspend(dwemu::AT_WARP);  // every lane has read before any slot is overwritten
    return r;
}

// ----------------------------------------------------------------------- cp.async

#define DWOPS_HOST_CP_ASYNC 1

namespace dwemu {
inline void async_fail(const char* what, const void* a) {
    if (g_error.empty()) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "%s (address 0x%llx), %s", what,
                      (unsigned long long)reinterpret_cast<uintptr_t>(a),
                      cur ? where(*cur).c_str() : "");
        g_error = buf;
    }
    if (g_in_launch) siglongjmp(g_abort, 1);
}
}  // namespace dwemu

template <int BYTES>
DWEMU_TRACED_HELPER inline void cp_async(void* dst, const void* src, bool valid) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef DWEMU_TRACE  // the call site is the instruction (a noinline helper in the traced build)
    dwemu::tr::async_copy(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), dst, src,
                          BYTES, valid);
#endif
    unsigned char* d = static_cast<unsigned char*>(dst);
    if (d < dwemu::g_smem || d + BYTES > dwemu::g_smem + dwemu::g_smem_bytes)
        dwemu::async_fail("cp.async destination outside the dynamic shared memory", dst);
    if (reinterpret_cast<uintptr_t>(dst) % BYTES || reinterpret_cast<uintptr_t>(src) % BYTES)
        dwemu::async_fail("misaligned cp.async", reinterpret_cast<uintptr_t>(dst) % BYTES ? dst : src);
    dwemu::AsyncCopy c;
    c.dst = d;
    c.size = BYTES;
    if (valid) std::memcpy(c.bytes, src, BYTES);  // read at issue (a fault names this copy)
    else std::memset(c.bytes, 0, BYTES);          // src-size 0: zero fill, nothing read
    if (dwemu::g_order) std::memcpy(d, c.bytes, BYTES);  // reverse run: lands at once
    else dwemu::cur->open.push_back(c);                  // forward run: lands at the wait
}

DWEMU_UNTRACED inline void cp_async_commit() {
    dwemu::cur->groups.push_back(std::move(dwemu::cur->open));
    dwemu::cur->open.clear();
}

template <int N>
DWEMU_UNTRACED inline void cp_async_wait() {
#ifdef DWEMU_TRACE
    dwemu::tr::consume();
#endif
    auto& g = dwemu::cur->groups;
    while (g.size() > static_cast<size_t>(N)) {
        for (const dwemu::AsyncCopy& c : g.front()) std::memcpy(c.dst, c.bytes, c.size);
        g.erase(g.begin());
    }
}
