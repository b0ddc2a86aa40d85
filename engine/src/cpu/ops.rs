//! Row-wise CPU kernels: norms, residual adds, biases, rotary embedding, activations.

use rayon::prelude::*;

use crate::backend::{Activation, AttnLayout};
use crate::spec::NormKind;

/// Rows handed to one rayon task: enough work to amortize scheduling.
const ROWS_PER_TASK: usize = 16;

/// Norm parameters with LayerNorm1P's `1 + w` folded in at load (f32, as transformers adds it).
#[derive(Debug, Clone)]
pub struct NormParams {
    /// Which norm.
    pub kind: NormKind,
    /// Epsilon.
    pub eps: f32,
    /// Effective scale: `1 + w` for LayerNorm1P, `w` for RMSNorm.
    pub gamma: Vec<f32>,
    /// Bias (LayerNorm1P only).
    pub beta: Option<Vec<f32>>,
}

/// Normalizes one row into `out`. Statistics are accumulated in f64: exact enough that the
/// result is the correctly rounded f32 for any realistic row, and independent of vector width.
pub fn norm_row(x: &[f32], p: &NormParams, out: &mut [f32]) {
    let n = x.len() as f64;
    match p.kind {
        NormKind::LayerNorm1P => {
            let mean = sum_f64(x, |v| v) / n;
            let var = sum_f64(x, |v| (v - mean).powi(2)) / n;
            let rstd = 1.0 / (var + p.eps as f64).sqrt();
            let beta = p.beta.as_deref().unwrap_or(&[]);
            for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                let normed = ((v as f64 - mean) * rstd) as f32;
                *o = normed * p.gamma[i] + beta.get(i).copied().unwrap_or(0.0);
            }
        }
        NormKind::RmsNorm | NormKind::RmsNorm1P => {
            let ms = sum_f64(x, |v| v.powi(2)) / n;
            let inv = (1.0 / (ms + p.eps as f64).sqrt()) as f32;
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(&p.gamma) {
                *o = g * (v * inv);
            }
        }
    }
}

/// Partial sums of a norm's statistics. A single running sum is a chain of dependent f64 adds,
/// one per 4 cycles: it made add_norm 2.6% of bench-small's forward. Lane `j` sums the elements
/// `j, j + LANES, ...` and the lanes are then added in order: the sums vectorize, and the order
/// is still fixed, so a row's statistics depend on nothing but the row.
const LANES: usize = 8;

/// `sum f(x_i)`, in f64, over [`LANES`] partial sums.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v as f64);
    }
    acc.iter().sum()
}

/// `out = norm(x)` for every row of width `cols`.
pub fn norm(x: &[f32], cols: usize, p: &NormParams, out: &mut [f32]) {
    out.par_chunks_mut(cols * ROWS_PER_TASK).zip(x.par_chunks(cols * ROWS_PER_TASK)).for_each(|(o, x)| {
        for (orow, xrow) in o.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            norm_row(xrow, p, orow);
        }
    });
}

/// `x += delta; out = norm(x)` in one pass over the rows.
pub fn add_norm(x: &mut [f32], delta: &[f32], cols: usize, p: &NormParams, out: &mut [f32]) {
    let chunk = cols * ROWS_PER_TASK;
    x.par_chunks_mut(chunk).zip(delta.par_chunks(chunk)).zip(out.par_chunks_mut(chunk)).for_each(|((x, d), o)| {
        for (xi, di) in x.iter_mut().zip(d) {
            *xi += di;
        }
        for (orow, xrow) in o.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            norm_row(xrow, p, orow);
        }
    });
}

/// `x += delta`.
pub fn add(x: &mut [f32], delta: &[f32]) {
    x.par_chunks_mut(4096).zip(delta.par_chunks(4096)).for_each(|(x, d)| {
        for (xi, di) in x.iter_mut().zip(d) {
            *xi += di;
        }
    });
}

/// `x[r, :] += bias` for every row (rows are `bias.len()` wide).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let cols = bias.len().max(1);
    x.par_chunks_mut(cols * ROWS_PER_TASK).for_each(|rows| {
        for row in rows.chunks_exact_mut(cols) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// Normalizes, in place, each query head with `q` and each key head with `k` (values untouched).
pub fn qk_norm(qkv: &mut [f32], l: &AttnLayout, q: &NormParams, k: &NormParams) {
    let (w, d) = (l.qkv_width(), l.head_dim);
    qkv.par_chunks_mut(w * ROWS_PER_TASK).for_each(|rows| {
        let mut normed = vec![0.0f32; d];
        for row in rows.chunks_exact_mut(w) {
            for h in 0..l.heads + l.kv_heads {
                let p = if h < l.heads { q } else { k };
                let head = &mut row[h * d..(h + 1) * d];
                norm_row(head, p, &mut normed);
                head.copy_from_slice(&normed);
            }
        }
    });
}

/// Rotates the leading `rotary_dim` channels of each query and key head of every token.
///
/// `cos`/`sin` are `[position][rotary_dim / 2]`. Written as `x1*c - x2*s` and `x2*c + x1*s` with
/// separate roundings, exactly as transformers' `q * cos + rotate_half(q) * sin`.
pub fn rope(qkv: &mut [f32], l: &AttnLayout, positions: &[u32], cos: &[f32], sin: &[f32]) {
    let w = l.qkv_width();
    let half = l.rotary_dim / 2;
    let rotated_heads = l.heads + l.kv_heads;
    qkv.par_chunks_mut(w * ROWS_PER_TASK).enumerate().for_each(|(c, rows)| {
        for (r, row) in rows.chunks_exact_mut(w).enumerate() {
            let pos = positions[c * ROWS_PER_TASK + r] as usize;
            let (cs, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
            for h in 0..rotated_heads {
                let head = &mut row[h * l.head_dim..][..l.rotary_dim];
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cs[i] - b * sn[i];
                    x2[i] = b * cs[i] + a * sn[i];
                }
            }
        }
    });
}

/// An element-wise nonlinearity. For SwiGLU the input's first half of columns is the gate.
pub fn activation(x: &[f32], cols: usize, kind: Activation, out: &mut [f32]) {
    match kind {
        Activation::Relu2 => out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                let r = v.max(0.0);
                *o = r * r;
            }
        }),
        Activation::Relu => out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v.max(0.0);
            }
        }),
        Activation::GeGlu => {
            let f = cols / 2;
            out.par_chunks_mut(f).zip(x.par_chunks(cols)).for_each(|(o, x)| {
                let (gate, up) = x.split_at(f);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = gelu_tanh(g) * u;
                }
            })
        }
        Activation::SwiGlu => {
            let f = cols / 2;
            out.par_chunks_mut(f).zip(x.par_chunks(cols)).for_each(|(o, x)| {
                let (gate, up) = x.split_at(f);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            })
        }
    }
}

/// GELU with the tanh approximation, as torch's `gelu(approximate="tanh")` writes it.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layernorm1p_adds_one_to_the_stored_weight() {
        // The stored weight is gamma - 1: a stored 0 means scale 1.
        let p = NormParams { kind: NormKind::LayerNorm1P, eps: 0.0, gamma: vec![1.0, 3.0], beta: Some(vec![0.5, 0.0]) };
        let mut out = [0.0; 2];
        norm_row(&[1.0, 3.0], &p, &mut out);
        assert_eq!(out, [-1.0 + 0.5, 3.0]);
    }

    #[test]
    fn norm_statistics_count_every_element_of_rows_of_any_length() {
        // A large mean and a small spread: statistics in f32 would lose the spread entirely.
        for len in [1usize, 7, 8, 9, 1000, 1027] {
            let x: Vec<f32> = (0..len).map(|i| 1000.0 + ((i * 37 % 11) as f32 - 5.0) * 1e-2).collect();
            let n = len as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
            let mut out = vec![0.0; len];
            // gamma as applied (the stored weight plus one).
            let ln = NormParams { kind: NormKind::LayerNorm1P, eps: 1e-5, gamma: vec![1.0; len], beta: None };
            norm_row(&x, &ln, &mut out);
            for (o, &v) in out.iter().zip(&x) {
                let want = ((v as f64 - mean) / (var + 1e-5).sqrt()) as f32;
                assert!((o - want).abs() <= 1e-6 * want.abs().max(1.0), "LayerNorm1P, length {len}: {o} vs {want}");
            }
            let rms = NormParams { kind: NormKind::RmsNorm, eps: 1e-5, gamma: vec![1.0; len], beta: None };
            norm_row(&x, &rms, &mut out);
            for (o, &v) in out.iter().zip(&x) {
                let want = v as f64 / (ms + 1e-5).sqrt();
                assert!((*o as f64 - want).abs() <= 1e-6, "RMSNorm, length {len}: {o} vs {want}");
            }
        }
    }

    #[test]
    fn rmsnorm_scales_by_root_mean_square() {
        let p = NormParams { kind: NormKind::RmsNorm, eps: 0.0, gamma: vec![1.0, 2.0], beta: None };
        let mut out = [0.0; 2];
        norm_row(&[3.0, 4.0], &p, &mut out);
        let rms = (12.5f64).sqrt();
        assert!((out[0] as f64 - 3.0 / rms).abs() < 1e-7 && (out[1] as f64 - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_only_the_rotary_slice_of_q_and_k() {
        let l =
            AttnLayout { heads: 1, kv_heads: 1, head_dim: 4, rotary_dim: 2, scale: 1.0, softcap: None, window: None };
        let mut qkv = vec![1.0, 2.0, 7.0, 8.0, 1.0, 2.0, 7.0, 8.0, 5.0, 5.0, 5.0, 5.0];
        let (c, s) = (0.6f32, 0.8f32);
        rope(&mut qkv, &l, &[1], &[1.0, c], &[0.0, s]);
        let rotated = [1.0 * c - 2.0 * s, 2.0 * c + 1.0 * s, 7.0, 8.0];
        assert_eq!(&qkv[..4], &rotated);
        assert_eq!(&qkv[4..8], &rotated);
        assert_eq!(&qkv[8..], &[5.0; 4], "values are not rotated");
    }

    #[test]
    fn qk_norm_normalizes_each_query_and_key_head_alone_and_leaves_values() {
        // One query head and one KV head of 2 channels: [q0 q1 | k0 k1 | v0 v1].
        let l =
            AttnLayout { heads: 1, kv_heads: 1, head_dim: 2, rotary_dim: 2, scale: 1.0, softcap: None, window: None };
        let q = NormParams { kind: NormKind::RmsNorm, eps: 0.0, gamma: vec![1.0, 2.0], beta: None };
        let k = NormParams { kind: NormKind::RmsNorm, eps: 0.0, gamma: vec![3.0, 1.0], beta: None };
        let mut qkv = vec![3.0, 4.0, 6.0, 8.0, 9.0, 9.0];
        qk_norm(&mut qkv, &l, &q, &k);
        let rms = (12.5f32).sqrt(); // both heads are (3, 4) up to scale: rms 2.5 x and 5 x
        let want = [3.0 / rms, 2.0 * 4.0 / rms, 3.0 * 3.0 / rms, 4.0 / rms, 9.0, 9.0];
        for (g, w) in qkv.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{qkv:?} vs {want:?}");
        }
    }

    #[test]
    fn bias_is_added_to_every_row() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        add_bias(&mut x, &[10.0, -1.0]);
        assert_eq!(x, [11.0, 1.0, 13.0, 3.0]);
    }

    #[test]
    fn activations() {
        let mut out = [0.0; 2];
        activation(&[-2.0, 3.0], 2, Activation::Relu2, &mut out);
        assert_eq!(out, [0.0, 9.0]);
        activation(&[-2.0, 3.0], 2, Activation::Relu, &mut out);
        assert_eq!(out, [0.0, 3.0]);
        let mut out = [0.0; 1];
        activation(&[1.0, 2.0], 2, Activation::GeGlu, &mut out);
        // gelu_tanh(1) = 0.841192 (torch.nn.functional.gelu(1., approximate="tanh")).
        assert!((out[0] - 2.0 * 0.841_192).abs() < 1e-6, "{out:?}");
        activation(&[1.0, 2.0], 2, Activation::SwiGlu, &mut out);
        assert!((out[0] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-7);
    }
}
