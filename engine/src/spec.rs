//! The model spec: every number and every architectural choice the forward graph needs, as data.
//!
//! Nemotron, Llama, Qwen2 and Qwen3 differ at a handful of points (norm, MLP, how much of each
//! head is rotated, q/k norms, q/k/v biases, the reward head's layers); all of that lives here so
//! that the graph is written once.

pub use crate::fp8::Fp8Scheme;

/// Which normalization the blocks and the final norm use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// Nemotron's LayerNorm1P: `(x - mean) / sqrt(var + eps) * (1 + w) + b`; the checkpoint stores
    /// `w = gamma - 1`.
    LayerNorm1P,
    /// Llama's RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, no bias.
    RmsNorm,
    /// Gemma's RMSNorm: `x / sqrt(mean(x^2) + eps) * (1 + w)`, no bias; the checkpoint stores `w`.
    RmsNorm1P,
}

impl NormKind {
    /// Whether the stored weight is `gamma - 1` (the scale is `1 + w`, added in f32 at load).
    pub fn adds_one(self) -> bool {
        matches!(self, NormKind::LayerNorm1P | NormKind::RmsNorm1P)
    }

    /// Whether it is a root-mean-square norm (no mean subtracted, no bias).
    pub fn is_rms(self) -> bool {
        matches!(self, NormKind::RmsNorm | NormKind::RmsNorm1P)
    }
}

/// Which MLP the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(relu(up(x))^2)` (Nemotron).
    Relu2,
    /// `down(silu(gate(x)) * up(x))` (Llama). The engine fuses gate and up into one matrix whose
    /// first half of output columns is the gate.
    SwiGlu,
    /// `down(gelu_tanh(gate(x)) * up(x))` (Gemma 2), gate and up fused as for SwiGLU.
    GeGlu,
}

impl MlpKind {
    /// Whether the MLP has a gate projection (fused with up into one matrix).
    pub fn has_gate(self) -> bool {
        matches!(self, MlpKind::SwiGlu | MlpKind::GeGlu)
    }
}

/// Gemma 2's attention and block extras; `None` in [`ModelSpec::gemma`] for every other family.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaSpec {
    /// `query_pre_attn_scalar`: the attention scale is its inverse square root, not head_dim's.
    pub query_pre_attn_scalar: f32,
    /// `attn_logit_softcapping`: scores become `tanh(s / cap) * cap` before the softmax.
    pub attn_softcap: Option<f32>,
    /// `sliding_window`: on the layers it applies to, a query sees only the `window` latest keys
    /// (itself included).
    pub sliding_window: Option<usize>,
    /// Per layer, whether it uses the sliding window (`layer_types`, or every even layer).
    pub sliding_layers: Vec<bool>,
}

/// Llama 3.1's frequency-dependent rotary scaling (`rope_type: llama3`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// Scale applied to low frequencies.
    pub factor: f32,
    /// Wavelength threshold (in units of the original context) below which frequencies are scaled.
    pub low_freq_factor: f32,
    /// Wavelength threshold above which frequencies are kept.
    pub high_freq_factor: f32,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: f32,
}

/// Rotary position embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    /// Base of the frequencies.
    pub theta: f32,
    /// How many leading channels of each head are rotated (even; the rest pass through). Nemotron
    /// rotates half of its 192-channel heads, Llama all of them.
    pub rotary_dim: usize,
    /// Optional Llama 3 scaling of the inverse frequencies.
    pub llama3: Option<Llama3Scaling>,
}

/// The layers of the reward head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// One linear layer, `score.weight` (and an optional `score.bias`): transformers'
    /// `*ForSequenceClassification`.
    Linear,
    /// `score.0` (hidden -> hidden, with bias), ReLU, `score.2` (hidden -> outputs, with bias):
    /// INF-ORM's `nn.Sequential` head.
    TwoLayerRelu,
}

/// The regression head read at the last token of each sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSpec {
    /// Its layers.
    pub kind: HeadKind,
    /// Names of all outputs, in the order of the head's rows (from `id2label`).
    pub labels: Vec<String>,
    /// Indices into `labels` of the outputs shown to users (all of them unless the model folder
    /// says otherwise; the 340B model exposes the five HelpSteer2 attributes, 4..=8).
    pub exposed: Vec<usize>,
    /// Default reward weight of each exposed output, aligned with `exposed`.
    pub reward_weights: Vec<f32>,
}

/// Everything the forward graph needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The `architectures[0]` string of config.json.
    pub architecture: String,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Inner width of the MLP.
    pub ffn: usize,
    /// Vocabulary size (rows of the embedding table).
    pub vocab: usize,
    /// Longest sequence the model supports.
    pub max_positions: usize,
    /// Normalization kind.
    pub norm: NormKind,
    /// Epsilon inside the norm's square root.
    pub norm_eps: f32,
    /// MLP kind.
    pub mlp: MlpKind,
    /// Rotary embedding.
    pub rope: RopeSpec,
    /// The reward head.
    pub head: HeadSpec,
    /// `arbiter.chat_template`: `"nemotron-reward"` or `"jinja"`; `None` picks by what the
    /// folder has (see [`crate::text::Preprocessor::from_model_dir`]).
    pub chat_template: Option<String>,
    /// `arbiter.demo`: random weights; every score shown must say it is meaningless.
    pub demo: bool,
    /// `quantization_config`: the linear layers are e4m3 with per-channel scales (see
    /// [`crate::fp8`]); `None` for a full-precision folder.
    pub fp8: Option<Fp8Scheme>,
    /// Per-head RMSNorm of the queries and keys before RoPE (Qwen3's `q_norm`, `k_norm`), with
    /// the blocks' norm epsilon.
    pub qk_norm: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// `pad_token_id`: the score is read at the rightmost token that is not this id, as
    /// transformers does (see [`ModelSpec::read_offset`]).
    pub pad_token_id: Option<u32>,
    /// Gemma 2: embeddings scaled by `sqrt(hidden)`, norms after attention and after the MLP,
    /// soft-capped and windowed attention.
    pub gemma: Option<GemmaSpec>,
}

impl ModelSpec {
    /// Output width of the fused q/k/v projection: all query heads, then the key heads, then the
    /// value heads.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Output width of the MLP's first projection (gate and up fused for gated MLPs).
    pub fn up_width(&self) -> usize {
        if self.mlp.has_gate() {
            2 * self.ffn
        } else {
            self.ffn
        }
    }

    /// Whether norms carry a bias tensor.
    pub fn norm_has_bias(&self) -> bool {
        self.norm == NormKind::LayerNorm1P
    }

    /// The attention softmax scale: `1 / sqrt(head_dim)`, or Gemma 2's `query_pre_attn_scalar`.
    pub fn attn_scale(&self) -> f32 {
        match &self.gemma {
            Some(g) => 1.0 / g.query_pre_attn_scalar.sqrt(),
            None => 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// The sliding window of layer `layer`, if it has one.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        let g = self.gemma.as_ref()?;
        g.sliding_window.filter(|_| g.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// Number of outputs of the head (rows of `score.weight`).
    pub fn num_outputs(&self) -> usize {
        self.head.labels.len()
    }

    /// Where in `ids` the score is read: the rightmost token whose id is not `pad_token_id` (the
    /// last token when there is no pad id; the first when every token is the pad id), exactly
    /// as transformers' `*ForSequenceClassification` picks it for unpadded input.
    pub fn read_offset(&self, ids: &[u32]) -> usize {
        match self.pad_token_id {
            Some(pad) => ids.iter().rposition(|&t| t != pad).unwrap_or(0),
            None => ids.len().saturating_sub(1),
        }
    }
}
