// Runs the real kernels/norm.cu and kernels/elementwise.cu on the CPU (emulation in cuda_bf16.h)
// with the ABI's launch geometry, and compares with float64 references computed here. Built and
// run by kernels/tests/emulation.rs under AddressSanitizer (inputs and outputs are exactly-sized
// heap buffers, so a read or write past a row or a tail shows as an ASan report).
//
// Tolerances: bf16 outputs within half a bf16 ulp (2^-8 relative) of the exact value; f32 outputs
// within a few f32 ulps scaled by the conditioning of the operation; exact where the kernel's f32
// arithmetic is exact (residual add, widening, gathers, relu2 of a bf16).
// Exit status 0 when every check passes; one line per check on stdout.
#define EMU_SHARED_IS_STATIC 1
#include "cuda_bf16.h"

#include <math.h>

#include <random>
#include <string>
#include <vector>

#include "../../elementwise.cu"
#include "../../norm.cu"

namespace {

int failures = 0;

// Rounding to bf16 (round to nearest even) is off by at most half an ulp, i.e. 2^-8 of the value
// (just above a power of two); the slack covers the f32 arithmetic before the rounding.
constexpr double kBf16Tol = 1.0 / 256 * 1.001;

void report(const std::string& name, double err, double tol) {
    const bool ok = err <= tol;
    printf("%-4s %-52s max err %.3e (tol %.1e)\n", ok ? "ok" : "FAIL", name.c_str(), err, tol);
    if (!ok) ++failures;
}

template <typename T>
T* alloc(size_t n) {
    return static_cast<T*>(malloc(n * sizeof(T)));  // exact size: ASan redzone right after
}

float bf(__nv_bfloat16 v) { return __bfloat162float(v); }
__nv_bfloat16 to_bf(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }

emu::Dim3 dim(unsigned x, unsigned y = 1) { return emu::Dim3{x, y, 1}; }

void check_norm(std::mt19937& rng, int rows, int hidden, bool rms, bool with_delta, bool with_beta, bool f32_out,
                double mean_offset) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    float* x = alloc<float>(static_cast<size_t>(rows) * hidden);
    __nv_bfloat16* delta = with_delta ? alloc<__nv_bfloat16>(static_cast<size_t>(rows) * hidden) : nullptr;
    float* gamma = alloc<float>(hidden);
    float* beta = with_beta ? alloc<float>(hidden) : nullptr;
    std::vector<float> x0(static_cast<size_t>(rows) * hidden);
    for (size_t i = 0; i < x0.size(); ++i) x[i] = x0[i] = static_cast<float>(mean_offset) + normal(rng) * 2.0f;
    if (delta)
        for (size_t i = 0; i < x0.size(); ++i) delta[i] = to_bf(normal(rng));
    for (int c = 0; c < hidden; ++c) gamma[c] = 1.0f + 0.1f * normal(rng);
    if (beta)
        for (int c = 0; c < hidden; ++c) beta[c] = 0.1f * normal(rng);
    const float eps = 1e-5f;
    __nv_bfloat16* out_bf = f32_out ? nullptr : alloc<__nv_bfloat16>(static_cast<size_t>(rows) * hidden);
    float* out_f = f32_out ? alloc<float>(static_cast<size_t>(rows) * hidden) : nullptr;
    emu::launch(dim(rows), dim(ARB_NORM_THREADS), nullptr, 0, [&] {
        if (f32_out) {
            add_norm_f32(x, delta, gamma, beta, out_f, rows, hidden, eps, rms ? 1 : 0);
        } else {
            add_norm_bf16(x, delta, gamma, beta, out_bf, rows, hidden, eps, rms ? 1 : 0);
        }
    });
    double x_err = 0.0, out_err = 0.0;
    for (int r = 0; r < rows; ++r) {
        std::vector<double> v(hidden);
        double mean = 0.0;
        for (int c = 0; c < hidden; ++c) {
            const size_t i = static_cast<size_t>(r) * hidden + c;
            // The residual add is one f32 addition: exact comparison.
            const float added = delta ? x0[i] + bf(delta[i]) : x0[i];
            x_err = std::max(x_err, static_cast<double>(fabsf(x[i] - added)));
            v[c] = added;
            mean += v[c];
        }
        mean = rms ? 0.0 : mean / hidden;
        double var = 0.0;
        for (int c = 0; c < hidden; ++c) var += (v[c] - mean) * (v[c] - mean);
        var /= hidden;
        const double inv = 1.0 / sqrt(var + eps);
        for (int c = 0; c < hidden; ++c) {
            const size_t i = static_cast<size_t>(r) * hidden + c;
            const double ref = (v[c] - mean) * inv * gamma[c] + (beta ? beta[c] : 0.0);
            // Outputs are O(1); measure against max(|ref|, 1) so values near zero are not over-weighted.
            const double got = f32_out ? out_f[i] : bf(out_bf[i]);
            out_err = std::max(out_err, fabs(got - ref) / std::max(fabs(ref), 1.0));
        }
    }
    char name[160];
    snprintf(name, sizeof name, "%s %s rows=%d hidden=%d%s%s mean=%g", f32_out ? "add_norm_f32" : "add_norm_bf16",
             rms ? "rms" : "layer", rows, hidden, with_delta ? " +delta" : "", with_beta ? " +beta" : "", mean_offset);
    report(std::string(name) + " (x)", x_err, 0.0);
    // bf16: one ulp. f32: the subtraction x - mean loses ulp(|mean|) / std of relative precision
    // (~1e-4 at mean 1000, std 2); a one-pass E[x^2] - E[x]^2 variance would be off by ~1e-1 there.
    const double tol = f32_out ? 2e-6 + 1e-7 * fabs(mean_offset) : kBf16Tol;
    report(std::string(name) + " (out)", out_err, tol);
    free(x);
    free(delta);
    free(gamma);
    free(beta);
    free(out_bf);
    free(out_f);
}

void check_add_residual(std::mt19937& rng, long long n) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    float* x = alloc<float>(n);
    __nv_bfloat16* d = alloc<__nv_bfloat16>(n);
    std::vector<float> x0(n);
    for (long long i = 0; i < n; ++i) {
        x[i] = x0[i] = normal(rng);
        d[i] = to_bf(normal(rng));
    }
    emu::launch(dim(static_cast<unsigned>((n + 255) / 256)), dim(256), nullptr, 0, [&] { add_residual(x, d, n); });
    double err = 0.0;
    for (long long i = 0; i < n; ++i) err = std::max(err, static_cast<double>(fabsf(x[i] - (x0[i] + bf(d[i])))));
    report("add_residual n=" + std::to_string(n), err, 0.0);
    free(x);
    free(d);
}

void check_embed_gather(std::mt19937& rng) {
    const int vocab = 50, hidden = 300;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    __nv_bfloat16* table = alloc<__nv_bfloat16>(static_cast<size_t>(vocab) * hidden);
    for (int i = 0; i < vocab * hidden; ++i) table[i] = to_bf(normal(rng));
    const std::vector<unsigned> ids = {3, 0, 49, 3, 17};
    unsigned* tokens = alloc<unsigned>(ids.size());
    std::copy(ids.begin(), ids.end(), tokens);
    const int n = static_cast<int>(ids.size());
    float* x = alloc<float>(static_cast<size_t>(n) * hidden);
    emu::launch(dim(n), dim(ARB_ELEMENTWISE_THREADS), nullptr, 0, [&] { embed(table, tokens, x, n, hidden, 1.0f); });
    double err = 0.0;
    for (int t = 0; t < n; ++t)
        for (int c = 0; c < hidden; ++c)
            err = std::max(err, static_cast<double>(fabsf(x[t * hidden + c] - bf(table[ids[t] * hidden + c]))));
    report("embed tokens=5 hidden=300", err, 0.0);
    // Gemma 2's scale: one f32 multiplication of the widened value.
    emu::launch(dim(n), dim(ARB_ELEMENTWISE_THREADS), nullptr, 0, [&] { embed(table, tokens, x, n, hidden, 48.0f); });
    err = 0.0;
    for (int t = 0; t < n; ++t)
        for (int c = 0; c < hidden; ++c)
            err = std::max(err, static_cast<double>(fabsf(x[t * hidden + c] - bf(table[ids[t] * hidden + c]) * 48.0f)));
    report("embed scale=48 tokens=5 hidden=300", err, 0.0);

    const std::vector<int> which = {4, 0, 2};
    int* rows = alloc<int>(which.size());
    std::copy(which.begin(), which.end(), rows);
    float* out = alloc<float>(which.size() * hidden);
    emu::launch(dim(3), dim(ARB_ELEMENTWISE_THREADS), nullptr, 0, [&] { gather_rows(x, rows, out, 3, hidden); });
    err = 0.0;
    for (int i = 0; i < 3; ++i)
        for (int c = 0; c < hidden; ++c)
            err = std::max(err, static_cast<double>(fabsf(out[i * hidden + c] - x[which[i] * hidden + c])));
    report("gather_rows rows=4,0,2 cols=300", err, 0.0);
    // The bf16 gather copies bits: compare them, not values.
    unsigned short* xb = alloc<unsigned short>(n * hidden);
    for (int i = 0; i < n * hidden; ++i) xb[i] = static_cast<unsigned short>(i * 2654435761u >> 16);
    unsigned short* outb = alloc<unsigned short>(which.size() * hidden);
    emu::launch(dim(3), dim(ARB_ELEMENTWISE_THREADS), nullptr, 0, [&] { gather_rows_bf16(xb, rows, outb, 3, hidden); });
    int differing = 0;
    for (int i = 0; i < 3; ++i)
        for (int c = 0; c < hidden; ++c) differing += outb[i * hidden + c] != xb[which[i] * hidden + c];
    report("gather_rows_bf16 rows=4,0,2 cols=300", differing, 0.0);
    free(xb);
    free(outb);
    free(table);
    free(tokens);
    free(x);
    free(rows);
    free(out);
}

void check_activations(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const long long n = 777;
    __nv_bfloat16* in = alloc<__nv_bfloat16>(n);
    __nv_bfloat16* out = alloc<__nv_bfloat16>(n);
    for (long long i = 0; i < n; ++i) in[i] = to_bf(i == 0 ? 0.0 : normal(rng));
    emu::launch(dim(static_cast<unsigned>((n + 255) / 256)), dim(256), nullptr, 0, [&] { relu2(in, out, n); });
    double err = 0.0;
    for (long long i = 0; i < n; ++i) {
        const double v = std::max(0.0, static_cast<double>(bf(in[i])));
        err = std::max(err, static_cast<double>(fabsf(bf(out[i]) - bf(to_bf(v * v)))));  // a bf16 squared is exact in f32
    }
    report("relu2 n=777", err, 0.0);
    free(in);
    free(out);

    const int rows = 3, ffn = 300;  // ffn not a multiple of 256: a partial second block column
    __nv_bfloat16* gu = alloc<__nv_bfloat16>(static_cast<size_t>(rows) * 2 * ffn);
    __nv_bfloat16* act = alloc<__nv_bfloat16>(static_cast<size_t>(rows) * ffn);
    for (int i = 0; i < rows * 2 * ffn; ++i) gu[i] = to_bf(normal(rng));
    gu[0] = to_bf(-100.0);  // silu(-100) * up = -0 (expf(100) = inf), not NaN
    emu::launch(dim(rows, (ffn + 255) / 256), dim(ARB_ELEMENTWISE_THREADS), nullptr, 0,
                [&] { swiglu(gu, act, rows, ffn); });
    err = 0.0;
    for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < ffn; ++j) {
            const double g = bf(gu[r * 2 * ffn + j]), u = bf(gu[r * 2 * ffn + ffn + j]);
            const double ref = g / (1.0 + exp(-g)) * u;
            const double got = bf(act[r * ffn + j]);
            err = std::max(err, isnan(got) ? INFINITY : fabs(got - ref) / std::max(fabs(ref), 1e-3));
        }
    }
    report("swiglu rows=3 ffn=300", err, kBf16Tol);
    emu::launch(dim(rows, (ffn + 255) / 256), dim(ARB_ELEMENTWISE_THREADS), nullptr, 0,
                [&] { geglu(gu, act, rows, ffn); });
    err = 0.0;
    for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < ffn; ++j) {
            const double g = bf(gu[r * 2 * ffn + j]), u = bf(gu[r * 2 * ffn + ffn + j]);
            const double ref = 0.5 * g * (1.0 + tanh(sqrt(2.0 / M_PI) * (g + 0.044715 * g * g * g))) * u;
            const double got = bf(act[r * ffn + j]);
            err = std::max(err, isnan(got) ? INFINITY : fabs(got - ref) / std::max(fabs(ref), 1e-3));
        }
    }
    report("geglu rows=3 ffn=300", err, kBf16Tol * 1.01);
    free(gu);
    free(act);
}

// relu, add_bias and to_bf16: one bf16 rounding of an exact (or f32-exact) value each.
void check_head_kernels(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const long long n = 777;
    __nv_bfloat16* in = alloc<__nv_bfloat16>(n);
    __nv_bfloat16* out = alloc<__nv_bfloat16>(n);
    for (long long i = 0; i < n; ++i) in[i] = to_bf(i == 0 ? -0.0 : normal(rng));
    emu::launch(dim(static_cast<unsigned>((n + 255) / 256)), dim(256), nullptr, 0, [&] { relu(in, out, n); });
    double err = 0.0;
    for (long long i = 0; i < n; ++i) err = std::max(err, static_cast<double>(fabsf(bf(out[i]) - fmaxf(bf(in[i]), 0.0f))));
    report("relu n=777", err, 0.0);

    float* f = alloc<float>(n);
    for (long long i = 0; i < n; ++i) f[i] = normal(rng);
    emu::launch(dim(static_cast<unsigned>((n + 255) / 256)), dim(256), nullptr, 0, [&] { to_bf16(f, out, n); });
    err = 0.0;
    for (long long i = 0; i < n; ++i) {
        const double v = f[i];
        err = std::max(err, fabs(bf(out[i]) - v) / std::max(fabs(v), 1e-3));
    }
    report("to_bf16 n=777", err, kBf16Tol);
    free(in);
    free(out);
    free(f);

    const int rows = 3, cols = 300;  // a partial second block column
    __nv_bfloat16* y = alloc<__nv_bfloat16>(static_cast<size_t>(rows) * cols);
    std::vector<__nv_bfloat16> orig(static_cast<size_t>(rows) * cols);
    float* bias = alloc<float>(cols);
    for (int i = 0; i < rows * cols; ++i) y[i] = orig[i] = to_bf(normal(rng));
    for (int c = 0; c < cols; ++c) bias[c] = normal(rng);
    emu::launch(dim(rows, (cols + 255) / 256), dim(ARB_ELEMENTWISE_THREADS), nullptr, 0,
                [&] { add_bias(y, bias, rows, cols); });
    err = 0.0;
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            const double ref = static_cast<double>(bf(orig[r * cols + c])) + bias[c];
            err = std::max(err, fabs(bf(y[r * cols + c]) - ref) / std::max(fabs(ref), 1e-2));
        }
    }
    report("add_bias rows=3 cols=300", err, kBf16Tol);
    free(y);
    free(bias);
}

// qk_norm: q heads with q_gamma, k heads with k_gamma, values unchanged; head_dim 80 is not a
// multiple of the warp's 32 lanes.
void check_qk_norm(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 2.0f);
    const int tokens = 4, heads = 3, kv_heads = 2, head_dim = 80;
    const int width = (heads + 2 * kv_heads) * head_dim;
    const float eps = 1e-6f;
    __nv_bfloat16* qkv = alloc<__nv_bfloat16>(static_cast<size_t>(tokens) * width);
    std::vector<__nv_bfloat16> orig(static_cast<size_t>(tokens) * width);
    for (size_t i = 0; i < orig.size(); ++i) qkv[i] = orig[i] = to_bf(normal(rng));
    float* qg = alloc<float>(head_dim);
    float* kg = alloc<float>(head_dim);
    for (int c = 0; c < head_dim; ++c) {
        qg[c] = 1.0f + 0.2f * normal(rng);
        kg[c] = 1.0f + 0.2f * normal(rng);
    }
    emu::launch(dim(tokens, heads + kv_heads), dim(32), nullptr, 0,
                [&] { qk_norm(qkv, qg, kg, tokens, width, heads, kv_heads, head_dim, eps); });
    double err = 0.0, untouched = 0.0;
    for (int t = 0; t < tokens; ++t) {
        for (int h = 0; h < heads + 2 * kv_heads; ++h) {
            const size_t base = static_cast<size_t>(t) * width + static_cast<size_t>(h) * head_dim;
            if (h >= heads + kv_heads) {
                for (int c = 0; c < head_dim; ++c)
                    untouched = std::max(untouched, static_cast<double>(fabsf(bf(qkv[base + c]) - bf(orig[base + c]))));
                continue;
            }
            double ss = 0.0;
            for (int c = 0; c < head_dim; ++c) ss += static_cast<double>(bf(orig[base + c])) * bf(orig[base + c]);
            const double inv = 1.0 / sqrt(ss / head_dim + eps);
            const float* g = h < heads ? qg : kg;
            for (int c = 0; c < head_dim; ++c) {
                const double ref = g[c] * (bf(orig[base + c]) * inv);
                err = std::max(err, fabs(bf(qkv[base + c]) - ref) / std::max(fabs(ref), 1e-2));
            }
        }
    }
    report("qk_norm head_dim=80 q3 k2", err, kBf16Tol * 1.01);
    report("qk_norm (value heads unchanged)", untouched, 0.0);
    free(qkv);
    free(qg);
    free(kg);
}

void check_rope(std::mt19937& rng, int rotary_dim) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int tokens = 5, heads = 3, kv_heads = 1, head_dim = 64, rot_heads = heads + kv_heads;
    const int width = (heads + 2 * kv_heads) * head_dim;
    const int half = rotary_dim / 2, max_pos = 40;
    const std::vector<int> pos = {0, 1, 39, 7, 7};
    __nv_bfloat16* qkv = alloc<__nv_bfloat16>(static_cast<size_t>(tokens) * width);
    std::vector<__nv_bfloat16> orig(static_cast<size_t>(tokens) * width);
    for (size_t i = 0; i < orig.size(); ++i) qkv[i] = orig[i] = to_bf(normal(rng));
    int* positions = alloc<int>(tokens);
    std::copy(pos.begin(), pos.end(), positions);
    float* cos_t = alloc<float>(static_cast<size_t>(max_pos) * half);
    float* sin_t = alloc<float>(static_cast<size_t>(max_pos) * half);
    for (int p = 0; p < max_pos; ++p) {
        for (int i = 0; i < half; ++i) {
            const double angle = p * pow(10000.0, -2.0 * i / rotary_dim);
            cos_t[p * half + i] = static_cast<float>(cos(angle));
            sin_t[p * half + i] = static_cast<float>(sin(angle));
        }
    }
    const unsigned threads = std::min(256u, std::max(32u, 1u << static_cast<int>(ceil(log2(std::max(half, 1))))));
    emu::launch(dim(tokens, rot_heads), dim(threads), nullptr, 0, [&] {
        rope(qkv, positions, cos_t, sin_t, tokens, width, rot_heads, head_dim, rotary_dim);
    });
    double err = 0.0, untouched = 0.0;
    for (int t = 0; t < tokens; ++t) {
        for (int col = 0; col < width; ++col) {
            const int h = col / head_dim, c = col % head_dim;
            const size_t i = static_cast<size_t>(t) * width + col;
            if (h >= rot_heads || c >= rotary_dim) {
                untouched = std::max(untouched, static_cast<double>(fabsf(bf(qkv[i]) - bf(orig[i]))));
                continue;
            }
            const int k = c % half;
            const double cs = cos_t[pos[t] * half + k], sn = sin_t[pos[t] * half + k];
            const double a = bf(orig[static_cast<size_t>(t) * width + h * head_dim + k]);
            const double b = bf(orig[static_cast<size_t>(t) * width + h * head_dim + k + half]);
            const double ref = c < half ? a * cs - b * sn : b * cs + a * sn;
            err = std::max(err, fabs(bf(qkv[i]) - ref) / std::max(fabs(ref), 1e-2));
        }
    }
    const std::string name = "rope rotary_dim=" + std::to_string(rotary_dim) + " head_dim=64 q3 k1";
    report(name, err, kBf16Tol);
    report(name + " (other channels unchanged)", untouched, 0.0);
    free(qkv);
    free(positions);
    free(cos_t);
    free(sin_t);
}

}  // namespace

int main() {
    std::mt19937 rng(7);
    for (bool f32 : {false, true}) {
        check_norm(rng, 3, 1000, false, true, true, f32, 0.0);   // LayerNorm(1P) with bias, residual add
        check_norm(rng, 2, 2048, true, true, false, f32, 0.0);   // RMSNorm
        check_norm(rng, 2, 300, false, false, true, f32, 0.0);   // no delta (first layer), hidden < 2 blocks
        check_norm(rng, 2, 4096, false, true, true, f32, 1000.0);  // large mean: two-pass variance
    }
    check_add_residual(rng, 1000);
    check_embed_gather(rng);
    check_activations(rng);
    check_head_kernels(rng);
    check_qk_norm(rng);
    check_rope(rng, 64);  // full
    check_rope(rng, 16);  // partial (e.g. rotary_pct 0.25)
    return failures == 0 ? 0 : 1;
}
