// FP8 (e4m3) activations for the FP8 GEMMs (ABI: docs/kernel-abi.md, "kernels/fp8.cu").
//
// Compiled for sm_89 and newer only (the e4m3 conversion instruction, and the FP8 tensor cores
// the GEMMs need, arrive with Ada), and always after norm.cu and elementwise.cu in the same
// program (arbiter_kernels::FP8 concatenates the three sources): the fused kernels here compute
// the norm and the activations with those files' own device functions, so an FP8 model normalizes
// and activates with exactly the arithmetic of a bf16 one and differs only in the final rounding.
//
// The rounding is engine/src/fp8.rs's, the reference every backend reproduces: each token (row)
// gets the scale s = max(max|y| / 448, 1 / (448 * 512)) and its codes e4m3(y / s), rounded to
// nearest even and saturating at +-448 (cvt.rn.satfinite), with IEEE division (NVRTC's default
// -prec-div) so that the scale and the quotient are the bits the CPU computes. A row's absmax is
// exact whatever the reduction order, so the scale does not depend on the block size.
//
// Each row is read twice (once for its absmax, once to round): the row is in L1/L2 by then, and a
// single pass would have to keep the whole row in registers or shared memory.
#include <cuda_fp8.h>

// Threads per block of every kernel here (add_norm_fp8 uses norm.cu's ARB_NORM_THREADS, equal).
#define ARB_FP8_THREADS 256
// act_fp8's `kind` (arbiter_kernels::Fp8Act mirrors these).
#define ARB_FP8_ACT_RELU2 0
#define ARB_FP8_ACT_RELU 1
#define ARB_FP8_ACT_SWIGLU 2
#define ARB_FP8_ACT_GEGLU 3

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "kernels/fp8.cu needs sm_89 or newer (e4m3 conversions and FP8 tensor cores)"
#endif

namespace {

static_assert(ARB_FP8_THREADS == ARB_NORM_THREADS, "add_norm_fp8 reuses norm.cu's row loops");

constexpr float kE4m3Max = 448.0f;
// vLLM's floor on a per-token scale (fp8::MIN_ACTIVATION_SCALE): an all-zero row gets a finite
// scale, and a tiny one is not blown up past what f32 can hold.
constexpr float kMinScale = 1.0f / (448.0f * 512.0f);

__device__ __forceinline__ unsigned char e4m3(float v) {
    return static_cast<unsigned char>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// The value of an e4m3 code, exact in f32 (subnormals m/8 * 2^-6, normals (1 + m/8) * 2^(e-7),
// S.1111.111 NaN), by bit arithmetic so that no conversion mode can change it.
__device__ __forceinline__ float e4m3_value(unsigned char code) {
    const int e = (code >> 3) & 0xF;
    const int m = code & 7;
    float v;
    if (e == 0xF && m == 7) {
        v = __int_as_float(0x7fc00000);
    } else if (e == 0) {
        v = static_cast<float>(m) * (1.0f / 512.0f);
    } else {
        // (8 + m) * 2^(e - 10): the exponent field of 2^(e - 10) is e - 10 + 127.
        v = static_cast<float>(8 + m) * __int_as_float((e + 117) << 23);
    }
    return (code & 0x80) ? -v : v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Largest value over the block, returned to every thread (norm.cu's block_sum with max).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = 0.0f;
#pragma unroll
    for (int w = 0; w < ARB_FP8_THREADS / 32; ++w) m = fmaxf(m, scratch[w]);
    __syncthreads();
    return m;
}

__device__ __forceinline__ float token_scale(float absmax) { return fmaxf(absmax / kE4m3Max, kMinScale); }

// The shared body: `value(c)` is the row's element c in f32 (evaluated twice, so it must be a
// pure function of c); writes the row's codes and its scale.
template <typename Value>
__device__ __forceinline__ void quantize_row(Value value, unsigned char* __restrict__ codes, float* __restrict__ scale,
                                             int cols) {
    __shared__ float scratch[ARB_FP8_THREADS / 32];
    float m = 0.0f;
    for (int c = threadIdx.x; c < cols; c += ARB_FP8_THREADS) m = fmaxf(m, fabsf(value(c)));
    const float s = token_scale(block_max(m, scratch));
    for (int c = threadIdx.x; c < cols; c += ARB_FP8_THREADS) codes[c] = e4m3(value(c) / s);
    if (threadIdx.x == 0) *scale = s;
}

}  // namespace

// codes[r, :] = e4m3(in[r, :] / scales[r]) with the row's own scale (the attention output before
// o, the one GEMM input no other kernel produces). Launch: grid (rows), block ARB_FP8_THREADS.
extern "C" __global__ void __launch_bounds__(ARB_FP8_THREADS)
    quantize_rows(const __nv_bfloat16* in, unsigned char* codes, float* scales, int rows, int cols) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const size_t base = static_cast<size_t>(r) * static_cast<size_t>(cols);
    const __nv_bfloat16* row = in + base;
    quantize_row([&](int c) { return __bfloat162float(row[c]); }, codes + base, scales + r, cols);
}

// add_norm_bf16 with the output rounded to e4m3 per row instead of bf16: x[r] += delta[r] (when
// delta is not null), then codes[r] / scales[r] = the row's quantized norm (the input of q/k/v and
// of the MLP's up projection). Launch: grid (rows), block ARB_NORM_THREADS.
extern "C" __global__ void __launch_bounds__(ARB_NORM_THREADS)
    add_norm_fp8(float* x, const __nv_bfloat16* delta, const float* gamma, const float* beta, unsigned char* codes,
                 float* scales, int rows, int hidden, float eps, int rms) {
    __shared__ float stats_scratch[kWarps];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const size_t base = static_cast<size_t>(r) * static_cast<size_t>(hidden);
    float* row = x + base;
    const RowStats st = add_row_stats(row, delta != nullptr ? delta + base : nullptr, hidden, eps, rms, stats_scratch);
    quantize_row([&](int c) { return normed(row, st, gamma, beta, c); }, codes + base, scales + r, hidden);
}

// The MLP's activation rounded to e4m3 per row (the input of down): `kind` ARB_FP8_ACT_RELU2
// (max(x, 0)^2) or _RELU over rows of `cols`, _SWIGLU (silu(gate) * up) or _GEGLU over rows
// [gate (cols) | up (cols)] of 2 * cols, each in f32 from the bf16 input as elementwise.cu computes
// it. Launch: grid (rows), block ARB_FP8_THREADS.
extern "C" __global__ void __launch_bounds__(ARB_FP8_THREADS)
    act_fp8(const __nv_bfloat16* in, unsigned char* codes, float* scales, int rows, int cols, int kind) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bool gated_kind = kind == ARB_FP8_ACT_SWIGLU || kind == ARB_FP8_ACT_GEGLU;
    const __nv_bfloat16* row = in + static_cast<size_t>(r) * static_cast<size_t>(cols) * (gated_kind ? 2 : 1);
    unsigned char* out = codes + static_cast<size_t>(r) * static_cast<size_t>(cols);
    switch (kind) {
        case ARB_FP8_ACT_RELU2:
            quantize_row(
                [&](int c) {
                    const float v = fmaxf(__bfloat162float(row[c]), 0.0f);
                    return v * v;
                },
                out, scales + r, cols);
            break;
        case ARB_FP8_ACT_RELU:
            quantize_row([&](int c) { return fmaxf(__bfloat162float(row[c]), 0.0f); }, out, scales + r, cols);
            break;
        case ARB_FP8_ACT_SWIGLU:
            quantize_row([&](int c) { return silu(__bfloat162float(row[c])) * __bfloat162float(row[cols + c]); }, out,
                         scales + r, cols);
            break;
        case ARB_FP8_ACT_GEGLU:
            quantize_row([&](int c) { return gelu_tanh(__bfloat162float(row[c])) * __bfloat162float(row[cols + c]); },
                         out, scales + r, cols);
            break;
        default:
            __trap();  // the host passes one of the four kinds
    }
}

// out[r, c] = bf16(e4m3(codes[r, c]) * scales[r]): an FP8 activation back to bf16, for a
// consumer that is not an FP8 GEMM. Launch: grid (rows, ceil(cols / 256)), block ARB_FP8_THREADS.
extern "C" __global__ void dequantize_rows(const unsigned char* codes, const float* scales, __nv_bfloat16* out,
                                           int rows, int cols) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= cols) return;
    const size_t i = static_cast<size_t>(r) * static_cast<size_t>(cols) + c;
    out[i] = __float2bfloat16_rn(e4m3_value(codes[i]) * scales[r]);
}

// The epilogue of an FP8 GEMM run with tensor-wide scales (sm_89, where cuBLASLt has no per-row
// scaling): y[t, n] = bf16(acc[t, n] * row_scale[t] * col_scale[n] (+ bias[n])), acc being the
// f32 product of the codes. Rounded to bf16 once, here. Launch: grid (rows, ceil(cols / 256)),
// block ARB_FP8_THREADS.
extern "C" __global__ void scale_rows_cols(const float* acc, const float* row_scale, const float* col_scale,
                                           const float* bias, __nv_bfloat16* out, int rows, int cols) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= cols) return;
    const size_t i = static_cast<size_t>(r) * static_cast<size_t>(cols) + c;
    float v = acc[i] * row_scale[r] * col_scale[c];
    if (bias != nullptr) v += bias[c];
    out[i] = __float2bfloat16_rn(v);
}
