// Host emulation of the part of <cuda_fp8.h> kernels/fp8.cu uses: __nv_cvt_float_to_fp8 to e4m3
// with saturation to the largest finite value, which on sm_89+ is `cvt.rn.satfinite.e4m3x2.f32`.
// Written from the PTX ISA's definition (round to nearest, ties to even; NaN -> NaN; beyond the
// largest finite value, infinities included -> +-448) in double arithmetic, sharing nothing with
// engine/src/fp8.rs's bit manipulation or with the harness's exhaustive-search reference.
#pragma once

#include "cuda_bf16.h"

typedef unsigned char __nv_fp8_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat, __nv_fp8_interpretation_t kind) {
    if (sat != __NV_SATFINITE || kind != __NV_E4M3) emu::fail("only e4m3 with __NV_SATFINITE is emulated");
    if (isnan(x)) return 0x7F;
    const unsigned char sign = signbit(x) ? 0x80 : 0x00;
    double a = fabs(static_cast<double>(x));
    if (a > 448.0) a = 448.0;  // satfinite; also catches infinity before frexp
    // The grid step: 2^-9 below 2^-6 (subnormals), else 2^(floor(log2 a) - 3) (3 mantissa bits).
    int e = 0;
    frexp(a, &e);  // a = f * 2^e, f in [0.5, 1): floor(log2 a) = e - 1
    const int binade = a == 0.0 ? -6 : std::max(e - 1, -6);
    const double step = ldexp(1.0, binade - 3);
    double v = nearbyint(a / step) * step;  // a / step is exact (a power of two); nearbyint rounds to even
    if (v > 448.0) v = 448.0;
    if (v < ldexp(1.0, -6)) return static_cast<__nv_fp8_storage_t>(sign | static_cast<int>(v * 512.0));
    frexp(v, &e);
    const int exp_field = e - 1 + 7;
    const int mantissa = static_cast<int>((v / ldexp(1.0, e - 1) - 1.0) * 8.0);
    return static_cast<__nv_fp8_storage_t>(sign | (exp_field << 3) | mantissa);
}
