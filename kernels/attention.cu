// Variable-length causal GQA flash attention over packed sequences
// (ABI: docs/kernel-abi.md, "kernels/attention.cu").
//
// Algorithm: FlashAttention-2. A block owns ARB_BLOCK_M = 64 query rows of one sequence and one
// query head; its 4 warps own 16 rows each. The block walks the keys 0..=last query of the tile in
// tiles of BN keys; for each tile a warp computes S = Q K^T for its 16 rows on tensor cores, folds
// S into a running (max, sum) per row with the online softmax, and accumulates O += P V on tensor
// cores. O is divided by the row sum once at the end. Nothing of size seq_len^2 ever exists.
//
// Tensor cores: raw `mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32` (sm_80+, also the fastest
// warp-level path on sm_90) with f32 accumulators, not nvcuda::wmma: wmma fragments have an
// unspecified register layout, so the softmax would need a round trip of S through shared memory
// per tile. With mma.sync the layout is fixed by the PTX ISA, so
//   * the S accumulators are softmaxed in registers (a row is spread over the 4 lanes of a quad,
//     two shuffles reduce it), and
//   * the C layout of two adjacent 16x8 S tiles is exactly the A layout of one 16x16 P tile, so P
//     goes from accumulator to operand without touching shared memory.
// (Besides, mma.h needs crt/mma.h, which the pinned NVRTC/runtime wheels do not ship.)
//
// Layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", bf16): lane = 4 * g + t (g = group
// 0..7, t = thread in group 0..3).
//   A 16x16 (row-major): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..],
//                        reg3 = A[g+8][2t+8..]
//   B 16x8  ("col", i.e. B[k][n] with k contiguous): reg0 = B[2t..2t+1][g], reg1 = B[2t+8..][g]
//   C 16x8  f32: c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// Q and K are stored row-major in shared memory ([row][channel]), so the A fragment of Q and the B
// fragment of K^T (B[k=channel][n=key] = K[key][channel], contiguous in channel) are single 32-bit
// loads of two adjacent bf16. V is also [key][channel], but the B fragment of P V needs two keys
// of one channel per register: `ldmatrix.trans` does that transpose on the way in.
//
// Shared memory: Q tile [64][LD] + K and V tiles [2 stages][BN][LD], bf16, LD = padded head dim
// + 8. The +8 (16 bytes) shifts consecutive rows by 4 banks, which makes both the 32-bit fragment
// loads (8 rows x 4 words per warp) and ldmatrix (8 rows x 16 bytes per phase) conflict-free for
// every head dim. K/V tiles are double-buffered with cp.async, so the loads of tile j+1 overlap
// the math of tile j. BN = 64 keys for head dims <= 128 and 32 above: the f32 O accumulators take
// head_dim / 2 registers per thread (128 at D = 256), and a smaller S tile keeps the kernel under
// the 255-register limit without spills; it also keeps shared memory at 99 KB for D = 256 (two
// blocks per SM on sm_90, one on sm_80).
//
// Head dims that are not a multiple of 16 are padded with zero channels up to one (zero Q and K
// channels add nothing to Q K^T; zero V channels produce output channels that are not stored).
// Rows past the end of the tile's queries/keys are zero-filled and never read from global memory.
//
// Numerics: S, the softmax and O are f32. The scale is folded with log2(e) so the exponentials are
// exp2f (ex2.approx, 2 ulp). P is rounded to bf16 for the P V product (the tensor-core input
// type), and the row sum is accumulated from the same rounded values, so the normalisation matches
// the weights actually applied. The row max includes the causal mask as -inf. Without a window,
// key 0 is visible to every query and is in the first tile, so every row has a finite max after
// tile 0; with a window a row may see no key of a tile, and the -inf guard below keeps its max,
// sum and output at zero until its first visible key.
//
// Gemma 2: `softcap > 0` bends each score to tanh(s * scale / softcap) * softcap before the
// softmax; `window > 0` hides from a query at position q every key at or before q - window.
// Tiles that no query of the block (or of a warp) can see through the window are skipped.
#include <cuda_bf16.h>

#ifndef ARB_HEAD_DIM
#error "attention.cu needs -DARB_HEAD_DIM=<head dim in 1..=256>"
#endif
#if ARB_HEAD_DIM < 1 || ARB_HEAD_DIM > 256
#error "ARB_HEAD_DIM must be in 1..=256"
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "attention.cu needs sm_80 or newer (mma.sync bf16, cp.async, ldmatrix)"
#endif

// Launch geometry and shared-memory layout; the Rust crate mirrors these (arbiter_kernels::
// ATTN_BLOCK_M, ATTN_THREADS, attention_smem_bytes) and a unit test checks they agree.
#define ARB_BLOCK_M 64         // query rows per block (the host's tile size)
#define ARB_ATTN_THREADS 128   // 4 warps x 16 query rows
#define ARB_BLOCK_N_SMALL 64   // keys per tile when head_dim <= ARB_BLOCK_N_SPLIT
#define ARB_BLOCK_N_LARGE 32   // keys per tile above it (register pressure of the O accumulators)
#define ARB_BLOCK_N_SPLIT 128
#define ARB_SMEM_PAD 8         // bf16 of padding per shared-memory row (bank-conflict avoidance)
#define ARB_KV_STAGES 2        // K/V tiles in flight (double buffering)

#define ARB_HEAD_DIM_PADDED(d) ((((d) + 15) / 16) * 16)
#define ARB_BLOCK_N(d) ((d) > ARB_BLOCK_N_SPLIT ? ARB_BLOCK_N_LARGE : ARB_BLOCK_N_SMALL)
// Dynamic shared memory in bytes for head dim d: Q tile + ARB_KV_STAGES x (K tile + V tile).
#define ARB_ATTN_SMEM(d) \
    ((ARB_BLOCK_M + 2 * ARB_KV_STAGES * ARB_BLOCK_N(d)) * (ARB_HEAD_DIM_PADDED(d) + ARB_SMEM_PAD) * 2)

// The host may pass the size it computed (arbiter_kernels::attention_smem_bytes) so that a
// disagreement between the two is a compile error rather than a corrupt launch.
#ifdef ARB_EXPECT_SMEM
static_assert(ARB_ATTN_SMEM(ARB_HEAD_DIM) == ARB_EXPECT_SMEM,
              "attention_smem_bytes() on the host disagrees with ARB_ATTN_SMEM in attention.cu");
#endif

namespace {

typedef unsigned int u32;

constexpr int D = ARB_HEAD_DIM;
constexpr int DP = ARB_HEAD_DIM_PADDED(D);  // head dim padded to the mma k/n granularity
constexpr int BM = ARB_BLOCK_M;
constexpr int BN = ARB_BLOCK_N(D);
constexpr int LD = DP + ARB_SMEM_PAD;  // shared-memory row stride, bf16 elements
constexpr int THREADS = ARB_ATTN_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr int QK_STEPS = DP / 16;  // k-steps of Q K^T (over channels)
constexpr int S_TILES = BN / 8;    // 16x8 S tiles per warp and key tile
constexpr int O_TILES = DP / 8;    // 16x8 O tiles per warp
constexpr int PV_STEPS = BN / 16;  // k-steps of P V (over keys)
constexpr int CHUNKS = DP / 8;     // 16-byte chunks per shared-memory row

static_assert(BM == 16 * WARPS, "each warp owns 16 query rows");
static_assert(BN % 16 == 0 && DP % 16 == 0, "mma tiles");
static_assert(O_TILES % 2 == 0, "P V loads two O tiles per ldmatrix.x4");
static_assert((LD * 2) % 16 == 0, "rows must stay 16-byte aligned for cp.async and ldmatrix");
static_assert((BM + 2 * ARB_KV_STAGES * BN) * LD * 2 == ARB_ATTN_SMEM(D), "layout and ARB_ATTN_SMEM agree");
static_assert(ARB_ATTN_SMEM(256) <= 160 * 1024, "must fit sm_80 and sm_90 shared memory");

// The PTX wrappers. kernels/tests/emu/ provides host versions of exactly these (and of the CUDA
// built-ins) to run this file on the CPU in `cargo test`; nothing else differs between the two.
#ifndef ARB_HOST_EMULATION
__device__ __forceinline__ u32 smem_u32(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, const __nv_bfloat16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_u32(p)));
}

// c += A (16x16, 4 regs) * B (16x8, 2 regs), f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Dynamic shared memory the launch provided, in bytes.
__device__ __forceinline__ u32 dynamic_smem_bytes() {
    u32 bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}
#endif  // ARB_HOST_EMULATION

// Two adjacent bf16 (the lower index in the low half), as one mma operand register.
__device__ __forceinline__ u32 ld_pair(const __nv_bfloat16* p) { return *reinterpret_cast<const u32*>(p); }

__device__ __forceinline__ u32 pack_bf16(__nv_bfloat162 v) { return *reinterpret_cast<u32*>(&v); }

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Fills the ROWS x DP shared tile `dst` with `valid` qkv rows (global token indices): rows
// r < split are row0 + r, the others row1 + (r - split) (a key tile that straddles the end of a
// shared prefix and the start of the segment's own keys); channels col .. col + D - 1. Rows >=
// valid and channels >= D become zero and are not read from global memory. With `vec` (16-byte aligned rows, D a multiple of 8) the copy is
// cp.async 16 bytes at a time and completes at the caller's cp_async_wait; otherwise it is a
// plain element-wise copy, complete when this returns. Either way the caller's __syncthreads
// publishes it to the block.
template <int ROWS>
__device__ __forceinline__ void load_tile(__nv_bfloat16* dst, const __nv_bfloat16* __restrict__ qkv, size_t row0,
                                          int split, size_t row1, int valid, int col, int qkv_width, bool vec) {
    if constexpr (D % 8 == 0) {
        if (vec) {
            for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
                const int r = i / CHUNKS;
                const int c = (i % CHUNKS) * 8;
                __nv_bfloat16* d = dst + r * LD + c;
                if (r < valid && c < D) {
                    const size_t row = r < split ? row0 + r : row1 + (r - split);
                    cp_async_16(d, qkv + row * static_cast<size_t>(qkv_width) + col + c);
                } else {
                    *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
                }
            }
            return;
        }
    }
    const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
    for (int i = threadIdx.x; i < ROWS * DP; i += THREADS) {
        const int r = i / DP;
        const int c = i % DP;
        const size_t row = r < split ? row0 + r : row1 + (r - split);
        dst[r * LD + c] = (r < valid && c < D) ? qkv[row * static_cast<size_t>(qkv_width) + col + c] : zero;
    }
}

}  // namespace

// out[token, h*D .. h*D + D) = softmax(scale * q k^T) v over the keys 0..=position of the same
// sequence, for the 64-query tile `blockIdx.x` of the tile list and query head `blockIdx.y`.
// A segment s that continues a shared prefix (seq_prefix[2s + 1] = P > 0 rows starting at packed
// row seq_prefix[2s]) is the tail of a sequence whose first P keys are those rows: its queries
// sit at positions P.., and the keys are walked as the prefix's rows, then the segment's own.
// Positions below are in that full sequence; rows are packed rows.
// Launch: grid (n_tiles, heads), block (ARB_ATTN_THREADS), dynamic shared memory
// ARB_ATTN_SMEM(ARB_HEAD_DIM) bytes.
extern "C" __global__ void __launch_bounds__(ARB_ATTN_THREADS, 2)
    flash_attn_varlen(const __nv_bfloat16* __restrict__ qkv, __nv_bfloat16* __restrict__ out,
                      const int* __restrict__ cu_seqlens, const int* __restrict__ seq_prefix,
                      const int* __restrict__ tile_seq, const int* __restrict__ tile_start, int n_tiles, int heads, int kv_heads, int qkv_width,
                      float scale, float softcap, int window) {
    extern __shared__ __align__(16) unsigned char smem_raw[];

    // A launch that disagrees with this file's ABI would silently write out of bounds (too little
    // shared memory, a block size the loops do not cover, an invalid GQA grouping); trapping turns
    // it into a launch error the host reports.
    if (dynamic_smem_bytes() < static_cast<u32>(ARB_ATTN_SMEM(D)) || blockDim.x != THREADS || kv_heads <= 0 ||
        heads % kv_heads != 0)
        __trap();

    const int tile = blockIdx.x;
    const int h = blockIdx.y;
    if (tile >= n_tiles || h >= heads) return;
    const int seq = tile_seq[tile];
    const int seq_start = cu_seqlens[seq];
    const int seq_len = cu_seqlens[seq + 1] - seq_start;
    const int q0 = tile_start[tile];
    const int p_row = seq_prefix[2 * seq];
    const int p_len = seq_prefix[2 * seq + 1];
    // Uniform over the block: no barrier is skipped by some threads.
    if (q0 < 0 || q0 >= seq_len || p_len < 0 || p_row < 0) return;
    const int m_rows = min(BM, seq_len - q0);
    // Causality: no query of this tile sees a key past its last query, so keys >= kv_limit are
    // never loaded; in particular nothing past the end of the sequence is read.
    const int kv_limit = p_len + q0 + m_rows;
    const int n_kv_tiles = (kv_limit + BN - 1) / BN;
    // With a window, the block's first query (position p_len + q0) sees nothing before
    // p_len + q0 - window + 1, and later queries see even less of the start: begin at that tile.
    const int first_seen = p_len + q0 - window + 1;
    const int j0 = window > 0 && first_seen > 0 ? first_seen / BN : 0;

    const int g = h / (heads / kv_heads);
    const int q_col = h * D;
    const int k_col = (heads + g) * D;
    const int v_col = (heads + kv_heads + g) * D;
    const size_t tok0 = static_cast<size_t>(seq_start);
    const size_t prow0 = static_cast<size_t>(p_row);
    // Key tile starting at position kb: the prefix rows it covers, then the segment's own.
    auto kv_split = [&](int kb) { return kb < p_len ? min(p_len - kb, BN) : 0; };
    auto kv_row0 = [&](int kb) { return kb < p_len ? prow0 + kb : prow0; };
    auto kv_row1 = [&](int kb) { return kb < p_len ? tok0 : tok0 + (kb - p_len); };
    const bool vec = (qkv_width % 8 == 0) && ((reinterpret_cast<size_t>(qkv) & 15) == 0);

    __nv_bfloat16* s_q = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* s_k = s_q + BM * LD;                   // [ARB_KV_STAGES][BN][LD]
    __nv_bfloat16* s_v = s_k + ARB_KV_STAGES * BN * LD;  // [ARB_KV_STAGES][BN][LD]

    load_tile<BM>(s_q, qkv, tok0 + q0, m_rows, tok0 + q0, m_rows, q_col, qkv_width, vec);
    {
        const int kb = j0 * BN;
        const int stage = j0 % ARB_KV_STAGES;
        load_tile<BN>(s_k + stage * BN * LD, qkv, kv_row0(kb), kv_split(kb), kv_row1(kb), min(BN, kv_limit - kb), k_col,
                      qkv_width, vec);
        load_tile<BN>(s_v + stage * BN * LD, qkv, kv_row0(kb), kv_split(kb), kv_row1(kb), min(BN, kv_limit - kb), v_col,
                      qkv_width, vec);
    }
    cp_async_commit();

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int gq = lane >> 2;  // fragment row group
    const int tq = lane & 3;   // thread in group
    const int wrow = warp * 16;
    // Warps whose 16 rows are all past the end of a partial tile only help with the loads.
    const bool warp_active = wrow < m_rows;
    const int warp_q_min = p_len + q0 + wrow;  // in-sequence position of the warp's first query row
    const int warp_q_max = warp_q_min + 15;
    const int qpos0 = warp_q_min + gq;  // this thread's two rows: gq and gq + 8
    const int qpos1 = qpos0 + 8;
    const float scale_log2 = scale * 1.4426950408889634f;
    // Soft-capping: tanh(s * scale / softcap) * softcap, then into log2 units.
    const float cap_in = softcap > 0.0f ? scale / softcap : 0.0f;
    const float cap_out = softcap * 1.4426950408889634f;
    const float neg_inf = -__int_as_float(0x7f800000);

    float o[O_TILES][4];
#pragma unroll
    for (int n = 0; n < O_TILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_run0 = neg_inf, m_run1 = neg_inf;  // running max of the scaled (log2) scores
    float l_run0 = 0.0f, l_run1 = 0.0f;        // this thread's share of the running row sums

    for (int j = j0; j < n_kv_tiles; ++j) {
        if (j + 1 < n_kv_tiles) {
            // Prefetch tile j + 1 into the other stage; the barrier at the end of iteration j - 1
            // guarantees every warp is done reading it.
            const int stage = (j + 1) % ARB_KV_STAGES;
            const int kb = (j + 1) * BN;
            load_tile<BN>(s_k + stage * BN * LD, qkv, kv_row0(kb), kv_split(kb), kv_row1(kb), min(BN, kv_limit - kb),
                          k_col, qkv_width, vec);
            load_tile<BN>(s_v + stage * BN * LD, qkv, kv_row0(kb), kv_split(kb), kv_row1(kb), min(BN, kv_limit - kb),
                          v_col, qkv_width, vec);
            cp_async_commit();
            cp_async_wait<1>();  // everything but the group just committed, i.e. tile j, has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const int kbase = j * BN;
        // Tiles entirely above the diagonal for all 16 rows of the warp contribute nothing, nor
        // do tiles entirely before the window of its first row.
        const bool in_window = window <= 0 || kbase + BN - 1 > warp_q_min - window;
        if (warp_active && kbase <= warp_q_max && in_window) {
            const __nv_bfloat16* k_tile = s_k + (j % ARB_KV_STAGES) * BN * LD;
            const __nv_bfloat16* v_tile = s_v + (j % ARB_KV_STAGES) * BN * LD;

            // S = Q K^T for the warp's 16 rows and BN keys.
            float s[S_TILES][4];
#pragma unroll
            for (int n = 0; n < S_TILES; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < QK_STEPS; ++ks) {
                const __nv_bfloat16* qa = s_q + (wrow + gq) * LD + ks * 16 + tq * 2;
                const u32 a0 = ld_pair(qa);
                const u32 a1 = ld_pair(qa + 8 * LD);
                const u32 a2 = ld_pair(qa + 8);
                const u32 a3 = ld_pair(qa + 8 * LD + 8);
#pragma unroll
                for (int n = 0; n < S_TILES; ++n) {
                    const __nv_bfloat16* kp = k_tile + (n * 8 + gq) * LD + ks * 16 + tq * 2;
                    mma_bf16(s[n], a0, a1, a2, a3, ld_pair(kp), ld_pair(kp + 8));
                }
            }

            // Scale into log2 units and apply the causal mask (only tiles crossing the diagonal
            // of this warp's rows can hold a key after a query).
            const bool crosses_diagonal = kbase + BN - 1 > warp_q_min;
            // Some key of the tile is at or before (last row's position - window).
            const bool crosses_window = window > 0 && kbase <= warp_q_max - window;
            float mx0 = neg_inf, mx1 = neg_inf;
#pragma unroll
            for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float v = softcap > 0.0f ? tanhf(s[n][e] * cap_in) * cap_out : s[n][e] * scale_log2;
                    if (crosses_diagonal || crosses_window) {
                        const int kpos = kbase + n * 8 + tq * 2 + (e & 1);
                        const int qpos = e < 2 ? qpos0 : qpos1;
                        if (kpos > qpos || (window > 0 && kpos <= qpos - window)) v = neg_inf;
                    }
                    s[n][e] = v;
                }
                mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
            }
            // The 4 lanes of a quad hold the same two rows: after the butterfly all four agree on
            // the max bit for bit, so they rescale identically.
            const float m_new0 = fmaxf(m_run0, quad_max(mx0));
            const float m_new1 = fmaxf(m_run1, quad_max(mx1));
            const float m_use0 = m_new0 == neg_inf ? 0.0f : m_new0;
            const float m_use1 = m_new1 == neg_inf ? 0.0f : m_new1;
            const float alpha0 = exp2f(m_run0 - m_use0);  // 0 on the first tile (m_run = -inf)
            const float alpha1 = exp2f(m_run1 - m_use1);
            m_run0 = m_new0;
            m_run1 = m_new1;

            // P = exp2(S - max) as bf16 A fragments: S tiles 2k and 2k + 1 (keys 16k .. 16k + 15)
            // form A fragment k, registers {tile 2k rows g, tile 2k rows g+8, tile 2k+1 rows g,
            // tile 2k+1 rows g+8}.
            u32 p[PV_STEPS][4];
            float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
            for (int n = 0; n < S_TILES; ++n) {
                const __nv_bfloat162 top = __floats2bfloat162_rn(exp2f(s[n][0] - m_use0), exp2f(s[n][1] - m_use0));
                const __nv_bfloat162 bot = __floats2bfloat162_rn(exp2f(s[n][2] - m_use1), exp2f(s[n][3] - m_use1));
                sum0 += __low2float(top) + __high2float(top);
                sum1 += __low2float(bot) + __high2float(bot);
                p[n / 2][(n % 2) * 2 + 0] = pack_bf16(top);
                p[n / 2][(n % 2) * 2 + 1] = pack_bf16(bot);
            }
            l_run0 = l_run0 * alpha0 + sum0;
            l_run1 = l_run1 * alpha1 + sum1;
#pragma unroll
            for (int n = 0; n < O_TILES; ++n) {
                o[n][0] *= alpha0;
                o[n][1] *= alpha0;
                o[n][2] *= alpha1;
                o[n][3] *= alpha1;
            }

            // O += P V. ldmatrix.x4.trans: lanes 8i .. 8i+7 address the 8 key rows of matrix i;
            // matrices 0/1 are keys 0-7 / 8-15 of O tile n (B regs 0/1), 2/3 the same for tile n+1.
            const int mat = lane >> 3;
            const int v_row = (mat & 1) * 8 + (lane & 7);
            const int v_col8 = (mat >> 1) * 8;
#pragma unroll
            for (int kk = 0; kk < PV_STEPS; ++kk) {
#pragma unroll
                for (int n = 0; n < O_TILES; n += 2) {
                    u32 b0, b1, b2, b3;
                    ldmatrix_x4_trans(b0, b1, b2, b3, v_tile + (kk * 16 + v_row) * LD + n * 8 + v_col8);
                    mma_bf16(o[n], p[kk][0], p[kk][1], p[kk][2], p[kk][3], b0, b1);
                    mma_bf16(o[n + 1], p[kk][0], p[kk][1], p[kk][2], p[kk][3], b2, b3);
                }
            }
        }
        __syncthreads();  // the stage read here is overwritten by the prefetch of iteration j + 1
    }

    if (!warp_active) return;
    const float l0 = quad_sum(l_run0);
    const float l1 = quad_sum(l_run1);
    // l >= 1 for every real row (its max element contributes exp2(0) = 1); the guard only keeps
    // padded rows, which are not stored, from dividing by zero.
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int r0 = wrow + gq;
    const int r1 = r0 + 8;
    const size_t out_ld = static_cast<size_t>(heads) * D;
    __nv_bfloat16* out0 = out + (tok0 + q0 + r0) * out_ld + q_col;
    __nv_bfloat16* out1 = out + (tok0 + q0 + r1) * out_ld + q_col;
#pragma unroll
    for (int n = 0; n < O_TILES; ++n) {
        const int c = n * 8 + tq * 2;
        if (c >= D) continue;
        if constexpr (D % 2 == 0) {
            // c is even and D is even, so c + 1 < D and the pair is 4-byte aligned.
            if (r0 < m_rows)
                *reinterpret_cast<__nv_bfloat162*>(out0 + c) = __floats2bfloat162_rn(o[n][0] * inv0, o[n][1] * inv0);
            if (r1 < m_rows)
                *reinterpret_cast<__nv_bfloat162*>(out1 + c) = __floats2bfloat162_rn(o[n][2] * inv1, o[n][3] * inv1);
        } else {
            if (r0 < m_rows) {
                out0[c] = __float2bfloat16_rn(o[n][0] * inv0);
                if (c + 1 < D) out0[c + 1] = __float2bfloat16_rn(o[n][1] * inv0);
            }
            if (r1 < m_rows) {
                out1[c] = __float2bfloat16_rn(o[n][2] * inv1);
                if (c + 1 < D) out1[c + 1] = __float2bfloat16_rn(o[n][3] * inv1);
            }
        }
    }
}
