//! The forward graph, written once for every architecture and backend:
//!
//! `embed -> [norm, qkv (+ bias), (q/k norm), rope, attention, o, all_reduce, residual, norm,
//! mlp, all_reduce, residual] x L -> read-row gather -> final norm -> (head hidden layers on the
//! backend) -> head output layer (f32, on the host)`.
//!
//! The gather comes as early as it can: on the last stage, right after the last block's attention
//! (the only op that mixes rows). The output projection, the MLP and the final norm all work
//! row by row, so running them on the read rows alone gives the same bits for a fraction of the
//! work: a reward model reads one row per sequence, and the last block's MLP was 1/L of the
//! forward's matrix work spent on rows nobody reads.

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::backend::{Activation, AttnLayout, Backend, Communicator, MatrixPart, SingleRank};
use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};
use crate::folder::ModelFolder;
use crate::fp8;
use crate::plan::RankPlan;
use crate::rope;
use crate::spec::{ModelSpec, NormKind};
use crate::tensors::{HeadLayer, NormTensors, TensorInfo, TensorTable};
use crate::weights::{Dtype, TensorView, WeightStore};

/// Weights of one transformer block.
struct Block<B: Backend> {
    attn_norm: B::Norm,
    qkv: B::Matrix,
    /// Qwen3's per-head norms of the queries and keys.
    qk_norm: Option<(B::Norm, B::Norm)>,
    /// This layer's attention geometry (Gemma 2 alternates windowed and full layers).
    layout: AttnLayout,
    /// Gemma 2's norms of the attention's and the MLP's outputs.
    branch_norms: Option<(B::Norm, B::Norm)>,
    o: B::Matrix,
    mlp_norm: B::Norm,
    up: B::Matrix,
    down: B::Matrix,
}

/// The reward head. Hidden layers (INF-ORM's `score.0` + ReLU) are backend GEMMs over the read
/// rows; the output layer is kept in f32 on the host: it has a handful of outputs per row.
struct Head<B: Backend> {
    hidden: Vec<B::Matrix>,
    output: OutputLayer,
}

/// The head's last layer, `bias + W h` in f32.
#[derive(Debug, Clone)]
struct OutputLayer {
    /// `[outputs, hidden]`, row-major.
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
}

/// A loaded model (or one rank's slice of it) on one backend, ready to run packed batches.
pub struct Model<B: Backend> {
    spec: ModelSpec,
    backend: B,
    rank: RankPlan,
    comm: Box<dyn Communicator<B::Tensor>>,
    /// First stage only.
    embedding: Option<B::Embedding>,
    /// This stage's layers, in order.
    blocks: Vec<Block<B>>,
    /// Last stage only: the final norm and the head.
    final_norm: Option<B::Norm>,
    head: Option<Head<B>>,
    inv_freq: Vec<f32>,
}

/// What one pipeline stage hands on: the residual stream to the next stage, or, from the last
/// stage, the raw head outputs per sequence.
pub enum StageOutput<T> {
    /// `[tokens, hidden]` residual stream for the next stage.
    Hidden(T),
    /// Raw head outputs at each item's read row.
    Outputs(Vec<Vec<f32>>),
}

impl<B: Backend> std::fmt::Debug for Model<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec)
            .field("backend", &self.backend.name())
            .field("rank", &self.rank)
            .finish()
    }
}

/// Parses a model folder's config.json and memory-maps its weights (see [`ModelFolder`]).
pub fn open_folder(dir: &Path) -> Result<(ModelSpec, Arc<WeightStore>)> {
    let folder = ModelFolder::open(dir)?;
    Ok((folder.spec, folder.store))
}

impl<B: Backend> Model<B> {
    /// Loads the model folder `dir` (config.json plus safetensors) onto `backend`.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        let (spec, store) = open_folder(dir)?;
        Self::from_store(spec, &store, backend)
    }

    /// Builds the whole model from an already parsed spec and opened weights.
    pub fn from_store(spec: ModelSpec, store: &WeightStore, backend: B) -> Result<Self> {
        Self::load_rank(spec, store, backend, RankPlan::single(), Box::new(SingleRank))
    }

    /// Builds one rank's slice of the model: the layers of its stage, and of each of them only the
    /// heads, KV groups and FFN channels it owns (see [`crate::plan`]). Only those
    /// blocks are read from the mapped weights. `comm` is the rank's tensor-parallel group.
    pub fn load_rank(
        spec: ModelSpec,
        store: &WeightStore,
        backend: B,
        rank: RankPlan,
        comm: Box<dyn Communicator<B::Tensor>>,
    ) -> Result<Self> {
        rank.par.validate(&spec)?;
        let table = TensorTable::new(&spec);
        let norm = |n: &NormTensors| -> Result<B::Norm> {
            let w = dense(store, &n.weight)?;
            let b = n.bias.as_ref().map(|b| dense(store, b)).transpose()?;
            backend.norm_params(spec.norm, spec.norm_eps, w, b)
        };
        // Only the block of each matrix this rank owns (its rows for column-parallel matrices,
        // its columns for row-parallel ones) is read.
        let part = |t: &TensorInfo| -> Result<MatrixPart<'_>> {
            let (rows, cols) = t.slice(&spec, &rank);
            linear_part(&spec, store, t, rows, cols)
        };
        let embedding = if rank.is_first_stage() {
            let table = dense(store, &table.embedding)?;
            Some(backend.embedding(table, embed_scale(&spec, table.dtype))?)
        } else {
            None
        };
        let layout = AttnLayout {
            heads: spec.heads / rank.par.tp,
            kv_heads: spec.kv_heads / rank.par.tp,
            head_dim: spec.head_dim,
            rotary_dim: spec.rope.rotary_dim,
            scale: spec.attn_scale(),
            softcap: spec.gemma.as_ref().and_then(|g| g.attn_softcap),
            window: None,
        };
        let layers = rank.layers(spec.layers);
        let mut blocks = Vec::with_capacity(layers.len());
        for (l, t) in layers.clone().zip(&table.layers[layers]) {
            let up = match &t.gate {
                None => backend.matrix(&[part(&t.up)?])?,
                Some(gate) => backend.matrix(&[part(gate)?, part(&t.up)?])?,
            };
            let mut qkv = [part(&t.q)?, part(&t.k)?, part(&t.v)?];
            if let Some(biases) = &t.qkv_bias {
                for (p, b) in qkv.iter_mut().zip(biases) {
                    p.bias = Some(dense(store, b)?);
                }
            }
            let qk_norm = match &t.qk_norm {
                Some([q, k]) => Some((
                    backend.norm_params(NormKind::RmsNorm, spec.norm_eps, dense(store, q)?, None)?,
                    backend.norm_params(NormKind::RmsNorm, spec.norm_eps, dense(store, k)?, None)?,
                )),
                None => None,
            };
            let branch_norms = match &t.branch_norms {
                Some([attn, mlp]) => Some((norm(attn)?, norm(mlp)?)),
                None => None,
            };
            blocks.push(Block {
                attn_norm: norm(&t.input_norm)?,
                qkv: backend.matrix(&qkv)?,
                qk_norm,
                layout: AttnLayout { window: spec.window_of(l), ..layout },
                branch_norms,
                o: backend.matrix(&[part(&t.o)?])?,
                mlp_norm: norm(&t.post_norm)?,
                up,
                down: backend.matrix(&[part(&t.down)?])?,
            });
        }
        let (final_norm, head) = if rank.is_last_stage() {
            table.check_head_names(store.names(), &spec.architecture)?;
            let bias = |l: &HeadLayer| store.contains(&l.bias.name).then(|| dense(store, &l.bias)).transpose();
            let (output, hidden) = table.head.split_last().expect("a head has at least one layer");
            let hidden = hidden
                .iter()
                .map(|l| {
                    let w = dense(store, &l.weight)?;
                    backend.matrix(&[MatrixPart { bias: bias(l)?, ..MatrixPart::whole(w) }])
                })
                .collect::<Result<_>>()?;
            let output =
                OutputLayer { weight: dense(store, &output.weight)?.to_f32(), bias: bias(output)?.map(|b| b.to_f32()) };
            (Some(norm(&table.final_norm)?), Some(Head { hidden, output }))
        } else {
            (None, None)
        };
        let inv_freq = rope::inv_freq(&spec.rope);
        Ok(Model { spec, backend, rank, comm, embedding, blocks, final_norm, head, inv_freq })
    }

    /// This model's place in a model-parallel layout.
    pub fn rank(&self) -> RankPlan {
        self.rank
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Runs the packed batch and returns, per item, the raw head outputs at its read row (all
    /// of them, exposed or not). Only for a model that is not split across stages.
    pub fn forward(&self, batch: &PackedBatch) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        check_batch(&self.spec, batch)?;
        match self.forward_stage(batch, None)? {
            StageOutput::Outputs(out) => Ok(out),
            StageOutput::Hidden(_) => Err(EngineError::Parallel(format!(
                "{} is not the last pipeline stage; run the model through its pipeline",
                self.rank.label()
            ))),
        }
    }

    /// The batch as this model's backend computes it: unshared when its attention cannot read a
    /// prefix's keys. Every rank of a model runs the same backend, so all stages agree.
    fn computed<'a>(&self, batch: &'a PackedBatch) -> Cow<'a, PackedBatch> {
        if batch.is_shared() && !self.backend.shares_prefixes(batch) {
            Cow::Owned(batch.unshared())
        } else {
            Cow::Borrowed(batch)
        }
    }

    /// Rows of the residual stream this stage computes for `batch` (what it receives from the
    /// previous stage and hands on to the next).
    pub fn computed_rows(&self, batch: &PackedBatch) -> usize {
        self.computed(batch).tokens().len()
    }

    /// Runs this rank's stage over a packed batch (already checked with [`check_batch`]): the
    /// first stage embeds the tokens, later stages start from `input`, the residual stream the
    /// previous stage handed on.
    pub fn forward_stage(&self, batch: &PackedBatch, input: Option<B::Tensor>) -> Result<StageOutput<B::Tensor>> {
        self.run_stage(batch, input, true)
    }

    /// [`Model::forward_stage`]; `early_gather` gathers the read rows after the last block's
    /// attention instead of after the block (the same bits, which a test checks).
    fn run_stage(
        &self,
        batch: &PackedBatch,
        input: Option<B::Tensor>,
        early_gather: bool,
    ) -> Result<StageOutput<B::Tensor>> {
        let batch = &*self.computed(batch);
        let b = &self.backend;
        let ctx = b.batch_ctx(batch, &self.inv_freq)?;
        let mut x = match (&self.embedding, input) {
            (Some(table), None) => b.embed(table, batch.tokens())?,
            (None, Some(x)) => x,
            _ => {
                return Err(EngineError::Parallel(format!(
                    "{} got {} input",
                    self.rank.label(),
                    if self.embedding.is_some() { "an unexpected" } else { "no" }
                )))
            }
        };
        // Whether x already holds only the read rows.
        let mut gathered = false;
        if let Some(first) = self.blocks.first() {
            let mut h = b.norm_for(&x, &first.attn_norm, &first.qkv)?;
            for (l, blk) in self.blocks.iter().enumerate() {
                let mut qkv = b.matmul(&h, &blk.qkv)?;
                if let Some((qn, kn)) = &blk.qk_norm {
                    b.qk_norm(&mut qkv, &blk.layout, qn, kn)?;
                }
                b.rope(&mut qkv, &blk.layout, &ctx)?;
                let mut attn = b.attention(&qkv, &blk.layout, &ctx)?;
                if early_gather && self.head.is_some() && l + 1 == self.blocks.len() {
                    attn = b.gather_rows(&attn, batch.read_rows())?;
                    x = b.gather_rows(&x, batch.read_rows())?;
                    gathered = true;
                }
                let mut o = b.matmul(&attn, &blk.o)?;
                self.comm.all_reduce(&mut o)?;
                if let Some((attn_out, _)) = &blk.branch_norms {
                    o = b.branch_norm(&o, attn_out)?;
                }
                h = b.add_norm_for(&mut x, &o, &blk.mlp_norm, &blk.up)?;
                let up = b.matmul(&h, &blk.up)?;
                let act = b.activation_for(&up, self.spec.mlp.into(), &blk.down)?;
                let mut down = b.matmul(&act, &blk.down)?;
                self.comm.all_reduce(&mut down)?;
                if let Some((_, mlp_out)) = &blk.branch_norms {
                    down = b.branch_norm(&down, mlp_out)?;
                }
                match self.blocks.get(l + 1) {
                    Some(next) => h = b.add_norm_for(&mut x, &down, &next.attn_norm, &next.qkv)?,
                    None => b.add(&mut x, &down)?,
                }
            }
        }
        let (Some(final_norm), Some(head)) = (&self.final_norm, &self.head) else {
            return Ok(StageOutput::Hidden(x));
        };
        let last = if gathered { x } else { b.gather_rows(&x, batch.read_rows())? };
        let mut h = b.final_norm(&last, final_norm)?;
        for layer in &head.hidden {
            h = b.activation(&b.matmul(&h, layer)?, Activation::Relu)?;
        }
        let rows = b.to_host(&h)?;
        Ok(StageOutput::Outputs(rows.chunks_exact(self.spec.hidden).map(|row| head.output.forward(row)).collect()))
    }
}

/// Gemma 2 multiplies the embeddings by `sqrt(hidden)` rounded to the weights' dtype, as
/// transformers does (`embed_scale.to(weight.dtype)`: 68, not 67.88, for a bf16 27B model);
/// every other family by 1.
fn embed_scale(spec: &ModelSpec, dtype: Dtype) -> f32 {
    if spec.gemma.is_none() {
        return 1.0;
    }
    let s = (spec.hidden as f32).sqrt();
    match dtype {
        Dtype::BF16 => half::bf16::from_f32(s).to_f32(),
        Dtype::F16 => half::f16::from_f32(s).to_f32(),
        Dtype::F32 | Dtype::F8E4M3 => s,
    }
}

/// A tensor of the table that is never quantized (embedding, norms, head), checked to have its shape.
fn dense<'a>(store: &'a WeightStore, t: &TensorInfo) -> Result<TensorView<'a>> {
    let name = t.name.as_str();
    let t = store.get_shaped(name, &t.shape)?;
    if t.dtype == Dtype::F8E4M3 {
        return Err(EngineError::Quantization {
            name: name.to_string(),
            message: "is F8_E4M3, but only the linear layers of the blocks may be quantized; \
                      embeddings, norms and the reward head stay BF16/F16/F32"
                .into(),
        });
    }
    Ok(t)
}

/// Rows `rows` x columns `cols` of the linear weight `name` (shape `[out, in]`), with its scales
/// when the folder's scheme quantizes it. The stored dtype must agree with the scheme: an e4m3
/// tensor in a full-precision folder (or one the scheme ignores) would be read without its scale,
/// and a full-precision one where the scheme expects e4m3 means a half-converted folder.
fn linear_part<'a>(
    spec: &ModelSpec,
    store: &'a WeightStore,
    t: &TensorInfo,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Result<MatrixPart<'a>> {
    let name = t.name.as_str();
    let view = store.get_shaped(name, &t.shape)?;
    let quantized = spec.fp8.as_ref().is_some_and(|q| q.quantizes(name));
    let wrong = |message: String| Err(EngineError::Quantization { name: name.to_string(), message });
    match (view.dtype == Dtype::F8E4M3, quantized) {
        (true, true) => {
            let scales = fp8::load_scales(store, &view, rows.clone())?;
            Ok(MatrixPart { scales: Some(scales), ..MatrixPart::block(view, rows, cols) })
        }
        (false, false) => Ok(MatrixPart::block(view, rows, cols)),
        (true, false) if spec.fp8.is_none() => {
            wrong("is F8_E4M3 but config.json has no quantization_config to say how to scale it".into())
        }
        (true, false) => wrong(format!("is F8_E4M3 but quantization_config.ignore lists {:?}", fp8::module_of(name))),
        (false, true) => wrong(format!(
            "is {} but quantization_config quantizes it: expected F8_E4M3 with {:?}",
            view.dtype.safetensors_name(),
            fp8::scale_name(name)
        )),
    }
}

impl OutputLayer {
    /// The output layer in f32: `bias + W h`, each output a single ordered dot product.
    fn forward(&self, hidden: &[f32]) -> Vec<f32> {
        self.weight
            .chunks_exact(hidden.len())
            .enumerate()
            .map(|(o, w)| {
                let dot = w.iter().zip(hidden).fold(0.0f32, |acc, (a, b)| a.mul_add(*b, acc));
                dot + self.bias.as_ref().map_or(0.0, |b| b[o])
            })
            .collect()
    }
}

/// Checks a batch against the model's limits: lengths within the context (shared tokens
/// counted in every item that reads them), ids inside the vocabulary.
pub fn check_batch(spec: &ModelSpec, batch: &PackedBatch) -> Result<()> {
    for i in 0..batch.len() {
        let len = batch.item_len(i);
        if len > spec.max_positions {
            return Err(EngineError::InvalidBatch(format!(
                "sequence {i} has {len} tokens; the model supports at most {}",
                spec.max_positions
            )));
        }
    }
    for s in 0..batch.segments() {
        let r = batch.segment(s);
        let end = batch.first_position(s) + r.len();
        if end > spec.max_positions {
            return Err(EngineError::InvalidBatch(format!(
                "segment {s} reaches position {end}; the model supports at most {}",
                spec.max_positions
            )));
        }
        if let Some((j, &t)) = batch.tokens()[r].iter().enumerate().find(|(_, &t)| t as usize >= spec.vocab) {
            return Err(EngineError::InvalidBatch(format!(
                "sequence {s}, token {j}: id {t} is outside the vocabulary of {}",
                spec.vocab
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuBackend, Precision};

    fn outputs<B: Backend>(model: &Model<B>, batch: &PackedBatch, early_gather: bool) -> Vec<Vec<u32>> {
        match model.run_stage(batch, None, early_gather).unwrap() {
            StageOutput::Outputs(rows) => rows.iter().map(|r| r.iter().map(|v| v.to_bits()).collect()).collect(),
            StageOutput::Hidden(_) => panic!("a whole model ends in the head"),
        }
    }

    #[test]
    fn gathering_the_read_rows_before_the_last_blocks_projection_and_mlp_changes_no_bit() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden");
        // Every kind of last block: Nemotron, SwiGLU with q/k norms (Qwen3), Gemma 2's branch
        // norms, and a head with a hidden layer (INF-ORM).
        for (name, precision) in [
            ("nemotron-v4-gqa", Precision::F32),
            ("qwen3", Precision::Bf16),
            ("gemma2", Precision::F32),
            ("inform-head", Precision::F32),
        ] {
            let model = Model::load(&golden.join(name), CpuBackend::new().with_precision(precision)).unwrap();
            let vocab = model.spec().vocab as u32;
            let seq = |len: u32, salt: u32| -> Vec<u32> { (0..len).map(|i| (i * 31 + salt * 7) % vocab).collect() };
            // Sequences of several lengths, a shared prefix with branches, and reads inside an
            // item (per-turn scores) as well as at its end.
            let mut batch = PackedBatch::from_sequences(&[seq(5, 1), seq(40, 2), seq(1, 3)]).unwrap();
            batch.push_group(&seq(30, 4), &[seq(6, 5), seq(9, 6)]).unwrap();
            batch.read_at(1, 17).unwrap();
            let early = outputs(&model, &batch, true);
            assert_eq!(early.len(), batch.len(), "{name}");
            assert_eq!(early, outputs(&model, &batch, false), "{name} ({precision})");
        }
    }

    #[test]
    fn gemma_scales_embeddings_by_sqrt_hidden_rounded_to_the_weights_dtype() {
        let mut c = crate::synth::bench_small_config();
        c["hidden_size"] = serde_json::json!(4608); // Gemma-2-27B
        let llama = crate::config::parse_config(&c.to_string(), "config.json".as_ref()).unwrap();
        assert_eq!(embed_scale(&llama, Dtype::BF16), 1.0);
        let mut gemma = llama.clone();
        gemma.gemma = Some(crate::spec::GemmaSpec {
            query_pre_attn_scalar: 128.0,
            attn_softcap: Some(50.0),
            sliding_window: Some(4096),
            sliding_layers: vec![true, false],
        });
        assert_eq!(embed_scale(&gemma, Dtype::BF16), 68.0, "bf16(67.882) as transformers uses it");
        assert_eq!(embed_scale(&gemma, Dtype::F32), 4608f32.sqrt());
    }
}
