//! A [`Backend`] decorator that counts matrix multiplications, so tests can check how many GEMMs a
//! forward issues without a counter inside the production backends.

use std::sync::atomic::{AtomicUsize, Ordering};

use arbiter_engine::backend::{AttnLayout, Backend, MatrixPart};
use arbiter_engine::spec::{MlpKind, NormKind};
use arbiter_engine::weights::TensorView;
use arbiter_engine::{PackedBatch, Result};

/// `B`, counting its `matmul` calls.
pub struct Counting<B> {
    inner: B,
    matmuls: AtomicUsize,
}

impl<B> Counting<B> {
    pub fn new(inner: B) -> Self {
        Counting { inner, matmuls: AtomicUsize::new(0) }
    }

    /// Matrix multiplications issued so far.
    pub fn matmuls(&self) -> usize {
        self.matmuls.load(Ordering::Relaxed)
    }
}

impl<B: Backend> Backend for Counting<B> {
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
    fn embedding(&self, table: TensorView<'_>) -> Result<Self::Embedding> {
        self.inner.embedding(table)
    }
    fn batch_ctx(&self, batch: &PackedBatch, inv_freq: &[f32]) -> Result<Self::BatchCtx> {
        self.inner.batch_ctx(batch, inv_freq)
    }
    fn embed(&self, table: &Self::Embedding, tokens: &[u32]) -> Result<Self::Tensor> {
        self.inner.embed(table, tokens)
    }
    fn norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.inner.norm(x, p)
    }
    fn final_norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.inner.final_norm(x, p)
    }
    fn add_norm(&self, x: &mut Self::Tensor, delta: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.inner.add_norm(x, delta, p)
    }
    fn add(&self, x: &mut Self::Tensor, delta: &Self::Tensor) -> Result<()> {
        self.inner.add(x, delta)
    }
    fn matmul(&self, x: &Self::Tensor, w: &Self::Matrix) -> Result<Self::Tensor> {
        self.matmuls.fetch_add(1, Ordering::Relaxed);
        self.inner.matmul(x, w)
    }
    fn rope(&self, qkv: &mut Self::Tensor, layout: &AttnLayout, ctx: &Self::BatchCtx) -> Result<()> {
        self.inner.rope(qkv, layout, ctx)
    }
    fn attention(&self, qkv: &Self::Tensor, layout: &AttnLayout, ctx: &Self::BatchCtx) -> Result<Self::Tensor> {
        self.inner.attention(qkv, layout, ctx)
    }
    fn activation(&self, x: &Self::Tensor, kind: MlpKind) -> Result<Self::Tensor> {
        self.inner.activation(x, kind)
    }
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor> {
        self.inner.gather_rows(x, rows)
    }
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>> {
        self.inner.to_host(x)
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.inner.upload(data, rows, cols)
    }
}
