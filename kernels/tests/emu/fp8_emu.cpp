// Runs the real kernels/fp8.cu (after norm.cu and elementwise.cu, as arbiter_kernels::FP8 compiles
// them) on the CPU and compares every output with the rounding rules of engine/src/fp8.rs, the
// CPU reference every backend reproduces, implemented here independently:
//
//   scale(row) = max(max|y| / 448, 1 / (448 * 512))    (f32 arithmetic, as fp8.rs)
//   code(y)    = the e4m3 value nearest to y / scale, ties to the even code, saturating at 448,
//                found by exhaustive search over the grid (no bit tricks shared with the kernel,
//                the emulated cvt in cuda_fp8.h, or fp8.rs).
//
// Where the kernel's f32 value y is exact (quantize_rows of bf16 input, relu / relu2 of bf16),
// codes and scales must be bit-identical. Where it comes out of f32 arithmetic whose last bit may
// differ from the float64 reference (norms, silu, gelu), the scale must agree to 1e-6 relative,
// at least 99.9% of codes must be identical and every other one the adjacent grid value (a y
// within an f32 ulp or two of a rounding boundary). Built and run by kernels/tests/emulation.rs
// under AddressSanitizer; one line per check, exit status 0 when all pass.
#define EMU_SHARED_IS_STATIC 1
#include "cuda_bf16.h"
#include "cuda_fp8.h"

#include <math.h>

#include <random>
#include <string>
#include <vector>

#include "../../norm.cu"
#include "../../elementwise.cu"
#include "../../fp8.cu"

namespace {

int failures = 0;

void report(const std::string& name, double err, double tol, const std::string& extra = "") {
    const bool ok = err <= tol;
    printf("%-4s %-58s max err %.3e (tol %.1e)%s\n", ok ? "ok" : "FAIL", name.c_str(), err, tol, extra.c_str());
    if (!ok) ++failures;
}

template <typename T>
T* alloc(size_t n) {
    return static_cast<T*>(malloc(n * sizeof(T)));  // exact size: ASan redzone right after
}

float bf(__nv_bfloat16 v) { return __bfloat162float(v); }
__nv_bfloat16 to_bf(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
emu::Dim3 dim(unsigned x, unsigned y = 1) { return emu::Dim3{x, y, 1}; }

// ---- the reference -----------------------------------------------------------------------------

// The value of a positive code 0..0x7E from the format's definition.
double grid_value(int code) {
    const int e = code >> 3, m = code & 7;
    return e == 0 ? m / 8.0 * ldexp(1.0, -6) : (1.0 + m / 8.0) * ldexp(1.0, e - 7);
}

double decode(unsigned char code) {
    if ((code & 0x7F) == 0x7F) return NAN;
    const double v = grid_value(code & 0x7F);
    return (code & 0x80) ? -v : v;
}

unsigned char ref_code(float x) {
    if (isnan(x)) return 0x7F;
    const double a = fabs(static_cast<double>(x));
    if (isinf(a)) return static_cast<unsigned char>((signbit(x) ? 0x80 : 0) | 0x7E);  // saturating
    int best = 0;
    double best_d = INFINITY;
    for (int c = 0; c < 0x7F; ++c) {
        const double d = fabs(grid_value(c) - a);
        if (d < best_d || (d == best_d && c % 2 == 0)) {
            best = c;
            best_d = d;
        }
    }
    return static_cast<unsigned char>((signbit(x) ? 0x80 : 0) | best);
}

float ref_scale(float absmax) { return std::max(absmax / 448.0f, 1.0f / (448.0f * 512.0f)); }

// One row's reference codes and scale from its values (f32, as fp8.rs rounds an f32 row).
float ref_row(const std::vector<float>& y, std::vector<unsigned char>& codes) {
    float m = 0.0f;
    for (float v : y) m = std::max(m, fabsf(v));
    const float s = ref_scale(m);
    codes.resize(y.size());
    for (size_t i = 0; i < y.size(); ++i) codes[i] = ref_code(y[i] / s);
    return s;
}

// Compares a kernel's codes and scales with the reference rows `ref` (values in float64, rounded
// to f32 for the reference rounding). exact: every code and scale identical.
// Otherwise scales within `scale_tol` relative and at most `adjacent_tol` of the codes adjacent.
void compare(const std::string& name, const std::vector<std::vector<double>>& ref, const unsigned char* codes,
             const float* scales, bool exact, double scale_tol = 1e-6, double adjacent_tol = 1e-3) {
    const size_t cols = ref.empty() ? 0 : ref[0].size();
    size_t total = 0, same = 0, adjacent = 0, far = 0;
    double scale_err = 0.0;
    for (size_t r = 0; r < ref.size(); ++r) {
        std::vector<float> y(cols);
        for (size_t c = 0; c < cols; ++c) y[c] = static_cast<float>(ref[r][c]);
        std::vector<unsigned char> want;
        const float s = ref_row(y, want);
        scale_err = std::max(scale_err, fabs(static_cast<double>(scales[r]) - s) / s);
        for (size_t c = 0; c < cols; ++c) {
            const unsigned char got = codes[r * cols + c];
            ++total;
            if (got == want[c]) {
                ++same;
            } else if (!exact && ((got ^ want[c]) & 0x80) == 0 && abs((got & 0x7F) - (want[c] & 0x7F)) == 1) {
                ++adjacent;
            } else if (!exact && (got & 0x7F) == 0 && (want[c] & 0x7F) == 0) {
                ++same;  // +0 / -0 from a value that rounds to zero either side of it
            } else {
                ++far;
            }
        }
    }
    char extra[96];
    snprintf(extra, sizeof extra, "  [%zu codes: %zu identical, %zu adjacent, %zu other]", total, same, adjacent, far);
    report(name + " (scales)", scale_err, exact ? 0.0 : scale_tol);
    // Codes: the fraction that is not identical (exact: must be 0; else at most 0.1%, all adjacent).
    const double off = total ? static_cast<double>(total - same) / total : 0.0;
    report(name + " (codes)", far ? INFINITY : off, exact ? 0.0 : adjacent_tol, extra);
}

// ---- the checks ----------------------------------------------------------------------------------

// Rows that probe the rounding: row 0 has absmax 448 (scale exactly 1) and every midpoint between
// adjacent grid values, the midpoints' bf16 neighbours, and their negatives; then random rows, a
// row of zeros (the scale floor), a tiny row (below the floor), an outlier row.
std::vector<std::vector<double>> probe_rows(std::mt19937& rng, int cols) {
    std::vector<std::vector<double>> rows;
    std::vector<double> mids = {448.0};
    for (int c = 0; c + 1 < 0x7F; ++c) {
        const float mid = static_cast<float>((grid_value(c) + grid_value(c + 1)) / 2.0);
        const __nv_bfloat16 b = to_bf(mid);
        mids.push_back(bf(b));  // exact: a midpoint has 5 significant bits
        __nv_bfloat16 up = b, down = b;
        up.bits += 1;
        down.bits -= 1;
        mids.push_back(bf(up));
        if (mid > 0.0f) mids.push_back(bf(down));
    }
    std::vector<double> row0(cols, 0.0);
    for (int c = 0; c < cols; ++c) row0[c] = (c / static_cast<int>(mids.size())) % 2 ? -mids[c % mids.size()] : mids[c % mids.size()];
    row0[0] = 448.0;
    rows.push_back(row0);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (double sd : {1.0, 3.0, 0.01}) {
        std::vector<double> r(cols);
        for (auto& v : r) v = bf(to_bf(normal(rng) * sd));
        rows.push_back(r);
    }
    rows.push_back(std::vector<double>(cols, 0.0));
    std::vector<double> tiny(cols), outlier(cols);
    for (int c = 0; c < cols; ++c) {
        tiny[c] = bf(to_bf(normal(rng) * 1e-7));
        outlier[c] = bf(to_bf(normal(rng)));
    }
    outlier[cols / 3] = bf(to_bf(3.0e4));
    rows.push_back(tiny);
    rows.push_back(outlier);
    return rows;
}

void check_quantize_rows(std::mt19937& rng, int cols) {
    const auto rows = probe_rows(rng, cols);
    const int n = static_cast<int>(rows.size());
    __nv_bfloat16* in = alloc<__nv_bfloat16>(static_cast<size_t>(n) * cols);
    for (int r = 0; r < n; ++r)
        for (int c = 0; c < cols; ++c) in[static_cast<size_t>(r) * cols + c] = to_bf(rows[r][c]);
    unsigned char* codes = alloc<unsigned char>(static_cast<size_t>(n) * cols);
    float* scales = alloc<float>(n);
    // One block more than rows: the extra block must return without touching anything.
    emu::launch(dim(n + 1), dim(ARB_FP8_THREADS), nullptr, 0, [&] { quantize_rows(in, codes, scales, n, cols); });
    compare("quantize_rows rows=" + std::to_string(n) + " cols=" + std::to_string(cols), rows, codes, scales, true);
    free(in);
    free(codes);
    free(scales);
}

// One row holding every bf16 value in [0, 1.53125], so absmax 1.53125 and scale 1.53125 / 448:
// x / s and x * (1 / s) round to different e4m3 codes for 30 of these values (found by search),
// so a kernel multiplying by the reciprocal instead of dividing, as fp8.rs does, fails here.
void check_quantize_every_bf16() {
    std::vector<double> row;
    for (uint16_t bits = 0; bits <= 0x3FC4; ++bits) row.push_back(bf(__nv_bfloat16{bits}));
    const int cols = static_cast<int>(row.size());
    __nv_bfloat16* in = alloc<__nv_bfloat16>(cols);
    for (int c = 0; c < cols; ++c) in[c] = to_bf(row[c]);
    unsigned char* codes = alloc<unsigned char>(cols);
    float* scales = alloc<float>(1);
    emu::launch(dim(1), dim(ARB_FP8_THREADS), nullptr, 0, [&] { quantize_rows(in, codes, scales, 1, cols); });
    compare("quantize_rows every bf16 in [0, 1.53125] (cols=" + std::to_string(cols) + ")", {row}, codes, scales, true);
    free(in);
    free(codes);
    free(scales);
}

void check_add_norm_fp8(std::mt19937& rng, int rows, int hidden, bool rms, bool with_delta, bool with_beta,
                        double mean_offset) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t n = static_cast<size_t>(rows) * hidden;
    float* x = alloc<float>(n);
    __nv_bfloat16* delta = with_delta ? alloc<__nv_bfloat16>(n) : nullptr;
    float* gamma = alloc<float>(hidden);
    float* beta = with_beta ? alloc<float>(hidden) : nullptr;
    std::vector<float> x0(n);
    for (size_t i = 0; i < n; ++i) x[i] = x0[i] = static_cast<float>(mean_offset) + normal(rng) * 2.0f;
    if (delta)
        for (size_t i = 0; i < n; ++i) delta[i] = to_bf(normal(rng));
    for (int c = 0; c < hidden; ++c) gamma[c] = 1.0f + 0.1f * normal(rng);
    gamma[hidden / 2] = 20.0f;  // an outlier channel, as trained models have: it sets each row's scale
    if (beta)
        for (int c = 0; c < hidden; ++c) beta[c] = 0.1f * normal(rng);
    const float eps = 1e-5f;
    unsigned char* codes = alloc<unsigned char>(n);
    float* scales = alloc<float>(rows);
    emu::launch(dim(rows), dim(ARB_NORM_THREADS), nullptr, 0,
                [&] { add_norm_fp8(x, delta, gamma, beta, codes, scales, rows, hidden, eps, rms ? 1 : 0); });
    double x_err = 0.0;
    std::vector<std::vector<double>> ref(rows, std::vector<double>(hidden));
    for (int r = 0; r < rows; ++r) {
        std::vector<double> v(hidden);
        double mean = 0.0;
        for (int c = 0; c < hidden; ++c) {
            const size_t i = static_cast<size_t>(r) * hidden + c;
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
        for (int c = 0; c < hidden; ++c) ref[r][c] = (v[c] - mean) * inv * gamma[c] + (beta ? beta[c] : 0.0);
    }
    char name[128];
    snprintf(name, sizeof name, "add_norm_fp8 %s rows=%d hidden=%d%s%s mean=%g", rms ? "rms" : "layer", rows, hidden,
             with_delta ? " +delta" : "", with_beta ? " +beta" : "", mean_offset);
    report(std::string(name) + " (x)", x_err, 0.0);
    // At mean 1000 the f32 statistics carry ~1e-4 relative error (norm.cu's two-pass variance;
    // the bf16 norm's emulation test allows the same), so more values land across a boundary.
    const double slack = 1e-7 * fabs(mean_offset);
    compare(name, ref, codes, scales, false, 1e-6 + slack, 1e-3 + 10 * slack);
    free(x);
    free(delta);
    free(gamma);
    free(beta);
    free(codes);
    free(scales);
}

void check_act_fp8(std::mt19937& rng, int kind, int rows, int cols) {
    const bool gated_kind = kind == ARB_FP8_ACT_SWIGLU || kind == ARB_FP8_ACT_GEGLU;
    const int width = gated_kind ? 2 * cols : cols;
    std::normal_distribution<float> normal(0.0f, 2.0f);
    __nv_bfloat16* in = alloc<__nv_bfloat16>(static_cast<size_t>(rows) * width);
    for (int i = 0; i < rows * width; ++i) in[i] = to_bf(normal(rng));
    // Row 1 is all negative: relu / relu2 give zeros, the scale floor.
    for (int c = 0; c < width && rows > 1; ++c) in[width + c] = to_bf(-fabs(normal(rng)) - 0.5);
    unsigned char* codes = alloc<unsigned char>(static_cast<size_t>(rows) * cols);
    float* scales = alloc<float>(rows);
    emu::launch(dim(rows), dim(ARB_FP8_THREADS), nullptr, 0, [&] { act_fp8(in, codes, scales, rows, cols, kind); });
    std::vector<std::vector<double>> ref(rows, std::vector<double>(cols));
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            const double a = bf(in[static_cast<size_t>(r) * width + c]);
            const double u = gated_kind ? bf(in[static_cast<size_t>(r) * width + cols + c]) : 0.0;
            switch (kind) {
                case ARB_FP8_ACT_RELU2: ref[r][c] = std::max(a, 0.0) * std::max(a, 0.0); break;
                case ARB_FP8_ACT_RELU: ref[r][c] = std::max(a, 0.0); break;
                case ARB_FP8_ACT_SWIGLU: ref[r][c] = a / (1.0 + exp(-a)) * u; break;
                default: ref[r][c] = 0.5 * a * (1.0 + tanh(sqrt(2.0 / M_PI) * (a + 0.044715 * a * a * a))) * u;
            }
        }
    }
    static const char* names[] = {"relu2", "relu", "swiglu", "geglu"};
    char name[96];
    snprintf(name, sizeof name, "act_fp8 %s rows=%d cols=%d", names[kind], rows, cols);
    // relu and relu2 of a bf16 are exact in f32: bit-identical codes.
    compare(name, ref, codes, scales, kind == ARB_FP8_ACT_RELU2 || kind == ARB_FP8_ACT_RELU);
    free(in);
    free(codes);
    free(scales);
}

void check_dequantize(std::mt19937& rng) {
    // Every code (NaNs included) in each row, rows with different scales, cols not a multiple of 256.
    const int rows = 3, cols = 300;
    std::uniform_real_distribution<float> u(0.001f, 10.0f);
    unsigned char* codes = alloc<unsigned char>(rows * cols);
    float* scales = alloc<float>(rows);
    __nv_bfloat16* out = alloc<__nv_bfloat16>(rows * cols);
    for (int i = 0; i < rows * cols; ++i) codes[i] = static_cast<unsigned char>(i % 256);
    for (int r = 0; r < rows; ++r) scales[r] = u(rng);
    emu::launch(dim(rows, (cols + 255) / 256), dim(ARB_FP8_THREADS), nullptr, 0,
                [&] { dequantize_rows(codes, scales, out, rows, cols); });
    double err = 0.0;
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            const size_t i = static_cast<size_t>(r) * cols + c;
            const double want = decode(codes[i]);
            const float got = bf(out[i]);
            if (isnan(want)) {
                err = std::max(err, isnan(got) ? 0.0 : INFINITY);
                continue;
            }
            // The product decode * scale in f32 (exact: 4 + 24 significant bits, one rounding) and
            // one rounding to bf16: fp8.rs's `decode(c) * s`, then the bf16 store.
            const float prod = static_cast<float>(want) * scales[r];
            err = std::max(err, static_cast<double>(fabsf(got - bf(__float2bfloat16_rn(prod)))));
        }
    }
    report("dequantize_rows every code, rows=3 cols=300", err, 0.0);
    free(codes);
    free(scales);
    free(out);
}

void check_scale_rows_cols(std::mt19937& rng, bool with_bias) {
    const int rows = 5, cols = 600;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> u(1e-4f, 1e-2f);
    float* acc = alloc<float>(rows * cols);
    float* rs = alloc<float>(rows);
    float* cs = alloc<float>(cols);
    float* bias = with_bias ? alloc<float>(cols) : nullptr;
    __nv_bfloat16* out = alloc<__nv_bfloat16>(rows * cols);
    for (int i = 0; i < rows * cols; ++i) acc[i] = normal(rng) * 1e5f;
    for (int r = 0; r < rows; ++r) rs[r] = u(rng);
    for (int c = 0; c < cols; ++c) cs[c] = u(rng);
    if (bias)
        for (int c = 0; c < cols; ++c) bias[c] = normal(rng);
    emu::launch(dim(rows, (cols + 255) / 256), dim(ARB_FP8_THREADS), nullptr, 0,
                [&] { scale_rows_cols(acc, rs, cs, bias, out, rows, cols); });
    double err = 0.0;
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            const size_t i = static_cast<size_t>(r) * cols + c;
            const double want = static_cast<double>(acc[i]) * rs[r] * cs[c] + (bias ? bias[c] : 0.0);
            err = std::max(err, fabs(bf(out[i]) - want) / std::max(fabs(want), 1e-2));
        }
    }
    // Half a bf16 ulp (2^-8 relative) plus the f32 products before the rounding.
    report(std::string("scale_rows_cols rows=5 cols=600") + (with_bias ? " +bias" : ""), err, 1.0 / 256 * 1.001);
    free(acc);
    free(rs);
    free(cs);
    free(bias);
    free(out);
}

}  // namespace

int main() {
    std::mt19937 rng(19);
    // The emulated conversion against the exhaustive-search reference on every bf16 value of the
    // e4m3 range and beyond (both ways of computing a code must agree before anything else).
    double conv_err = 0.0;
    for (uint32_t bits = 0; bits < 0x10000; ++bits) {
        const __nv_bfloat16 b{static_cast<uint16_t>(bits)};
        const float v = bf(b);
        const unsigned char got = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
        if (got != ref_code(v)) conv_err = std::max(conv_err, 1.0);
    }
    report("emulated cvt.rn.satfinite.e4m3 = reference, every bf16", conv_err, 0.0);

    for (int cols : {300, 1000, 64}) check_quantize_rows(rng, cols);
    check_quantize_every_bf16();
    check_add_norm_fp8(rng, 3, 1000, false, true, true, 0.0);    // LayerNorm(1P) + bias + residual add
    check_add_norm_fp8(rng, 2, 2048, true, true, false, 0.0);    // RMSNorm
    check_add_norm_fp8(rng, 2, 300, false, false, true, 0.0);    // first layer: no delta
    check_add_norm_fp8(rng, 2, 4096, false, true, true, 1000.0);  // large mean
    for (int kind : {ARB_FP8_ACT_RELU2, ARB_FP8_ACT_RELU, ARB_FP8_ACT_SWIGLU, ARB_FP8_ACT_GEGLU})
        check_act_fp8(rng, kind, 3, 700);
    check_dequantize(rng);
    check_scale_rows_cols(rng, false);
    check_scale_rows_cols(rng, true);
    return failures == 0 ? 0 : 1;
}
