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

/// Whether the AVX-512 variants of the hot loops may run on this CPU.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::LazyLock<bool> =
            std::sync::LazyLock::new(|| std::arch::is_x86_feature_detected!("avx512f"));
        *HAS
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
