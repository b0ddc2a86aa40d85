//! The forward graph, written once for every architecture and backend:
//!
//! `embed -> [norm, qkv, rope, attention, o, all_reduce, residual, norm, mlp, all_reduce,
//! residual] x L -> last-token gather -> final norm -> head (f32, on the host)`.
//!
//! The final norm is applied after the gather: it works row by row, so normalizing only the rows
//! that are read gives the same numbers for a fraction of the work.

use std::path::Path;

use crate::backend::{AttnLayout, Backend, Communicator, MatrixPart, SingleRank};
use crate::batch::PackedBatch;
use crate::config::load_config;
use crate::error::{EngineError, Result};
use crate::rope;
use crate::spec::{MlpKind, ModelSpec};
use crate::weights::WeightStore;

/// Weights of one transformer block.
struct Block<B: Backend> {
    attn_norm: B::Norm,
    qkv: B::Matrix,
    o: B::Matrix,
    mlp_norm: B::Norm,
    up: B::Matrix,
    down: B::Matrix,
}

/// The reward head, kept in f32 on the host: it runs on a handful of rows per batch.
#[derive(Debug, Clone)]
struct Head {
    /// `[outputs, hidden]`, row-major.
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
}

/// A loaded model on one backend, ready to run packed batches.
pub struct Model<B: Backend> {
    spec: ModelSpec,
    backend: B,
    comm: Box<dyn Communicator<B::Tensor>>,
    embedding: B::Embedding,
    blocks: Vec<Block<B>>,
    final_norm: B::Norm,
    head: Head,
    inv_freq: Vec<f32>,
    layout: AttnLayout,
}

impl<B: Backend> std::fmt::Debug for Model<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("spec", &self.spec).field("backend", &self.backend.name()).finish()
    }
}

/// Parses a model folder's config.json and memory-maps its weights.
pub fn open_folder(dir: &Path) -> Result<(ModelSpec, WeightStore)> {
    if !dir.is_dir() {
        return Err(EngineError::MissingFile {
            path: dir.to_path_buf(),
            why: "the model folder does not exist".into(),
        });
    }
    Ok((load_config(&dir.join("config.json"))?, WeightStore::open(dir)?))
}

impl<B: Backend> Model<B> {
    /// Loads the model folder `dir` (config.json plus safetensors) onto `backend`.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        let (spec, store) = open_folder(dir)?;
        Self::from_store(spec, &store, backend)
    }

    /// Builds the model from an already parsed spec and opened weights.
    pub fn from_store(spec: ModelSpec, store: &WeightStore, backend: B) -> Result<Self> {
        let h = spec.hidden;
        let d = spec.head_dim;
        let norm = |prefix: &str| -> Result<B::Norm> {
            let w = store.get_shaped(&format!("{prefix}.weight"), &[h])?;
            let b = if spec.norm_has_bias() { Some(store.get_shaped(&format!("{prefix}.bias"), &[h])?) } else { None };
            backend.norm_params(spec.norm, spec.norm_eps, w, b)
        };
        let part = |name: String, shape: [usize; 2]| -> Result<MatrixPart<'_>> {
            Ok(MatrixPart::whole(store.get_shaped(&name, &shape)?))
        };
        let embedding = backend.embedding(store.get_shaped("model.embed_tokens.weight", &[spec.vocab, h])?)?;
        let mut blocks = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            let attn = format!("{p}.self_attn");
            let qkv = backend.matrix(&[
                part(format!("{attn}.q_proj.weight"), [spec.heads * d, h])?,
                part(format!("{attn}.k_proj.weight"), [spec.kv_heads * d, h])?,
                part(format!("{attn}.v_proj.weight"), [spec.kv_heads * d, h])?,
            ])?;
            let o = backend.matrix(&[part(format!("{attn}.o_proj.weight"), [h, spec.heads * d])?])?;
            let up = match spec.mlp {
                MlpKind::Relu2 => backend.matrix(&[part(format!("{p}.mlp.up_proj.weight"), [spec.ffn, h])?])?,
                MlpKind::SwiGlu => backend.matrix(&[
                    part(format!("{p}.mlp.gate_proj.weight"), [spec.ffn, h])?,
                    part(format!("{p}.mlp.up_proj.weight"), [spec.ffn, h])?,
                ])?,
            };
            let down = backend.matrix(&[part(format!("{p}.mlp.down_proj.weight"), [h, spec.ffn])?])?;
            blocks.push(Block {
                attn_norm: norm(&format!("{p}.input_layernorm"))?,
                qkv,
                o,
                mlp_norm: norm(&format!("{p}.post_attention_layernorm"))?,
                up,
                down,
            });
        }
        let final_norm = norm("model.norm")?;
        let n_out = spec.num_outputs();
        let head = Head {
            weight: store.get_shaped("score.weight", &[n_out, h])?.to_f32(),
            bias: if store.contains("score.bias") {
                Some(store.get_shaped("score.bias", &[n_out])?.to_f32())
            } else {
                None
            },
        };
        let layout = AttnLayout {
            heads: spec.heads,
            kv_heads: spec.kv_heads,
            head_dim: d,
            rotary_dim: spec.rope.rotary_dim,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let inv_freq = rope::inv_freq(&spec.rope);
        Ok(Model { spec, backend, comm: Box::new(SingleRank), embedding, blocks, final_norm, head, inv_freq, layout })
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the head has a bias.
    pub fn head_has_bias(&self) -> bool {
        self.head.bias.is_some()
    }

    /// Runs the packed batch and returns, per sequence, the raw head outputs at its last token
    /// (all of them, exposed or not).
    pub fn forward(&self, batch: &PackedBatch) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.check_batch(batch)?;
        let b = &self.backend;
        let ctx = b.batch_ctx(batch, &self.inv_freq)?;
        let mut x = b.embed(&self.embedding, batch.tokens())?;
        let mut h = b.norm(&x, &self.blocks[0].attn_norm)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let mut qkv = b.matmul(&h, &blk.qkv)?;
            b.rope(&mut qkv, &self.layout, &ctx)?;
            let attn = b.attention(&qkv, &self.layout, &ctx)?;
            let mut o = b.matmul(&attn, &blk.o)?;
            self.comm.all_reduce(&mut o)?;
            h = b.add_norm(&mut x, &o, &blk.mlp_norm)?;
            let up = b.matmul(&h, &blk.up)?;
            let act = b.activation(&up, self.spec.mlp)?;
            let mut down = b.matmul(&act, &blk.down)?;
            self.comm.all_reduce(&mut down)?;
            match self.blocks.get(l + 1) {
                Some(next) => h = b.add_norm(&mut x, &down, &next.attn_norm)?,
                None => b.add(&mut x, &down)?,
            }
        }
        let last = b.gather_rows(&x, &batch.last_rows())?;
        let normed = b.to_host(&b.final_norm(&last, &self.final_norm)?)?;
        Ok(normed.chunks_exact(self.spec.hidden).map(|row| self.head_forward(row)).collect())
    }

    /// The head in f32: `bias + W h`, each output a single ordered dot product.
    fn head_forward(&self, hidden: &[f32]) -> Vec<f32> {
        self.head
            .weight
            .chunks_exact(self.spec.hidden)
            .enumerate()
            .map(|(o, w)| {
                let dot = w.iter().zip(hidden).fold(0.0f32, |acc, (a, b)| a.mul_add(*b, acc));
                dot + self.head.bias.as_ref().map_or(0.0, |b| b[o])
            })
            .collect()
    }

    fn check_batch(&self, batch: &PackedBatch) -> Result<()> {
        for i in 0..batch.len() {
            let r = batch.range(i);
            if r.len() > self.spec.max_positions {
                return Err(EngineError::InvalidBatch(format!(
                    "sequence {i} has {} tokens; the model supports at most {}",
                    r.len(),
                    self.spec.max_positions
                )));
            }
            if let Some((j, &t)) = batch.tokens()[r].iter().enumerate().find(|(_, &t)| t as usize >= self.spec.vocab) {
                return Err(EngineError::InvalidBatch(format!(
                    "sequence {i}, token {j}: id {t} is outside the vocabulary of {}",
                    self.spec.vocab
                )));
            }
        }
        Ok(())
    }
}
