//! Rotary inverse frequencies, computed once per model and shared by every backend.
//!
//! The arithmetic follows transformers step by step in f32 (`base ** (2i / dim)`, then Llama 3's
//! wavelength bands) so that angles match the reference to the last bit wherever f32 allows.

use crate::spec::RopeSpec;

/// `rotary_dim / 2` inverse frequencies, Llama 3 scaling applied when the spec has it.
pub fn inv_freq(spec: &RopeSpec) -> Vec<f32> {
    let dim = spec.rotary_dim as f32;
    let mut inv: Vec<f32> = (0..spec.rotary_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim;
            let p = (spec.theta as f64).powf(exponent as f64) as f32;
            1.0f32 / p
        })
        .collect();
    if let Some(s) = spec.llama3 {
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        for f in inv.iter_mut() {
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / *f;
            let scaled = if wavelen > low_wavelen { *f / s.factor } else { *f };
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen; // wavelengths are finite and positive
            *f = if medium {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * scaled / s.factor + smooth * scaled
            } else {
                scaled
            };
        }
    }
    inv
}

/// cos and sin tables `[position][i]` for positions `0..len`, `inv.len()` entries per position.
///
/// The angle is rounded to f32 first, as transformers computes it (`position * inv_freq` in f32);
/// cos and sin of that f32 angle are then evaluated in f64 and rounded once.
pub fn cos_sin(inv: &[f32], len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(len * inv.len());
    let mut sin = Vec::with_capacity(len * inv.len());
    for p in 0..len {
        for &f in inv {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Llama3Scaling;

    #[test]
    fn default_frequencies_follow_the_base() {
        let inv = inv_freq(&RopeSpec { theta: 10000.0, rotary_dim: 8, llama3: None });
        assert_eq!(inv.len(), 4);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.1).abs() < 1e-7);
        assert!((inv[3] - 0.001).abs() < 1e-9);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inv_freq(&RopeSpec { theta: 500000.0, rotary_dim: 128, llama3: None });
        let scaled = inv_freq(&RopeSpec { theta: 500000.0, rotary_dim: 128, llama3: Some(s) });
        // Wavelength below 8192/4 = 2048 positions: unchanged.
        assert_eq!(plain[0], scaled[0]);
        // Wavelength above 8192: divided by the factor.
        assert_eq!(plain[63] / 8.0, scaled[63]);
        // In between: strictly between the two.
        let mid = plain.iter().position(|f| {
            let w = 2.0 * std::f32::consts::PI / f;
            w > 2100.0 && w < 8000.0
        });
        let m = mid.expect("a medium frequency exists");
        assert!(scaled[m] < plain[m] && scaled[m] > plain[m] / 8.0);
    }
}
