//! The one table of a model's tensors: their Hugging Face names, their shapes, and how tensor
//! parallelism splits them. The graph loads from it, the synthetic folders and the converter write
//! and check against it, and the memory plan sizes from it; a second list anywhere would drift.

use std::ops::Range;

use crate::error::{EngineError, Result};
use crate::plan::RankPlan;
use crate::spec::{HeadKind, ModelSpec};

/// The token embedding.
pub const EMBEDDING: &str = "model.embed_tokens.weight";
/// The final norm's prefix (`.weight`, and `.bias` for LayerNorm1P).
pub const FINAL_NORM: &str = "model.norm";
/// The reward head's matrix, `[outputs, hidden]`.
pub const HEAD: &str = "score.weight";
/// The reward head's optional bias, `[outputs]`: Llama-family classifiers have none, some
/// converted heads do; a folder may hold it or not.
pub const HEAD_BIAS: &str = "score.bias";
/// Every tensor of the reward head starts with this.
pub const HEAD_PREFIX: &str = "score.";

/// Module names inside a block (`model.layers.{i}.{module}`), for the table and for code that
/// writes or matches block tensors by name (the converter, the FP8 scheme).
pub mod module {
    /// The norm before attention.
    pub const INPUT_NORM: &str = "input_layernorm";
    /// Query projection.
    pub const Q: &str = "self_attn.q_proj";
    /// Key projection.
    pub const K: &str = "self_attn.k_proj";
    /// Value projection.
    pub const V: &str = "self_attn.v_proj";
    /// Attention output projection.
    pub const O: &str = "self_attn.o_proj";
    /// The norm before the MLP (Llama, Nemotron, Qwen); Gemma 2 uses this name for the norm of the
    /// attention's output, see [`PRE_FFN_NORM`].
    pub const POST_NORM: &str = "post_attention_layernorm";
    /// Gemma 2's norm before the MLP.
    pub const PRE_FFN_NORM: &str = "pre_feedforward_layernorm";
    /// Gemma 2's norm of the MLP's output, before the residual add.
    pub const POST_FFN_NORM: &str = "post_feedforward_layernorm";
    /// SwiGLU's gate projection.
    pub const GATE: &str = "mlp.gate_proj";
    /// MLP up projection.
    pub const UP: &str = "mlp.up_proj";
    /// MLP down projection.
    pub const DOWN: &str = "mlp.down_proj";
    /// Qwen3's per-head RMSNorm of the queries.
    pub const Q_NORM: &str = "self_attn.q_norm";
    /// Qwen3's per-head RMSNorm of the keys.
    pub const K_NORM: &str = "self_attn.k_norm";
    /// The block's linear layers (the ones FP8 may quantize).
    pub const LINEAR: [&str; 7] = [Q, K, V, O, GATE, UP, DOWN];
    /// The linear layers of a block whose MLP has no gate (Nemotron's squared ReLU).
    pub const UNGATED_LINEAR: [&str; 6] = [Q, K, V, O, UP, DOWN];
}

/// The full name of `module` in block `layer` (what an FP8 `ignore` list names).
pub fn layer_module(layer: usize, module: &str) -> String {
    format!("model.layers.{layer}.{module}")
}

/// The full name of tensor `tensor` (`"weight"`, `"bias"`) of `module` in block `layer`.
pub fn layer_tensor(layer: usize, module: &str, tensor: &str) -> String {
    format!("{}.{tensor}", layer_module(layer, module))
}

/// What a rank's share of a split tensor is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Whole query heads (`head_dim` channels each).
    Heads,
    /// Whole key/value heads (`head_dim` channels each).
    KvHeads,
    /// FFN channels.
    Ffn,
}

/// How tensor parallelism cuts a tensor (Megatron: column-parallel matrices split their output
/// rows, row-parallel ones their input columns and sum partial products).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank of the stage holds all of it (embedding, norms, head).
    Replicated,
    /// Column-parallel: each rank holds its share of the output rows (q, k, v, gate, up).
    Rows(Share),
    /// Row-parallel: each rank holds its share of the input columns (o, down).
    Cols(Share),
}

/// Which part of the network a tensor belongs to, for pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The embedding: the first stage.
    Embedding,
    /// A transformer block: the stage that owns the layer.
    Layer(usize),
    /// The final norm and the head: the last stage.
    Output,
}

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name in the safetensors files.
    pub name: String,
    /// Shape, row-major; matrices are `[out, in]`.
    pub shape: Vec<usize>,
    /// How tensor parallelism splits it.
    pub split: Split,
    /// Which pipeline stage holds it.
    pub place: Place,
}

impl TensorInfo {
    fn new(name: String, shape: Vec<usize>, split: Split, place: Place) -> Self {
        TensorInfo { name, shape, split, place }
    }

    /// Whether `rank` holds (a slice of) this tensor.
    pub fn held_by(&self, rank: &RankPlan, layers: usize) -> bool {
        match self.place {
            Place::Embedding => rank.is_first_stage(),
            Place::Layer(l) => rank.layers(layers).contains(&l),
            Place::Output => rank.is_last_stage(),
        }
    }

    /// The block of a matrix `rank` holds: its rows and its columns. Replicated tensors (and
    /// vectors) are whole.
    pub fn slice(&self, spec: &ModelSpec, rank: &RankPlan) -> (Range<usize>, Range<usize>) {
        let rows = self.shape[0];
        let cols = self.shape.get(1).copied().unwrap_or(1);
        match self.split {
            Split::Replicated => (0..rows, 0..cols),
            Split::Rows(share) => (share_of(share, spec, rank), 0..cols),
            Split::Cols(share) => (0..rows, share_of(share, spec, rank)),
        }
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

fn share_of(share: Share, spec: &ModelSpec, rank: &RankPlan) -> Range<usize> {
    match share {
        Share::Heads => rank.share_scaled(spec.heads, spec.head_dim),
        Share::KvHeads => rank.share_scaled(spec.kv_heads, spec.head_dim),
        Share::Ffn => rank.share(spec.ffn),
    }
}

/// A norm's tensors: the weight, and the bias for LayerNorm1P.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormTensors {
    /// `{prefix}.weight`, `[hidden]`.
    pub weight: TensorInfo,
    /// `{prefix}.bias`, `[hidden]`, when the norm kind has one.
    pub bias: Option<TensorInfo>,
}

/// One transformer block's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerTensors {
    /// The norm before attention.
    pub input_norm: NormTensors,
    /// Query projection, `[heads * head_dim, hidden]`.
    pub q: TensorInfo,
    /// Key projection, `[kv_heads * head_dim, hidden]`.
    pub k: TensorInfo,
    /// Value projection, `[kv_heads * head_dim, hidden]`.
    pub v: TensorInfo,
    /// Attention output projection, `[hidden, heads * head_dim]`.
    pub o: TensorInfo,
    /// The norm before the MLP.
    pub post_norm: NormTensors,
    /// Gemma 2's norms of the attention's and the MLP's outputs, before their residual adds.
    pub branch_norms: Option<[NormTensors; 2]>,
    /// Qwen2's q, k and v biases, `[heads * head_dim]`, `[kv_heads * head_dim]` twice; split
    /// with their matrices' rows.
    pub qkv_bias: Option<[TensorInfo; 3]>,
    /// Qwen3's per-head norms of the queries and keys, `[head_dim]` each.
    pub qk_norm: Option<[TensorInfo; 2]>,
    /// SwiGLU's gate projection, `[ffn, hidden]`; none for relu2.
    pub gate: Option<TensorInfo>,
    /// MLP up projection, `[ffn, hidden]`.
    pub up: TensorInfo,
    /// MLP down projection, `[hidden, ffn]`.
    pub down: TensorInfo,
}

/// One linear layer of the reward head: `weight` `[out, in]` and its bias `[out]`, which a
/// folder may hold or not (not listed by [`TensorTable::iter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadLayer {
    /// The matrix.
    pub weight: TensorInfo,
    /// The optional bias.
    pub bias: TensorInfo,
}

/// Every tensor a model with a given spec reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorTable {
    /// The token embedding, `[vocab, hidden]`.
    pub embedding: TensorInfo,
    /// The blocks, in order.
    pub layers: Vec<LayerTensors>,
    /// The final norm.
    pub final_norm: NormTensors,
    /// The head's layers in order, the last one `[outputs, hidden]`.
    pub head: Vec<HeadLayer>,
}

impl TensorTable {
    /// The table for `spec`.
    pub fn new(spec: &ModelSpec) -> Self {
        let (h, d) = (spec.hidden, spec.head_dim);
        let norm = |name: &dyn Fn(&str) -> String, place: Place| NormTensors {
            weight: TensorInfo::new(name("weight"), vec![h], Split::Replicated, place),
            bias: spec.norm_has_bias().then(|| TensorInfo::new(name("bias"), vec![h], Split::Replicated, place)),
        };
        let layers = (0..spec.layers)
            .map(|l| {
                let place = Place::Layer(l);
                let t = |m: &str, shape: [usize; 2], split: Split| {
                    TensorInfo::new(layer_tensor(l, m, "weight"), shape.to_vec(), split, place)
                };
                let vector = |m: &str, tensor: &str, len: usize, split: Split| {
                    TensorInfo::new(layer_tensor(l, m, tensor), vec![len], split, place)
                };
                let layer_norm = |m: &'static str| norm(&move |t: &str| layer_tensor(l, m, t), place);
                let (q_rows, kv_rows) = (spec.heads * d, spec.kv_heads * d);
                LayerTensors {
                    input_norm: layer_norm(module::INPUT_NORM),
                    q: t(module::Q, [q_rows, h], Split::Rows(Share::Heads)),
                    k: t(module::K, [kv_rows, h], Split::Rows(Share::KvHeads)),
                    v: t(module::V, [kv_rows, h], Split::Rows(Share::KvHeads)),
                    qkv_bias: spec.qkv_bias.then(|| {
                        [
                            vector(module::Q, "bias", q_rows, Split::Rows(Share::Heads)),
                            vector(module::K, "bias", kv_rows, Split::Rows(Share::KvHeads)),
                            vector(module::V, "bias", kv_rows, Split::Rows(Share::KvHeads)),
                        ]
                    }),
                    qk_norm: spec.qk_norm.then(|| {
                        [
                            vector(module::Q_NORM, "weight", d, Split::Replicated),
                            vector(module::K_NORM, "weight", d, Split::Replicated),
                        ]
                    }),
                    o: t(module::O, [h, spec.heads * d], Split::Cols(Share::Heads)),
                    post_norm: layer_norm(if spec.gemma.is_some() { module::PRE_FFN_NORM } else { module::POST_NORM }),
                    branch_norms: spec
                        .gemma
                        .is_some()
                        .then(|| [layer_norm(module::POST_NORM), layer_norm(module::POST_FFN_NORM)]),
                    gate: spec.mlp.has_gate().then(|| t(module::GATE, [spec.ffn, h], Split::Rows(Share::Ffn))),
                    up: t(module::UP, [spec.ffn, h], Split::Rows(Share::Ffn)),
                    down: t(module::DOWN, [h, spec.ffn], Split::Cols(Share::Ffn)),
                }
            })
            .collect();
        TensorTable {
            embedding: TensorInfo::new(EMBEDDING.into(), vec![spec.vocab, h], Split::Replicated, Place::Embedding),
            layers,
            final_norm: norm(&|t: &str| format!("{FINAL_NORM}.{t}"), Place::Output),
            head: head_layers(spec),
        }
    }

    /// Every tensor in a stable order: the embedding; per block its input norm, q, k, v, the
    /// q/k/v biases, the q/k norms, o, post-attention norm, gate, up, down; the final norm; the
    /// head's matrices. Synthetic folders draw their random values in this order, so it is part
    /// of their bytes.
    pub fn iter(&self) -> impl Iterator<Item = &TensorInfo> {
        fn norm(n: &NormTensors) -> impl Iterator<Item = &TensorInfo> {
            std::iter::once(&n.weight).chain(n.bias.as_ref())
        }
        std::iter::once(&self.embedding)
            .chain(self.layers.iter().flat_map(move |l| {
                norm(&l.input_norm)
                    .chain([&l.q, &l.k, &l.v])
                    .chain(l.qkv_bias.iter().flatten())
                    .chain(l.qk_norm.iter().flatten())
                    .chain([&l.o])
                    .chain(norm(&l.post_norm))
                    .chain(l.branch_norms.iter().flatten().flat_map(norm))
                    .chain(l.gate.as_ref())
                    .chain([&l.up, &l.down])
            }))
            .chain(norm(&self.final_norm))
            .chain(self.head.iter().map(|l| &l.weight))
    }

    /// Checks that the folder's head tensors (names starting with [`HEAD_PREFIX`]) are exactly
    /// this table's head, so a head of another shape is refused rather than half read.
    pub fn check_head_names<'n>(&self, names: impl IntoIterator<Item = &'n str>, architecture: &str) -> Result<()> {
        let expected: Vec<&str> =
            self.head.iter().flat_map(|l| [l.weight.name.as_str(), l.bias.name.as_str()]).collect();
        match names.into_iter().find(|n| n.starts_with(HEAD_PREFIX) && !expected.contains(n)) {
            Some(name) => Err(EngineError::UnexpectedTensor {
                name: name.to_string(),
                message: format!(
                    "is not part of the {architecture} reward head, which is {}",
                    self.head
                        .iter()
                        .map(|l| format!("{} (and optionally {})", l.weight.name, l.bias.name))
                        .collect::<Vec<_>>()
                        .join(", then ")
                ),
            }),
            None => Ok(()),
        }
    }
}

/// The head's layers for `spec`: one `[outputs, hidden]` matrix, or INF-ORM's
/// `score.0` `[hidden, hidden]` then `score.2` `[outputs, hidden]` (index 1 is the ReLU).
fn head_layers(spec: &ModelSpec) -> Vec<HeadLayer> {
    let h = spec.hidden;
    let layer = |prefix: &str, out: usize, inp: usize| HeadLayer {
        weight: TensorInfo::new(format!("{prefix}.weight"), vec![out, inp], Split::Replicated, Place::Output),
        bias: TensorInfo::new(format!("{prefix}.bias"), vec![out], Split::Replicated, Place::Output),
    };
    match spec.head.kind {
        HeadKind::Linear => vec![layer("score", spec.num_outputs(), h)],
        HeadKind::TwoLayerRelu => vec![layer("score.0", h, h), layer("score.2", spec.num_outputs(), h)],
    }
}

/// Names and shapes of every tensor a model with this spec reads, in [`TensorTable::iter`]'s order.
pub fn tensor_shapes(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    TensorTable::new(spec).iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Parallelism;

    fn spec(config: serde_json::Value) -> ModelSpec {
        crate::config::parse_config(&config.to_string(), "config.json".as_ref()).unwrap()
    }

    #[test]
    fn the_table_lists_each_tensor_once_with_the_parameter_count_of_the_architecture() {
        let s = spec(crate::synth::bench_small_config());
        let table = TensorTable::new(&s);
        let names: std::collections::BTreeSet<_> = table.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), table.iter().count());
        // bench-small: relu2, LayerNorm1P (weight and bias), hidden 1024, 16 + 2*4 heads of 64,
        // FFN 4096, 8 layers, vocab 32000, one output.
        let per_layer = 2 * 2 * 1024 + (16 + 2 * 4) * 64 * 1024 + 1024 * 16 * 64 + 2 * 4096 * 1024;
        let total = 32000 * 1024 + 8 * per_layer + 2 * 1024 + 1024;
        assert_eq!(table.iter().map(TensorInfo::elements).sum::<usize>(), total);
        assert_eq!(table.iter().next().unwrap().name, EMBEDDING);
        assert_eq!(table.iter().last().unwrap().name, HEAD);
        assert_eq!(table.head[0].bias.name, HEAD_BIAS);
    }

    #[test]
    fn ranks_slices_tile_every_split_matrix_exactly() {
        let s = spec(crate::synth::bench_small_config());
        let table = TensorTable::new(&s);
        let par = Parallelism { tp: 4, pp: 2 };
        for t in table.iter() {
            let holders: Vec<RankPlan> = par.ranks().into_iter().filter(|r| t.held_by(r, s.layers)).collect();
            // One stage holds each tensor, on all of its tensor-parallel ranks.
            assert_eq!(holders.len(), 4, "{}", t.name);
            let cells: usize = holders
                .iter()
                .map(|r| {
                    let (rows, cols) = t.slice(&s, r);
                    rows.len() * cols.len()
                })
                .sum();
            let expected = if t.split == Split::Replicated { 4 * t.elements() } else { t.elements() };
            assert_eq!(cells, expected, "{}", t.name);
        }
        let l = &table.layers[5];
        assert_eq!(l.q.slice(&s, &par.ranks()[5]), (256..512, 0..1024));
        assert_eq!(l.down.slice(&s, &par.ranks()[7]), (0..1024, 3072..4096));
    }

    #[test]
    fn swiglu_models_have_a_gate_and_rmsnorm_models_no_norm_bias() {
        let mut c = crate::synth::bench_small_config();
        c["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
        c["model_type"] = serde_json::json!("llama");
        c["hidden_act"] = serde_json::json!("silu");
        c["rms_norm_eps"] = serde_json::json!(1e-5);
        let s = spec(c);
        let table = TensorTable::new(&s);
        assert!(table.layers.iter().all(|l| l.gate.is_some() && l.input_norm.bias.is_none()));
        assert!(table.iter().any(|t| t.name == "model.layers.0.mlp.gate_proj.weight"));
    }
}
