// Host emulation of the CUDA features the kernels in kernels/*.cu use, so the real kernel sources
// run on the CPU under g++ (kernels/tests/emulation.rs). It stands in for <cuda_bf16.h>, which
// is the only header the kernel includes, and defines ARB_HOST_EMULATION so the kernel leaves out
// its inline-PTX wrappers, which are re-implemented here from the PTX ISA's definitions:
//
//   * threads are fibers (ucontext), one block at a time, 128 fibers switched cooperatively at
//     every barrier, warp-collective operation and shuffle; a barrier nobody can complete is
//     reported as a deadlock (e.g. a warp that returned before a __syncthreads);
//   * mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 and ldmatrix.x4.trans gather the operands of
//     all 32 lanes by the fragment layouts of the ISA, compute, and scatter the results;
//   * cp.async copies are deferred until the cp.async.wait_group that retires their group, so a
//     read of a stage before its wait sees stale data, as it could on a GPU;
//   * shared memory is filled with NaN before each block and bounds-checked on every access
//     through these primitives; the test poisons, with AddressSanitizer, every global byte a
//     block must not touch.
//
// Not emulated: timing, memory-ordering races between warps beyond the barrier discipline above,
// and the exact rounding of the tensor cores' f32 accumulation (done here in f32 in k order).
#pragma once

#define ARB_HOST_EMULATION 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Block-scope `__shared__` arrays (norm.cu's reduction scratch) must be one per block, not one per
// thread: a harness that has them defines EMU_SHARED_IS_STATIC. attention.cu only has the
// `extern __shared__` dynamic array, for which `static` would be ill-formed.
#ifdef EMU_SHARED_IS_STATIC
#define __shared__ static
#else
#define __shared__
#endif
#define __align__(n) __attribute__((aligned(n)))

using std::min;

// ---- bf16 --------------------------------------------------------------------------------------

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;  // x in the low 16 bits, as on the device
};
struct uint4 {
    unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = static_cast<uint32_t>(h.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// Round to nearest, ties to even; NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// ---- threads, barriers, launch --------------------------------------------------------------------

namespace emu {

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

struct PendingCopy {
    void* dst;
    const void* src;
    int group;
};

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    unsigned tid = 0;
    bool done = false;
    bool at_block_barrier = false;     // waiting in __syncthreads ...
    unsigned long long barrier_gen = 0;  // ... of this generation
    int committed = 0;  // cp.async groups committed so far
    std::vector<PendingCopy> pending;
};

struct Barrier {
    int size = 0;
    int count = 0;
    unsigned long long generation = 0;
};

// Operand exchange area of one warp.
struct Warp {
    Barrier bar;
    unsigned int a[32][4], b[32][2];
    float c[32][4], d[32][4];
    const void* addr[32];
    unsigned int ld[32][4];
    float shfl[32];
};

inline Dim3 g_block_idx, g_block_dim, g_grid_dim;
inline std::vector<Fiber>* g_fibers = nullptr;
inline int g_current = -1;
inline ucontext_t g_scheduler;
inline Barrier g_block_bar;
inline Warp g_warps[32];
inline unsigned long long g_progress = 0;  // barrier arrivals and thread exits, for deadlock detection
inline unsigned char* g_smem = nullptr;
inline size_t g_smem_bytes = 0;
inline std::function<void()>* g_kernel = nullptr;
#if EMU_ASAN
inline const void* g_sched_stack_bottom = nullptr;
inline size_t g_sched_stack_size = 0;
#endif

[[noreturn]] inline void fail(const char* what) {
    fprintf(stderr, "emulation: %s (block %u,%u thread %u)\n", what, g_block_idx.x, g_block_idx.y,
            g_current >= 0 ? (*g_fibers)[g_current].tid : 0u);
    abort();
}

inline Fiber& self() { return (*g_fibers)[g_current]; }

// Fiber -> scheduler.
inline void yield() {
    Fiber& f = self();
#if EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, g_sched_stack_bottom, g_sched_stack_size);
    swapcontext(&f.ctx, &g_scheduler);
    __sanitizer_finish_switch_fiber(fake, &g_sched_stack_bottom, &g_sched_stack_size);
#else
    swapcontext(&f.ctx, &g_scheduler);
#endif
}

// Waits until `b.size` fibers arrived. The fiber that completes the barrier runs `on_complete`
// before releasing the others (used to compute a warp-collective result once).
template <typename F>
inline void barrier_wait(Barrier& b, F&& on_complete) {
    ++g_progress;
    const unsigned long long gen = b.generation;
    if (++b.count == b.size) {
        on_complete();
        b.count = 0;
        ++b.generation;
        return;
    }
    while (b.generation == gen) yield();
}
inline void barrier_wait(Barrier& b) {
    barrier_wait(b, [] {});
}

inline void check_smem(const void* p, size_t bytes, size_t align) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < g_smem || c + bytes > g_smem + g_smem_bytes) fail("shared-memory access outside the dynamic allocation");
    if ((reinterpret_cast<uintptr_t>(p) % align) != 0) fail("misaligned shared-memory access");
}

inline void fiber_main() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
    (*g_kernel)();
    Fiber& f = self();
    if (!f.pending.empty()) fail("thread exited with cp.async copies never waited for");
    f.done = true;
    ++g_progress;  // finishing is progress too (for the deadlock check)
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, g_sched_stack_bottom, g_sched_stack_size);
#endif
    // Returning switches to uc_link (the scheduler).
}

// A fresh context that starts in fiber_main on its own stack. (A function of its own: getcontext
// returns twice like setjmp, which must not happen in a frame with live loop variables.)
inline void init_fiber(Fiber& f, unsigned tid) {
    f.tid = tid;
    f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &g_scheduler;
    makecontext(&f.ctx, fiber_main, 0);
}

// Scheduler -> fiber t, until it yields or finishes.
inline void resume(std::vector<Fiber>& fibers, unsigned t) {
    g_current = static_cast<int>(t);
#if EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, fibers[t].stack.data(), fibers[t].stack.size());
    swapcontext(&g_scheduler, &fibers[t].ctx);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    swapcontext(&g_scheduler, &fibers[t].ctx);
#endif
    g_current = -1;
}

// Runs the fibers of one block to completion. Policy 0 is round-robin over all threads (warps
// advance in near lockstep). Policies 1 and 2 are adversarial for races between warps: one warp
// at a time (ascending / descending) runs until all its threads wait in __syncthreads, so a warp
// races ahead to the next barrier and overwrites shared data other warps have not read yet
// unless a barrier in between prevents it.
inline void run_block(std::vector<Fiber>& fibers, unsigned policy) {
    const unsigned n = static_cast<unsigned>(fibers.size());
    auto runnable = [&](unsigned t) {
        const Fiber& f = fibers[t];
        return !f.done && !(f.at_block_barrier && g_block_bar.generation == f.barrier_gen);
    };
    for (;;) {
        bool alive = false;
        for (const Fiber& f : fibers) alive = alive || !f.done;
        if (!alive) return;
        const unsigned long long progress_before = g_progress;
        if (policy == 0) {
            for (unsigned t = 0; t < n; ++t)
                if (!fibers[t].done) resume(fibers, t);
        } else {
            const unsigned warps = n / 32;
            for (unsigned i = 0; i < warps; ++i) {
                const unsigned w = policy == 1 ? i : warps - 1 - i;
                for (;;) {
                    const unsigned long long warp_before = g_progress;
                    bool ran = false;
                    for (unsigned t = w * 32; t < w * 32 + 32; ++t) {
                        if (runnable(t)) {
                            resume(fibers, t);
                            ran = true;
                        }
                    }
                    // Stop when the whole warp waits at the block barrier (or is stuck, which the
                    // deadlock check below reports).
                    if (!ran || g_progress == warp_before) break;
                }
            }
        }
        if (g_progress == progress_before) fail("deadlock: no thread can pass its barrier");
    }
}

// Runs `kernel` for every block of `grid` with `block.x` threads and `smem_bytes` of dynamic
// shared memory at `smem` (which must hold at least that much). `before_block` / `after_block`
// bracket each block (the test poisons and unpoisons global memory there).
inline void launch(Dim3 grid, Dim3 block, unsigned char* smem, size_t smem_bytes, const std::function<void()>& kernel,
                   const std::function<void(Dim3)>& before_block = {},
                   const std::function<void(Dim3)>& after_block = {}) {
    const unsigned n = block.x;
    if (n % 32 != 0 || n > 1024 || block.y != 1 || block.z != 1) fail("unsupported block shape");
    std::function<void()> k = kernel;
    g_kernel = &k;
    g_grid_dim = grid;
    g_block_dim = block;
    g_smem = smem;
    g_smem_bytes = smem_bytes;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            g_block_idx = Dim3{bx, by, 0};
            if (before_block) before_block(g_block_idx);
            if (smem_bytes > 0) memset(smem, 0xff, smem_bytes);  // bf16 0xffff is NaN: unwritten smem shows
            std::vector<Fiber> fibers(n);
            g_fibers = &fibers;
            g_block_bar = Barrier{static_cast<int>(n), 0, 0};
            for (unsigned w = 0; w < n / 32; ++w) g_warps[w].bar = Barrier{32, 0, 0};
            for (unsigned t = 0; t < n; ++t) init_fiber(fibers[t], t);
            run_block(fibers, (bx + by * grid.x) % 3);
            g_fibers = nullptr;
            if (after_block) after_block(g_block_idx);
        }
    }
    g_kernel = nullptr;
}

inline Dim3 thread_idx() { return Dim3{self().tid, 0, 0}; }
inline unsigned lane() { return self().tid & 31; }
inline Warp& warp() { return g_warps[self().tid >> 5]; }

inline void bf16x2_unpack(unsigned int r, float& lo, float& hi) {
    lo = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(r & 0xffff)});
    hi = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(r >> 16)});
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() {
    emu::Fiber& f = emu::self();
    f.at_block_barrier = true;
    f.barrier_gen = emu::g_block_bar.generation;
    emu::barrier_wait(emu::g_block_bar);
    emu::self().at_block_barrier = false;
}
[[noreturn]] inline void __trap() { emu::fail("__trap()"); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) emu::fail("only full-warp shuffles are emulated");
    emu::Warp& w = emu::warp();
    const unsigned l = emu::lane();
    w.shfl[l] = v;
    emu::barrier_wait(w.bar);
    const float out = w.shfl[l ^ static_cast<unsigned>(lane_mask)];
    emu::barrier_wait(w.bar);  // nobody overwrites shfl[] before everyone read it
    return out;
}

// ---- the PTX wrappers of attention.cu ----------------------------------------------------------

inline unsigned int dynamic_smem_bytes() { return static_cast<unsigned int>(emu::g_smem_bytes); }

// cp.async.cg.shared.global 16 bytes: checked now, copied when its group retires.
inline void cp_async_16(void* dst, const void* src) {
    emu::check_smem(dst, 16, 16);
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async from a global address not 16-byte aligned");
    emu::Fiber& f = emu::self();
    f.pending.push_back(emu::PendingCopy{dst, src, f.committed});
}
inline void cp_async_commit() { ++emu::self().committed; }
// cp.async.wait_group N: all but the N most recent committed groups are complete.
template <int N>
inline void cp_async_wait() {
    emu::Fiber& f = emu::self();
    std::vector<emu::PendingCopy> still;
    for (const emu::PendingCopy& c : f.pending) {
        if (c.group < f.committed - N) {
            memcpy(c.dst, c.src, 16);
        } else {
            still.push_back(c);
        }
    }
    f.pending.swap(still);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, d = a * b + c with c = d = `c`.
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" with .bf16), lane = 4 g + t:
//   A: a0,a1 = A[g][2t,2t+1]  a2,a3 = A[g+8][2t,2t+1]  a4,a5 = A[g][2t+8,2t+9]  a6,a7 = A[g+8][2t+8,2t+9]
//   B: b0,b1 = B[2t,2t+1][g]  b2,b3 = B[2t+8,2t+9][g]
//   C/D: c0,c1 = C[g][2t,2t+1]  c2,c3 = C[g+8][2t,2t+1]
// (element pairs packed low half first into one 32-bit register).
inline void mma_bf16(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    emu::Warp& w = emu::warp();
    const unsigned l = emu::lane();
    w.a[l][0] = a0;
    w.a[l][1] = a1;
    w.a[l][2] = a2;
    w.a[l][3] = a3;
    w.b[l][0] = b0;
    w.b[l][1] = b1;
    for (int i = 0; i < 4; ++i) w.c[l][i] = c[i];
    emu::barrier_wait(w.bar, [&w] {
        float A[16][16], B[16][8], C[16][8];
        for (int ln = 0; ln < 32; ++ln) {
            const int g = ln >> 2, t = ln & 3;
            emu::bf16x2_unpack(w.a[ln][0], A[g][2 * t], A[g][2 * t + 1]);
            emu::bf16x2_unpack(w.a[ln][1], A[g + 8][2 * t], A[g + 8][2 * t + 1]);
            emu::bf16x2_unpack(w.a[ln][2], A[g][2 * t + 8], A[g][2 * t + 9]);
            emu::bf16x2_unpack(w.a[ln][3], A[g + 8][2 * t + 8], A[g + 8][2 * t + 9]);
            emu::bf16x2_unpack(w.b[ln][0], B[2 * t][g], B[2 * t + 1][g]);
            emu::bf16x2_unpack(w.b[ln][1], B[2 * t + 8][g], B[2 * t + 9][g]);
            C[g][2 * t] = w.c[ln][0];
            C[g][2 * t + 1] = w.c[ln][1];
            C[g + 8][2 * t] = w.c[ln][2];
            C[g + 8][2 * t + 1] = w.c[ln][3];
        }
        for (int ln = 0; ln < 32; ++ln) {
            const int g = ln >> 2, t = ln & 3;
            const int rows[4] = {g, g, g + 8, g + 8};
            const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
            for (int i = 0; i < 4; ++i) {
                float acc = C[rows[i]][cols[i]];
                for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
                w.d[ln][i] = acc;
            }
        }
    });
    for (int i = 0; i < 4; ++i) c[i] = w.d[l][i];
    emu::barrier_wait(w.bar);  // d[] is reused by the next mma
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8i..8i+7 give the addresses of the 8 rows
// (8 x b16 each, 16-byte aligned) of matrix i; register i of lane l receives, transposed, the
// elements M_i[2 (l % 4)][l / 4] (low half) and M_i[2 (l % 4) + 1][l / 4] (high half).
inline void ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const __nv_bfloat16* p) {
    emu::check_smem(p, 16, 16);
    emu::Warp& w = emu::warp();
    const unsigned l = emu::lane();
    w.addr[l] = p;
    emu::barrier_wait(w.bar, [&w] {
        for (int ln = 0; ln < 32; ++ln) {
            for (int m = 0; m < 4; ++m) {
                const int row = 2 * (ln % 4), col = ln / 4;
                const uint16_t* r_lo = static_cast<const uint16_t*>(w.addr[8 * m + row]);
                const uint16_t* r_hi = static_cast<const uint16_t*>(w.addr[8 * m + row + 1]);
                w.ld[ln][m] = static_cast<unsigned>(r_lo[col]) | (static_cast<unsigned>(r_hi[col]) << 16);
            }
        }
    });
    r0 = w.ld[l][0];
    r1 = w.ld[l][1];
    r2 = w.ld[l][2];
    r3 = w.ld[l][3];
    emu::barrier_wait(w.bar);
}
