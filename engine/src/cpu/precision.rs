//! The CPU backend's two compute precisions, and bf16 rounding.
//!
//! `bf16` reproduces, op for op, where the CUDA backend rounds to bf16 (docs/cuda.md): weights
//! and embedding table in bf16, GEMM inputs and outputs, norm outputs, q/k/v after rope and
//! q/k-norm, attention output and MLP activations rounded to bf16 once on store; the residual
//! stream, the final norm and the head in f32. Inside each op the CPU computes in f32 (a bf16
//! times a bf16 is exact in f32), so the two backends differ only by summation order.

use rayon::prelude::*;

/// What the CPU backend computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 everywhere, weights widened at load: the 1e-4 parity mode and the default.
    #[default]
    F32,
    /// bf16 weights and activations with an f32 residual stream, as the GPU computes: half the
    /// weight memory, outside the f32 parity bound (within the GPU's 2e-2).
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// `f32` or `bf16`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!("CPU precision {other:?}: expected f32 or bf16")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// `v` rounded to the nearest bf16, ties to even, as an f32 (NaN stays NaN; overflow gives
/// infinity). The same rounding as CUDA's `__float2bfloat16_rn`, branch-free on finite values
/// so that slices of it vectorize.
#[inline(always)]
pub fn round_bf16(v: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(v)) << 16)
}

/// `v` as bf16 bits, rounded to nearest even (see [`round_bf16`]).
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        // Keep the sign and force a quiet NaN: adding the rounding bias could carry a NaN's
        // payload into the exponent and make it infinity.
        return ((b >> 16) | 0x0040) as u16;
    }
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

/// bf16 bits as f32 (exact).
#[inline(always)]
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Rounds every value of `x` to bf16 in place, on the current rayon pool.
pub fn round_slice(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = round_bf16(*v)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values around every rounding case: ties both ways, carries into the exponent, the largest
    /// finite values, subnormals, zeros, infinities and NaNs.
    fn cases() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3fff_ffff),
            f32::from_bits(0x7f7f_8000),
        ];
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            v.push(f32::from_bits((s >> 32) as u32));
        }
        v
    }

    #[test]
    fn rounds_like_the_half_crate_to_nearest_even() {
        for v in cases() {
            let want = half::bf16::from_f32(v);
            let got = bf16_bits(v);
            if v.is_nan() {
                assert!(bf16_value(got).is_nan() && half::bf16::from_bits(got).is_nan(), "{v:e} ({:#x})", v.to_bits());
                assert_eq!(got & 0x8000, want.to_bits() & 0x8000, "sign of NaN {:#x}", v.to_bits());
            } else {
                assert_eq!(got, want.to_bits(), "{v:e} ({:#x})", v.to_bits());
                assert_eq!(round_bf16(v).to_bits(), want.to_f32().to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn parses_the_flag_values_and_refuses_others_by_name() {
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!(" F32 ".parse::<Precision>(), Ok(Precision::F32));
        let e = "fp8".parse::<Precision>().unwrap_err();
        assert!(e.contains("\"fp8\"") && e.contains("f32 or bf16"), "{e}");
    }
}
