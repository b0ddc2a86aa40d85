//! Causal grouped-query attention over packed sequences on the CPU.
//!
//! One task per (segment, KV head): a segment sees only its ancestors' tokens and its own, and
//! a task's arithmetic does not depend on how tasks are spread over threads, so scores are
//! batch-invariant. The query heads that share a KV head go through together, as rows of one
//! product: their keys and values are packed once, and the GEMM gets a taller block. A segment
//! that continues a shared prefix sees the prefix's keys and then its own, in position order:
//! exactly the keys, in exactly the order, of the same tokens packed as one unshared sequence,
//! so sharing changes no bit.
//!
//! Both products run through the GEMM's micro-kernels, a block of queries at a time: scores are
//! `Q K^T` (one FMA chain over the head's channels per query and key), and the output `P V` (one
//! chain over the keys in position order per query and channel). A block multiplies by the keys
//! up to its last query; the probabilities of keys a query does not see are exact zeros, and
//! adding `0 * v` leaves a running sum unchanged, so a query's bits do not depend on the block it
//! falls in (nor on how long its segment is).

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{matmul_leading, PackedMatrix};
use super::simd::{exp, isa, Isa};
use crate::backend::AttnLayout;

/// Query rows per block, over the heads of a KV group: bounds the scores' scratch to
/// `QB x keys` and skips most of the masked upper triangle.
const QB: usize = 128;

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// A task's buffers, reused across the tasks a thread runs.
#[derive(Default)]
struct Scratch {
    queries: Vec<f32>,
    scores: Vec<f32>,
    sums: Vec<f32>,
    acc: Vec<f32>,
}

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
        (0..cu_seqlens.len() - 1).flat_map(|s| (0..layout.kv_heads).map(move |kv| (s, kv))).collect();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    tasks.par_iter().for_each_init(Scratch::default, |scratch, &(s, kv)| {
        let range = cu_seqlens[s]..cu_seqlens[s + 1];
        let prefix = ancestors.get(s).map_or(&[][..], Vec::as_slice);
        // SAFETY: task (s, kv) writes only rows `range`, columns of the query heads of KV head
        // `kv`; tasks are disjoint.
        unsafe { one_group(qkv, layout, prefix, range, kv, out_ptr, scratch) }
    });
}

/// Turns raw scores `q . k` into `e^(s - max)` in place and returns their sum (in key order).
fn softmax_numerators(row: &mut [f32], scale: f32, softcap: Option<f32>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable {
        // SAFETY: AVX2 and FMA are present (every non-portable ISA has both).
        return unsafe { softmax_numerators_avx2(row, scale, softcap) };
    }
    softmax_body(row, scale, softcap)
}

/// [`softmax_body`] compiled with AVX2 and FMA, where the exponentials vectorize; the same
/// arithmetic, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_numerators_avx2(row: &mut [f32], scale: f32, softcap: Option<f32>) -> f32 {
    softmax_body(row, scale, softcap)
}

#[inline(always)]
fn softmax_body(row: &mut [f32], scale: f32, softcap: Option<f32>) -> f32 {
    row.iter_mut().for_each(|s| *s *= scale);
    if let Some(cap) = softcap {
        row.iter_mut().for_each(|s| *s = (*s / cap).tanh() * cap);
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    row.iter_mut().for_each(|s| *s = exp(*s - max));
    // A sequential sum: its order is part of the result.
    row.iter().fold(0.0f32, |sum, &p| sum + p)
}

/// The query heads of KV head `kv` over the rows `range` of one segment.
unsafe fn one_group(
    qkv: &[f32],
    l: &AttnLayout,
    prefix: &[Range<usize>],
    range: Range<usize>,
    kv: usize,
    out: SyncPtr,
    scratch: &mut Scratch,
) {
    if range.is_empty() {
        return;
    }
    let (d, w) = (l.head_dim, l.qkv_width());
    let group = l.heads / l.kv_heads;
    let heads = kv * group..(kv + 1) * group;
    let (k_off, v_off) = ((l.heads + kv) * d, (l.heads + l.kv_heads + kv) * d);
    let out_w = l.heads * d;
    // The key rows in position order: the ancestors' spans, then the segment's own rows.
    let rows: Vec<usize> = prefix.iter().cloned().flatten().chain(range.clone()).collect();
    let prefix_len = rows.len() - range.len();
    let keys = PackedMatrix::pack_rows_of(rows.len(), d, |j| &qkv[rows[j] * w + k_off..][..d]);
    let values = PackedMatrix::pack_columns_of(d, rows.len(), |j| &qkv[rows[j] * w + v_off..][..d]);
    let Scratch { queries, scores, sums, acc } = scratch;
    // Queries per head in a block; the block's rows are head-major.
    let qb = (QB / group).max(1);
    for b0 in (0..range.len()).step_by(qb) {
        let b1 = (b0 + qb).min(range.len());
        let m = b1 - b0;
        // Keys the block's last query sees.
        let seen = prefix_len + b1;
        queries.clear();
        for head in heads.clone() {
            for t in range.start + b0..range.start + b1 {
                queries.extend_from_slice(&qkv[t * w + head * d..][..d]);
            }
        }
        scores.resize(group * m * seen, 0.0);
        matmul_leading(queries, group * m, d, &keys, seen, scores);
        sums.clear();
        for (r, row) in scores.chunks_exact_mut(seen).enumerate() {
            let end = prefix_len + b0 + r % m + 1;
            // A sliding window keeps the latest `window` keys.
            let skip = l.window.map_or(0, |w| end.saturating_sub(w));
            row[..skip].fill(0.0);
            row[end..].fill(0.0);
            sums.push(softmax_numerators(&mut row[skip..end], l.scale, l.softcap));
        }
        acc.resize(group * m * d, 0.0);
        matmul_leading(scores, group * m, seen, &values, d, acc);
        for (r, (a, sum)) in acc.chunks_exact(d).zip(sums.iter()).enumerate() {
            let (head, i) = (heads.start + r / m, r % m);
            let inv = 1.0 / sum;
            let o = std::slice::from_raw_parts_mut(out.0.add((range.start + b0 + i) * out_w + head * d), d);
            for (oi, a) in o.iter_mut().zip(a) {
                *oi = a * inv;
            }
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
