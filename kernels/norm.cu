// Residual add fused with LayerNorm / RMSNorm (ABI: docs/kernel-abi.md, "kernels/norm.cu").
//
// One block per row. The residual stream x is f32 and stays f32: it carries the sum of every
// layer's output, so rounding it to bf16 would compound error over the depth of the model. The
// norm output is what feeds the next GEMM, so it is rounded once, at the end.
//
// Numerics: a two-pass reduction (mean first, then the sum of squared deviations around it), all
// in f32. The one-pass E[x^2] - E[x]^2 form cancels catastrophically when |mean| >> std, which is
// common in residual streams with outlier channels; two passes cost one more read of a row that
// is already in L1/L2. The row is kept in global memory (re-read by the same thread that wrote
// it, so no synchronisation is needed between the add and the reductions).
#include <cuda_bf16.h>

// Threads per block, fixed by the ABI (the host launches exactly this many).
#define ARB_NORM_THREADS 256

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "arbiter kernels target sm_80 and newer (bf16 and tensor core instructions)"
#endif

namespace {

constexpr int kWarps = ARB_NORM_THREADS / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of `v` over the block, returned to every thread. `scratch` holds one value per warp; the
// trailing barrier lets the caller reuse `scratch` for the next reduction straight away.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    // Every thread sums the per-warp partials in the same order, so all agree bit for bit.
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
    __syncthreads();
    return total;
}

__device__ __forceinline__ void store(float* out, size_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* out, size_t i, float v) { out[i] = __float2bfloat16_rn(v); }

// Mean and 1/std of one row of x after the optional residual add (written back to x), the
// statistics every norm output here is computed from. RMSNorm does not centre: its mean is 0.
struct RowStats {
    float mean;
    float inv_std;
};

__device__ __forceinline__ RowStats add_row_stats(float* __restrict__ row, const __nv_bfloat16* __restrict__ delta,
                                                  int hidden, float eps, int rms, float* scratch) {
    float sum = 0.0f;
    if (delta != nullptr) {
        for (int c = threadIdx.x; c < hidden; c += ARB_NORM_THREADS) {
            const float v = row[c] + __bfloat162float(delta[c]);
            row[c] = v;
            sum += v;
        }
    } else {
        for (int c = threadIdx.x; c < hidden; c += ARB_NORM_THREADS) sum += row[c];
    }

    const float inv_hidden = 1.0f / static_cast<float>(hidden);
    const float mean = rms ? 0.0f : block_sum(sum, scratch) * inv_hidden;

    float sq = 0.0f;
    for (int c = threadIdx.x; c < hidden; c += ARB_NORM_THREADS) {
        const float d = row[c] - mean;
        sq += d * d;
    }
    const float var = block_sum(sq, scratch) * inv_hidden;
    // 1/sqrtf rather than rsqrtf: sqrtf and the division are IEEE-rounded (NVRTC's default
    // -prec-sqrt/-prec-div), rsqrtf is an approximation with a few ulp of error.
    return RowStats{mean, 1.0f / sqrtf(var + eps)};
}

// The normalized value of channel c: one expression shared by every output type (fp8.cu's fused
// quantization evaluates it twice per element and must get the same bits both times).
__device__ __forceinline__ float normed(const float* __restrict__ row, RowStats st, const float* __restrict__ gamma,
                                        const float* __restrict__ beta, int c) {
    const float v = (row[c] - st.mean) * st.inv_std * gamma[c];
    return beta != nullptr ? v + beta[c] : v;
}

template <typename Out>
__device__ __forceinline__ void add_norm(float* __restrict__ x, const __nv_bfloat16* __restrict__ delta,
                                         const float* __restrict__ gamma, const float* __restrict__ beta,
                                         Out* __restrict__ out, int hidden, float eps, int rms) {
    __shared__ float scratch[kWarps];
    const size_t base = static_cast<size_t>(blockIdx.x) * static_cast<size_t>(hidden);
    float* row = x + base;
    const RowStats st = add_row_stats(row, delta != nullptr ? delta + base : nullptr, hidden, eps, rms, scratch);
    Out* o = out + base;
    for (int c = threadIdx.x; c < hidden; c += ARB_NORM_THREADS) store(o, c, normed(row, st, gamma, beta, c));
}

}  // namespace

// x[row] += delta[row] (when delta is not null), then out[row] = norm(x[row]) rounded to bf16.
// Launch: grid (rows), block (ARB_NORM_THREADS), no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(ARB_NORM_THREADS)
    add_norm_bf16(float* x, const __nv_bfloat16* delta, const float* gamma, const float* beta, __nv_bfloat16* out,
                  int rows, int hidden, float eps, int rms) {
    if (static_cast<int>(blockIdx.x) >= rows) return;
    add_norm<__nv_bfloat16>(x, delta, gamma, beta, out, hidden, eps, rms);
}

// Same as add_norm_bf16 with an f32 output (the final norm feeding the f32 reward head).
extern "C" __global__ void __launch_bounds__(ARB_NORM_THREADS)
    add_norm_f32(float* x, const __nv_bfloat16* delta, const float* gamma, const float* beta, float* out, int rows,
                 int hidden, float eps, int rms) {
    if (static_cast<int>(blockIdx.x) >= rows) return;
    add_norm<float>(x, delta, gamma, beta, out, hidden, eps, rms);
}

// x[i] += delta[i] for the layer whose output is not followed by a norm (the last one before
// the head goes through add_norm_f32 instead). Launch: grid ceil(n / 256), block 256.
extern "C" __global__ void add_residual(float* x, const __nv_bfloat16* delta, long long n) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) x[i] += __bfloat162float(delta[i]);
}

// Per-head RMSNorm in place (Qwen3's q_norm / k_norm, before RoPE): in each qkv row, heads
// [0, q_heads) are normalized with q_gamma and heads [q_heads, q_heads + kv_heads) with k_gamma,
// each over its head_dim channels; the value heads are untouched. The sum of squares is f32 and
// reduced over one warp in a fixed order. Launch: grid (tokens, q_heads + kv_heads), block 32.
extern "C" __global__ void qk_norm(__nv_bfloat16* qkv, const float* q_gamma, const float* k_gamma, int tokens,
                                   int qkv_width, int q_heads, int kv_heads, int head_dim, float eps) {
    const int t = blockIdx.x;
    const int h = blockIdx.y;
    if (t >= tokens || h >= q_heads + kv_heads) return;
    __nv_bfloat16* x = qkv + static_cast<size_t>(t) * static_cast<size_t>(qkv_width) +
                       static_cast<size_t>(h) * static_cast<size_t>(head_dim);
    const float* gamma = h < q_heads ? q_gamma : k_gamma;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < head_dim; c += 32) {
        const float v = __bfloat162float(x[c]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / static_cast<float>(head_dim) + eps);
    // Each thread rewrites only the channels it read, after the warp-wide sum.
    for (int c = threadIdx.x; c < head_dim; c += 32) x[c] = __float2bfloat16_rn(gamma[c] * (__bfloat162float(x[c]) * inv));
}
