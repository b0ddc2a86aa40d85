//! The kernel interface the forward graph is written against.
//!
//! A backend owns its tensor and weight types and implements a dozen operations; the graph in
//! [`crate::graph`] strings them together once for every architecture. Operations that a GPU
//! backend fuses (residual add + norm) are single calls here so that fusing needs no second graph.

use std::ops::Range;

use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};
use crate::spec::{MlpKind, NormKind};
use crate::weights::TensorView;

/// The attention geometry of one rank: heads are laid out in the fused q/k/v rows as all query
/// heads, then all key heads, then all value heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnLayout {
    /// Query heads on this rank.
    pub heads: usize,
    /// Key/value heads on this rank.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Leading channels of each head that are rotated.
    pub rotary_dim: usize,
    /// Softmax scale, `1 / sqrt(head_dim)` (Gemma 2: `1 / sqrt(query_pre_attn_scalar)`).
    pub scale: f32,
    /// Gemma 2's logit soft-capping: scores become `tanh(s / cap) * cap` before the softmax.
    pub softcap: Option<f32>,
    /// A sliding window: each query sees only the `window` latest keys of its sequence, itself
    /// included (Gemma 2's sliding layers).
    pub window: Option<usize>,
}

impl AttnLayout {
    /// Width of the fused q/k/v activation.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// An element-wise nonlinearity of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `relu(x)^2` (Nemotron's MLP).
    Relu2,
    /// `silu(gate) * up` over the two halves of the input (Llama's MLP); halves the width.
    SwiGlu,
    /// `relu(x)` (the hidden layer of a two-layer reward head).
    Relu,
    /// `gelu_tanh(gate) * up` over the two halves of the input (Gemma 2's MLP); halves the width.
    GeGlu,
}

impl From<MlpKind> for Activation {
    fn from(kind: MlpKind) -> Self {
        match kind {
            MlpKind::Relu2 => Activation::Relu2,
            MlpKind::SwiGlu => Activation::SwiGlu,
            MlpKind::GeGlu => Activation::GeGlu,
        }
    }
}

/// One block of a weight matrix to load: rows `rows` and columns `cols` of `view` (rows are
/// output features, columns input features). Column-parallel ranks take a row range, row-parallel
/// ranks a column range; the backend reads only that block from the mapped file.
///
/// An FP8 weight (`view` is e4m3) comes with the scales of its `rows`: a column-parallel rank's
/// scales are its own rows', a row-parallel rank holds every row and so the whole scale vector.
/// A bias (Qwen2's q/k/v, a reward head's layers) is added after the product and its scales,
/// so it composes with FP8 as `scale * (x W^T) + bias`.
#[derive(Debug, Clone)]
pub struct MatrixPart<'a> {
    /// The stored tensor, shape `[out, in]`.
    pub view: TensorView<'a>,
    /// The output rows this rank takes.
    pub rows: Range<usize>,
    /// The input columns this rank takes.
    pub cols: Range<usize>,
    /// For an e4m3 `view`: the per-output-channel scale of each row in `rows` (checked finite
    /// and positive, see [`crate::fp8::load_scales`]).
    pub scales: Option<Vec<f32>>,
    /// The whole bias vector `[out]` of the tensor, if it has one; the part adds its `rows`.
    pub bias: Option<TensorView<'a>>,
}

impl<'a> MatrixPart<'a> {
    /// All of `view`.
    pub fn whole(view: TensorView<'a>) -> Self {
        Self::block(view, 0..view.shape[0], 0..view.shape[1])
    }

    /// Rows `rows` and columns `cols` of `view`.
    pub fn block(view: TensorView<'a>, rows: Range<usize>, cols: Range<usize>) -> Self {
        MatrixPart { view, rows, cols, scales: None, bias: None }
    }

    /// Whether this part is e4m3 with scales: the matrix it goes into rounds its input to e4m3
    /// per token before multiplying.
    pub fn is_fp8(&self) -> bool {
        self.scales.is_some()
    }
}

/// Checks that `parts` can be stacked into one matrix (same number of input columns, blocks inside
/// their tensors) and returns that number of columns. Every backend's `matrix` starts here.
pub fn check_parts(parts: &[MatrixPart<'_>]) -> Result<usize> {
    let first = parts.first().ok_or_else(|| EngineError::Backend("a matrix needs at least one part".into()))?;
    let k = first.cols.len();
    for p in parts {
        let shape = p.view.shape;
        if shape.len() != 2 || p.rows.end > shape[0] || p.cols.end > shape[1] || p.rows.is_empty() {
            return Err(EngineError::Backend(format!(
                "rows {:?} x columns {:?} of {:?} (shape {shape:?}) is not a block of a matrix",
                p.rows, p.cols, p.view.name
            )));
        }
        let scales_fit = p.scales.as_ref().map(Vec::len) == Some(p.rows.len());
        if (p.view.dtype == crate::weights::Dtype::F8E4M3) != scales_fit {
            return Err(EngineError::Backend(format!(
                "{:?}: an e4m3 weight needs one scale per row, and only an e4m3 weight takes scales",
                p.view.name
            )));
        }
        if p.is_fp8() != first.is_fp8() {
            return Err(EngineError::Backend(format!(
                "cannot stack {:?} and {:?} into one matrix: one is FP8 and the other is not",
                first.view.name, p.view.name
            )));
        }
        if let Some(b) = &p.bias {
            if b.shape != [shape[0]] {
                return Err(EngineError::WrongShape {
                    name: b.name.to_string(),
                    expected: vec![shape[0]],
                    found: b.shape.to_vec(),
                });
            }
        }
        if p.cols.len() != k {
            return Err(EngineError::Backend(format!(
                "cannot stack {} columns of {:?} under a matrix with {k} columns",
                p.cols.len(),
                p.view.name
            )));
        }
    }
    Ok(k)
}

/// The bias of a matrix stacked from `parts`, one value per output row, or `None` when no part
/// has one (parts without a bias add zeros when another part of the stack has one).
pub fn stacked_bias(parts: &[MatrixPart<'_>]) -> Option<Vec<f32>> {
    parts.iter().any(|p| p.bias.is_some()).then(|| {
        let mut bias = Vec::new();
        for p in parts {
            match &p.bias {
                Some(b) => b.rows_to_f32(p.rows.clone(), &mut bias),
                None => bias.resize(bias.len() + p.rows.len(), 0.0),
            }
        }
        bias
    })
}

/// Checks the shapes of a q/k norm ([`Backend::qk_norm`]): a qkv row of `layout`'s width and
/// norms of `head_dim` channels (`q_len`, `k_len`).
pub fn check_qk_norm(qkv_cols: usize, layout: &AttnLayout, q_len: usize, k_len: usize) -> Result<()> {
    if qkv_cols != layout.qkv_width() || q_len != layout.head_dim || k_len != layout.head_dim {
        return Err(EngineError::Backend(format!(
            "qk_norm: a {qkv_cols}-wide qkv row and norms of {q_len} and {k_len} for heads of {}",
            layout.head_dim
        )));
    }
    Ok(())
}

/// Checks that two tensors of shapes `a` and `b` (rows, columns) can be combined element-wise.
pub fn check_same_shape(what: &str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a != b {
        return Err(EngineError::Backend(format!("{what}: shapes [{}, {}] and [{}, {}] differ", a.0, a.1, b.0, b.1)));
    }
    Ok(())
}

/// A compute backend: storage for activations and weights, and the kernels of the graph.
pub trait Backend: Send + Sync {
    /// Activations, `[rows, cols]`, row-major, resident where the backend computes.
    type Tensor: Send;
    /// A weight matrix prepared for [`Backend::matmul`].
    type Matrix: Send + Sync;
    /// Norm parameters prepared for [`Backend::norm`].
    type Norm: Send + Sync;
    /// The token embedding table.
    type Embedding: Send + Sync;
    /// Per-forward data derived from a batch (offsets, positions, rotary tables).
    type BatchCtx;

    /// A short name for logs and errors ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Loads a matrix whose output rows are the given parts stacked in order (this is how q, k
    /// and v, or gate and up, become one matrix and one multiplication).
    fn matrix(&self, parts: &[MatrixPart<'_>]) -> Result<Self::Matrix>;
    /// Loads norm parameters. For LayerNorm1P `weight` is the stored `gamma - 1`.
    fn norm_params(
        &self,
        kind: NormKind,
        eps: f32,
        weight: TensorView<'_>,
        bias: Option<TensorView<'_>>,
    ) -> Result<Self::Norm>;
    /// Loads the embedding table `[vocab, hidden]`; [`Backend::embed`] multiplies each gathered
    /// row by `scale` (Gemma 2's `sqrt(hidden)`, 1 for other families).
    fn embedding(&self, table: TensorView<'_>, scale: f32) -> Result<Self::Embedding>;

    /// Whether [`Backend::attention`] can read `batch`'s segments' ancestors' keys (shared
    /// prefixes). For a batch it cannot, the graph computes the items unshared: the same scores
    /// without the saving.
    fn shares_prefixes(&self, batch: &PackedBatch) -> bool {
        let _ = batch;
        true
    }

    /// Prepares one forward pass over `batch`; `inv_freq` are the rotary inverse frequencies.
    fn batch_ctx(&self, batch: &PackedBatch, inv_freq: &[f32]) -> Result<Self::BatchCtx>;

    /// Gathers the embedding rows of `tokens` (already checked to be inside the vocabulary).
    fn embed(&self, table: &Self::Embedding, tokens: &[u32]) -> Result<Self::Tensor>;
    /// `norm(x)` row by row.
    fn norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor>;
    /// The final norm, whose rows go to the f32 head on the host. A backend that keeps
    /// activations in a narrower type than f32 (CUDA: bf16) returns full precision here.
    fn final_norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor> {
        self.norm(x, p)
    }
    /// `x += delta; return norm(x)`: the residual add fused with the next block's norm.
    fn add_norm(&self, x: &mut Self::Tensor, delta: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor>;
    /// `x += delta`.
    fn add(&self, x: &mut Self::Tensor, delta: &Self::Tensor) -> Result<()>;
    /// The norm of a branch's output (attention or MLP) before its residual add: Gemma 2's
    /// `post_attention_layernorm` and `post_feedforward_layernorm`. The input is a matmul output,
    /// not the residual stream.
    fn branch_norm(&self, x: &Self::Tensor, p: &Self::Norm) -> Result<Self::Tensor>;
    /// `x @ w^T` for a matrix stored `[out, in]`; one call per weight matrix per batch.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Matrix) -> Result<Self::Tensor>;
    /// Rotates, in place, the first `rotary_dim` channels of every query and key head
    /// (non-interleaved `rotate_half` convention), each token at its own position in its sequence.
    fn rope(&self, qkv: &mut Self::Tensor, layout: &AttnLayout, ctx: &Self::BatchCtx) -> Result<()>;
    /// Per-head RMSNorm, in place, of every query head with `q` and every key head with `k`
    /// (Qwen3, before RoPE); each head's `head_dim` channels are one row of the norm.
    fn qk_norm(&self, qkv: &mut Self::Tensor, layout: &AttnLayout, q: &Self::Norm, k: &Self::Norm) -> Result<()>;
    /// Causal grouped-query attention within each packed sequence; returns `[tokens, heads * head_dim]`.
    fn attention(&self, qkv: &Self::Tensor, layout: &AttnLayout, ctx: &Self::BatchCtx) -> Result<Self::Tensor>;
    /// An element-wise nonlinearity (see [`Activation`]).
    fn activation(&self, x: &Self::Tensor, kind: Activation) -> Result<Self::Tensor>;

    // The graph knows which GEMM each norm and activation feeds; these let a backend hand that
    // GEMM its input in the form it multiplies (the CUDA backend: e4m3 codes with per-token
    // scales for an FP8 matrix, fused into the kernel that computes the values). The result
    // must only be given to `next`. By default, the plain op: the CPU backend rounds inside
    // `matmul`, which gives the same values.

    /// [`Backend::norm`] whose output is the input of `next` only.
    fn norm_for(&self, x: &Self::Tensor, p: &Self::Norm, next: &Self::Matrix) -> Result<Self::Tensor> {
        let _ = next;
        self.norm(x, p)
    }
    /// [`Backend::add_norm`] whose output is the input of `next` only.
    fn add_norm_for(
        &self,
        x: &mut Self::Tensor,
        delta: &Self::Tensor,
        p: &Self::Norm,
        next: &Self::Matrix,
    ) -> Result<Self::Tensor> {
        let _ = next;
        self.add_norm(x, delta, p)
    }
    /// [`Backend::activation`] whose output is the input of `next` only.
    fn activation_for(&self, x: &Self::Tensor, kind: Activation, next: &Self::Matrix) -> Result<Self::Tensor> {
        let _ = next;
        self.activation(x, kind)
    }
    /// The rows `rows` of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// Copies a tensor to host memory as f32, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// Makes a tensor from host f32 data, row-major (activations arriving from another stage).
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
}

/// Sums partial results across the ranks of one tensor-parallel group. Every call is collective:
/// each rank of the group makes the same calls in the same order. Implementations time out rather
/// than wait forever for a rank that died.
pub trait Communicator<T>: Send + Sync {
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Replaces `t` on every rank by the element-wise sum of all ranks' `t`.
    fn all_reduce(&self, t: &mut T) -> Result<()>;
}

/// The group of one: all-reduce is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl<T> Communicator<T> for SingleRank {
    fn world_size(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce(&self, _t: &mut T) -> Result<()> {
        Ok(())
    }
}

/// Tensors whose values can be read to and written from host memory as f32: what the in-process
/// communicator needs to sum ranks' tensors whatever device holds them.
pub trait HostTensor {
    /// The values, row-major, as f32.
    fn read_host(&self) -> Result<Vec<f32>>;
    /// Overwrites the values (same element count) from f32, row-major.
    fn write_host(&mut self, data: &[f32]) -> Result<()>;
}

/// A point-to-point link from one pipeline stage's rank to the same tensor-parallel rank of the
/// next stage, carrying the residual stream of a packed batch (`[tokens, hidden]`, f32).
pub trait StageLink<T>: Send + Sync {
    /// Sends `t` to the peer; returns once `t` may be reused.
    fn send(&self, t: &T) -> Result<()>;
    /// Receives a `[rows, cols]` tensor from the peer.
    fn recv(&self, rows: usize, cols: usize) -> Result<T>;
}
