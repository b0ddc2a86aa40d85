//! Causal grouped-query attention over packed sequences on the CPU.
//!
//! One task per (segment, query head): a segment sees only its ancestors' tokens and its own, and
//! a task's arithmetic does not depend on how tasks are spread over threads, so scores are
//! batch-invariant. A segment that continues a shared prefix reduces over the prefix's keys and
//! then its own, one key at a time in position order: exactly the keys, in exactly the order, of
//! the same tokens packed as one unshared sequence, so sharing changes no bit.

use std::ops::Range;

use rayon::prelude::*;

use super::simd::{axpy, dot, isa, Isa};
use crate::backend::AttnLayout;

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// `out[t, h*d..(h+1)*d] = softmax(q_t . k_j * scale, j <= t in t's sequence) @ v`, where
/// segment `s` (rows `cu_seqlens[s]..cu_seqlens[s + 1]`) is preceded in its sequence by the rows
/// `ancestors[s]` (root first; `ancestors` may be empty when no segment has any).
pub fn attention(
    qkv: &[f32],
    layout: &AttnLayout,
    cu_seqlens: &[usize],
    ancestors: &[Vec<Range<usize>>],
    out: &mut [f32],
) {
    let tokens = *cu_seqlens.last().unwrap_or(&0);
    let (h, d) = (layout.heads, layout.head_dim);
    assert_eq!(qkv.len(), tokens * layout.qkv_width());
    assert_eq!(out.len(), tokens * h * d);
    let tasks: Vec<(usize, usize)> =
        (0..cu_seqlens.len() - 1).flat_map(|s| (0..h).map(move |head| (s, head))).collect();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let isa = isa();
    tasks.par_iter().for_each_init(Vec::new, |scores, &(s, head)| {
        let range = cu_seqlens[s]..cu_seqlens[s + 1];
        let prefix = ancestors.get(s).map_or(&[][..], Vec::as_slice);
        // SAFETY: task (s, head) writes only rows `range`, columns of `head`; tasks are disjoint.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            match isa {
                Isa::Avx512 => return one_head_avx512(qkv, layout, prefix, range, head, out_ptr, scores),
                Isa::Avx2Fma => return one_head_avx2(qkv, layout, prefix, range, head, out_ptr, scores),
                Isa::Portable => {}
            }
            one_head(qkv, layout, prefix, range, head, out_ptr, scores)
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn one_head_avx512(
    qkv: &[f32],
    l: &AttnLayout,
    prefix: &[Range<usize>],
    range: Range<usize>,
    head: usize,
    out: SyncPtr,
    scores: &mut Vec<f32>,
) {
    one_head(qkv, l, prefix, range, head, out, scores)
}

/// [`one_head`] compiled for AVX2 with FMA: `mul_add` becomes one instruction (on a CPU without
/// FMA in the baseline target it is otherwise a slow library call), with the same rounding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn one_head_avx2(
    qkv: &[f32],
    l: &AttnLayout,
    prefix: &[Range<usize>],
    range: Range<usize>,
    head: usize,
    out: SyncPtr,
    scores: &mut Vec<f32>,
) {
    one_head(qkv, l, prefix, range, head, out, scores)
}

#[inline(always)]
unsafe fn one_head(
    qkv: &[f32],
    l: &AttnLayout,
    prefix: &[Range<usize>],
    range: Range<usize>,
    head: usize,
    out: SyncPtr,
    scores: &mut Vec<f32>,
) {
    let (d, w) = (l.head_dim, l.qkv_width());
    let kv = head / (l.heads / l.kv_heads);
    let (q_off, k_off, v_off) = (head * d, (l.heads + kv) * d, (l.heads + l.kv_heads + kv) * d);
    let out_w = l.heads * d;
    let mut acc = vec![0.0f32; d];
    // The key rows of query `t`: the prefix's spans, then the segment's own rows up to `t`
    // (position order), as plain ranges: a chained, flattened iterator per key cost more than
    // the arithmetic it fed.
    let mut spans: Vec<Range<usize>> = prefix.to_vec();
    spans.push(range.start..range.start);
    let prefix_len: usize = prefix.iter().map(Range::len).sum();
    for t in range.clone() {
        let q = &qkv[t * w + q_off..][..d];
        *spans.last_mut().expect("the own span") = range.start..t + 1;
        // A sliding window keeps the latest `window` keys.
        let seen = prefix_len + (t - range.start + 1);
        let skip = l.window.map_or(0, |w| seen.saturating_sub(w));
        let visible = || {
            let mut left = skip;
            spans.iter().map(move |r| {
                let cut = left.min(r.len());
                left -= cut;
                r.start + cut..r.end
            })
        };
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for r in visible() {
            for j in r {
                let mut s = dot(q, &qkv[j * w + k_off..][..d]) * l.scale;
                if let Some(cap) = l.softcap {
                    s = (s / cap).tanh() * cap;
                }
                max = max.max(s);
                scores.push(s);
            }
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        acc.fill(0.0);
        let mut p = scores.iter();
        for r in visible() {
            for (j, p) in r.zip(p.by_ref()) {
                axpy(*p, &qkv[j * w + v_off..][..d], &mut acc);
            }
        }
        let inv = 1.0 / sum;
        let o = std::slice::from_raw_parts_mut(out.0.add(t * out_w + head * d), d);
        for (oi, a) in o.iter_mut().zip(&acc) {
            *oi = a * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward softmax attention in f64 for one sequence.
    fn naive(qkv: &[f32], l: &AttnLayout, len: usize) -> Vec<f32> {
        let (d, w) = (l.head_dim, l.qkv_width());
        let mut out = vec![0.0f32; len * l.heads * d];
        for h in 0..l.heads {
            let kv = h / (l.heads / l.kv_heads);
            for t in 0..len {
                let s: Vec<f64> = (0..=t)
                    .map(|j| {
                        (0..d)
                            .map(|c| qkv[t * w + h * d + c] as f64 * qkv[j * w + (l.heads + kv) * d + c] as f64)
                            .sum::<f64>()
                            * l.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    let v: f64 = (0..=t).map(|j| e[j] * qkv[j * w + (l.heads + l.kv_heads + kv) * d + c] as f64).sum();
                    out[t * l.heads * d + h * d + c] = (v / z) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn packed_gqa_matches_naive_per_sequence() {
        let l =
            AttnLayout { heads: 4, kv_heads: 2, head_dim: 20, rotary_dim: 10, scale: 0.2, softcap: None, window: None };
        let lens = [5usize, 1, 17];
        let total: usize = lens.iter().sum();
        let mut seed = 7u64;
        let qkv: Vec<f32> = (0..total * l.qkv_width())
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        let cu = [0, 5, 6, 23];
        let mut out = vec![0.0; total * 4 * 20];
        attention(&qkv, &l, &cu, &[], &mut out);
        for (s, &len) in lens.iter().enumerate() {
            let w = l.qkv_width();
            let r = naive(&qkv[cu[s] * w..cu[s + 1] * w], &l, len);
            let got = &out[cu[s] * 80..cu[s + 1] * 80];
            for (a, b) in got.iter().zip(&r) {
                assert!((a - b).abs() < 1e-5, "sequence {s}: {a} vs {b}");
            }
        }
    }

    /// Rows of a fake q/k/v activation: a pure function of the token's place in its full
    /// sequence, as a row-independent GEMM and rope make the real one.
    fn row(l: &AttnLayout, seq: u64, pos: usize) -> Vec<f32> {
        let mut seed = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ pos as u64;
        (0..l.qkv_width())
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn a_shared_prefix_gives_the_bits_of_each_sequence_unshared() {
        let l =
            AttnLayout { heads: 4, kv_heads: 2, head_dim: 16, rotary_dim: 8, scale: 0.25, softcap: None, window: None };
        // Prefix rows are the same in every sequence (seq 0); branch rows differ per branch.
        let (prefix, branches) = (37usize, [5usize, 1, 23]);
        let full_row = |b: usize, pos: usize| if pos < prefix { row(&l, 0, pos) } else { row(&l, b as u64 + 1, pos) };
        let out_w = l.heads * l.head_dim;
        // Unshared: each branch packed with its own copy of the prefix.
        let mut alone = Vec::new();
        for (b, &n) in branches.iter().enumerate() {
            let qkv: Vec<f32> = (0..prefix + n).flat_map(|p| full_row(b, p)).collect();
            let mut out = vec![0.0; (prefix + n) * out_w];
            attention(&qkv, &l, &[0, prefix + n], &[], &mut out);
            alone.push(out);
        }
        // Shared: the prefix once, then the branches, each attending to it.
        let mut qkv: Vec<f32> = (0..prefix).flat_map(|p| full_row(0, p)).collect();
        let mut cu = vec![0, prefix];
        for (b, &n) in branches.iter().enumerate() {
            qkv.extend((prefix..prefix + n).flat_map(|p| full_row(b, p)));
            cu.push(cu.last().unwrap() + n);
        }
        let mut ancestors = vec![Vec::new()];
        ancestors.extend(branches.iter().map(|_| std::iter::once(0..prefix).collect::<Vec<_>>()));
        let mut out = vec![0.0; cu.last().unwrap() * out_w];
        attention(&qkv, &l, &cu, &ancestors, &mut out);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (b, a) in alone.iter().enumerate() {
            assert_eq!(bits(&out[..prefix * out_w]), bits(&a[..prefix * out_w]), "prefix rows, branch {b}");
            assert_eq!(bits(&out[cu[b + 1] * out_w..cu[b + 2] * out_w]), bits(&a[prefix * out_w..]), "branch {b}");
        }
    }
}
