//! Matrix multiplication for the CPU backend: `y = x @ w^T` with `w` packed once at load, in
//! f32 or in bf16 (then each input is rounded to bf16 as it is packed, as a bf16 GEMM takes it).
//!
//! Every output element is one fused multiply-add chain over `k = 0, 1, ..., K-1` in that order,
//! whatever the number of rows, the blocking, the thread count or the instruction set. Blocking
//! over K only stores the running sum to `y` and loads it back, which is exact. That is what
//! makes a sequence's score bit-identical alone or inside any batch, and the AVX-512, AVX2 and
//! portable kernels bit-identical to each other.
//!
//! A bf16 matrix widens each K block of a panel to f32 once per row block and then runs
//! the same f32 kernels: bf16 products are exact in f32, so the result is the f32 GEMM of the
//! bf16-rounded operands, bit for bit, on every instruction set.

use rayon::prelude::*;

use super::pages;
use super::precision::{bf16_value, round_bf16};
use super::simd::{isa, Isa};

/// Rows per micro-tile: 2 x 12 accumulators fill 24 of the 32 vector registers.
pub const MR: usize = 12;

/// How a multiplication is cut into blocks for the caches; the kernel's own tile is
/// `MR x Isa::tile_cols`.
#[derive(Debug, Clone, Copy)]
struct Blocking {
    /// Depth of one K block. Every K block after the first loads its outputs back into the
    /// accumulators before its first FMA.
    kc: usize,
    /// Rows per M block: their packed inputs for one K block stay in L2 across panels.
    mc: usize,
    /// Columns per N block: the M block's outputs in these columns stay in L2 across K blocks.
    nc: usize,
}

impl Blocking {
    /// Measured per kernel on the machines we have (docs/bench-cpu.md).
    fn of(isa: Isa) -> Blocking {
        match isa {
            // Zen 3, 2 cores, bench-small's four GEMMs side by side: K blocks of 256 with a
            // 16 KiB weight block in L1 ran at 165-171 GFLOP/s; not blocking K up to 4096 (the
            // weight strip then streams from L2, and no output is ever loaded back) at 180-186,
            // of a 205 GFLOP/s FMA ceiling. M and N blocks keep the packed rows (120 x K) and the
            // outputs (120 x 128) in L2.
            Isa::Avx2Fma => Blocking { kc: 4096, mc: 120, nc: 128 },
            // Zen 5 (AVX-512), where the 12x32 kernel reached ~96% of its peak; not re-tuned
            // without such a machine.
            Isa::Avx512 | Isa::Portable => Blocking { kc: 256, mc: 240, nc: usize::MAX },
        }
    }
}

/// A weight matrix `[n, k]` (rows are output features) stored as column panels of `nr`
/// outputs: panel `p` holds `w[p*nr + j][kk]` at `p*k*nr + kk*nr + j`, zero-padded past `n`.
/// `nr` is the micro-kernel's width on this CPU ([`Isa::tile_cols`]), so that the K block of a
/// kernel's columns is one contiguous run of memory.
#[derive(Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    nr: usize,
    data: Panels,
}

/// The packed values: f32, or bf16 bits (half the memory and bandwidth).
#[derive(Clone)]
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = if self.is_bf16() { "bf16" } else { "f32" };
        write!(f, "PackedMatrix[{}x{} {dtype}]", self.n, self.k)
    }
}

/// `w` (`[n, k]` row-major) as panels of `nr` columns, zero-padded past `n`.
fn pack_panels<T: Copy + Default + Send + Sync>(w: &[T], n: usize, k: usize, nr: usize) -> Vec<T> {
    assert_eq!(w.len(), n * k, "matrix data does not match its shape");
    if k == 0 {
        return Vec::new();
    }
    let mut data = pages::zeroed(n.div_ceil(nr) * k * nr);
    data.par_chunks_mut(k * nr).enumerate().for_each(|(p, panel)| {
        for j in 0..nr.min(n - p * nr) {
            let row = &w[(p * nr + j) * k..][..k];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * nr + j] = v;
            }
        }
    });
    data
}

/// Panel width for this CPU's micro-kernel.
fn panel_width() -> usize {
    isa().tile_cols()
}

impl PackedMatrix {
    /// Packs the row-major `[n, k]` matrix `w`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        let nr = panel_width();
        PackedMatrix { n, k, nr, data: Panels::F32(pack_panels(w, n, k, nr)) }
    }

    /// Packs the row-major `[n, k]` matrix of bf16 bits `w`: [`matmul`] then rounds each input
    /// to bf16 and computes the products in f32.
    pub fn pack_bf16(w: &[u16], n: usize, k: usize) -> Self {
        let nr = panel_width();
        PackedMatrix { n, k, nr, data: Panels::Bf16(pack_panels(w, n, k, nr)) }
    }

    /// Packs the `[n, k]` f32 matrix whose row `r` is `row(r)` (`k` values), on the calling
    /// thread: attention's keys, packed inside a parallel task.
    pub fn pack_rows_of<'a>(n: usize, k: usize, row: impl Fn(usize) -> &'a [f32]) -> Self {
        let nr = panel_width();
        let mut data = vec![0.0f32; n.div_ceil(nr) * k * nr];
        for r in 0..n {
            let panel = &mut data[(r / nr) * k * nr..][..k * nr];
            for (c, &v) in row(r)[..k].iter().enumerate() {
                panel[c * nr + r % nr] = v;
            }
        }
        PackedMatrix { n, k, nr, data: Panels::F32(data) }
    }

    /// Packs the `[n, k]` f32 matrix whose column `c` is `column(c)` (`n` values), on the
    /// calling thread: attention's values, whose rows are the head's channels. A column lands in
    /// each panel as one contiguous run, so this is a copy, not a transpose.
    pub fn pack_columns_of<'a>(n: usize, k: usize, column: impl Fn(usize) -> &'a [f32]) -> Self {
        let nr = panel_width();
        let mut data = vec![0.0f32; n.div_ceil(nr) * k * nr];
        for c in 0..k {
            for (p, part) in column(c)[..n].chunks(nr).enumerate() {
                data[p * k * nr + c * nr..][..part.len()].copy_from_slice(part);
            }
        }
        PackedMatrix { n, k, nr, data: Panels::F32(data) }
    }

    /// Whether the weights are bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.data, Panels::Bf16(_))
    }

    /// Bytes the packed weights take.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Panels::F32(d) => d.len() * 4,
            Panels::Bf16(d) => d.len() * 2,
        }
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Raw pointer that may cross threads: each task writes a disjoint set of output columns.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// `y[m, n] = x[m, k] @ w^T`, using the current rayon pool.
pub fn matmul(x: &[f32], m: usize, w: &PackedMatrix, y: &mut [f32]) {
    matmul_with(x, m, w, y, isa())
}

/// [`matmul`] with the kernel for `isa` (which the CPU must support).
fn matmul_with(x: &[f32], m: usize, w: &PackedMatrix, y: &mut [f32], isa: Isa) {
    let (n, k) = (w.n, w.k);
    let Some(a) = prepare(x, m, k, w, n, y) else { return };
    let panels = n.div_ceil(w.nr);
    // A few tasks per thread balance the ragged last panel without splitting rows, which would
    // make each task re-stream B.
    let tasks = (rayon::current_num_threads() * 2).clamp(1, panels);
    let y_ptr = SyncPtr(y.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|t| {
        let p0 = panels * t / tasks;
        let p1 = panels * (t + 1) / tasks;
        // SAFETY: task t writes only columns [p0*nr, p1*nr) ∩ [0, n) of y, disjoint from other
        // tasks; all reads stay inside `a` and `w.data` by construction of the packing.
        unsafe { panels_task(&a, m, w, (n, k), y_ptr, p0..p1, isa) };
    });
}

/// `y[m, n] = x[m, k] @ w[..n, ..k]^T` on the calling thread, for the leading `n` outputs and
/// `k` inputs of `w`: attention multiplies a block of queries by the keys up to the block's
/// last one. Each element is the same FMA chain as [`matmul`] computes.
pub fn matmul_leading(x: &[f32], m: usize, k: usize, w: &PackedMatrix, n: usize, y: &mut [f32]) {
    let Some(a) = prepare(x, m, k, w, n, y) else { return };
    // SAFETY: the only task writes all of y, which holds m * n values.
    unsafe { panels_task(&a, m, w, (n, k), SyncPtr(y.as_mut_ptr()), 0..n.div_ceil(w.nr), isa()) };
}

/// Checks the shapes of `y[m, n] = x[m, k] @ w[..n, ..k]^T` and packs `x`; `None` when there is
/// nothing to multiply (`y` is then already what it must be).
fn prepare(x: &[f32], m: usize, k: usize, w: &PackedMatrix, n: usize, y: &mut [f32]) -> Option<ReusedRows> {
    assert!(n <= w.n && k <= w.k, "[{n}, {k}] is not inside the {}x{} matrix", w.n, w.k);
    assert_eq!(x.len(), m * k, "input does not match K");
    assert_eq!(y.len(), m * n, "output does not match [m, n]");
    if k == 0 {
        y.fill(0.0);
    }
    (m > 0 && n > 0 && k > 0).then(|| ReusedRows(pack_input(x, m, k, w)))
}

/// `x` packed for `w`: rounded to bf16 when `w` is bf16, as a bf16 GEMM takes its input.
fn pack_input(x: &[f32], m: usize, k: usize, w: &PackedMatrix) -> Vec<f32> {
    // A fresh buffer of this size costs page faults that the packing itself does not
    // (cpu/buffers.rs): each thread keeps its last one. A nested call finds none and allocates.
    let mut a = PACKED_ROWS.with(std::cell::Cell::take);
    pack_rows(&mut a, x, m, k, w.is_bf16());
    a
}

thread_local! {
    /// The packed input of this thread's last matmul, for the next one.
    static PACKED_ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Packed input rows that go back to [`PACKED_ROWS`] when the multiplication is done.
struct ReusedRows(Vec<f32>);

impl std::ops::Deref for ReusedRows {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl Drop for ReusedRows {
    fn drop(&mut self) {
        let a = std::mem::take(&mut self.0);
        PACKED_ROWS.with(|c| c.set(a));
    }
}

/// Rows of `x` in tiles of `MR`: tile `t` holds `x[t*MR + i][kk]` at `t*k*MR + kk*MR + i`,
/// zero-padded past `m`. Broadcasts then walk memory sequentially instead of 12 rows that alias
/// in L1 when `k` is a multiple of 1024. With `round`, each value is rounded to bf16.
/// `a` is overwritten (resized, its old values never read).
fn pack_rows(a: &mut Vec<f32>, x: &[f32], m: usize, k: usize, round: bool) {
    let tiles = m.div_ceil(MR);
    pages::resize(a, tiles * k * MR, 0.0);
    a.par_chunks_mut(k * MR).enumerate().for_each(|(t, tile)| {
        let rows = MR.min(m - t * MR);
        transpose_tile(&x[t * MR * k..(t * MR + rows) * k], rows, k, tile);
        if round {
            tile.iter_mut().for_each(|v| *v = round_bf16(*v));
        }
    });
}

/// `tile[kk*MR + i] = x[i*k + kk]` for the `rows` rows of `x`, zeros past them.
fn transpose_tile(x: &[f32], rows: usize, k: usize, tile: &mut [f32]) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if rows == MR && isa() != Isa::Portable {
        // SAFETY: every non-portable ISA has AVX2; x holds MR rows of k and tile k rows of MR.
        done = unsafe { transpose_tile_avx2(x, k, tile) };
    }
    for i in 0..rows {
        for (kk, &v) in x[i * k..(i + 1) * k].iter().enumerate().skip(done) {
            tile[kk * MR + i] = v;
        }
    }
    // The micro-kernels never read padding rows; zeros keep a reused buffer's old values out.
    if rows < MR {
        for kk in 0..k {
            tile[kk * MR + rows..kk * MR + MR].fill(0.0);
        }
    }
}

/// [`transpose_tile`] of a full tile for the leading multiple of 8 of `k` (returned), 4 rows x
/// 8 columns at a time in registers: 128-bit stores where the scalar loop made one store per
/// value (packing was 3% of a forward).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_tile_avx2(x: &[f32], k: usize, tile: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= MR * k && tile.len() >= MR * k);
    let (xp, tp) = (x.as_ptr(), tile.as_mut_ptr());
    let k8 = k / 8 * 8;
    for kk in (0..k8).step_by(8) {
        for g in 0..MR / 4 {
            let r = |i: usize| _mm256_loadu_ps(xp.add((4 * g + i) * k + kk));
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
            let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
            // Column j of the 4 rows in the low half of cols[j], column j + 4 in the high half.
            let cols = [
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xEE>(t0, t2),
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xEE>(t1, t3),
            ];
            for (j, c) in cols.iter().enumerate() {
                _mm_storeu_ps(tp.add((kk + j) * MR + 4 * g), _mm256_castps256_ps128(*c));
                _mm_storeu_ps(tp.add((kk + j + 4) * MR + 4 * g), _mm256_extractf128_ps::<1>(*c));
            }
        }
    }
    k8
}

/// Panels `panels` of `y[m, n] = a @ w[..n, ..k]^T` (`a` packed by [`pack_rows`] with row length
/// `k`); panel strides are `w`'s own.
unsafe fn panels_task(
    a: &[f32],
    m: usize,
    w: &PackedMatrix,
    (n, k): (usize, usize),
    y: SyncPtr,
    panels: std::ops::Range<usize>,
    isa: Isa,
) {
    let Blocking { kc: kc_max, mc, nc } = Blocking::of(isa);
    // A bf16 block widened to f32: reused by every row tile of the row block.
    let mut wide = match w.data {
        Panels::F32(_) => Vec::new(),
        Panels::Bf16(_) => vec![0.0f32; kc_max.min(k) * w.nr],
    };
    let nr = w.nr;
    // Kernels narrower than the panels (AVX2 on a matrix packed for AVX-512) take it in strips.
    let width = isa.tile_cols().min(nr);
    let chunk = (nc / nr).max(1);
    for m0 in (0..m).step_by(mc) {
        let m1 = (m0 + mc).min(m);
        for c0 in panels.clone().step_by(chunk) {
            let chunk = c0..(c0 + chunk).min(panels.end);
            for k0 in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - k0);
                for p in chunk.clone() {
                    let start = p * w.k * nr + k0 * nr;
                    let b = match &w.data {
                        Panels::F32(d) => d.as_ptr().add(start),
                        Panels::Bf16(d) => {
                            for (o, &bits) in wide.iter_mut().zip(&d[start..start + kc * nr]) {
                                *o = bf16_value(bits);
                            }
                            wide.as_ptr()
                        }
                    };
                    for j0 in (0..nr.min(n - p * nr)).step_by(width) {
                        let ncols = width.min(n - p * nr - j0);
                        for i0 in (m0..m1).step_by(MR) {
                            let tile = Tile {
                                a: a.as_ptr().add((i0 / MR) * k * MR + k0 * MR),
                                b: b.add(j0),
                                ldb: nr,
                                c: y.0.add(i0 * n + p * nr + j0),
                                ldc: n,
                                kc,
                                accumulate: k0 > 0,
                                ncols,
                            };
                            tile.run(MR.min(m1 - i0), isa);
                        }
                    }
                }
            }
        }
    }
}

/// One micro-tile: `rows x ncols` outputs at `c`, advanced by `kc` steps of packed `a` and `b`.
struct Tile {
    a: *const f32,
    b: *const f32,
    /// Distance between consecutive k of `b`: the panel width.
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    kc: usize,
    accumulate: bool,
    ncols: usize,
}

macro_rules! dispatch_rows {
    ($self:ident, $rows:expr, $f:ident) => {
        match $rows {
            1 => $self.$f::<1>(),
            2 => $self.$f::<2>(),
            3 => $self.$f::<3>(),
            4 => $self.$f::<4>(),
            5 => $self.$f::<5>(),
            6 => $self.$f::<6>(),
            7 => $self.$f::<7>(),
            8 => $self.$f::<8>(),
            9 => $self.$f::<9>(),
            10 => $self.$f::<10>(),
            11 => $self.$f::<11>(),
            12 => $self.$f::<12>(),
            r => unreachable!("tile of {r} rows"),
        }
    };
}

impl Tile {
    /// `isa` must be supported by this CPU.
    unsafe fn run(&self, rows: usize, isa: Isa) {
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => return dispatch_rows!(self, rows, avx512),
            Isa::Avx2Fma => return dispatch_rows!(self, rows, avx2),
            Isa::Portable => {}
        }
        self.portable(rows)
    }

    /// Reference kernel: the same FMA chain per element as the vector kernel.
    unsafe fn portable(&self, rows: usize) {
        for i in 0..rows {
            for j in 0..self.ncols {
                let c = self.c.add(i * self.ldc + j);
                let mut acc = if self.accumulate { *c } else { 0.0 };
                for p in 0..self.kc {
                    acc = (*self.a.add(p * MR + i)).mul_add(*self.b.add(p * self.ldb + j), acc);
                }
                *c = acc;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let lo: __mmask16 = if self.ncols >= 16 { 0xffff } else { (1u16 << self.ncols) - 1 };
        let hi: __mmask16 = if self.ncols >= 32 {
            0xffff
        } else if self.ncols > 16 {
            (1u16 << (self.ncols - 16)) - 1
        } else {
            0
        };
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        if self.accumulate {
            for i in 0..R {
                acc0[i] = _mm512_maskz_loadu_ps(lo, self.c.add(i * self.ldc));
                acc1[i] = _mm512_maskz_loadu_ps(hi, self.c.add(i * self.ldc + 16));
            }
        }
        let (mut a, mut b) = (self.a, self.b);
        for _ in 0..self.kc {
            let b0 = _mm512_loadu_ps(b);
            // Masked: a 16-column panel (packed for AVX2) has no second half.
            let b1 = _mm512_maskz_loadu_ps(hi, b.add(16));
            for i in 0..R {
                let av = _mm512_set1_ps(*a.add(i));
                acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
                acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
            }
            a = a.add(MR);
            b = b.add(self.ldb);
        }
        for i in 0..R {
            _mm512_mask_storeu_ps(self.c.add(i * self.ldc), lo, acc0[i]);
            _mm512_mask_storeu_ps(self.c.add(i * self.ldc + 16), hi, acc1[i]);
        }
    }

    /// AVX2 has 16 vector registers: `R` rows go through in groups of up to 6, each a 6x16
    /// micro-tile (12 accumulators, 2 panel vectors and a broadcast: 15 registers).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const R: usize>(&self) {
        let mut i0 = 0;
        while i0 < R {
            match R - i0 {
                1 => self.avx2_rows::<1>(i0),
                2 => self.avx2_rows::<2>(i0),
                3 => self.avx2_rows::<3>(i0),
                4 => self.avx2_rows::<4>(i0),
                5 => self.avx2_rows::<5>(i0),
                _ => self.avx2_rows::<6>(i0),
            }
            i0 += 6;
        }
    }

    /// Rows `i0..i0 + G` against the tile's (at most) 16 columns, read from a 16-column panel as
    /// one contiguous run (the 3x32 tile this replaced read half of each 128-byte panel row, so
    /// its weights used half of L1's sets). On one Zen 3 core this kernel runs at 97% of the FMA
    /// ceiling on data in L1; with `Blocking::of`'s AVX2 blocking the weights stream from L2 and
    /// bench-small's GEMMs run at 180-186 GFLOP/s on two cores (docs/bench-cpu.md).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_rows<const G: usize>(&self, i0: usize) {
        use std::arch::x86_64::*;
        const V: usize = 2;
        // Lanes of output vector v that are real columns (the panel is zero-padded; `c` is not).
        let ncols = self.ncols as i32;
        let mask = |v: usize| {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols - 8 * v as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        };
        let full = self.ncols == 8 * V;
        let c = |g: usize, v: usize| self.c.add((i0 + g) * self.ldc + 8 * v);
        let mut acc = [[_mm256_setzero_ps(); V]; G];
        if self.accumulate {
            for (g, row) in acc.iter_mut().enumerate() {
                for (v, a) in row.iter_mut().enumerate() {
                    *a = if full { _mm256_loadu_ps(c(g, v)) } else { _mm256_maskload_ps(c(g, v), mask(v)) };
                }
            }
        }
        let (mut a, mut b) = (self.a.add(i0), self.b);
        for _ in 0..self.kc {
            let bv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(b.add(8 * v)));
            for (g, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(g));
                for (r, b) in row.iter_mut().zip(&bv) {
                    *r = _mm256_fmadd_ps(av, *b, *r);
                }
            }
            a = a.add(MR);
            b = b.add(self.ldb);
        }
        for (g, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                if full {
                    _mm256_storeu_ps(c(g, v), *a);
                } else {
                    _mm256_maskstore_ps(c(g, v), mask(v), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    /// Every kernel this CPU can run (the AVX-512 and AVX2 ones are tested where they exist).
    fn supported() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2Fma);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
        }
        all
    }

    /// The FMA chain every element must equal, bit for bit.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).fold(0.0f32, |acc, kk| x[i * k + kk].mul_add(w[j * k + kk], acc));
            }
        }
        y
    }

    /// `w` packed in panels of `nr` columns, whatever this CPU's kernel width.
    fn packed_as(w: &[f32], n: usize, k: usize, nr: usize) -> PackedMatrix {
        PackedMatrix { n, k, nr, data: Panels::F32(pack_panels(w, n, k, nr)) }
    }

    /// Shapes with ragged edges in every dimension; the last two span several M, N and K blocks
    /// of every kernel's blocking.
    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (13, 33, 257),
        (25, 70, 600),
        (240, 64, 512),
        (241, 31, 5),
        (7, 96, 0),
        (250, 300, 530),
        (14, 40, 4300),
    ];

    #[test]
    fn matches_the_sequential_fma_chain_bit_for_bit_on_ragged_shapes() {
        for &(m, n, k) in &SHAPES {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let packed = PackedMatrix::pack(&w, n, k);
            let mut y = vec![f32::NAN; m * n];
            matmul(&x, m, &packed, &mut y);
            let r = reference(&x, m, &w, n, k);
            assert!(y.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()), "shape {m}x{n}x{k}");
            if k > 0 {
                // Every kernel on every panel width: AVX2 takes 32-column panels in strips, and
                // AVX-512 and the portable kernel take 16-column panels whole.
                for nr in [16, 32] {
                    let packed = packed_as(&w, n, k, nr);
                    for isa in supported() {
                        let mut yp = vec![f32::NAN; m * n];
                        matmul_with(&x, m, &packed, &mut yp, isa);
                        assert!(
                            yp.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} nr {nr} {m}x{n}x{k}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_bf16_matrix_is_the_fma_chain_over_bf16_rounded_operands_on_every_kernel() {
        use crate::cpu::precision::bf16_bits;
        for &(m, n, k) in &SHAPES {
            // Inputs with low bits set, so that rounding them to bf16 changes them.
            let x: Vec<f32> = random(m * k, 5).iter().map(|v| v * 3.0 + 1e-3).collect();
            let w = random(n * k, 6);
            let w_bits: Vec<u16> = w.iter().map(|&v| bf16_bits(v)).collect();
            let packed = PackedMatrix::pack_bf16(&w_bits, n, k);
            assert!(packed.is_bf16() && packed.bytes() == n.div_ceil(packed.nr) * k * packed.nr * 2);
            let xr: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            let wr: Vec<f32> = w_bits.iter().map(|&b| bf16_value(b)).collect();
            let r = reference(&xr, m, &wr, n, k);
            for isa in supported() {
                let mut y = vec![f32::NAN; m * n];
                matmul_with(&x, m, &packed, &mut y, isa);
                assert!(y.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa:?} {m}x{n}x{k}");
            }
            // And not the f32 product of the unrounded operands: the rounding did happen.
            if k > 1 {
                let mut y = vec![0.0; m * n];
                matmul(&x, m, &PackedMatrix::pack(&w, n, k), &mut y);
                assert!(y.iter().zip(&r).any(|(a, b)| a != b), "{m}x{n}x{k}");
            }
        }
    }

    #[test]
    fn the_leading_block_of_a_matrix_is_the_same_fma_chain_as_the_whole() {
        let (n, k) = (70, 45);
        let w = random(n * k, 8);
        let columns: Vec<Vec<f32>> = (0..k).map(|c| (0..n).map(|r| w[r * k + c]).collect()).collect();
        // Packed from its rows (attention's keys) and from its columns (its values).
        for packed in [
            PackedMatrix::pack_rows_of(n, k, |r| &w[r * k..(r + 1) * k]),
            PackedMatrix::pack_columns_of(n, k, |c| &columns[c]),
        ] {
            let mut whole = vec![0.0; 5 * n];
            let x = random(5 * k, 9);
            matmul(&x, 5, &packed, &mut whole);
            assert_eq!(bits(&whole), bits(&reference(&x, 5, &w, n, k)));
            for &(m, nn, kk) in &[(5, 70, 45), (13, 33, 20), (1, 1, 1), (3, 64, 44), (2, 0, 3), (2, 5, 0)] {
                let x = random(m * kk, 10);
                let sub: Vec<f32> = (0..nn).flat_map(|r| w[r * k..r * k + kk].to_vec()).collect();
                let mut y = vec![f32::NAN; m * nn];
                matmul_leading(&x, m, kk, &packed, nn, &mut y);
                assert_eq!(bits(&y), bits(&reference(&x, m, &sub, nn, kk)), "{m}x{nn}x{kk}");
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn a_row_gives_the_same_bits_whatever_rows_surround_it() {
        use crate::cpu::precision::bf16_bits;
        let (n, k) = (96, 700);
        let w = random(n * k, 3);
        let bits: Vec<u16> = w.iter().map(|&v| bf16_bits(v)).collect();
        for packed in [PackedMatrix::pack(&w, n, k), PackedMatrix::pack_bf16(&bits, n, k)] {
            let x = random(300 * k, 4);
            let mut all = vec![0.0; 300 * n];
            matmul(&x, 300, &packed, &mut all);
            for &row in &[0usize, 11, 12, 239, 240, 299] {
                let mut one = vec![0.0; n];
                matmul(&x[row * k..(row + 1) * k], 1, &packed, &mut one);
                assert_eq!(
                    one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    all[row * n..(row + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{packed:?} row {row}"
                );
            }
        }
    }
}
