//! A [`Backend`] decorator that counts and times every call by operation, for tests (how many
//! GEMMs a forward issues) and the CPU benchmark (where a forward's time goes), without counters
//! inside the production backends. Times are wall-clock around each call: exact for the CPU
//! backend, whose calls return when done; launch times only on an asynchronous one.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arbiter_engine::backend::{Activation, AttnLayout, Backend, MatrixPart};
use arbiter_engine::spec::NormKind;
use arbiter_engine::sync::lock;
use arbiter_engine::weights::TensorView;
use arbiter_engine::{PackedBatch, Result};

/// Calls and total time of one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpStats {
    pub calls: usize,
    pub time: Duration,
}

/// `B`, recording each call's operation and duration.
pub struct Instrumented<B> {
    inner: B,
    ops: Mutex<BTreeMap<&'static str, OpStats>>,
}

impl<B> Instrumented<B> {
    pub fn new(inner: B) -> Self {
        Instrumented { inner, ops: Mutex::default() }
    }

    /// Calls of `op` (a `Backend` method name) so far.
    pub fn calls(&self, op: &str) -> usize {
        lock(&self.ops).get(op).map_or(0, |s| s.calls)
    }

    /// Every operation called so far, by name.
    pub fn stats(&self) -> BTreeMap<&'static str, OpStats> {
        lock(&self.ops).clone()
    }

    /// Forgets what was recorded (after a warm-up).
    pub fn reset(&self) {
        lock(&self.ops).clear();
    }

    fn record<R>(&self, op: &'static str, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let took = t.elapsed();
        let mut ops = lock(&self.ops);
        let s = ops.entry(op).or_default();
        s.calls += 1;
        s.time += took;
        r
    }
}

impl<B: Backend> Backend for Instrumented<B> {
    type Tensor = B::Tensor;
    type Matrix = B::Matrix;
    type Norm = B::Norm;
    type Embedding = B::Embedding;
    type BatchCtx = B::BatchCtx;

    fn name(&self) -> String {
        self.inner.name()
    }
    fn matrix(&self, parts: &[MatrixPart<'_>]) -> Result<Self::Matrix> {
        self.inner.matrix(parts)
    }
    fn norm_params(
        &self,
        kind: NormKind,
        eps: f32,
        w: TensorView<'_>,
        b: Option<TensorView<'_>>,
    ) -> Result<Self::Norm> {
        self.inner.norm_params(kind, eps, w, b)
    }
    fn embedding(&self, table: TensorView<'_>, scale: f32) -> Result<Self::Embedding> {
        self.inner.embedding(table, scale)
    }
    fn shares_prefixes(&self, batch: &PackedBatch) -> bool {
        self.inner.shares_prefixes(batch)
    }
    fn batch_ctx(&self, batch: &PackedBatch, inv_freq: &[f32]) -> Result<Self::BatchCtx> {
        self.record("batch_ctx", || self.inner.batch_ctx(batch, inv_freq))
    }
    fn embed(&self, table: &Self::Embedding, tokens: &[u32]) -> Result<Self::Tensor> {
        self.record("embed", || self.inner.embed(table, tokens))
    }
    fn norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.record("norm", || self.inner.norm(x, p))
    }
    fn final_norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.record("final_norm", || self.inner.final_norm(x, p))
    }
    fn add_norm(&self, x: &mut Self::Tensor, delta: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.record("add_norm", || self.inner.add_norm(x, delta, p))
    }
    fn branch_norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.record("branch_norm", || self.inner.branch_norm(x, p))
    }
    fn add(&self, x: &mut Self::Tensor, delta: &Self::Tensor) -> Result<()> {
        self.record("add", || self.inner.add(x, delta))
    }
    fn matmul(&self, x: &Self::Tensor, w: &Self::Matrix) -> Result<Self::Tensor> {
        self.record("matmul", || self.inner.matmul(x, w))
    }
    fn rope(&self, qkv: &mut Self::Tensor, layout: &AttnLayout, ctx: &Self::BatchCtx) -> Result<()> {
        self.record("rope", || self.inner.rope(qkv, layout, ctx))
    }
    fn attention(&self, qkv: &Self::Tensor, layout: &AttnLayout, ctx: &Self::BatchCtx) -> Result<Self::Tensor> {
        self.record("attention", || self.inner.attention(qkv, layout, ctx))
    }
    fn qk_norm(&self, qkv: &mut Self::Tensor, layout: &AttnLayout, q: &Self::Norm, k: &Self::Norm) -> Result<()> {
        self.record("qk_norm", || self.inner.qk_norm(qkv, layout, q, k))
    }
    fn activation(&self, x: &Self::Tensor, kind: Activation) -> Result<Self::Tensor> {
        self.record("activation", || self.inner.activation(x, kind))
    }
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor> {
        self.record("gather_rows", || self.inner.gather_rows(x, rows))
    }
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>> {
        self.record("to_host", || self.inner.to_host(x))
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.record("upload", || self.inner.upload(data, rows, cols))
    }
}
