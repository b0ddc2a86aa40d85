//! The released checkpoint's tensors: which zarr arrays must exist, the shape each must have
//! according to `model_config.yaml`, and where each one goes in the HF-style model folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arbiter_engine::tensors::{self, module};
use arbiter_engine::weights::Dtype;

use crate::error::{io, ConvertError, Result};
use crate::nemo_config::NemoConfig;
use crate::zarr::ZarrArray;

const LAYERS: &str = "model.decoder.layers.";
const EMBEDDING: &str = "model.embedding.word_embeddings.weight";
const OUTPUT_LAYER: &str = "model.output_layer.weight";
const HEAD_WEIGHT: &str = "model.rm_head.weight";
const HEAD_BIAS: &str = "model.rm_head.bias";

/// Per-layer arrays (stacked on axis 0) and the HF tensor each becomes; `None` marks the fused QKV.
/// The HF side is (module, tensor) in [`arbiter_engine::tensors`]'s names.
const PER_LAYER: [(&str, Option<(&str, &str)>); 8] = [
    ("self_attention.linear_qkv.layer_norm_weight", Some((module::INPUT_NORM, "weight"))),
    ("self_attention.linear_qkv.layer_norm_bias", Some((module::INPUT_NORM, "bias"))),
    ("self_attention.linear_qkv.weight", None),
    ("self_attention.linear_proj.weight", Some((module::O, "weight"))),
    ("mlp.linear_fc1.layer_norm_weight", Some((module::POST_NORM, "weight"))),
    ("mlp.linear_fc1.layer_norm_bias", Some((module::POST_NORM, "bias"))),
    ("mlp.linear_fc1.weight", Some((module::UP, "weight"))),
    ("mlp.linear_fc2.weight", Some((module::DOWN, "weight"))),
];

/// One tensor of the output folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutTensor {
    /// HF name.
    pub name: String,
    /// Element type (the source array's).
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// For an FP8 weight (`dtype` e4m3): the index of its scale tensor among the outputs; the
    /// source rows are quantized on their way out (see [`crate::writer::RowSink`]).
    pub scale: Option<usize>,
}

impl OutTensor {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Where the rows of one source read go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Row `r` of the source is row `r` of this output tensor.
    Copy(usize),
    /// The fused QKV of one layer: per KV group, `heads_per_group` query heads, then one key
    /// head, then one value head, each `head_dim` rows; split into these q, k, v tensors.
    Qkv {
        /// Output tensor indices of q, k, v.
        q: usize,
        /// See `q`.
        k: usize,
        /// See `q`.
        v: usize,
        /// Query heads per KV group.
        heads_per_group: usize,
        /// Rows per head.
        head_dim: usize,
    },
}

/// One read: a source array with its leading indices fixed (`[layer]` or none), and its route.
#[derive(Debug, Clone)]
pub struct Job {
    /// Index into [`Layout::arrays`].
    pub array: usize,
    /// Fixed leading indices.
    pub prefix: Vec<usize>,
    /// Where the rows go.
    pub route: Route,
}

/// Everything the conversion reads and writes, checked against the config before any byte is copied.
#[derive(Debug)]
pub struct Layout {
    /// The arrays that are read, by index.
    pub arrays: Vec<ZarrArray>,
    /// The output tensors, in file order.
    pub outputs: Vec<OutTensor>,
    /// The reads, in order; each output tensor is filled by exactly one job.
    pub jobs: Vec<Job>,
    /// Padded vocabulary (rows of the embedding).
    pub vocab: usize,
    /// Outputs of the reward head.
    pub num_outputs: usize,
    /// Whether the head has a bias.
    pub head_bias: bool,
}

impl Layout {
    /// Bytes the jobs read (the converted weights' size).
    pub fn total_bytes(&self) -> u64 {
        self.outputs.iter().map(OutTensor::bytes).sum()
    }

    /// Stores the linear layers `scheme` quantizes as e4m3, each followed by its f32 `[out, 1]`
    /// scale tensor; every other tensor keeps its dtype.
    pub fn quantize(&mut self, scheme: &arbiter_engine::fp8::Fp8Scheme) {
        let mut outputs = Vec::with_capacity(self.outputs.len() * 2);
        let mut index = Vec::with_capacity(self.outputs.len());
        for t in std::mem::take(&mut self.outputs) {
            index.push(outputs.len());
            outputs.extend(crate::writer::fp8_outputs(t, scheme, outputs.len()));
        }
        for job in &mut self.jobs {
            job.route = match job.route {
                Route::Copy(t) => Route::Copy(index[t]),
                Route::Qkv { q, k, v, heads_per_group, head_dim } => {
                    Route::Qkv { q: index[q], k: index[k], v: index[v], heads_per_group, head_dim }
                }
            };
        }
        self.outputs = outputs;
    }
}

/// Opens and checks every array of `weights_dir` (`model_weights/`) against `cfg`.
pub fn plan(weights_dir: &Path, cfg: &NemoConfig) -> Result<Layout> {
    let metadata = weights_dir.join("metadata.json");
    check_metadata(&metadata)?;
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in std::fs::read_dir(weights_dir).map_err(io(weights_dir))? {
        let entry = entry.map_err(io(weights_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_dir() {
            // metadata.json, common.pt (pickled non-tensor state, not needed for bf16 weights).
            continue;
        }
        if name.ends_with("._extra_state") {
            // Transformer Engine's pickled FP8 state; nothing in it for bf16 inference.
            continue;
        }
        let known = [
            EMBEDDING,
            OUTPUT_LAYER,
            HEAD_WEIGHT,
            HEAD_BIAS,
            "model.decoder.final_layernorm.weight",
            "model.decoder.final_layernorm.bias",
        ]
        .contains(&name.as_str())
            || name.strip_prefix(LAYERS).is_some_and(|rest| PER_LAYER.iter().any(|(n, _)| *n == rest));
        if !known {
            return Err(ConvertError::UnknownTensor { name, path });
        }
        found.insert(name, path);
    }
    let mut arrays = Vec::new();
    let open = |arrays: &mut Vec<ZarrArray>, name: &str, expected: Vec<usize>, why: String| -> Result<usize> {
        let path = found
            .get(name)
            .cloned()
            .ok_or_else(|| ConvertError::MissingTensor { name: name.to_string(), path: weights_dir.join(name) })?;
        let a = ZarrArray::open(&path)?;
        if a.shape != expected {
            return Err(ConvertError::ShapeMismatch { name: name.to_string(), expected, found: a.shape, why });
        }
        a.check_chunks()?;
        arrays.push(a);
        Ok(arrays.len() - 1)
    };

    let (h, l, d) = (cfg.hidden, cfg.layers, cfg.head_dim);
    let qkv_rows = (cfg.heads + 2 * cfg.groups) * d;
    // The vocabulary and head size come from the arrays themselves; the config fixes the rest.
    let peek = |name: &str| -> Result<Vec<usize>> {
        match found.get(name) {
            Some(p) => Ok(ZarrArray::open(p)?.shape),
            None => Err(ConvertError::MissingTensor { name: name.to_string(), path: weights_dir.join(name) }),
        }
    };
    let vocab = peek(EMBEDDING)?.first().copied().unwrap_or(0);
    let num_outputs = peek(HEAD_WEIGHT)?.first().copied().unwrap_or(0);
    if let Some(n) = cfg.num_attributes {
        if n != num_outputs {
            return Err(ConvertError::ShapeMismatch {
                name: HEAD_WEIGHT.into(),
                expected: vec![n, h],
                found: peek(HEAD_WEIGHT)?,
                why: "regression.num_attributes x hidden_size".into(),
            });
        }
    }

    let mut outputs = Vec::new();
    let mut jobs = Vec::new();
    let mut out = |name: String, dtype: Dtype, shape: Vec<usize>| -> usize {
        outputs.push(OutTensor { name, dtype, shape, scale: None });
        outputs.len() - 1
    };

    let emb = open(&mut arrays, EMBEDDING, vec![vocab, h], "vocab x hidden_size".into())?;
    let o = out(tensors::EMBEDDING.into(), arrays[emb].dtype, vec![vocab, h]);
    jobs.push(Job { array: emb, prefix: vec![], route: Route::Copy(o) });

    let mut per_layer = Vec::new();
    for (suffix, _) in PER_LAYER {
        let name = format!("{LAYERS}{suffix}");
        let (shape, why) = match suffix {
            "self_attention.linear_qkv.weight" => (
                vec![l, qkv_rows, h],
                "num_layers x (num_attention_heads + 2 num_query_groups) kv_channels x hidden_size",
            ),
            "self_attention.linear_proj.weight" => {
                (vec![l, h, cfg.heads * d], "num_layers x hidden_size x num_attention_heads kv_channels")
            }
            "mlp.linear_fc1.weight" => (vec![l, cfg.ffn, h], "num_layers x ffn_hidden_size x hidden_size"),
            "mlp.linear_fc2.weight" => (vec![l, h, cfg.ffn], "num_layers x hidden_size x ffn_hidden_size"),
            _ => (vec![l, h], "num_layers x hidden_size"),
        };
        let a = open(&mut arrays, &name, shape, why.into())?;
        if arrays[a].chunks[0] != 1 {
            return Err(ConvertError::BadArray {
                name,
                path: arrays[a].dir.join(".zarray"),
                message: format!(
                    "chunks {:?} hold several layers; Megatron writes one layer per chunk",
                    arrays[a].chunks
                ),
            });
        }
        per_layer.push(a);
    }
    for layer in 0..l {
        for ((_, hf), &a) in PER_LAYER.iter().zip(&per_layer) {
            let dtype = arrays[a].dtype;
            let name = |m: &str, t: &str| tensors::layer_tensor(layer, m, t);
            let route = match hf {
                Some((m, t)) => Route::Copy(out(name(m, t), dtype, arrays[a].shape[1..].to_vec())),
                None => Route::Qkv {
                    q: out(name(module::Q, "weight"), dtype, vec![cfg.heads * d, h]),
                    k: out(name(module::K, "weight"), dtype, vec![cfg.groups * d, h]),
                    v: out(name(module::V, "weight"), dtype, vec![cfg.groups * d, h]),
                    heads_per_group: cfg.heads / cfg.groups,
                    head_dim: d,
                },
            };
            jobs.push(Job { array: a, prefix: vec![layer], route });
        }
    }
    for (src, tensor) in
        [("model.decoder.final_layernorm.weight", "weight"), ("model.decoder.final_layernorm.bias", "bias")]
    {
        let a = open(&mut arrays, src, vec![h], "hidden_size".into())?;
        let o = out(format!("{}.{tensor}", tensors::FINAL_NORM), arrays[a].dtype, vec![h]);
        jobs.push(Job { array: a, prefix: vec![], route: Route::Copy(o) });
    }
    let a = open(&mut arrays, HEAD_WEIGHT, vec![num_outputs, h], "outputs x hidden_size".into())?;
    let o = out(tensors::HEAD.into(), arrays[a].dtype, vec![num_outputs, h]);
    jobs.push(Job { array: a, prefix: vec![], route: Route::Copy(o) });
    let head_bias = found.contains_key(HEAD_BIAS);
    if head_bias {
        let a = open(&mut arrays, HEAD_BIAS, vec![num_outputs], "outputs".into())?;
        let o = out(tensors::HEAD_BIAS.into(), arrays[a].dtype, vec![num_outputs]);
        jobs.push(Job { array: a, prefix: vec![], route: Route::Copy(o) });
    }
    // The LM head is not used by a reward model, but a wrong one means a wrong checkpoint.
    if !cfg.tied_embeddings {
        open(&mut arrays, OUTPUT_LAYER, vec![vocab, h], "vocab x hidden_size, like the embedding".into())?;
        arrays.pop();
    }
    Ok(Layout { arrays, outputs, jobs, vocab, num_outputs, head_bias })
}

fn check_metadata(path: &Path) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConvertError::MissingFile {
                path: path.to_path_buf(),
                why: "a Megatron distributed checkpoint declares its storage backend there".into(),
            })
        }
        Err(e) => return Err(io(path)(e)),
    };
    let bad = |message: String| ConvertError::Config { path: path.to_path_buf(), message };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    match v.get("sharded_backend").and_then(|b| b.as_str()) {
        Some("zarr") => Ok(()),
        other => Err(bad(format!(
            "sharded_backend is {other:?}; arbiter convert reads the \"zarr\" backend the released checkpoint uses"
        ))),
    }
}
