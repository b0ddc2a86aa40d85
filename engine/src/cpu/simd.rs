//! Which instruction set the hot loops use. Every kernel computes the same FMA chains in the same
//! order, so results do not depend on which one runs.

/// The widest instruction set the hot loops may use on this CPU. Every variant computes the same
/// FMA chains in the same order, so results are bit-identical whichever runs; only speed differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (16 f32 lanes).
    Avx512,
    /// AVX2 with FMA (8 f32 lanes): Zen 1-3, Haswell and later without AVX-512.
    Avx2Fma,
    /// Plain Rust; `mul_add` may be a library call where the CPU has no FMA.
    Portable,
}

impl Isa {
    /// Output columns of the GEMM micro-tile, two vectors, and so the width weights are packed
    /// in: AVX2's 16 registers hold a 6x16 tile, AVX-512's 32 a 12x32 one.
    pub fn tile_cols(self) -> usize {
        match self {
            Isa::Avx2Fma => 16,
            Isa::Avx512 | Isa::Portable => 32,
        }
    }
}

/// [`Isa`] of this CPU, detected once.
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::LazyLock<Isa> = std::sync::LazyLock::new(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                Isa::Avx2Fma
            } else {
                Isa::Portable
            }
        });
        *ISA
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Portable
    }
}

/// `e^x` to within 2 ulp (Cephes' single-precision polynomial): plain arithmetic with explicit
/// FMAs, so it gives the same bits scalar or vectorized on every CPU, and a loop over it
/// vectorizes where libm's `expf` is a call per element. Below -87 it returns 0; above 88, a
/// finite value near 1.65e38 (callers pass `s - max <= 0`).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // r = x - n ln 2, with ln 2 in two parts so that n ln 2 is exact to f32 precision.
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^n from n's integer bits: exponent field n + 127.
    let pow2 = f32::from_bits((shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst:.2} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }
}
