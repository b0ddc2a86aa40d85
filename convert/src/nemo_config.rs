//! `model_config.yaml`: the NeMo model config of the released checkpoint. Only the fields that
//! fix the architecture and the tensor shapes are read; anything that would make the model
//! something arbiter does not run is refused, naming the field.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::error::{io, ConvertError, Result};

/// The NeMo settings the conversion needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NemoConfig {
    /// `num_layers`.
    pub layers: usize,
    /// `hidden_size`.
    pub hidden: usize,
    /// `ffn_hidden_size`.
    pub ffn: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_query_groups` (null: one per head).
    pub groups: usize,
    /// `kv_channels` (null: hidden / heads).
    pub head_dim: usize,
    /// `layernorm_epsilon`.
    pub eps: f64,
    /// `rotary_percentage`.
    pub rotary_percentage: f64,
    /// `rotary_base` (absent: 10000).
    pub rotary_base: f64,
    /// `max_position_embeddings` (or `encoder_seq_length`).
    pub max_positions: usize,
    /// `make_vocab_size_divisible_by` (absent: 128).
    pub vocab_divisible_by: usize,
    /// `tensor_model_parallel_size` (absent: 1).
    pub tensor_parallel: usize,
    /// Whether the LM head shares the embedding (then there is no `output_layer`).
    pub tied_embeddings: bool,
    /// The tokenizer file the config names (`tokenizer.model`, `nemo:` prefix removed).
    pub tokenizer_model: Option<String>,
    /// `regression.num_attributes`, when the config says.
    pub num_attributes: Option<usize>,
    /// The file, for messages.
    pub path: PathBuf,
}

/// Reads `path` (a `model_config.yaml`).
pub fn load(path: &Path) -> Result<NemoConfig> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConvertError::MissingFile {
                path: path.to_path_buf(),
                why: "the released checkpoint's NeMo config gives the model's sizes".into(),
            })
        }
        Err(e) => return Err(io(path)(e)),
    };
    parse(&text, path)
}

/// Parses the text of a `model_config.yaml`; `path` is only used in messages.
pub fn parse(text: &str, path: &Path) -> Result<NemoConfig> {
    let err = |message: String| ConvertError::Config { path: path.to_path_buf(), message };
    let docs = YamlLoader::load_from_str(text).map_err(|e| err(format!("not valid YAML: {e}")))?;
    let root = docs.into_iter().next().ok_or_else(|| err("the file is empty".into()))?;
    // A .nemo's model_config.yaml has the model keys at the top; a training config nests them under `model`.
    let cfg = if root["num_layers"].is_badvalue() && !root["model"].is_badvalue() { &root["model"] } else { &root };
    if !matches!(cfg, Yaml::Hash(_)) {
        return Err(err("the top level is not a mapping".into()));
    }
    let f = Fields { cfg, err: &err };
    let heads = f.usize("num_attention_heads")?;
    let hidden = f.usize("hidden_size")?;
    let groups = f.opt_usize("num_query_groups")?.unwrap_or(heads);
    let head_dim = match f.opt_usize("kv_channels")? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(err(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads} and kv_channels is not set"
            )))
        }
    };
    if heads % groups != 0 {
        return Err(err(format!("num_attention_heads {heads} is not a multiple of num_query_groups {groups}")));
    }
    f.expect_str("normalization", &["layernorm1p"], "arbiter runs Nemotron's LayerNorm1P")?;
    f.expect_str("activation", &["squared-relu"], "arbiter runs Nemotron's squared-ReLU MLP")?;
    f.expect_str("position_embedding_type", &["rope"], "arbiter runs rotary position embeddings")?;
    for key in ["bias", "add_bias_linear", "gated_linear_unit"] {
        if f.opt_bool(key)? == Some(true) {
            return Err(err(format!(
                "{key}: true is not supported: arbiter runs Nemotron without linear-layer biases or gating"
            )));
        }
    }
    let tokenizer_model = match &cfg["tokenizer"]["model"] {
        Yaml::String(s) => Some(s.strip_prefix("nemo:").unwrap_or(s).to_string()),
        _ => None,
    };
    let num_attributes = match &cfg["regression"] {
        Yaml::Hash(_) => Fields { cfg: &cfg["regression"], err: &err }.opt_usize("num_attributes")?,
        _ => None,
    };
    let rotary_percentage = f.opt_f64("rotary_percentage")?.unwrap_or(1.0);
    if !(rotary_percentage > 0.0 && rotary_percentage <= 1.0) {
        return Err(err(format!("rotary_percentage {rotary_percentage} must be in (0, 1]")));
    }
    let max_positions = match f.opt_usize("max_position_embeddings")? {
        Some(n) => n,
        None => f.usize("encoder_seq_length")?,
    };
    Ok(NemoConfig {
        layers: f.usize("num_layers")?,
        hidden,
        ffn: f.usize("ffn_hidden_size")?,
        heads,
        groups,
        head_dim,
        eps: f.opt_f64("layernorm_epsilon")?.unwrap_or(1e-5),
        rotary_percentage,
        rotary_base: f.opt_f64("rotary_base")?.unwrap_or(10000.0),
        max_positions,
        vocab_divisible_by: f.opt_usize("make_vocab_size_divisible_by")?.unwrap_or(128),
        tensor_parallel: f.opt_usize("tensor_model_parallel_size")?.unwrap_or(1),
        tied_embeddings: f.opt_bool("share_embeddings_and_output_weights")?.unwrap_or(false),
        tokenizer_model,
        num_attributes,
        path: path.to_path_buf(),
    })
}

struct Fields<'a, E: Fn(String) -> ConvertError> {
    cfg: &'a Yaml,
    err: &'a E,
}

impl<E: Fn(String) -> ConvertError> Fields<'_, E> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match &self.cfg[key] {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::Integer(n) if *n > 0 => Ok(Some(*n as usize)),
            v => Err((self.err)(format!("{key} must be a positive integer, found {v:?}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| (self.err)(format!("missing field {key}")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match &self.cfg[key] {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::Integer(n) => Ok(Some(*n as f64)),
            v @ Yaml::Real(_) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| (self.err)(format!("{key} must be a finite number, found {v:?}"))),
            // PyYAML writes 1e-05 as a float; YAML 1.2 readers see a string without a dot.
            Yaml::String(s) => s
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| (self.err)(format!("{key} must be a number, found {s:?}"))),
            v => Err((self.err)(format!("{key} must be a number, found {v:?}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match &self.cfg[key] {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::Boolean(b) => Ok(Some(*b)),
            // PyYAML dumps Python's False as `false`, but hand-edited configs say `False`.
            Yaml::String(s) if s == "True" || s == "False" => Ok(Some(s == "True")),
            v => Err((self.err)(format!("{key} must be true or false, found {v:?}"))),
        }
    }

    fn expect_str(&self, key: &str, allowed: &[&str], why: &str) -> Result<()> {
        match &self.cfg[key] {
            Yaml::BadValue | Yaml::Null => Err((self.err)(format!("missing field {key} (expected {allowed:?})"))),
            Yaml::String(s) if allowed.contains(&s.as_str()) => Ok(()),
            v => Err((self.err)(format!("{key} {v:?} is not supported ({why}; expected one of {allowed:?})"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REWARD_340B: &str = "
mcore_gpt: true
micro_batch_size: 1
tensor_model_parallel_size: 8
pipeline_model_parallel_size: 24
encoder_seq_length: 4096
max_position_embeddings: 4096
num_layers: 96
hidden_size: 18432
ffn_hidden_size: 73728
num_attention_heads: 96
num_query_groups: 8
kv_channels: null
init_method_std: 0.0063
layernorm_epsilon: 1.0e-05
make_vocab_size_divisible_by: 128
normalization: layernorm1p
bias: false
activation: squared-relu
position_embedding_type: rope
rotary_percentage: 0.5
share_embeddings_and_output_weights: false
tokenizer:
  library: sentencepiece
  type: null
  model: nemo:29e0db5f7dd14bcf9f32727ff482502b_nemotron_2_256k.model
  sentencepiece_legacy: false
reward_model_type: regression
regression:
  num_attributes: 9
  merge_attributes: false
";

    #[test]
    fn the_340b_reward_config() {
        let c = parse(REWARD_340B, Path::new("model_config.yaml")).unwrap();
        assert_eq!((c.layers, c.hidden, c.ffn, c.heads, c.groups, c.head_dim), (96, 18432, 73728, 96, 8, 192));
        assert_eq!((c.eps, c.rotary_percentage, c.rotary_base), (1e-5, 0.5, 10000.0));
        assert_eq!((c.max_positions, c.vocab_divisible_by, c.tensor_parallel), (4096, 128, 8));
        assert_eq!(c.tokenizer_model.as_deref(), Some("29e0db5f7dd14bcf9f32727ff482502b_nemotron_2_256k.model"));
        assert_eq!(c.num_attributes, Some(9));
        assert!(!c.tied_embeddings);
    }

    #[test]
    fn refusals_name_the_field() {
        for (from, to, want) in [
            ("activation: squared-relu", "activation: swiglu", "activation String(\"swiglu\") is not supported"),
            ("normalization: layernorm1p", "normalization: rmsnorm", "normalization"),
            ("bias: false", "bias: true", "bias: true is not supported"),
            ("num_layers: 96", "num_layers: many", "num_layers must be a positive integer"),
            ("hidden_size: 18432\n", "", "missing field hidden_size"),
            ("num_query_groups: 8", "num_query_groups: 7", "not a multiple of num_query_groups 7"),
            ("rotary_percentage: 0.5", "rotary_percentage: 1.5", "rotary_percentage 1.5"),
        ] {
            let text = REWARD_340B.replace(from, to);
            let e = parse(&text, Path::new("m/model_config.yaml")).unwrap_err().to_string();
            assert!(e.starts_with("m/model_config.yaml: ") && e.contains(want), "{from} -> {to}: {e}");
        }
        let e = parse("[1, 2", Path::new("x.yaml")).unwrap_err().to_string();
        assert!(e.contains("not valid YAML"), "{e}");
    }
}
