//! The CPU backend: f32 compute on a rayon pool, weights of any supported dtype widened to f32 at
//! load. Used for development, tests and small models, and as the reference for other backends.
//! Opt-in bf16 precision ([`Precision::Bf16`]) keeps bf16 weights and rounds activations where the
//! GPU does.

mod attention;
mod buffers;
pub mod gemm;
mod ops;
mod pages;
pub mod precision;
mod simd;

use std::sync::Arc;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::backend::{
    check_parts, check_qk_norm, check_same_shape, stacked_bias, Activation, AttnLayout, Backend, HostTensor, MatrixPart,
};
use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};
use crate::fp8;
use crate::rope;
use crate::spec::NormKind;
use crate::weights::TensorView;
use buffers::BufferPool;
use gemm::PackedMatrix;
pub use ops::NormParams;
pub use precision::Precision;

/// Activations on the CPU: `[rows, cols]` row-major f32.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Number of rows (tokens).
    pub rows: usize,
    /// Number of columns (features).
    pub cols: usize,
    /// Where the buffer goes back when the tensor is dropped (a backend's outputs).
    pool: Option<Arc<BufferPool>>,
}

impl CpuTensor {
    /// A tensor of `rows x cols` values (row-major).
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        CpuTensor { data, rows, cols, pool: None }
    }

    /// The values, row-major (the buffer then leaves the backend's pool).
    pub fn into_data(mut self) -> Vec<f32> {
        std::mem::take(&mut self.data)
    }
}

impl PartialEq for CpuTensor {
    fn eq(&self, other: &Self) -> bool {
        (self.rows, self.cols) == (other.rows, other.cols) && self.data == other.data
    }
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.give(std::mem::take(&mut self.data));
        }
    }
}

impl HostTensor for CpuTensor {
    fn read_host(&self) -> Result<Vec<f32>> {
        Ok(self.data.clone())
    }

    fn write_host(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.data.len() {
            return Err(EngineError::Backend(format!(
                "cannot write {} values into a {} x {} tensor",
                data.len(),
                self.rows,
                self.cols
            )));
        }
        self.data.copy_from_slice(data);
        Ok(())
    }
}

/// A weight matrix on the CPU: packed f32 (an FP8 weight dequantized at load), and whether its
/// input is rounded to e4m3 per token first, as the FP8 scheme computes it.
#[derive(Debug, Clone)]
pub struct CpuMatrix {
    /// The packed weights.
    pub packed: PackedMatrix,
    /// Round each input row to e4m3 with its own scale before multiplying (FP8 weights).
    pub fp8_input: bool,
    /// Added to every output row after the product (one value per output column).
    pub bias: Option<Vec<f32>>,
}

/// The token embedding table: f32 rows already multiplied by the scale, or (bf16 precision)
/// bf16 rows multiplied by the scale in f32 as they are gathered, as the GPU's `embed` does.
#[derive(Debug)]
pub enum CpuEmbedding {
    /// `[vocab, hidden]` f32, scaled.
    F32 {
        /// Row-major values.
        data: Vec<f32>,
        /// Columns (hidden size).
        cols: usize,
    },
    /// `[vocab, hidden]` bf16 bits, unscaled.
    Bf16 {
        /// Row-major bf16 bits.
        bits: Vec<u16>,
        /// Columns (hidden size).
        cols: usize,
        /// Multiplies each gathered value.
        scale: f32,
    },
}

/// Per-forward batch data: offsets, each segment's shared-prefix rows, positions and the rotary
/// tables up to the longest sequence.
#[derive(Debug)]
pub struct CpuBatch {
    cu_seqlens: Vec<usize>,
    ancestors: Vec<Vec<std::ops::Range<usize>>>,
    positions: Vec<u32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The CPU backend.
pub struct CpuBackend {
    pool: Arc<ThreadPool>,
    precision: Precision,
    buffers: Arc<BufferPool>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuBackend({} threads, {})", self.pool.current_num_threads(), self.precision)
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend with one thread per available core.
    pub fn new() -> Self {
        Self::with_threads(0).expect("a thread pool with the default size")
    }

    /// A backend with `threads` threads (0: one per available core).
    pub fn with_threads(threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("arbiter-cpu-{i}"))
            .build()
            .map_err(|e| EngineError::Backend(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend { pool: Arc::new(pool), precision: Precision::F32, buffers: BufferPool::shared() })
    }

    /// The same backend computing in `precision` (for matrices and tables loaded after this).
    pub fn with_precision(self, precision: Precision) -> Self {
        CpuBackend { precision, ..self }
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// What this backend computes in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Rounds an op's output to bf16 where the GPU stores bf16 (nothing in f32 precision).
    fn store(&self, mut t: CpuTensor) -> CpuTensor {
        self.store_in_place(&mut t);
        t
    }

    fn store_in_place(&self, t: &mut CpuTensor) {
        if self.precision == Precision::Bf16 {
            self.pool.install(|| precision::round_slice(&mut t.data));
        }
    }

    /// A matrix of bf16 weights (rounded to nearest even from f32 or f16 folders, as the GPU
    /// loads them). FP8 folders compute in f32 on the CPU: their dequantized weights are not
    /// bf16 values, and the GPU's FP8 path is a different GEMM.
    fn bf16_matrix(&self, parts: &[MatrixPart<'_>], k: usize) -> Result<CpuMatrix> {
        if let Some(p) = parts.iter().find(|p| p.is_fp8()) {
            return Err(EngineError::Backend(format!(
                "{}: FP8 weights run in f32 precision on the CPU; drop --cpu-precision bf16 for an FP8 folder",
                p.view.name
            )));
        }
        let mut bits = Vec::new();
        for p in parts {
            p.view.block_to_bf16_bits(p.rows.clone(), p.cols.clone(), &mut bits);
        }
        let n = parts.iter().map(|p| p.rows.len()).sum();
        let packed = self.pool.install(|| PackedMatrix::pack_bf16(&bits, n, k));
        Ok(CpuMatrix { packed, fp8_input: false, bias: stacked_bias(parts) })
    }

    /// An output tensor whose values the op then writes, every one of them: a reused buffer
    /// holds an earlier tensor's values.
    fn output(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor { data: self.buffers.take(rows * cols), rows, cols, pool: Some(self.buffers.clone()) }
    }
}

fn same_shape(a: &CpuTensor, b: &CpuTensor, what: &str) -> Result<()> {
    check_same_shape(what, (a.rows, a.cols), (b.rows, b.cols))
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = CpuMatrix;
    type Norm = NormParams;
    type Embedding = CpuEmbedding;
    type BatchCtx = CpuBatch;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn matrix(&self, parts: &[MatrixPart<'_>]) -> Result<CpuMatrix> {
        let k = check_parts(parts)?;
        if self.precision == Precision::Bf16 {
            return self.bf16_matrix(parts, k);
        }
        let mut rows = Vec::new();
        let mut n = 0;
        for p in parts {
            let start = rows.len();
            p.view.block_to_f32(p.rows.clone(), p.cols.clone(), &mut rows);
            if let Some(scales) = &p.scales {
                // Dequantize: e4m3 code value times its row's scale, exact in f32 up to one rounding.
                for (row, s) in rows[start..].chunks_exact_mut(k.max(1)).zip(scales) {
                    row.iter_mut().for_each(|v| *v *= s);
                }
            }
            n += p.rows.len();
        }
        let packed = self.pool.install(|| PackedMatrix::pack(&rows, n, k));
        Ok(CpuMatrix { packed, fp8_input: parts[0].is_fp8(), bias: stacked_bias(parts) })
    }

    fn norm_params(
        &self,
        kind: NormKind,
        eps: f32,
        weight: TensorView<'_>,
        bias: Option<TensorView<'_>>,
    ) -> Result<NormParams> {
        let mut gamma = weight.to_f32();
        if kind.adds_one() {
            gamma.iter_mut().for_each(|g| *g += 1.0);
        }
        Ok(NormParams { kind, eps, gamma, beta: bias.map(|b| b.to_f32()) })
    }

    fn embedding(&self, table: TensorView<'_>, scale: f32) -> Result<CpuEmbedding> {
        let (vocab, cols) = (table.shape[0], table.row_len());
        if self.precision == Precision::Bf16 {
            let mut bits = Vec::with_capacity(vocab * cols);
            table.block_to_bf16_bits(0..vocab, 0..cols, &mut bits);
            return Ok(CpuEmbedding::Bf16 { bits, cols, scale });
        }
        let mut data = table.to_f32();
        // Scaling the f32 table once rounds each product exactly as scaling each gathered row would.
        if scale != 1.0 {
            data.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(CpuEmbedding::F32 { data, cols })
    }

    fn batch_ctx(&self, batch: &PackedBatch, inv_freq: &[f32]) -> Result<CpuBatch> {
        let (cos, sin) = rope::cos_sin(inv_freq, batch.max_len());
        let ancestors = (0..batch.segments()).map(|s| batch.ancestor_rows(s)).collect();
        Ok(CpuBatch { cu_seqlens: batch.cu_seqlens().to_vec(), ancestors, positions: batch.positions(), cos, sin })
    }

    fn embed(&self, table: &CpuEmbedding, tokens: &[u32]) -> Result<CpuTensor> {
        let (h, vocab) = match table {
            CpuEmbedding::F32 { data, cols } => (*cols, data.len() / (*cols).max(1)),
            CpuEmbedding::Bf16 { bits, cols, .. } => (*cols, bits.len() / (*cols).max(1)),
        };
        let mut out = self.output(tokens.len(), h);
        for (row, &t) in out.data.chunks_exact_mut(h).zip(tokens) {
            let t = t as usize;
            if t >= vocab {
                return Err(EngineError::InvalidBatch(format!("token id {t} is outside the vocabulary of {vocab}")));
            }
            match table {
                CpuEmbedding::F32 { data, .. } => row.copy_from_slice(&data[t * h..(t + 1) * h]),
                CpuEmbedding::Bf16 { bits, scale, .. } => {
                    for (o, &b) in row.iter_mut().zip(&bits[t * h..(t + 1) * h]) {
                        *o = precision::bf16_value(b) * scale;
                    }
                }
            }
        }
        Ok(out)
    }

    fn norm(&self, x: &CpuTensor, p: &NormParams) -> Result<CpuTensor> {
        let mut out = self.output(x.rows, x.cols);
        self.pool.install(|| ops::norm(&x.data, x.cols, p, &mut out.data));
        Ok(self.store(out))
    }

    fn final_norm(&self, x: &CpuTensor, p: &NormParams) -> Result<CpuTensor> {
        // f32 in both precisions: its rows go to the f32 head.
        let mut out = self.output(x.rows, x.cols);
        self.pool.install(|| ops::norm(&x.data, x.cols, p, &mut out.data));
        Ok(out)
    }

    fn add_norm(&self, x: &mut CpuTensor, delta: &CpuTensor, p: &NormParams) -> Result<CpuTensor> {
        same_shape(x, delta, "residual add")?;
        let mut out = self.output(x.rows, x.cols);
        self.pool.install(|| ops::add_norm(&mut x.data, &delta.data, x.cols, p, &mut out.data));
        Ok(self.store(out))
    }

    fn branch_norm(&self, x: &CpuTensor, p: &NormParams) -> Result<CpuTensor> {
        self.norm(x, p)
    }

    fn add(&self, x: &mut CpuTensor, delta: &CpuTensor) -> Result<()> {
        same_shape(x, delta, "residual add")?;
        self.pool.install(|| ops::add(&mut x.data, &delta.data));
        Ok(())
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuMatrix) -> Result<CpuTensor> {
        let (k, n) = (w.packed.k(), w.packed.n());
        if x.cols != k {
            return Err(EngineError::Backend(format!("matmul: input has {} columns, matrix takes {k}", x.cols)));
        }
        let mut out = self.output(x.rows, n);
        let rounded;
        let input = if w.fp8_input {
            let mut r = x.data.clone();
            self.pool.install(|| r.par_chunks_mut(k.max(1)).for_each(|row| fp8::round_per_token(row, k)));
            rounded = r;
            &rounded
        } else {
            &x.data
        };
        self.pool.install(|| gemm::matmul(input, x.rows, &w.packed, &mut out.data));
        if let Some(bias) = &w.bias {
            // On the GPU the bias is added to the bf16 product: round it first in bf16 precision.
            out = self.store(out);
            self.pool.install(|| ops::add_bias(&mut out.data, bias));
        }
        Ok(self.store(out))
    }

    fn rope(&self, qkv: &mut CpuTensor, layout: &AttnLayout, ctx: &CpuBatch) -> Result<()> {
        self.pool.install(|| ops::rope(&mut qkv.data, layout, &ctx.positions, &ctx.cos, &ctx.sin));
        self.store_in_place(qkv);
        Ok(())
    }

    fn qk_norm(&self, qkv: &mut CpuTensor, layout: &AttnLayout, q: &NormParams, k: &NormParams) -> Result<()> {
        check_qk_norm(qkv.cols, layout, q.gamma.len(), k.gamma.len())?;
        self.pool.install(|| ops::qk_norm(&mut qkv.data, layout, q, k));
        self.store_in_place(qkv);
        Ok(())
    }

    fn attention(&self, qkv: &CpuTensor, layout: &AttnLayout, ctx: &CpuBatch) -> Result<CpuTensor> {
        let mut out = self.output(qkv.rows, layout.heads * layout.head_dim);
        self.pool.install(|| attention::attention(&qkv.data, layout, &ctx.cu_seqlens, &ctx.ancestors, &mut out.data));
        Ok(self.store(out))
    }

    fn activation(&self, x: &CpuTensor, kind: Activation) -> Result<CpuTensor> {
        let cols = match kind {
            Activation::Relu2 | Activation::Relu => x.cols,
            Activation::SwiGlu | Activation::GeGlu => x.cols / 2,
        };
        let mut out = self.output(x.rows, cols);
        self.pool.install(|| ops::activation(&x.data, x.cols, kind, &mut out.data));
        Ok(self.store(out))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut out = self.output(rows.len(), x.cols);
        for (o, &r) in out.data.chunks_exact_mut(x.cols).zip(rows) {
            o.copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(out)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            return Err(EngineError::Backend(format!("{} values cannot be a {rows} x {cols} tensor", data.len())));
        }
        Ok(CpuTensor::new(data.to_vec(), rows, cols))
    }
}
