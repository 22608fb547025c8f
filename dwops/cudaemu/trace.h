// dwops CUDA emulator, traced build (DWEMU_TRACE): the memory accesses of a launch, aggregated
// into the facts of a memory workload analysis (requests, sectors, bank-conflict wavefronts, L2
// and DRAM bytes). Included by emu.h; the Python side is dwops/cudaemu/__init__.py (tracing()).
//
// * The kernel source is compiled with GCC's -fsanitize=thread instrumentation and WITHOUT
//   libtsan: every memory access the host compiler emits calls __tsan_read<N>/__tsan_write<N>
//   (or the _range / unaligned forms) with its address; the definitions below are the tracer.
//   The instruction id is the call's return address (one pc per access instruction of the host
//   code). The emulator's own functions are not instrumented (no_sanitize_thread) and a guard
//   flag keeps the tracer's own containers out of the trace.
// * Only device memory counts: addresses inside the launch's device allocations (global) and
//   inside the dynamic shared memory or the static __shared__ arrays (shared). Stack, heap and
//   the emulator's globals are the host's, not the kernel's memory traffic.
// * A warp's dynamic instruction is (pc, how many times this thread has executed pc): the lanes
//   of a warp that executed the same pc for the k-th time form one request. The access pattern
//   is the host compiler's (-O1): what it keeps in registers, hoists or merges is an
//   approximation of nvcc's code, not nvcc's code.
// * Global requests: bytes the lanes asked for; sectors = distinct 32-byte sectors touched;
//   ideal = ceil(distinct bytes / 32). L2 bytes: per block, 32 x the block's distinct sectors
//   (the L1 absorbs re-reads inside a block); DRAM bytes: 32 x the launch's distinct sectors
//   (L2 holds the working set). Reads and writes separately.
// * Shared requests, 32 banks of 4 bytes: a request of accesses of <= 4 bytes is one pass over
//   the warp, 8-byte accesses two half-warp passes, 16-byte accesses four quarter-warp passes;
//   a pass costs the maximum over banks of the distinct 4-byte words addressed in that bank
//   (the same word is a broadcast), at least 1 when the pass has active lanes. Ideal =
//   ceil(distinct words / 32), at least 1.
// * cp.async (recorded by the emulator's cp_async helper, not by the instrumentation): the
//   global side (lanes whose copy is valid; the zero-fill form reads nothing) counts as a global
//   load, the shared side as a shared_cp_async request.
// * Loads in flight: per warp, the global load bytes (cp.async included) issued back to back
//   until an access that may consume them (a shared store, a global store, a barrier, a
//   cp.async wait, a shuffle) form a batch; the counter is the mean batch over all warps. The
//   order is the host compiler's schedule, an approximation of nvcc's.
#pragma once
#include <map>
#include <unordered_map>
#include <unordered_set>

#define DWEMU_UNTRACED __attribute__((no_sanitize_thread))
#define DWEMU_TRACED_HELPER __attribute__((noinline, no_sanitize_thread))

namespace dwemu {
namespace tr {

enum Kind { GLD, GST, SLD, SST, SCP, KINDS };

struct Ev {
    uintptr_t pc, addr;
    uint32_t occ;
    uint16_t size;
    uint8_t kind, cp;
    int lane;
};

struct Lane {
    std::vector<Ev> ev;
    std::unordered_map<uintptr_t, uint32_t> occ;  // executions of each pc so far
    std::vector<uint64_t> batch;                   // global load bytes per batch
    bool open = false;
    long shuffles = 0;
};

struct Range {
    uintptr_t lo, hi;
};

struct LineStat {
    double requests = 0, cost = 0, ideal = 0;
};

// counters, in the order of NAMES
enum {
    C_GLD_REQ, C_GST_REQ, C_GLD_BYTES, C_GST_BYTES, C_GLD_SEC, C_GST_SEC, C_GLD_IDEAL,
    C_GST_IDEAL, C_DRAM_R, C_DRAM_W, C_L2_R, C_L2_W, C_SLD_REQ, C_SLD_WF, C_SLD_IDEAL,
    C_SST_REQ, C_SST_WF, C_SST_IDEAL, C_SCP_REQ, C_SCP_WF, C_SCP_IDEAL, C_CP_REQ, C_CP_BYTES,
    C_BARRIERS, C_SHUFFLES, C_INFLIGHT, C_COUNT
};
static const char NAMES[] =
    "global_load_requests global_store_requests global_load_bytes global_store_bytes "
    "global_load_sectors global_store_sectors global_load_ideal_sectors "
    "global_store_ideal_sectors dram_read_bytes dram_write_bytes l2_read_bytes l2_write_bytes "
    "shared_load_requests shared_load_wavefronts shared_load_ideal_wavefronts "
    "shared_store_requests shared_store_wavefronts shared_store_ideal_wavefronts "
    "shared_cp_async_requests shared_cp_async_wavefronts shared_cp_async_ideal_wavefronts "
    "cp_async_requests cp_async_bytes barriers shuffles load_bytes_in_flight_per_warp";

static bool g_on = false, g_busy = false;
static std::vector<Lane> g_lanes;
const int MAX_RANGES = 256;
static Range g_global[MAX_RANGES], g_static_shared[MAX_RANGES];  // plain arrays: no
static int g_nglobal = 0, g_nshared = 0;                          // instrumented code on the way
static double g_c[C_COUNT];
static double g_batch_bytes = 0, g_batches = 0;
static std::map<std::pair<uintptr_t, int>, LineStat> g_lines;
static std::unordered_set<uintptr_t> g_dram[2], g_block[2];  // [0] read, [1] written sectors

DWEMU_UNTRACED inline void consume() {
    if (!g_on || !cur || g_busy) return;
    g_busy = true;
    g_lanes[cur->linear].open = false;
    g_busy = false;
}

DWEMU_UNTRACED inline void record(uintptr_t pc, uintptr_t addr, size_t size, int kind, int cp,
                                  uint32_t occ) {
    Lane& l = g_lanes[cur->linear];
    Ev e;
    e.pc = pc;
    e.addr = addr;
    e.occ = occ;
    e.size = static_cast<uint16_t>(std::min<size_t>(size, 65535));
    e.kind = static_cast<uint8_t>(kind);
    e.cp = static_cast<uint8_t>(cp);
    e.lane = cur->linear;
    l.ev.push_back(e);
    if (kind == GLD) {
        if (!l.open) {
            l.batch.push_back(0);
            l.open = true;
        }
        l.batch.back() += size;
    } else if (kind == GST || kind == SST) {
        l.open = false;
    }
}

DWEMU_UNTRACED inline bool inside(const Range* rs, int n, uintptr_t a) {
    for (int i = 0; i < n; ++i)
        if (a >= rs[i].lo && a < rs[i].hi) return true;
    return false;
}

DWEMU_UNTRACED inline int classify(uintptr_t a, bool write) {
    const uintptr_t s = reinterpret_cast<uintptr_t>(g_smem);
    if ((a >= s && a < s + g_smem_bytes) || inside(g_static_shared, g_nshared, a))
        return write ? SST : SLD;
    if (inside(g_global, g_nglobal, a)) return write ? GST : GLD;
    return -1;
}

DWEMU_UNTRACED inline void access(uintptr_t pc, const void* p, size_t size, bool write) {
    if (!g_on || g_busy || !cur) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const int kind = classify(a, write);
    if (kind < 0) return;
    g_busy = true;  // the containers below are instrumented code
    record(pc, a, size, kind, 0, ++g_lanes[cur->linear].occ[pc]);
    g_busy = false;
}

// cp.async from its helper: the global side (valid copies only) and the shared side
DWEMU_UNTRACED inline void async_copy(uintptr_t pc, const void* dst, const void* src, int bytes,
                                      bool valid) {
    if (!g_on || g_busy || !cur) return;
    g_busy = true;
    const uint32_t occ = ++g_lanes[cur->linear].occ[pc];
    if (valid && classify(reinterpret_cast<uintptr_t>(src), false) == GLD)
        record(pc, reinterpret_cast<uintptr_t>(src), bytes, GLD, 1, occ);
    record(pc, reinterpret_cast<uintptr_t>(dst), bytes, SCP, 1, occ);
    g_busy = false;
}

DWEMU_UNTRACED inline void add_line(uintptr_t pc, int kind, double cost, double ideal) {
    LineStat& s = g_lines[std::make_pair(pc, kind)];
    s.requests += 1;
    s.cost += cost;
    s.ideal += ideal;
}

// one global request: lanes' (addr, size) in ev[b, e)
DWEMU_UNTRACED inline void global_request(const std::vector<Ev>& ev, size_t b, size_t e) {
    const bool w = ev[b].kind == GST;
    std::vector<uintptr_t> sec;
    std::vector<std::pair<uintptr_t, uintptr_t>> iv;
    double bytes = 0;
    for (size_t i = b; i < e; ++i) {
        const uintptr_t a = ev[i].addr, z = ev[i].addr + ev[i].size;
        bytes += ev[i].size;
        iv.emplace_back(a, z);
        for (uintptr_t s = a >> 5; s <= (z - 1) >> 5; ++s) sec.push_back(s);
    }
    std::sort(sec.begin(), sec.end());
    sec.erase(std::unique(sec.begin(), sec.end()), sec.end());
    std::sort(iv.begin(), iv.end());
    uintptr_t distinct = 0, hi = 0;
    for (const auto& v : iv) {
        const uintptr_t lo = std::max(v.first, hi);
        if (v.second > lo) distinct += v.second - lo;
        hi = std::max(hi, v.second);
    }
    const double ideal = static_cast<double>((distinct + 31) / 32);
    for (uintptr_t s : sec) {
        g_block[w].insert(s);
        g_dram[w].insert(s);
    }
    g_c[w ? C_GST_REQ : C_GLD_REQ] += 1;
    g_c[w ? C_GST_BYTES : C_GLD_BYTES] += bytes;
    g_c[w ? C_GST_SEC : C_GLD_SEC] += static_cast<double>(sec.size());
    g_c[w ? C_GST_IDEAL : C_GLD_IDEAL] += ideal;
    if (ev[b].cp) g_c[C_CP_BYTES] += bytes;
    add_line(ev[b].pc, ev[b].kind, static_cast<double>(sec.size()), ideal);
}

// one shared request: the bank model above
DWEMU_UNTRACED inline void shared_request(const std::vector<Ev>& ev, size_t b, size_t e) {
    int width = 4;
    for (size_t i = b; i < e; ++i) width = std::max<int>(width, std::min<int>(ev[i].size, 16));
    const int per_pass = width <= 4 ? 32 : width <= 8 ? 16 : 8;  // lanes per pass
    std::vector<std::pair<int, uintptr_t>> words;                // (pass, word)
    for (size_t i = b; i < e; ++i) {
        const int pass = (ev[i].lane % 32) / per_pass;
        for (uintptr_t wd = ev[i].addr >> 2; wd <= (ev[i].addr + ev[i].size - 1) >> 2; ++wd)
            words.emplace_back(pass, wd);
    }
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    double wavefronts = 0;
    for (size_t i = 0; i < words.size();) {
        size_t j = i;
        int bank[32] = {0}, worst = 0;
        for (; j < words.size() && words[j].first == words[i].first; ++j)
            worst = std::max(worst, ++bank[words[j].second & 31]);
        wavefronts += std::max(worst, 1);
        i = j;
    }
    std::vector<uintptr_t> distinct;
    for (const auto& w : words) distinct.push_back(w.second);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    const double ideal = static_cast<double>(std::max<size_t>(1, (distinct.size() + 31) / 32));
    const int k = ev[b].kind;
    const int base = k == SLD ? C_SLD_REQ : k == SST ? C_SST_REQ : C_SCP_REQ;
    g_c[base] += 1;
    g_c[base + 1] += wavefronts;
    g_c[base + 2] += ideal;
    if (k == SCP) g_c[C_CP_REQ] += 1;
    add_line(ev[b].pc, k, wavefronts, ideal);
}

// Group every warp's recorded accesses into requests (called whenever all threads of the block
// are suspended at a barrier / shuffle or have exited: every lane has issued its part).
DWEMU_UNTRACED inline void flush(int n) {
    if (!g_on) return;
    g_busy = true;
    std::vector<Ev> ev;
    for (int w0 = 0; w0 < n; w0 += 32) {
        ev.clear();
        for (int i = w0; i < std::min(n, w0 + 32); ++i) {
            ev.insert(ev.end(), g_lanes[i].ev.begin(), g_lanes[i].ev.end());
            g_lanes[i].ev.clear();
        }
        std::sort(ev.begin(), ev.end(), [](const Ev& a, const Ev& b) {
            return std::tie(a.kind, a.pc, a.occ, a.lane) < std::tie(b.kind, b.pc, b.occ, b.lane);
        });
        for (size_t b = 0; b < ev.size();) {
            size_t e = b + 1;
            while (e < ev.size() && ev[e].kind == ev[b].kind && ev[e].pc == ev[b].pc &&
                   ev[e].occ == ev[b].occ)
                ++e;
            if (ev[b].kind == GLD || ev[b].kind == GST) global_request(ev, b, e);
            else shared_request(ev, b, e);
            b = e;
        }
    }
    g_busy = false;
}

// Block sampling (tracing(max_blocks=...)): a launch of more blocks than g_sample runs four
// windows of g_sample / 4 consecutive blocks (linear order, x fastest), spread evenly from the
// first block to the last, so interior tiles, edge tiles and neighbours sharing halos are all
// seen; g_ran counts the blocks run. 0: every block.
static long long g_sample = 0, g_ran = 0;

DWEMU_UNTRACED inline bool keep_block(long long lin, long long total) {
    if (g_sample > 0 && total > g_sample) {
        const long long windows = 4, len = std::max(1LL, g_sample / windows);
        bool keep = false;
        for (long long i = 0; i < windows && !keep; ++i) {
            const long long first = i * (total - len) / (windows - 1);
            keep = lin >= first && lin < first + len;
        }
        if (!keep) return false;
    }
    ++g_ran;
    return true;
}

DWEMU_UNTRACED inline void block_start(int n) {
    if (!g_on) return;
    g_lanes.assign(n, Lane());
}

DWEMU_UNTRACED inline void block_end(int n) {
    if (!g_on) return;
    flush(n);
    long bars = 0;
    for (int i = 0; i < n; ++i) bars = std::max(bars, g_fibers[i].barriers);
    g_c[C_BARRIERS] += static_cast<double>(bars);
    for (int w0 = 0; w0 < n; w0 += 32) {
        long sh = 0;
        size_t nb = 0;
        const int w1 = std::min(n, w0 + 32);
        for (int i = w0; i < w1; ++i) {
            sh = std::max(sh, g_lanes[i].shuffles);
            nb = std::max(nb, g_lanes[i].batch.size());
        }
        g_c[C_SHUFFLES] += static_cast<double>(sh);
        for (size_t k = 0; k < nb; ++k) {
            uint64_t bytes = 0;
            for (int i = w0; i < w1; ++i)
                if (k < g_lanes[i].batch.size()) bytes += g_lanes[i].batch[k];
            if (bytes) {
                g_batch_bytes += static_cast<double>(bytes);
                g_batches += 1;
            }
        }
    }
    g_c[C_L2_R] += 32.0 * static_cast<double>(g_block[0].size());
    g_c[C_L2_W] += 32.0 * static_cast<double>(g_block[1].size());
    g_block[0].clear();
    g_block[1].clear();
}

}  // namespace tr
}  // namespace dwemu

// ----------------------------------------------------------------------- the instrumentation

#define DWEMU_TSAN_RW(N)                                                                        \
    extern "C" DWEMU_UNTRACED void __tsan_read##N(void* p) {                                    \
        dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, N, 0);   \
    }                                                                                           \
    extern "C" DWEMU_UNTRACED void __tsan_write##N(void* p) {                                   \
        dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, N, 1);   \
    }                                                                                           \
    extern "C" DWEMU_UNTRACED void __tsan_unaligned_read##N(void* p) {                          \
        dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, N, 0);   \
    }                                                                                           \
    extern "C" DWEMU_UNTRACED void __tsan_unaligned_write##N(void* p) {                         \
        dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, N, 1);   \
    }                                                                                           \
    extern "C" DWEMU_UNTRACED void __tsan_volatile_read##N(void* p) {                           \
        dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, N, 0);   \
    }                                                                                           \
    extern "C" DWEMU_UNTRACED void __tsan_volatile_write##N(void* p) {                          \
        dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, N, 1);   \
    }
DWEMU_TSAN_RW(1)
DWEMU_TSAN_RW(2)
DWEMU_TSAN_RW(4)
DWEMU_TSAN_RW(8)
DWEMU_TSAN_RW(16)
#undef DWEMU_TSAN_RW
extern "C" DWEMU_UNTRACED void __tsan_read_range(void* p, unsigned long n) {
    dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, n, 0);
}
extern "C" DWEMU_UNTRACED void __tsan_write_range(void* p, unsigned long n) {
    dwemu::tr::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, n, 1);
}
extern "C" DWEMU_UNTRACED void __tsan_func_entry(void*) {}
extern "C" DWEMU_UNTRACED void __tsan_func_exit() {}
extern "C" DWEMU_UNTRACED void __tsan_init() {}
extern "C" DWEMU_UNTRACED void __tsan_vptr_update(void*, void*) {}
extern "C" DWEMU_UNTRACED void __tsan_vptr_read(void*) {}

// ----------------------------------------------------------------------- the Python interface

// ranges: (lo, hi) pairs, nglobal device allocations then nshared static __shared__ arrays
// sample: at most this many blocks per launch (0: all; see keep_block)
DWEMU_EXPORT DWEMU_UNTRACED void dwemu_trace_begin(const uintptr_t* ranges, int nglobal,
                                                   int nshared, long long sample) {
    using namespace dwemu::tr;
    g_sample = sample;
    g_ran = 0;
    g_nglobal = std::min(nglobal, MAX_RANGES);
    g_nshared = std::min(nshared, MAX_RANGES);
    for (int i = 0; i < g_nglobal; ++i) g_global[i] = Range{ranges[2 * i], ranges[2 * i + 1]};
    for (int i = 0; i < g_nshared; ++i)
        g_static_shared[i] = Range{ranges[2 * (nglobal + i)], ranges[2 * (nglobal + i) + 1]};
    std::fill(g_c, g_c + C_COUNT, 0.0);
    g_batch_bytes = g_batches = 0;
    g_lines.clear();
    for (auto& s : g_dram) s.clear();
    for (auto& s : g_block) s.clear();
    g_on = true;
}

DWEMU_EXPORT DWEMU_UNTRACED const char* dwemu_trace_names() { return dwemu::tr::NAMES; }

// the blocks the last traced launch ran (all of them unless sampled)
DWEMU_EXPORT DWEMU_UNTRACED long long dwemu_trace_blocks_run() { return dwemu::tr::g_ran; }

// counters into out[C_COUNT]; returns the number of per-line rows
DWEMU_EXPORT DWEMU_UNTRACED int dwemu_trace_end(double* out) {
    using namespace dwemu::tr;
    g_on = false;
    g_c[C_DRAM_R] = 32.0 * static_cast<double>(g_dram[0].size());
    g_c[C_DRAM_W] = 32.0 * static_cast<double>(g_dram[1].size());
    g_c[C_INFLIGHT] = g_batches ? g_batch_bytes / g_batches : 0.0;
    std::copy(g_c, g_c + C_COUNT, out);
    for (auto& s : g_dram) s.clear();
    g_lanes.clear();
    return static_cast<int>(g_lines.size());
}

// the per-line rows: pcs[i], kinds[i], vals[3 i .. 3 i + 2] = requests, sectors or wavefronts, ideal
DWEMU_EXPORT DWEMU_UNTRACED void dwemu_trace_lines(uintptr_t* pcs, int* kinds, double* vals) {
    int i = 0;
    for (const auto& kv : dwemu::tr::g_lines) {
        pcs[i] = kv.first.first;
        kinds[i] = kv.first.second;
        vals[3 * i] = kv.second.requests;
        vals[3 * i + 1] = kv.second.cost;
        vals[3 * i + 2] = kv.second.ideal;
        ++i;
    }
    dwemu::tr::g_lines.clear();
}
