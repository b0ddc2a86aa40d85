//! Small vector helpers with a fixed summation order, so results do not depend on which
//! instruction set a function was compiled for.

/// Lanes of the fixed-order reductions (one AVX-512 register of f32).
const LANES: usize = 16;

/// `sum(a[i] * b[i])`: 16 lane-wise FMA chains, then a fixed pairwise tree.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (&a[c * LANES..][..LANES], &b[c * LANES..][..LANES]);
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for i in chunks * LANES..a.len() {
        let l = i - chunks * LANES;
        acc[l] = a[i].mul_add(b[i], acc[l]);
    }
    tree_sum(acc)
}

/// `y += alpha * x`, element-wise with FMA.
#[inline(always)]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = alpha.mul_add(*xi, *yi);
    }
}

#[inline(always)]
fn tree_sum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

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
