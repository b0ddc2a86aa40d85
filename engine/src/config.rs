//! Reading an HF-style `config.json` into a [`ModelSpec`].
//!
//! Both schemas transformers writes are accepted: v4 keeps `rope_theta`, `partial_rotary_factor`
//! and `rope_scaling` at the top level; v5 moves them into `rope_parameters`.
//!
//! arbiter's own settings live in one extra object, `"arbiter"`, documented in
//! `docs/model-folder.md`:
//!
//! ```json
//! "arbiter": {
//!   "exposed_attributes": ["helpfulness", "correctness", "coherence", "complexity", "verbosity"],
//!   "reward_weights": {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46,
//!                      "complexity": 0.47, "verbosity": -0.33}
//! }
//! ```

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};
use crate::spec::{GemmaSpec, HeadKind, HeadSpec, Llama3Scaling, MlpKind, ModelSpec, NormKind, RopeSpec};

/// How one architecture differs from the others: everything the config does not say itself.
struct Family {
    /// `architectures[0]`.
    name: &'static str,
    norm: NormKind,
    /// The config key of the norm epsilon, and its default.
    eps_key: &'static str,
    default_eps: f32,
    mlp: MlpKind,
    /// The config key naming the MLP's activation, and the only value the family implements.
    act_key: &'static str,
    act: &'static str,
    default_partial_rotary: f32,
    qk_norm: bool,
    qkv_bias: bool,
    head: HeadKind,
    /// Gemma 2's extras (embedding scale, branch norms, soft-capped and windowed attention).
    gemma: bool,
    /// The config class's `head_dim` when config.json has none (else hidden / heads).
    default_head_dim: Option<usize>,
}

const fn llama_like(name: &'static str) -> Family {
    Family {
        name,
        norm: NormKind::RmsNorm,
        eps_key: "rms_norm_eps",
        default_eps: 1e-6,
        mlp: MlpKind::SwiGlu,
        act_key: "hidden_act",
        act: "silu",
        default_partial_rotary: 1.0,
        qk_norm: false,
        qkv_bias: false,
        head: HeadKind::Linear,
        gemma: false,
        default_head_dim: None,
    }
}

/// Every architecture the engine implements; the forward graph reads the differences as data.
const FAMILIES: [Family; 6] = [
    Family {
        name: "NemotronForSequenceClassification",
        norm: NormKind::LayerNorm1P,
        eps_key: "norm_eps",
        default_eps: 1e-5,
        mlp: MlpKind::Relu2,
        act_key: "hidden_act",
        act: "relu2",
        default_partial_rotary: 0.5,
        qk_norm: false,
        qkv_bias: false,
        head: HeadKind::Linear,
        gemma: false,
        default_head_dim: None,
    },
    llama_like("LlamaForSequenceClassification"),
    // INF-ORM-Llama3.1-70B: Llama with a two-layer head (its model card's
    // `INFORMForSequenceClassification`).
    Family { head: HeadKind::TwoLayerRelu, ..llama_like("INFORMForSequenceClassification") },
    Family { qkv_bias: true, ..llama_like("Qwen2ForSequenceClassification") },
    Family { qk_norm: true, default_head_dim: Some(128), ..llama_like("Qwen3ForSequenceClassification") },
    Family {
        norm: NormKind::RmsNorm1P,
        mlp: MlpKind::GeGlu,
        act_key: "hidden_activation",
        act: "gelu_pytorch_tanh",
        gemma: true,
        default_head_dim: Some(256),
        ..llama_like("Gemma2ForSequenceClassification")
    },
];

/// The architectures this engine implements, as `architectures[0]` names them.
pub const SUPPORTED_ARCHITECTURES: [&str; FAMILIES.len()] = {
    let mut names = [""; FAMILIES.len()];
    let mut i = 0;
    while i < FAMILIES.len() {
        names[i] = FAMILIES[i].name;
        i += 1;
    }
    names
};

/// Parses `config.json` at `path`.
pub fn load_config(path: &Path) -> Result<ModelSpec> {
    read_config(path).map(|(_, spec)| spec)
}

/// Reads and parses `config.json` at `path`: its text (the model fingerprint hashes it) and spec.
pub fn read_config(path: &Path) -> Result<(String, ModelSpec)> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            EngineError::MissingFile { path: path.to_path_buf(), why: "every model folder needs a config.json".into() }
        }
        _ => EngineError::Io { path: path.to_path_buf(), source: e },
    })?;
    let spec = parse_config(&text, path)?;
    Ok((text, spec))
}

/// Parses the text of a `config.json`; `path` is only used in error messages.
pub fn parse_config(text: &str, path: &Path) -> Result<ModelSpec> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| EngineError::Config { path: path.to_path_buf(), message: format!("not valid JSON: {e}") })?;
    let obj = value.as_object().ok_or_else(|| EngineError::Config {
        path: path.to_path_buf(),
        message: "top level is not a JSON object".into(),
    })?;
    Fields { obj, path }.spec()
}

/// Typed access to config fields with errors that name the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, message: impl Into<String>) -> EngineError {
        EngineError::Config { path: self.path.to_path_buf(), message: message.into() }
    }

    fn usize_in(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("field {key:?} must be a positive integer, found {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_in(self.obj, key)?.ok_or_else(|| self.err(format!("missing field {key:?}")))
    }

    fn f32_in(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<f32>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.err(format!("field {key:?} must be a finite number, found {v}"))),
        }
    }

    fn str_in<'v>(&self, obj: &'v Map<String, Value>, key: &str) -> Result<Option<&'v str>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(format!("field {key:?} must be a string, found {v}"))),
        }
    }

    fn flag_false(&self, key: &str, why: &str) -> Result<()> {
        match self.obj.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
            Some(v) => Err(self.err(format!("{key} = {v} is not supported: {why}"))),
        }
    }

    fn family(&self) -> Result<&'static Family> {
        let arch = match self.obj.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => {
                a[0].as_str().ok_or_else(|| self.err("architectures[0] must be a string"))?
            }
            _ => return Err(self.err("missing field \"architectures\" (e.g. [\"NemotronForSequenceClassification\"])")),
        };
        FAMILIES.iter().find(|f| f.name == arch).ok_or_else(|| EngineError::UnsupportedArchitecture {
            path: self.path.to_path_buf(),
            found: arch.to_string(),
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        })
    }

    fn spec(&self) -> Result<ModelSpec> {
        let family = self.family()?;
        let architecture = family.name.to_string();
        let hidden = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        let kv_heads = self.usize_in(self.obj, "num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match (self.usize_in(self.obj, "head_dim")?, family.default_head_dim) {
            (Some(d), _) => d,
            // Qwen3Config and Gemma2Config default head_dim to a constant, not hidden / heads.
            (None, Some(d)) if !self.obj.contains_key("head_dim") => d,
            (None, _) if hidden % heads == 0 => hidden / heads,
            (None, _) => {
                return Err(self.err(format!(
                    "hidden_size {hidden} is not divisible by num_attention_heads {heads} and head_dim is not set"
                )))
            }
        };
        if heads % kv_heads != 0 {
            return Err(
                self.err(format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"))
            );
        }
        // Qwen2 always has q/k/v biases and no `attention_bias` key; elsewhere the key would add
        // biases to all four attention projections, o included, which no family here has.
        let no_bias = "arbiter implements the biases of Qwen2's q/k/v projections only";
        self.flag_false("attention_bias", no_bias)?;
        self.flag_false("mlp_bias", no_bias)?;
        // Qwen2/Qwen3 configs carry sliding-window settings that transformers ignores unless
        // `use_sliding_window` is true; a model that really uses a window is not what we compute.
        self.flag_false("use_sliding_window", "arbiter computes full causal attention on every layer")?;
        let layers = self.usize("num_hidden_layers")?;
        let layer_types = self.layer_types(layers, family.gemma)?;

        let (act_key, act) = (family.act_key, family.act);
        let found_act = self.str_in(self.obj, act_key)?.unwrap_or(act);
        if found_act != act {
            return Err(
                self.err(format!("{act_key} {found_act:?} is not supported for {architecture}; expected {act:?}"))
            );
        }
        let gemma = if family.gemma { Some(self.gemma(layer_types)?) } else { None };
        let norm_eps = self.f32_in(self.obj, family.eps_key)?.unwrap_or(family.default_eps);
        let rope = self.rope(head_dim, family.default_partial_rotary)?;
        let head = self.head(family.head)?;
        let pad_token_id =
            match self.obj.get("pad_token_id") {
                // Gemma2Config's default pad id is 0 (the others' is null).
                None if family.gemma => Some(0),
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                    self.err(format!("field \"pad_token_id\" must be a token id or null, found {v}"))
                })?),
            };
        let arbiter = self.obj.get("arbiter").and_then(Value::as_object);
        let chat_template = match arbiter.and_then(|a| a.get("chat_template")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "nemotron-reward" || s == "jinja" => Some(s.clone()),
            Some(v) => {
                return Err(
                    self.err(format!("arbiter.chat_template must be \"nemotron-reward\" or \"jinja\", found {v}"))
                )
            }
        };
        let demo = arbiter.and_then(|a| a.get("demo")).and_then(Value::as_bool).unwrap_or(false);
        let fp8 = match self.obj.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(q) => Some(crate::fp8::parse_quantization_config(q, &|m| self.err(m))?),
        };
        Ok(ModelSpec {
            architecture,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            ffn: self.usize("intermediate_size")?,
            vocab: self.usize("vocab_size")?,
            max_positions: self.usize_in(self.obj, "max_position_embeddings")?.unwrap_or(4096),
            norm: family.norm,
            norm_eps,
            mlp: family.mlp,
            rope,
            head,
            chat_template,
            demo,
            fp8,
            qk_norm: family.qk_norm,
            qkv_bias: family.qkv_bias,
            pad_token_id,
            gemma,
        })
    }

    /// Per layer, whether it is a sliding-window layer: `layer_types` when given (transformers
    /// 5), else Gemma 2's default (layers 0, 2, 4, ...). Only Gemma 2 may have sliding layers.
    fn layer_types(&self, layers: usize, windows: bool) -> Result<Vec<bool>> {
        let Some(Value::Array(types)) = self.obj.get("layer_types") else {
            return Ok((0..layers).map(|i| windows && i % 2 == 0).collect());
        };
        if types.len() != layers {
            return Err(self.err(format!("layer_types has {} entries for {layers} layers", types.len())));
        }
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(false),
                Some("sliding_attention") if windows => Ok(true),
                _ => Err(self.err(format!(
                    "layer_types[{i}] = {t} is not supported: {}",
                    if windows {
                        "expected \"full_attention\" or \"sliding_attention\""
                    } else {
                        "arbiter computes full causal attention on every layer of this architecture"
                    }
                ))),
            })
            .collect()
    }

    /// Gemma 2's attention settings, with `Gemma2Config`'s defaults where a key is missing (an
    /// explicit null turns soft-capping or the window off). `final_logit_softcapping` applies to
    /// the LM head only, so it is not read.
    fn gemma(&self, sliding_layers: Vec<bool>) -> Result<GemmaSpec> {
        let positive = |key: &str, default: Option<f32>| -> Result<Option<f32>> {
            if !self.obj.contains_key(key) {
                return Ok(default);
            }
            match self.f32_in(self.obj, key)? {
                Some(v) if v <= 0.0 => Err(self.err(format!("field {key:?} must be positive, found {v}"))),
                v => Ok(v),
            }
        };
        let sliding_window = if self.obj.contains_key("sliding_window") {
            self.usize_in(self.obj, "sliding_window")?
        } else {
            Some(4096)
        };
        Ok(GemmaSpec {
            query_pre_attn_scalar: positive("query_pre_attn_scalar", Some(256.0))?.unwrap_or(256.0),
            attn_softcap: positive("attn_logit_softcapping", Some(50.0))?,
            sliding_window,
            sliding_layers,
        })
    }

    /// Rotary settings from either schema: v5's `rope_parameters` wins over v4's top-level keys.
    fn rope(&self, head_dim: usize, default_partial: f32) -> Result<RopeSpec> {
        let empty = Map::new();
        let (params, where_) = match self.obj.get("rope_parameters") {
            Some(Value::Object(p)) => (p, "rope_parameters"),
            Some(Value::Null) | None => match self.obj.get("rope_scaling") {
                Some(Value::Object(p)) => (p, "rope_scaling"),
                Some(Value::Null) | None => (&empty, "rope_scaling"),
                Some(v) => return Err(self.err(format!("rope_scaling must be an object or null, found {v}"))),
            },
            Some(v) => return Err(self.err(format!("rope_parameters must be an object, found {v}"))),
        };
        let theta = match self.f32_in(params, "rope_theta")? {
            Some(t) => t,
            None => self.f32_in(self.obj, "rope_theta")?.unwrap_or(10000.0),
        };
        let partial = match self.f32_in(params, "partial_rotary_factor")? {
            Some(p) => p,
            None => self.f32_in(self.obj, "partial_rotary_factor")?.unwrap_or(default_partial),
        };
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(self.err(format!("partial_rotary_factor {partial} must be in (0, 1]")));
        }
        // transformers truncates: int(head_dim * partial_rotary_factor).
        let rotary_dim = (head_dim as f64 * partial as f64) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(self.err(format!(
                "rotary dimension {rotary_dim} (head_dim {head_dim} x partial_rotary_factor {partial}) must be even and positive"
            )));
        }
        let rope_type = match self.str_in(params, "rope_type")? {
            Some(t) => Some(t),
            None => self.str_in(params, "type")?,
        };
        let llama3 = match rope_type {
            None | Some("default") => None,
            Some("llama3") => {
                let need = |k: &str| -> Result<f32> {
                    self.f32_in(params, k)?
                        .ok_or_else(|| self.err(format!("{where_}.{k} is required for rope_type \"llama3\"")))
                };
                let s = Llama3Scaling {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                };
                if s.high_freq_factor == s.low_freq_factor || s.factor <= 0.0 {
                    return Err(self.err(format!(
                        "{where_}: llama3 scaling needs factor > 0 and high_freq_factor != low_freq_factor"
                    )));
                }
                Some(s)
            }
            Some(other) => {
                return Err(self
                    .err(format!("unsupported rope type {other:?} in {where_}; supported: \"default\", \"llama3\"")))
            }
        };
        Ok(RopeSpec { theta, rotary_dim, llama3 })
    }

    /// Head labels from `id2label`, exposure and default reward weights from `"arbiter"`.
    fn head(&self, kind: HeadKind) -> Result<HeadSpec> {
        let labels: Vec<String> = match self.obj.get("id2label") {
            Some(Value::Object(m)) => {
                let mut labels = vec![None; m.len()];
                for (k, v) in m {
                    let i: usize = k
                        .parse()
                        .ok()
                        .filter(|&i| i < m.len())
                        .ok_or_else(|| self.err(format!("id2label key {k:?} is not an index below {}", m.len())))?;
                    let name = v.as_str().ok_or_else(|| self.err(format!("id2label[{k}] must be a string")))?;
                    labels[i] = Some(name.to_string());
                }
                labels.into_iter().map(|l| l.expect("indices are distinct and in range")).collect()
            }
            _ => {
                let n = self.usize_in(self.obj, "num_labels")?.unwrap_or(1);
                (0..n).map(|i| format!("LABEL_{i}")).collect()
            }
        };
        let arbiter = match self.obj.get("arbiter") {
            Some(Value::Object(a)) => Some(a),
            None | Some(Value::Null) => None,
            Some(v) => return Err(self.err(format!("field \"arbiter\" must be an object, found {v}"))),
        };
        let index_of = |name: &str, field: &str| -> Result<usize> {
            labels
                .iter()
                .position(|l| l == name)
                .ok_or_else(|| self.err(format!("arbiter.{field} names {name:?}, which is not in id2label {labels:?}")))
        };
        let exposed: Vec<usize> = match arbiter.and_then(|a| a.get("exposed_attributes")) {
            None | Some(Value::Null) => (0..labels.len()).collect(),
            Some(Value::Array(names)) if !names.is_empty() => names
                .iter()
                .map(|n| {
                    n.as_str()
                        .ok_or_else(|| self.err("arbiter.exposed_attributes must be a list of strings"))
                        .and_then(|s| index_of(s, "exposed_attributes"))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(self.err("arbiter.exposed_attributes must be a non-empty list of strings")),
        };
        let reward_weights = match arbiter.and_then(|a| a.get("reward_weights")) {
            None | Some(Value::Null) if exposed.len() == 1 => vec![1.0],
            None | Some(Value::Null) => {
                return Err(self.err(format!(
                    "the head exposes {} attributes but arbiter.reward_weights is not set; \
                     say how they combine into one reward (see docs/model-folder.md)",
                    exposed.len()
                )))
            }
            Some(Value::Object(w)) => {
                let mut weights = vec![0.0; exposed.len()];
                for (name, v) in w {
                    let i = index_of(name, "reward_weights")?;
                    let slot = exposed.iter().position(|&e| e == i).ok_or_else(|| {
                        self.err(format!("arbiter.reward_weights names {name:?}, which is not exposed"))
                    })?;
                    weights[slot] = v
                        .as_f64()
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| self.err(format!("arbiter.reward_weights.{name} must be a finite number")))?
                        as f32;
                }
                weights
            }
            Some(_) => return Err(self.err("arbiter.reward_weights must be an object of name -> number")),
        };
        Ok(HeadSpec { kind, labels, exposed, reward_weights })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nemotron_v4() -> Value {
        serde_json::json!({
            "architectures": ["NemotronForSequenceClassification"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
            "vocab_size": 100, "hidden_act": "relu2", "norm_eps": 1e-5,
            "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "id2label": {"0": "a", "1": "b"},
            "arbiter": {"reward_weights": {"a": 1.0, "b": -0.5}}
        })
    }

    fn parse(v: &Value) -> Result<ModelSpec> {
        parse_config(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn v4_and_v5_schemas_give_the_same_spec() {
        let v4 = nemotron_v4();
        let mut v5 = v4.clone();
        let o = v5.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("partial_rotary_factor");
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        );
        let a = parse(&v4).unwrap();
        assert_eq!(a, parse(&v5).unwrap());
        assert_eq!(a.rope.rotary_dim, 8);
        assert_eq!(a.norm, NormKind::LayerNorm1P);
        assert_eq!(a.head.reward_weights, vec![1.0, -0.5]);
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let mut v = nemotron_v4();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("unsupported rope type \"yarn\""), "{e}");
    }

    #[test]
    fn llama3_scaling_needs_all_fields() {
        let mut v = nemotron_v4();
        v["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
        v["hidden_act"] = serde_json::json!("silu");
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("low_freq_factor"), "{e}");
    }

    #[test]
    fn unsupported_architecture_names_what_is_supported() {
        let mut v = nemotron_v4();
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("MistralForCausalLM") && e.contains("LlamaForSequenceClassification"), "{e}");
    }

    #[test]
    fn reward_weights_must_name_exposed_attributes() {
        let mut v = nemotron_v4();
        v["arbiter"] = serde_json::json!({"exposed_attributes": ["b"], "reward_weights": {"a": 1.0}});
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("\"a\", which is not exposed"), "{e}");
        v["arbiter"] = serde_json::json!({"exposed_attributes": ["zz"]});
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("\"zz\""), "{e}");
    }

    #[test]
    fn several_outputs_without_weights_is_an_error() {
        let mut v = nemotron_v4();
        v.as_object_mut().unwrap().remove("arbiter");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("reward_weights is not set"), "{e}");
    }

    #[test]
    fn gemma2_settings_missing_from_config_take_gemma2configs_defaults_and_null_turns_them_off() {
        let mut v = nemotron_v4();
        let o = v.as_object_mut().unwrap();
        o.insert("architectures".into(), serde_json::json!(["Gemma2ForSequenceClassification"]));
        o.insert("hidden_activation".into(), serde_json::json!("gelu_pytorch_tanh"));
        o.remove("hidden_act");
        let g = parse(&v).unwrap().gemma.unwrap();
        assert_eq!((g.query_pre_attn_scalar, g.attn_softcap, g.sliding_window), (256.0, Some(50.0), Some(4096)));
        assert_eq!(g.sliding_layers, [true, false, true, false]);
        assert_eq!(parse(&v).unwrap().pad_token_id, Some(0), "Gemma2Config's default pad id");
        v.as_object_mut().unwrap().remove("head_dim");
        assert_eq!(parse(&v).unwrap().head_dim, 256, "Gemma2Config's default head_dim, not 64 / 4");
        v["attn_logit_softcapping"] = serde_json::json!(null);
        v["sliding_window"] = serde_json::json!(null);
        let g = parse(&v).unwrap().gemma.unwrap();
        assert_eq!((g.attn_softcap, g.sliding_window), (None, None));
    }

    #[test]
    fn linear_biases_are_refused() {
        let mut v = nemotron_v4();
        v["attention_bias"] = serde_json::json!(true);
        assert!(parse(&v).unwrap_err().to_string().contains("attention_bias"));
    }
}
