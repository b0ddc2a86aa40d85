// Memory-bound element-wise kernels: embedding and last-token gathers, activations, RoPE
// (ABI: docs/kernel-abi.md, "kernels/elementwise.cu").
//
// All arithmetic is f32; bf16 is only a storage format, rounded once per output with
// round-to-nearest-even (__float2bfloat16_rn). Each kernel is a straight loop over its elements,
// one block per row where the row is the natural unit, so every load of a warp is coalesced.
#include <cuda_bf16.h>

// Threads per block for every kernel here except rope (whose block size the host derives from
// the rotary dimension, see the ABI).
#define ARB_ELEMENTWISE_THREADS 256

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "arbiter kernels target sm_80 and newer (bf16 and tensor core instructions)"
#endif

// x[t, :] = table[tokens[t], :] widened to f32, times `scale` (Gemma 2's sqrt(hidden); 1 for other
// families, which is exact). Token ids were validated against the vocabulary by the host.
// Launch: grid (n_tokens), block 256.
extern "C" __global__ void embed(const __nv_bfloat16* table, const unsigned int* tokens, float* x, int n_tokens,
                                 int hidden, float scale) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const __nv_bfloat16* src = table + static_cast<size_t>(tokens[t]) * static_cast<size_t>(hidden);
    float* dst = x + static_cast<size_t>(t) * static_cast<size_t>(hidden);
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = __bfloat162float(src[c]) * scale;
}

// out[i, :] = x[rows[i], :]: the rows whose scores are read (each sequence's last token), taken
// after the last block's attention. Launch: grid (n_rows), block 256.
template <typename T>
__device__ void gather(const T* x, const int* rows, T* out, int n_rows, int cols) {
    const int i = blockIdx.x;
    if (i >= n_rows) return;
    const T* src = x + static_cast<size_t>(rows[i]) * static_cast<size_t>(cols);
    T* dst = out + static_cast<size_t>(i) * static_cast<size_t>(cols);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// The residual stream (f32).
extern "C" __global__ void gather_rows(const float* x, const int* rows, float* out, int n_rows, int cols) {
    gather(x, rows, out, n_rows, cols);
}

// The attention output (bf16 bits, copied as they are).
extern "C" __global__ void gather_rows_bf16(const unsigned short* x, const int* rows, unsigned short* out, int n_rows,
                                            int cols) {
    gather(x, rows, out, n_rows, cols);
}

// out = bf16(max(x, 0)^2) (Nemotron's squared ReLU). Launch: grid ceil(n / 256), block 256.
extern "C" __global__ void relu2(const __nv_bfloat16* in, __nv_bfloat16* out, long long n) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = fmaxf(__bfloat162float(in[i]), 0.0f);
    out[i] = __float2bfloat16_rn(v * v);
}

// out = bf16(max(x, 0)) (the hidden layer of a two-layer reward head). Launch: grid ceil(n / 256),
// block 256.
extern "C" __global__ void relu(const __nv_bfloat16* in, __nv_bfloat16* out, long long n) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __float2bfloat16_rn(fmaxf(__bfloat162float(in[i]), 0.0f));
}

// y[r, c] = bf16(y[r, c] + bias[c]): a linear layer's bias after its GEMM (Qwen2's q/k/v, a
// reward head's layers). Launch: grid (rows, ceil(cols / 256)), block 256.
extern "C" __global__ void add_bias(__nv_bfloat16* y, const float* bias, int rows, int cols) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || c >= cols) return;
    const size_t i = static_cast<size_t>(r) * static_cast<size_t>(cols) + c;
    y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + bias[c]);
}

// out = bf16(x), round to nearest even: f32 activations (the final norm's) into a GEMM.
// Launch: grid ceil(n / 256), block 256.
extern "C" __global__ void to_bf16(const float* in, __nv_bfloat16* out, long long n) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16_rn(in[i]);
}

// silu(g) = g / (1 + exp(-g)). expf, not __expf: the fast intrinsic loses several bits for large
// |g|. For g -> -inf, expf(-g) = inf and g / inf = -0, the correct limit, with no NaN.
__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// torch's tanh approximation of GELU, 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
__device__ __forceinline__ float gelu_tanh(float g) {
    return 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
}

// A gated MLP's nonlinearity: each input row is [gate (ffn) | up (ffn)] (one fused GEMM produced
// both halves); out[r, j] = bf16(act(gate) * up).
template <typename Act>
__device__ __forceinline__ void gated(const __nv_bfloat16* in, __nv_bfloat16* out, int rows, int ffn, Act act) {
    const int r = blockIdx.x;
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || j >= ffn) return;
    const __nv_bfloat16* row = in + static_cast<size_t>(r) * 2 * static_cast<size_t>(ffn);
    const float g = __bfloat162float(row[j]);
    const float u = __bfloat162float(row[ffn + j]);
    out[static_cast<size_t>(r) * static_cast<size_t>(ffn) + j] = __float2bfloat16_rn(act(g) * u);
}

// silu(gate) * up (Llama). Launch: grid (rows, ceil(ffn / 256)), block 256.
extern "C" __global__ void swiglu(const __nv_bfloat16* in, __nv_bfloat16* out, int rows, int ffn) {
    gated(in, out, rows, ffn, [](float g) { return silu(g); });
}

// gelu_tanh(gate) * up with torch's tanh approximation, 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715
// g^3))) (Gemma 2's GeGLU). Launch: grid (rows, ceil(ffn / 256)), block 256.
extern "C" __global__ void geglu(const __nv_bfloat16* in, __nv_bfloat16* out, int rows, int ffn) {
    gated(in, out, rows, ffn, [](float g) { return gelu_tanh(g); });
}

// In-place non-interleaved rotary embedding (rotate_half) on the first rotary_dim channels of
// heads 0..rot_heads of each qkv row (the query heads, then the key heads). cos/sin are f32
// tables [max_position, rotary_dim / 2] computed by the host (which applies any llama3 frequency
// scaling there, so this kernel is the same for every RoPE variant).
// Launch: grid (tokens, rot_heads), block (min(256, max(32, next_pow2(rotary_dim / 2)))).
extern "C" __global__ void rope(__nv_bfloat16* qkv, const int* positions, const float* cos, const float* sin,
                                int tokens, int qkv_width, int rot_heads, int head_dim, int rotary_dim) {
    const int t = blockIdx.x;
    const int h = blockIdx.y;
    if (t >= tokens || h >= rot_heads) return;
    const int half = rotary_dim / 2;
    __nv_bfloat16* x = qkv + static_cast<size_t>(t) * static_cast<size_t>(qkv_width) +
                       static_cast<size_t>(h) * static_cast<size_t>(head_dim);
    const size_t table = static_cast<size_t>(positions[t]) * static_cast<size_t>(half);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = cos[table + i];
        const float s = sin[table + i];
        const float a = __bfloat162float(x[i]);
        const float b = __bfloat162float(x[i + half]);
        // Each thread owns the pair (i, i + half): it reads both before writing either.
        x[i] = __float2bfloat16_rn(a * c - b * s);
        x[i + half] = __float2bfloat16_rn(b * c + a * s);
    }
}
