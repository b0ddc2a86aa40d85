//! `arbiter convert`: turns NVIDIA's released Nemotron-4-340B-Reward checkpoint (a NeMo folder
//! with `model_config.yaml`, a SentencePiece model and `model_weights/`, a Megatron distributed
//! checkpoint in zarr format) into an arbiter model folder: `config.json`, safetensors shards,
//! `tokenizer.json`. See docs/convert.md.
//!
//! Everything is checked before any weight byte is copied: every array's `.zarray` against
//! `model_config.yaml`, every chunk file's presence and size, and the tokenizer (built from the
//! SentencePiece model in Rust) against SentencePiece itself on a built-in corpus, when a Python
//! with `sentencepiece` is at hand. The weights are then streamed layer by layer and chunk by
//! chunk, so memory stays at a few rows and write buffers whatever the model's size.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use arbiter_engine::config::load_config;
use arbiter_engine::tensors::tensor_shapes;
use arbiter_engine::weights::WeightStore;
use serde_json::{json, Value};

pub mod error;
pub mod layout;
pub mod nemo_config;
pub mod quantize;
pub mod sentencepiece;
pub mod tokenizer;
pub mod writer;
pub mod zarr;

pub use error::{ConvertError, Result};

/// The head's names and the default reward, shared with the engine's 340B config (one list).
pub use arbiter_engine::scores::{DEFAULT_REWARD_WEIGHTS, HELPSTEER_LABELS};

/// How the tokenizer is produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// Build tokenizer.json from the SentencePiece model (in Rust), then check it against
    /// SentencePiece itself as [`Verification`] says.
    Build(Verification),
    /// Use tokenizer.json and sentencepiece_reference.json the script already wrote into this folder.
    Dir(PathBuf),
    /// Write no tokenizer: the folder then accepts token ids only.
    None,
}

/// Whether and how a built tokenizer is checked against SentencePiece (Python's `sentencepiece`,
/// through `scripts/spm_to_tokenizer_json.py --reference-only`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// This interpreter must run SentencePiece: any failure, a mismatch included, refuses the conversion.
    Python(PathBuf),
    /// `python3` on PATH, if it has the `sentencepiece` module; otherwise the tokenizer is written
    /// unverified. A mismatch still refuses the conversion.
    IfAvailable,
}

/// What became of the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerOutcome {
    /// No tokenizer was written (`--weights-only`).
    None,
    /// tokenizer.json encodes the fidelity corpus as SentencePiece does, on this many entries.
    Verified(usize),
    /// tokenizer.json was built but not checked against SentencePiece, for this reason.
    NotVerified(String),
}

/// What to convert, and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The released checkpoint folder.
    pub input: PathBuf,
    /// The arbiter model folder to write (must not exist, or be empty).
    pub output: PathBuf,
    /// The SentencePiece model; default: the file model_config.yaml names, in `input`.
    pub tokenizer_model: Option<PathBuf>,
    /// How to make tokenizer.json.
    pub tokenizer: TokenizerSource,
    /// Largest shard, in bytes.
    pub max_shard_bytes: u64,
    /// Draw a progress bar on standard error (when it is a terminal).
    pub progress: bool,
    /// Store the linear layers as FP8 (e4m3, per-channel scales) instead of the checkpoint's
    /// bf16: the 340B model then fits 8 x 80 GB (docs/fp8.md).
    pub fp8: bool,
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Output tensors written.
    pub tensors: usize,
    /// Shard files.
    pub shards: usize,
    /// Weight bytes written.
    pub bytes: u64,
    /// Whether tokenizer.json was written and checked against SentencePiece.
    pub tokenizer: TokenizerOutcome,
    /// Seconds the whole conversion took.
    pub seconds: f64,
}

/// Converts `opts.input` into `opts.output`.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    let started = Instant::now();
    if !opts.input.is_dir() {
        return Err(ConvertError::MissingFile {
            path: opts.input.clone(),
            why: "the released checkpoint folder (model_config.yaml, model_weights/, the .model file)".into(),
        });
    }
    let cfg = nemo_config::load(&opts.input.join("model_config.yaml"))?;
    let weights_dir = opts.input.join("model_weights");
    if !weights_dir.is_dir() {
        return Err(ConvertError::MissingFile {
            path: weights_dir,
            why: "the released checkpoint keeps its weights there (a Megatron zarr checkpoint)".into(),
        });
    }
    let mut layout = layout::plan(&weights_dir, &cfg)?;
    // Progress counts bytes read, which quantizing does not change.
    let total = layout.total_bytes();
    let scheme = opts.fp8.then(arbiter_engine::fp8::Fp8Scheme::default);
    if let Some(scheme) = &scheme {
        layout.quantize(scheme);
    }
    let labels: Vec<String> = match layout.num_outputs {
        9 => HELPSTEER_LABELS.iter().map(|s| s.to_string()).collect(),
        1 => vec!["reward".to_string()],
        n => {
            return Err(ConvertError::ShapeMismatch {
                name: "model.rm_head.weight".into(),
                expected: vec![9, cfg.hidden],
                found: vec![n, cfg.hidden],
                why: "a HelpSteer2 head has 9 outputs, a Bradley-Terry head 1".into(),
            })
        }
    };
    prepare_output(&opts.output)?;

    // The tokenizer first: a tokenizer that does not match SentencePiece refuses the conversion
    // before hours of copying.
    let mut config = hf_config(&cfg, &layout, &labels, opts.tokenizer != TokenizerSource::None);
    if let Some(scheme) = &scheme {
        config["quantization_config"] = scheme.to_config();
    }
    let config_path = opts.output.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).expect("JSON serializes"))
        .map_err(error::io(&config_path))?;
    let tokenizer = match &opts.tokenizer {
        TokenizerSource::None => TokenizerOutcome::None,
        source => {
            let result = convert_tokenizer(opts, &cfg, &layout, source);
            if result.is_err() {
                // Leave no folder that looks converted.
                let _ = std::fs::remove_file(&config_path);
                let _ = std::fs::remove_file(opts.output.join("tokenizer.json"));
            }
            result?
        }
    };

    // config.json comes back last: a conversion stopped half-way leaves no folder the engine would load.
    std::fs::remove_file(&config_path).map_err(error::io(&config_path))?;
    let shards = writer::create(&opts.output, &layout.outputs, opts.max_shard_bytes)?;
    let bar = progress_bar(opts.progress, total);
    for job in &layout.jobs {
        let array = &layout.arrays[job.array];
        match job.prefix.first() {
            Some(l) => bar.set_message(format!("layer {l} {}", array.name.trim_start_matches("model.decoder.layers."))),
            None => bar.set_message(array.name.clone()),
        }
        writer::run_job(&layout, &shards, job, &mut |n| bar.inc(n))?;
    }
    bar.finish_and_clear();
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).expect("JSON serializes"))
        .map_err(error::io(&config_path))?;

    check_output(&opts.output)?;
    Ok(ConvertReport {
        tensors: layout.outputs.len(),
        shards: shards.files.len(),
        bytes: layout.total_bytes(),
        tokenizer,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A progress bar over `total` bytes on standard error, or a hidden one.
fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    let bar = if show { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("a valid template"),
    );
    bar
}

/// Checks that a written folder loads as the engine reads it: every tensor by name with the
/// shape config.json implies, and for FP8 folders every scale with its `[out, 1]` shape.
fn check_output(dir: &Path) -> Result<()> {
    let spec = load_config(&dir.join("config.json"))?;
    let store = WeightStore::open(dir)?;
    for (name, shape) in tensor_shapes(&spec) {
        store.get_shaped(&name, &shape)?;
        if spec.fp8.as_ref().is_some_and(|q| q.quantizes(&name)) {
            store.get_shaped(&arbiter_engine::fp8::scale_name(&name), &[shape[0], 1])?;
        }
    }
    Ok(())
}

fn prepare_output(dir: &Path) -> Result<()> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(error::io(dir))?;
        if entries.next().is_some() {
            return Err(ConvertError::Output {
                path: dir.to_path_buf(),
                message: "the folder exists and is not empty; convert into a new or empty folder".into(),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(error::io(dir))
}

fn convert_tokenizer(
    opts: &ConvertOptions,
    cfg: &nemo_config::NemoConfig,
    layout: &layout::Layout,
    source: &TokenizerSource,
) -> Result<TokenizerOutcome> {
    let model = tokenizer::find_model(&opts.input, cfg.tokenizer_model.as_deref(), opts.tokenizer_model.as_deref())?;
    let sp = sentencepiece::SentencePieceModel::read(&model)?;
    // Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP.
    let multiple = cfg.vocab_divisible_by * cfg.tensor_parallel;
    let padded = sp.pieces().div_ceil(multiple) * multiple;
    if padded != layout.vocab {
        return Err(ConvertError::ShapeMismatch {
            name: "model.embedding.word_embeddings.weight".into(),
            expected: vec![padded, cfg.hidden],
            found: vec![layout.vocab, cfg.hidden],
            why: format!(
                "the tokenizer's {} pieces padded to a multiple of make_vocab_size_divisible_by {} x tensor_model_parallel_size {}",
                sp.pieces(),
                cfg.vocab_divisible_by,
                cfg.tensor_parallel
            ),
        });
    }
    let dst = opts.output.join("tokenizer.json");
    let verification = match source {
        TokenizerSource::Build(v) => v,
        TokenizerSource::Dir(dir) => {
            let reference = tokenizer::load_reference(dir, &model)?;
            let src = dir.join("tokenizer.json");
            std::fs::copy(&src, &dst).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ConvertError::MissingFile {
                    path: src.clone(),
                    why: "scripts/spm_to_tokenizer_json.py writes it".into(),
                },
                _ => error::io(&src)(e),
            })?;
            return Ok(TokenizerOutcome::Verified(tokenizer::check_fidelity(&opts.output, &reference)?));
        }
        TokenizerSource::None => unreachable!("handled by the caller"),
    };
    sp.write_tokenizer_json(&dst)?;
    let python = match verification {
        Verification::Python(p) => p.clone(),
        Verification::IfAvailable => match tokenizer::probe_sentencepiece(Path::new(tokenizer::DEFAULT_PYTHON)) {
            Ok(()) => PathBuf::from(tokenizer::DEFAULT_PYTHON),
            Err(why) if sp.has_charsmap() => {
                return Ok(TokenizerOutcome::NotVerified(format!(
                    "{why}; this model's normalizer has a character map, where tokenizers and SentencePiece \
                     are known to differ on some inputs (docs/convert.md)"
                )))
            }
            Err(why) => return Ok(TokenizerOutcome::NotVerified(why)),
        },
    };
    let work = opts.output.join(".tokenizer-work");
    let result = tokenizer::run_script(&python, &model, &work)
        .and_then(|()| tokenizer::load_reference(&work, &model))
        .and_then(|reference| tokenizer::check_fidelity(&opts.output, &reference));
    if work.exists() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(TokenizerOutcome::Verified(result?))
}

/// The config.json of the converted folder (see engine/src/config.rs and docs/model-folder.md).
fn hf_config(cfg: &nemo_config::NemoConfig, layout: &layout::Layout, labels: &[String], tokenizer: bool) -> Value {
    let id2label: serde_json::Map<String, Value> =
        labels.iter().enumerate().map(|(i, l)| (i.to_string(), Value::String(l.clone()))).collect();
    let label2id: serde_json::Map<String, Value> =
        labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
    let mut arbiter = serde_json::Map::new();
    if tokenizer {
        arbiter.insert("chat_template".into(), json!("nemotron-reward"));
    }
    if labels.len() == 9 {
        arbiter.insert("exposed_attributes".into(), json!(HELPSTEER_LABELS[4..]));
        let w: serde_json::Map<String, Value> =
            DEFAULT_REWARD_WEIGHTS.iter().map(|(n, w)| (n.to_string(), json!(w))).collect();
        arbiter.insert("reward_weights".into(), Value::Object(w));
    }
    let dtype = match layout.outputs.first().map(|t| t.dtype) {
        Some(arbiter_engine::weights::Dtype::F32) => "float32",
        Some(arbiter_engine::weights::Dtype::F16) => "float16",
        _ => "bfloat16",
    };
    json!({
        "architectures": ["NemotronForSequenceClassification"],
        "model_type": "nemotron",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.groups,
        "head_dim": cfg.head_dim,
        "vocab_size": layout.vocab,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": "relu2",
        "norm_eps": cfg.eps,
        "rope_theta": cfg.rotary_base,
        "partial_rotary_factor": cfg.rotary_percentage,
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "num_labels": labels.len(),
        "id2label": id2label,
        "label2id": label2id,
        "torch_dtype": dtype,
        "arbiter": arbiter,
    })
}
