//! Deterministic random-weight model folders: the demo model, benchmarks, and tests that need a
//! well-formed folder to start from. Same config and seed, same bytes, on every machine.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::parse_config;
use crate::error::{EngineError, Result};
use crate::fp8;
use crate::scores::{DEFAULT_REWARD_WEIGHTS, HELPSTEER_LABELS};
use crate::spec::ModelSpec;
use crate::weights::{narrow, Dtype};

/// A small, fast, deterministic generator (SplitMix64); no dependency, same stream everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The tensor list synthetic folders are written from; it is [`crate::tensors`]'s table.
pub use crate::tensors::tensor_shapes;

/// Writes `config` (a config.json object) and random weights of `dtype` into `dir`.
///
/// Matrices are uniform with scale `1/sqrt(fan_in)` so activations stay O(1) through many
/// layers; norm weights and biases are random too (all-ones defaults would hide LayerNorm1P
/// bugs); the head's layers get biases when `head_bias` is set. When `config` has a
/// `quantization_config`, the linear layers it quantizes are stored as e4m3 with their scales
/// (from the same random values, so the folder is the FP8 version of the unquantized one).
pub fn write_random_model(
    dir: &Path,
    config: &serde_json::Value,
    dtype: Dtype,
    seed: u64,
    head_bias: bool,
) -> Result<ModelSpec> {
    let config_path = dir.join("config.json");
    let spec = parse_config(&config.to_string(), &config_path)?;
    std::fs::create_dir_all(dir).map_err(|e| EngineError::Io { path: dir.to_path_buf(), source: e })?;
    let text = serde_json::to_string_pretty(config).expect("a JSON value serializes");
    std::fs::write(&config_path, text).map_err(|e| EngineError::Io { path: config_path.clone(), source: e })?;
    let mut shapes = tensor_shapes(&spec);
    if head_bias {
        for l in crate::tensors::TensorTable::new(&spec).head {
            shapes.push((l.bias.name, l.bias.shape));
        }
    }
    let mut rng = SplitMix::new(seed);
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let scale = if shape.len() == 2 && !name.contains("embed") { 1.0 / (shape[1] as f32).sqrt() } else { 0.5 };
        let values: Vec<f32> = (0..n).map(|_| rng.uniform() * scale).collect();
        if spec.fp8.as_ref().is_some_and(|q| q.quantizes(&name)) {
            let (codes, scales) = fp8::quantize_matrix(&values, shape[1]);
            tensors.insert(fp8::scale_name(&name), (Dtype::F32, vec![shape[0], 1], narrow(&scales, Dtype::F32)));
            tensors.insert(name, (Dtype::F8E4M3, shape, codes));
        } else {
            tensors.insert(name, (dtype, shape, narrow(&values, dtype)));
        }
    }
    let path = dir.join(crate::weights::SINGLE_FILE);
    write_safetensors(&path, &tensors)?;
    Ok(spec)
}

/// Writes `tensors` (name -> dtype, shape, little-endian bytes) as one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (dtype, shape, bytes))| {
            let v = safetensors::tensor::TensorView::new(dtype.to_safetensors(), shape.clone(), bytes)
                .expect("sizes match by construction");
            (k.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| EngineError::BadWeightsFile { path: path.to_path_buf(), message: format!("cannot write: {e}") })
}

/// The "bench-small" config of the benchmark: Nemotron architecture, hidden 1024, 8 layers,
/// 16 heads, 4 KV heads, FFN 4096, vocab 32000, a one-output head.
pub fn bench_small_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["NemotronForSequenceClassification"],
        "model_type": "nemotron",
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
        "vocab_size": 32000, "max_position_embeddings": 4096,
        "hidden_act": "relu2", "norm_eps": 1e-5,
        "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "num_labels": 1, "id2label": {"0": "reward"}
    })
}

/// "gpu-1b", the GPU check's model: bench-small's architecture (Nemotron, relu2, partial RoPE) at
/// hidden 2048, FFN 8192, 20 layers, 16 heads of 128 channels, 4 KV heads, vocab 32000, a
/// one-output head (about 0.9B parameters outside the embedding).
pub fn gpu_1b_config() -> serde_json::Value {
    let mut c = bench_small_config();
    for (key, value) in
        [("hidden_size", 2048), ("intermediate_size", 8192), ("num_hidden_layers", 20), ("head_dim", 128)]
    {
        c[key] = serde_json::json!(value);
    }
    c
}

/// Nemotron-4-340B-Reward as `arbiter convert` writes its config.json (DESIGN.md's table: 96
/// layers, hidden 18432, FFN 73728, 96 heads and 8 KV heads of 192, vocab 256000, the
/// nine-output head with the HelpSteer2 reward weights).
pub fn nemotron_340b_config() -> serde_json::Value {
    let mut c = bench_small_config();
    for (key, value) in [
        ("hidden_size", 18432),
        ("intermediate_size", 73728),
        ("num_hidden_layers", 96),
        ("num_attention_heads", 96),
        ("num_key_value_heads", 8),
        ("head_dim", 192),
        ("vocab_size", 256000),
        ("num_labels", 9),
    ] {
        c[key] = serde_json::json!(value);
    }
    c["id2label"] = HELPSTEER_LABELS.iter().enumerate().map(|(i, l)| (i.to_string(), serde_json::json!(l))).collect();
    let weights: serde_json::Map<String, serde_json::Value> =
        DEFAULT_REWARD_WEIGHTS.iter().map(|(n, w)| (n.to_string(), serde_json::json!(w))).collect();
    c["arbiter"] = serde_json::json!({"exposed_attributes": HELPSTEER_LABELS[4..], "reward_weights": weights});
    c
}

/// One tensor-parallel rank's share of Nemotron-4-340B at TP=8 as a model of its own: hidden
/// 18432, 12 query heads and 1 KV head of dim 192, FFN 9216 (73728 / 8), `layers` layers, and a
/// token vocabulary of 256 (the embedding is not what is measured).
pub fn nemotron_340b_rank_config(layers: usize) -> serde_json::Value {
    let mut c = bench_small_config();
    for (key, value) in [
        ("hidden_size", 18432),
        ("intermediate_size", 9216),
        ("num_hidden_layers", layers),
        ("num_attention_heads", 12),
        ("num_key_value_heads", 1),
        ("head_dim", 192),
        ("vocab_size", 256),
    ] {
        c[key] = serde_json::json!(value);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_340b_rank_shape_is_one_eighth_of_the_340b_layer() {
        let spec = parse_config(&nemotron_340b_rank_config(4).to_string(), Path::new("r/config.json")).unwrap();
        assert_eq!((spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.ffn), (18432, 12, 1, 192, 9216));
        assert_eq!((spec.heads * 8, spec.kv_heads * 8, spec.ffn * 8, spec.layers), (96, 8, 73728, 4));
        assert_eq!(spec.rope.rotary_dim, 96);
    }

    #[test]
    fn gpu_1b_is_the_size_the_issue_names() {
        let spec = parse_config(&gpu_1b_config().to_string(), Path::new("gpu-1b/config.json")).unwrap();
        assert_eq!((spec.hidden, spec.ffn, spec.layers), (2048, 8192, 20));
        assert_eq!((spec.heads, spec.kv_heads, spec.head_dim, spec.vocab), (16, 4, 128, 32000));
        assert_eq!((spec.mlp, spec.rope.rotary_dim), (crate::spec::MlpKind::Relu2, 64));
        let params: usize = tensor_shapes(&spec).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert!((900_000_000..1_000_000_000).contains(&params), "{params} parameters");
    }
}
